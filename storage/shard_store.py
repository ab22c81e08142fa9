"""Build one index version's FAISS files from its float16 embeddings parts.

`train_version` writes `trained.faiss` and then `trained.json` (its `TrainedRef`); `build_shard`
writes `shards/shard-NNNNN.faiss` (with its sorted ids, vectors and catalog rows beside it) and then
`shards/shard-NNNNN.json` (its `ShardRef`), whose
presence marks the shard done (so a re-run rebuilds only shards without a marker). Both read
their inputs by reference, verified: a nightly update builds delta shards on the live version's
trained index from parts in its own folder, a compaction from parts in earlier folders. Plain functions: the job runs them as
Ray tasks, a test or a notebook can call them directly.
"""

from __future__ import annotations

import numpy as np

from mllm_index.storage.catalog import embeddings_from_table
from mllm_index.storage.contracts import FileRef, ShardRef, TrainedRef, read_contract, version_file, write_contract
from mllm_index.storage.integrity import digest, load_faiss_verified, read_verified_parquet
from mllm_index.storage.faiss_store import add_vectors, index_to_bytes, train_index
from mllm_index.storage.shard_catalog import write_shard_catalog
from mllm_index.storage.shard_vectors import write_shard_vectors
from mllm_index.storage.uris import Location

TRAINED, TRAINED_REF = "trained.faiss", "trained.json"


def part_file(part: int, ext: str = "parquet") -> str:
    return f"part-{part:05d}.{ext}"


def shard_file(shard: int, ext: str = "faiss") -> str:
    return f"shard-{shard:05d}.{ext}"


def part_ref(version_name: str, part: int, kind: str, recorded: dict[str, FileRef] | None = None) -> FileRef:
    """A part's file of one kind (embeddings, catalog, failures): as its writer recorded it, with its checksum,
    wherever it lives; else by path in the version's own folder (the index job's layout, or a marker written
    before checksums existed: verified by size and structure)."""
    return (recorded or {}).get(kind) or FileRef(path=version_file(version_name, kind, part_file(part)))


def own_parts(version_name: str, parts) -> dict[int, FileRef]:
    """References to a version's own embeddings parts (the index job's layout)."""
    return {p: part_ref(version_name, p, "embeddings") for p in parts}


def sample_vectors(index: Location, refs: dict[int, FileRef], part_counts: dict[int, int], sample_size: int,
                   seed: int) -> np.ndarray:
    """A uniform random sample over all parts, drawn part by part (no part is loaded twice); the parts
    may live in any version's folder."""
    total = sum(part_counts.values())
    rng = np.random.default_rng(seed)
    chunks = []
    for part, count in sorted(part_counts.items()):
        if count == 0:
            continue
        take = min(count, int(np.ceil(sample_size * count / total)))
        _, vecs = embeddings_from_table(read_verified_parquet(index, refs[part]))
        chunks.append(vecs[np.sort(rng.choice(len(vecs), size=min(take, len(vecs)), replace=False))])
    return np.concatenate(chunks).astype(np.float32)


def train_version(index: Location, version_name: str, part_counts: dict[int, int], factory: str, metric: str,
                  sample_size: int, seed: int, use_gpu: bool, refs: dict[int, FileRef] | None = None) -> TrainedRef:
    """Train the empty index shared by every shard; writes trained.faiss, then trained.json.
    `refs`: the embeddings parts by part number (default: the version's own)."""
    refs = refs or own_parts(version_name, part_counts)
    vectors = sample_vectors(index, refs, part_counts, sample_size, seed)
    data = index_to_bytes(train_index(factory, vectors, metric, use_gpu=use_gpu))
    return _save_trained(index, version_name, data, len(vectors))


def _save_trained(index: Location, version_name: str, data: bytes, points: int) -> TrainedRef:
    version = index.child("versions", version_name)
    version.write_bytes(data, TRAINED)
    ref = TrainedRef(file=digest(version_file(version_name, TRAINED), data), train_points=points)
    write_contract(version, ref, TRAINED_REF)  # last: the training's done marker
    return ref


def trained_ref(index: Location, version_name: str) -> TrainedRef | None:
    """The version's trained index, None before it exists (a run from before trained.json: digested now)."""
    version = index.child("versions", version_name)
    if version.exists(TRAINED_REF):
        return read_contract(version, TrainedRef, TRAINED_REF)
    if version.exists(TRAINED):
        return TrainedRef(file=digest(version_file(version_name, TRAINED), version.read_bytes(TRAINED)))
    return None


def build_shard(index: Location, version_name: str, shard: int, parts: list[int], use_gpu: bool,
                trained: FileRef | None = None, embeddings: list[FileRef] | None = None, delta: bool = False,
                catalog: list[FileRef] | None = None) -> ShardRef:
    """The trained index (this version's, or `trained` from another folder: an update's delta shards
    go on the live training) + all vectors of `parts` (`embeddings`: their files, wherever they are);
    writes the shard into this version's folder, then its marker.

    With the shard go its catalog rows (storage/shard_catalog.py), from `catalog` (the parts' catalog
    files, wherever they are); None for vectors published without a catalog (`publish_vectors`)."""
    version = index.child("versions", version_name)
    trained_index = load_faiss_verified(index, trained or trained_ref(index, version_name).file)
    refs = embeddings if embeddings is not None else list(own_parts(version_name, parts).values())
    ids, vecs = [], []
    for ref in refs:
        part_ids, part_vecs = embeddings_from_table(read_verified_parquet(index, ref))
        ids.append(part_ids)
        vecs.append(part_vecs)
    filled = trained_index
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    vecs = np.concatenate(vecs) if vecs else np.zeros((0, trained_index.d), np.float16)
    if len(ids):
        filled = add_vectors(trained_index, ids, vecs.astype(np.float32), use_gpu=use_gpu)
    # The shard's ids and float16 vectors sorted by id: an exact re-score reads only its shortlist's rows.
    ids_ref, vectors_ref = write_shard_vectors(version, version_name, shard, ids, vecs)
    del vecs
    # Its catalog rows, checked to be exactly its ids: a candidate's row is read from the shard that returned it.
    catalog_ref = write_shard_catalog(index, version_name, shard, catalog, ids) if catalog is not None else None
    data = index_to_bytes(filled)
    version.write_bytes(data, "shards", shard_file(shard))
    ref = ShardRef(file=digest(version_file(version_name, "shards", shard_file(shard)), data), shard=shard, parts=parts,
                   ntotal=int(filled.ntotal), ids=ids_ref, vectors=vectors_ref, delta=delta, catalog=catalog_ref)
    write_contract(version, ref, "shards", shard_file(shard, "json"))  # the shard's done marker
    return ref


def finished_shard(index: Location, version_name: str, shard: int, parts: list[int] | None = None) -> ShardRef | None:
    """The shard's marker, if this version built it already (with these parts, when given)."""
    version = index.child("versions", version_name)
    marker = ("shards", shard_file(shard, "json"))
    if not version.exists(*marker):
        return None
    ref = read_contract(version, ShardRef, *marker)
    return ref if parts is None or ref.parts == list(parts) else None


def version_parts(version_name: str, folder: str, parts: list[int]) -> list[FileRef]:
    """References to a version's own part files of one kind (embeddings, catalog, failures)."""
    return [FileRef(path=version_file(version_name, folder, part_file(p))) for p in parts]


def publish_vectors(index: Location, ids: np.ndarray, vectors: np.ndarray, factory: str, metric: str = "ip",
                    part_size: int = 65536, parts_per_shard: int = 16) -> str:
    """Publish precomputed embeddings as a new index version (no images, no Ray): the same
    parts -> trained index -> shards -> manifest path as the index job, in one process."""
    from mllm_index.storage.catalog import embeddings_table
    from mllm_index.storage.contracts import Counts, Manifest
    from mllm_index.storage.faiss_store import train_sample_size
    from mllm_index.storage.integrity import write_parquet_ref
    from mllm_index.storage.versions import begin_version, fingerprint, publish

    settings = {"factory": factory, "metric": metric, "n": int(len(ids)), "part_size": part_size}
    name, _ = begin_version(index, fingerprint(settings), settings)
    counts, embedding_refs = {}, []
    for p, start in enumerate(range(0, len(ids), part_size)):
        table = embeddings_table(ids[start : start + part_size], vectors[start : start + part_size])
        embedding_refs.append(write_parquet_ref(index, version_file(name, "embeddings", part_file(p)), table))
        counts[p] = table.num_rows
    refs = dict(enumerate(embedding_refs))
    trained = train_version(index, name, counts, factory, metric, train_sample_size(factory, len(ids), 1_000_000),
                            seed=0, use_gpu=True, refs=refs)
    parts = sorted(counts)
    groups = [parts[i : i + parts_per_shard] for i in range(0, len(parts), parts_per_shard)]
    shards = [build_shard(index, name, s, group, use_gpu=True, embeddings=[refs[p] for p in group])
              for s, group in enumerate(groups)]
    publish(index, Manifest(version=name, parent=index.read_json("versions", name, "run.json").get("parent"),
                            metric=metric, dim=int(vectors.shape[1]), factory=factory, shards=shards,
                            counts=Counts(seen=len(ids), indexed=len(ids)), trained_on=len(ids), trained=trained.file,
                            embeddings=embedding_refs))
    return name

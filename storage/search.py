"""Search a published index version: shards, merged top-k, optional exact re-score.

PQ codes alone cap recall@10 near 0.5 on realistic embeddings; re-scoring a shortlist
(e.g. 200 per query) with the float16 embeddings kept beside the index brings it near 1.

Two ways to hold a version:
- `IndexSearcher`: one process, every shard (notebooks, tests). Its re-score reads the
  vectors from the embeddings parts into memory (`vectors="memory"`, as it always did), or
  only the shortlist's rows from the shards' own vector files (`vectors="shards"`).
- `ShardGroup` + `ShardRescorer` (storage.shard_vectors): a bounded subset of the shards,
  as `plan_groups` cuts them under a memory budget; the rerank job's search stages run one
  actor pool per group and merge (pipelines.search_stages). Same answers as IndexSearcher.

Tombstones (ids a shard stores that are no longer live, storage.tombstones) are filtered inside
FAISS: each IVF shard is searched with an `IDSelectorNot(IDSelectorBatch)` of its tombstoned ids,
so a shard's top-k holds k live ids and the merged top-k equals the top-k of the live set. The
re-score reads a candidate's vector only from a shard where it is live (a changed id is stored
in its old shard, tombstoned, and in a delta shard), and catalog rows only from their live part.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from mllm_index.storage.catalog import embeddings_from_table
from mllm_index.storage.contracts import FileRef, Manifest, ShardRef
from mllm_index.storage.faiss_store import faiss, merge_topk, set_nprobe
from mllm_index.storage.integrity import IntegrityError, load_faiss_verified, read_verified_parquet, where
from mllm_index.storage.shard_vectors import PAIR_CHUNK, ShardRescorer, local_copy, pair_scores
from mllm_index.storage.tombstones import PartFilter, id_selector, is_in, search_params, shard_tombstoned_ids
from mllm_index.storage.uris import Location, redact
from mllm_index.storage.versions import read_latest, read_manifest

ID_BYTES = 8  # per image: the sorted ids a re-scoring actor keeps to find a candidate's row
# per tombstoned id in a searching actor: its sorted id (8 B) and faiss's IDSelectorBatch (a hash
# set entry and its bloom bits, ~40 B with libstdc++)
SELECTOR_BYTES = 48


def has_shard_vectors(manifest: Manifest) -> bool:
    """Whether every shard carries its ids and vectors files (versions built since they exist)."""
    return all(s.ids is not None and s.vectors is not None for s in manifest.shards)


def shard_bytes(shard: ShardRef, index: bool = True, ids: bool = False, shared: int = 0) -> int:
    """Memory a shard takes in an actor: its FAISS file (codes, ids, lists) and/or its sorted ids.
    `shared`: bytes of the file it shares with the other shards of its group (the trained index:
    coarse quantizer and codebooks), counted once per group. A format-1 shard without a recorded
    size counts 0 (grouping by count still bounds it). Tombstoned ids add their selector (searching)
    or their sorted ids (re-scoring)."""
    searching = (max(0, (shard.file.bytes or 0) - shared) + SELECTOR_BYTES * shard.tombstoned) * index
    return searching + ID_BYTES * (shard.ntotal + shard.tombstoned) * ids


def group_bytes(shards: list[ShardRef], index: bool = True, ids: bool = False, shared: int = 0) -> int:
    """Memory of a group of shards in one actor: `shard_bytes` each, plus the shared part once."""
    return sum(shard_bytes(s, index, ids, shared) for s in shards) + (shared if index and shards else 0)


def plan_groups(shards: list[ShardRef], max_bytes: int | None, max_shards: int | None, index: bool = True,
                ids: bool = False, shared: int = 0) -> list[list[int]]:
    """Consecutive shards (positions in `shards`) packed into groups of at most `max_bytes`
    (see `group_bytes`) and `max_shards` each; a shard larger than the budget gets a group alone.

    `shared` is the trained index's size: every shard file carries a copy of the coarse quantizer
    (201 MB for IVF131072 at dim 384), which a ShardGroup holds once."""
    groups: list[list[int]] = []
    held = 0
    for pos, shard in enumerate(shards):
        size = shard_bytes(shard, index, ids, shared)
        full = groups and ((max_shards and len(groups[-1]) >= max_shards) or (max_bytes and held + size > max_bytes))
        if not groups or full:
            groups.append([])
            held = shared if index else 0
        groups[-1].append(pos)
        held += size
    return groups


def exact_order(exact: np.ndarray, ids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Candidates ordered by their exact scores; NaN (no vector found) and -1 go last, as id -1."""
    return exact_order_tagged(exact, ids, None, metric)[:2]


def exact_order_tagged(exact: np.ndarray, ids: np.ndarray, tags: np.ndarray | None,
                       metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`exact_order`, carrying each candidate's tag (its shard) along; -1 where the id becomes -1."""
    valid = (ids >= 0) & ~np.isnan(exact)
    worst = -np.inf if metric == "ip" else np.inf
    exact = np.where(valid, exact, worst).astype(np.float32)
    order = np.argsort(-exact if metric == "ip" else exact, axis=1, kind="stable")
    ordered_tags = None if tags is None else np.take_along_axis(np.where(valid, tags, -1), order, 1)
    return np.take_along_axis(exact, order, 1), np.take_along_axis(np.where(valid, ids, -1), order, 1), ordered_tags


def load_shard(location: Location, ref: FileRef, cache_dir: str | None = None):
    """A shard read by FAISS straight from a verified file on the local disk (the index's own file
    on a local filesystem, else a copy in `cache_dir`), so loading holds no second copy of it in
    memory (reading the bytes and deserializing them held three). A remote format-1 shard,
    without a checksum to name its cached copy, is read from its bytes."""
    if ref.sha256 is None and not isinstance(location.fs, LocalFileSystem):
        return load_faiss_verified(location, ref)
    path = local_copy(location, ref, cache_dir)
    try:
        return faiss.read_index(path)
    except Exception as exc:  # faiss raises RuntimeError with its own C++ message, without the file name
        raise IntegrityError(f"{where(location, ref)}: not a readable FAISS index ({str(exc).strip()[:200]})") from None


class Tombstoned:
    """A shard's tombstoned ids (sorted) and the FAISS selector that passes every other id."""

    def __init__(self, location: Location, ref: ShardRef):
        self.ids = shard_tombstoned_ids(location, ref) if ref.tombstones is not None else np.zeros(0, np.int64)
        if len(self.ids) != ref.tombstoned:
            raise IntegrityError(f"{where(location, ref.tombstones or ref.file)}: {len(self.ids)} tombstoned ids, the "
                                 f"manifest records {ref.tombstoned} for shard {ref.shard}")
        self.selector = id_selector(self.ids) if len(self.ids) else None


def _preassigned(ivf, queries: np.ndarray, k: int, coarse: tuple[np.ndarray, np.ndarray], params) -> tuple[np.ndarray, np.ndarray]:
    """`IndexIVF.search_preassigned` with search parameters (faiss's Python wrapper refuses them)."""
    n = len(queries)
    scores, ids = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    dis, assign = np.ascontiguousarray(coarse[0], np.float32), np.ascontiguousarray(coarse[1], np.int64)
    ivf.search_preassigned_c(n, faiss.swig_ptr(queries), k, faiss.swig_ptr(assign), faiss.swig_ptr(dis),
                             faiss.swig_ptr(scores), faiss.swig_ptr(ids), False, params)
    return scores, ids


def _search_without(index, queries: np.ndarray, k: int, dead: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-k live results of an index FAISS cannot filter with a selector (not an IVF index itself):
    the top k + |dead| with the dead removed, which is the same list for IVF and flat searches."""
    s, i = index.search(queries, min(k + len(dead), max(index.ntotal, 1)))
    keep = (i >= 0) & ~is_in(i, dead)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # live results first, in their order
    s, i, keep = (np.take_along_axis(a, order, 1) for a in (s, i, keep))
    worst = -np.inf if metric == "ip" else np.inf
    return np.where(keep, s, worst).astype(np.float32), np.where(keep, i, -1)


def search_shard(index, queries: np.ndarray, k: int, nprobe: int | None, dead: Tombstoned, metric: str,
                 coarse: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One shard's top-k (scores, ids) of live vectors. `coarse`: the queries' (distances, lists)
    from the shared quantizer, for an IVF shard in a group; `nprobe` is then its width."""
    ivf = index if isinstance(index, faiss.IndexIVF) else None
    if ivf is None:
        if nprobe is not None:
            set_nprobe(index, nprobe)
        return _search_without(index, queries, k, dead.ids, metric) if len(dead.ids) else index.search(queries, k)
    if coarse is not None:
        ivf.nprobe = nprobe
        if dead.selector is None:
            return ivf.search_preassigned(queries, k, coarse[1], coarse[0])
        return _preassigned(ivf, queries, k, coarse, search_params(dead.selector, nprobe))
    if nprobe is not None:
        ivf.nprobe = int(nprobe)
    if dead.selector is None:
        return ivf.search(queries, k)
    return ivf.search(queries, k, params=search_params(dead.selector, ivf.nprobe))


class ShardGroup:
    """Some shards of a version in memory, searched as one index.

    All shards of a version are copies of one trained index, so they share one coarse
    quantizer: the group keeps one copy of it (checked equal when each shard is loaded) and
    assigns each query block to its lists once, not once per shard. Shards are read one at a
    time from verified local files (`load_shard`), so loading peaks at the group itself.
    """

    def __init__(self, location: Location, manifest: Manifest, positions: list[int], cache_dir: str | None = None):
        self.metric = manifest.metric
        self.refs = [manifest.shards[p] for p in positions]
        self.dead = [Tombstoned(location, ref) for ref in self.refs]
        self.indexes, self.ivfs = [], []
        self.quantizer = None
        for ref in self.refs:
            index = load_shard(location, ref.file, cache_dir)  # the owning proxy, already of its concrete type
            ivf = index if isinstance(index, faiss.IndexIVF) else None  # wrapped indexes search shard by shard
            if ivf is not None:
                self._share_quantizer(location, ref, ivf)
            self.indexes.append(index)
            self.ivfs.append(ivf)

    def _share_quantizer(self, location: Location, ref: ShardRef, ivf) -> None:
        fingerprint = hashlib.sha256(faiss.serialize_index(ivf.quantizer)).hexdigest()
        if self.quantizer is None:
            self.quantizer, self._quantizer_sha = ivf.quantizer, fingerprint
            return
        if fingerprint != self._quantizer_sha:
            raise IntegrityError(f"{where(location, ref.file)}: its coarse quantizer differs from the other shards' "
                                 "(shards of one version are copies of one trained index)")
        old = ivf.quantizer
        ivf.own_fields = False
        ivf.quantizer = self.quantizer  # owned by the group's first shard, which the group keeps
        # Free the duplicate from C++: a throwaway IVF index that owns it deletes it with itself.
        # (Deleting it through its Python proxy, `old.this.own(True)`, corrupts faiss 1.15's SWIG state.)
        owner = faiss.IndexIVFFlat(old, old.d, 1)
        owner.own_fields = True
        del owner, old

    @property
    def ntotal(self) -> int:
        """Vectors stored in the group's shards, tombstoned ones included."""
        return sum(i.ntotal for i in self.indexes)

    @property
    def live(self) -> int:
        """Vectors the group's search can return."""
        return self.ntotal - sum(len(d.ids) for d in self.dead)

    def shard_tags(self, ids: list[np.ndarray]) -> list[np.ndarray]:
        """For `search`'s per-shard id lists: the shard number (`ShardRef.shard`) that returned each id,
        -1 for an empty slot. A shard never returns an id it has tombstoned: the tag names where it is live."""
        return [np.where(i >= 0, ref.shard, -1).astype(np.int64) for ref, i in zip(self.refs, ids)]

    def search(self, queries: np.ndarray, depth: int, nprobe: int | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-shard top-`depth` (scores, ids) lists of live vectors, in shard order, for `merge_topk`."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        coarse = None
        scores, ids = [], []
        for index, ivf, dead in zip(self.indexes, self.ivfs, self.dead):
            k = min(depth, max(index.ntotal, 1))
            if ivf is None:
                s, i = search_shard(index, queries, k, nprobe, dead, self.metric)
            else:
                probes = min(ivf.nlist, nprobe or ivf.nprobe)
                if coarse is None:
                    coarse = self.quantizer.search(queries, probes)
                s, i = search_shard(ivf, queries, k, probes, dead, self.metric, coarse)
            scores.append(s)
            ids.append(i)
        return scores, ids


class IndexSearcher:
    """One index version in one process: its shards and (for the re-score) its vectors.

    `vectors="memory"` loads every float16 vector from the embeddings parts (any version);
    `vectors="shards"` keeps only the shards' sorted ids and reads the shortlist's rows from
    local copies of the shards' vector files (`cache_dir`), for versions that have them.
    """

    def __init__(self, index_uri: str, version: str | None = None, storage_options: dict | None = None,
                 load_vectors: bool = True, vectors: Literal["memory", "shards"] = "memory",
                 cache_dir: str | None = None):
        if vectors not in ("memory", "shards"):
            raise ValueError(f"vectors must be 'memory' or 'shards', got {vectors!r}")
        self.location = Location(index_uri, storage_options)
        self.version = version or read_latest(self.location)
        self.manifest = read_manifest(self.location, self.version)
        self.metric = self.manifest.metric
        self.dim = self.manifest.dim
        self.shards = [load_faiss_verified(self.location, s.file) for s in self.manifest.shards]
        self.dead = [Tombstoned(self.location, s) for s in self.manifest.shards]
        self.ids = self.vectors = self.rescorer = None
        if load_vectors and vectors == "shards":
            self.rescorer = ShardRescorer(self.location, list(self.manifest.shards), cache_dir)
        elif load_vectors:
            self._load_vectors()

    def _load_vectors(self) -> None:
        """Every live vector: each part's rows tombstoned in that part are left out, so a changed
        id keeps only its re-embedded vector."""
        ids, vecs = [], []
        live = PartFilter(self.location, self.manifest)
        for ref in self.manifest.embeddings:
            part_ids, part_vecs = embeddings_from_table(read_verified_parquet(self.location, ref))
            keep = live.mask(ref, part_ids)
            ids.append(part_ids[keep])
            vecs.append(part_vecs[keep])
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        vecs = np.concatenate(vecs) if vecs else np.zeros((0, self.dim), np.float16)
        order = np.argsort(ids, kind="stable")
        self.ids, self.vectors = ids[order], vecs[order]
        repeated = self.ids[1:][self.ids[1:] == self.ids[:-1]]
        if len(repeated):
            raise IntegrityError(f"index {redact(self.location.uri)}, version {self.version}: id {int(repeated[0])} has "
                                 f"{int((self.ids == repeated[0]).sum())} live vectors in the embeddings parts "
                                 "(a changed id must be tombstoned in its older part)")

    @property
    def ntotal(self) -> int:
        """Vectors stored in the shards, tombstoned ones included."""
        return sum(s.ntotal for s in self.shards)

    @property
    def live(self) -> int:
        """Vectors a search can return (`Manifest.live`)."""
        return self.ntotal - sum(len(d.ids) for d in self.dead)

    def search(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, rescore: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query; ids -1 where fewer than k vectors were found.

        `rescore` > 0 takes that many PQ candidates per query and orders them by the exact
        score against the stored float16 vectors.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {queries.shape}")
        depth = max(k, rescore)
        scores, ids = [], []
        for shard, dead in zip(self.shards, self.dead):
            s, i = search_shard(shard, queries, min(depth, max(shard.ntotal, 1)), nprobe, dead, self.metric)
            scores.append(s)
            ids.append(i)
        if not scores:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = merge_topk(scores, ids, depth, self.metric)
        if rescore:
            scores, ids = self._exact_scores(queries, ids)
        return scores[:, :k], ids[:, :k]

    def _exact_scores(self, queries: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.rescorer is not None:
            return exact_order(self.rescorer.exact(queries, ids, self.metric), ids, self.metric)
        if self.vectors is None:
            raise ValueError("exact re-score needs the stored vectors: open with load_vectors=True")
        exact = np.full(ids.shape, np.nan, np.float32)
        if len(self.ids):
            rows = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
            q_idx, pos = np.nonzero((ids >= 0) & (self.ids[rows] == ids))
            for a in range(0, len(q_idx), PAIR_CHUNK):  # bounded memory, whatever the shortlist
                qi, pi = q_idx[a : a + PAIR_CHUNK], pos[a : a + PAIR_CHUNK]
                exact[qi, pi] = pair_scores(queries[qi], self.vectors[rows[qi, pi]], self.metric)
        return exact_order(exact, ids, self.metric)


class Catalog:
    """image_id -> where the image is (key, uri, kind, offset, length), for one index version.

    Reads the whole catalog (a report on a run from before the catalog by id); only live rows: a
    changed id's row in its older part is tombstoned there, a deleted id has none."""

    COLUMNS = ["image_id", "key", "uri", "kind", "offset", "length"]

    def __init__(self, location: Location, manifest: Manifest):
        import pyarrow as pa

        live = PartFilter(location, manifest)
        parts = [live.live_rows(ref, read_verified_parquet(location, ref, columns=self.COLUMNS)) for ref in manifest.catalog]
        table = pa.concat_tables(parts).sort_by("image_id") if parts else None
        self.columns = {c: (table.column(c).to_numpy(zero_copy_only=False) if table is not None else np.zeros(0))
                        for c in self.COLUMNS}

    def lookup(self, ids: np.ndarray) -> list[dict | None]:
        """Catalog rows for ids, in order; None for an id the catalog does not know."""
        known = self.columns["image_id"]
        rows = np.clip(np.searchsorted(known, ids), 0, max(len(known) - 1, 0))
        out = []
        for image_id, row in zip(ids, rows):
            if len(known) and known[row] == image_id:
                out.append({c: self.columns[c][row] for c in self.COLUMNS})
            else:
                out.append(None)
        return out

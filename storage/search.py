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
from mllm_index.storage.uris import Location
from mllm_index.storage.versions import read_latest, read_manifest

ID_BYTES = 8  # per image: the sorted ids a re-scoring actor keeps to find a candidate's row


def has_shard_vectors(manifest: Manifest) -> bool:
    """Whether every shard carries its ids and vectors files (versions built since they exist)."""
    return all(s.ids is not None and s.vectors is not None for s in manifest.shards)


def shard_bytes(shard: ShardRef, index: bool = True, ids: bool = False, shared: int = 0) -> int:
    """Memory a shard takes in an actor: its FAISS file (codes, ids, lists) and/or its sorted ids.
    `shared`: bytes of the file it shares with the other shards of its group (the trained index:
    coarse quantizer and codebooks), counted once per group. A format-1 shard without a recorded
    size counts 0 (grouping by count still bounds it)."""
    return max(0, (shard.file.bytes or 0) - shared) * index + ID_BYTES * shard.ntotal * ids


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
    valid = (ids >= 0) & ~np.isnan(exact)
    worst = -np.inf if metric == "ip" else np.inf
    exact = np.where(valid, exact, worst).astype(np.float32)
    order = np.argsort(-exact if metric == "ip" else exact, axis=1, kind="stable")
    return np.take_along_axis(exact, order, 1), np.take_along_axis(np.where(valid, ids, -1), order, 1)


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
        return sum(i.ntotal for i in self.indexes)

    def search(self, queries: np.ndarray, depth: int, nprobe: int | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-shard top-`depth` (scores, ids) lists, in shard order, for `merge_topk`."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        coarse = None
        scores, ids = [], []
        for index, ivf in zip(self.indexes, self.ivfs):
            k = min(depth, max(index.ntotal, 1))
            if ivf is None:
                if nprobe is not None:
                    set_nprobe(index, nprobe)
                s, i = index.search(queries, k)
            else:
                probes = min(ivf.nlist, nprobe or ivf.nprobe)
                if coarse is None:
                    coarse = self.quantizer.search(queries, probes)
                ivf.nprobe = probes
                s, i = ivf.search_preassigned(queries, k, coarse[1], coarse[0])
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
        self.ids = self.vectors = self.rescorer = None
        if load_vectors and vectors == "shards":
            self.rescorer = ShardRescorer(self.location, list(self.manifest.shards), cache_dir)
        elif load_vectors:
            self._load_vectors()

    def _load_vectors(self) -> None:
        ids, vecs = [], []
        for ref in self.manifest.embeddings:
            part_ids, part_vecs = embeddings_from_table(read_verified_parquet(self.location, ref))
            ids.append(part_ids)
            vecs.append(part_vecs)
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        vecs = np.concatenate(vecs) if vecs else np.zeros((0, self.dim), np.float16)
        order = np.argsort(ids)
        self.ids, self.vectors = ids[order], vecs[order]

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

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
        for shard in self.shards:
            if nprobe is not None:
                set_nprobe(shard, nprobe)
            s, i = shard.search(queries, min(depth, max(shard.ntotal, 1)))
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
    """image_id -> where the image is (key, uri, kind, offset, length), for one index version."""

    COLUMNS = ["image_id", "key", "uri", "kind", "offset", "length"]

    def __init__(self, location: Location, manifest: Manifest):
        import pyarrow as pa

        parts = [read_verified_parquet(location, ref, columns=self.COLUMNS) for ref in manifest.catalog]
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

"""Search stages: Ray Data callable classes holding an index version's shards.

`SearchShardGroup` holds one group of shards (pipelines.search_stages chains one actor pool
per group); `SearchIndex` holds the whole version, for versions whose shards have no vector
files of their own and a search that re-scores.

A query block passes every group. Between stages the rows carry their running shortlist
(`_pq_ids` / `_pq_scores`, the PQ top-`depth` merged over the groups so far, and `_pq_shards`, the
shard number that returned each id, -1 where none) and, once the shortlist is complete, `_exact`
(exact scores, NaN until a group holding the candidate fills them in). The last stage orders them
and writes `knn_ids` / `knn_scores`, exactly what one process searching every shard returns
(IndexSearcher), and `knn_shards`: where each returned id is live, so that its catalog row is read
from that shard's catalog file (storage/shard_catalog.py). `SearchIndex` (the legacy path) writes
no `knn_shards`.

Each stage filters its own shards' tombstones (storage.tombstones): its PQ search never returns a
tombstoned id, and its re-score never scores a candidate from a shard where the id is tombstoned,
so a changed id (old shard, tombstoned; delta shard, live) gets its live vector's score in
whichever order the stages run.
"""

from __future__ import annotations

import numpy as np

from mllm_index.storage.retry import RetryMeter
from mllm_index.storage.search import IndexSearcher, ShardGroup, exact_order_tagged
from mllm_index.storage.faiss_store import merge_topk_tagged
from mllm_index.storage.shard_vectors import ShardRescorer
from mllm_index.storage.uris import Location
from mllm_index.storage.versions import read_manifest

RUNNING = ("_pq_ids", "_pq_scores", "_pq_shards", "_exact")


def _writable(batch: dict, name: str) -> np.ndarray:
    return np.array(batch[name], copy=True)  # Ray Data hands batches out read-only


def _finish(batch: dict, ids: np.ndarray, scores: np.ndarray, top_k: int, shards: np.ndarray | None = None) -> dict:
    out_ids = np.full((len(ids), top_k), -1, np.int64)
    out_scores = np.full((len(ids), top_k), np.nan, np.float32)
    width = min(top_k, ids.shape[1])
    out_ids[:, :width] = ids[:, :width]
    out_scores[:, :width] = np.where(ids[:, :width] >= 0, scores[:, :width], np.nan)
    for name in (*RUNNING, "embedding"):
        batch.pop(name, None)
    batch["knn_ids"], batch["knn_scores"] = out_ids, out_scores
    if shards is not None:
        out_shards = np.full((len(ids), top_k), -1, np.int64)
        out_shards[:, :width] = np.where(ids[:, :width] >= 0, shards[:, :width], -1)
        batch["knn_shards"] = out_shards
    return batch


class SearchShardGroup:
    """One shard group's stage: PQ-search its shards and merge into the running shortlist, and/or
    exactly re-score the shortlist's candidates it holds; the `final` stage writes the top-k.

    `shards`: positions (in the manifest) searched with PQ; `rescore_shards`: positions whose
    candidates this stage re-scores from the shards' vector files (read row by row from local
    copies under `cache_dir`). Either may be empty.
    """

    def __init__(self, index_uri: str, version: str, storage_options: dict, shards: list[int], rescore_shards: list[int],
                 top_k: int, depth: int, nprobe: int | None, rescore: bool, final: bool, cache_dir: str | None = None):
        self.retries = RetryMeter()  # reading shards, ids and vectors; reported with the batches
        location = Location(index_uri, storage_options)
        manifest = read_manifest(location, version)
        self.metric = manifest.metric
        self.group = ShardGroup(location, manifest, shards, cache_dir) if shards else None
        self.rescorer = (ShardRescorer(location, [manifest.shards[p] for p in rescore_shards], cache_dir)
                         if rescore_shards else None)
        self.top_k, self.depth, self.nprobe, self.rescore, self.final = top_k, depth, nprobe, rescore, final

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"]).astype(bool)
        n = len(ok)
        worst = -np.inf if self.metric == "ip" else np.inf
        ids = _writable(batch, "_pq_ids") if "_pq_ids" in batch else np.full((n, self.depth), -1, np.int64)
        scores = _writable(batch, "_pq_scores") if "_pq_scores" in batch else np.full((n, self.depth), worst, np.float32)
        # A shortlist handed in without shards (not from a PQ stage) has none to report.
        shards = _writable(batch, "_pq_shards") if "_pq_shards" in batch else np.full(ids.shape, -1, np.int64)
        queries = np.asarray(batch["embedding"], dtype=np.float32)[ok] if ok.any() else None
        if self.group is not None and queries is not None:
            s, i = self.group.search(queries, self.depth, self.nprobe)
            s, i, t = merge_topk_tagged([scores[ok], *s], [ids[ok], *i], [shards[ok], *self.group.shard_tags(i)],
                                        self.depth, self.metric)
            scores[ok], ids[ok], shards[ok] = s, i, t
        batch["_pq_ids"], batch["_pq_scores"], batch["_pq_shards"] = ids, scores, shards
        if self.rescore:
            exact = _writable(batch, "_exact") if "_exact" in batch else np.full((n, self.depth), np.nan, np.float32)
            if self.rescorer is not None and queries is not None:
                found = self.rescorer.exact(queries, ids[ok], self.metric)
                exact[ok] = np.where(np.isnan(found), exact[ok], found)
            batch["_exact"] = exact
        if "retries" in batch:
            batch["retries"] = self.retries.add_to(batch["retries"])
        if not self.final:
            return batch
        if self.rescore:
            scores, ids, shards = exact_order_tagged(exact, ids, shards, self.metric)
        return _finish(batch, ids, scores, self.top_k, shards)


class SearchIndex:
    """Embedded query rows in, the same rows with `knn_ids` / `knn_scores` (B, top_k) out.

    Holds every shard and every float16 vector of the version: only for versions whose shards
    have no vector files of their own (built before them) when the search re-scores.
    Queries that failed to decode get ids -1. Fewer than top_k vectors in the index also
    leave -1 at the end of a row.
    """

    def __init__(self, index_uri: str, version: str, storage_options: dict, top_k: int, nprobe: int, rescore: int):
        self.retries = RetryMeter()
        self.searcher = IndexSearcher(index_uri, version, storage_options, load_vectors=rescore > 0)
        self.top_k, self.nprobe, self.rescore = top_k, nprobe, rescore

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embedding = np.asarray(batch["embedding"], dtype=np.float32)
        ok = np.asarray(batch["ok"]).astype(bool)
        ids = np.full((len(ok), self.top_k), -1, np.int64)
        scores = np.full((len(ok), self.top_k), -np.inf, np.float32)
        if ok.any():
            s, i = self.searcher.search(embedding[ok], k=self.top_k, nprobe=self.nprobe, rescore=self.rescore)
            ids[ok, : i.shape[1]] = i
            scores[ok, : s.shape[1]] = s
        if "retries" in batch:
            batch["retries"] = self.retries.add_to(batch["retries"])
        return _finish(batch, ids, scores, self.top_k)

"""Search stage: a Ray Data callable class holding one index version's shards in memory."""

from __future__ import annotations

import numpy as np

from mllm_index.storage.search import IndexSearcher


class SearchIndex:
    """Embedded query rows in, the same rows with `knn_ids` / `knn_scores` (B, top_k) out.

    Queries that failed to decode get ids -1. Fewer than top_k vectors in the index also
    leave -1 at the end of a row.
    """

    def __init__(self, index_uri: str, version: str, storage_options: dict, top_k: int, nprobe: int, rescore: int):
        self.searcher = IndexSearcher(index_uri, version, storage_options, load_vectors=rescore > 0)
        self.top_k, self.nprobe, self.rescore = top_k, nprobe, rescore

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embedding = batch.pop("embedding").astype(np.float32)
        ok = batch["ok"].astype(bool)
        ids = np.full((len(ok), self.top_k), -1, np.int64)
        scores = np.full((len(ok), self.top_k), np.nan, np.float32)
        if ok.any():
            s, i = self.searcher.search(embedding[ok], k=self.top_k, nprobe=self.nprobe, rescore=self.rescore)
            ids[ok, : i.shape[1]] = i
            scores[ok, : s.shape[1]] = np.where(i >= 0, s, np.nan)
        batch["knn_ids"], batch["knn_scores"] = ids, scores
        return batch

"""Re-rank stage: fetch candidates through the catalog, score (query, candidate) pairs, order.

One row per query goes in and comes out, with fixed-width (top_k) arrays in final rank
order, so the job's part accounting stays in queries; the driver writes one results row
per (query, rank). Candidates shared by several queries of one call are fetched with one
ranged read and decoded once. A candidate that cannot be read or decoded keeps its kNN
position (its rank does not move) and is reported in `candidate_failures`.
"""

from __future__ import annotations

import json

import numpy as np

from mllm_index.actors.decode import DecodeFailure, open_image
from mllm_index.actors.mllm import cap_pixels
from mllm_index.actors.registry import reranker_kind
from mllm_index.storage.search import Catalog
from mllm_index.storage.sources import fetch_bytes
from mllm_index.storage.uris import Location, redact_text
from mllm_index.storage.versions import read_manifest


def final_order(knn_scores: np.ndarray, rerank: np.ndarray, depth: int, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(order of kNN positions, final scores): the first `depth` by final score, the rest in kNN order.

    Positions inside the depth whose rerank score is NaN (unreadable) stay where they were.
    """
    n = len(knn_scores)
    final = np.full(n, np.nan, np.float32)
    final[:depth] = (1 - weight) * rerank[:depth] + weight * knn_scores[:depth] if weight else rerank[:depth]
    order = np.arange(n)
    scored = [i for i in range(min(depth, n)) if np.isfinite(final[i])]
    slots = sorted(scored)
    ranked = sorted(scored, key=lambda i: (-final[i], i))
    order[slots] = ranked
    return order, final


class RerankCandidates:
    """Ray Data callable class: searched query rows in, re-ranked rows out (same count)."""

    def __init__(self, index_uri: str, version: str, storage_options: dict, reranker: dict, decode: dict, image_column: str):
        index = Location(index_uri, storage_options)
        self.catalog = Catalog(index, read_manifest(index, version))
        self.storage_options, self.image_column, self.decode = storage_options, image_column, decode
        self.depth, self.weight, self.symmetric = reranker["depth"], reranker["fusion_weight"], reranker["symmetric"]
        self.draft, self.max_pixels = int(2 * reranker["max_pixels"] ** 0.5), reranker["max_pixels"]
        self.scorer = reranker_kind(reranker["model"]).make(reranker) if reranker.get("model") else None

    def _image(self, data, bbox=None):
        if isinstance(data, BaseException):
            raise DecodeFailure(type(data).__name__, redact_text(str(data)))
        # JPEG draft decoding down to ~2x what the scorer keeps (it caps pixels per image anyway).
        image, _, _ = open_image(data, self.decode["max_pixels"], self.decode["max_bytes"], draft_long_side=self.draft, bbox=bbox)
        return cap_pixels(image, self.max_pixels)  # once per image, not once per pair it appears in

    def _candidates(self, ids: np.ndarray) -> tuple[dict, dict]:
        """Decoded images of the unique ids, and id -> failure for the ones that could not be had."""
        unique = [int(i) for i in np.unique(ids[ids >= 0])]
        rows = self.catalog.lookup(np.array(unique, np.int64))
        images, failures = {}, {}
        known = [(i, r) for i, r in zip(unique, rows) if r is not None]
        for i, r in zip(unique, rows):
            if r is None:
                failures[i] = ({"uri": None, "key": None}, "not_in_catalog", "id missing from the index catalog")
        payloads = fetch_bytes([r for _, r in known], self.storage_options, self.image_column)
        for (i, r), data in zip(known, payloads):
            try:
                images[i] = self._image(data)
            except DecodeFailure as exc:
                failures[i] = (r, exc.error_type, str(exc))
        return images, failures

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, k = batch["knn_ids"].shape
        rerank = np.full((n, k), np.nan, np.float32)
        order = np.tile(np.arange(k), (n, 1))
        final = np.full((n, k), np.nan, np.float32)
        notes = [[] for _ in range(n)]
        depth = min(self.depth, k)
        pairs_scored = np.zeros(n, np.int32)
        if self.scorer is not None:
            images, failed = self._candidates(batch["knn_ids"][:, :depth])
            queries = fetch_bytes([{c: batch[c][i] for c in ("uri", "kind", "offset", "length")} for i in range(n)],
                                  self.storage_options, self.image_column)
            pairs, where = [], []
            for q in range(n):
                if not batch["ok"][q]:
                    continue
                try:
                    query_image = self._image(queries[q], batch["bbox"][q] if "bbox" in batch else None)
                except DecodeFailure as exc:
                    notes[q].append({"image_id": None, "stage": "query", "error_type": exc.error_type, "message": str(exc)[:500]})
                    continue
                for pos, cid in enumerate(batch["knn_ids"][q, :depth]):
                    if cid < 0:
                        continue
                    if int(cid) in failed:
                        row, error_type, message = failed[int(cid)]
                        notes[q].append({"image_id": int(cid), "uri": row["uri"], "key": row["key"], "stage": "candidate",
                                         "error_type": error_type, "message": message[:500]})
                        continue
                    pairs.append((query_image, images[int(cid)]))
                    where.append((q, pos))
            scores = self.scorer.score(pairs)
            if self.symmetric and pairs:
                scores = (scores + self.scorer.score([(c, q) for q, c in pairs])) / 2
            for (q, pos), s in zip(where, scores):
                rerank[q, pos] = s
                pairs_scored[q] += 1
        for q in range(n):
            order[q], final[q] = final_order(batch["knn_scores"][q], rerank[q], depth if self.scorer else 0, self.weight)
        take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
        batch.update(result_ids=take(batch["knn_ids"]), knn_rank=(order + 1).astype(np.int32),
                     result_knn_scores=take(batch["knn_scores"]), rerank_score=take(rerank), final_score=take(final),
                     pairs_scored=pairs_scored, candidate_failures=np.array([json.dumps(x) for x in notes], dtype=object))
        return batch

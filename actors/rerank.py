"""Re-rank stage: score (query, candidate) pairs and order the candidates. Scoring only.

One row per query goes in and comes out, with fixed-width (top_k) arrays in final rank
order, so the job's part accounting stays in queries. The images arrive decoded: the query's
from the decode stage that also fed the embedder (`query_image`), the candidates' from the
fetch tasks ahead of this stage (`candidates`, actors/fetch.py), so a GPU scorer never waits on
storage. A candidate that could not be had keeps its kNN position (its rank does not move).
"""

from __future__ import annotations

import inspect

import numpy as np

from mllm_index.actors.registry import reranker_kind

IMAGE_COLUMNS = ("query_image", "candidates")  # dropped here: nothing after the scorer needs pixels


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


SCORING_COLUMNS = ("scored_prompts", "images_encoded", "visual_tokens", "prompt_tokens", "computed_tokens", "cached_tokens")


def scoring_columns(n: int, path: str = "", **counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per query row: which scorer path ran (`backend/path`) and its raw cost counters (zeros by default)."""
    out = {c: np.asarray(counts.get(c, np.zeros(n)), np.int64) for c in SCORING_COLUMNS}
    out["scorer_path"] = np.array([path] * n, dtype=object)
    return out


def ranked(batch: dict[str, np.ndarray], rerank: np.ndarray, depth: int, weight: float,
           pairs_scored: np.ndarray) -> dict[str, np.ndarray]:
    """Query rows with their rerank scores (kNN positions) -> the same rows in final rank order, images dropped."""
    n, k = batch["knn_ids"].shape
    order = np.tile(np.arange(k), (n, 1))
    final = np.full((n, k), np.nan, np.float32)
    for q in range(n):
        order[q], final[q] = final_order(batch["knn_scores"][q], rerank[q], depth, weight)
    take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
    out = {c: v for c, v in batch.items() if c not in IMAGE_COLUMNS}
    out.update(result_ids=take(batch["knn_ids"]), knn_rank=(order + 1).astype(np.int32),
               result_knn_scores=take(batch["knn_scores"]), rerank_score=take(rerank), final_score=take(final),
               pairs_scored=pairs_scored.astype(np.int32))
    return out


class ScoreCandidates:
    """Ray Data callable class: query rows with their decoded query image and candidates in; rerank
    scores, final order and final scores out (same rows, image columns dropped).

    The scorer's cost counters (`ScoreStats`) are per call: each query row carries the prompts it
    was scored with, and the call's token and image counters ride on its first scored row (a
    candidate shared by two queries of a call is encoded once, so no per-query split is exact)."""

    def __init__(self, reranker: dict):
        self.depth, self.weight, self.symmetric = reranker["depth"], reranker["fusion_weight"], reranker["symmetric"]
        self.scorer = reranker_kind(reranker["model"]).make(reranker) if reranker.get("model") else None
        # Image keys let an MLLM scorer encode a candidate shared by several queries of the batch once
        # (after Ray Data serialisation the rows hold separate copies, so object identity cannot tell).
        self.keyed = self.scorer is not None and "keys" in inspect.signature(self.scorer.score).parameters
        stats = getattr(self.scorer, "stats", None)
        self.path = "" if self.scorer is None else (
            f"{stats.backend}/{stats.path}" if stats is not None else f"{reranker['model']}/pairs")

    def _counters(self) -> dict[str, int]:
        stats = getattr(self.scorer, "stats", None)
        if stats is None:
            return {}
        return {"images_encoded": stats.images, "visual_tokens": stats.visual_tokens, "prompt_tokens": stats.prompt_tokens,
                "computed_tokens": stats.computed_tokens, "cached_tokens": stats.cached_tokens}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, k = batch["knn_ids"].shape
        rerank = np.full((n, k), np.nan, np.float32)
        depth = min(self.depth, k) if self.scorer is not None else 0
        pairs_scored = np.zeros(n, np.int32)
        before = self._counters()
        if depth:
            pairs, where, keys = [], [], []
            for q in range(n):
                query_image = batch["query_image"][q] if batch["ok"][q] else None
                if query_image is None:
                    continue
                for pos, image in enumerate(batch["candidates"][q][:depth]):
                    if image is not None:
                        pairs.append((query_image, image))
                        where.append((q, pos))
                        keys.append((("query", q), ("image", int(batch["knn_ids"][q, pos]))))
            score = (lambda p, kk: self.scorer.score(p, keys=kk)) if self.keyed else (lambda p, kk: self.scorer.score(p))
            scores = score(pairs, keys)
            if self.symmetric and pairs:
                scores = (scores + score([(c, q) for q, c in pairs], [(c, q) for q, c in keys])) / 2
            for (q, pos), s in zip(where, scores):
                rerank[q, pos] = s
                pairs_scored[q] += 1
        out = ranked(batch, rerank, depth, self.weight, pairs_scored)
        counts = {"scored_prompts": pairs_scored * (2 if self.symmetric else 1)}
        first = np.flatnonzero(pairs_scored)
        for name, value in self._counters().items():
            counts[name] = np.zeros(n, np.int64)
            if len(first):
                counts[name][first[0]] = value - before[name]
        out.update(scoring_columns(n, self.path if pairs_scored.any() else "", **counts))
        return out

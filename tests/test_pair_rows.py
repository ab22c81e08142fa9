"""Query rows -> pair rows -> (any order, any batching) -> query rows: the plumbing around the ray.data.llm stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mllm_index.actors.pair_rows import RAY_DATA_LLM_PATH, RegroupPairs, explode_pairs
from mllm_index.actors.rerank import ranked

K, DEPTH = 5, 3


def query_rows() -> dict[str, np.ndarray]:
    """Four queries as the candidate fetch hands them on: one unreadable, one whose candidates all failed,
    one with a missing candidate, one whole. Query 3's candidates are query 0's (shared gallery images)."""
    rng = np.random.default_rng(0)
    pic = lambda v: Image.fromarray(np.full((8 + v, 10, 3), v, np.uint8))  # noqa: E731
    candidates = np.empty(4, dtype=object)
    candidates[:] = [[pic(1), None, pic(3)], [None, None, None], [pic(4), pic(5), pic(6)], [pic(1), None, pic(3)]]
    ids = np.array([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34], [10, 11, 12, 15, 16]], np.int64)
    return {"part": np.array([0, 0, 1, 1], np.int64), "image_id": np.array([100, 101, 102, 103], np.int64),
            "key": np.array(["a", "b", "c", "d"], dtype=object), "ok": np.array([True, False, True, True]),
            "knn_ids": ids, "knn_scores": np.sort(rng.random((4, K)).astype(np.float32))[:, ::-1].copy(),
            "result_keys": np.array([json.dumps(list(map(str, r))) for r in ids], dtype=object),
            "retries": np.array([0, 1, 2, 3], np.int64),
            "query_image": np.array([pic(7), None, pic(8), pic(9)], dtype=object), "candidates": candidates}


def fake_score(query: np.ndarray, candidate: np.ndarray) -> float:
    """A deterministic stand-in for P(yes) that depends on both images and on their order."""
    return float((query.mean() * 3 + candidate.mean() * 7 + candidate.shape[0]) % 10) / 10


def engine(pairs: dict[str, np.ndarray], seed: int) -> list[dict[str, np.ndarray]]:
    """What the vLLM stage does to the order: rows shuffled, cut into batches of random sizes, scored."""
    n = len(pairs["pair_pos"])
    order = np.random.default_rng(seed).permutation(n)
    scored = {c: v[order] for c, v in pairs.items() if c not in ("query_image", "candidate_image", "query_uuid",
                                                                    "candidate_uuid")}
    scored["rerank_score"] = np.array([fake_score(pairs["query_image"][i], pairs["candidate_image"][i]) for i in order])
    scored["prompt_tokens"] = np.full(n, 50, np.int64)
    scored["visual_tokens"] = np.full(n, 16, np.int64)
    cuts = np.sort(np.random.default_rng(seed + 1).choice(np.arange(1, n), size=3, replace=False))
    return [{c: v[a:b] for c, v in scored.items()} for a, b in zip([0, *cuts], [*cuts, n])]


def expected(rows: dict[str, np.ndarray], symmetric: bool) -> dict[str, np.ndarray]:
    n = len(rows["ok"])
    rerank = np.full((n, K), np.nan, np.float32)
    for q in range(n):
        if not rows["ok"][q]:
            continue
        query = np.asarray(rows["query_image"][q])
        for pos, image in enumerate(rows["candidates"][q]):
            if image is not None:
                s = fake_score(query, np.asarray(image))
                rerank[q, pos] = (s + fake_score(np.asarray(image), query)) / 2 if symmetric else s
    return ranked(rows, rerank, DEPTH, 0.0, (~np.isnan(rerank)).sum(1))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regrouped_rows_equal_scoring_per_query(symmetric, seed):
    rows = query_rows()
    pairs = explode_pairs(dict(rows), depth=DEPTH, symmetric=symmetric)
    per_prompt = 2 if symmetric else 1
    # Adjacent per query, query image first; a query with nothing to score sends one stand-in row.
    assert pairs["image_id"].tolist() == [100] * 2 * per_prompt + [101] + [102] * 3 * per_prompt + [103] * 2 * per_prompt
    assert pairs["pair_rows"].tolist() == [2 * per_prompt] * 2 * per_prompt + [1] + [3 * per_prompt] * 3 * per_prompt \
        + [2 * per_prompt] * 2 * per_prompt
    first = np.flatnonzero(~pairs["pair_swap"] & (pairs["pair_pos"] >= 0))
    assert all(pairs["query_uuid"][i].startswith("q:") and pairs["candidate_uuid"][i].startswith("g:") for i in first)
    assert pairs["candidate_uuid"][0] == pairs["candidate_uuid"][len(pairs["pair_pos"]) - per_prompt * 2] == "g:10"

    regroup = RegroupPairs(DEPTH, 0.0)
    out = [b for batch in engine(pairs, seed) for b in regroup(batch)]
    assert not regroup.pending  # every query left as soon as its last row arrived
    got = {int(q): (b, i) for b in out for i, q in enumerate(b["image_id"])}
    assert sorted(got) == [100, 101, 102, 103]
    want = expected(rows, symmetric)
    for q, query_id in enumerate(rows["image_id"]):
        b, i = got[int(query_id)]
        for column in ("result_ids", "knn_rank", "pairs_scored", "part", "retries", "key", "ok", "result_keys"):
            np.testing.assert_array_equal(b[column][i], want[column][q])
        np.testing.assert_allclose(b["rerank_score"][i], want["rerank_score"][q], atol=1e-6)
        np.testing.assert_allclose(b["final_score"][i], want["final_score"][q], atol=1e-6)
        prompts = int(want["pairs_scored"][q]) * per_prompt
        assert b["scored_prompts"][i] == prompts and b["prompt_tokens"][i] == 50 * prompts
        assert b["visual_tokens"][i] == 16 * prompts and b["images_encoded"][i] == 2 * prompts
        assert b["scorer_path"][i] == (RAY_DATA_LLM_PATH if prompts else "")
        assert "query_image" not in b and "pair_pos" not in b and "candidates" not in b


def test_a_query_waits_for_its_last_row():
    pairs = explode_pairs(query_rows(), depth=DEPTH, symmetric=False)
    *batches, last = engine(pairs, 0)
    held_back = {c: v[-1:] for c, v in last.items()}
    regroup = RegroupPairs(DEPTH, 0.0)
    out = [b for batch in [*batches, {c: v[:-1] for c, v in last.items()}] for b in regroup(batch)]
    missing = (int(held_back["part"][0]), int(held_back["image_id"][0]))
    assert missing[1] not in {int(q) for b in out for q in b["image_id"]} and list(regroup.pending) == [missing]
    assert len({int(q) for b in out for q in b["image_id"]}) == 3
    assert [int(q) for b in regroup(held_back) for q in b["image_id"]] == [missing[1]] and not regroup.pending

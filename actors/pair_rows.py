"""Query rows <-> pair rows, around the vLLM stage of `ray.data.llm` (one request per row).

`explode_pairs` (Ray tasks) turns each query row, after the candidate fetch, into one row per
(query, candidate) pair of the re-ranked depth, in kNN order and adjacent per query, query image
first, so the engine's prefix cache serves the query's blocks to its k candidates. Each pair row
carries its query's other columns (kNN ids and scores, catalog keys, failure notes: a few KB
next to two images) and how many rows its query has. A query with nothing to score (unreadable,
or every candidate missing) still sends one row, with two tiny blank images, so that it reaches
the writer through the same stream; its score is discarded.

`RegroupPairs` (one actor) collects the scored rows back into query rows and hands them to the
same ranking (`rerank.ranked`) and writer as the transformers backend. Why one actor, keyed by
query, and not "adjacent rows belong together": Ray Data does not keep row order across the
engine stage. It re-batches rows to the engine's batch size (a query's pairs can land in two
batches, on two replicas), the engine yields each batch's rows as they complete, and blocks
leave an operator in completion order. A count per query is correct under any such reordering,
as long as every row of a query reaches the same actor: hence one actor (the work per row is a
dict update). A groupby would also be correct, but it is an all-to-all barrier: nothing would be
written until every pair of the run was scored, so an interrupted run would lose all its scores
and the whole run's pair rows would sit in the object store. Here a query leaves as soon as its
last pair is scored, and the actor holds only queries with a pair still in flight (bounded by
Ray Data's backpressure). Should the actor die, its pending queries are not written; the part
then stays unfinished and the driver asks for a re-run, which scores only those queries.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from mllm_index.actors.rerank import IMAGE_COLUMNS, ranked, scoring_columns

PAIR_COLUMNS = ("pair_pos", "pair_swap", "pair_rows", "query_image", "candidate_image", "query_uuid", "candidate_uuid")
SCORED_COLUMNS = ("rerank_score", "prompt_tokens", "visual_tokens")  # added by the vLLM stage's postprocess
BLANK = np.zeros((56, 56, 3), np.uint8)  # stands in for both images of a query with nothing to score
RAY_DATA_LLM_PATH = "vllm/ray_data_llm"


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image, np.uint8)


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)  # element-wise: a list of same-shape arrays must not become 4-D
    for i, v in enumerate(values):
        out[i] = v
    return out


def explode_pairs(batch: dict[str, np.ndarray], *, depth: int, symmetric: bool) -> dict[str, np.ndarray]:
    """Ray Data task: query rows (with `query_image` and `candidates`) in, one row per prompt out.

    `pair_pos` is the candidate's kNN position (-1: the stand-in row of a query with nothing to
    score), `pair_swap` marks the candidate-first prompt of the symmetric option, and `pair_rows`
    is how many rows the query sent. `query_uuid` / `candidate_uuid` name image content for the
    whole run ("q:<query id>", "g:<gallery id>"), so vLLM need not hash the same pixels again."""
    n, k = batch["knn_ids"].shape
    depth = min(depth, k)
    src, pos, swap, rows, first, second, first_id, second_id = [], [], [], [], [], [], [], []
    for q in range(n):
        start = len(src)
        query = batch["query_image"][q] if batch["ok"][q] else None
        if query is not None:
            query_pixels, query_id = _pixels(query), f"q:{int(batch['image_id'][q])}"
            for p, image in enumerate(batch["candidates"][q][:depth]):
                if image is None:
                    continue
                pixels, image_id = _pixels(image), f"g:{int(batch['knn_ids'][q, p])}"
                for swapped in ((False, True) if symmetric else (False,)):
                    src.append(q)
                    pos.append(p)
                    swap.append(swapped)
                    a, b = ((pixels, image_id), (query_pixels, query_id)) if swapped else \
                        ((query_pixels, query_id), (pixels, image_id))
                    first.append(a[0])
                    first_id.append(a[1])
                    second.append(b[0])
                    second_id.append(b[1])
        if len(src) == start:
            src.append(q)
            pos.append(-1)
            swap.append(False)
            first.append(BLANK)
            second.append(BLANK)
            first_id.append("blank")
            second_id.append("blank")
        rows += [len(src) - start] * (len(src) - start)
    idx = np.array(src, np.int64)
    out = {c: v[idx] for c, v in batch.items() if c not in IMAGE_COLUMNS}
    out.update(pair_pos=np.array(pos, np.int32), pair_swap=np.array(swap, bool), pair_rows=np.array(rows, np.int32),
               query_image=_objects(first), candidate_image=_objects(second),
               query_uuid=np.array(first_id, dtype=object), candidate_uuid=np.array(second_id, dtype=object))
    return out


def _column(values: list) -> np.ndarray:
    if isinstance(values[0], np.ndarray):
        return np.stack(values)
    if all(isinstance(v, (np.generic, bool, int, float)) for v in values):
        return np.array(values)
    return _objects(values)


class RegroupPairs:
    """Ray Data callable class (run as ONE actor): scored pair rows in, a query row out as soon as
    all of its pair rows have arrived, ranked like the transformers backend's rows."""

    def __init__(self, depth: int, weight: float):
        self.depth, self.weight = depth, weight
        self.pending: dict[tuple[int, int], dict] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        query_columns = [c for c in batch if c not in PAIR_COLUMNS and c not in SCORED_COLUMNS]
        complete = []
        for i in range(len(batch["pair_pos"])):
            key = (int(batch["part"][i]), int(batch["image_id"][i]))
            entry = self.pending.get(key)
            if entry is None:
                entry = self.pending[key] = {"row": {c: batch[c][i] for c in query_columns},
                                             "rows": int(batch["pair_rows"][i]), "scored": []}
            entry["scored"].append((int(batch["pair_pos"][i]), float(batch["rerank_score"][i]),
                                    int(batch["prompt_tokens"][i]), int(batch["visual_tokens"][i])))
            if len(entry["scored"]) == entry["rows"]:
                complete.append(self.pending.pop(key))
        if complete:
            yield self._rank(complete, query_columns)

    def _rank(self, entries: list[dict], columns: list[str]) -> dict[str, np.ndarray]:
        batch = {c: _column([e["row"][c] for e in entries]) for c in columns}
        n, k = batch["knn_ids"].shape
        sums, counts = np.zeros((n, k), np.float64), np.zeros((n, k), np.int32)
        prompts, prompt_tokens, visual_tokens = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
        for q, entry in enumerate(entries):
            for pos, score, tokens, visual in entry["scored"]:
                if pos < 0:  # the stand-in row of a query with nothing to score
                    continue
                sums[q, pos] += score  # the symmetric option's two prompts are averaged
                counts[q, pos] += 1
                prompts[q] += 1
                prompt_tokens[q] += tokens
                visual_tokens[q] += visual
        with np.errstate(invalid="ignore"):
            rerank = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)
        out = ranked(batch, rerank, min(self.depth, k), self.weight, (counts > 0).sum(1))
        paths = scoring_columns(n, RAY_DATA_LLM_PATH, scored_prompts=prompts, images_encoded=2 * prompts,
                                visual_tokens=visual_tokens, prompt_tokens=prompt_tokens)
        paths["scorer_path"] = np.array([RAY_DATA_LLM_PATH if p else "" for p in prompts], dtype=object)
        out.update(paths)
        return out

"""The rerank job's writer stage: Ray tasks write result chunks, and the part files once a part is whole.

Rows of one part reach the writer in several batches, on several workers. Each batch's rows
of a part are written as a chunk named by a hash of its query ids (deterministic: a re-run
writes the same name for the same queries), with a small JSON marker listing them. The task
that completes a part (its markers now cover the part's queries) merges the chunks into
`results/part-NNNNN.parquet` and `failures/part-NNNNN.parquet`, then writes the part's stats
marker. The driver sees only small stats rows; a re-run skips finished parts and, inside
unfinished ones, the queries of written chunks.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pyarrow as pa

from mllm_index.storage.catalog import FAILURE_SCHEMA
from mllm_index.storage.contracts import QueryPartStats, write_contract
from mllm_index.storage.shard_store import part_file
from mllm_index.storage.uris import Location

RESULT_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("query_id", pa.int64()), ("query_key", pa.string()), ("rank", pa.int32()),
    ("image_id", pa.int64()), ("key", pa.string()), ("uri", pa.string()), ("knn_rank", pa.int32()),
    ("knn_score", pa.float32()), ("rerank_score", pa.float32()), ("final_score", pa.float32()), ("reranker", pa.string()),
    ("shard", pa.int32()),  # the index shard the candidate is live in (its catalog row is there); -1: not known
])
QUERY_FAILURE_SCHEMA = pa.schema(list(FAILURE_SCHEMA) + [("query_id", pa.int64())])
CHUNKS = "chunks"
# Scoring counters of the query rows (the scorer's, see actors/rerank.py) summed into the part stats:
SCORING_FIELDS = ("images_encoded", "visual_tokens", "prompt_tokens", "computed_tokens", "cached_tokens")


def _rows(cols: dict[str, np.ndarray], q: int, run_id: str, reranker: str) -> tuple[list[dict], list[dict]]:
    """Result and failure rows of one query."""
    query = {"query_id": int(cols["image_id"][q]), "uri": cols["uri"][q], "key": cols["key"][q]}
    if not cols["ok"][q]:
        return [], [{**query, "image_id": query["query_id"], "stage": "query", "error_type": cols["error_type"][q],
                     "message": cols["message"][q]}]
    failures = [{"query_id": query["query_id"], **note} for note in json.loads(cols["candidate_failures"][q])]
    ids, keys, uris = cols["result_ids"][q], json.loads(cols["result_keys"][q]), json.loads(cols["result_uris"][q])
    order = cols["knn_rank"][q] - 1  # result position -> kNN position, where the catalog columns were looked up
    shards = cols["knn_shards"][q] if "knn_shards" in cols else np.full(len(order), -1, np.int64)
    results = []
    for pos in np.flatnonzero(ids >= 0):
        results.append({"run_id": run_id, "query_id": query["query_id"], "query_key": query["key"], "rank": len(results) + 1,
                        "image_id": int(ids[pos]), "key": keys[order[pos]], "uri": uris[order[pos]],
                        "knn_rank": int(cols["knn_rank"][q][pos]), "knn_score": float(cols["result_knn_scores"][q][pos]),
                        "rerank_score": float(cols["rerank_score"][q][pos]), "final_score": float(cols["final_score"][q][pos]),
                        "reranker": reranker, "shard": int(shards[order[pos]])})
    return results, failures


def chunk_name(query_ids: list[int]) -> str:
    """Deterministic for a set of queries, and carrying its size, so a listing alone counts a part's progress."""
    return f"{hashlib.sha1(json.dumps(sorted(query_ids)).encode()).hexdigest()[:16]}-{len(query_ids)}"


def written_count(out: Location, part: int) -> int:
    """Queries of a part already in chunks, from one listing (chunks of one part never share a query:
    a re-run leaves out the queries of written chunks, and a retried task rewrites the same name)."""
    return sum(int(n[: -len(".json")].rsplit("-", 1)[1]) for n in out.list_names(CHUNKS, part_file(part, "d"))
               if n.endswith(".json"))


def written_queries(out: Location, part: int) -> set[int]:
    """Query ids of a part whose rows are already in a chunk (a resumed run skips them)."""
    folder = (CHUNKS, part_file(part, "d"))
    done: set[int] = set()
    for name in out.list_names(*folder):
        if name.endswith(".json"):
            done.update(out.read_json(*folder, name)["query_ids"])
    return done


def scoring_counts(batch: dict[str, np.ndarray], sel: np.ndarray) -> dict:
    """The scorer's raw counters over some query rows (see `rerank.scoring_columns`), as part stats fields."""
    out: dict = {c: int(batch[c][sel].sum()) for c in SCORING_FIELDS if c in batch}
    paths: Counter = Counter()
    if "scorer_path" in batch:
        for path, prompts in zip(batch["scorer_path"][sel], batch["scored_prompts"][sel]):
            if path:
                paths[str(path)] += int(prompts)
    return {**out, "scorer_paths": dict(paths)}


def write_results(batch: dict[str, np.ndarray], *, out: Location, run_id: str, reranker: str,
                  expected: dict[int, int]) -> dict[str, np.ndarray]:
    """Ray Data task: write this batch's chunk of each part it holds; finish the parts it completes."""
    parts = batch["part"].astype(np.int64)
    written = {"part": [], "queries": [], "pairs_scored": [], "finished": []}
    for part in np.unique(parts):
        part = int(part)
        sel = np.flatnonzero(parts == part)
        results, failures = [], []
        for q in sel:
            r, f = _rows(batch, int(q), run_id, reranker)
            results += r
            failures += f
        query_ids = [int(batch["image_id"][q]) for q in sel]
        name, folder = chunk_name(query_ids), (CHUNKS, part_file(part, "d"))
        out.write_parquet(pa.Table.from_pylist(results, schema=RESULT_SCHEMA), *folder, f"{name}.results.parquet")
        out.write_parquet(pa.Table.from_pylist(failures, schema=QUERY_FAILURE_SCHEMA), *folder, f"{name}.failures.parquet")
        stats = {"query_ids": query_ids, "queries_ok": int(batch["ok"][sel].sum()), "results": len(results),
                 "pairs_scored": int(batch["pairs_scored"][sel].sum()),
                 "retries": int(batch["retries"][sel].sum()) if "retries" in batch else 0, **scoring_counts(batch, sel)}
        out.write_json(stats, *folder, f"{name}.json")  # the chunk's marker, last
        complete = written_count(out, part) >= expected[part]
        if complete:
            finish_part(out, part, expected[part])
        for column, value in zip(written, (part, len(sel), stats["pairs_scored"], complete)):
            written[column].append(value)
    return {"part": np.array(written["part"], np.int64), "queries": np.array(written["queries"], np.int64),
            "pairs_scored": np.array(written["pairs_scored"], np.int64), "finished": np.array(written["finished"], bool)}


def _with_shard(chunk: pa.Table) -> pa.Table:
    """A chunk written before results carried `shard` (a run resumed across the upgrade): shard -1."""
    if "shard" in chunk.column_names:
        return chunk
    return chunk.append_column("shard", pa.array(np.full(chunk.num_rows, -1, np.int32))).cast(RESULT_SCHEMA)


def finish_part(out: Location, part: int, rows: int) -> QueryPartStats:
    """Merge a whole part's chunks into its result and failure files, then write its stats marker."""
    folder = (CHUNKS, part_file(part, "d"))
    markers = sorted(n for n in out.list_names(*folder) if n.endswith(".json"))
    chunks = [out.read_json(*folder, n) for n in markers]
    results = [_with_shard(out.read_parquet(*folder, n.replace(".json", ".results.parquet"))) for n in markers]
    failures = [out.read_parquet(*folder, n.replace(".json", ".failures.parquet")) for n in markers]
    results = pa.concat_tables(results, promote_options="none").sort_by([("query_id", "ascending"), ("rank", "ascending")]) \
        if results else RESULT_SCHEMA.empty_table()
    failures = pa.concat_tables(failures) if failures else QUERY_FAILURE_SCHEMA.empty_table()
    out.write_parquet(results, "results", part_file(part))
    out.write_parquet(failures, "failures", part_file(part))
    errors = Counter(failures.column("error_type").to_pylist())
    ok = sum(c["queries_ok"] for c in chunks)
    stats = QueryPartStats(part=part, rows=rows, queries_ok=ok, queries_failed=rows - ok, results=results.num_rows,
                           pairs_scored=sum(c["pairs_scored"] for c in chunks),
                           candidate_failures=sum(1 for s in failures.column("stage").to_pylist() if s == "candidate"),
                           errors=dict(errors), retries=sum(c.get("retries", 0) for c in chunks),
                           scorer_paths=dict(sum((Counter(c.get("scorer_paths", {})) for c in chunks), Counter())),
                           **{f: sum(c.get(f, 0) for c in chunks) for f in SCORING_FIELDS})
    write_contract(out, stats, "stats", part_file(part, "json"))  # the part's done marker
    return stats

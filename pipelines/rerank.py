"""Rerank job: queries -> embed (the index's backbone) -> kNN top-k -> MLLM pair scores -> Parquet.

Output layout under OUTPUT_URI (one folder per run):
    run.json                      settings, index version, run id (a re-run with other settings is refused)
    plan/part-NNNNN.parquet       the query listing, cut into parts of run.part_size queries
    results/part-NNNNN.parquet    one row per (query, rank)
    failures/part-NNNNN.parquet   queries and candidates that could not be read or decoded
    stats/part-NNNNN.json         the part's completion marker: a re-run skips finished parts
    summary.json
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import ray

from mllm_index.actors.rerank import RerankCandidates
from mllm_index.actors.search import SearchIndex
from mllm_index.configs.schema import ConfigError, RerankJobConfig
from mllm_index.pipelines.parts import PartCollector, finished_parts, load_or_make_plan
from mllm_index.pipelines.stages import actor_resources, decode_and_embed, plan_actor_pools
from mllm_index.pipelines.summaries import QueryCounts, RerankSummary, StorageRetries
from mllm_index.storage.catalog import FAILURE_SCHEMA
from mllm_index.storage.contracts import Manifest, QueryPartStats, write_contract
from mllm_index.storage.lock import ReadLease
from mllm_index.storage.retry import RetryMeter
from mllm_index.storage.search import Catalog
from mllm_index.storage.shard_store import part_file
from mllm_index.storage.sources import SourceSpec, list_source, read_bboxes
from mllm_index.storage.uris import Location, check_under_roots, redact
from mllm_index.storage.versions import fingerprint, read_latest, read_manifest

log = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("query_id", pa.int64()), ("query_key", pa.string()), ("rank", pa.int32()),
    ("image_id", pa.int64()), ("key", pa.string()), ("uri", pa.string()), ("knn_rank", pa.int32()),
    ("knn_score", pa.float32()), ("rerank_score", pa.float32()), ("final_score", pa.float32()), ("reranker", pa.string()),
])
QUERY_FAILURE_SCHEMA = pa.schema(list(FAILURE_SCHEMA) + [("query_id", pa.int64())])


def query_spec(cfg: RerankJobConfig) -> SourceSpec:
    q = cfg.queries
    return SourceSpec(q.uri, q.format, q.image_extensions, q.image_column, q.key_column, cfg.storage.options_with_retry(),
                      uri_column=q.uri_column)


def query_bboxes(cfg: RerankJobConfig, spec: SourceSpec) -> dict[str, tuple]:
    """Boxes from queries.bboxes_uri, and from the bbox column of Parquet query tables."""
    boxes = {}
    for uri, kind, _ in list_source(spec).containers:
        if kind == "parquet":
            boxes.update(read_bboxes(uri, spec.storage_options, cfg.queries.key_column or "key", cfg.queries.bbox_column))
    if cfg.queries.bboxes_uri:
        boxes.update(read_bboxes(cfg.queries.bboxes_uri, spec.storage_options, cfg.queries.key_column or "key",
                                 cfg.queries.bbox_column))
    return boxes


def with_bboxes(table: pa.Table, boxes: dict[str, tuple], roots: list[str]) -> pa.Table:
    for uri in set(table.column("uri").to_pylist()):  # key + uri tables may point anywhere
        check_under_roots(uri, roots, "queries (uri column)")
    rows = [boxes.get(k, (np.nan,) * 4) for k in table.column("key").to_pylist()]
    values = pa.array(np.array(rows, np.float32).reshape(-1), pa.float32())
    return table.append_column("bbox", pa.FixedSizeListArray.from_arrays(values, 4))


class ResultWriter:
    """Writes one part's results (exploded, joined with the catalog) and failures, then the marker."""

    def __init__(self, out: Location, catalog: Catalog, run_id: str, reranker: str):
        self.out, self.catalog, self.run_id, self.reranker = out, catalog, run_id, reranker

    def __call__(self, part: int, cols: dict[str, np.ndarray]) -> QueryPartStats:
        results, failures = [], []
        for q in range(len(cols["image_id"])):
            query = {"query_id": int(cols["image_id"][q]), "uri": cols["uri"][q], "key": cols["key"][q]}
            if not cols["ok"][q]:
                failures.append({**query, "image_id": query["query_id"], "stage": "query", "error_type": cols["error_type"][q],
                                 "message": cols["message"][q]})
                continue
            for note in json.loads(cols["candidate_failures"][q]):
                failures.append({"query_id": query["query_id"], "uri": note.get("uri"), "key": note.get("key"), **note})
            ids = cols["result_ids"][q]
            found = ids >= 0
            for rank, (image_id, row) in enumerate(zip(ids[found], self.catalog.lookup(ids[found])), start=1):
                pos = rank - 1
                results.append({"run_id": self.run_id, "query_id": query["query_id"], "query_key": query["key"],
                                "rank": rank, "image_id": int(image_id), "key": row and row["key"], "uri": row and row["uri"],
                                "knn_rank": int(cols["knn_rank"][q][found][pos]),
                                "knn_score": float(cols["result_knn_scores"][q][found][pos]),
                                "rerank_score": float(cols["rerank_score"][q][found][pos]),
                                "final_score": float(cols["final_score"][q][found][pos]), "reranker": self.reranker})
        self.out.write_parquet(pa.Table.from_pylist(results, schema=RESULT_SCHEMA), "results", part_file(part))
        self.out.write_parquet(pa.Table.from_pylist(failures, schema=QUERY_FAILURE_SCHEMA), "failures", part_file(part))
        stats = QueryPartStats(part=part, rows=int(len(cols["image_id"])), queries_ok=int(cols["ok"].sum()),
                               queries_failed=int((~cols["ok"].astype(bool)).sum()), results=len(results),
                               pairs_scored=int(cols["pairs_scored"].sum()),
                               candidate_failures=sum(1 for f in failures if f["stage"] == "candidate"),
                               errors=dict(Counter(f["error_type"] for f in failures)),
                               retries=int(cols["retries"].sum()) if "retries" in cols else 0)
        write_contract(self.out, stats, "stats", part_file(part, "json"))  # the part's done marker
        return stats


def run_rerank(cfg: RerankJobConfig) -> RerankSummary:
    cfg.require()
    roots = cfg.storage.allowed_roots
    for field, uri in (("queries.uri", cfg.queries.uri), ("index_uri", cfg.index_uri), ("output_uri", cfg.output_uri),
                       ("queries.bboxes_uri", cfg.queries.bboxes_uri)):
        if uri:
            check_under_roots(uri, roots, field)
    t0, retries = time.time(), RetryMeter()
    index = Location(cfg.index_uri, cfg.storage.options_with_retry())
    out = Location(cfg.output_uri, cfg.storage.options_with_retry())
    previous = out.read_json("run.json") if out.exists("run.json") else None
    version = cfg.index_version or (previous or {}).get("index_version") or read_latest(index)
    manifest = read_manifest(index, version)
    if manifest.model is None or manifest.preprocessing is None:
        raise ConfigError(f"index_uri: {redact(index.uri)} ({version}) was published from precomputed vectors, without a "
                          "model to embed queries with; search it from Python with IndexSearcher instead")
    if cfg.query_model and cfg.query_model != manifest.model.name:
        raise ConfigError(f"query_model: the index {redact(index.uri)} ({version}) was built with {manifest.model.name!r}, "
                          f"not {cfg.query_model!r}; queries must be embedded by the same backbone")
    settings = {"queries": cfg.queries.model_dump(), "index_uri": redact(index.uri), "index_version": version,
                "top_k": cfg.search.top_k, "reranker": cfg.reranker.model_dump(include={"model", "prompt", "yes_words",
                "no_words", "depth", "max_pixels", "symmetric", "fusion_weight"}), "part_size": cfg.run.part_size}
    run_id = cfg.run.run_id or fingerprint(settings)
    if previous and previous["fingerprint"] != fingerprint(settings):
        raise ConfigError(f"output_uri {redact(out.uri)} holds run {previous['run_id']} with other settings; "
                          "use a new output_uri (or the same settings to resume)")
    out.write_json({"fingerprint": fingerprint(settings), "run_id": run_id, "index_version": version, "settings": settings}, "run.json")

    with ReadLease(index, version, f"mllm-index rerank {run_id}") as lease:  # keeps the version from garbage collection
        return _rerank_leased(cfg, index, out, version, manifest, run_id, roots, lease, t0, retries)


def _rerank_leased(cfg: RerankJobConfig, index: Location, out: Location, version: str, manifest: Manifest, run_id: str,
                   roots: list[str], lease: ReadLease, t0: float, retries: RetryMeter) -> RerankSummary:
    spec = query_spec(cfg)
    t = time.time()
    plan = load_or_make_plan(out, spec, cfg.run.part_size, QUERY_FAILURE_SCHEMA)
    boxes = query_bboxes(cfg, spec)
    stages = {"list": time.time() - t}
    done = finished_parts(out, QueryPartStats)
    todo = [p for p in range(plan.parts) if p not in done]
    t = time.time()
    new, timing = _rerank_parts(out, todo, cfg, index, version, manifest, run_id, boxes, roots, lease) if todo else ({}, {})
    done.update(new)
    stages["embed_search_rerank"] = time.time() - t
    pairs = sum(done[p].pairs_scored for p in todo) if todo else 0
    errors = Counter(plan.list_errors)
    for s in done.values():
        errors.update(s.errors)
    summary = RerankSummary(
        run_id=run_id, index_version=version, reranker=cfg.reranker.model or "knn",
        queries=QueryCounts(seen=plan.seen, ok=sum(s.queries_ok for s in done.values()),
                            failed=plan.list_failures + sum(s.queries_failed for s in done.values()),
                            skipped=sum(plan.skipped.values())),
        results=sum(s.results for s in done.values()), pairs_scored_this_run=pairs,
        pairs_per_second=round(pairs / stages["embed_search_rerank"], 2) if pairs else None,
        candidate_failures=sum(s.candidate_failures for s in done.values()), errors=dict(errors),
        parts=plan.parts, parts_this_run=len(todo), stage_seconds={k: round(v, 3) for k, v in stages.items()},
        wall_seconds=round(time.time() - t0, 3), output_uri=redact(out.uri), startup_seconds=timing.get("startup_seconds"),
        storage_retries=StorageRetries(driver=retries.count(), workers=sum(done[p].retries for p in todo)))
    write_contract(out, summary, "summary.json")
    return summary


def _rerank_parts(out: Location, todo: list[int], cfg: RerankJobConfig, index: Location, version: str, manifest: Manifest,
                  run_id: str, boxes: dict, roots: list[str], lease: ReadLease) -> tuple[dict, dict]:
    tables = [with_bboxes(out.read_parquet("plan", part_file(p)), boxes, roots) for p in todo]
    expected = {p: t.num_rows for p, t in zip(todo, tables)}
    writer = ResultWriter(out, Catalog(index, manifest), run_id, cfg.reranker.model or "knn")

    def write(part: int, cols: dict) -> QueryPartStats:
        lease.renew()
        return writer(part, cols)

    collector = PartCollector(expected, write)
    embed_res = actor_resources(cfg.embed, "embed")
    search_res = {"field": "search", "num_cpus": cfg.search.num_cpus, "concurrency": cfg.search.concurrency, "num_gpus": 0}
    rerank_res = actor_resources(cfg.reranker, "reranker")
    plan_actor_pools([embed_res, search_res, rerank_res], cfg.decode.num_cpus)
    ds = decode_and_embed(tables, cfg, manifest.model, manifest.preprocessing, cfg.queries.image_column, embed_res, index.uri)
    ds = ds.map_batches(
        SearchIndex, batch_size=cfg.search.batch_size, batch_format="numpy", num_cpus=cfg.search.num_cpus,
        compute=ray.data.ActorPoolStrategy(size=cfg.search.concurrency),
        fn_constructor_kwargs=dict(index_uri=index.uri, version=version, storage_options=cfg.storage.options_with_retry(),
                                   top_k=cfg.search.top_k, nprobe=cfg.search.nprobe or manifest.nprobe,
                                   rescore=cfg.search.rescore if cfg.search.rescore is not None else manifest.rescore),
    ).map_batches(
        RerankCandidates, batch_size=cfg.reranker.queries_per_batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=rerank_res["concurrency"]), num_gpus=rerank_res["num_gpus"],
        num_cpus=rerank_res["num_cpus"],
        fn_constructor_kwargs=dict(index_uri=index.uri, version=version, storage_options=cfg.storage.options_with_retry(),
                                   reranker={**cfg.reranker.model_dump(), "device": rerank_res["device"],
                                             "num_threads": rerank_res["num_threads"]},
                                   decode={"max_pixels": cfg.decode.max_pixels, "max_bytes": cfg.decode.max_bytes,
                                           "timeout_s": cfg.decode.timeout_s},
                                   image_column=cfg.queries.image_column),
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        collector.add(batch)
    return collector.done, collector.timing()


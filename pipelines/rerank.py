"""Rerank job: queries -> embed (the index's backbone) -> kNN top-k -> MLLM pair scores -> Parquet.

Output layout under OUTPUT_URI (one folder per run):
    run.json                      settings, index version, run id (a re-run with other settings is refused)
    plan/part-NNNNN.parquet       the query listing, cut into parts of run.part_size queries
    catalog_by_id/                only for versions whose shards have no catalog files (built before them): the
                                  version's catalog partitioned by image id (built once per run, distributed)
    chunks/part-NNNNN.d/          what writer tasks wrote of an unfinished part: a re-run skips those queries
    results/part-NNNNN.parquet    one row per (query, rank), merged from the chunks by the task completing the part
    failures/part-NNNNN.parquet   queries and candidates that could not be read or decoded
    stats/part-NNNNN.json         the part's completion marker: a re-run skips finished parts
    summary.json

No process holds the gallery: search actors hold a bounded group of shards, a candidate's catalog row
is read by the fetch tasks from the catalog file of the shard the search found it in (one row group per
id; written once, with the shard), and results are written by tasks, not by the driver.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from mllm_index.actors.fetch import fetch_candidates
from mllm_index.actors.pair_rows import RegroupPairs, explode_pairs
from mllm_index.actors.registry import TRANSFORMERS, reranker_kind
from mllm_index.actors.rerank import ScoreCandidates
from mllm_index.configs.schema import ConfigError, RerankJobConfig
from mllm_index.pipelines.catalog_buckets import ensure_catalog_buckets
from mllm_index.pipelines.parts import finished_parts, load_or_make_plan
from mllm_index.pipelines.result_parts import (QUERY_FAILURE_SCHEMA, RESULT_SCHEMA,  # noqa: F401 (RESULT_SCHEMA: API)
                                               finish_part, write_results, written_queries)
from mllm_index.pipelines.search_stages import add_search_stages, plan_search
from mllm_index.pipelines.stages import actor_resources, decode_and_embed, plan_actor_pools
from mllm_index.pipelines.summaries import QueryCounts, RerankSummary, ScoringSummary, StorageRetries
from mllm_index.storage.contracts import Manifest, QueryPartStats, write_contract
from mllm_index.storage.lock import ReadLease
from mllm_index.storage.retry import RetryMeter
from mllm_index.storage.shard_catalog import has_shard_catalogs, plain_catalogs
from mllm_index.storage.shard_store import part_file
from mllm_index.storage.sources import SourceSpec, list_source, read_bboxes
from mllm_index.storage.uris import Location, check_under_roots, redact
from mllm_index.storage.versions import fingerprint, read_latest, read_manifest

log = logging.getLogger(__name__)

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
                "no_words", "depth", "max_pixels", "min_pixels", "symmetric", "fusion_weight", "system_prompt", "instruction",
                "between_images"}), "part_size": cfg.run.part_size}
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
    timing = _rerank_parts(out, todo, cfg, index, version, manifest, run_id, boxes, roots, lease) if todo else {}
    done = finished_parts(out, QueryPartStats)
    missing = sorted(set(todo) - set(done))
    if missing:
        raise RuntimeError(f"parts {missing[:10]} of {redact(out.uri)} were not finished; re-run the job to finish them")
    stages["embed_search_rerank"] = time.time() - t
    pairs = timing.get("pairs_scored", 0)
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
        storage_retries=StorageRetries(driver=retries.count(), workers=sum(done[p].retries for p in todo)),
        scoring=ScoringSummary.from_parts([done[p] for p in todo], timing.get("prefix_cache")))
    write_contract(out, summary, "summary.json")
    return summary


def _unfinished_tables(out: Location, todo: list[int], boxes: dict, roots: list[str]) -> tuple[list[pa.Table], dict[int, int]]:
    """Plan rows still to do (queries of written chunks are skipped), and each todo part's size."""
    tables, expected = [], {}
    for part in todo:
        table = out.read_parquet("plan", part_file(part))
        expected[part] = table.num_rows
        written = written_queries(out, part)
        if written:
            table = table.filter(pc.invert(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(written), pa.int64()))))
        if table.num_rows:
            tables.append(with_bboxes(table, boxes, roots))
        else:  # every query is in a chunk, but the run stopped before merging them: a task merges them now
            ray.get(ray.remote(num_cpus=0.25)(finish_part).remote(out, part, expected[part]))
    return tables, expected


REGROUP = {"field": "reranker (regrouping pairs)", "num_cpus": 0.1, "concurrency": 1}


def ray_data_llm_wanted(kind: str, settings: dict) -> bool:
    """`reranker.backend` resolves to vllm (explicitly, or auto on a GPU): score through the ray.data.llm stage,
    or, where ray.data.llm cannot be imported, through the vLLM scorer inside the scoring actors."""
    from mllm_index.actors.vllm_scorer import resolve_backend  # imports torch: only for a model reranker

    try:
        if kind != TRANSFORMERS or resolve_backend(settings) != "vllm":
            return False
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        import ray.data.llm  # noqa: F401
    except ImportError as exc:
        log.warning("ray.data.llm is not importable (%s): vLLM scores inside the rerank actors instead", exc)
        return False
    return True


def score_with_actors(ds, cfg: RerankJobConfig, settings: dict, res: dict):
    """Query rows -> scoring actors (transformers, a classic scorer, or the in-actor vLLM scorer) -> ranked query rows."""
    return ds.map_batches(
        ScoreCandidates, batch_size=cfg.reranker.queries_per_batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=res["concurrency"]), num_gpus=res["num_gpus"], num_cpus=res["num_cpus"],
        fn_constructor_kwargs=dict(reranker=settings))


def score_with_ray_data_llm(ds, cfg: RerankJobConfig, settings: dict, res: dict, env: dict | None = None):
    """Query rows -> one row per pair (adjacent per query, query image first) -> the ray.data.llm vLLM stage ->
    query rows again (actors/pair_rows.py says why one regrouping actor keyed by query) -> ranked query rows."""
    from mllm_index.actors.vllm_scorer import build_rerank_processor

    r = cfg.reranker
    ds = ds.map_batches(explode_pairs, batch_size=r.queries_per_batch, batch_format="numpy", num_cpus=cfg.decode.num_cpus,
                        fn_kwargs=dict(depth=r.depth, symmetric=r.symmetric))
    ds = build_rerank_processor({**settings, "concurrency": res["concurrency"]}, env)(ds)
    return ds.map_batches(RegroupPairs, batch_size=None, batch_format="numpy", num_cpus=REGROUP["num_cpus"],
                          compute=ray.data.ActorPoolStrategy(size=1), fn_constructor_kwargs=dict(depth=r.depth,
                          weight=r.fusion_weight))


def _catalog_kwargs(index: Location, manifest: Manifest, out: Location, cfg: RerankJobConfig, legacy: bool) -> dict:
    """Where the fetch tasks find candidates' catalog rows: the shards' catalog files (written once,
    with each shard; the tasks get their references, O(shards)), or, for a version with a shard built
    before them or a legacy search (no `knn_shards`), the run's catalog by id, built here once per run."""
    if not legacy and has_shard_catalogs(manifest.shards):
        return dict(index_uri=index.uri, shard_catalogs=plain_catalogs(manifest.shards))
    log.info("version %s: %s; building this run's catalog by id (catalog_by_id/)", manifest.version,
             "the search runs the legacy way (no shard per candidate)" if legacy else
             f"{sum(s.catalog is None for s in manifest.shards)} of {len(manifest.shards)} shards have no catalog "
             "file (built before them)")
    return dict(catalog_uri=ensure_catalog_buckets(index, manifest, out, cfg.run.catalog_bucket_rows).folder.uri)


def _rerank_parts(out: Location, todo: list[int], cfg: RerankJobConfig, index: Location, version: str, manifest: Manifest,
                  run_id: str, boxes: dict, roots: list[str], lease: ReadLease) -> dict:
    """Stream the unfinished queries through decode -> embed -> search groups -> catalog + candidate fetch (tasks)
    -> scoring (actors) -> writer tasks. The driver only counts the parts the writers finish."""
    options = cfg.storage.options_with_retry()
    tables, expected = _unfinished_tables(out, todo, boxes, roots)
    if not tables:
        return {}
    search = plan_search(manifest, cfg.search)
    catalog = _catalog_kwargs(index, manifest, out, cfg, search.legacy)
    reranker = cfg.reranker.model
    kind = reranker_kind(reranker) if reranker else None
    max_pixels = cfg.reranker.max_pixels
    embed_res = actor_resources(cfg.embed, "embed")
    rerank_res = actor_resources(cfg.reranker, "reranker")
    vllm_stage = kind is not None and ray_data_llm_wanted(kind.name, {**cfg.reranker.model_dump(), "device": rerank_res["device"]})
    if vllm_stage:  # engine replicas (one CPU bundle each on CPU) and the regrouping actor
        rerank_res = {**rerank_res, "num_cpus": rerank_res["num_cpus"] if rerank_res["num_gpus"] else 1.0}
    plan_actor_pools([embed_res, search.resources, rerank_res] + ([REGROUP] if vllm_stage else []), cfg.decode.num_cpus)
    ds = decode_and_embed(tables, cfg, manifest.model, manifest.preprocessing, cfg.queries.image_column, embed_res, index.uri,
                          keep_max_pixels=max_pixels if kind else None)
    ds = add_search_stages(ds, search, index.uri, version, options, cfg.search.batch_size)
    decode = {"max_pixels": cfg.decode.max_pixels, "max_bytes": cfg.decode.max_bytes, "timeout_s": cfg.decode.timeout_s}
    ds = ds.map_batches(
        fetch_candidates, batch_size=cfg.reranker.queries_per_batch, batch_format="numpy", num_cpus=cfg.decode.num_cpus,
        fn_kwargs=dict(storage_options=options, image_column=cfg.queries.image_column,
                       depth=cfg.reranker.depth if kind else 0, decode=decode, max_pixels=max_pixels, **catalog),
    )
    settings = {**cfg.reranker.model_dump(), "device": rerank_res["device"], "num_threads": rerank_res["num_threads"]}
    tally = None
    if vllm_stage:  # the engines' prefix-cache counters (their output rows do not carry them)
        from mllm_index.actors.vllm_prefix_stats import ENV, PrefixCacheTally

        name = f"mllm-index-prefix-cache-{run_id}-{uuid.uuid4().hex[:8]}"
        tally = PrefixCacheTally.options(name=name).remote()
        ds = score_with_ray_data_llm(ds, cfg, settings, rerank_res, {ENV: name})
    else:
        ds = score_with_actors(ds, cfg, settings, rerank_res)
    ds = ds.map_batches(
        write_results, batch_size=cfg.reranker.queries_per_batch, batch_format="numpy", num_cpus=cfg.decode.num_cpus,
        fn_kwargs=dict(out=out, run_id=run_id, reranker=reranker or "knn", expected=expected),
    )
    started, first, pairs = time.time(), None, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):  # one small row per chunk written
        lease.renew()
        pairs += int(batch["pairs_scored"].sum())
        first = first or (time.time() if len(batch["part"]) else None)
    timing = {"pairs_scored": pairs, **({"startup_seconds": round(first - started, 3)} if first else {})}
    if tally is not None:
        timing["prefix_cache"] = ray.get(tally.totals.remote())
        ray.kill(tally)
    return timing

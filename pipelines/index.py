"""Index job: gallery source -> decode -> embed -> IVF-PQ shards -> published version.

Unit of resumable work is a *part* (run.part_size images, in source order). The plan
(which images go in which part) is written once per version; each finished part leaves
embeddings/, catalog/, failures/ files and then stats/part-NNNNN.json, the done marker.
A re-run of the same job resumes the unpublished version and does only what is missing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import ray

from actors.classic import CODEBOOK, PCA, SIFT_VLAD, fit_vlad_codebook
from actors.embed import load_preprocessing
from configs.schema import IndexJobConfig
from storage.catalog import CATALOG_SCHEMA, FAILURE_SCHEMA, embeddings_table
from storage.faiss_store import default_factory, train_sample_size
from storage.shard_store import TRAINED, build_shard, part_file, shard_file, train_version
from pipelines.parts import PartCollector, finished_parts, load_or_make_plan
from pipelines.stages import actor_resources, decode_and_embed, plan_actor_pools
from storage.sources import SourceSpec
from storage.uris import Location, check_under_roots, redact
from storage.lock import IndexLock, leased_versions
from storage.versions import begin_version, collect_garbage, fingerprint, publish

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job cannot produce a version; the message says why and what was kept."""


def source_spec(cfg: IndexJobConfig) -> SourceSpec:
    s = cfg.source
    return SourceSpec(s.uri, s.format, s.image_extensions, s.image_column, s.key_column, cfg.storage.options)


# -- embed: stream parts through decode and embed actors ----------------------------------
def write_index_part(version: Location, part: int, cols: dict[str, np.ndarray]) -> dict:
    """Embeddings, catalog rows and failures of one finished part; the stats marker comes last."""
    ok = cols["ok"].astype(bool)
    version.write_parquet(embeddings_table(cols["image_id"][ok], cols["embedding"][ok]), "embeddings", part_file(part))
    catalog = {f.name: cols[f.name][ok] for f in CATALOG_SCHEMA}
    version.write_parquet(pa.table(catalog, schema=CATALOG_SCHEMA), "catalog", part_file(part))
    bad = ~ok
    failures = {f.name: cols[f.name][bad] for f in FAILURE_SCHEMA}
    version.write_parquet(pa.table(failures, schema=FAILURE_SCHEMA), "failures", part_file(part))
    stats = {"part": part, "rows": int(len(ok)), "indexed": int(ok.sum()), "failed": int(bad.sum()),
             "errors": dict(Counter(cols["error_type"][bad].tolist())), "dim": int(cols["embedding"].shape[1])}
    version.write_json(stats, "stats", part_file(part, "json"))  # the part's done marker
    return stats


def embed_parts(version: Location, todo: list[int], cfg: IndexJobConfig, prep: dict, model: dict,
                lock: IndexLock) -> tuple[dict[int, dict], dict]:
    """(stats per finished part, timing): streams the parts through decode and embed."""
    tables = [version.read_parquet("plan", part_file(p)) for p in todo]
    expected = {p: t.num_rows for p, t in zip(todo, tables)}
    def write(part: int, cols: dict) -> dict:
        lock.renew()  # before writing: a run whose lock was taken over must not write
        return write_index_part(version, part, cols)

    writer = PartCollector(expected, write)
    res = actor_resources(cfg.embed, "embed")
    plan_actor_pools([res], cfg.decode.num_cpus)
    ds = decode_and_embed(tables, cfg, model, prep, cfg.source.image_column, res)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        writer.add(batch)
    missing = sorted(set(todo) - set(writer.done))
    if missing:
        raise JobError(f"parts {missing[:10]} did not receive all their rows; re-run the job to finish them")
    return writer.done, writer.timing()


def vlad_codebook(version: Location, plan: dict, cfg: IndexJobConfig, prep: dict) -> dict:
    """The classic:sift-vlad codebook of this version: fit once (a Ray task) on a seeded gallery sample."""
    info = {"codebook": CODEBOOK, "codebook_uri": f"{version.uri}/{CODEBOOK}"}
    if cfg.model.pca_dim:
        info.update(pca=PCA, pca_uri=f"{version.uri}/{PCA}")
    if version.exists(CODEBOOK):
        return info
    rng = np.random.default_rng(cfg.run.seed)
    parts = rng.permutation(plan["parts"])[: max(1, 4 * -(-cfg.model.codebook_sample // cfg.run.part_size))]
    rows = [r for p in sorted(parts) for r in version.read_parquet("plan", part_file(int(p))).to_pylist()]
    sample = [rows[i] for i in sorted(rng.permutation(len(rows))[: cfg.model.codebook_sample])]
    settings = {"image_size": prep["image_size"], "fill": tuple(prep["fill"]), "clusters": cfg.model.vlad_clusters,
                "max_features": 500, "storage_options": cfg.storage.options, "image_column": cfg.source.image_column,
                "seed": cfg.run.seed, "pca_dim": cfg.model.pca_dim}
    fit = ray.remote(num_cpus=1)(fit_vlad_codebook)
    log.info("fitting the VLAD codebook: %s", ray.get(fit.remote(version, sample, settings)))
    return info


# -- build: train once, fill shards in parallel ------------------------------------------
def build_index(version: Location, part_stats: dict[int, dict], cfg: IndexJobConfig, dim: int,
                factory: str | None = None) -> tuple[str, int, list[dict]]:
    counts = {p: s["indexed"] for p, s in part_stats.items()}
    total = sum(counts.values())
    factory = factory or (cfg.index.factory if cfg.index.factory != "auto" else default_factory(total, dim))
    gpus = ray.cluster_resources().get("GPU", 0) if cfg.index.use_gpu else 0
    task_gpus = 1 if gpus >= 1 else 0
    train_points = 0
    if not version.exists(TRAINED):
        sample = train_sample_size(factory, total, cfg.index.train_sample_max)
        train = ray.remote(num_cpus=1, num_gpus=task_gpus)(train_version)
        train_points = ray.get(train.remote(version, counts, factory, cfg.index.metric, sample, cfg.run.seed, task_gpus > 0))
    parts = sorted(counts)
    per_shard = max(1, cfg.index.shard_size // cfg.run.part_size)
    groups = [parts[i : i + per_shard] for i in range(0, len(parts), per_shard)]
    shard_task = ray.remote(num_cpus=1, num_gpus=task_gpus)(build_shard)
    pending, shards = {}, {}
    for s, group in enumerate(groups):
        if version.exists("shards", shard_file(s, "json")):
            shards[s] = version.read_json("shards", shard_file(s, "json"))
        else:
            pending[s] = shard_task.remote(version, s, group, task_gpus > 0)
    shards.update(zip(pending, ray.get(list(pending.values()))))
    return factory, train_points, [shards[s] for s in sorted(shards)]


# -- the job ---------------------------------------------------------------------------------
def run_index(cfg: IndexJobConfig) -> dict:
    """Run (or resume) the index job; returns the summary that is also saved as stats.json."""
    cfg.require()
    for field, uri in (("source.uri", cfg.source.uri), ("index.uri", cfg.index.uri)):
        check_under_roots(uri, cfg.storage.allowed_roots, field)
    index = Location(cfg.index.uri, cfg.storage.options)
    with IndexLock(index, "mllm-index index", cfg.index.lock_ttl) as lock:
        return _run_index_locked(cfg, index, lock)


def _run_index_locked(cfg: IndexJobConfig, index: Location, lock: IndexLock) -> dict:
    t0 = time.time()
    stages: dict[str, float] = {}
    spec = source_spec(cfg)
    prep = load_preprocessing(cfg.model.name, cfg.model.image_size)
    settings = {"source": cfg.source.model_dump(), "model": cfg.model.model_dump(), "preprocessing": prep,
                "index": {k: getattr(cfg.index, k) for k in ("factory", "metric", "shard_size")}, "part_size": cfg.run.part_size}
    version_name, resumed = begin_version(index, fingerprint(settings), settings)
    version = index.child("versions", version_name)
    log.info("%s version %s of %s", "resuming" if resumed else "building", version_name, redact(index.uri))

    t = time.time()
    plan = load_or_make_plan(version, spec, cfg.run.part_size)
    stages["list"] = time.time() - t
    model = cfg.model.model_dump()
    if cfg.model.name == SIFT_VLAD:
        model.update(vlad_codebook(version, plan, cfg, prep))
    done, processed, rates = embed_todo(version, plan, cfg, prep, model, lock, stages)
    summary = {"version": version_name, "resumed": resumed, "index_uri": redact(index.uri),
               "source_uri": redact(spec.location().uri), "images_processed_this_run": processed, **rates}
    return finish_version(index, version_name, cfg, plan, done, model, prep, stages, lock, t0, summary)


def embed_todo(version: Location, plan: dict, cfg: IndexJobConfig, prep: dict, model: dict, lock: IndexLock,
               stages: dict) -> tuple[dict[int, dict], int, dict]:
    """Embed the planned parts that have no marker yet: (stats of all finished parts, images processed, timing)."""
    t = time.time()
    done = finished_parts(version)
    todo = [p for p in range(plan["parts"]) if p not in done]
    new_parts, rates = embed_parts(version, todo, cfg, prep, model, lock) if todo else ({}, {})
    lock.renew()
    done.update(new_parts)
    stages["decode_embed"] = time.time() - t
    processed = sum(done[p]["rows"] for p in todo)
    if processed and stages["decode_embed"]:
        rates["images_per_second"] = round(processed / stages["decode_embed"], 2)
    return done, processed, rates


def finish_version(index: Location, version_name: str, cfg: IndexJobConfig, plan: dict, done: dict[int, dict], model: dict,
                   prep: dict, stages: dict, lock: IndexLock, t0: float, summary: dict, factory: str | None = None) -> dict:
    """Train (unless trained.faiss exists) and fill the shards, write stats.json and the manifest, publish."""
    version = index.child("versions", version_name)
    counts = {"seen": plan["seen"], "indexed": sum(s["indexed"] for s in done.values()),
              "failed": plan["list_failures"] + sum(s["failed"] for s in done.values()),
              "skipped": sum(plan["skipped"].values())}
    errors = Counter(plan["list_errors"])
    for s in done.values():
        errors.update(s["errors"])
    summary.update(counts=counts, skipped_by_extension=plan["skipped"], errors=dict(errors))
    summary.setdefault("images_per_second", None)
    if counts["indexed"] == 0:
        version.write_json(summary, "stats.json")
        raise JobError(f"no image could be indexed ({counts['failed']} failed, {counts['skipped']} skipped); "
                       f"see {redact(version.uri)}/failures/ — nothing was published")
    dim = max(s["dim"] for s in done.values())
    t = time.time()
    factory, train_points, shards = build_index(version, done, cfg, dim, factory)
    stages["train_add"] = time.time() - t
    total_bytes = sum(s["bytes"] for s in shards)
    summary.update(
        factory=factory, dim=dim, metric=cfg.index.metric, train_points=train_points, shards=len(shards),
        index_bytes=total_bytes, index_bytes_per_vector=total_bytes / counts["indexed"],
        flat_float32_bytes_per_vector=4 * dim, stage_seconds={k: round(v, 3) for k, v in stages.items()},
        wall_seconds=round(time.time() - t0, 3),
    )
    version.write_json(summary, "stats.json")
    parts = [part_file(p) for p in sorted(done)]
    manifest = {
        "model": {k: v for k, v in model.items() if not k.endswith("_uri")}, "preprocessing": prep, "dim": dim,
        "metric": cfg.index.metric, "factory": factory, "nprobe": cfg.index.nprobe, "rescore": cfg.index.rescore,
        "source": {"uri": summary["source_uri"], "format": cfg.source.format}, "shards": shards, "counts": counts,
        "parent": index.read_json("versions", version_name, "run.json").get("parent"),
        "trained_on": summary.get("trained_on") or counts["indexed"],  # gallery size at the last training
        "embeddings": {"dtype": "float16", "parts": parts}, "catalog": {"parts": parts},
        "failures": {"parts": ["listing.parquet"] + parts},
    }
    if summary.get("update"):
        manifest["update"] = summary["update"]
    t = time.time()
    lock.renew()
    publish(index, version_name, manifest)
    if cfg.index.keep_versions:
        summary["garbage_collected"] = collect_garbage(index, cfg.index.keep_versions, leased_versions(index))["deleted"]
    summary["stage_seconds"]["publish"] = round(time.time() - t, 3)
    return summary


def format_summary(s: dict) -> str:
    c = s["counts"]
    lines = [
        f"index version {s['version']} published at {s['index_uri']}{' (resumed)' if s['resumed'] else ''}",
        f"  images: seen {c['seen']} = indexed {c['indexed']} + failed {c['failed']} + skipped {c['skipped']}",
        f"  index: {s['factory']}, dim {s['dim']}, {s['shards']} shard(s), "
        f"{s['index_bytes_per_vector']:.1f} bytes/vector (flat float32: {s['flat_float32_bytes_per_vector']})",
        f"  throughput: {s['images_per_second'] or '-'} images/s (decode+embed, incl. {s.get('startup_seconds') or 0:.1f}s "
        f"to the first part), wall {s['wall_seconds']:.1f}s",
        "  stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["stage_seconds"].items()),
    ]
    if s["errors"]:
        lines.append("  failures by type: " + ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())))
    return "\n".join(lines)

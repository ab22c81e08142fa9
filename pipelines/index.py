"""Index job: gallery source -> decode -> embed -> IVF-PQ shards -> published version.

Unit of resumable work is a *part* (run.part_size images, in source order). The plan
(which images go in which part) is written once per version; each finished part leaves
embeddings/, catalog/, failures/ files and then stats/part-NNNNN.json, the done marker.
A re-run of the same job resumes the unpublished version and does only what is missing.
"""

from __future__ import annotations

import logging

import numpy as np
import ray

from mllm_index.actors.registry import embedder_kind
from mllm_index.configs.schema import IndexJobConfig
from mllm_index.pipelines.build import (JobError, VersionBuild, VersionContent, embed_todo,  # noqa: F401 (JobError: API)
                                        publish_version)
from mllm_index.pipelines.listing import make_index_plan
from mllm_index.pipelines.parts import plan_table
from mllm_index.pipelines.summaries import IndexSummary
from mllm_index.storage.contracts import FileRef, ModelSpec, Plan, SourceInfo, version_file
from mllm_index.storage.lock import IndexLock
from mllm_index.storage.sources import SourceSpec
from mllm_index.storage.uris import Location, check_under_roots, redact
from mllm_index.storage.versions import begin_version, fingerprint

log = logging.getLogger(__name__)


def source_spec(cfg: IndexJobConfig) -> SourceSpec:
    s = cfg.source
    return SourceSpec(s.uri, s.format, s.image_extensions, s.image_column, s.key_column, cfg.storage.options_with_retry())


def model_spec(cfg: IndexJobConfig) -> ModelSpec:
    return ModelSpec(name=cfg.model.name, settings=cfg.model.model_dump(exclude={"name"}))


def check_roots(cfg: IndexJobConfig) -> Location:
    """The index location, once both URIs are known to be under the allowed roots."""
    for field, uri in (("source.uri", cfg.source.uri), ("index.uri", cfg.index.uri)):
        check_under_roots(uri, cfg.storage.allowed_roots, field)
    return Location(cfg.index.uri, cfg.storage.options_with_retry())


def fit_model_files(build: VersionBuild, plan: Plan, spec: ModelSpec, content_prep) -> dict[str, FileRef]:
    """Per-version files of the embedder's kind (e.g. a VLAD codebook): fit once, in a Ray task,
    on a seeded sample of the gallery; a kind without a fit has none."""
    kind = embedder_kind(spec.name)
    if kind.fit is None:
        return {}
    cfg = build.cfg
    want = kind.fit_sample(spec) if kind.fit_sample else 256
    rng = np.random.default_rng(cfg.run.seed)
    parts = rng.permutation(plan.parts)[: max(1, 4 * -(-want // cfg.run.part_size))]
    rows = [r for p in sorted(parts) for r in plan_table(build.folder, int(p)).to_pylist()]
    sample = [rows[i] for i in sorted(rng.permutation(len(rows))[:want])]
    fit = ray.remote(num_cpus=1)(kind.fit)
    return ray.get(fit.remote(build.folder, build.name, sample, spec, content_prep, cfg.storage.options_with_retry(),
                              cfg.source.image_column, cfg.run.seed))


def run_index(cfg: IndexJobConfig) -> IndexSummary:
    """Run (or resume) the index job; returns the summary that is also saved as stats.json."""
    cfg.require()
    index = check_roots(cfg)
    with IndexLock(index, "mllm-index index", cfg.index.lock_ttl) as lock:
        return _run_index_locked(cfg, index, lock)


def _run_index_locked(cfg: IndexJobConfig, index: Location, lock: IndexLock) -> IndexSummary:
    spec = source_spec(cfg)
    model = model_spec(cfg)
    prep = embedder_kind(model.name).preprocessing(model.name, cfg.model.image_size)
    settings = {"source": cfg.source.model_dump(), "model": cfg.model.model_dump(), "preprocessing": prep.model_dump(mode="json"),
                "index": {k: getattr(cfg.index, k) for k in ("factory", "metric", "shard_size")}, "part_size": cfg.run.part_size}
    name, resumed = begin_version(index, fingerprint(settings), settings)
    build = VersionBuild(index, name, resumed, cfg, lock)
    log.info("%s version %s of %s", "resuming" if resumed else "building", name, redact(index.uri))
    with build.stage("list"):
        plan = make_index_plan(build.folder, spec, cfg.run.part_size, version_file(name), cfg.run.key_bucket_rows)
    model = model.model_copy(update={"files": fit_model_files(build, plan, model, prep)})
    content = VersionContent(model, prep, SourceInfo(uri=redact(spec.location().uri), format=cfg.source.format))
    return publish_version(build, plan, embed_todo(build, plan, content), content)

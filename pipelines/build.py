"""Building one index version: the path shared by the index job and the nightly update.

Both jobs begin a version, write a plan of parts, embed the parts without a marker
(`embed_todo`) and call `publish_version`: train (unless the content brings a trained
index), fill the shards in parallel Ray tasks, write stats.json and the manifest, then swap
LATEST. What differs between the two jobs is data (`VersionContent`), not flags.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from mllm_index.configs.schema import IndexJobConfig
from mllm_index.pipelines.parts import PartCollector, finished_parts, plan_table
from mllm_index.pipelines.stages import actor_resources, decode_and_embed, plan_actor_pools
from mllm_index.pipelines.summaries import IndexSummary, StorageRetries
from mllm_index.storage.catalog import CATALOG_SCHEMA, FAILURE_SCHEMA, embeddings_table
from mllm_index.storage.contracts import (Counts, FileRef, Manifest, ModelSpec, PartStats, Plan, Preprocessing,
                                          ShardRef, SourceInfo, TrainedRef, UpdateCounts, version_file, write_contract)
from mllm_index.storage.integrity import absent_or_resized, check_present, write_parquet_ref
from mllm_index.storage.faiss_store import default_factory, train_sample_size
from mllm_index.storage.lock import IndexLock, leased_versions
from mllm_index.storage.retry import RetryMeter
from mllm_index.storage.shard_store import build_shard, finished_shard, part_file, train_version, trained_ref
from mllm_index.storage.uris import Location, redact
from mllm_index.storage.versions import collect_garbage, publish


class JobError(RuntimeError):
    """The job cannot produce a version; the message says why and what was kept."""


@dataclass
class VersionBuild:
    """A version being written: where, by which config, under which lock, and the time per stage."""

    index: Location
    name: str
    resumed: bool
    cfg: IndexJobConfig
    lock: IndexLock
    started: float = field(default_factory=time.time)
    stages: dict[str, float] = field(default_factory=dict)
    retries: RetryMeter = field(default_factory=RetryMeter)  # the driver's storage retries since the build began

    @property
    def folder(self) -> Location:
        return self.index.child("versions", self.name)

    @contextmanager
    def stage(self, name: str):
        t = time.time()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.time() - t


@dataclass(frozen=True)
class VersionContent:
    """What a version is made of besides its parts: the embedder and, for an update, what it keeps."""

    model: ModelSpec
    prep: Preprocessing
    source: SourceInfo
    factory: str | None = None  # set: trained.faiss is already in the folder (an update on the live training)
    trained_on: int | None = None  # with factory: the gallery size at that training
    update: UpdateCounts | None = None
    live_before: str | None = None


@dataclass
class Embedded:
    """What `embed_todo` did in this run."""

    parts: dict[int, PartStats]  # every finished part of the version, earlier runs included
    processed: int = 0
    images_per_second: float | None = None
    startup_seconds: float | None = None
    retries: int = 0  # the workers' storage retries for the parts done in this run


# -- embed: stream parts through decode and embed actors ----------------------------------
def write_part_files(index: Location, version_name: str, part: int, tables: dict[str, pa.Table]) -> dict[str, FileRef]:
    """A part's embeddings / catalog / failures files, each with its size and checksum."""
    return {kind: write_parquet_ref(index, version_file(version_name, kind, part_file(part)), table)
            for kind, table in tables.items()}


def write_index_part(index: Location, version_name: str, part: int, cols: dict[str, np.ndarray]) -> PartStats:
    """Embeddings, catalog rows and failures of one finished part; the stats marker comes last."""
    ok = cols["ok"].astype(bool)
    bad = ~ok
    files = write_part_files(index, version_name, part, {
        "embeddings": embeddings_table(cols["image_id"][ok], cols["embedding"][ok]),
        "catalog": pa.table({f.name: cols[f.name][ok] for f in CATALOG_SCHEMA}, schema=CATALOG_SCHEMA),
        "failures": pa.table({f.name: cols[f.name][bad] for f in FAILURE_SCHEMA}, schema=FAILURE_SCHEMA)})
    stats = PartStats(part=part, rows=int(len(ok)), indexed=int(ok.sum()), failed=int(bad.sum()),
                      errors=dict(Counter(cols["error_type"][bad].tolist())), dim=int(cols["embedding"].shape[1]), files=files,
                      retries=int(cols["retries"].sum()) if "retries" in cols else 0)
    write_contract(index.child("versions", version_name), stats, "stats", part_file(part, "json"))  # the part's done marker
    return stats


def lost_parts(build: VersionBuild, parts: dict[int, PartStats]) -> set[int]:
    """Finished parts whose files are gone or changed since their marker was written: redone on resume."""
    owner = {ref.path: p for p, s in parts.items() for ref in s.files.values()}
    return {owner[ref.path] for ref, _ in absent_or_resized(build.index, [r for s in parts.values() for r in s.files.values()])}


def embed_todo(build: VersionBuild, plan: Plan, content: VersionContent) -> Embedded:
    """Embed the planned parts that have no marker yet."""
    version, cfg = build.folder, build.cfg
    with build.stage("decode_embed"):
        done = finished_parts(version, PartStats)
        for part in lost_parts(build, done):
            del done[part]  # its marker stays until the redo overwrites it
        todo = [p for p in range(plan.parts) if p not in done]
        result = Embedded(done)
        if todo:
            tables = [plan_table(version, p) for p in todo]

            def write(part: int, cols: dict) -> PartStats:
                build.lock.renew()  # before writing: a run whose lock was taken over must not write
                return write_index_part(build.index, build.name, part, cols)

            writer = PartCollector({p: t.num_rows for p, t in zip(todo, tables)}, write)
            res = actor_resources(cfg.embed, "embed")
            plan_actor_pools([res], cfg.decode.num_cpus)
            ds = decode_and_embed(tables, cfg, content.model, content.prep, cfg.source.image_column, res, build.index.uri)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add(batch)
            missing = sorted(set(todo) - set(writer.done))
            if missing:
                raise JobError(f"parts {missing[:10]} did not receive all their rows; re-run the job to finish them")
            done.update(writer.done)
            result.startup_seconds = writer.timing().get("startup_seconds")
        build.lock.renew()
    result.processed = sum(done[p].rows for p in todo)
    result.retries = sum(done[p].retries for p in todo)
    seconds = build.stages["decode_embed"]
    if result.processed and seconds:
        result.images_per_second = round(result.processed / seconds, 2)
    return result


# -- build: train once, fill shards in parallel ------------------------------------------
def build_index(build: VersionBuild, parts: dict[int, PartStats], factory: str) -> tuple[TrainedRef, list[ShardRef]]:
    """Trains trained.faiss unless the version has one (resumed, or copied by an update), then fills every shard."""
    cfg = build.cfg
    counts = {p: s.indexed for p, s in parts.items()}
    gpus = ray.cluster_resources().get("GPU", 0) if cfg.index.use_gpu else 0
    task_gpus = 1 if gpus >= 1 else 0
    trained = trained_ref(build.index, build.name)
    if trained is None:
        sample = train_sample_size(factory, sum(counts.values()), cfg.index.train_sample_max)
        task = ray.remote(num_cpus=1, num_gpus=task_gpus)(train_version)
        trained = ray.get(task.remote(build.index, build.name, counts, factory, cfg.index.metric, sample, cfg.run.seed,
                                      task_gpus > 0))
    order = sorted(counts)
    per_shard = max(1, cfg.index.shard_size // cfg.run.part_size)
    groups = [order[i : i + per_shard] for i in range(0, len(order), per_shard)]
    shard_task = ray.remote(num_cpus=1, num_gpus=task_gpus)(build_shard)
    pending, shards = {}, {}
    for s, group in enumerate(groups):
        shards[s] = finished_shard(build.index, build.name, s)
        if shards[s] is None:
            pending[s] = shard_task.remote(build.index, build.name, s, group, task_gpus > 0)
    shards.update(zip(pending, ray.get(list(pending.values()))))
    return trained, [shards[s] for s in sorted(shards)]


def publish_version(build: VersionBuild, plan: Plan, embedded: Embedded, content: VersionContent) -> IndexSummary:
    """Train (unless the content brings a trained index) and fill the shards, write stats.json and the
    manifest, publish; then collect garbage if the config keeps a bounded number of versions."""
    cfg, version, parts = build.cfg, build.folder, embedded.parts
    counts = Counts(seen=plan.seen, indexed=sum(s.indexed for s in parts.values()),
                    failed=plan.list_failures + sum(s.failed for s in parts.values()), skipped=sum(plan.skipped.values()))
    errors = Counter(plan.list_errors)
    for s in parts.values():
        errors.update(s.errors)
    summary = IndexSummary(version=build.name, resumed=build.resumed, index_uri=redact(build.index.uri),
                           source_uri=content.source.uri, images_processed_this_run=embedded.processed,
                           images_per_second=embedded.images_per_second, startup_seconds=embedded.startup_seconds,
                           counts=counts, skipped_by_extension=plan.skipped, errors=dict(errors),
                           live_before=content.live_before, update=content.update,
                           retrained=None if content.update is None else content.factory is None,
                           storage_retries=StorageRetries(workers=embedded.retries))
    if counts.indexed == 0:
        write_contract(version, summary, "stats.json")
        raise JobError(f"no image could be indexed ({counts.failed} failed, {counts.skipped} skipped); "
                       f"see {redact(version.uri)}/failures/ — nothing was published")
    dim = max(s.dim for s in parts.values())
    factory = content.factory or (cfg.index.factory if cfg.index.factory != "auto" else default_factory(counts.indexed, dim))
    with build.stage("train_add"):
        trained, shards = build_index(build, parts, factory)
    index_bytes = sum(s.file.bytes or 0 for s in shards)
    summary = summary.model_copy(update=dict(
        factory=factory, dim=dim, metric=cfg.index.metric, train_points=trained.train_points, shards=len(shards),
        index_bytes=index_bytes, index_bytes_per_vector=index_bytes / counts.indexed, flat_float32_bytes_per_vector=4 * dim))
    order = sorted(parts)
    manifest = Manifest(
        version=build.name, parent=build.index.read_json("versions", build.name, "run.json").get("parent"),
        model=content.model, preprocessing=content.prep, source=content.source, dim=dim, metric=cfg.index.metric,
        factory=factory, nprobe=cfg.index.nprobe, rescore=cfg.index.rescore, counts=counts,
        trained_on=content.trained_on if content.factory else counts.indexed,
        trained=trained.file, shards=shards, embeddings=part_refs(build.name, parts, order, "embeddings"),
        catalog=part_refs(build.name, parts, order, "catalog"),
        failures=[plan.listing_failures or FileRef(path=version_file(build.name, "failures", "listing.parquet"))]
        + part_refs(build.name, parts, order, "failures"),
        update=content.update,
    )
    with build.stage("publish"):
        problems = check_present(build.index, manifest.files())
        if problems:  # e.g. a part deleted or overwritten under the job: never publish a version that does not verify
            raise JobError(f"not publishing {build.name}: {len(problems)} referenced file(s) do not verify: "
                           + "; ".join(problems[:5]))
        build.lock.renew()
        write_contract(version, _finished(summary, build), "stats.json")
        publish(build.index, manifest)
        if cfg.index.keep_versions:
            deleted = collect_garbage(build.index, cfg.index.keep_versions, leased_versions(build.index))["deleted"]
            summary = summary.model_copy(update={"garbage_collected": deleted})
    return _finished(summary.model_copy(update={"published": True}), build)


def part_refs(version_name: str, parts: dict[int, PartStats], order: list[int], kind: str) -> list[FileRef]:
    """The parts' files of one kind as their writers recorded them (with checksums); a marker written
    before checksums existed gives a reference by path only, verified by size and structure."""
    return [parts[p].files.get(kind) or FileRef(path=version_file(version_name, kind, part_file(p))) for p in order]


def _finished(summary: IndexSummary, build: VersionBuild) -> IndexSummary:
    retries = summary.storage_retries.model_copy(update={"driver": build.retries.count()})
    return summary.model_copy(update={"stage_seconds": {k: round(v, 3) for k, v in build.stages.items()},
                                      "wall_seconds": round(time.time() - build.started, 3), "storage_retries": retries})

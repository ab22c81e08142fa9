"""Building one index version: the path shared by the index job and the nightly update.

Both jobs begin a version, write a plan of parts and embed the parts without a marker
(`embed_todo`). The index job then calls `publish_version`: train, fill the shards in parallel
Ray tasks, write stats.json and the manifest, swap LATEST. The update (pipelines/update.py)
assembles a manifest of references (live shards and parts where they are, delta shards built
here with `build_shards` on the live trained index) and publishes it with `publish_manifest`.
Shards are built from FileRefs, so their parts and trained index may live in any version's folder.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray

from mllm_index.configs.schema import IndexJobConfig
from mllm_index.pipelines.part_chunks import (CHUNKS, add_writer_stage, clear_unfinished_chunks, finished_stats,
                                              pause_for_fault_tests)
from mllm_index.pipelines.parts import finished_parts
from mllm_index.pipelines.stages import actor_resources, decode_and_embed, plan_actor_pools, plan_rows
from mllm_index.pipelines.summaries import IndexSummary, StorageRetries
from mllm_index.storage.contracts import (Counts, FileRef, Manifest, ModelSpec, PartStats, Plan, Preprocessing,
                                          ShardRef, SourceInfo, TrainedRef, UpdateCounts, version_file, write_contract)
from mllm_index.storage.integrity import absent_or_resized, check_present
from mllm_index.storage.faiss_store import default_factory, train_sample_size
from mllm_index.storage.lock import IndexLock, leased_versions
from mllm_index.storage.retry import RetryMeter
from mllm_index.storage.shard_store import build_shard, finished_shard, part_file, part_ref, train_version, trained_ref
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
    factory: str | None = None  # set: an update on the live training (its trained index is referenced, not retrained)
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


# -- embed: stream parts through decode and embed actors to writer tasks -------------------
def lost_parts(build: VersionBuild, parts: dict[int, PartStats]) -> set[int]:
    """Finished parts whose files are gone or changed since their marker was written: redone on resume."""
    owner = {ref.path: p for p, s in parts.items() for ref in s.files.values()}
    return {owner[ref.path] for ref, _ in absent_or_resized(build.index, [r for s in parts.values() for r in s.files.values()])}


def embed_todo(build: VersionBuild, plan: Plan, content: VersionContent) -> Embedded:
    """Embed the planned parts that have no marker yet. Writer tasks write each part and its marker
    (pipelines/part_chunks.py); the driver holds part numbers and receives small stats rows, never an embedding."""
    version, cfg = build.folder, build.cfg
    with build.stage("decode_embed"):
        done = finished_parts(version, PartStats)
        for part in lost_parts(build, done):
            del done[part]
            version.delete("stats", part_file(part, "json"))  # redone whole: a writer takes a marker for a done part
        todo = [p for p in plan.part_numbers if p not in done]
        result = Embedded(done)
        if todo:
            clear_unfinished_chunks(version, todo)
            res = actor_resources(cfg.embed, "embed")
            plan_actor_pools([res], cfg.decode.num_cpus)
            rows = plan_rows(version, todo)
            ds = decode_and_embed(rows, cfg, content.model, content.prep, cfg.source.image_column, res, build.index.uri)
            ds = add_writer_stage(ds, build.index, build.name, build.lock.token, cfg.decode.num_cpus)
            started, finished = time.time(), 0
            for stats in finished_stats(ds, build.lock.renew):
                if stats.part in done:
                    continue  # two tasks completed the part at once: same files, same marker
                build.lock.renew()  # as parts finish, as before: the lock's expiry stays ahead of the run
                done[stats.part] = stats
                finished += 1
                if finished == 1:
                    result.startup_seconds = round(time.time() - started, 3)
                pause_for_fault_tests(finished)
            missing = sorted(set(todo) - set(done))
            if missing:
                raise JobError(f"parts {missing[:10]} did not receive all their rows; re-run the job to finish them")
            version.delete(CHUNKS)  # every part is whole: only strays of retried tasks can be left
        build.lock.renew()
    result.processed = sum(done[p].rows for p in todo)
    result.retries = sum(done[p].retries for p in todo)
    seconds = build.stages["decode_embed"]
    if result.processed and seconds:
        result.images_per_second = round(result.processed / seconds, 2)
    return result


# -- build: train once, fill shards in parallel ------------------------------------------
def part_refs_by_number(version_name: str, parts: dict[int, PartStats], kind: str) -> dict[int, FileRef]:
    """Each part's file of one kind as its writer recorded it (with checksum); wherever it lives (an
    update's compacted parts are in its folder, referenced parts in earlier ones). A marker written
    before checksums existed gives a reference by path only, verified by size and structure."""
    return {p: part_ref(version_name, p, kind, s.files) for p, s in parts.items()}


def shard_groups(parts: list[int], cfg: IndexJobConfig) -> list[list[int]]:
    """Consecutive parts per shard: shard_size vectors at most (part_size per part)."""
    per_shard = max(1, cfg.index.shard_size // cfg.run.part_size)
    return [parts[i : i + per_shard] for i in range(0, len(parts), per_shard)]


def task_gpus(cfg: IndexJobConfig) -> int:
    gpus = ray.cluster_resources().get("GPU", 0) if cfg.index.use_gpu else 0
    return 1 if gpus >= 1 else 0


def largest_node_cpus() -> int:
    return max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] + [1])


def train_on_held_cpus(*args) -> TrainedRef:
    """`train_version` with FAISS using one OpenMP thread per CPU the task holds: Ray starts its workers
    with one, and k-means is the job's only work while it runs (0.48 s -> 0.25 s on 2 cores, 2,000 vectors)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    try:
        return train_version(*args)
    finally:  # the worker process is reused: a later 1-CPU shard task must not inherit the node's thread count
        faiss.omp_set_num_threads(before)


def build_shards(build: VersionBuild, groups: dict[int, list[int]], embeddings: dict[int, FileRef],
                 catalogs: dict[int, FileRef], trained: FileRef, deltas: Collection[int] = ()) -> dict[int, ShardRef]:
    """Fill shards {number: parts} from the parts' embeddings and catalog files (in any folder) on `trained`,
    in parallel Ray tasks, all in one wave; shards numbered in `deltas` are an update's delta shards. A
    shard whose marker lists the same parts was built before an interruption."""
    gpus = task_gpus(build.cfg)
    shard_task = ray.remote(num_cpus=1, num_gpus=gpus)(build_shard)
    pending, shards = {}, {}
    for s, group in groups.items():
        done = finished_shard(build.index, build.name, s, group)
        if done is not None and done.delta == (s in deltas):
            shards[s] = done
        else:
            pending[s] = shard_task.remote(build.index, build.name, s, group, gpus > 0, trained,
                                           [embeddings[p] for p in group], s in deltas, [catalogs[p] for p in group])
    shards.update(zip(pending, ray.get(list(pending.values()))))
    return shards


def build_index(build: VersionBuild, parts: dict[int, PartStats], factory: str, trained: FileRef | None = None,
                first_shard: int = 0, delta: bool = False) -> tuple[TrainedRef, list[ShardRef]]:
    """Trains trained.faiss unless given one (`trained`: the live version's, for an update's delta shards)
    or the version has one (resumed), then fills shards first_shard.. from `parts` (their files, wherever
    they live, as the PartStats record them)."""
    cfg = build.cfg
    counts = {p: s.indexed for p, s in parts.items()}
    refs = part_refs_by_number(build.name, parts, "embeddings")
    if trained is not None:
        made = TrainedRef(file=trained)  # referenced, not copied
    else:
        made = trained_ref(build.index, build.name)
        if made is None:
            sample = train_sample_size(factory, sum(counts.values()), cfg.index.train_sample_max)
            gpus = task_gpus(cfg)  # on a GPU the k-means runs there; on CPUs it takes a whole node
            task = ray.remote(num_cpus=1 if gpus else largest_node_cpus(), num_gpus=gpus)(train_on_held_cpus)
            made = ray.get(task.remote(build.index, build.name, counts, factory, cfg.index.metric, sample, cfg.run.seed,
                                       gpus > 0, refs))
    groups = {first_shard + i: g for i, g in enumerate(shard_groups(sorted(counts), cfg))}
    shards = build_shards(build, groups, refs, part_refs_by_number(build.name, parts, "catalog"), made.file,
                          set(groups) if delta else ())
    return made, [shards[s] for s in sorted(shards)]


def index_summary(build: VersionBuild, plan: Plan, embedded: Embedded, content: VersionContent, counts: Counts,
                  errors: Counter) -> IndexSummary:
    return IndexSummary(version=build.name, resumed=build.resumed, index_uri=redact(build.index.uri),
                        source_uri=content.source.uri, images_processed_this_run=embedded.processed,
                        images_per_second=embedded.images_per_second, startup_seconds=embedded.startup_seconds,
                        counts=counts, skipped_by_extension=plan.skipped, errors=dict(errors),
                        live_before=content.live_before, update=content.update,
                        retrained=None if content.update is None else content.factory is None,
                        storage_retries=StorageRetries(workers=embedded.retries))


def built_summary(summary: IndexSummary, trained: TrainedRef, shards: list[ShardRef], factory: str, dim: int,
                  metric: str) -> IndexSummary:
    index_bytes = sum(s.file.bytes or 0 for s in shards)
    live = sum(s.live for s in shards)
    return summary.model_copy(update=dict(
        factory=factory, dim=dim, metric=metric, train_points=trained.train_points, shards=len(shards),
        index_bytes=index_bytes, index_bytes_per_vector=index_bytes / max(1, live), flat_float32_bytes_per_vector=4 * dim))


def publish_version(build: VersionBuild, plan: Plan, embedded: Embedded, content: VersionContent) -> IndexSummary:
    """Train and fill the shards of a version made of its own parts (the index job), write stats.json
    and the manifest, publish; then collect garbage if the config keeps a bounded number of versions."""
    cfg, version, parts = build.cfg, build.folder, embedded.parts
    counts = Counts(seen=plan.seen, indexed=sum(s.indexed for s in parts.values()),
                    failed=plan.list_failures + sum(s.failed for s in parts.values()), skipped=sum(plan.skipped.values()))
    errors = Counter(plan.list_errors)
    for s in parts.values():
        errors.update(s.errors)
    summary = index_summary(build, plan, embedded, content, counts, errors)
    if counts.indexed == 0:
        write_contract(version, summary, "stats.json")
        raise JobError(f"no image could be indexed ({counts.failed} failed, {counts.skipped} skipped); "
                       f"see {redact(version.uri)}/failures/ — nothing was published")
    dim = max(s.dim for s in parts.values())
    factory = content.factory or (cfg.index.factory if cfg.index.factory != "auto" else default_factory(counts.indexed, dim))
    with build.stage("train_add"):
        trained, shards = build_index(build, parts, factory)
    summary = built_summary(summary, trained, shards, factory, dim, cfg.index.metric)
    order = sorted(parts)
    manifest = Manifest(
        version=build.name, parent=build.index.read_json("versions", build.name, "run.json").get("parent"),
        model=content.model, preprocessing=content.prep, source=content.source, dim=dim, metric=cfg.index.metric,
        factory=factory, nprobe=cfg.index.nprobe, rescore=cfg.index.rescore, counts=counts,
        trained_on=content.trained_on if content.factory else counts.indexed,
        trained=trained.file, shards=shards, embeddings=part_refs(build.name, parts, order, "embeddings"),
        catalog=part_refs(build.name, parts, order, "catalog"),
        failures=[listing_failures(build, plan)] + part_refs(build.name, parts, order, "failures"),
        update=content.update, key_buckets=plan.key_buckets, keys=plan.keys, key_removed=plan.key_removed,
        containers=plan.containers, loose_keys=plan.loose_keys,
        failed_parts=sorted(p for p, s in parts.items() if s.failed),  # the next update reads only their failures
    )
    return publish_manifest(build, manifest, summary)


def listing_failures(build: VersionBuild, plan: Plan) -> FileRef:
    return plan.listing_failures or FileRef(path=version_file(build.name, "failures", "listing.parquet"))


def publish_manifest(build: VersionBuild, manifest: Manifest, summary: IndexSummary) -> IndexSummary:
    """Check that every referenced file is there as written, write stats.json, the manifest, LATEST; then
    collect garbage (by reference) if the config keeps a bounded number of versions."""
    cfg = build.cfg
    with build.stage("publish"):
        problems = check_present(build.index, manifest.files())
        if problems:  # e.g. a part deleted or overwritten under the job: never publish a version that does not verify
            raise JobError(f"not publishing {build.name}: {len(problems)} referenced file(s) do not verify: "
                           + "; ".join(problems[:5]))
        build.lock.renew()
        write_contract(build.folder, _finished(summary, build), "stats.json")
        publish(build.index, manifest)
        if cfg.index.keep_versions:
            deleted = collect_garbage(build.index, cfg.index.keep_versions, leased_versions(build.index))["deleted"]
            summary = summary.model_copy(update={"garbage_collected": deleted})
    return _finished(summary.model_copy(update={"published": True}), build)


def part_refs(version_name: str, parts: dict[int, PartStats], order: list[int], kind: str) -> list[FileRef]:
    """The parts' files of one kind as their writers recorded them (with checksums), in `order`."""
    refs = part_refs_by_number(version_name, {p: parts[p] for p in order}, kind)
    return [refs[p] for p in order]


def _finished(summary: IndexSummary, build: VersionBuild) -> IndexSummary:
    retries = summary.storage_retries.model_copy(update={"driver": build.retries.count()})
    return summary.model_copy(update={"stage_seconds": {k: round(v, 3) for k, v in build.stages.items()},
                                      "wall_seconds": round(time.time() - build.started, 3), "storage_retries": retries})

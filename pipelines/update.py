"""Nightly update: the new version costs what changed; everything else is referenced.

1. The diff (`make_update_plan`, in Ray tasks, bucket by bucket of the key index): tar / Parquet
   containers whose etag and size are unchanged are not opened; added and changed images are cut
   into parts numbered from the live `next_part`; deleted and changed live rows are listed as
   `removed` (image_id, part). Images that failed last time are retried as added.
2. Only the new parts are decoded and embedded, with the live manifest's model and preprocessing.
3. The manifest references the live version's shards, parts, trained index and model files where
   they are. Removed rows become tombstones of the shards holding their parts (readers filter
   them out); the new parts go into delta shard(s) built on the live trained index.
4. Compaction: a shard whose tombstoned share passes `index.compact_fraction` (every shard with
   tombstones, with `--compact`) is rebuilt without them, its affected parts rewritten into the new
   version's folder under the same numbers; small delta shards are merged once there are more than
   `index.max_delta_shards`. Past `retrain_factor` (or with `--retrain`) the index is retrained and
   every shard rebuilt, compacted.
The version is published like any other (manifest last, then LATEST). A run that finds nothing to
change publishes nothing.
"""

from __future__ import annotations

import time
from collections import Counter

from mllm_index.configs.schema import ConfigError, IndexJobConfig, UpdateOptions
from mllm_index.pipelines.build import (Embedded, JobError, VersionBuild, VersionContent, build_index, build_shards,
                                        built_summary, embed_todo, index_summary, listing_failures, publish_manifest)
from mllm_index.pipelines.index import check_roots, source_spec
from mllm_index.pipelines.listing import make_update_plan
from mllm_index.pipelines.summaries import IndexSummary, UpdateSummary
from mllm_index.pipelines.update_shards import (compact_parts, count_rows, merge_tombstones, part_files, plan_shards,
                                                small_deltas, stats_files)
from mllm_index.storage.contracts import Counts, Manifest, PartStats, Plan, SourceInfo, TrainedRef, version_file
from mllm_index.storage.faiss_store import default_factory
from mllm_index.storage.lock import IndexLock
from mllm_index.storage.uris import Location, redact
from mllm_index.storage.versions import begin_version, fingerprint, read_latest, read_manifest


def run_update(cfg: IndexJobConfig, options: UpdateOptions | None = None) -> UpdateSummary:
    """Update the live version of cfg.index.uri from cfg.source.uri; returns the summary (published or not)."""
    for field, uri in (("source.uri", cfg.source.uri), ("index.uri", cfg.index.uri)):
        if not uri:
            raise ConfigError(f"missing required setting: {field}")
    index = check_roots(cfg)
    with IndexLock(index, "mllm-index update", cfg.index.lock_ttl) as lock:
        return _update_locked(cfg, index, lock, options or UpdateOptions())


def _update_locked(cfg: IndexJobConfig, index: Location, lock: IndexLock, options: UpdateOptions) -> UpdateSummary:
    t0 = time.time()
    live = read_latest(index)
    if live is None:
        raise JobError(f"{redact(index.uri)} has no published version to update; build one with `mllm-index index`")
    manifest = read_manifest(index, live)
    if manifest.model is None:
        raise JobError(f"{redact(index.uri)} {live} was published from precomputed vectors (no model): it cannot be updated from images")
    if cfg.model.name and cfg.model.name != manifest.model.name:
        raise ConfigError(f"model.name: the live version {live} was built with {manifest.model.name!r}; a different model "
                          "needs a full rebuild: run `mllm-index index` into a new index (or the same one) instead")
    spec = source_spec(cfg)
    settings = {"update_of": live, "source": cfg.source.model_dump(), "part_size": cfg.run.part_size,
                "retrain": options.retrain, "compact": options.compact}
    name, resumed = begin_version(index, fingerprint(settings), settings)
    build = VersionBuild(index, name, resumed, cfg, lock, started=t0)

    with build.stage("list_diff"):
        plan = make_update_plan(build.folder, spec, cfg.run.part_size, version_file(name), index, manifest,
                                cfg.run.key_bucket_rows)
    changes = plan.update
    compact_due = options.compact and (any(s.tombstoned for s in manifest.shards)
                                       or len(small_deltas(manifest.shards, cfg.index.shard_size)) > 1)
    if not (changes.added or changes.changed or changes.deleted or options.retrain or compact_due):
        build.folder.delete()  # nothing to publish: the live version already is the gallery
        return UpdateSummary(live_before=live, update=changes, published=False,
                             stage_seconds={k: round(v, 3) for k, v in build.stages.items()},
                             wall_seconds=round(time.time() - t0, 3))

    source = SourceInfo(uri=redact(spec.location().uri), format=cfg.source.format)
    content = VersionContent(manifest.model, manifest.preprocessing, source, factory=manifest.factory,
                             trained_on=manifest.trained_on, update=changes, live_before=live)
    embedded = embed_todo(build, plan, content)
    built = publish_update(build, plan, embedded, content, manifest, options)
    return UpdateSummary(live_before=live, update=changes, published=True, build=built,
                         stage_seconds=built.stage_seconds, wall_seconds=built.wall_seconds)


def publish_update(build: VersionBuild, plan: Plan, embedded: Embedded, content: VersionContent, live: Manifest,
                   options: UpdateOptions) -> IndexSummary:
    """Tombstones, delta shards and compaction (or a retrain), then the manifest of references."""
    cfg, index = build.cfg, build.index
    missing = [p for p in plan.part_numbers if p not in embedded.parts]
    if missing:
        raise JobError(f"parts {missing[:10]} of {build.name} have no marker; re-run the update to finish them")
    new = {p: embedded.parts[p] for p in plan.part_numbers}
    files = part_files(live)
    files.update({p: stats_files(build.name, s) for p, s in new.items()})
    with build.stage("tombstones"):
        shards = merge_tombstones(index, build.name, live.shards, plan.removed)
    total = sum(s.live for s in shards) + sum(s.indexed for s in new.values())
    retrain = options.retrain or total > options.retrain_factor * live.trained_on
    if retrain:
        trained, final, factory = _retrain(build, shards, files, new, live, total)
    else:
        trained, final, factory = _deltas(build, shards, files, new, live, options.compact)
    counts = Counts(seen=plan.seen, indexed=sum(s.live for s in final),
                    failed=plan.list_failures + sum(s.failed for s in new.values()), skipped=sum(plan.skipped.values()))
    errors = Counter(plan.list_errors)
    for s in new.values():
        errors.update(s.errors)
    summary = index_summary(build, plan, embedded, content, counts, errors).model_copy(update={"retrained": retrain})
    if counts.indexed == 0:
        raise JobError(f"no image would be searchable in {build.name} ({counts.failed} failed, {counts.skipped} skipped); "
                       f"see {redact(build.folder.uri)}/failures/ — nothing was published")
    summary = built_summary(summary, trained, final, factory, live.dim, live.metric)
    order = sorted(p for s in final for p in s.parts)
    manifest = Manifest(
        version=build.name, parent=build.folder.read_json("run.json").get("parent"), model=content.model,
        preprocessing=content.prep, source=content.source, dim=live.dim, metric=live.metric, factory=factory,
        nprobe=cfg.index.nprobe, rescore=cfg.index.rescore, counts=counts,
        trained_on=total if retrain else live.trained_on, trained=trained.file, shards=final,
        embeddings=[files[p]["embeddings"] for p in order], catalog=[files[p]["catalog"] for p in order],
        # Failures are this run's: images that failed before were retried (listed again as added).
        failures=[listing_failures(build, plan)] + [new[p].files.get("failures") or files[p]["failures"]
                                                    for p in sorted(new)],
        update=content.update, key_buckets=plan.key_buckets, keys=plan.keys, key_removed=plan.key_removed,
        containers=plan.containers, loose_keys=plan.loose_keys,
        failed_parts=sorted(p for p, s in new.items() if s.failed),  # the next update reads only their failures
    )
    return publish_manifest(build, manifest, summary)


def _deltas(build: VersionBuild, shards, files, new: dict[int, PartStats], live: Manifest, compact_all: bool):
    """Without retraining: live shards referenced (compacted past the fraction), new parts in delta shards
    on the live trained index, small deltas merged past max_delta_shards."""
    cfg = build.cfg
    plan = plan_shards(shards, {p: s.indexed for p, s in new.items()}, cfg.index.shard_size, cfg.run.part_size,
                       cfg.index.compact_fraction, cfg.index.max_delta_shards, compact_all)
    with build.stage("compact"):
        files.update(compact_parts(build.index, build.name, plan.compact + plan.merged, files))
    refs = {p: f["embeddings"] for p, f in files.items()}
    catalogs = {p: f["catalog"] for p, f in files.items()}
    groups = {**{s.shard: list(s.parts) for s in plan.compact}, **plan.groups}  # compacted and new: one wave
    deltas = {s.shard for s in plan.compact if s.delta} | set(plan.groups)
    with build.stage("train_add"):
        built = build_shards(build, groups, refs, catalogs, live.trained, deltas)
    final = sorted(plan.keep + list(built.values()), key=lambda s: s.shard)
    return TrainedRef(file=live.trained), final, live.factory


def _retrain(build: VersionBuild, shards, files, new: dict[int, PartStats], live: Manifest, total: int):
    """Past retrain_factor (or on request): every part without its tombstoned rows, a new training, every
    shard rebuilt."""
    cfg = build.cfg
    with build.stage("compact"):
        kept = compact_parts(build.index, build.name, shards, files)
        rows = count_rows(build.index, {p: f["embeddings"] for p, f in kept.items()})
    parts = {p: PartStats(part=p, rows=rows[p], indexed=rows[p], failed=0, dim=live.dim, files=f) for p, f in kept.items()}
    parts.update({p: s.model_copy(update={"files": files[p]}) for p, s in new.items()})
    files.update(kept)
    factory = cfg.index.factory if cfg.index.factory != "auto" else default_factory(total, live.dim)
    with build.stage("train_add"):
        trained, final = build_index(build, parts, factory)
    return trained, final, factory

"""Nightly update: embed only what changed since the live version, publish a new self-contained one.

1. List the source and diff it against the live catalog by key: added, changed (etag or
   size differs), deleted, unchanged. Images that failed last time are not in the catalog,
   so they are retried as "added".
2. The new version's own parts hold the added and changed images: only those are decoded
   and embedded, with the live manifest's model and preprocessing.
3. The live version's catalog and embeddings parts are carried over as further parts of
   the new version, without the deleted and changed ids (a file copy, no re-embedding).
4. Shards are rebuilt from all parts on a copy of the live trained index, or retrained
   from the stored vectors when the gallery grew past `retrain_factor` since the last
   training (or on request). The new version is published like any other (manifest last,
   then LATEST), so every version stays complete on its own and old ones can be deleted.
A run that finds nothing to change publishes nothing.
"""

from __future__ import annotations

import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_index.configs.schema import ConfigError, IndexJobConfig, UpdateOptions
from mllm_index.pipelines.build import (JobError, VersionBuild, VersionContent, embed_todo, lost_parts,
                                        publish_version, write_part_files)
from mllm_index.pipelines.index import check_roots, source_spec
from mllm_index.pipelines.parts import finished_parts, list_entries, read_plan, write_plan
from mllm_index.pipelines.summaries import UpdateSummary
from mllm_index.storage.catalog import FAILURE_SCHEMA
from mllm_index.storage.contracts import FileRef, Manifest, PartStats, SourceInfo, UpdateCounts, version_file, write_contract
from mllm_index.storage.lock import IndexLock
from mllm_index.storage.integrity import read_verified, read_verified_parquet, write_ref
from mllm_index.storage.shard_store import copy_trained, part_file, trained_ref
from mllm_index.storage.uris import Location, redact
from mllm_index.storage.versions import begin_version, fingerprint, read_latest, read_manifest


def diff(entries: pa.Table, live: pa.Table) -> tuple[pa.Table, np.ndarray, UpdateCounts]:
    """(entries to embed: added + changed, ids to drop: deleted + changed, counts)."""
    before = {k: (e, n, i) for k, e, n, i in zip(live.column("key").to_pylist(), live.column("etag").to_pylist(),
                                                 live.column("length").to_pylist(), live.column("image_id").to_pylist())}
    keys, etags, lengths = (entries.column(c).to_pylist() for c in ("key", "etag", "length"))
    added = [k not in before for k in keys]
    changed = [k in before and (before[k][0], before[k][1]) != (e, n) for k, e, n in zip(keys, etags, lengths)]
    present = set(keys)
    deleted = [i for k, (_, _, i) in before.items() if k not in present]
    removed = np.array(deleted + [before[k][2] for k, c in zip(keys, changed) if c], np.int64)
    todo = entries.filter(pa.array([a or c for a, c in zip(added, changed)]))
    counts = UpdateCounts(added=sum(added), changed=sum(changed), deleted=len(deleted),
                          unchanged=len(keys) - sum(added) - sum(changed))
    return todo, removed, counts


def carry_over(index: Location, manifest: Manifest, name: str, first_part: int, removed: np.ndarray,
               done: set[int]) -> None:
    """Copy the live parts (verified) into the new version as parts first_part.., without the removed ids."""
    version = index.child("versions", name)
    drop = pa.array(removed, pa.int64())
    for j, (catalog, embeddings) in enumerate(zip(manifest.catalog, manifest.embeddings)):
        part = first_part + j
        if part in done:
            continue  # done before an interruption
        kept = {}
        for kind, ref in (("catalog", catalog), ("embeddings", embeddings)):
            table = read_verified_parquet(index, ref)
            kept[kind] = table.filter(pc.invert(pc.is_in(table.column("image_id"), value_set=drop)))
        kept["failures"] = pa.Table.from_pylist([], schema=FAILURE_SCHEMA)
        files = write_part_files(index, name, part, kept)
        rows = kept["embeddings"].num_rows
        write_contract(version, PartStats(part=part, rows=rows, indexed=rows, failed=0, dim=manifest.dim,
                                          carried_from=catalog.path, files=files), "stats", part_file(part, "json"))


def copy_model_files(index: Location, manifest: Manifest, name: str) -> dict[str, FileRef]:
    """The embedder's per-version files, copied into the new version so that it stands alone."""
    files = {}
    for key, ref in manifest.model.files.items():
        path = version_file(name, posixpath.relpath(ref.path, version_file(manifest.version)))
        files[key] = write_ref(index, path, read_verified(index, ref))
    return files


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
    settings = {"update_of": live, "source": cfg.source.model_dump(), "part_size": cfg.run.part_size, "retrain": options.retrain}
    name, resumed = begin_version(index, fingerprint(settings), settings)
    build = VersionBuild(index, name, resumed, cfg, lock, started=t0)

    with build.stage("list_diff"):
        plan = read_plan(build.folder)
        if plan is not None:
            removed = build.folder.read_parquet("update", "removed.parquet").column("image_id").to_numpy()
        else:
            entries, failures, skipped = list_entries(spec)
            live_catalog = pa.concat_tables([read_verified_parquet(index, ref, columns=["image_id", "key", "etag", "length"])
                                             for ref in manifest.catalog])
            todo, removed, counts = diff(entries, live_catalog)
            build.folder.write_parquet(pa.table({"image_id": pa.array(removed, pa.int64())}), "update", "removed.parquet")
            plan = write_plan(build.folder, todo, failures, skipped, cfg.run.part_size, update=counts,
                              seen=entries.num_rows + len(failures) + sum(skipped.values()), ref_prefix=version_file(name))
    changes = plan.update
    if not (changes.added or changes.changed or changes.deleted or options.retrain):
        build.folder.delete()  # nothing to publish: the live version already is the gallery
        return UpdateSummary(live_before=live, update=changes, published=False,
                             stage_seconds={k: round(v, 3) for k, v in build.stages.items()},
                             wall_seconds=round(time.time() - t0, 3))

    model = manifest.model.model_copy(update={"files": copy_model_files(index, manifest, name)})
    source = SourceInfo(uri=redact(spec.location().uri), format=cfg.source.format)
    content = VersionContent(model, manifest.preprocessing, source, update=changes, live_before=live)
    embedded = embed_todo(build, plan, content)
    with build.stage("carry_over"):
        finished = finished_parts(build.folder, PartStats)
        carry_over(index, manifest, name, plan.parts, removed, set(finished) - lost_parts(build, finished))
    embedded.parts = finished_parts(build.folder, PartStats)  # own parts and carried-over ones
    total = sum(s.indexed for s in embedded.parts.values())
    if not (options.retrain or total > options.retrain_factor * manifest.trained_on):
        if trained_ref(index, name) is None:
            copy_trained(index, manifest.trained, name)
        content = VersionContent(model, manifest.preprocessing, source, factory=manifest.factory,
                                 trained_on=manifest.trained_on, update=changes, live_before=live)
    built = publish_version(build, plan, embedded, content)
    return UpdateSummary(live_before=live, update=changes, published=True, build=built,
                         stage_seconds=built.stage_seconds, wall_seconds=built.wall_seconds)


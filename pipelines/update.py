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

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from configs.schema import ConfigError, IndexJobConfig
from pipelines.index import JobError, embed_todo, finish_version, source_spec
from pipelines.parts import finished_parts, list_entries, write_plan
from storage.catalog import FAILURE_SCHEMA
from storage.lock import IndexLock
from storage.shard_store import TRAINED, part_file
from storage.uris import Location, check_under_roots, redact
from storage.versions import begin_version, fingerprint, read_latest, read_manifest


def diff(entries: pa.Table, live: pa.Table) -> tuple[pa.Table, np.ndarray, dict]:
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
    counts = {"added": sum(added), "changed": sum(changed), "deleted": len(deleted),
              "unchanged": len(keys) - sum(added) - sum(changed)}
    return todo, removed, counts


def carry_over(index: Location, live: str, manifest: dict, version: Location, first_part: int, removed: np.ndarray) -> None:
    """Copy the live parts into the new version as parts first_part.., without the removed ids."""
    drop = pa.array(removed, pa.int64())
    for j, name in enumerate(manifest["catalog"]["parts"]):
        part = first_part + j
        if version.exists("stats", part_file(part, "json")):
            continue  # done before an interruption
        kept = {}
        for kind in ("catalog", "embeddings"):
            table = index.read_parquet("versions", live, kind, name)
            kept[kind] = table.filter(pc.invert(pc.is_in(table.column("image_id"), value_set=drop)))
            version.write_parquet(kept[kind], kind, part_file(part))
        version.write_parquet(pa.Table.from_pylist([], schema=FAILURE_SCHEMA), "failures", part_file(part))
        rows = kept["embeddings"].num_rows
        version.write_json({"part": part, "rows": rows, "indexed": rows, "failed": 0, "errors": {}, "dim": manifest["dim"],
                            "carried_from": f"{live}/{name}"}, "stats", part_file(part, "json"))


def run_update(cfg: IndexJobConfig, retrain: bool = False, retrain_factor: float = 2.0) -> dict:
    """Update the live version of cfg.index.uri from cfg.source.uri; returns the summary (published or not)."""
    for field, uri in (("source.uri", cfg.source.uri), ("index.uri", cfg.index.uri)):
        if not uri:
            raise ConfigError(f"missing required setting: {field}")
        check_under_roots(uri, cfg.storage.allowed_roots, field)
    index = Location(cfg.index.uri, cfg.storage.options)
    with IndexLock(index, "mllm-index update", cfg.index.lock_ttl) as lock:
        return _update_locked(cfg, index, lock, retrain, retrain_factor)


def _update_locked(cfg: IndexJobConfig, index: Location, lock: IndexLock, retrain: bool, retrain_factor: float) -> dict:
    t0, stages = time.time(), {}
    live = read_latest(index)
    if live is None:
        raise JobError(f"{redact(index.uri)} has no published version to update; build one with `mllm-index index`")
    manifest = read_manifest(index, live)
    model = dict(manifest["model"])
    if cfg.model.name and cfg.model.name != model["name"]:
        raise ConfigError(f"model.name: the live version {live} was built with {model['name']!r}; a different model "
                          "needs a full rebuild: run `mllm-index index` into a new index (or the same one) instead")
    spec = source_spec(cfg)
    settings = {"update_of": live, "source": cfg.source.model_dump(), "part_size": cfg.run.part_size, "retrain": retrain}
    name, resumed = begin_version(index, fingerprint(settings), settings)
    version = index.child("versions", name)

    t = time.time()
    if version.exists("plan", "plan.json"):
        plan = version.read_json("plan", "plan.json")
        removed = version.read_parquet("update", "removed.parquet").column("image_id").to_numpy()
    else:
        entries, failures, skipped = list_entries(spec)
        live_catalog = pa.concat_tables([index.read_parquet("versions", live, "catalog", n, columns=["image_id", "key", "etag", "length"])
                                         for n in manifest["catalog"]["parts"]])
        todo, removed, counts = diff(entries, live_catalog)
        version.write_parquet(pa.table({"image_id": pa.array(removed, pa.int64())}), "update", "removed.parquet")
        plan = write_plan(version, todo, failures, skipped, cfg.run.part_size,
                          seen=entries.num_rows + len(failures) + sum(skipped.values()), extra={"update": counts})
    stages["list_diff"] = time.time() - t
    changes = plan["update"]
    if not (changes["added"] or changes["changed"] or changes["deleted"] or retrain):
        version.delete()  # nothing to publish: the live version already is the gallery
        return {"version": None, "live": live, "published": False, "update": changes,
                "stage_seconds": {k: round(v, 3) for k, v in stages.items()}, "wall_seconds": round(time.time() - t0, 3)}

    for key in ("codebook", "pca"):  # classic:sift-vlad: the live version's files, copied so the version stands alone
        if model.get(key):
            if not version.exists(model[key]):
                version.write_bytes(index.read_bytes("versions", live, model[key]), model[key])
            model[f"{key}_uri"] = f"{version.uri}/{model[key]}"
    _, processed, rates = embed_todo(version, plan, cfg, manifest["preprocessing"], model, lock, stages)
    t = time.time()
    carry_over(index, live, manifest, version, plan["parts"], removed)
    stages["carry_over"] = time.time() - t
    done = finished_parts(version)  # own parts and carried-over ones
    total = sum(s["indexed"] for s in done.values())
    trained_on = manifest.get("trained_on") or manifest["counts"]["indexed"]
    retrained = retrain or total > retrain_factor * trained_on
    factory = None if retrained else manifest["factory"]
    if not retrained and not version.exists(TRAINED):
        version.write_bytes(index.read_bytes("versions", live, TRAINED), TRAINED)
    summary = {"version": name, "resumed": resumed, "live_before": live, "published": True, "retrained": retrained,
               "update": changes, "trained_on": None if retrained else trained_on, "index_uri": redact(index.uri),
               "source_uri": redact(spec.location().uri), "images_processed_this_run": processed, **rates}
    return finish_version(index, name, cfg, plan, done, model, manifest["preprocessing"], stages, lock, t0, summary, factory)


def format_update(s: dict) -> str:
    from pipelines.index import format_summary

    u = s["update"]
    head = (f"update: added {u['added']}, changed {u['changed']}, deleted {u['deleted']}, unchanged {u['unchanged']}")
    if not s["published"]:
        return f"{head}\nnothing changed: no new version published; {s['live']} stays live ({s['wall_seconds']:.1f}s)"
    return f"{head}; {'retrained' if s['retrained'] else 'same trained index'}\n{format_summary(s)}"

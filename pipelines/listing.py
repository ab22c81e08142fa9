"""Listing a gallery and planning a run without a central table.

No process holds the gallery's entries. Ray tasks list loose files directory by directory and scan
tar / Parquet containers; each writes its entries to a listing file under the version's `listing/`
scratch folder and sends back only counts, sub-directory names, the containers it found and their
key ranges. Then a file shuffle by key hash: tasks read groups of listing files and split their rows
into one folder per key bucket; one task per bucket finds the bucket's duplicate keys (the first in
(uri, offset) order is kept, as `assign_ids` does for a whole listing; every row of a key is in one
bucket) and, for an update, diffs the bucket against the live key index; a last task per bucket cuts
the bucket's planned rows into `plan/part-NNNNN.parquet` and writes the bucket's key file
(pipelines.key_diff). An update of a gallery of containers reads and writes only what changed: the
key row groups a changed container or a listed key touches, a delta key file and a removed file per
bucket (storage.key_runs).

The driver holds the container list, listing-file names and per-bucket counts: O(containers +
buckets + parts). A task holds one directory level, one container, or one bucket (about
`run.key_bucket_rows` rows). `plan/plan.json` is written last; a re-run with it present reuses it, and
one without it starts the listing again (the scratch folder is cleared first, names are deterministic).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter, deque

import numpy as np
import pyarrow as pa
import ray

from mllm_index.pipelines.key_diff import FAILED_SCHEMA, IN_FLIGHT, SCRATCH, DiffContext, diff_buckets, remote, run_all
from mllm_index.pipelines.parts import PLAN, read_plan
from mllm_index.storage.catalog import ENTRY_SCHEMA, image_ids
from mllm_index.storage.contracts import FileRef, Manifest, Plan, UpdateCounts, write_contract
from mllm_index.storage.integrity import read_verified_parquet
from mllm_index.storage.key_index import (CONTAINER_SCHEMA, KEY_SCHEMA, bucket_file, bucket_of, containers_table, key_bucket,
                                          write_checksummed)
from mllm_index.storage.key_runs import BucketRuns, KeyLayout, runs_by_bucket
from mllm_index.storage.sources import SourceSpec, classify, classify_all, scan_container, source_info
from mllm_index.storage.retry import with_retries
from mllm_index.storage.tombstones import part_number
from mllm_index.storage.uris import Location, redact, redact_text

DIRS_PER_TASK = 16  # directories one listing task lists (a deep tree of small folders: fewer, larger tasks)
REBUCKET = 2  # an update re-buckets the key index once the gallery has this many times run.key_bucket_rows per bucket


# -- tasks --------------------------------------------------------------------------------------------
def _entries_table(rows: list[dict], source_uri: str) -> pa.Table:
    table = pa.Table.from_pylist([dict(r, image_id=0) for r in rows], schema=ENTRY_SCHEMA)
    ids = pa.array(image_ids(source_uri, table.column("key").to_pylist()), pa.int64())
    return table.set_column(0, "image_id", ids).sort_by([("uri", "ascending"), ("offset", "ascending")])


def _list_dirs(spec: SourceSpec, dest: Location, name: str, dirs: list[str]) -> dict:
    """One listing task: the files directly in `dirs`; loose images go to listing/entries/`name`."""
    loc = spec.location()
    subdirs, listed = [], []
    for folder in dirs:
        def ls(folder=folder) -> list[dict]:
            loc.fs.invalidate_cache(folder)
            return loc.fs.ls(folder, detail=True)

        for info in sorted(with_retries(ls, f"list {redact(loc.full_uri(folder))}", loc.retry), key=lambda i: i["name"]):
            path = info["name"].rstrip("/")
            if path == folder.rstrip("/"):
                continue  # an object store's folder marker
            if info.get("type") == "directory":
                subdirs.append(path)
            else:
                listed.append((path, info))
    rows, containers, skipped = classify_all(loc, spec, listed, True)
    if rows:
        dest.write_parquet(_entries_table(rows, loc.uri), SCRATCH, "entries", name)
    return {"file": name if rows else None, "rows": len(rows), "dirs": subdirs, "containers": containers, "skipped": skipped}


def _scan(spec: SourceSpec, dest: Location, name: str, uri: str, kind: str, etag: str) -> dict:
    """One container's entries to listing/entries/`name`; a container that cannot be read is one failures row."""
    try:
        found, skipped = scan_container(uri, kind, etag, spec)
    except Exception as exc:
        row = {"image_id": None, "uri": uri, "key": None, "stage": "list", "error_type": type(exc).__name__,
               "message": redact_text(str(exc))[:500]}
        return {"file": None, "rows": 0, "skipped": Counter(), "failure": row}
    if found:
        dest.write_parquet(_entries_table(found, spec.location().uri), SCRATCH, "entries", name)
    keys = [e["key"] for e in found]
    return {"file": name if found else None, "rows": len(found), "skipped": skipped, "failure": None,
            "min_key": min(keys, default=None), "max_key": max(keys, default=None)}


def _read_source(dest: Location, index: Location | None, mode: str, item, containers: set[str]) -> tuple[pa.Table, set[str]]:
    """Rows to shuffle, keyed by `key`: a listing file; a live catalog part (its key rows); a live failures part."""
    if mode == "entries":
        return dest.read_parquet(SCRATCH, "entries", item), set()
    if mode == "keys":  # one bucket of a key index being re-bucketed: its live rows
        return BucketRuns([FileRef.model_validate(f) for f in item[0]], [FileRef.model_validate(f) for f in item[1]]).live_rows(
            index, KEY_SCHEMA)[0], set()
    ref, part = FileRef.model_validate(item[0]), item[1]
    if mode == "catalog":
        table = read_verified_parquet(index, ref, columns=["key", "etag", "length", "image_id", "uri"])
        return table.append_column("part", pa.array(np.full(table.num_rows, part, np.int32))).cast(KEY_SCHEMA), set()
    table = read_verified_parquet(index, ref, columns=["image_id", "key", "uri", "stage"]).to_pylist()
    rows = [r for r in table if r["stage"] != "list" and r["key"] is not None and r["image_id"] is not None]
    out = pa.Table.from_pylist([{"key": r["key"], "image_id": r["image_id"], "part": part} for r in rows], schema=FAILED_SCHEMA)
    return out, {r["uri"] for r in rows} & containers


def _scatter(dest: Location, index: Location | None, mode: str, items: list, buckets: int, folder: str, group: int,
             containers: set[str]) -> list[str]:
    """One shuffle task: rows of `items`, split by key bucket into listing/`folder`/bucket-B/g-GGGGG.parquet."""
    tables, touched = [], set()
    for item in items:
        table, uris = _read_source(dest, index, mode, item, containers)
        tables.append(table)
        touched |= uris
    table = pa.concat_tables(tables) if tables else pa.table({})
    if table.num_rows:
        which = key_bucket(table.column("key"), buckets)
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(buckets + 1))
        table = table.take(pa.array(order))
        for b in np.flatnonzero(np.diff(bounds)):
            chunk = table.slice(int(bounds[b]), int(bounds[b + 1] - bounds[b]))
            dest.write_parquet(chunk, SCRATCH, folder, bucket_file(int(b))[:-8], f"g-{group:05d}.parquet")
    return sorted(touched)


# -- driver ---------------------------------------------------------------------------------------------
def _name(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:20]}.parquet"


def _walk(dest: Location, spec: SourceSpec) -> tuple[list[tuple[str, int]], list[tuple], Counter]:
    """(listing files of loose images with their row counts, containers (uri, kind, etag, size), skipped)."""
    loc = spec.location()
    info = source_info(loc)
    if info.get("type") != "directory":  # a single file
        what, item = classify(loc, spec, loc.root, info, False)
        if what == "file":
            dest.write_parquet(_entries_table([item], loc.uri), SCRATCH, "entries", "single.parquet")
        return ([("single.parquet", 1)] if what == "file" else [], [item] if what == "container" else [],
                Counter([item] if what == "skip" else []))
    task = remote(_list_dirs)
    files, containers, skipped = [], [], Counter()
    pending, inflight = deque([loc.root]), {}
    while pending or inflight:
        while pending and len(inflight) < IN_FLIGHT:
            batch = [pending.popleft() for _ in range(min(DIRS_PER_TASK, len(pending)))]
            name = _name("d", "\n".join(batch))
            inflight[task.remote(spec, dest, name, batch)] = name
        done, _ = ray.wait(list(inflight), num_returns=1)
        inflight.pop(done[0])
        found = ray.get(done[0])
        if found["file"]:
            files.append((found["file"], found["rows"]))
        containers += found["containers"]
        skipped.update(found["skipped"])
        pending.extend(found["dirs"])
    return sorted(files), sorted(containers), skipped


def _groups(items: list, sizes: list[int], limit: int) -> list[list]:
    """Consecutive items, grouped so that a group's sizes sum to at most `limit` (one item at least)."""
    groups, current, total = [], [], 0
    for item, size in zip(items, sizes):
        if current and total + size > limit:
            groups.append(current)
            current, total = [], 0
        current.append(item)
        total += size
    return groups + ([current] if current else [])


def _shuffle(dest: Location, index: Location | None, mode: str, items: list, sizes: list[int], buckets: int,
             folder: str, limit: int, containers: set[str] = frozenset()) -> set[str]:
    task = remote(_scatter)
    known = ray.put(set(containers))
    groups = _groups(items, sizes, limit)
    touched = run_all(lambda g=g, i=i: task.remote(dest, index, mode, g, buckets, folder, i, known) for i, g in enumerate(groups))
    return {u for t in touched for u in t}


def _scan_all(dest: Location, spec: SourceSpec, containers: list[tuple]) -> tuple[list[tuple[str, int]], list[dict], Counter, list[dict]]:
    """(listing files, containers table rows, skipped, failures) of the containers, scanned in tasks."""
    task = remote(_scan)
    found = run_all(lambda c=c: task.remote(spec, dest, _name("c", c[0]), c[0], c[1], c[2]) for c in containers)
    files = [(f["file"], f["rows"]) for f in found if f["file"]]
    rows = [dict(uri=c[0], kind=c[1], etag=c[2], size=c[3], entries=f["rows"], skipped=f["skipped"], min_key=f["min_key"],
                 max_key=f["max_key"]) for c, f in zip(containers, found) if f["failure"] is None]
    skipped = sum((Counter(f["skipped"]) for f in found), Counter())
    return files, rows, skipped, [f["failure"] for f in found if f["failure"]]


def _finish(dest: Location, plan: Plan, record: dict) -> Plan:
    dest.write_json(record, "plan", "listing.json")  # what the listing did: containers scanned, timings
    write_contract(dest, plan, "plan", PLAN)  # last: the plan's done marker
    dest.delete(SCRATCH)
    return plan


def make_index_plan(dest: Location, spec: SourceSpec, part_size: int, ref_prefix: str, bucket_rows: int,
                    layout: KeyLayout = KeyLayout()) -> Plan:
    """List the source in Ray tasks and cut it into parts; the version's key index and container table.

    `dest` is the version folder (index/`ref_prefix`). The number of key buckets is fixed here for the
    lineage: max(1, ceil(entries listed / bucket_rows)).
    """
    return read_plan(dest) or _plan(dest, spec, part_size, ref_prefix, bucket_rows, None, None, layout)


def make_update_plan(dest: Location, spec: SourceSpec, part_size: int, ref_prefix: str, index: Location, live: Manifest,
                     bucket_rows: int, layout: KeyLayout = KeyLayout()) -> Plan:
    """The nightly diff against the live version, bucket by bucket; parts numbered from `live.next_part`.

    Containers whose (uri, etag, size) equal a row of the live container table are not opened (unless
    an image of theirs failed last time: it is retried). A live version without key index (format 1/2)
    gets one built from its catalog parts, in tasks.
    """
    return read_plan(dest) or _plan(dest, spec, part_size, ref_prefix, bucket_rows, index, live, layout)


def _diff_context(dest: Location, index: Location | None, ref_prefix: str, live: Manifest | None, live_table: dict,
                  unchanged: set[str], loose: int, layout: KeyLayout) -> DiffContext:
    """Whether this run can diff by deltas (storage.key_runs), and the key ranges of changed and gone containers.

    Not with loose files, listed now or live before (a deleted loose file is found only by reading every
    live key), nor when a changed container's key range was not recorded (a table from an older release)."""
    ranges, delta = [], live is not None and bool(live.key_buckets) and live.loose_keys == 0 and loose == 0
    for uri, row in live_table.items():
        if uri in unchanged or not row.get("entries"):
            continue
        if row.get("min_key") is None or row.get("max_key") is None:
            delta = False
            break
        ranges.append((row["min_key"], row["max_key"]))
    return DiffContext(dest=dest, index=index, ref_prefix=ref_prefix, unchanged=pa.array(sorted(unchanged), pa.string()), delta=delta,
                       layout=layout, ranges=sorted(ranges) if delta else [])


def _plan(dest: Location, spec: SourceSpec, part_size: int, ref_prefix: str, bucket_rows: int, index: Location | None,
          live: Manifest | None, layout: KeyLayout) -> Plan:
    t0 = time.time()
    dest.delete(SCRATCH)  # an interrupted listing's scratch: started again
    seconds = {}
    files, containers, skipped = _walk(dest, spec)
    seconds["walk"] = time.time() - t0
    live_table = {}
    if live is not None and live.containers is not None:
        live_table = {r["uri"]: r for r in read_verified_parquet(index, live.containers).to_pylist()}
    buckets = live.key_buckets if live is not None and live.key_buckets else 0
    limit = max(1, bucket_rows)
    failed_containers: set[str] = set()
    runs = runs_by_bucket(live.keys, live.key_removed, bucket_of) if live is not None else {}
    scratch = False  # the live key rows are shuffled into listing/live/ (a new key index is written whole)
    if live is not None and not buckets:
        buckets, scratch = max(1, math.ceil(live.counts.seen / limit)), True
        refs = [(r.model_dump(), part_number(r)) for r in live.catalog]
        _shuffle(dest, index, "catalog", refs, [part_size] * len(refs), buckets, "live", limit)
    elif live is not None and live.counts.seen > REBUCKET * buckets * limit:  # the gallery outgrew its buckets
        old, buckets, scratch = runs, max(1, math.ceil(live.counts.seen / limit)), True
        items = [([f.model_dump() for f in r.files], [f.model_dump() for f in r.removed]) for r in old.values()]
        _shuffle(dest, index, "keys", items, [limit] * len(items), buckets, "live", limit)
        runs = {}
    if live is not None and not (scratch and not live.key_buckets):  # failed images are retried (a key index has them)
        failed_parts = None if live.failed_parts is None else set(live.failed_parts)  # None: not recorded, read all
        refs = [(r.model_dump(), part_number(r)) for r in live.failures
                if r.name.startswith("part-") and (failed_parts is None or part_number(r) in failed_parts)]
        failed_containers = _shuffle(dest, index, "failed", refs, [part_size] * len(refs), buckets, "failed", limit,
                                     set(live_table))
    loose = sum(n for _, n in files)
    unchanged = {c[0] for c in containers if c[0] not in failed_containers and c[0] in live_table
                 and (live_table[c[0]]["etag"], live_table[c[0]]["size"]) == (c[2], c[3])}
    scanned = [c for c in containers if c[0] not in unchanged]
    found, rows, found_skipped, scan_failures = _scan_all(dest, spec, scanned)
    seconds["scan"] = time.time() - t0 - seconds["walk"]
    files = sorted(files + found)
    rows += [live_table[u] for u in sorted(unchanged)]
    for u in unchanged:
        skipped.update(json.loads(live_table[u]["skipped"] or "{}"))
    skipped.update(found_skipped)
    listed = sum(n for _, n in files)
    buckets = buckets or max(1, math.ceil(listed / limit))
    if buckets > 1:
        _shuffle(dest, None, "entries", [f for f, _ in files], [n for _, n in files], buckets, "buckets", limit)
    first = live.next_part if live is not None else 0
    ctx = _diff_context(dest, index, ref_prefix, live, live_table, unchanged, loose, layout)
    result = diff_buckets(ctx, buckets, first, part_size, runs, scratch, [f for f, _ in files], scan_failures)
    diffs = result.diffs
    seconds["buckets"] = time.time() - t0 - seconds["walk"] - seconds["scan"]
    containers_ref = write_checksummed(dest, ref_prefix, containers_table(rows).cast(CONTAINER_SCHEMA), "containers.parquet")
    total = {k: sum(d[k] for d in diffs) for k in ("added", "changed", "deleted", "unchanged", "duplicates", "todo")}
    errors = Counter(f["error_type"] for f in scan_failures) + Counter({"duplicate_key": total["duplicates"]})
    list_failures = len(scan_failures) + total["duplicates"]
    update = None if live is None else UpdateCounts(**{k: total[k] for k in ("added", "changed", "deleted", "unchanged")})
    plan = Plan(listing_failures=result.listing, parts=result.parts, entries=total["todo"], skipped=dict(skipped),
                list_failures=list_failures, list_errors=dict(errors), update=update, first_part=first,
                seen=total["todo"] + total["unchanged"] + list_failures + sum(skipped.values()),
                key_buckets=buckets, keys=result.keys, key_removed=result.key_removed, containers=containers_ref,
                loose_keys=loose,
                removed=sorted((FileRef.model_validate(d["removed"]) for d in diffs if "removed" in d), key=bucket_of))
    seconds["total"] = time.time() - t0
    modes = Counter(d["mode"] for d in diffs)
    record = {"scanned": [c[0] for c in scanned], "unchanged": len(unchanged), "listing_files": len(files),
              "listed": listed, "buckets": buckets, "bucket_modes": dict(modes),
              "key_row_groups_read": sum(max(0, d["row_groups"]) for d in diffs), "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    return _finish(dest, plan, record)

"""Listing a gallery and planning a run without a central table.

No process holds the gallery's entries. Ray tasks list loose files directory by directory and scan
tar / Parquet containers; each writes its entries to a listing file under the version's `listing/`
scratch folder and sends back only counts, sub-directory names and the containers it found. Then a
file shuffle by key hash: tasks read groups of listing files and split their rows into one folder per
key bucket; one task per bucket finds the bucket's duplicate keys (the first in (uri, offset) order is
kept, as `assign_ids` does for a whole listing; every row of a key is in one bucket) and, for an
update, diffs the bucket against the live key index; a last task per bucket cuts the bucket's
planned rows into `plan/part-NNNNN.parquet` and writes the version's `keys/bucket-BBBBB.parquet`.

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
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import ray

from mllm_index.pipelines.parts import PLAN, read_plan
from mllm_index.storage.catalog import ENTRY_SCHEMA, FAILURE_SCHEMA, image_ids
from mllm_index.storage.contracts import FileRef, Manifest, Plan, UpdateCounts, write_contract
from mllm_index.storage.integrity import read_verified_parquet
from mllm_index.storage.key_index import (CONTAINER_SCHEMA, KEY_SCHEMA, NEXT_SCHEMA, bucket_file, bucket_of, containers_table,
                                          diff_bucket, drop_failed, key_bucket, refs_by_bucket, write_checksummed,
                                          write_key_bucket)
from mllm_index.storage.shard_store import part_file
from mllm_index.storage.sources import SourceSpec, classify, classify_all, scan_container, source_info
from mllm_index.storage.retry import with_retries
from mllm_index.storage.tombstones import part_number
from mllm_index.storage.uris import Location, redact, redact_text

SCRATCH = "listing"
DIRS_PER_TASK = 16  # directories one listing task lists (a deep tree of small folders: fewer, larger tasks)
IN_FLIGHT = 256  # tasks submitted and not yet finished, so that the driver's queue stays small
TASK_CPUS = 0.5
FAILED_SCHEMA = pa.schema([("key", pa.string()), ("image_id", pa.int64()), ("part", pa.int32())])


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
    return {"file": name if found else None, "rows": len(found), "skipped": skipped, "failure": None}


def _read_source(dest: Location, index: Location | None, mode: str, item, containers: set[str]) -> tuple[pa.Table, set[str]]:
    """Rows to shuffle, keyed by `key`: a listing file; a live catalog part (its key rows); a live failures part."""
    if mode == "entries":
        return dest.read_parquet(SCRATCH, "entries", item), set()
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


def _read_bucket(dest: Location, folder: str, bucket: int, schema: pa.Schema) -> pa.Table:
    names = [n for n in dest.list_names(SCRATCH, folder, bucket_file(bucket)[:-8]) if n.endswith(".parquet")]
    tables = [dest.read_parquet(SCRATCH, folder, bucket_file(bucket)[:-8], n).cast(schema) for n in names]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _diff(dest: Location, index: Location | None, ref_prefix: str, bucket: int, live_ref: dict | None, live_scratch: bool,
          unchanged: set[str], direct: dict | None = None) -> dict:
    """One bucket: duplicates found, diffed against the live key rows (none for a first build), next rows saved.

    `direct` (a gallery of one bucket): read the listing files themselves (no shuffle), then cut the parts
    from `first_part` and write failures/listing.parquet in this same task: one task instead of four waves.
    """
    if direct is not None:
        tables = [dest.read_parquet(SCRATCH, "entries", name).cast(ENTRY_SCHEMA) for name in direct["files"]]
        listed = pa.concat_tables(tables) if tables else ENTRY_SCHEMA.empty_table()
    else:
        listed = _read_bucket(dest, "buckets", bucket, ENTRY_SCHEMA)
    if live_ref:
        live = read_verified_parquet(index, FileRef.model_validate(live_ref)).cast(KEY_SCHEMA)
    else:
        live = _read_bucket(dest, "live", bucket, KEY_SCHEMA) if live_scratch else KEY_SCHEMA.empty_table()
    before = live.num_rows
    live = drop_failed(live, _read_bucket(dest, "failed", bucket, FAILED_SCHEMA))
    next_rows, removed, failures, counts = diff_bucket(listed, live, unchanged)
    rewrite = not live_ref or before > live.num_rows or bool(counts["added"] or counts["changed"] or counts["deleted"])
    counts["rewrite"] = bool(rewrite and next_rows.num_rows)
    counts["keep_live"] = not rewrite  # the live bucket file is this version's too: referenced, not rewritten
    counts["todo"] = counts["added"] + counts["changed"]
    if removed.num_rows:
        counts["removed"] = write_checksummed(dest, ref_prefix, removed, "removed", bucket_file(bucket)).model_dump()
    if direct is not None:
        if counts["rewrite"]:
            counts["cut"] = _cut_rows(dest, ref_prefix, bucket, next_rows, direct["first_part"], direct["part_size"])
        counts["listing"] = _write_failures(dest, ref_prefix, [pa.Table.from_pylist(direct["scan_failures"],
                                                                                    schema=FAILURE_SCHEMA), failures])
        return counts
    if failures.num_rows:
        dest.write_parquet(failures, SCRATCH, "failures", bucket_file(bucket))
    if counts["rewrite"]:
        dest.write_parquet(next_rows, SCRATCH, "next", bucket_file(bucket))
    return counts


def _cut(dest: Location, ref_prefix: str, bucket: int, first_part: int, part_size: int) -> dict:
    return _cut_rows(dest, ref_prefix, bucket, dest.read_parquet(SCRATCH, "next", bucket_file(bucket)), first_part, part_size)


def _cut_rows(dest: Location, ref_prefix: str, bucket: int, rows: pa.Table, first_part: int, part_size: int) -> dict:
    """One bucket's planned rows as parts first_part.. (in (uri, offset) order), and its key-index file."""
    rows = rows.cast(NEXT_SCHEMA)
    planned = np.asarray(rows.column("part").to_numpy()) == -1
    todo = rows.filter(pa.array(planned)).sort_by([("uri", "ascending"), ("offset", "ascending")])
    parts = (first_part + np.arange(todo.num_rows) // part_size).astype(np.int32)
    todo = todo.set_column(todo.schema.get_field_index("part"), "part", pa.array(parts, pa.int32()))
    n_parts = -(-todo.num_rows // part_size)
    for i in range(n_parts):
        dest.write_parquet(todo.slice(i * part_size, part_size), "plan", part_file(first_part + i))
    keys = pa.concat_tables([rows.filter(pa.array(~planned)), todo])
    return {"keys": write_key_bucket(dest, ref_prefix, bucket, keys).model_dump(), "parts": n_parts}


def _write_failures(dest: Location, ref_prefix: str, tables: list[pa.Table]) -> dict:
    table = pa.concat_tables([t.cast(FAILURE_SCHEMA) for t in tables])
    return write_checksummed(dest, ref_prefix, table, "failures", "listing.parquet").model_dump()


def _merge_failures(dest: Location, ref_prefix: str, scan_failures: list[dict]) -> dict:
    """failures/listing.parquet: unreadable containers, then every bucket's duplicate keys."""
    tables = [pa.Table.from_pylist(scan_failures, schema=FAILURE_SCHEMA)]
    tables += [dest.read_parquet(SCRATCH, "failures", n) for n in dest.list_names(SCRATCH, "failures") if n.endswith(".parquet")]
    return _write_failures(dest, ref_prefix, tables)


# -- driver ---------------------------------------------------------------------------------------------
def _remote(fn: Callable):
    return ray.remote(num_cpus=TASK_CPUS, max_retries=3)(fn)


def _run_all(calls: Iterable[Callable[[], ray.ObjectRef]]) -> list:
    """Results of every call, in order, with at most IN_FLIGHT tasks submitted at a time."""
    results, inflight = {}, {}
    for i, call in enumerate(calls):
        if len(inflight) >= IN_FLIGHT:
            done, _ = ray.wait(list(inflight), num_returns=1)
            results[inflight.pop(done[0])] = ray.get(done[0])
        inflight[call()] = i
    for ref, i in inflight.items():
        results[i] = ray.get(ref)
    return [results[i] for i in range(len(results))]


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
    task = _remote(_list_dirs)
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
    task = _remote(_scatter)
    known = ray.put(set(containers))
    groups = _groups(items, sizes, limit)
    touched = _run_all(lambda g=g, i=i: task.remote(dest, index, mode, g, buckets, folder, i, known) for i, g in enumerate(groups))
    return {u for t in touched for u in t}


def _buckets(dest: Location, index: Location | None, ref_prefix: str, buckets: int, first_part: int, part_size: int,
             live_keys: dict[int, FileRef], live_scratch: bool, unchanged: set[str], files: list[str],
             scan_failures: list[dict]) -> tuple[list[dict], list[FileRef], int, FileRef]:
    """Per-bucket diffs, then parts numbered from `first_part` bucket by bucket: (diffs, key refs, parts, listing failures)."""
    diff, cut = _remote(_diff), _remote(_cut)
    kept = ray.put(set(unchanged))
    live_json = {b: r.model_dump() for b, r in live_keys.items()}
    if buckets == 1:  # no shuffle: one task lists, diffs and cuts
        direct = {"files": files, "first_part": first_part, "part_size": part_size, "scan_failures": scan_failures}
        diffs = [ray.get(diff.remote(dest, index, ref_prefix, 0, live_json.get(0), live_scratch, kept, direct))]
        cuts = {0: diffs[0]["cut"]} if diffs[0]["rewrite"] else {}
        listing = diffs[0]["listing"]
    else:
        diffs = _run_all(lambda b=b: diff.remote(dest, index, ref_prefix, b, live_json.get(b), live_scratch, kept)
                         for b in range(buckets))
        merged = _remote(_merge_failures).remote(dest, ref_prefix, scan_failures)  # runs beside the cuts
        starts = first_part + np.concatenate([[0], np.cumsum([-(-d["todo"] // part_size) for d in diffs])])
        rewritten = [b for b, d in enumerate(diffs) if d["rewrite"]]
        cuts = dict(zip(rewritten, _run_all(lambda b=b: cut.remote(dest, ref_prefix, b, int(starts[b]), part_size)
                                            for b in rewritten)))
        listing = ray.get(merged)
    keys = [FileRef.model_validate(cuts[b]["keys"]) if b in cuts else live_keys[b]
            for b in range(buckets) if b in cuts or (b in live_keys and diffs[b]["keep_live"])]
    return diffs, keys, sum(c["parts"] for c in cuts.values()), FileRef.model_validate(listing)


def _scan_all(dest: Location, spec: SourceSpec, containers: list[tuple]) -> tuple[list[tuple[str, int]], list[dict], Counter, list[dict]]:
    """(listing files, containers table rows, skipped, failures) of the containers, scanned in tasks."""
    task = _remote(_scan)
    found = _run_all(lambda c=c: task.remote(spec, dest, _name("c", c[0]), c[0], c[1], c[2]) for c in containers)
    files = [(f["file"], f["rows"]) for f in found if f["file"]]
    rows = [dict(uri=c[0], kind=c[1], etag=c[2], size=c[3], entries=f["rows"], skipped=f["skipped"])
            for c, f in zip(containers, found) if f["failure"] is None]
    skipped = sum((Counter(f["skipped"]) for f in found), Counter())
    return files, rows, skipped, [f["failure"] for f in found if f["failure"]]


def _finish(dest: Location, plan: Plan, record: dict) -> Plan:
    dest.write_json(record, "plan", "listing.json")  # what the listing did: containers scanned, timings
    write_contract(dest, plan, "plan", PLAN)  # last: the plan's done marker
    dest.delete(SCRATCH)
    return plan


def make_index_plan(dest: Location, spec: SourceSpec, part_size: int, ref_prefix: str, bucket_rows: int) -> Plan:
    """List the source in Ray tasks and cut it into parts; the version's key index and container table.

    `dest` is the version folder (index/`ref_prefix`). The number of key buckets is fixed here for the
    lineage: max(1, ceil(entries listed / bucket_rows)).
    """
    return read_plan(dest) or _plan(dest, spec, part_size, ref_prefix, bucket_rows, None, None)


def make_update_plan(dest: Location, spec: SourceSpec, part_size: int, ref_prefix: str, index: Location, live: Manifest,
                     bucket_rows: int) -> Plan:
    """The nightly diff against the live version, bucket by bucket; parts numbered from `live.next_part`.

    Containers whose (uri, etag, size) equal a row of the live container table are not opened (unless
    an image of theirs failed last time: it is retried). A live version without key index (format 1/2)
    gets one built from its catalog parts, in tasks.
    """
    return read_plan(dest) or _plan(dest, spec, part_size, ref_prefix, bucket_rows, index, live)


def _plan(dest: Location, spec: SourceSpec, part_size: int, ref_prefix: str, bucket_rows: int, index: Location | None,
          live: Manifest | None) -> Plan:
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
    if live is not None and not buckets:
        buckets = max(1, math.ceil(live.counts.seen / limit))
        refs = [(r.model_dump(), part_number(r)) for r in live.catalog]
        _shuffle(dest, index, "catalog", refs, [part_size] * len(refs), buckets, "live", limit)
    elif live is not None:
        refs = [(r.model_dump(), part_number(r)) for r in live.failures if r.name.startswith("part-")]
        failed_containers = _shuffle(dest, index, "failed", refs, [part_size] * len(refs), buckets, "failed", limit,
                                     set(live_table))
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
    live_keys = refs_by_bucket(live.keys) if live is not None else {}
    diffs, keys, n_parts, listing = _buckets(dest, index, ref_prefix, buckets, first, part_size, live_keys,
                                             live is not None and not live.key_buckets, unchanged, [f for f, _ in files],
                                             scan_failures)
    seconds["buckets"] = time.time() - t0 - seconds["walk"] - seconds["scan"]
    containers_ref = write_checksummed(dest, ref_prefix, containers_table(rows).cast(CONTAINER_SCHEMA), "containers.parquet")
    total = {k: sum(d[k] for d in diffs) for k in ("added", "changed", "deleted", "unchanged", "duplicates", "todo")}
    errors = Counter(f["error_type"] for f in scan_failures) + Counter({"duplicate_key": total["duplicates"]})
    list_failures = len(scan_failures) + total["duplicates"]
    update = None if live is None else UpdateCounts(**{k: total[k] for k in ("added", "changed", "deleted", "unchanged")})
    plan = Plan(listing_failures=listing, parts=n_parts, entries=total["todo"], skipped=dict(skipped),
                list_failures=list_failures, list_errors=dict(errors), update=update, first_part=first,
                seen=total["todo"] + total["unchanged"] + list_failures + sum(skipped.values()),
                key_buckets=buckets, keys=keys, containers=containers_ref,
                removed=sorted((FileRef.model_validate(d["removed"]) for d in diffs if "removed" in d), key=bucket_of))
    seconds["total"] = time.time() - t0
    record = {"scanned": [c[0] for c in scanned], "unchanged": len(unchanged), "listing_files": len(files),
              "listed": listed, "buckets": buckets, "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    return _finish(dest, plan, record)

"""The listing's bucket stage: one Ray task per key bucket diffs, a second cuts the plan parts.

After the shuffle (pipelines.listing) every bucket has a scratch folder of listed rows. Its diff task
finds duplicate keys and compares the rows with the live key index; its cut task numbers the rows to
embed into `plan/part-NNNNN.parquet` and writes the bucket's key file.

Two ways to diff a bucket (storage.key_runs):
- `delta`: for a gallery of containers whose changed ones have recorded key ranges. The task reads
  only the live row groups a change can touch, writes the rows to embed as a delta key file and the
  rows no longer live as a removed file; the live files are referenced. Work and bytes follow the
  change, not the gallery.
- `full`: a first build, loose files (a deleted loose file is found only by reading every live key),
  a live version without ranges, or a bucket due for compaction. The task reads the bucket whole and
  writes it back as one base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from mllm_index.storage.catalog import ENTRY_SCHEMA, FAILURE_SCHEMA
from mllm_index.storage.contracts import FileRef
from mllm_index.storage.key_index import (KEY_SCHEMA, NEXT_SCHEMA, bucket_file, diff_bucket, drop_failed, write_checksummed,
                                          write_key_bucket)
from mllm_index.storage.key_runs import PAIR_SCHEMA, BucketRuns, KeyFilter, KeyLayout, removed_file
from mllm_index.storage.shard_store import part_file
from mllm_index.storage.uris import Location

SCRATCH = "listing"
IN_FLIGHT = 256  # tasks submitted and not yet finished, so that the driver's queue stays small
TASK_CPUS = 0.5
FAILED_SCHEMA = pa.schema([("key", pa.string()), ("image_id", pa.int64()), ("part", pa.int32())])


@dataclass(frozen=True)
class DiffContext:
    """What every bucket's diff shares (sent once through the object store)."""

    dest: Location
    index: Location | None
    ref_prefix: str
    unchanged: pa.Array  # uris of the containers not opened (their live rows are carried), built once per run
    delta: bool  # the delta diff is possible for this run (see the module docstring)
    layout: KeyLayout
    ranges: list[tuple[str, str]] = field(default_factory=list)  # key ranges of changed and gone containers


def remote(fn: Callable):
    return ray.remote(num_cpus=TASK_CPUS, max_retries=3)(fn)


def run_all(calls: Iterable[Callable[[], ray.ObjectRef]]) -> list:
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


def read_bucket(dest: Location, folder: str, bucket: int, schema: pa.Schema) -> pa.Table:
    names = [n for n in dest.list_names(SCRATCH, folder, bucket_file(bucket)[:-8]) if n.endswith(".parquet")]
    tables = [dest.read_parquet(SCRATCH, folder, bucket_file(bucket)[:-8], n).cast(schema) for n in names]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _refs(dumps: list[dict]) -> list[FileRef]:
    return [FileRef.model_validate(d) for d in dumps]


def diff_task(ctx: DiffContext, bucket: int, files: list[dict], removed: list[dict], scratch: bool,
              direct: dict | None = None) -> dict:
    """One bucket: its duplicates, its diff against the live key index, and what its cut task needs.

    `direct` (a gallery of one bucket): read the listing files themselves (no shuffle), then cut the parts
    and write failures/listing.parquet in this same task: one task instead of four waves.
    """
    dest = ctx.dest
    if direct is not None:
        tables = [dest.read_parquet(SCRATCH, "entries", name).cast(ENTRY_SCHEMA) for name in direct["files"]]
        listed = pa.concat_tables(tables) if tables else ENTRY_SCHEMA.empty_table()
    else:
        listed = read_bucket(dest, "buckets", bucket, ENTRY_SCHEMA)
    failed = read_bucket(dest, "failed", bucket, FAILED_SCHEMA)
    runs = BucketRuns(_refs(files), _refs(removed))
    groups = -1
    if scratch:
        mode, live = "full", read_bucket(dest, "live", bucket, KEY_SCHEMA)
        total = live.num_rows
    elif not runs.files:
        mode, live, total = "full", KEY_SCHEMA.empty_table(), 0
    elif ctx.delta and not runs.compact_due(ctx.index, ctx.layout):
        keys = pc.unique(pa.concat_arrays([listed.column("key").combine_chunks(), failed.column("key").combine_chunks()]))
        want = KeyFilter(keys=np.sort(np.asarray(keys.to_pylist(), dtype=object)), ranges=ctx.ranges)
        mode, (live, total, groups) = "delta", runs.live_rows(ctx.index, KEY_SCHEMA, want)
    else:
        mode, (live, total, _) = "full", runs.live_rows(ctx.index, KEY_SCHEMA)
    live, dropped = drop_failed(live, failed)
    next_rows, removed_rows, failures, counts = diff_bucket(listed, live, ctx.unchanged)
    changes = bool(counts["added"] or counts["changed"] or counts["deleted"] or dropped.num_rows)
    if mode == "delta":  # the diff saw only the rows a change touches; the others are live and unchanged
        counts["unchanged"] = total - dropped.num_rows - counts["deleted"] - counts["changed"]
        next_rows = next_rows.filter(pc.equal(next_rows.column("part"), -1))
    keep = not changes and (mode == "delta" or (len(runs.files) <= 1 and not runs.removed and not scratch))
    counts.update(mode=mode, row_groups=groups, todo=counts["added"] + counts["changed"],
                  cut=not keep and next_rows.num_rows > 0,
                  keys=[f.model_dump() for f in runs.files] if keep or mode == "delta" else [],
                  key_removed=[f.model_dump() for f in runs.removed] if keep or mode == "delta" else [])
    if removed_rows.num_rows:
        counts["removed"] = write_checksummed(dest, ctx.ref_prefix, removed_rows, "removed", bucket_file(bucket)).model_dump()
    if mode == "delta" and changes:
        gone = pa.concat_tables([removed_rows.cast(PAIR_SCHEMA), dropped.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)])
        if gone.num_rows:
            ref = write_checksummed(dest, ctx.ref_prefix, gone.sort_by("image_id"), "keys", removed_file(bucket))
            counts["key_removed"].append(ref.model_dump())
    if direct is not None:
        if counts["cut"]:
            cut = cut_rows(dest, ctx.ref_prefix, bucket, next_rows, direct["first_part"], direct["part_size"],
                           ctx.layout.row_group)
            counts["keys"].append(cut["keys"])
            counts["parts"] = cut["parts"]
        counts["listing"] = write_failures(dest, ctx.ref_prefix, [pa.Table.from_pylist(direct["scan_failures"],
                                                                                       schema=FAILURE_SCHEMA), failures])
        return counts
    if failures.num_rows:
        dest.write_parquet(failures, SCRATCH, "failures", bucket_file(bucket))
    if counts["cut"]:
        dest.write_parquet(next_rows, SCRATCH, "next", bucket_file(bucket))
    return counts


def cut_task(dest: Location, ref_prefix: str, bucket: int, first_part: int, part_size: int, row_group: int) -> dict:
    rows = dest.read_parquet(SCRATCH, "next", bucket_file(bucket))
    return cut_rows(dest, ref_prefix, bucket, rows, first_part, part_size, row_group)


def cut_rows(dest: Location, ref_prefix: str, bucket: int, rows: pa.Table, first_part: int, part_size: int,
             row_group: int) -> dict:
    """One bucket's planned rows as parts first_part.. (in (uri, offset) order), and its key file: the
    whole bucket (a full diff) or the planned rows alone (a delta diff)."""
    rows = rows.cast(NEXT_SCHEMA)
    planned = np.asarray(rows.column("part").to_numpy()) == -1
    todo = rows.filter(pa.array(planned)).sort_by([("uri", "ascending"), ("offset", "ascending")])
    parts = (first_part + np.arange(todo.num_rows) // part_size).astype(np.int32)
    todo = todo.set_column(todo.schema.get_field_index("part"), "part", pa.array(parts, pa.int32()))
    n_parts = -(-todo.num_rows // part_size)
    for i in range(n_parts):
        dest.write_parquet(todo.slice(i * part_size, part_size), "plan", part_file(first_part + i))
    keys = pa.concat_tables([rows.filter(pa.array(~planned)), todo])
    return {"keys": write_key_bucket(dest, ref_prefix, bucket, keys, row_group).model_dump(), "parts": n_parts}


def write_failures(dest: Location, ref_prefix: str, tables: list[pa.Table]) -> dict:
    table = pa.concat_tables([t.cast(FAILURE_SCHEMA) for t in tables])
    return write_checksummed(dest, ref_prefix, table, "failures", "listing.parquet").model_dump()


def merge_failures(dest: Location, ref_prefix: str, scan_failures: list[dict]) -> dict:
    """failures/listing.parquet: unreadable containers, then every bucket's duplicate keys."""
    tables = [pa.Table.from_pylist(scan_failures, schema=FAILURE_SCHEMA)]
    tables += [dest.read_parquet(SCRATCH, "failures", n) for n in dest.list_names(SCRATCH, "failures") if n.endswith(".parquet")]
    return write_failures(dest, ref_prefix, tables)


@dataclass
class BucketsResult:
    diffs: list[dict]  # per bucket (a kept bucket: its counts without a task)
    keys: list[FileRef]
    key_removed: list[FileRef]
    parts: int
    listing: FileRef


def diff_buckets(ctx: DiffContext, buckets: int, first_part: int, part_size: int, live: dict[int, BucketRuns],
                 scratch: bool, files: list[str], scan_failures: list[dict]) -> BucketsResult:
    """Per-bucket diffs, then parts numbered from `first_part` bucket by bucket. (An unchanged night's
    delta diffs read only footers: O(buckets), not O(gallery).)"""
    shared = ray.put(ctx)
    runs = {b: ([f.model_dump() for f in r.files], [f.model_dump() for f in r.removed]) for b, r in live.items()}
    diff, cut = remote(diff_task), remote(cut_task)
    if buckets == 1:  # no shuffle: one task lists, diffs and cuts
        direct = {"files": files, "first_part": first_part, "part_size": part_size, "scan_failures": scan_failures}
        diffs = [ray.get(diff.remote(shared, 0, *runs.get(0, ([], [])), scratch, direct))]
        cuts, listing = {}, diffs[0]["listing"]
    else:
        diffs = run_all(lambda b=b: diff.remote(shared, b, *runs.get(b, ([], [])), scratch) for b in range(buckets))
        merged = remote(merge_failures).remote(ctx.dest, ctx.ref_prefix, scan_failures)  # runs beside the cuts
        starts = first_part + np.concatenate([[0], np.cumsum([-(-d["todo"] // part_size) for d in diffs])])
        todo = [b for b, d in enumerate(diffs) if d["cut"]]
        cuts = dict(zip(todo, run_all(lambda b=b: cut.remote(ctx.dest, ctx.ref_prefix, b, int(starts[b]), part_size,
                                                             ctx.layout.row_group) for b in todo)))
        listing = ray.get(merged)
    for b, c in cuts.items():
        diffs[b]["keys"].append(c["keys"])
    return BucketsResult(diffs=diffs, keys=[FileRef.model_validate(r) for d in diffs for r in d["keys"]],
                         key_removed=[FileRef.model_validate(r) for d in diffs for r in d["key_removed"]],
                         parts=sum(c["parts"] for c in cuts.values()) + sum(d.get("parts", 0) for d in diffs),
                         listing=FileRef.model_validate(listing))

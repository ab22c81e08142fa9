"""Resumable units of work shared by the jobs: a plan of parts and the parts' completion markers
(the index job's parts are written by worker tasks: pipelines/part_chunks.py).

A job lists its input once into `plan/part-NNNNN.parquet` (+ `plan/plan.json`, written
last); every finished part leaves its output files and then `stats/part-NNNNN.json`, the
completion marker, so a re-run processes only parts without a marker.
"""

from __future__ import annotations

from collections import Counter
from typing import TypeVar

import numpy as np
import pyarrow as pa
import ray

from mllm_index.storage.catalog import FAILURE_SCHEMA
from mllm_index.storage.contracts import Contract, Plan, UpdateCounts, read_contract, write_contract
from mllm_index.storage.integrity import digest
from mllm_index.storage.shard_store import part_file
from mllm_index.storage.sources import SourceSpec, assign_ids, list_source, scan_container
from mllm_index.storage.uris import Location, parquet_bytes, redact_text

PLAN = "plan.json"
S = TypeVar("S", bound=Contract)


def list_entries(spec: SourceSpec) -> tuple[pa.Table, list[dict], Counter]:
    """(entries with stable ids, listing failures, skipped by extension): containers scanned in Ray tasks."""
    listing = list_source(spec)
    scan = ray.remote(num_cpus=0.5)(_scan_or_fail)
    results = ray.get([scan.remote(uri, kind, etag, spec) for uri, kind, etag in listing.containers])
    entries, skipped, failures = list(listing.files), Counter(listing.skipped), []
    for found, skip, failure in results:
        entries += found
        skipped.update(skip)
        failures += failure
    table, duplicates = assign_ids(entries, spec.location().uri)
    return table, failures + duplicates, skipped


def write_plan(dest: Location, table: pa.Table, failures: list[dict], skipped: Counter, part_size: int,
               failure_schema: pa.Schema = FAILURE_SCHEMA, seen: int | None = None,
               update: UpdateCounts | None = None, ref_prefix: str | None = None) -> Plan:
    """Cut entries into parts and save them; plan/plan.json is written last (the plan's done marker).

    Listing failures go to failures/listing.parquet in the job's failure schema, so the whole
    failures/ folder reads as one table (a query job's failures also carry `query_id`). `ref_prefix`
    (`versions/vNNNNNN` for an index version) makes the plan record that file's reference for the manifest.
    """
    n_parts = -(-table.num_rows // part_size)  # no entries, no parts
    for p in range(n_parts):
        part = table.slice(p * part_size, part_size)
        dest.write_parquet(part.append_column("part", pa.array(np.full(part.num_rows, p, np.int32))), "plan", part_file(p))
    rows = [dict(f, query_id=f["image_id"]) for f in failures] if "query_id" in failure_schema.names else failures
    data = parquet_bytes(pa.Table.from_pylist(rows, schema=failure_schema))
    dest.write_bytes(data, "failures", "listing.parquet")
    listing = digest(f"{ref_prefix}/failures/listing.parquet", data) if ref_prefix else None
    plan = Plan(listing_failures=listing, parts=n_parts, entries=table.num_rows, skipped=dict(skipped), list_failures=len(failures),
                list_errors=dict(Counter(f["error_type"] for f in failures)), update=update,
                seen=seen if seen is not None else table.num_rows + len(failures) + sum(skipped.values()))
    write_contract(dest, plan, "plan", PLAN)
    return plan


def make_plan(dest: Location, spec: SourceSpec, part_size: int, failure_schema: pa.Schema = FAILURE_SCHEMA,
              ref_prefix: str | None = None) -> Plan:
    """List the source, cut it into parts, save it."""
    table, failures, skipped = list_entries(spec)
    return write_plan(dest, table, failures, skipped, part_size, failure_schema, ref_prefix=ref_prefix)


def read_plan(dest: Location) -> Plan | None:
    """The saved plan of a run, None before it was written."""
    return read_contract(dest, Plan, "plan", PLAN) if dest.exists("plan", PLAN) else None


def load_or_make_plan(dest: Location, spec: SourceSpec, part_size: int, failure_schema: pa.Schema = FAILURE_SCHEMA,
                      ref_prefix: str | None = None) -> Plan:
    return read_plan(dest) or make_plan(dest, spec, part_size, failure_schema, ref_prefix)


def _scan_or_fail(uri: str, kind: str, etag: str, spec: SourceSpec):
    """A container that cannot be read (corrupt tar, bad Parquet) is one failures row."""
    try:
        entries, skipped = scan_container(uri, kind, etag, spec)
        return entries, skipped, []
    except Exception as exc:
        row = {"image_id": None, "uri": uri, "key": None, "stage": "list", "error_type": type(exc).__name__,
               "message": redact_text(str(exc))[:500]}
        return [], Counter(), [row]


def finished_parts(dest: Location, stats: type[S]) -> dict[int, S]:
    """Stats of every part whose completion marker exists."""
    return {int(n[5:10]): read_contract(dest, stats, "stats", n) for n in dest.list_names("stats") if n.endswith(".json")}


def plan_table(dest: Location, part: int) -> pa.Table:
    return dest.read_parquet("plan", part_file(part))

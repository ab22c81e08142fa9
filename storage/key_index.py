"""The key index: a version's live rows split by a hash of their key into bucket files.

`keys/bucket-BBBBB.parquet` holds (key, etag, length, image_id, uri, part) of the live rows whose
key hashes to bucket B, sorted by key; a bucket with no rows has no file. The nightly diff reads one
live bucket and the listing's rows of the same bucket at a time, so no process ever holds the whole
catalog, and an update whose changes miss a bucket references that bucket's file instead of
rewriting it. The hash is sha1 (never Python's `hash`, which changes per process), so the bucket of a
key is the same in every worker and every run; the number of buckets is fixed for a lineage.

`containers.parquet` lists the tar / Parquet files a version's listing scanned (uri, kind, etag,
size, entries, skipped), so that the next update can leave unchanged ones unopened.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_index.storage.catalog import ENTRY_SCHEMA, FAILURE_SCHEMA
from mllm_index.storage.contracts import FileRef
from mllm_index.storage.integrity import digest
from mllm_index.storage.uris import Location, parquet_bytes

KEY_SCHEMA = pa.schema([("key", pa.string()), ("etag", pa.string()), ("length", pa.int64()), ("image_id", pa.int64()),
                        ("uri", pa.string()), ("part", pa.int32())])
# A bucket's rows on their way to the plan: entries + `part` (-1: to be planned; else the live part of
# an unchanged row, which keeps its vector and is only carried into the new key index).
NEXT_SCHEMA = pa.schema(list(ENTRY_SCHEMA) + [("part", pa.int32())])
# skipped: JSON {extension: count}; min_key / max_key: the container's key range (null: empty, or a table
# written before the ranges were recorded), so a diff can read only the key rows a changed container touches.
CONTAINER_SCHEMA = pa.schema([("uri", pa.string()), ("kind", pa.string()), ("etag", pa.string()), ("size", pa.int64()),
                              ("entries", pa.int64()), ("skipped", pa.string()), ("min_key", pa.string()),
                              ("max_key", pa.string())])


def key_bucket(keys: pa.Array | pa.ChunkedArray | list[str], buckets: int) -> np.ndarray:
    """Bucket of each key: the first 8 bytes of sha1(key), big-endian, modulo `buckets`."""
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        keys = keys.to_pylist()
    hashes = np.fromiter((int.from_bytes(hashlib.sha1(k.encode("utf-8")).digest()[:8], "big") for k in keys),
                         dtype=np.uint64, count=len(keys))
    return (hashes % np.uint64(max(1, buckets))).astype(np.int64)


def bucket_file(bucket: int) -> str:
    return f"bucket-{bucket:05d}.parquet"


def bucket_of(ref: FileRef) -> int:
    """The bucket a key-index, removed-rows or removed-keys file holds, from its name (`*-BBBBB.parquet`)."""
    return int(ref.name[:-len(".parquet")].rsplit("-", 1)[1])


def refs_by_bucket(refs: list[FileRef]) -> dict[int, FileRef]:
    return {bucket_of(r): r for r in refs}


def write_checksummed(folder: Location, ref_prefix: str, table: pa.Table, *parts: str,
                      row_group_size: int | None = None) -> FileRef:
    """Write a table under a version folder; its reference (relative to the index root) with size and sha256."""
    data = parquet_bytes(table, row_group_size)
    folder.write_bytes(data, *parts)
    return digest("/".join((ref_prefix, *parts)), data)


def write_key_bucket(folder: Location, ref_prefix: str, bucket: int, table: pa.Table, row_group: int) -> FileRef:
    """One key-index bucket, sorted by key, in the version folder `folder` (= index/`ref_prefix`)."""
    table = table.select(KEY_SCHEMA.names).cast(KEY_SCHEMA).sort_by("key")
    return write_checksummed(folder, ref_prefix, table, "keys", bucket_file(bucket), row_group_size=row_group)


def containers_table(rows: list[dict]) -> pa.Table:
    rows = [dict(r, skipped=r["skipped"] if isinstance(r["skipped"], str) else json.dumps(dict(r["skipped"]), sort_keys=True))
            for r in sorted(rows, key=lambda r: r["uri"])]
    return pa.Table.from_pylist(rows, schema=CONTAINER_SCHEMA)


def first_by_location(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(kept, duplicate_key failures): for each key, the first row in (uri, offset) order is kept.

    The rule `assign_ids` applies to a whole listing, applied to one bucket: every row of a key is in
    the key's bucket, so the result is the same. Kept rows come back in (uri, offset) order.
    """
    table = table.sort_by([("uri", "ascending"), ("offset", "ascending")])
    order = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    first = order.group_by("key", use_threads=False).aggregate([("_row", "min")]).column("_row_min")
    keep = pc.is_in(order.column("_row"), value_set=first)
    kept, dropped = table.filter(keep), table.filter(pc.invert(keep))
    if not dropped.num_rows:
        return kept, FAILURE_SCHEMA.empty_table()
    owner = dict(zip(kept.column("key").to_pylist(), kept.column("uri").to_pylist()))
    rows = [{"image_id": i, "uri": u, "key": k, "stage": "list", "error_type": "duplicate_key",
             "message": f"key {k!r} already used by {owner[k]}"[:500]}
            for i, u, k in zip(*(dropped.column(c).to_pylist() for c in ("image_id", "uri", "key")))]
    return kept, pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA)


def drop_failed(live: pa.Table, failed: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(live key rows without those whose (image_id, part) failed to decode or embed, the dropped rows).

    A failed row is not live: its image is retried, listed again as added."""
    if not failed.num_rows or not live.num_rows:
        return live, live.slice(0, 0)
    pairs = failed.select(["image_id", "part"]).cast(pa.schema([("image_id", pa.int64()), ("part", pa.int32())]))
    return (live.join(pairs, ["image_id", "part"], join_type="left anti", use_threads=False),
            live.join(pairs, ["image_id", "part"], join_type="left semi", use_threads=False))


def as_next(table: pa.Table, part: int | None = None) -> pa.Table:
    """Entries (part -1) or live key rows (their own part, no location: never planned) as NEXT_SCHEMA rows."""
    n = table.num_rows
    cols = {}
    for field in NEXT_SCHEMA:
        if field.name in table.column_names:
            cols[field.name] = table.column(field.name).cast(field.type)
        elif field.name == "part":
            cols["part"] = pa.array(np.full(n, -1 if part is None else part, np.int32))
        elif field.name == "offset":
            cols["offset"] = pa.array(np.full(n, -1, np.int64))
        else:  # kind
            cols[field.name] = pa.array([""] * n, field.type)
    return pa.table(cols, schema=NEXT_SCHEMA)


def diff_bucket(listed: pa.Table, live: pa.Table, unchanged: pa.Array) -> tuple[pa.Table, pa.Table, pa.Table, dict]:
    """One bucket's nightly diff: (next rows, removed (image_id, part), duplicate_key failures, counts).

    `listed`: entries listed this run (changed and new containers, all loose files); `live`: the live key
    rows of the bucket; `unchanged`: a string array (built once per run) of the uris of containers not
    opened because their etag and size did not change: their live rows are carried as they are. Added:
    a key not live; changed: etag or length differs; deleted: a live key no longer listed. Next rows: unchanged live rows with their part, added
    and changed entries with part -1 (to be planned).
    """
    carried_mask = pc.is_in(live.column("uri"), value_set=unchanged)
    candidates = pa.concat_tables([as_next(listed), as_next(live.filter(carried_mask))])
    kept, failures = first_by_location(candidates)
    if not live.num_rows:  # a first build, or a bucket that was empty: everything listed is added
        return kept, pa.table({"image_id": pa.array([], pa.int64()), "part": pa.array([], pa.int32())}), failures, {
            "added": kept.num_rows, "changed": 0, "deleted": 0, "unchanged": 0, "duplicates": failures.num_rows}
    new = kept.filter(pc.equal(kept.column("part"), -1))
    old = live.select(["key", "etag", "length", "image_id", "uri", "part"]).rename_columns(
        ["key", "live_etag", "live_length", "live_id", "live_uri", "live_part"])
    joined = new.join(old, "key", join_type="left outer", use_threads=False)
    known = pc.is_valid(joined.column("live_id"))
    differs = pc.or_(pc.not_equal(joined.column("etag"), joined.column("live_etag")),
                     pc.not_equal(joined.column("length"), joined.column("live_length")))
    changed = pc.and_(known, pc.fill_null(differs, True))
    same = pc.and_(known, pc.invert(changed))
    todo = joined.filter(pc.invert(same)).select(NEXT_SCHEMA.names)
    deleted = live.join(kept.select(["key"]), "key", join_type="left anti", use_threads=False)
    changed_rows = joined.filter(changed)
    removed = pa.concat_tables([
        deleted.select(["image_id", "part"]),
        changed_rows.select(["live_id", "live_part"]).rename_columns(["image_id", "part"]),
    ]).sort_by("image_id")
    carried = kept.filter(pc.not_equal(kept.column("part"), -1))
    unchanged_live = as_next(joined.filter(same).select(["key", "etag", "length", "live_id", "live_uri", "live_part"])
                             .rename_columns(["key", "etag", "length", "image_id", "uri", "part"]))
    next_rows = pa.concat_tables([carried, unchanged_live, todo])
    n_changed = changed_rows.num_rows
    counts = {"added": todo.num_rows - n_changed, "changed": n_changed, "deleted": deleted.num_rows,
              "unchanged": carried.num_rows + unchanged_live.num_rows, "duplicates": failures.num_rows}
    return next_rows, removed, failures, counts

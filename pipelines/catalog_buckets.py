"""Build the id-partitioned catalog of an index version with Ray Data: workers read, shuffle, write.

Only for versions with a shard built before shards had catalog files (storage/shard_catalog.py):
a version built since has its catalog rows by shard, written once with each shard, and the rerank
job reads a candidate's row there without this per-run O(gallery) shuffle.

Each catalog part is read (and verified) by a task, its rows are tagged with their bucket, a
Ray Data group-by brings each bucket's rows together, and a task writes the bucket's file.
The driver only sees one small stats row per bucket. The result is cached with the run
(`catalog_by_id/index.json` names the source version), so a resumed run does not rebuild it.

Only live rows are bucketed: the task reading a part also reads the tombstones of the one shard
holding that part and drops the part's tombstoned rows (a deleted id, or a changed id whose live
row is in a newer part). So each id has at most one row, and a task holds one part and one
shard's tombstones.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from mllm_index.storage.catalog_index import COLUMNS, FOLDER, INDEX, CatalogBuckets, bucket_count, bucket_of, write_bucket
from mllm_index.storage.contracts import FileRef, Manifest, ShardRef
from mllm_index.storage.integrity import IntegrityError, read_verified_parquet, where
from mllm_index.storage.tombstones import live_mask, part_number, read_tombstone_file, shard_of_part
from mllm_index.storage.uris import Location


def _ref(path, size, sha) -> FileRef | None:
    return FileRef(path=str(path), bytes=None if size is None or size < 0 else int(size), sha256=sha or None) if path else None


def _item(ref: FileRef, shards: dict[int, ShardRef] | None) -> dict:
    """One catalog part to read, with the tombstones of the shard holding it ("" when it has none).
    `shards`: part -> shard, None when no shard of the version has tombstones."""
    part, tomb, held = -1, None, True
    if shards is not None:
        part = part_number(ref)
        held = part in shards  # a part whose every image failed may be in no shard: it must then be empty
        tomb = shards[part].tombstones if held else None
    return {"path": ref.path, "bytes": -1 if ref.bytes is None else ref.bytes, "sha256": ref.sha256 or "", "part": part,
            "held": held, "tomb_path": tomb.path if tomb else "",
            "tomb_bytes": -1 if tomb is None or tomb.bytes is None else tomb.bytes,
            "tomb_sha256": (tomb.sha256 or "") if tomb else ""}


def _read_parts(batch: dict[str, np.ndarray], *, index: Location, buckets: int) -> pa.Table:
    tables, held = [], (None, None)  # the last shard's tombstones: a batch's parts mostly share their shard
    for j, (path, size, sha) in enumerate(zip(batch["path"], batch["bytes"], batch["sha256"])):
        ref = _ref(path, size, sha)
        table = read_verified_parquet(index, ref, columns=COLUMNS)
        if not batch["held"][j] and table.num_rows:
            raise IntegrityError(f"{where(index, ref)}: part {int(batch['part'][j])} has rows but is in no shard of the "
                                 "version")
        tomb = _ref(batch["tomb_path"][j], batch["tomb_bytes"][j], batch["tomb_sha256"][j])
        if tomb is not None:  # this part's shard has tombstones: drop the part's dead rows
            if held[0] != tomb:
                held = (tomb, read_tombstone_file(index, tomb))
            keep = live_mask(table.column("image_id").to_numpy(), int(batch["part"][j]), held[1])
            table = table.filter(pa.array(keep))
        tables.append(table.append_column("bucket", pa.array(bucket_of(table.column("image_id").to_numpy(), buckets))))
    return pa.concat_tables(tables)


def _write_group(group: pa.Table, *, dest: Location) -> pa.Table:
    bucket = int(group.column("bucket")[0].as_py())
    rows = write_bucket(dest, bucket, group)
    return pa.table({"bucket": [bucket], "rows": [rows]})


def ensure_catalog_buckets(index: Location, manifest: Manifest, dest: Location, rows_per_bucket: int) -> CatalogBuckets:
    """The version's catalog partitioned by id under `dest`, built once (distributed) and then reused."""
    if dest.exists(FOLDER, INDEX) and dest.read_json(FOLDER, INDEX).get("source_version") == manifest.version:
        return CatalogBuckets(dest)
    buckets = bucket_count(manifest.live, rows_per_bucket)
    shards = shard_of_part(manifest) if any(s.tombstones is not None for s in manifest.shards) else None
    items = [_item(r, shards) for r in manifest.catalog]
    written = 0
    if items:
        stats = (ray.data.from_items(items)
                 .map_batches(_read_parts, batch_size=1, batch_format="numpy", fn_kwargs=dict(index=index, buckets=buckets))
                 .groupby("bucket")
                 .map_groups(_write_group, batch_format="pyarrow", fn_kwargs=dict(dest=dest)))
        written = sum(int(r["rows"]) for r in stats.iter_rows())
    dest.write_json({"buckets": buckets, "rows": written, "source_version": manifest.version}, FOLDER, INDEX)
    return CatalogBuckets(dest)

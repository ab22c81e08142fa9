"""Build the id-partitioned catalog of an index version with Ray Data: workers read, shuffle, write.

Each catalog part is read (and verified) by a task, its rows are tagged with their bucket, a
Ray Data group-by brings each bucket's rows together, and a task writes the bucket's file.
The driver only sees one small stats row per bucket. The result is cached with the run
(`catalog_by_id/index.json` names the source version), so a resumed run does not rebuild it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from mllm_index.storage.catalog_index import COLUMNS, FOLDER, INDEX, CatalogBuckets, bucket_count, bucket_of, write_bucket
from mllm_index.storage.contracts import FileRef, Manifest
from mllm_index.storage.integrity import read_verified_parquet
from mllm_index.storage.uris import Location


def _read_parts(batch: dict[str, np.ndarray], *, index: Location, buckets: int) -> pa.Table:
    tables = []
    for path, size, sha in zip(batch["path"], batch["bytes"], batch["sha256"]):
        ref = FileRef(path=str(path), bytes=None if size is None or size < 0 else int(size), sha256=sha or None)
        table = read_verified_parquet(index, ref, columns=COLUMNS)
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
    buckets = bucket_count(manifest.counts.indexed, rows_per_bucket)
    items = [{"path": r.path, "bytes": -1 if r.bytes is None else r.bytes, "sha256": r.sha256 or ""} for r in manifest.catalog]
    written = 0
    if items:
        stats = (ray.data.from_items(items)
                 .map_batches(_read_parts, batch_size=1, batch_format="numpy", fn_kwargs=dict(index=index, buckets=buckets))
                 .groupby("bucket")
                 .map_groups(_write_group, batch_format="pyarrow", fn_kwargs=dict(dest=dest)))
        written = sum(int(r["rows"]) for r in stats.iter_rows())
    dest.write_json({"buckets": buckets, "rows": written, "source_version": manifest.version}, FOLDER, INDEX)
    return CatalogBuckets(dest)

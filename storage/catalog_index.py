"""The catalog partitioned by image id, so that a candidate's row is found by reading one small file.

Used by the rerank job for versions whose shards have no catalog files (built before them); versions
built since keep each shard's catalog rows beside it (storage/shard_catalog.py).

The index's catalog parts are in listing order: finding the rows of 400 candidate ids there
means reading the whole catalog, which is why the first release loaded it whole into every
re-rank actor. Here the live rows (see pipelines.catalog_buckets: tombstoned rows are dropped, so
an id has one row) are hashed into `buckets` files by `image_id % buckets` (ids are
already uniform 63-bit hashes), each sorted by id. A lookup reads only the buckets its ids fall
in, so its cost is proportional to the ids asked for, never to the gallery. With the default of
~2048 rows per bucket a bucket file is ~100-200 KB.

Layout, under any folder (the rerank run's output, or an index version):
    catalog_by_id/bucket-NNNNNN.parquet     image_id, key, uri, kind, offset, length; sorted by image_id
    catalog_by_id/index.json                {"buckets": B, "rows": N, "source_version": ...}, written last
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from mllm_index.storage.uris import Location

FOLDER, INDEX = "catalog_by_id", "index.json"
COLUMNS = ["image_id", "key", "uri", "kind", "offset", "length"]


def bucket_count(rows: int, rows_per_bucket: int) -> int:
    return max(1, math.ceil(rows / max(1, rows_per_bucket)))


def bucket_of(ids: np.ndarray, buckets: int) -> np.ndarray:
    return (np.asarray(ids, np.int64) % buckets).astype(np.int64)


def bucket_file(bucket: int) -> str:
    return f"bucket-{bucket:06d}.parquet"


def write_bucket(folder: Location, bucket: int, table: pa.Table) -> int:
    """One bucket's rows, sorted by id; returns the row count. An id may have one row: two mean a
    changed id's older row was not dropped by its part's tombstones, and a lookup would pick
    either, so that is refused by name."""
    table = table.select(COLUMNS).sort_by("image_id")
    ids = table.column("image_id").to_numpy()
    twice = ids[1:][ids[1:] == ids[:-1]]
    if len(twice):
        raise ValueError(f"catalog bucket {bucket}: image_id {int(twice[0])} has more than one live row (a changed "
                         "id's older catalog row must be tombstoned in its part)")
    folder.write_parquet(table, FOLDER, bucket_file(bucket))
    return table.num_rows


class CatalogBuckets:
    """Look up catalog rows by id, reading only the buckets the ids fall in (none twice per call)."""

    def __init__(self, folder: Location):
        meta = folder.read_json(FOLDER, INDEX)
        self.folder, self.buckets = folder, int(meta["buckets"])

    def lookup(self, ids: np.ndarray) -> list[dict | None]:
        """Rows for ids, in order; None for an id the catalog does not know (or a negative id)."""
        ids = np.asarray(ids, np.int64)
        out: list[dict | None] = [None] * len(ids)
        valid = np.flatnonzero(ids >= 0)
        wanted = bucket_of(ids[valid], self.buckets)
        for bucket in np.unique(wanted):
            try:
                table = self.folder.read_parquet(FOLDER, bucket_file(int(bucket)))
            except FileNotFoundError:
                continue  # an empty bucket is not written
            known = table.column("image_id").to_numpy()
            cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}
            for i in valid[wanted == bucket]:
                row = int(np.searchsorted(known, ids[i]))
                if row < len(known) and known[row] == ids[i]:
                    out[i] = {c: cols[c][row] for c in COLUMNS}
        return out

"""A key-index bucket as runs: a base file, later versions' delta files, and removed-row files.

A nightly update that adds 2,000 images touches every key bucket (keys hash uniformly), so
rewriting each touched bucket would cost O(gallery) per night however small the change. Instead a
version's bucket B is the list of key files (`keys/bucket-BBBBB.parquet`, in the folders of the
versions that wrote them: the base, then one delta per update that added rows to B) minus the
(image_id, part) pairs of its removed files (`keys/removed-BBBBB.parquet`: rows deleted, changed or
retried since the base). Part numbers are unique along a lineage, so a pair names one key row.

A diff reads only what a change can touch: the row groups (small, sorted by key) whose key range
holds a listed key, a key that failed last time, or the key range of a container that changed or
disappeared (recorded per container in `containers.parquet`). Their checksums cannot be checked on
a partial read: the footer's file size is checked against the reference instead, and `verify`
checks whole files. A bucket is rewritten as one base (read whole, checksummed) when its deltas
and removed rows pass `KeyLayout.compact_fraction` of its rows or it has more than `max_runs` files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mllm_index.storage.contracts import FileRef
from mllm_index.storage.integrity import IntegrityError, read_verified_parquet, where
from mllm_index.storage.retry import with_retries
from mllm_index.storage.uris import Location



@dataclass(frozen=True)
class KeyLayout:
    """How key files are written and when a bucket is compacted (tests make them small)."""

    row_group: int = 8192  # rows per row group: a pruned read reads ~row_group rows per touched key range
    max_runs: int = 8  # key files of one bucket before it is rewritten as one base
    compact_fraction: float = 0.25  # delta + removed rows over live rows before a bucket is rewritten

PAIR_SCHEMA = pa.schema([("image_id", pa.int64()), ("part", pa.int32())])


@dataclass
class KeyFilter:
    """What a diff must see of a bucket's live rows: rows with these keys, or keys in these ranges."""

    keys: np.ndarray  # sorted str keys (listed this run, or failed last time)
    ranges: list[tuple[str, str]] = field(default_factory=list)  # (lowest, highest) key of changed/gone containers

    def hits(self, low: str, high: str) -> bool:
        i = int(np.searchsorted(self.keys, low, side="left"))
        if i < len(self.keys) and self.keys[i] <= high:
            return True
        return any(lo <= high and hi >= low for lo, hi in self.ranges)

    def rows(self, table: pa.Table) -> pa.Table:
        """The rows of a read row group the filter asks for (a row group holds others too)."""
        keys = table.column("key")
        mask = pc.is_in(keys, value_set=pa.array(self.keys, pa.string())) if len(self.keys) else pa.repeat(False, len(table))
        for lo, hi in self.ranges:
            mask = pc.or_(mask, pc.and_(pc.greater_equal(keys, lo), pc.less_equal(keys, hi)))
        return table.filter(mask)


def removed_file(bucket: int) -> str:
    return f"removed-{bucket:05d}.parquet"


def _open(index: Location, ref: FileRef) -> pq.ParquetFile:
    def read() -> pq.ParquetFile:
        f = index.fs.open(index.path(ref.path), "rb")
        return pq.ParquetFile(f)

    try:
        pf = with_retries(read, f"open {ref.path}", index.retry)
    except FileNotFoundError:
        raise IntegrityError(f"{where(index, ref)}: missing") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IntegrityError(f"{where(index, ref)}: not a readable Parquet file ({exc})") from None
    if ref.bytes is not None and index.fs.size(index.path(ref.path)) != ref.bytes:
        raise IntegrityError(f"{where(index, ref)}: size differs from the version's reference ({ref.bytes} bytes)")
    return pf


def file_rows(index: Location, refs: list[FileRef]) -> int:
    """Rows in these files, from their footers."""
    return sum(_open(index, ref).metadata.num_rows for ref in refs)


def _key_stats(pf: pq.ParquetFile, g: int) -> tuple[str, str] | None:
    col = pf.schema_arrow.get_field_index("key")
    stats = pf.metadata.row_group(g).column(col).statistics
    if stats is None or not stats.has_min_max:
        return None
    return stats.min, stats.max


def read_pruned(index: Location, ref: FileRef, want: KeyFilter, pf: pq.ParquetFile | None = None) -> tuple[pa.Table, int]:
    """(the rows of `ref` that `want` asks for, row groups read); `pf`: the file, already opened."""
    pf = pf or _open(index, ref)
    groups = []
    for g in range(pf.metadata.num_row_groups):
        span = _key_stats(pf, g)
        if span is None or want.hits(*span):
            groups.append(g)
    if not groups:
        return pf.schema_arrow.empty_table(), 0
    table = with_retries(lambda: pf.read_row_groups(groups), f"read {ref.path}", index.retry)
    return want.rows(table), len(groups)


def removed_pairs(index: Location, refs: list[FileRef]) -> pa.Table:
    tables = [read_verified_parquet(index, r).select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA) for r in refs]
    return pa.concat_tables(tables) if tables else PAIR_SCHEMA.empty_table()


def without_pairs(table: pa.Table, pairs: pa.Table) -> pa.Table:
    """Rows of `table` whose (image_id, part) is not in `pairs`."""
    if not pairs.num_rows or not table.num_rows:
        return table
    return table.join(pairs, ["image_id", "part"], join_type="left anti", use_threads=False)


@dataclass
class BucketRuns:
    """One bucket of a live version: its key files (base first) and removed files. A task opens each
    key file once (its footer serves the compaction check, the pruned read and the row count)."""

    files: list[FileRef]
    removed: list[FileRef]
    _opened: dict = field(default_factory=dict, repr=False, compare=False)

    def _file(self, index: Location, ref: FileRef) -> pq.ParquetFile:
        if ref.path not in self._opened:
            self._opened[ref.path] = _open(index, ref)
        return self._opened[ref.path]

    def _rows(self, index: Location, refs: list[FileRef]) -> int:
        return sum(self._file(index, ref).metadata.num_rows for ref in refs)

    def compact_due(self, index: Location, layout: KeyLayout) -> bool:
        """Whether a diff should read the bucket whole and write it back as one base."""
        if len(self.files) > layout.max_runs:
            return True
        if len(self.files) <= 1 and not self.removed:
            return False
        base, rest, dead = self._rows(index, self.files[:1]), self._rows(index, self.files[1:]), self._rows(index, self.removed)
        return rest + dead > layout.compact_fraction * max(1, base + rest - dead)

    def live_rows(self, index: Location, schema: pa.Schema, want: KeyFilter | None = None) -> tuple[pa.Table, int, int]:
        """(live rows: all, or those `want` asks for; live rows in the bucket; row groups read, -1 for whole files)."""
        pairs = removed_pairs(index, self.removed)
        if want is None:
            tables = [read_verified_parquet(index, f).cast(schema) for f in self.files]
            table = pa.concat_tables(tables) if tables else schema.empty_table()
            table = without_pairs(table, pairs)
            return table, table.num_rows, -1
        tables, groups = [], 0
        for f in self.files:
            rows, n = read_pruned(index, f, want, self._file(index, f))
            tables.append(rows.cast(schema))
            groups += n
        table = without_pairs(pa.concat_tables(tables) if tables else schema.empty_table(), pairs)
        return table, self._rows(index, self.files) - pairs.num_rows, groups


def runs_by_bucket(keys: list[FileRef], removed: list[FileRef], bucket_of) -> dict[int, BucketRuns]:
    """The live version's buckets, each with its files in manifest order (the base first)."""
    out: dict[int, BucketRuns] = {}
    for ref in keys:
        out.setdefault(bucket_of(ref), BucketRuns([], [])).files.append(ref)
    for ref in removed:
        out.setdefault(bucket_of(ref), BucketRuns([], [])).removed.append(ref)
    return out

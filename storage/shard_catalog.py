"""Catalog rows by shard: written once with each shard, read per candidate, one row group each.

The rerank job needs a candidate's catalog row (key, uri, kind, offset, length) to fetch its
image. The version's catalog parts are in listing order, so finding 400 ids there means reading
the whole catalog; rebuilding an id-partitioned copy on every run (pipelines/catalog_buckets.py)
is O(gallery) work per run, in workers whose memory grows with the gallery. Instead, when a shard
is built, its catalog rows are written beside it: `shards/shard-NNNNN.catalog.parquet`, the rows
of exactly the shard's ids, sorted by image_id (the order of its ids.npy), in row groups of
`ROW_GROUP` rows with min/max statistics on image_id. The search reports which shard returned
each candidate (where the id is live: a PQ search never returns a tombstoned id), and a reader
picks, from the footer's statistics alone, the one row group holding each wanted id and reads
only those row groups (one ranged read per run of adjacent row groups).

Memory: a reader keeps footers in one bounded LRU per process (`FOOTER_CACHE` files: a worker
looking up candidates batch after batch does not re-read them), plus the row groups of one call.
Nothing grows with the gallery.

Integrity: the writer refuses catalog rows whose ids are not exactly the shard's ids. The reader
checks what it reads (footer row count = the shard's `ntotal`, row groups in id order, ids sorted
inside each), but not the whole file's sha256, which would mean reading the whole file for one row:
`mllm-index verify` (storage/verify.py) checks the checksum and that the ids equal the shard's.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mllm_index.storage.catalog_index import COLUMNS
from mllm_index.storage.contracts import FileRef, ShardRef, version_file
from mllm_index.storage.integrity import IntegrityError, read_verified_parquet, where, write_ref
from mllm_index.storage.uris import Location, redact

ROW_GROUP = 4096  # rows per row group: what one looked-up id costs to read (~100-300 KB)
FOOTER_CACHE = 64  # footers kept per process (a footer is ~100 B per row group)
TAIL = 64 << 10  # bytes read from a file's end to find its footer (one request for most shards)
READ_THREADS = 8  # shards read at once by one lookup
SCHEMA = pa.schema([("image_id", pa.int64()), ("key", pa.string()), ("uri", pa.string()), ("kind", pa.string()),
                    ("offset", pa.int64()), ("length", pa.int64())])
assert SCHEMA.names == COLUMNS


def shard_catalog_name(shard: int) -> str:
    return f"shard-{shard:05d}.catalog.parquet"


def shard_catalog_table(index: Location, parts: Sequence[FileRef], ids: np.ndarray, shard: int) -> pa.Table:
    """The catalog rows of a shard's parts, sorted by id; IntegrityError unless their ids are exactly
    `ids` (the ids the shard was filled with, in any order)."""
    tables = [read_verified_parquet(index, ref, columns=COLUMNS).select(COLUMNS).cast(SCHEMA) for ref in parts]
    table = pa.concat_tables(tables).sort_by("image_id") if tables else SCHEMA.empty_table()
    got, want = table.column("image_id").to_numpy(), np.sort(np.asarray(ids, np.int64))
    if not np.array_equal(got, want):
        extra, missing = np.setdiff1d(got, want), np.setdiff1d(want, got)
        example = f"; e.g. id {int(extra[0])} not in the shard" if len(extra) else \
            f"; e.g. id {int(missing[0])} has no catalog row" if len(missing) else " (an id has two rows)"
        names = ", ".join(r.path for r in parts[:3]) + (" ..." if len(parts) > 3 else "")
        raise IntegrityError(f"index {redact(index.uri)}, shard {shard}: its catalog parts ({names}) hold {len(got)} rows for "
                             f"{len(want)} ids, not exactly the shard's ids{example}")
    return table


def write_shard_catalog(index: Location, version_name: str, shard: int, parts: Sequence[FileRef],
                        ids: np.ndarray, row_group: int = ROW_GROUP) -> FileRef:
    """Write `shards/shard-NNNNN.catalog.parquet` into the version's folder; its reference, checksummed."""
    table = shard_catalog_table(index, parts, ids, shard)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group, write_statistics=["image_id"], compression="zstd")
    return write_ref(index, version_file(version_name, "shards", shard_catalog_name(shard)), buf.getvalue())


@dataclass(frozen=True)
class Footer:
    """What a lookup needs of a shard catalog's footer: the row groups' id ranges and byte spans."""

    meta: pq.FileMetaData
    size: int
    mins: np.ndarray  # per non-empty row group, its smallest and largest image_id
    maxs: np.ndarray
    spans: np.ndarray  # per non-empty row group, [start, end) of its column chunks in the file
    numbers: tuple[int, ...]  # per non-empty row group, its number in the file


_FOOTERS: OrderedDict[tuple, Footer] = OrderedDict()
_FOOTERS_LOCK = threading.Lock()
_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    with _FOOTERS_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(READ_THREADS, thread_name_prefix="shard-catalog"))
        return _POOL[0]


def _read_range(index: Location, ref: FileRef, start: int, end: int) -> bytes:
    def read() -> bytes:
        return index.fs.cat_file(index.path(ref.path), start=start, end=end)

    try:
        data = index._retry(read, "read", ref.path)
    except FileNotFoundError:
        raise IntegrityError(f"{where(index, ref)}: missing") from None
    if len(data) != end - start:
        raise IntegrityError(f"{where(index, ref)}: short read at byte {start} (truncated or replaced)")
    return data


def _parse_footer(index: Location, ref: FileRef, rows: int) -> Footer:
    at = where(index, ref)
    size = ref.bytes if ref.bytes is not None else int(index._retry(lambda: index.fs.size(index.path(ref.path)), "stat",
                                                                    ref.path))
    if size < 12:
        raise IntegrityError(f"{at}: {size} bytes, too short for a Parquet file")
    tail = _read_range(index, ref, max(0, size - TAIL), size)
    if tail[-4:] != b"PAR1":
        raise IntegrityError(f"{at}: not a Parquet file (no footer magic)")
    length = int.from_bytes(tail[-8:-4], "little")
    if length + 12 > size:
        raise IntegrityError(f"{at}: footer length {length} does not fit a {size}-byte file")
    if length + 8 > len(tail):
        tail = _read_range(index, ref, size - 8 - length, size)
    try:
        meta = pq.read_metadata(io.BytesIO(tail[len(tail) - 8 - length :]))
        columns = meta.schema.to_arrow_schema().names
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IntegrityError(f"{at}: not a readable Parquet footer ({exc})") from None
    if [c for c in COLUMNS if c not in columns]:
        raise IntegrityError(f"{at}: missing column(s) {[c for c in COLUMNS if c not in columns]}")
    if meta.num_rows != rows:
        raise IntegrityError(f"{at}: {meta.num_rows} rows, the shard holds {rows} ids (ntotal)")
    wanted = [columns.index(c) for c in COLUMNS]
    mins, maxs, spans, numbers = [], [], [], []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if group.num_rows == 0:
            continue
        numbers.append(g)
        stats = group.column(wanted[0]).statistics
        if stats is None or not stats.has_min_max:
            raise IntegrityError(f"{at}: row group {g} has no image_id statistics (not written as a shard catalog)")
        mins.append(stats.min)
        maxs.append(stats.max)
        chunks = [group.column(j) for j in wanted]
        starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks]
        spans.append((min(starts), max(s + c.total_compressed_size for s, c in zip(starts, chunks))))
    mins, maxs = np.array(mins, np.int64), np.array(maxs, np.int64)
    if (mins > maxs).any() or (len(mins) > 1 and not (mins[1:] > maxs[:-1]).all()):
        raise IntegrityError(f"{at}: row groups are not in increasing image_id order")
    spans = np.array(spans, np.int64).reshape(-1, 2)
    if len(spans) and (spans.min() < 4 or spans.max() > size - 8 - length):
        raise IntegrityError(f"{at}: a row group lies outside the file's data")
    return Footer(meta, size, mins, maxs, spans, tuple(numbers))


def footer(index: Location, ref: FileRef, rows: int) -> tuple[Footer, bool]:
    """A shard catalog's footer, from this process's LRU (keyed by the file's path, size and sha256);
    and whether it was read from storage now."""
    key = (index.uri, ref.path, ref.bytes, ref.sha256, rows)
    with _FOOTERS_LOCK:
        if key in _FOOTERS:
            _FOOTERS.move_to_end(key)
            return _FOOTERS[key], False
    parsed = _parse_footer(index, ref, rows)
    with _FOOTERS_LOCK:
        _FOOTERS[key] = parsed
        while len(_FOOTERS) > FOOTER_CACHE:
            _FOOTERS.popitem(last=False)
    return parsed, True


class _Pieces(io.RawIOBase):
    """A file of which only some byte ranges were read: pyarrow reads the row groups through it."""

    def __init__(self, size: int, pieces: list[tuple[int, bytes]], label: str):
        super().__init__()
        self.size, self.pieces, self.label, self.pos = size, pieces, label, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        if self.pos >= self.size:
            return 0
        for start, data in self.pieces:
            if start <= self.pos < start + len(data):
                n = min(len(buffer), start + len(data) - self.pos)
                buffer[:n] = data[self.pos - start : self.pos - start + n]
                self.pos += n
                return n
        raise OSError(f"{self.label}: read at byte {self.pos}, outside the row groups read")


class ShardCatalogs:
    """Catalog rows by (id, shard), read from the shards' catalog files one row group per id.

    `shards`: the version's ShardRefs (or those a lookup may name); shards without a catalog file
    are not known here (their ids look up as None). `row_groups_read` / `footers_read` count this
    instance's reads (tests, benchmarks)."""

    def __init__(self, index: Location, shards: Iterable[ShardRef]):
        self.index = index
        self.files: dict[int, tuple[FileRef, int]] = {s.shard: (s.catalog, s.ntotal) for s in shards
                                                      if s.catalog is not None}
        self.row_groups_read = 0
        self.footers_read = 0
        self._lock = threading.Lock()

    @classmethod
    def from_plain(cls, index: Location, plain: Iterable[tuple]) -> "ShardCatalogs":
        """From `plain_catalogs(shards)` (what a Ray task is handed instead of the manifest)."""
        catalogs = cls(index, [])
        catalogs.files = {int(shard): (FileRef(path=path, bytes=size, sha256=sha), int(ntotal))
                          for shard, path, size, sha, ntotal in plain}
        return catalogs

    def lookup(self, ids: np.ndarray, shards: np.ndarray) -> list[dict | None]:
        """Rows for ids, in order (the same dicts as `CatalogBuckets.lookup`); None for an id whose
        shard is -1 or has no catalog file, or which that shard's catalog does not hold."""
        ids, shards = np.asarray(ids, np.int64).reshape(-1), np.asarray(shards, np.int64).reshape(-1)
        if ids.shape != shards.shape:
            raise ValueError(f"ids and shards must have the same length, got {len(ids)} and {len(shards)}")
        out: list[dict | None] = [None] * len(ids)
        valid = (ids >= 0) & np.isin(shards, np.fromiter(self.files, np.int64, len(self.files)))
        todo = [(int(s), np.flatnonzero(valid & (shards == s))) for s in np.unique(shards[valid])]
        found = _pool().map(lambda job: self._lookup_shard(job[0], ids[job[1]]), todo) if len(todo) > 1 else \
            map(lambda job: self._lookup_shard(job[0], ids[job[1]]), todo)
        for (_, positions), rows in zip(todo, found):
            for i, row in zip(positions.tolist(), rows):
                out[i] = row
        return out

    def _lookup_shard(self, shard: int, ids: np.ndarray) -> list[dict | None]:
        ref, rows = self.files[shard]
        foot, fresh = footer(self.index, ref, rows)
        with self._lock:
            self.footers_read += fresh
        out: list[dict | None] = [None] * len(ids)
        if not len(foot.mins):
            return out
        groups = np.searchsorted(foot.mins, ids, side="right") - 1
        inside = (groups >= 0) & (ids <= foot.maxs[np.maximum(groups, 0)])
        wanted = np.unique(groups[inside])
        if not len(wanted):
            return out
        table = self._read_groups(ref, foot, wanted)
        known = table.column("image_id").to_numpy()
        if len(known) > 1 and not (known[1:] > known[:-1]).all():
            raise IntegrityError(f"{where(self.index, ref)}: image_id not strictly increasing in row group(s) "
                                 f"{wanted.tolist()[:5]}")
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}
        rows_at = np.clip(np.searchsorted(known, ids), 0, max(len(known) - 1, 0))
        for i in np.flatnonzero(inside):
            r = rows_at[i]
            if len(known) and known[r] == ids[i]:
                out[i] = {c: cols[c][r] for c in COLUMNS}
        with self._lock:
            self.row_groups_read += len(wanted)
        return out

    def _read_groups(self, ref: FileRef, foot: Footer, groups: np.ndarray) -> pa.Table:
        """The row groups `groups` (sorted), one ranged read per run of adjacent ones."""
        breaks = np.flatnonzero(np.diff(groups) != 1) + 1
        pieces = []
        for run in np.split(groups, breaks):
            start, end = int(foot.spans[run[0], 0]), int(foot.spans[run[-1], 1])
            pieces.append((start, _read_range(self.index, ref, start, end)))
        label = where(self.index, ref)
        try:
            # pre_buffer off: pyarrow then reads column chunk by column chunk, inside the pieces read,
            # instead of coalescing ranges across the unread row groups between them.
            reader = pq.ParquetFile(_Pieces(foot.size, pieces, label), metadata=foot.meta, pre_buffer=False)
            return reader.read_row_groups([foot.numbers[g] for g in groups.tolist()], columns=COLUMNS).cast(SCHEMA)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise IntegrityError(f"{label}: row group(s) {groups.tolist()[:5]} do not read ({exc})") from None


def has_shard_catalogs(shards: Iterable[ShardRef]) -> bool:
    """Whether every shard carries its catalog file (versions built since they exist)."""
    shards = list(shards)
    return bool(shards) and all(s.catalog is not None for s in shards)


def plain_catalogs(shards: Iterable[ShardRef]) -> list[tuple]:
    """The shards' catalog references as plain tuples (shard, path, bytes, sha256, ntotal): what a Ray
    task needs to look rows up, without the rest of the manifest."""
    return [(s.shard, s.catalog.path, s.catalog.bytes, s.catalog.sha256, s.ntotal) for s in shards if s.catalog]


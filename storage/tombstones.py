"""Tombstones: ids a shard still stores but no reader may return.

An update never rewrites a shard to drop a deleted or changed image: that would cost a pass over
the shard every night. Instead each affected shard gets a tombstone file (Parquet: image_id int64,
part int32, sorted by image_id), and every reader filters through it until compaction rebuilds
the shard without them. A tombstone names the part the dead row is in, so a reader of one part
(catalog lookups, catalog buckets) drops exactly that part's stale row of a changed id, and keeps
the live row the same id has in a newer part.

A reader loads only the tombstones of the shards it holds (a search group) or of the shard whose
part it reads: memory follows the shard size, not the gallery.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from mllm_index.storage.contracts import FileRef, Manifest, ShardRef
from mllm_index.storage.faiss_store import faiss
from mllm_index.storage.integrity import IntegrityError, read_verified_parquet, where, write_parquet_ref
from mllm_index.storage.uris import Location

TOMBSTONE_SCHEMA = pa.schema([("image_id", pa.int64()), ("part", pa.int32())])


def empty_tombstones() -> pa.Table:
    return TOMBSTONE_SCHEMA.empty_table()


def write_tombstones(index: Location, path: str, table: pa.Table) -> FileRef:
    """Write a shard's tombstones (path relative to the index root), sorted by id, without
    duplicate rows; its reference with size and sha256. Set `ShardRef.tombstoned` to the number of
    distinct ids (`len(tombstoned_ids(normalise(table)))`): an id changed twice along a lineage
    has a row per part but is one vector fewer to search."""
    return write_parquet_ref(index, path, normalise(table))


def normalise(table: pa.Table) -> pa.Table:
    """The tombstone schema, sorted by (image_id, part), without duplicate rows."""
    missing = [c for c in TOMBSTONE_SCHEMA.names if c not in table.column_names]
    if missing:
        raise ValueError(f"tombstones need columns {TOMBSTONE_SCHEMA.names}, missing {missing}")
    table = table.select(TOMBSTONE_SCHEMA.names).cast(TOMBSTONE_SCHEMA).sort_by([("image_id", "ascending"),
                                                                                ("part", "ascending")])
    if table.num_rows < 2:
        return table.combine_chunks()
    ids = table.column("image_id").to_numpy()
    parts = table.column("part").to_numpy()
    keep = np.r_[True, (ids[1:] != ids[:-1]) | (parts[1:] != parts[:-1])]
    return table.filter(pa.array(keep)).combine_chunks() if not keep.all() else table.combine_chunks()


def read_tombstones(index: Location, shard: ShardRef) -> pa.Table:
    """The shard's tombstones, verified (checksum, schema, order); an empty table when it has none."""
    if shard.tombstones is None:
        return empty_tombstones()
    return read_tombstone_file(index, shard.tombstones)


def read_tombstone_file(index: Location, ref: FileRef) -> pa.Table:
    """A tombstone file, verified (checksum, schema, order): for a reader that got its reference alone."""
    return _checked(index, ref, read_verified_parquet(index, ref))


def _checked(index: Location, ref: FileRef, table: pa.Table) -> pa.Table:
    missing = [c for c in TOMBSTONE_SCHEMA.names if c not in table.column_names]
    if missing:
        raise IntegrityError(f"{where(index, ref)}: not a tombstone file (missing column(s) {missing})")
    try:
        table = table.select(TOMBSTONE_SCHEMA.names).cast(TOMBSTONE_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise IntegrityError(f"{where(index, ref)}: not a tombstone file ({exc})") from None
    ids = table.column("image_id").to_numpy()
    if len(ids) > 1 and not (ids[1:] >= ids[:-1]).all():
        raise IntegrityError(f"{where(index, ref)}: tombstones are not sorted by image_id")
    return table.combine_chunks()


def tombstoned_ids(tombstones: pa.Table) -> np.ndarray:
    """The distinct tombstoned ids, sorted (an id changed twice may be tombstoned in two parts)."""
    return np.unique(tombstones.column("image_id").to_numpy()).astype(np.int64)


def shard_tombstoned_ids(index: Location, shard: ShardRef) -> np.ndarray:
    """The shard's distinct tombstoned ids, sorted; empty when it has none."""
    return tombstoned_ids(read_tombstones(index, shard))


def is_in(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Membership of each value in a sorted id array, by binary search (no hash set, no copy)."""
    values = np.asarray(values, np.int64)
    if not len(sorted_ids):
        return np.zeros(values.shape, bool)
    pos = np.clip(np.searchsorted(sorted_ids, values), 0, len(sorted_ids) - 1)
    return sorted_ids[pos] == values


def live_mask(image_ids: np.ndarray, part: int, tombstones: pa.Table) -> np.ndarray:
    """True for the rows of part `part` (ids `image_ids`) that are live: not tombstoned in that part."""
    image_ids = np.asarray(image_ids, np.int64)
    if tombstones.num_rows == 0 or not len(image_ids):
        return np.ones(len(image_ids), bool)
    parts = tombstones.column("part").to_numpy()
    dead = tombstones.column("image_id").to_numpy()[parts == part]  # sorted: the file is sorted by image_id
    return ~is_in(image_ids, dead)


PART_NAME = re.compile(r"^part-(\d+)\.parquet$")


def part_number(ref: FileRef) -> int:
    """The part a part file holds, from its name (`part-NNNNN.parquet`: numbers are unique along a lineage)."""
    found = PART_NAME.match(ref.name)
    if found is None:
        raise ValueError(f"{ref.path}: not a part file name (part-NNNNN.parquet): its rows cannot be matched to "
                         "their shard's tombstones")
    return int(found.group(1))


def id_selector(tombstoned_ids) -> "faiss.IDSelector":
    """A selector that passes every id except the tombstoned ones, for
    `faiss.SearchParametersIVF(sel=..., nprobe=...)`. The caller keeps the returned object (and
    through it the id array) alive while searching with it: faiss holds raw pointers."""
    ids = np.ascontiguousarray(np.asarray(tombstoned_ids, dtype=np.int64))
    batch = faiss.IDSelectorBatch(ids)
    selector = faiss.IDSelectorNot(batch)
    selector.referenced = (batch, ids)  # keep the inner selector and its ids alive with the outer one
    return selector


def search_params(selector, nprobe: int | None) -> "faiss.SearchParametersIVF | None":
    """Search parameters filtering through `selector` (None: no tombstones) at `nprobe`."""
    if selector is None and nprobe is None:
        return None
    params = faiss.SearchParametersIVF()
    if selector is not None:
        params.sel = selector
    if nprobe is not None:
        params.nprobe = int(nprobe)
    params.referenced = selector  # the params object must not outlive its selector
    return params


def shard_of_part(manifest: Manifest) -> dict[int, ShardRef]:
    """part number -> the shard that holds its vectors (part numbers are unique along a lineage)."""
    return {p: s for s in manifest.shards for p in s.parts}


class PartFilter:
    """Which rows of a version's part files (embeddings, catalog) are live.

    A part's rows are checked against the tombstones of the one shard holding that part. Only the
    last shard's tombstones are kept, so reading parts in manifest order (a shard's parts are
    consecutive) loads each shard's tombstones once and never holds more than one shard's.
    """

    def __init__(self, index: Location, manifest: Manifest):
        self.index = index
        self.shards = shard_of_part(manifest)
        self.any = any(s.tombstones is not None for s in manifest.shards)
        self._held: tuple[str, pa.Table] | None = None  # (tombstones path, its table)

    def mask(self, ref: FileRef, image_ids: np.ndarray) -> np.ndarray:
        """True for the live rows of the part file `ref` (its ids `image_ids`, in file order)."""
        if not self.any:
            return np.ones(len(image_ids), bool)
        part = part_number(ref)
        shard = self.shards.get(part)
        if shard is None and len(image_ids):  # (a part whose every image failed may be in no shard)
            raise IntegrityError(f"{where(self.index, ref)}: part {part} has rows but is in no shard of the version")
        if shard is None or shard.tombstones is None:
            return np.ones(len(image_ids), bool)
        if self._held is None or self._held[0] != shard.tombstones.path:
            self._held = (shard.tombstones.path, read_tombstones(self.index, shard))
        return live_mask(image_ids, part, self._held[1])

    def live_rows(self, ref: FileRef, table: pa.Table) -> pa.Table:
        """The table's live rows (it has an image_id column)."""
        keep = self.mask(ref, table.column("image_id").to_numpy())
        return table if keep.all() else table.filter(pa.array(keep))

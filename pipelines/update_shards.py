"""An update's shards: the live ones by reference, tombstones where the diff removed rows, delta
shards for the new parts, and compaction when tombstones or small deltas pile up.

Nothing here reads the gallery: the driver handles shard and part references (O(parts)), Ray
tasks read and write the rows. The diff's removed rows (image_id, part) are split by shard
through the part -> shard map, then each affected shard's tombstones are merged in one task (its
old tombstones + the new rows, restricted to ids the shard stores, so that `tombstoned` counts vectors). A shard whose tombstoned share passes
`index.compact_fraction` is compacted: its parts that have tombstoned rows are rewritten into the
new version's folder under the same part numbers (so the key index's part numbers stay right)
and the shard is rebuilt from them, without tombstones.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from mllm_index.pipelines.part_chunks import write_part_files
from mllm_index.storage.contracts import FileRef, Manifest, PartStats, ShardRef, read_contract, version_file, write_contract
from mllm_index.storage.faiss_store import stored_ids
from mllm_index.storage.integrity import load_faiss_verified, read_verified_parquet
from mllm_index.storage.key_runs import file_rows
from mllm_index.storage.shard_store import part_file, part_ref, shard_file
from mllm_index.storage.shard_vectors import load_ids
from mllm_index.storage.tombstones import (PART_NAME, TOMBSTONE_SCHEMA, is_in, live_mask, normalise, read_tombstones,
                                           tombstoned_ids, write_tombstones)
from mllm_index.storage.uris import Location

KINDS = ("embeddings", "catalog", "failures")
PartFiles = dict[str, FileRef]  # kind -> file


def part_files(manifest: Manifest) -> dict[int, PartFiles]:
    """part number -> its embeddings / catalog / failures files, wherever they live (from their names)."""
    out: dict[int, PartFiles] = defaultdict(dict)
    for kind in KINDS:
        for ref in getattr(manifest, kind):
            m = PART_NAME.match(ref.name)  # the failures listing file is not a part
            if m:
                out[int(m.group(1))][kind] = ref
    return dict(out)


def stats_files(version_name: str, stats: PartStats) -> PartFiles:
    return {k: part_ref(version_name, stats.part, k, stats.files) for k in KINDS}


# -- tombstones ---------------------------------------------------------------------------
def _split_removed(index: Location, ref: FileRef, shard_of: dict[int, int], scratch: str, tag: int) -> dict[int, int]:
    """Task: one removed-rows file split by the shard that holds each row's part; rows per shard."""
    table = read_verified_parquet(index, ref, columns=TOMBSTONE_SCHEMA.names).cast(TOMBSTONE_SCHEMA)
    parts = table.column("part").to_numpy()
    uniq, inverse = np.unique(parts, return_inverse=True)
    shards = np.array([shard_of.get(int(p), -1) for p in uniq], np.int64)[inverse] if len(parts) else parts
    out = {}
    for s in np.unique(shards):
        rows = table.filter(pa.array(shards == s))
        if s >= 0:
            index.write_parquet(rows, scratch, shard_file(int(s), "d"), f"from-{tag:05d}.parquet")
        out[int(s)] = rows.num_rows
    return out


def _stored(index: Location, shard: ShardRef) -> np.ndarray:
    if shard.ids is not None:
        return load_ids(index, shard.ids)
    return np.sort(stored_ids(load_faiss_verified(index, shard.file)))  # a shard from before the ids files


def _merge_tombstones(index: Location, version_name: str, shard: ShardRef, scratch: str) -> ShardRef:
    """Task: the shard's old tombstones + the new removed rows of ids it stores -> its new tombstone file."""
    folder = index.child(scratch, shard_file(shard.shard, "d"))
    new = pa.concat_tables([folder.read_parquet(n).cast(TOMBSTONE_SCHEMA) for n in folder.list_names()
                            if n.endswith(".parquet")])
    stored = _stored(index, shard)
    vector = is_in(new.column("image_id").to_numpy(), stored)
    table = normalise(pa.concat_tables([read_tombstones(index, shard), new.filter(pa.array(vector))]))
    ref = write_tombstones(index, version_file(version_name, "tombstones", shard_file(shard.shard, "parquet")), table)
    return shard.model_copy(update={"tombstones": ref, "tombstoned": int(len(tombstoned_ids(table)))})


def merge_tombstones(index: Location, version_name: str, shards: list[ShardRef], removed: list[FileRef]) -> list[ShardRef]:
    """The live shards with the diff's removed rows merged into their tombstones; untouched shards are
    returned as they were (same references: nothing of theirs is rewritten)."""
    if not removed:
        return list(shards)
    scratch = version_file(version_name, "tombstones", "split")
    index.delete(scratch)  # a re-run splits again from the same removed files
    shard_of = ray.put({p: s.shard for s in shards for p in s.parts})  # O(parts): stored once, not per task
    split = ray.remote(num_cpus=0.5)(_split_removed)
    hit: dict[int, int] = defaultdict(int)
    for counts in ray.get([split.remote(index, ref, shard_of, scratch, i) for i, ref in enumerate(removed)]):
        for s, n in counts.items():
            hit[s] += n
    if hit.get(-1):
        raise RuntimeError(f"{hit[-1]} removed row(s) name a part that no live shard holds: the plan does not belong "
                           "to the live version; re-run the update")
    merge = ray.remote(num_cpus=0.5)(_merge_tombstones)
    by_number = {s.shard: s for s in shards}
    merged = {s.shard: s for s in ray.get([merge.remote(index, version_name, by_number[n], scratch) for n in sorted(hit)])}
    index.delete(scratch)
    return [merged.get(s.shard, s) for s in shards]


# -- compaction ---------------------------------------------------------------------------
def _compact_parts(index: Location, version_name: str, shard: ShardRef, files: dict[int, PartFiles]) -> dict[int, PartFiles]:
    """Task: the shard's parts without its tombstoned rows; a part with tombstoned rows is rewritten into
    this version's folder (same part number, marker `compacted/part-NNNNN.json`), the others are kept."""
    version = index.child("versions", version_name)
    tombstones = read_tombstones(index, shard)
    dead_parts = set(tombstones.column("part").to_pylist())
    out = {}
    for part in shard.parts:
        marker = ("compacted", part_file(part, "json"))
        if part not in dead_parts:
            out[part] = files[part]
        elif version.exists(*marker):
            out[part] = dict(files[part], **read_contract(version, PartStats, *marker).files)
        else:
            tables = {}
            for kind in ("embeddings", "catalog"):
                t = read_verified_parquet(index, files[part][kind])
                tables[kind] = t.filter(pa.array(live_mask(t.column("image_id").to_numpy(), part, tombstones)))
            written = write_part_files(index, version_name, part, tables)
            rows = tables["embeddings"].num_rows
            dim = tables["embeddings"].schema.field("embedding").type.list_size
            write_contract(version, PartStats(part=part, rows=tables["catalog"].num_rows, indexed=rows, failed=0, dim=dim,
                                              carried_from=files[part]["embeddings"].path, files=written), *marker)
            out[part] = dict(files[part], **written)
    return out


def compact_parts(index: Location, version_name: str, shards: list[ShardRef], files: dict[int, PartFiles]
                  ) -> dict[int, PartFiles]:
    """The parts of `shards` without their tombstoned rows (one task per shard that has tombstones)."""
    task = ray.remote(num_cpus=1)(_compact_parts)
    out = {p: files[p] for s in shards if not s.tombstoned for p in s.parts}
    todo = [s for s in shards if s.tombstoned]
    for result in ray.get([task.remote(index, version_name, s, {p: files[p] for p in s.parts}) for s in todo]):
        out.update(result)
    return out


def _count_rows(index: Location, refs: dict[int, FileRef]) -> dict[int, int]:
    """Task: rows of each embeddings part, from the Parquet footers (no data read; retried, size checked)."""
    return {part: file_rows(index, [ref]) for part, ref in refs.items()}


def count_rows(index: Location, refs: dict[int, FileRef], per_task: int = 512) -> dict[int, int]:
    task = ray.remote(num_cpus=0.25)(_count_rows)
    items = sorted(refs.items())
    chunks = [dict(items[i : i + per_task]) for i in range(0, len(items), per_task)]
    out = {}
    for result in ray.get([task.remote(index, c) for c in chunks]):
        out.update(result)
    return out


@dataclass
class ShardPlan:
    """What an update (without retraining) does to the shards."""

    keep: list[ShardRef] = field(default_factory=list)  # referenced (tombstones possibly updated)
    compact: list[ShardRef] = field(default_factory=list)  # rebuilt under the same number, without tombstones
    groups: dict[int, list[int]] = field(default_factory=dict)  # new delta shards: number -> parts
    merged: list[ShardRef] = field(default_factory=list)  # small delta shards merged into `groups`


def small_deltas(shards: list[ShardRef], shard_size: int) -> list[ShardRef]:
    """Delta shards below a full shard: merged once there are too many of them (or on --compact)."""
    return [s for s in shards if s.delta and s.live < shard_size]


def plan_shards(shards: list[ShardRef], new_parts: dict[int, int], shard_size: int, part_size: int,
                compact_fraction: float, max_deltas: int, compact_all: bool) -> ShardPlan:
    """Decide, from counts only, which shards stay, which are compacted, and how the new parts (part ->
    vectors) and small delta shards are grouped into delta shards."""
    plan = ShardPlan()
    next_number = 1 + max((s.shard for s in shards), default=-1)
    per_shard = max(1, shard_size // part_size)
    order = sorted(new_parts)
    units: list[tuple[int, ShardRef | None, list[int]]] = []  # (live vectors, shard or None for new parts, parts)
    for i in range(0, len(order), per_shard):
        group = order[i : i + per_shard]
        units.append((sum(new_parts[p] for p in group), None, group))
    small = small_deltas(shards, shard_size)
    smalls = len(small) + sum(1 for n, _, _ in units if n < shard_size)
    if smalls > max_deltas or (compact_all and smalls > 1):
        units = [(s.live, s, list(s.parts)) for s in small] + units
        plan.merged = small
    bins: list[list[tuple[int, ShardRef | None, list[int]]]] = []
    for unit in units:  # greedy, in order: a bin holds at most shard_size live vectors
        if plan.merged and bins and sum(u[0] for u in bins[-1]) + unit[0] <= shard_size:
            bins[-1].append(unit)
        else:
            bins.append([unit])
    merged_numbers = set()
    for b in bins:
        if len(b) == 1 and b[0][1] is not None:  # a small delta alone in its bin stays as it is
            merged_numbers.add(b[0][1].shard)
            continue
        plan.groups[next_number] = sorted(p for _, _, parts in b for p in parts)
        next_number += 1
    plan.merged = [s for s in plan.merged if s.shard not in merged_numbers]
    gone = {s.shard for s in plan.merged}
    for s in shards:
        if s.shard in gone:
            continue
        due = s.tombstoned and (compact_all or s.tombstoned > compact_fraction * s.ntotal)
        (plan.compact if due else plan.keep).append(s)
    return plan

"""The index job's writer stage: Ray tasks write a part's rows as chunks, and the part once it is whole.

The driver never sees an embedding. The last stage of the embed pipeline is a Ray Data task
(`write_chunks`) that writes each batch's rows of a part as one chunk,
`chunks/part-NNNNN.d/<sha1 of the sorted ids>-<rows>.parquet`: a deterministic name (a retried
task rewrites the same file with the same rows) that carries its row count, so one listing
tells how much of the part is written. The task whose listing covers the part's rows merges
the chunks (sorted by image id, one row per id) into `embeddings|catalog|failures/part-NNNNN.parquet`
with checksummed references, then writes `stats/part-NNNNN.json` (PartStats) last, then deletes
the chunks. Two tasks completing the same part at once write the same bytes; the marker
records their digests.

Only one small row per (batch, part) reaches the driver: the part, the rows written, and the
PartStats JSON when the task finished the part (`STATS_COLUMNS`).

A run whose lock was taken over must not publish parts: the finishing task reads the index
lock and writes neither the part files nor the marker unless the lock still carries the run's
token; it reports `lock_lost`, and the driver's renewal then stops the run with `LockHeld`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from mllm_index.storage.catalog import CATALOG_SCHEMA, FAILURE_SCHEMA
from mllm_index.storage.contracts import FileRef, PartStats, read_contract, version_file, write_contract
from mllm_index.storage.integrity import write_parquet_ref
from mllm_index.storage.lock import LOCK
from mllm_index.storage.retry import with_retries
from mllm_index.storage.shard_store import part_file
from mllm_index.storage.uris import Location, redact

CHUNKS = "chunks"
# Every column a part's three files are cut from (catalog + failures columns, ok, retries; embedding added per dim).
_ROW_FIELDS = list(CATALOG_SCHEMA) + [pa.field(f.name, f.type) for f in FAILURE_SCHEMA if f.name not in CATALOG_SCHEMA.names] \
    + [pa.field("ok", pa.bool_()), pa.field("retries", pa.int32())]
STATS_COLUMNS = ("part", "rows", "finished", "lock_lost", "stats")  # all the driver receives


def chunk_name(image_ids: np.ndarray) -> str:
    """Deterministic for a set of rows, and carrying its size, so a listing alone counts a part's progress."""
    digest = hashlib.sha1(np.sort(np.asarray(image_ids, np.int64)).tobytes()).hexdigest()[:16]
    return f"{digest}-{len(image_ids)}.parquet"


def chunk_folder(part: int) -> tuple[str, str]:
    return CHUNKS, part_file(part, "d")


_PLANNED: dict[tuple[str, int], int] = {}  # per worker process: (version URI, part) -> planned rows


def planned_rows(version: Location, part: int) -> int:
    """A part's size from its plan file's Parquet footer (one small read per worker process and part;
    the plan is immutable once plan.json exists), so no per-part table travels with the tasks."""
    key = (version.uri, part)
    if key not in _PLANNED:
        path = version.path("plan", part_file(part))

        def read() -> int:
            with version.fs.open(path, "rb") as f:
                return pq.read_metadata(f).num_rows

        _PLANNED[key] = with_retries(read, f"read {redact(version.uri)}/plan/{part_file(part)}", version.retry)
    return _PLANNED[key]


def written_rows(version: Location, part: int) -> int:
    """Rows of a part in chunks, from one listing (a write in progress on a local disk is a .tmp-* file: not counted)."""
    return sum(int(n[: -len(".parquet")].rsplit("-", 1)[1]) for n in version.list_names(*chunk_folder(part))
               if n.endswith(".parquet"))


def chunk_table(batch: dict[str, np.ndarray], sel: np.ndarray) -> pa.Table:
    """The selected rows with every column the part files need; the embedding stays float16."""
    batch = batch if "retries" in batch else {**batch, "retries": np.zeros(len(batch["ok"]), np.int32)}
    cols = {f.name: pa.array(batch[f.name][sel], f.type) for f in _ROW_FIELDS}
    emb = np.ascontiguousarray(batch["embedding"][sel], dtype=np.float16)
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), emb.shape[1])
    return pa.table(cols)


def lock_is_ours(index: Location, token: str | None) -> bool:
    """Whether the index lock still carries this run's token (None: the caller holds no lock, e.g. a notebook)."""
    if token is None:
        return True
    try:
        return index.read_json(LOCK).get("token") == token
    except FileNotFoundError:
        return False


def write_part_files(index: Location, version_name: str, part: int, tables: dict[str, pa.Table]) -> dict[str, FileRef]:
    """A part's embeddings / catalog / failures files, each with its size and checksum."""
    return {kind: write_parquet_ref(index, version_file(version_name, kind, part_file(part)), table)
            for kind, table in tables.items()}


def part_stats(index: Location, version_name: str, part: int, rows: pa.Table) -> PartStats:
    """Write one whole part's three files from its rows (one per image id); the stats marker comes last."""
    ok = rows.column("ok")
    good, bad = rows.filter(ok), rows.filter(pc.invert(ok))
    files = write_part_files(index, version_name, part, {
        "embeddings": good.select(["image_id", "embedding"]),
        "catalog": good.select(CATALOG_SCHEMA.names).cast(CATALOG_SCHEMA),
        "failures": bad.select(FAILURE_SCHEMA.names).cast(FAILURE_SCHEMA)})
    stats = PartStats(part=part, rows=rows.num_rows, indexed=good.num_rows, failed=bad.num_rows,
                      errors=dict(Counter(bad.column("error_type").to_pylist())),
                      dim=rows.schema.field("embedding").type.list_size, files=files,
                      retries=int(pc.sum(rows.column("retries")).as_py() or 0))
    write_contract(index.child("versions", version_name), stats, "stats", part_file(part, "json"))  # the done marker
    return stats


def merged_rows(version: Location, part: int) -> pa.Table | None:
    """The part's chunks as one table sorted by image id, one row per id (a chunk written twice by a
    stale task of an interrupted run overlaps others: same ids, same content). None if the folder is gone."""
    folder = chunk_folder(part)
    try:
        names = [n for n in version.list_names(*folder) if n.endswith(".parquet")]
        if not names:
            return None
        table = pa.concat_tables([version.read_parquet(*folder, n) for n in names])
    except FileNotFoundError:  # another task finished the part and deleted its chunks meanwhile
        return None
    ids = table.column("image_id").to_numpy()
    _, first = np.unique(ids, return_index=True)  # ascending ids; the first chunk (by name) of a repeated id
    return table.take(pa.array(first))


def finish_part(index: Location, version_name: str, part: int, rows: int, token: str | None) -> tuple[PartStats | None, bool]:
    """(stats, lock_lost): merge a part whose chunks cover its rows, publish its files and marker,
    delete the chunks. (None, False) when the chunks do not cover the part after all.

    A part with a marker is done (the driver deletes the markers of parts it redoes before the run):
    its marker is returned and nothing is rewritten, so a task retried after the part finished
    cannot replace files that the marker's digests describe."""
    version = index.child("versions", version_name)
    marker = ("stats", part_file(part, "json"))
    if version.exists(*marker):
        return read_contract(version, PartStats, *marker), False
    table = merged_rows(version, part)
    if table is None:
        return (read_contract(version, PartStats, *marker), False) if version.exists(*marker) else (None, False)
    if table.num_rows < rows:
        return None, False
    if table.num_rows > rows:
        raise ValueError(f"part {part} of {version_name}: its chunks hold {table.num_rows} distinct images, the plan "
                         f"{rows}; chunks from another plan? Delete {version_file(version_name, *chunk_folder(part))} and re-run")
    if not lock_is_ours(index, token):
        return None, True
    stats = part_stats(index, version_name, part, table)
    version.delete(*chunk_folder(part))
    return stats, False


def write_chunks(batch: dict[str, np.ndarray], *, index: Location, version_name: str,
                 token: str | None) -> dict[str, np.ndarray]:
    """Ray Data task: write this batch's chunk of each part it holds; finish the parts it completes.

    Returns one small row per part in the batch (STATS_COLUMNS): no embedding leaves this task.
    """
    version = index.child("versions", version_name)
    parts = np.asarray(batch["part"], np.int64)
    out: dict[str, list] = {c: [] for c in STATS_COLUMNS}
    for part in np.unique(parts).tolist():
        sel = np.flatnonzero(parts == part)
        version.write_parquet(chunk_table(batch, sel), *chunk_folder(part), chunk_name(batch["image_id"][sel]))
        stats, lost, rows = None, False, planned_rows(version, part)
        if written_rows(version, part) >= rows:
            stats, lost = finish_part(index, version_name, part, rows, token)
        for column, value in zip(STATS_COLUMNS, (part, len(sel), stats is not None, lost,
                                                 stats.model_dump_json() if stats else "")):
            out[column].append(value)
    return {"part": np.array(out["part"], np.int64), "rows": np.array(out["rows"], np.int64),
            "finished": np.array(out["finished"], bool), "lock_lost": np.array(out["lock_lost"], bool),
            "stats": np.array(out["stats"], dtype=object)}


def add_writer_stage(ds: "ray.data.Dataset", index: Location, version_name: str, token: str | None,
                     num_cpus: float) -> "ray.data.Dataset":
    """The embed pipeline's last stage: tasks write what the actors embedded (batch_size None: one call per
    embedded block, so a part's chunks are as large as the embed batches). Writing is mostly I/O: the
    caller gives these tasks a small CPU share."""
    return ds.map_batches(write_chunks, batch_size=None, batch_format="numpy", num_cpus=num_cpus,
                          fn_kwargs=dict(index=index, version_name=version_name, token=token))


def clear_unfinished_chunks(version: Location, todo: list[int]) -> None:
    """Before a run: chunks of parts without a marker are an interrupted run's scratch; the part is redone whole."""
    todo_names = {part_file(p, "d") for p in todo}
    for name in version.list_names(CHUNKS):
        if name in todo_names:
            version.delete(CHUNKS, name)


def finished_stats(ds: "ray.data.Dataset", renew: Callable[[], None]) -> Iterator[PartStats]:
    """The parts the writer tasks finished, as their stats rows reach the driver. `renew` (the lock's)
    is called when a writer found the lock taken over (it raises) and at least once a minute."""
    last = time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if batch["lock_lost"].any() or time.time() - last > 60:
            renew()
            last = time.time()
        for text in batch["stats"][batch["finished"]]:
            yield PartStats.model_validate_json(text)


def pause_for_fault_tests(parts_done: int) -> None:
    """MLLM_INDEX_PAUSE_AFTER_PARTS=N parks the driver once N finished parts have reached it, so a
    test (or an operator rehearsing a failure) can kill it at a known point and check the resume."""
    limit = os.environ.get("MLLM_INDEX_PAUSE_AFTER_PARTS")
    if limit and parts_done >= int(limit):
        print(f"paused after {parts_done} parts (MLLM_INDEX_PAUSE_AFTER_PARTS)", flush=True)
        time.sleep(3600)


"""`mllm-index verify`: read every file a version references, check it, and check the counts add up.

Each file is read once (a few in parallel, one at a time per thread, so memory is bounded by
the largest file, not the version), checked against its recorded size and sha256, and then
parsed as what it is: FAISS indexes load and hold the vectors the manifest says, Parquet parts
have their columns, codebooks are plain arrays, a shard's tombstones are sorted, name only ids the
shard holds (when it has an ids file) and parts it was built from, as many as the manifest's
`tombstoned`, and a shard's catalog file (storage/shard_catalog.py) holds exactly the shard's ids
(its ids file, or the FAISS shard's ids) in order. The counts must reconcile: vectors in the shards = rows of embeddings = rows of
catalog = the manifest's `indexed` + tombstoned (tombstoned rows stay in their parts until
compaction), failure rows = `failed`, and seen = indexed + failed + skipped. Only counts travel
between files, never ids (a shard's tombstones are checked against that shard's ids alone), so
verifying a billion-image version needs no more memory than verifying its largest shard.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from mllm_index.storage.contracts import FileRef, Manifest, ShardRef
from mllm_index.storage.integrity import IntegrityError, read_verified, where
from mllm_index.storage.shard_catalog import COLUMNS as SHARD_CATALOG_COLUMNS
from mllm_index.storage.shard_vectors import load_ids, load_npy
from mllm_index.storage.tombstones import is_in, read_tombstone_file
from mllm_index.storage.uris import Location, redact
from mllm_index.storage.versions import is_published, list_versions, read_latest, read_manifest


@dataclass
class VersionCheck:
    version: str
    files: int = 0
    checksummed: int = 0  # files verified by sha256; the rest (format 1) by size and structure
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def _parquet_rows(data: bytes, columns: list[str]) -> int:
    meta = pq.ParquetFile(io.BytesIO(data))
    missing = [c for c in columns if c not in meta.schema_arrow.names]
    if missing:
        raise ValueError(f"missing column(s) {missing}")
    pq.read_table(io.BytesIO(data), columns=columns)  # the data pages decode, not only the footer
    return meta.metadata.num_rows


def _check_tombstones(index: Location, shard: ShardRef) -> tuple[int, int]:
    """(tombstoned ids, bytes read) of a shard's tombstone file, checked against the shard."""
    table = read_tombstone_file(index, shard.tombstones)  # verified: checksum, schema, sorted by id
    ids = table.column("image_id").to_numpy()
    at = where(index, shard.tombstones)
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        raise IntegrityError(f"{at}: an id is tombstoned twice (a shard holds an id once)")
    if len(ids) != shard.tombstoned:
        raise IntegrityError(f"{at}: {len(ids)} tombstoned ids, the manifest records {shard.tombstoned} for shard "
                             f"{shard.shard}")
    stray = sorted(set(table.column("part").to_numpy().tolist()) - set(shard.parts))
    if stray:
        raise IntegrityError(f"{at}: tombstones in part(s) {stray[:5]}, which shard {shard.shard} was not built from")
    read = shard.tombstones.bytes or 0
    if shard.ids is not None and len(ids):
        unknown = ids[~is_in(ids, load_ids(index, shard.ids))]
        if len(unknown):
            raise IntegrityError(f"{at}: {len(unknown)} tombstoned id(s) not in the shard (e.g. {int(unknown[0])}): "
                                 "their stale vectors elsewhere would still be searched")
        read += shard.ids.bytes or 0
    return len(ids), read


def _shard_ids(index: Location, shard: ShardRef) -> tuple[np.ndarray, int]:
    """(the shard's sorted ids, bytes read): its ids file, or the FAISS shard's own ids."""
    if shard.ids is not None:
        return load_ids(index, shard.ids), shard.ids.bytes or 0
    from mllm_index.storage.faiss_store import stored_ids
    from mllm_index.storage.integrity import load_faiss_verified

    return np.sort(stored_ids(load_faiss_verified(index, shard.file))), shard.file.bytes or 0


def _check_shard_catalog(index: Location, shard: ShardRef) -> tuple[int, int]:
    """(0, bytes read) of a shard's catalog file: checksum, columns, and image_id equal to the shard's
    ids in their order (a lookup trusts the shard the search names to hold the id's row)."""
    ref = shard.catalog
    data = read_verified(index, ref)
    at = where(index, ref)
    try:
        table = pq.read_table(io.BytesIO(data), columns=SHARD_CATALOG_COLUMNS)
    except Exception as exc:  # Arrow says what is wrong in its own words
        raise IntegrityError(f"{at}: not a readable shard catalog ({str(exc).splitlines()[0][:200]})") from None
    got = table.column("image_id").to_numpy()
    want, read = _shard_ids(index, shard)
    if not np.array_equal(got, want):
        differ = np.flatnonzero(got[: len(want)] != want[: len(got)])
        first = f"; first difference at row {int(differ[0])}" if len(differ) else ""
        raise IntegrityError(f"{at}: its image_id column ({len(got)} rows) is not shard {shard.shard}'s ids ({len(want)}) in "
                             f"order{first}: a candidate's catalog row would be missing or another image's")
    return 0, len(data) + read


def _check_file(index: Location, ref: FileRef, kind: str, manifest: Manifest, shard: ShardRef | None = None) -> tuple[int, int]:
    """(rows or vectors it holds, bytes read); IntegrityError naming the file if it does not verify."""
    if kind == "tombstones":
        return _check_tombstones(index, shard)
    if kind == "shard_catalog":
        return _check_shard_catalog(index, shard)
    data = read_verified(index, ref)
    try:
        if kind in ("trained", "shard"):
            from mllm_index.storage.faiss_store import index_from_bytes

            faiss_index = index_from_bytes(data)
            if faiss_index.d != manifest.dim or not faiss_index.is_trained:
                raise ValueError(f"dimension {faiss_index.d} (manifest: {manifest.dim}), trained={faiss_index.is_trained}")
            return int(faiss_index.ntotal), len(data)
        if kind == "array":
            load_npy(data)
            return 0, len(data)
        columns = {"embeddings": ["image_id", "embedding"], "catalog": ["image_id", "key", "uri", "offset", "length"],
                   "failures": ["uri", "stage", "error_type"]}[kind]
        return _parquet_rows(data, columns), len(data)
    except IntegrityError:
        raise
    except Exception as exc:  # faiss / Arrow / numpy say what is wrong in their own words
        raise IntegrityError(f"{where(index, ref)}: not a readable {kind} file ({str(exc).splitlines()[0][:200]})") from None


def verify_version(index: Location, version: str, threads: int = 8) -> VersionCheck:
    """Check one published version; problems are collected, not raised, so the report lists them all."""
    t0 = time.time()
    check = VersionCheck(version)
    try:
        manifest = read_manifest(index, version)
    except (ValueError, FileNotFoundError) as exc:
        check.problems.append(str(exc))
        return check
    jobs = [(manifest.trained, "trained"), *((s.file, "shard") for s in manifest.shards),
            *((f, "array") for s in manifest.shards for f in (s.ids, s.vectors) if f is not None),
            *((s.tombstones, "tombstones", s) for s in manifest.shards if s.tombstones is not None),
            *((s.catalog, "shard_catalog", s) for s in manifest.shards if s.catalog is not None),
            *((r, "embeddings") for r in manifest.embeddings), *((r, "catalog") for r in manifest.catalog),
            *((r, "failures") for r in manifest.failures),
            *((r, "array") for r in (manifest.model.files.values() if manifest.model else []))]
    rows: dict[str, int] = {}
    shard_vectors: dict[str, int] = {}

    def run(job):
        ref, kind, *shard = job
        try:
            return ref, kind, _check_file(index, ref, kind, manifest, *shard), None
        except IntegrityError as exc:
            return ref, kind, (0, 0), str(exc)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for ref, kind, (n, size), problem in pool.map(run, jobs):
            check.files += 1
            check.checksummed += ref.sha256 is not None
            check.bytes_read += size
            if problem:
                check.problems.append(problem)
                continue
            rows[kind] = rows.get(kind, 0) + n
            if kind == "shard":
                shard_vectors[ref.path] = n
    for shard in manifest.shards:
        n = shard_vectors.get(shard.file.path, shard.ntotal)
        if n != shard.ntotal:
            check.problems.append(f"{where(index, shard.file)}: holds {n} vectors, the manifest records {shard.ntotal}")
        if shard.tombstones is None and shard.tombstoned:
            check.problems.append(f"{where(index, shard.file)}: the manifest records {shard.tombstoned} tombstoned ids "
                                  "for this shard but no tombstone file")
    if not check.problems:
        check.problems += _reconcile(index, manifest, rows)
    check.seconds = round(time.time() - t0, 3)
    return check


def _reconcile(index: Location, m: Manifest, rows: dict[str, int]) -> list[str]:
    c = m.counts
    at = f"index {redact(index.uri)}, version {m.version}"
    found = {"vectors in the shards": rows.get("shard", 0), "embeddings rows": rows.get("embeddings", 0)}
    if m.catalog:
        found["catalog rows"] = rows.get("catalog", 0)
    dead = m.ntotal - m.live  # tombstoned: still stored in their shards and parts
    expected = f"the manifest's counts.indexed = {c.indexed}" + (f" + {dead} tombstoned" if dead else "")
    problems = [f"{at}: {what} = {n}, {expected}" for what, n in found.items() if n != c.indexed + dead]
    if m.failures and rows.get("failures", 0) != c.failed:
        problems.append(f"{at}: failures rows = {rows.get('failures', 0)}, the manifest's counts.failed = {c.failed}")
    if c.seen != c.indexed + c.failed + c.skipped:
        problems.append(f"{at}: counts do not reconcile: seen {c.seen} != indexed {c.indexed} + failed {c.failed} "
                        f"+ skipped {c.skipped}")
    return problems


def versions_to_verify(index: Location, version: str | None, every: bool) -> list[str]:
    if every:
        return [v for v in list_versions(index) if is_published(index, v)]
    chosen = version or read_latest(index)
    if chosen is None:
        raise FileNotFoundError(f"{index!r} has no published version (no LATEST)")
    return [chosen]


def format_checks(index: Location, checks: list[VersionCheck]) -> str:
    lines = [f"verify {redact(index.uri)}"]
    for c in checks:
        state = "OK" if c.ok else f"FAILED ({len(c.problems)} problem(s))"
        lines.append(f"  {c.version}: {state}: {c.files} files ({c.checksummed} by sha256, {c.files - c.checksummed} by "
                     f"size and structure), {c.bytes_read / 2**20:.1f} MiB read in {c.seconds:.2f}s")
        lines += [f"    - {p}" for p in c.problems[:50]]
        if len(c.problems) > 50:
            lines.append(f"    ... and {len(c.problems) - 50} more")
    return "\n".join(lines)

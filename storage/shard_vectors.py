"""Shard-aligned float16 vectors for the exact re-score: written with each shard, read row by row.

An exact re-score needs the float16 vectors of a shortlist of a few hundred candidates per
query. Holding every vector of a version for that (768 B per image at dim 384, more with the
copies made while loading) is what made a search actor grow with the gallery. So each shard
also gets `shard-NNNNN.ids.npy` (its ids, sorted, int64) and `shard-NNNNN.vectors.npy`
(float16, one row per sorted id). A reader keeps the ids in memory (8 B per image, to map an
id to its row), copies the vectors file to a local disk once, verifying its sha256 while it
streams, and reads only the shortlist's rows with positioned reads (`os.preadv`). Pages pass
through the OS page cache, not the process, so the reader's RSS does not grow with the file
(a memory map would: every page it touches counts in its RSS until it is unmapped).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from mllm_index.storage.contracts import FileRef, version_file
from mllm_index.storage.integrity import IntegrityError, digest, read_verified, where
from mllm_index.storage.tombstones import is_in, shard_tombstoned_ids
from mllm_index.storage.uris import Location

# numpy parses a .npy header with ast.literal_eval, and CPython's AST constructor keeps its recursion
# depth in per-interpreter state: two threads building ASTs at once can fail with "SystemError: AST
# constructor recursion depth mismatch" (CPython gh-106905). Seen in CI: `verify`, which reads files in a
# thread pool, reported a sound vectors file as unreadable. Every .npy header here is parsed under this lock
# (`npy_header`); the data is read outside it.
_NPY_HEADER = threading.Lock()
COPY_CHUNK = 8 << 20  # bytes per read while copying and hashing: bounds the copy's memory
PAIR_CHUNK = 1024  # (query, candidate) pairs scored at once: bounds the re-score's memory (~6 MB at dim 384)
READ_THREADS, READ_RUNS_PER_THREAD = 8, 256  # positioned reads in flight, for files not in the page cache


def shard_vector_names(shard: int) -> tuple[str, str]:
    return f"shard-{shard:05d}.ids.npy", f"shard-{shard:05d}.vectors.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_shard_vectors(version: Location, version_name: str, shard: int, ids: np.ndarray,
                        vectors: np.ndarray) -> tuple[FileRef, FileRef]:
    """Write the shard's sorted ids and its float16 vectors in that order; their references, with checksums."""
    order = np.argsort(ids, kind="stable")
    refs = []
    for name, array in zip(shard_vector_names(shard), (np.ascontiguousarray(ids[order], dtype=np.int64),
                                                      np.ascontiguousarray(vectors[order], dtype=np.float16))):
        data = npy_bytes(array)
        version.write_bytes(data, "shards", name)
        refs.append(digest(version_file(version_name, "shards", name), data))
    return refs[0], refs[1]


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy file open at its start; leaves `f` at the first data byte.
    The header's parse holds `_NPY_HEADER`, the rest (the data) does not."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy format version {version}")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    with _NPY_HEADER:
        return read_header(f)


def load_npy(data: bytes) -> np.ndarray:
    """A (writable) array from .npy bytes; never a pickle: object dtypes are refused."""
    f = io.BytesIO(data)
    shape, fortran, dtype = npy_header(f)
    if dtype.hasobject:
        raise ValueError("object arrays are not loaded (they are pickles)")
    try:
        view = np.ndarray(shape, dtype, buffer=data, offset=f.tell(), order="F" if fortran else "C")
    except TypeError as exc:  # the buffer is shorter than the header says
        raise ValueError(f"truncated .npy data: {exc}") from None
    return view.copy(order="K")


def load_ids(index: Location, ref: FileRef) -> np.ndarray:
    """A shard's sorted ids, verified (checksum, dtype, shape, order)."""
    data = read_verified(index, ref)
    try:
        ids = load_npy(data)
    except (ValueError, OSError) as exc:
        raise IntegrityError(f"{where(index, ref)}: not a readable .npy file ({exc})") from None
    if ids.dtype != np.int64 or ids.ndim != 1 or (len(ids) > 1 and not (ids[1:] > ids[:-1]).all()):
        raise IntegrityError(f"{where(index, ref)}: not a strictly increasing int64 id array "
                             f"(dtype {ids.dtype}, shape {ids.shape})")
    return ids


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "mllm-index-cache")


def _hash_local(path: str) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _check(index: Location, ref: FileRef, size: int, sha: str) -> None:
    if ref.bytes is not None and size != ref.bytes:
        raise IntegrityError(f"{where(index, ref)}: {size} bytes, the manifest records {ref.bytes} (truncated or replaced)")
    if ref.sha256 is not None and sha != ref.sha256:
        raise IntegrityError(f"{where(index, ref)}: sha256 mismatch (the file was modified or corrupted after it was written)")


def local_copy(index: Location, ref: FileRef, cache_dir: str | None = None) -> str:
    """Path of a verified copy of `ref` on this machine's disk.

    A file on a local filesystem is verified where it is (streamed, never held in memory).
    Any other is streamed into `cache_dir` under its sha256, hashed on the way, and renamed into
    place only if it matches: the cache holds only verified files, so a later reader on this
    machine (another actor of the same group) reuses it without reading it again.
    """
    if isinstance(index.fs, LocalFileSystem):
        path = index.path(ref.path)
        try:
            _check(index, ref, *_hash_local(path))
        except FileNotFoundError:
            raise IntegrityError(f"{where(index, ref)}: missing") from None
        return path
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, f"{ref.sha256 or uuid.uuid4().hex}{os.path.splitext(ref.path)[1]}")
    if ref.sha256 and os.path.exists(target) and (ref.bytes is None or os.path.getsize(target) == ref.bytes):
        return target

    def copy() -> str:
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        sha, size = hashlib.sha256(), 0
        try:
            with index.fs.open(index.path(ref.path), "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(COPY_CHUNK):
                    sha.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
            _check(index, ref, size, sha.hexdigest())
            os.replace(tmp, target)  # atomic: readers see no file or the whole verified one
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return target

    try:
        return index._retry(copy, "copy", ref.path)
    except FileNotFoundError:
        raise IntegrityError(f"{where(index, ref)}: missing") from None


_POOL: list[ThreadPoolExecutor] = []


def _read_pool() -> ThreadPoolExecutor:
    """One pool per process, made on first use (a search actor reads its shards' files with it)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(READ_THREADS, thread_name_prefix="vector-read"))
    return _POOL[0]


class VectorFile:
    """Rows of a local float16 .npy file, read on demand with positioned reads."""

    def __init__(self, path: str, label: str = ""):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            with open(path, "rb") as f:
                shape, fortran, dtype = npy_header(f)
                self.offset = f.tell()
        except ValueError as exc:
            os.close(self.fd)
            raise IntegrityError(f"{label or path}: not a readable .npy file ({exc})") from None
        if dtype != np.float16 or len(shape) != 2 or fortran:
            os.close(self.fd)
            raise IntegrityError(f"{label or path}: expected a C-order float16 (n, dim) array, got {dtype} {shape}")
        self.rows, self.dim = shape
        self.row_bytes = self.dim * 2

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of `rows` (sorted, unique), one positioned read per run of consecutive rows.

        Runs are split over a few threads (the reads release the GIL), so that a file not in
        the page cache is read with several requests in flight, as an SSD wants.
        """
        out = np.empty((len(rows), self.dim), np.float16)
        if not len(rows):
            return out
        view = memoryview(out).cast("B")
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts, ends = np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist()
        first_rows = rows[starts].tolist()

        def read_runs(lo: int, hi: int) -> None:
            rb = self.row_bytes
            for a, b, row in zip(starts[lo:hi], ends[lo:hi], first_rows[lo:hi]):
                if os.preadv(self.fd, [view[a * rb : b * rb]], self.offset + row * rb) != (b - a) * rb:
                    raise IntegrityError(f"{self.path}: short read at row {row} (the file changed after it was verified)")

        n = len(starts)
        if n < 4 * READ_RUNS_PER_THREAD:
            read_runs(0, n)
            return out
        step = -(-n // READ_THREADS)
        list(_read_pool().map(lambda lo: read_runs(lo, lo + step), range(0, n, step)))
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        try:
            self.close()
        except OSError:
            pass


def pair_scores(queries: np.ndarray, vectors: np.ndarray, metric: str) -> np.ndarray:
    """Exact score of each (query row, vector row) pair: one reduction per pair, so a pair's score
    does not depend on which other pairs are scored with it (group stages and the in-memory
    re-score agree bit for bit)."""
    v = vectors.astype(np.float32)
    if metric == "ip":
        return (v * queries).sum(axis=1, dtype=np.float32)
    return ((v - queries) ** 2).sum(axis=1, dtype=np.float32)


class ShardRescorer:
    """Exact scores for the candidates held by some shards: their sorted ids in memory, their
    vectors read row by row from verified local copies.

    A shard's tombstoned ids are not its candidates: a changed id is stored in its old shard
    (tombstoned) and in a delta shard (live), and only the live vector may score it, whichever
    shard (or group stage) comes first."""

    def __init__(self, index: Location, shards: list, cache_dir: str | None = None):
        missing = [s.shard for s in shards if s.ids is None or s.vectors is None]
        if missing:
            raise ValueError(f"shards {missing} have no ids/vectors files (built before them): re-score from the "
                             "embeddings parts instead")
        self.ids = [load_ids(index, s.ids) for s in shards]
        self.dead = [shard_tombstoned_ids(index, s) if s.tombstones is not None else np.zeros(0, np.int64)
                     for s in shards]
        self.files = []
        for s, ids in zip(shards, self.ids):
            f = VectorFile(local_copy(index, s.vectors, cache_dir), where(index, s.vectors))
            if f.rows != len(ids):
                raise IntegrityError(f"{where(index, s.vectors)}: {f.rows} rows for {len(ids)} ids")
            self.files.append(f)
        self.dim = self.files[0].dim if self.files else None

    def exact(self, queries: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
        """(nq, depth) exact scores of the candidates `ids` these shards hold, NaN for the others."""
        out = np.full(ids.shape, np.nan, np.float32)
        for shard_ids, dead, f in zip(self.ids, self.dead, self.files):
            if not len(shard_ids):
                continue
            rows = np.clip(np.searchsorted(shard_ids, ids), 0, len(shard_ids) - 1)
            held = (ids >= 0) & (shard_ids[rows] == ids)
            if len(dead):
                held &= ~is_in(ids, dead)
            q_idx, pos = np.nonzero(held)
            for a in range(0, len(q_idx), PAIR_CHUNK):
                qi, pi = q_idx[a : a + PAIR_CHUNK], pos[a : a + PAIR_CHUNK]
                wanted, inverse = np.unique(rows[qi, pi], return_inverse=True)
                out[qi, pi] = pair_scores(queries[qi], f.read(wanted)[inverse], metric)
        return out

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.ids) + sum(d.nbytes for d in self.dead)

    def close(self) -> None:
        for f in self.files:
            f.close()

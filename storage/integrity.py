"""Checksums of the files a version is made of: recorded when written, verified when read.

Every file a manifest references carries its size and sha256 (format 2), computed from the
bytes in hand when the file is written, so recording costs no extra read. Readers check
both before use: a flipped byte in a shard is an error naming the index, the version and
the file, not a silently different answer. Versions written before checksums (format 1)
are checked by size where recorded, and by structure (the file must parse).
"""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.parquet as pq

from mllm_index.storage.contracts import FileRef
from mllm_index.storage.uris import Location, parquet_bytes, redact


class IntegrityError(ValueError):
    """A referenced file is missing, has the wrong size or checksum, or does not parse."""


def digest(path: str, data: bytes) -> FileRef:
    """The reference of a file with these bytes."""
    return FileRef(path=path, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def write_ref(index: Location, path: str, data: bytes) -> FileRef:
    """Write a file (path relative to the index root) and return its reference with size and checksum."""
    index.write_bytes(data, path)
    return digest(path, data)


def write_parquet_ref(index: Location, path: str, table: pa.Table) -> FileRef:
    return write_ref(index, path, parquet_bytes(table))


def where(index: Location, ref: FileRef) -> str:
    parts = ref.path.split("/")
    version = f", version {parts[1]}" if len(parts) > 2 and parts[0] == "versions" else ""
    return f"index {redact(index.uri)}{version}, file {ref.path}"


def wrong_size(index: Location, ref: FileRef, size: int) -> str:
    return f"{where(index, ref)}: {size} bytes, the manifest records {ref.bytes} (truncated or replaced)"


def check_bytes(index: Location, ref: FileRef, data: bytes) -> bytes:
    """`data` if it is what `ref` recorded; IntegrityError naming the file otherwise."""
    if ref.bytes is not None and len(data) != ref.bytes:
        raise IntegrityError(wrong_size(index, ref, len(data)))
    if ref.sha256 is not None and hashlib.sha256(data).hexdigest() != ref.sha256:
        raise IntegrityError(f"{where(index, ref)}: sha256 mismatch (the file was modified or corrupted after it "
                             "was written)")
    return data


def read_verified(index: Location, ref: FileRef) -> bytes:
    """The file's bytes, checked against its reference before anyone uses them."""
    try:
        data = index.read_bytes(ref.path)
    except FileNotFoundError:
        raise IntegrityError(f"{where(index, ref)}: missing") from None
    return check_bytes(index, ref, data)


def read_verified_parquet(index: Location, ref: FileRef, columns: list[str] | None = None) -> pa.Table:
    data = read_verified(index, ref)
    try:
        return pq.read_table(io.BytesIO(data), columns=columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IntegrityError(f"{where(index, ref)}: not a readable Parquet file ({exc})") from None


def load_faiss_verified(index: Location, ref: FileRef):
    """A FAISS index from a verified file; a file that does not parse is named in the error."""
    from mllm_index.storage.faiss_store import index_from_bytes

    data = read_verified(index, ref)
    try:
        return index_from_bytes(data)
    except Exception as exc:  # faiss raises RuntimeError with its own C++ message, without the file name
        raise IntegrityError(f"{where(index, ref)}: not a readable FAISS index ({str(exc).splitlines()[0][:200]})") from None


def sizes_under(index: Location, folder: str) -> dict[str, int]:
    """path (relative to the index root) -> size of every file under a folder, from one recursive listing."""
    found = index.find(folder)  # retried; {} when the folder does not exist
    base = index.path()
    return {index.relative(p) if base != "/" else p.lstrip("/"): int(info.get("size") or 0) for p, info in found.items()}


def absent_or_resized(index: Location, refs: list[FileRef]) -> list[tuple[FileRef, str]]:
    """(reference, problem) for each referenced file that is missing or has another size, from
    listings only (one recursive listing per version folder: metadata, no data is read)."""
    folders = sorted({"/".join(r.path.split("/")[:2]) for r in refs})
    sizes: dict[str, int] = {}
    for folder in folders:
        sizes.update(sizes_under(index, folder))
    problems = []
    for ref in refs:
        if ref.path not in sizes:
            problems.append((ref, f"{where(index, ref)}: missing"))
        elif ref.bytes is not None and sizes[ref.path] != ref.bytes:
            problems.append((ref, wrong_size(index, ref, sizes[ref.path])))
    return problems


def check_present(index: Location, refs: list[FileRef]) -> list[str]:
    """A job runs this before it publishes, so no manifest references a file that is not there as written."""
    return [problem for _, problem in absent_or_resized(index, refs)]

"""Table schemas shared by the jobs, and the stable image ids.

An image id is a hash of (source URI, key): the same image gets the same id on every
run, so a re-run overwrites instead of duplicating, and the nightly diff can match ids.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

# Where an entry's bytes live: a whole file, a tar member, or one cell of a Parquet file.
KIND_FILE, KIND_TAR, KIND_PARQUET = "file", "tar", "parquet"

ENTRY_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("key", pa.string()),
        ("uri", pa.string()),
        ("kind", pa.string()),
        # file/tar: byte offset and length for one ranged read;
        # parquet: offset = row index in the file, length = byte size of the cell.
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("etag", pa.string()),
    ]
)

CATALOG_SCHEMA = pa.schema(list(ENTRY_SCHEMA) + [("width", pa.int32()), ("height", pa.int32())])

FAILURE_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("uri", pa.string()),
        ("key", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)


def image_id(source_uri: str, key: str) -> int:
    """Stable positive int64 id of `key` within a source (blake2b, 63 bits)."""
    digest = hashlib.blake2b(f"{source_uri}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def image_ids(source_uri: str, keys: list[str]) -> np.ndarray:
    return np.fromiter((image_id(source_uri, k) for k in keys), dtype=np.int64, count=len(keys))


def failure_row(entry: dict, stage: str, error_type: str, message: str) -> dict:
    """A failures-table row for a catalog entry (message capped so one row stays small)."""
    return {
        "image_id": entry.get("image_id"),
        "uri": entry.get("uri"),
        "key": entry.get("key"),
        "stage": stage,
        "error_type": error_type,
        "message": str(message)[:500],
    }


def embeddings_table(ids: np.ndarray, vectors: np.ndarray) -> pa.Table:
    """Embeddings kept as float16 next to the index, for an exact re-score of a shortlist."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    values = pa.array(vectors.reshape(-1), type=pa.float16())
    column = pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])
    return pa.table({"image_id": pa.array(ids, pa.int64()), "embedding": column})


def embeddings_from_table(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, vectors float16 (n, dim)) from an embeddings table."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return table.column("image_id").to_numpy(), vectors

"""Write galleries in the three source layouts to any fsspec location."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from mllm_index.storage.uris import Location


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parquet_bytes(rows: dict[str, bytes], hf_struct: bool = False, row_group_size: int = 4) -> bytes:
    keys = list(rows)
    if hf_struct:  # the layout of a Hugging Face `Image` feature
        images = pa.array([{"bytes": rows[k], "path": k} for k in keys], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        images = pa.array([rows[k] for k in keys], pa.binary())
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": keys, "image": images}), buf, row_group_size=row_group_size)
    return buf.getvalue()


def write_files(root: Location, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        root.write_bytes(data, name)

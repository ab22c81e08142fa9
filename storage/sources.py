"""Gallery sources: list what a source holds, and fetch one entry's bytes.

Three layouts, mixed freely under one prefix (each file is handled by its extension):
loose image files, WebDataset / img2dataset tar shards (image members by extension,
key = member stem), and Parquet files with an image-bytes column and a key column.
Listing records, per image, where its bytes are (uri, offset, length) so that any
image can later be fetched with one ranged read, tar members included.

Every storage call here is retried under the policy the storage options carry (see
`storage.retry`): the walk, each container scan, each ranged read that fails alone.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mllm_index.storage.catalog import ENTRY_SCHEMA, KIND_FILE, KIND_PARQUET, KIND_TAR, failure_row, image_id
from mllm_index.storage.retry import is_transient, thread_retries, with_retries
from mllm_index.storage.uris import Location, redact

DEFAULT_IMAGE_EXTENSIONS = (
    "jpg", "jpeg", "jpe", "png", "gif", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "pbm", "pnm",
    "ico", "jp2", "j2k", "avif", "heic", "heif", "svg",
)  # fmt: skip
CONTAINER_EXTENSIONS = {"tar": KIND_TAR, "parquet": KIND_PARQUET}


@dataclass
class SourceSpec:
    """What to read: plain values, so storage needs no config classes."""

    uri: str
    format: str = "auto"  # auto | files | webdataset | parquet
    image_extensions: tuple[str, ...] | list[str] | None = DEFAULT_IMAGE_EXTENSIONS
    image_column: str = "image"
    key_column: str | None = "key"
    storage_options: dict = field(default_factory=dict)
    uri_column: str | None = None  # Parquet tables that point at images (key + uri) instead of holding them

    def __post_init__(self):
        """Extensions compare lower-case and without the dot; None or empty means the built-in list."""
        self.image_extensions = tuple(e.lower().lstrip(".") for e in self.image_extensions or DEFAULT_IMAGE_EXTENSIONS)

    def location(self) -> Location:
        return Location(self.uri, self.storage_options)


@dataclass
class Listing:
    """What a walk of the source found, before containers are opened."""

    files: list[dict]  # entries of loose images
    containers: list[tuple[str, str, str]]  # (uri, kind, etag)
    skipped: Counter  # "extension" -> count, for files that are neither images nor containers


def _extension(name: str) -> str:
    base = posixpath.basename(name)
    return base.rsplit(".", 1)[-1].lower() if "." in base.lstrip(".") else ""


def _etag(info: dict) -> str:
    tag = info.get("ETag") or info.get("etag") or info.get("md5")
    if tag:
        return str(tag).strip('"')
    return f"{info.get('size')}-{info.get('mtime') or info.get('LastModified') or info.get('created')}"


def _wants(kind: str, fmt: str) -> bool:
    return fmt == "auto" or {"files": KIND_FILE, "webdataset": KIND_TAR, "parquet": KIND_PARQUET}[fmt] == kind


def _walk(loc: Location) -> tuple[dict[str, dict], bool]:
    """(path -> info of every file, whether the source is a folder); one retried unit."""
    loc.fs.invalidate_cache(loc.root)
    try:  # not fs.exists: for a bucket, s3fs answers False on any error, a throttled request included
        info = loc.fs.info(loc.root)
    except FileNotFoundError:
        raise FileNotFoundError(f"source {loc!r} does not exist") from None
    if info.get("type") == "directory":
        return loc.fs.find(loc.root, detail=True), True
    return {loc.root: info}, False


def classify(loc: Location, spec: SourceSpec, path: str, info: dict, is_dir: bool) -> tuple[str, object]:
    """What one listed file is: ("file", entry without image_id), ("container", (uri, kind, etag, size))
    or ("skip", extension label). Files with no extension are tried as images."""
    ext = _extension(path)
    kind = CONTAINER_EXTENSIONS.get(ext) or (KIND_FILE if ext in spec.image_extensions or ext == "" else None)
    if kind is None or not _wants(kind, spec.format):
        return "skip", ext or "(none)"
    uri = loc.full_uri(path)
    if kind == KIND_FILE:
        key = loc.relative(path) if is_dir else posixpath.basename(path)
        return "file", dict(key=key, uri=uri, kind=KIND_FILE, offset=0, length=int(info.get("size") or 0), etag=_etag(info))
    return "container", (uri, kind, _etag(info), int(info.get("size") or 0))


def classify_all(loc: Location, spec: SourceSpec, listed, is_dir: bool) -> tuple[list[dict], list[tuple], Counter]:
    """(loose image entries, containers, skipped by extension) of listed (path, info) files, in their order."""
    files, containers, skipped = [], [], Counter()
    for path, info in listed:
        what, item = classify(loc, spec, path, info, is_dir)
        if what == "skip":
            skipped[item] += 1
        elif what == "file":
            files.append(item)
        else:
            containers.append(item)
    return files, containers, skipped


def source_info(loc: Location) -> dict:
    """The source root's info (retried): a folder, or a single file."""
    def info() -> dict:
        loc.fs.invalidate_cache(loc.root)
        try:  # not fs.exists: for a bucket, s3fs answers False on any error, a throttled request included
            return loc.fs.info(loc.root)
        except FileNotFoundError:
            raise FileNotFoundError(f"source {loc!r} does not exist") from None

    return with_retries(info, f"list {redact(loc.uri)}", loc.retry)


def list_source(spec: SourceSpec) -> Listing:
    """Walk the source prefix recursively in this process (small sources: query sets).

    A gallery is listed by `pipelines.listing`, in parallel Ray tasks, with the same `classify`."""
    loc = spec.location()
    found, is_dir = with_retries(lambda: _walk(loc), f"list {redact(loc.uri)}", loc.retry)
    listed = ((path, found[path]) for path in sorted(found) if found[path].get("type") != "directory")
    files, containers, skipped = classify_all(loc, spec, listed, is_dir)
    return Listing(files, [c[:3] for c in containers], skipped)


def scan_tar(uri: str, etag: str, spec: SourceSpec) -> tuple[list[dict], Counter]:
    """Entries of a tar shard. Reads member headers only (seeks over the data)."""
    loc = spec.location()
    images = set(spec.image_extensions)
    entries, skipped = [], Counter()
    with loc.fs.open(loc.fs._strip_protocol(uri), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            ext = _extension(member.name)
            if ext not in images:
                skipped[f"tar:{ext or '(none)'}"] += 1
                continue
            stem = member.name[: -(len(ext) + 1)]
            entries.append(dict(key=stem, uri=uri, kind=KIND_TAR, offset=member.offset_data, length=member.size, etag=etag))
    return entries, skipped


def _image_bytes_column(column: pa.ChunkedArray) -> list:
    """Cells as bytes; accepts a binary column or a Hugging Face Image struct {bytes, path}."""
    if pa.types.is_struct(column.type):
        column = pa.chunked_array([chunk.field("bytes") for chunk in column.chunks])
    return column.to_pylist()


def scan_parquet(uri: str, etag: str, spec: SourceSpec) -> tuple[list[dict], Counter]:
    """Entries of a Parquet file: one per row; key from the key column or file/row."""
    loc = spec.location()
    with loc.fs.open(loc.fs._strip_protocol(uri), "rb") as f:
        pfile = pq.ParquetFile(f)
        names = pfile.schema_arrow.names
        if spec.image_column not in names and spec.uri_column in names:
            return _parquet_uri_entries(pfile, uri, spec), Counter()
        if spec.image_column not in names:
            raise KeyError(f"parquet {uri}: no image column {spec.image_column!r} (columns: {names})")
        key_col = spec.key_column if spec.key_column in names else None
        entries, row = [], 0
        for rg in range(pfile.num_row_groups):
            cols = [spec.image_column] + ([key_col] if key_col else [])
            table = pfile.read_row_group(rg, columns=cols)
            cells = _image_bytes_column(table.column(spec.image_column))
            keys = table.column(key_col).to_pylist() if key_col else [None] * len(cells)
            for cell, key in zip(cells, keys):
                key = str(key) if key is not None else f"{posixpath.basename(uri)}/{row}"
                entries.append(dict(key=key, uri=uri, kind=KIND_PARQUET, offset=row, length=len(cell or b""), etag=etag))
                row += 1
    return entries, Counter()


def _parquet_uri_entries(pfile: pq.ParquetFile, uri: str, spec: SourceSpec) -> list[dict]:
    """Rows of key + uri: each uri is a whole image file (length -1: read to the end)."""
    cols = [spec.uri_column] + ([spec.key_column] if spec.key_column in pfile.schema_arrow.names else [])
    table = pfile.read(columns=cols)
    uris = table.column(spec.uri_column).to_pylist()
    keys = table.column(spec.key_column).to_pylist() if len(cols) == 2 else [posixpath.basename(u or "") for u in uris]
    return [dict(key=str(k), uri=u, kind=KIND_FILE, offset=0, length=-1, etag="") for k, u in zip(keys, uris) if u]


def read_bboxes(uri: str, storage_options: dict, key_column: str = "key", bbox_column: str = "bbox") -> dict[str, tuple]:
    """key -> (x, y, w, h) from a Parquet or JSON-lines table (e.g. Revisited Oxford / ILIAS query boxes)."""
    data = Location(uri, storage_options).read_bytes()
    if uri.endswith((".jsonl", ".json")):
        import json

        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    else:
        import io

        table = pq.read_table(io.BytesIO(data))
        rows = table.select([key_column, bbox_column]).to_pylist() if bbox_column in table.column_names else []
    out = {}
    for row in rows:
        box = row.get(bbox_column)
        if box is not None:
            if len(box) != 4:
                raise ValueError(f"{uri}: bbox of {row.get(key_column)!r} must be [x, y, w, h], got {box}")
            out[str(row[key_column])] = tuple(float(v) for v in box)
    return out


def scan_container(uri: str, kind: str, etag: str, spec: SourceSpec) -> tuple[list[dict], Counter]:
    """Entries of a tar or Parquet container; a read that fails transiently scans it again."""
    scan = scan_tar if kind == KIND_TAR else scan_parquet
    return with_retries(lambda: scan(uri, etag, spec), f"scan {redact(uri)}", spec.location().retry)


def assign_ids(entries: list[dict], source_uri: str) -> tuple[pa.Table, list[dict]]:
    """Sort entries by location, give each a stable id, and turn repeated keys into failures.

    A key is the identity of an image within a source; when two entries share one (two
    shards with the same member stem, a sample with both .jpg and .png) the first in
    location order is kept and the others are reported, never indexed under one id twice.
    """
    entries = sorted(entries, key=lambda e: (e["uri"], e["offset"]))
    kept, failures, seen = [], [], {}
    for e in entries:
        e["image_id"] = image_id(source_uri, e["key"])
        if e["key"] in seen:
            failures.append(failure_row(e, "list", "duplicate_key", f"key {e['key']!r} already used by {seen[e['key']]}"))
            continue
        seen[e["key"]] = e["uri"]
        kept.append(e)
    return pa.Table.from_pylist(kept, schema=ENTRY_SCHEMA), failures


def fetch_bytes(entries: list[dict], storage_options: dict, image_column: str = "image") -> list[bytes | Exception]:
    """Bytes of each entry, in order; a read that fails (after its retries) gives its exception instead."""
    return fetch_bytes_counted(entries, storage_options, image_column)[0]


def fetch_bytes_counted(entries: list[dict], storage_options: dict,
                        image_column: str = "image") -> tuple[list[bytes | Exception], list[int]]:
    """`fetch_bytes`, and how many retries each entry's read took (a job sums them into its summary).

    File and tar entries go through one `cat_ranges` call (concurrent on object stores); one that
    fails transiently is read again alone, with backoff. Parquet entries are grouped so that each
    row group is read once per call; a group's retries are counted on its first entry.
    """
    out: list[bytes | Exception] = [b""] * len(entries)
    retries = [0] * len(entries)
    if not entries:
        return out, retries
    loc = Location(entries[0]["uri"], storage_options)
    fs = loc.fs
    ranged = [i for i, e in enumerate(entries) if e["kind"] != KIND_PARQUET]
    if ranged:
        paths = [fs._strip_protocol(entries[i]["uri"]) for i in ranged]
        starts = [int(entries[i]["offset"]) for i in ranged]
        ends = [int(entries[i]["offset"]) + int(entries[i]["length"]) if int(entries[i]["length"]) >= 0 else None for i in ranged]
        try:
            results = fs.cat_ranges(paths, starts, ends, on_error="return")
        except Exception as exc:  # a filesystem without on_error support, or a dead connection
            results = [exc] * len(ranged)
        for i, path, start, end, data in zip(ranged, paths, starts, ends, results):
            if is_transient(data):  # a throttled or dropped read: retried alone, with backoff
                before = thread_retries()
                try:  # the failed batch read was the first attempt; keywords: s3fs's second parameter is version_id
                    data = with_retries(lambda: fs.cat_file(path, start=start, end=end), f"read {redact(entries[i]['uri'])}",
                                        loc.retry, first_error=data)
                except Exception as exc:
                    data = exc
                retries[i] = thread_retries() - before
            out[i] = data
    by_file = defaultdict(list)
    for i, e in enumerate(entries):
        if e["kind"] == KIND_PARQUET:
            by_file[e["uri"]].append(i)
    for uri, idx in by_file.items():
        before = thread_retries()
        try:
            rows = [int(entries[i]["offset"]) for i in idx]
            cells = with_retries(lambda: _read_parquet_cells(fs, uri, rows, image_column), f"read {redact(uri)}", loc.retry)
            for i, cell in zip(idx, cells):
                out[i] = cell if cell is not None else b""
        except Exception as exc:
            for i in idx:
                out[i] = exc
        retries[idx[0]] += thread_retries() - before
    return out, retries


def _read_parquet_cells(fs, uri: str, rows: list[int], image_column: str) -> list[bytes | None]:
    with fs.open(fs._strip_protocol(uri), "rb") as f:
        pfile = pq.ParquetFile(f)
        starts, n = [], 0
        for rg in range(pfile.num_row_groups):
            starts.append(n)
            n += pfile.metadata.row_group(rg).num_rows
        groups: dict[int, list] = {}
        result = []
        for row in rows:
            rg = max(g for g, s in enumerate(starts) if s <= row)
            if rg not in groups:
                groups[rg] = _image_bytes_column(pfile.read_row_group(rg, columns=[image_column]).column(image_column))
            result.append(groups[rg][row - starts[rg]])
        return result

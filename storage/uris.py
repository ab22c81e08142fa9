"""One way to reach any storage: a `Location` is an fsspec URI plus storage options.

Everything in mllm-index reads and writes through `Location`, so local paths, `s3://`
(s3fs; AWS, MinIO, R2, moto via `AWS_ENDPOINT_URL` or `endpoint_url`) and `memory://`
behave the same. A Location pickles as (uri, options) and rebuilds its filesystem on
the other side, so it can be handed to Ray tasks without shipping open connections.
The options carry the job's retry policy (see `storage.retry`), so a Location rebuilt in
a worker retries exactly as the driver's does; every storage call it makes is retried.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from mllm_index.storage.retry import RetryPolicy, split_options, with_policy, with_retries

_CREDENTIAL_KEY = re.compile(r"^(key|secret|token)$|secret|password|passwd|credential|access_key|session_token", re.I)


_SECRET_PARAM = re.compile(r"signature|credential|token|secret|password|passwd|key", re.I)  # presigned URLs


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    """A table as the Parquet file every writer stores (zstd): one spelling, so equal tables give equal bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    return buf.getvalue()


class StorageError(RuntimeError):
    """A storage operation failed; the message never contains credentials."""


def find_credential_options(options: dict[str, Any], prefix: str = "") -> list[str]:
    """Names of option keys that look like credentials (they must come from the environment)."""
    found = []
    for name, value in (options or {}).items():
        dotted = f"{prefix}{name}"
        if _CREDENTIAL_KEY.search(str(name)):
            found.append(dotted)
        if isinstance(value, dict):
            found.extend(find_credential_options(value, dotted + "."))
    return found


def redact(uri: str) -> str:
    """Drop user:password@ from a URI and secret-looking query parameters before it is logged."""
    parts = urlsplit(uri)
    if not parts.scheme:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(
        p if not _SECRET_PARAM.search(p.split("=", 1)[0]) else p.split("=", 1)[0] + "=***"
        for p in parts.query.split("&")
        if p
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN")


def redact_text(text: str) -> str:
    """Scrub a free-form message (an exception text) of URI credentials and secret env values."""
    text = re.sub(r"([A-Za-z][\w+.-]*://)[^/@\s]+@", r"\1", text)
    text = re.sub(r"(?i)\b(secret|token|password|signature|credential)(\w*)=([^&\s]+)", r"\1\2=***", text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def normalize_uri(uri: str) -> str:
    """Canonical spelling of a URI: no trailing slash, `..` resolved, local paths absolute."""
    uri = uri.strip()
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        bucket, _, path = rest.partition("/")
        clean = posixpath.normpath("/" + path).lstrip("/") if path else ""
        return f"{scheme}://{bucket}/{clean}".rstrip("/") if clean else f"{scheme}://{bucket}"
    return posixpath.abspath(uri)


def is_under(uri: str, root: str) -> bool:
    uri, root = normalize_uri(uri), normalize_uri(root)
    return uri == root or uri.startswith(root.rstrip("/") + "/")


def check_under_roots(uri: str, roots: list[str], field: str) -> None:
    """Refuse URIs outside the configured roots (no-op when no roots are configured)."""
    if roots and not any(is_under(uri, root) for root in roots):
        raise StorageError(
            f"{field}: {redact(uri)} is outside the allowed roots "
            f"({', '.join(redact(r) for r in roots)}); set storage.allowed_roots to permit it"
        )


class Location:
    """A folder (or object prefix) on some filesystem, addressed by a URI.

    `retry` (or the policy the options carry) governs every call; None: `DEFAULT_POLICY`.
    `storage_options` keeps the policy, so a child, a pickled copy, or a task handed
    `location.storage_options` retries the same way; fsspec never sees it.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None):
        self.uri = normalize_uri(uri)
        fs_options, carried = split_options(storage_options)
        self.retry = retry or carried
        self.storage_options = with_policy(fs_options, self.retry)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **fs_options)
        self.root = self.root.rstrip("/") or "/"

    def __reduce__(self):
        return (Location, (self.uri, self.storage_options))

    def __repr__(self) -> str:
        return f"Location({redact(self.uri)!r})"

    # -- addressing ---------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Filesystem path (protocol stripped) of a child."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def child(self, *parts: str) -> "Location":
        return Location(posixpath.join(self.uri, *parts), self.storage_options)

    def relative(self, path: str) -> str:
        """Path of `path` relative to this location (paths as returned by fs.find)."""
        path = self.fs._strip_protocol(path)
        root = self.root.rstrip("/")
        if path == root:
            return ""
        if not path.startswith(root + "/"):
            raise StorageError(f"{redact(path)} is not under {redact(self.uri)}")
        return path[len(root) + 1 :]

    def full_uri(self, path: str) -> str:
        """URI (with protocol) of a filesystem path on this location's filesystem."""
        return self.fs.unstrip_protocol(path) if not isinstance(self.fs, LocalFileSystem) else path

    # -- reads ---------------------------------------------------------------------
    def _retry(self, call, verb: str, *parts: str):
        return with_retries(call, f"{verb} {redact(self.uri)}{'/' if parts else ''}{'/'.join(parts)}", self.retry)

    def exists(self, *parts: str) -> bool:
        def check() -> bool:
            # Other processes (Ray workers) write here: never trust this process's listings cache.
            self.fs.invalidate_cache(self.path(*parts))
            return self.fs.exists(self.path(*parts))

        return self._retry(check, "exists", *parts)

    def read_bytes(self, *parts: str) -> bytes:
        def read() -> bytes:
            # A listing cached by this process (s3fs) predates files that Ray workers wrote since: never trust it.
            self.fs.invalidate_cache(self.path(*parts))
            return self.fs.cat_file(self.path(*parts))

        return self._retry(read, "read", *parts)

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode("utf-8")

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def read_parquet(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(*parts)), columns=columns)

    def read_parquet_folder(self, *parts: str, columns: list[str] | None = None) -> pa.Table | None:
        """All .parquet files directly in a folder as one table (in name order); None if there are none."""
        names = [n for n in self.list_names(*parts) if n.endswith(".parquet")]
        return pa.concat_tables([self.read_parquet(*parts, n, columns=columns) for n in names]) if names else None

    def list_names(self, *parts: str) -> list[str]:
        """Names directly under a child folder; empty if it does not exist."""
        folder = self.path(*parts)
        self.fs.invalidate_cache(folder)
        try:
            entries = self._retry(lambda: self.fs.ls(folder, detail=False), "list", *parts)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def find(self, *parts: str) -> dict[str, dict]:
        """Every file under a child folder, recursively: fs path -> info (size, ETag, ...); {} if there is none."""
        folder = self.path(*parts)

        def walk() -> dict[str, dict]:
            self.fs.invalidate_cache(folder)  # written by other processes since this one last looked
            return self.fs.find(folder, detail=True)

        try:
            return self._retry(walk, "list", *parts)
        except FileNotFoundError:
            return {}

    # -- writes --------------------------------------------------------------------
    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole file so that readers see the old content or the new, never a part.

        Object stores publish a PUT atomically; on a local disk we write a temporary
        file and rename it over the target (rename is atomic within one filesystem).
        """
        target = self.path(*parts)
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, target)
        else:
            self._retry(lambda: self.fs.pipe_file(target, data), "write", *parts)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode("utf-8"), *parts)

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"), *parts)

    def write_parquet(self, table: pa.Table, *parts: str) -> None:
        self.write_bytes(parquet_bytes(table), *parts)

    def delete(self, *parts: str) -> None:
        try:
            self._retry(lambda: self.fs.rm(self.path(*parts), recursive=True), "delete", *parts)
        except FileNotFoundError:
            pass

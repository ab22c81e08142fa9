"""Transient storage errors are retried with backoff; permanent ones fail at once."""

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from mllm_index.storage import retry
from mllm_index.storage.retry import RetriesExhausted, RetryPolicy, with_retries
from mllm_index.storage.sources import fetch_bytes
from mllm_index.storage.uris import Location


class FlakyFS(MemoryFileSystem):
    """memory:// whose next `failures[op]` calls of an operation raise `error`."""

    protocol = "flaky"
    root_marker = "/"
    failures: dict = {}
    error: type = ConnectionError
    calls: dict = {}

    def _maybe_fail(self, op: str):
        FlakyFS.calls[op] = FlakyFS.calls.get(op, 0) + 1
        if FlakyFS.failures.get(op, 0) > 0:
            FlakyFS.failures[op] -= 1
            raise FlakyFS.error(f"injected {op} failure")

    def cat_file(self, path, start=None, end=None, **kw):
        self._maybe_fail("cat_file")
        return super().cat_file(path, start=start, end=end, **kw)

    def pipe_file(self, path, value, **kw):
        self._maybe_fail("pipe_file")
        return super().pipe_file(path, value, **kw)


@pytest.fixture
def flaky(monkeypatch):
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    monkeypatch.setattr(retry, "DEFAULT_POLICY", RetryPolicy(attempts=4, base_delay=0.01))
    FlakyFS.failures, FlakyFS.calls, FlakyFS.error = {}, {}, ConnectionError
    return Location("flaky://bucket/idx")


def test_transient_errors_are_retried_until_they_pass(flaky):
    FlakyFS.failures = {"pipe_file": 2, "cat_file": 3}
    flaky.write_bytes(b"payload", "a.bin")
    assert flaky.read_bytes("a.bin") == b"payload"
    assert FlakyFS.calls == {"pipe_file": 3, "cat_file": 4}


def test_a_persistent_outage_stops_with_a_clear_message(flaky):
    flaky.write_bytes(b"x", "a.bin")
    FlakyFS.failures = {"cat_file": 99}
    with pytest.raises(RetriesExhausted, match=r"read flaky://bucket/idx/a.bin: failed after 4 attempts: ConnectionError"):
        flaky.read_bytes("a.bin")


def test_permanent_errors_are_not_retried(flaky):
    FlakyFS.failures, FlakyFS.error = {"cat_file": 1}, PermissionError
    with pytest.raises(PermissionError):
        flaky.read_bytes("a.bin")
    assert FlakyFS.calls["cat_file"] == 1
    with pytest.raises(FileNotFoundError):
        flaky.read_bytes("missing.bin")


def test_image_reads_recover_from_transient_failures(flaky):
    flaky.write_bytes(b"0123456789", "img.bin")
    FlakyFS.failures = {"cat_file": 1}  # the first ranged read fails once, then the retry succeeds
    entries = [dict(uri="flaky://bucket/idx/img.bin", kind="file", offset=2, length=4)]
    assert fetch_bytes(entries, {}) == [b"2345"]


def test_with_retries_counts_attempts():
    calls = []

    def sometimes():
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("slow down")
        return "ok"

    assert with_retries(sometimes, "op", RetryPolicy(attempts=5, base_delay=0.001)) == "ok" and len(calls) == 3

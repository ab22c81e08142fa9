"""Transient storage errors are retried with backoff; permanent ones fail at once; one configured
policy travels with the storage options; retries are counted."""

import pickle
import threading

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from mllm_index.configs.schema import IndexJobConfig, load_config
from mllm_index.storage import retry
from mllm_index.storage.retry import (POLICY_KEY, RetriesExhausted, RetryMeter, RetryPolicy, split_options,
                                      thread_retries, with_policy, with_retries)
from mllm_index.storage.sources import fetch_bytes, fetch_bytes_counted
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

    def cat_file(self, path, version_id=None, start=None, end=None, **kw):  # s3fs's order: version_id comes second
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
    assert fetch_bytes(entries, {}) == [b"2345"]  # the range survives the retry (passed by keyword)


def test_with_retries_counts_attempts():
    calls = []

    def sometimes():
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("slow down")
        return "ok"

    assert with_retries(sometimes, "op", RetryPolicy(attempts=5, base_delay=0.001)) == "ok" and len(calls) == 3


def test_a_failure_already_seen_counts_as_the_first_attempt():
    calls = []

    def failing():
        calls.append(1)
        raise ConnectionError("reset")

    with pytest.raises(RetriesExhausted, match="failed after 3 attempts"):
        with_retries(failing, "op", RetryPolicy(attempts=3, base_delay=0), first_error=ConnectionError("reset"))
    assert len(calls) == 2
    with pytest.raises(PermissionError):  # a permanent first error is raised as it is
        with_retries(failing, "op", RetryPolicy(attempts=3, base_delay=0), first_error=PermissionError("denied"))
    assert len(calls) == 2


def test_the_policy_travels_with_the_storage_options_and_fsspec_never_sees_it(flaky):
    policy = RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0)
    options = with_policy({"note": "kept"}, policy)
    loc = Location("flaky://bucket/idx", options)
    assert loc.retry == policy and POLICY_KEY not in loc.fs.storage_options
    assert loc.fs.storage_options["note"] == "kept"
    for copy in (pickle.loads(pickle.dumps(loc)), loc.child("versions", "v000001"), Location("flaky://x", loc.storage_options)):
        assert copy.retry == policy  # a Ray task, a child folder, a worker given location.storage_options
    assert split_options(options) == ({"note": "kept"}, policy)
    assert Location("flaky://bucket/idx").retry is None  # plain options: DEFAULT_POLICY at call time

    FlakyFS.failures = {"cat_file": 5}
    loc.write_bytes(b"x", "a.bin")
    with pytest.raises(RetriesExhausted, match="failed after 2 attempts"):  # the carried policy, not the default's 4
        loc.read_bytes("a.bin")


def test_the_configured_policy_is_what_every_process_gets():
    cfg = load_config(IndexJobConfig, None, {"storage.options": {"endpoint_url": "http://127.0.0.1:9"}},
                      ["storage.retry.attempts=7", "storage.retry.base_delay=0.5", "storage.retry.max_delay=3"])
    options = cfg.storage.options_with_retry()
    assert split_options(options) == ({"endpoint_url": "http://127.0.0.1:9"}, RetryPolicy(7, 0.5, 3.0))
    assert cfg.storage.options == {"endpoint_url": "http://127.0.0.1:9"}  # the config itself is unchanged
    with pytest.raises(ValueError, match="attempts >= 1"):
        RetryPolicy(attempts=0)


def test_retries_are_counted_per_process_per_thread_and_per_entry(flaky):
    flaky.write_bytes(b"0123456789", "img.bin")
    flaky.write_bytes(b"abcdef", "other.bin")
    meter, before = RetryMeter(), thread_retries()
    FlakyFS.failures = {"cat_file": 3}  # the batch read of both fails, then the first entry's retry fails once more
    entries = [dict(uri=f"flaky://bucket/idx/{n}", kind="file", offset=0, length=-1) for n in ("img.bin", "other.bin")]
    payloads, counts = fetch_bytes_counted(entries, {})
    assert payloads == [b"0123456789", b"abcdef"] and counts == [2, 1]
    assert meter.count() == thread_retries() - before == 3
    assert meter.take() == 3 and meter.take() == 0

    seen = {}
    worker = threading.Thread(target=lambda: seen.update(mine=thread_retries()))
    worker.start()
    worker.join()
    assert seen["mine"] == 0  # another thread's reads are not this thread's
    import numpy as np

    FlakyFS.failures = {"cat_file": 1}
    flaky.read_bytes("img.bin")
    column = np.zeros(3, np.int32)
    column.setflags(write=False)  # as Ray Data hands batches out
    assert meter.add_to(column).tolist() == [1, 0, 0] and meter.add_to(column[:0]).tolist() == []


def test_jobs_hand_every_process_the_policy_carrying_options():
    """Where a job passes storage options on (to a Location, a task, an actor), it passes the ones with the policy."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    bare = [f"{path.relative_to(root)}:{n}" for folder in ("pipelines", "actors") for path in sorted((root / folder).glob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\bstorage\.options\b(?!_with_retry)", line)]
    assert bare == []

"""Retries with exponential backoff for storage calls, under one policy per job, counted per process.

Object stores fail transiently (throttling, 5xx, dropped connections, stalls) often enough
that a nightly job over millions of objects sees it. Those errors are retried with backoff
and jitter; permanent ones (missing object, access denied, bad arguments, a corrupt file)
fail at once, so a misconfiguration is reported immediately instead of after minutes of
retrying.

How the configured policy (`storage.retry`) reaches every process: every process that
touches storage (the driver, decode tasks, embedding / search / rerank actors, shard,
train, fit and listing tasks) already receives the job's storage options, as a plain dict
or inside a pickled `Location` or `SourceSpec`. The policy rides in that dict, under
`POLICY_KEY`, and `Location` takes it out before it builds the filesystem. So the policy
needs no new argument in any task, actor or function signature, and code that reaches
storage through the options it was given cannot miss it. The alternatives fail: a
module-global set in the driver never reaches the workers (other processes, other nodes),
and an environment variable is one value per worker process while jobs with different
configs share a cluster (and tests share one process). `POLICY_KEY` contains a dot, so it
can never be the keyword argument of an fsspec filesystem. Options without it (a user's
`IndexSearcher(storage_options=...)`) get `DEFAULT_POLICY`.

Layers below this one retry too, and what reaches us depends on them: botocore retries
5xx and throttling (its `retries` config), s3fs retries SlowDown, timeouts and dropped
connections of single-object calls (5 tries) but not a 500 InternalError nor a paginated
listing. This layer covers every call, listings and container scans included, with the
policy the job was configured with (measured through a fault proxy: tests/test_s3_faults.py).

Counting: each retry (a further attempt after a transient error) adds one to this process's
count and to the calling thread's. Jobs report them (`RetryMeter` around a stretch of work,
`thread_retries` for per-item counts) so a summary shows how hard storage pushed back.
"""

from __future__ import annotations

import logging
import random
import tarfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

POLICY_KEY = "mllm_index.retry"  # in storage options: the policy as a dict (attempts, base_delay, max_delay)


class RetriesExhausted(RuntimeError):
    """A transient storage error that did not go away: the job stops, nothing is published."""


PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
             ValueError, TypeError, KeyError, NotImplementedError, tarfile.TarError, RetriesExhausted)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries per call, the first included
    base_delay: float = 0.2  # seconds before the first retry; doubles each time, with jitter
    max_delay: float = 10.0  # cap on one pause

    def __post_init__(self):
        if int(self.attempts) < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"retry policy needs attempts >= 1 and delays >= 0, got {self}")

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)


DEFAULT_POLICY = RetryPolicy()


def with_policy(options: dict[str, Any] | None, policy: RetryPolicy | None) -> dict[str, Any]:
    """A copy of storage options that carries `policy` to every process they are handed to."""
    out = dict(options or {})
    if policy is not None:
        out[POLICY_KEY] = asdict(policy)
    else:
        out.pop(POLICY_KEY, None)
    return out


def split_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], RetryPolicy | None]:
    """(the options fsspec gets, the policy they carry or None)."""
    fs_options = dict(options or {})
    carried = fs_options.pop(POLICY_KEY, None)
    if carried is None or isinstance(carried, RetryPolicy):
        return fs_options, carried
    try:
        return fs_options, RetryPolicy(**carried)
    except TypeError as exc:
        raise ValueError(f"storage options: {POLICY_KEY} must hold attempts, base_delay, max_delay; got {carried!r}") from exc


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and not isinstance(exc, PERMANENT)


# -- counting -----------------------------------------------------------------------------
_lock = threading.Lock()
_process_retries = 0
_thread = threading.local()


def _count_retry() -> None:
    global _process_retries
    with _lock:
        _process_retries += 1
    _thread.retries = getattr(_thread, "retries", 0) + 1


def process_retries() -> int:
    """Retries made by this process so far (all threads)."""
    return _process_retries


def thread_retries() -> int:
    """Retries made by the calling thread so far: a difference of two readings counts one item's."""
    return getattr(_thread, "retries", 0)


class RetryMeter:
    """This process's retries since the meter was made, or since its last `take()`.

    A job's driver makes one when it starts and reports `count()`; an actor makes one in its
    constructor and adds `take()` to each batch it returns, so retries while loading (shards,
    a catalog) are reported with its first batch. Counts of concurrent jobs in one process mix.
    """

    def __init__(self):
        self._mark = process_retries()
        self._lock = threading.Lock()

    def count(self) -> int:
        return process_retries() - self._mark

    def take(self) -> int:
        with self._lock:
            now = process_retries()
            taken, self._mark = now - self._mark, now
        return taken

    def add_to(self, column):
        """A copy of a per-row retry count column (numpy) with `take()` added to its first row;
        an empty batch takes nothing, so the count goes with the next one."""
        column = column.copy()  # Ray Data hands batches out read-only
        if len(column):
            column[0] += self.take()
        return column


def with_retries(call: Callable[[], T], what: str, policy: RetryPolicy | None = None, *,
                 first_error: Exception | None = None) -> T:
    """`call()`, retried on transient errors; the last error is raised with `what` in its message.

    `first_error`: the call already failed once this way (an item of a batch call), which
    counts as the first attempt: the next one comes after the first pause.
    """
    policy = policy or DEFAULT_POLICY
    attempt, error = 0, first_error
    while True:
        if error is None:
            try:
                return call()
            except Exception as exc:
                error = exc
        if not is_transient(error):
            raise error
        attempt += 1
        if attempt >= policy.attempts:
            raise RetriesExhausted(f"{what}: failed after {policy.attempts} attempts: {type(error).__name__}: {error}") from error
        pause = policy.delay(attempt - 1)
        log.warning("%s: %s: %s; retrying in %.1fs (%d/%d)", what, type(error).__name__, error, pause, attempt,
                    policy.attempts)
        _count_retry()
        time.sleep(pause)
        error = None

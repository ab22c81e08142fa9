"""Retries with exponential backoff for storage calls.

Object stores fail transiently (throttling, 5xx, dropped connections) often enough that a
nightly job over millions of objects sees it. Those errors are retried with backoff and
jitter; permanent ones (missing object, access denied, bad arguments) fail at once, so a
misconfiguration is reported immediately instead of after minutes of retrying.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
             ValueError, TypeError, KeyError, NotImplementedError)


class RetryPolicy:
    def __init__(self, attempts: int = 5, base_delay: float = 0.2, max_delay: float = 10.0):
        self.attempts, self.base_delay, self.max_delay = attempts, base_delay, max_delay

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)


DEFAULT_POLICY = RetryPolicy()


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and not isinstance(exc, PERMANENT)


class RetriesExhausted(RuntimeError):
    """A transient storage error that did not go away: the job stops, nothing is published."""


def with_retries(call: Callable[[], T], what: str, policy: RetryPolicy | None = None) -> T:
    """`call()`, retried on transient errors; the last error is raised with `what` in its message."""
    policy = policy or DEFAULT_POLICY
    for attempt in range(policy.attempts):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts - 1:
                raise RetriesExhausted(f"{what}: failed after {policy.attempts} attempts: {type(exc).__name__}: {exc}") from exc
            pause = policy.delay(attempt)
            log.warning("%s: %s: %s; retrying in %.1fs (%d/%d)", what, type(exc).__name__, exc, pause, attempt + 1,
                        policy.attempts)
            time.sleep(pause)
    raise AssertionError("unreachable")

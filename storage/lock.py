"""One writer per index: a lock object in the index root, with owner and expiry.

A second run on the same index refuses with a message naming the holder. A run that
crashed leaves its lock behind; once it has expired, the next run takes it over. The
holder renews the expiry as it makes progress. A holder that ran on this host and whose
process is gone is known to have crashed, so its lock is taken over at once: re-running
after a killed driver does not wait for the expiry. Object stores offer no compare-and-swap
through fsspec, so acquiring writes a random token and reads it back: of two runs that
race in the same instant, the one whose token is not read back gives up.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from mllm_index.storage.uris import Location, redact

log = logging.getLogger(__name__)
LOCK = "LOCK.json"


class LockHeld(RuntimeError):
    """Another run holds the index."""


def _holder_is_dead(held: dict) -> bool:
    """A holder on this host whose process no longer exists crashed: no need to wait for the expiry."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(held["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError):
        return False
    return False


class IndexLock:
    def __init__(self, index: Location, owner: str, ttl_seconds: float = 3600.0):
        self.index, self.owner, self.ttl = index, owner, ttl_seconds
        self.token: str | None = None

    def _current(self) -> dict | None:
        return self.index.read_json(LOCK) if self.index.exists(LOCK) else None

    def _write(self) -> None:
        now = time.time()
        self.index.write_json({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                               "acquired_at": now, "expires_at": now + self.ttl}, LOCK)

    def acquire(self) -> "IndexLock":
        held = self._current()
        if held and held["expires_at"] > time.time() and not _holder_is_dead(held):
            raise LockHeld(f"{redact(self.index.uri)} is locked by {held['owner']} (host {held['host']}, pid {held['pid']}) "
                           f"until {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(held['expires_at']))} UTC: another run is "
                           "writing this index. Wait for it; a lock left by a crashed run is taken over once it expires.")
        if held:
            log.warning("taking over the lock of %s (host %s, pid %s): %s", held["owner"], held["host"], held["pid"],
                        "its process is gone" if held["expires_at"] > time.time() else "it expired")
        self.token = uuid.uuid4().hex
        self._write()
        if (self._current() or {}).get("token") != self.token:
            self.token = None
            raise LockHeld(f"{redact(self.index.uri)}: another run took the lock at the same moment; try again")
        return self

    def renew(self) -> None:
        """Push the expiry forward; fails if the lock was taken over (this run was presumed dead)."""
        if (self._current() or {}).get("token") != self.token:
            raise LockHeld(f"{redact(self.index.uri)}: this run's lock was taken over by another run; stopping before writing")
        self._write()

    def release(self) -> None:
        if self.token and (self._current() or {}).get("token") == self.token:
            self.index.delete(LOCK)
        self.token = None

    def __enter__(self) -> "IndexLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


LEASES = "leases"


class ReadLease:
    """A reader's claim on one version: garbage collection keeps it while the lease is unexpired."""

    def __init__(self, index: Location, version: str, owner: str, ttl_seconds: float = 3600.0):
        self.index, self.version, self.owner, self.ttl = index, version, owner, ttl_seconds
        self.name = f"{uuid.uuid4().hex}.json"

    def renew(self) -> None:
        self.index.write_json({"version": self.version, "owner": self.owner, "host": socket.gethostname(),
                               "expires_at": time.time() + self.ttl}, LEASES, self.name)

    def __enter__(self) -> "ReadLease":
        self.renew()
        return self

    def __exit__(self, *exc) -> None:
        self.index.delete(LEASES, self.name)


def leased_versions(index: Location) -> set[str]:
    """Versions with an unexpired read lease (expired leases are left by crashed readers and ignored)."""
    now, leased = time.time(), set()
    for name in index.list_names(LEASES):
        try:
            lease = index.read_json(LEASES, name)
        except FileNotFoundError:  # released meanwhile
            continue
        if lease["expires_at"] > now:
            leased.add(lease["version"])
    return leased

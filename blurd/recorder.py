"""Settled file versions of one watch -> rows of the jobs table.

Versions go to the store a thousand per transaction, and the table's unique key makes that
idempotent. Two things are kept in memory:

- the versions not recorded yet while the database refuses writes (locked, disk full, server
  restarting): tried again about every second; the outage is logged once, and its end once;
- an 8-byte digest of every version this watch saw recorded, so that a rescan sends only what
  is new. Sending everything again would be correct, but on PostgreSQL each row that
  ``ON CONFLICT DO NOTHING`` skips still takes a value of the jobs' id sequence (a 32-bit
  integer): 300,000 files rescanned every 5 minutes would use it up within a month.
"""

from __future__ import annotations

import itertools
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable

import structlog

from blurd.errors import StoreError
from blurd.health import DatabaseHealth
from blurd.store import Store

log = structlog.get_logger("blurd.watcher")

Version = tuple[str, int, int]  # (path relative to the watch, size, mtime_ns)
SCAN_BATCH = 1000  # versions per transaction
DATABASE_RETRY_S = 1.0  # while the database refuses writes, try again this often


class StoreOutage:
    """Whether the jobs database refuses the watcher's writes, and when to try again. The
    watches of a :class:`Watcher` share one; the log lines go through the daemon's
    ``DatabaseHealth``, shared with the worker, so an outage is logged once in all."""

    def __init__(
        self,
        clock: Callable[[], float],
        retry_s: float = DATABASE_RETRY_S,
        health: DatabaseHealth | None = None,
    ) -> None:
        self.clock = clock
        self.retry_s = retry_s
        self.health = health or DatabaseHealth(clock)
        self.down = False
        self._next_try = 0.0

    def may_try(self) -> bool:
        return not self.down or self.clock() >= self._next_try

    def retry_in(self) -> float | None:
        return max(0.0, self._next_try - self.clock()) if self.down else None

    def failed(self, exc: StoreError) -> None:
        self._next_try = self.clock() + self.retry_s
        self.down = True
        self.health.failed(exc)

    def succeeded(self) -> None:
        self.down = False
        self.health.ok()


class Recorder:
    """Records the settled versions of one watch, keeps them through a database outage, and
    remembers (as digests) which versions are recorded already."""

    def __init__(
        self, store: Store, watch: str, outage: StoreOutage, on_enqueue: Callable[[], None]
    ) -> None:
        self.store = store
        self.watch = watch
        self.outage = outage
        self.on_enqueue = on_enqueue
        self._waiting: dict[Version, None] = {}  # in arrival order, not recorded yet
        self._digests: array[int] = array("q")  # sorted; recorded and present at the last scan
        self._recent: set[int] = set()  # recorded since the last scan
        self._scan: array[int] | None = None  # digests seen by the full scan under way
        self._scan_recorded = False  # that scan recorded versions

    def known(self, version: Version) -> bool:
        """Whether this version is recorded already; a scan under way notes it as present."""
        digest = _digest(version)
        if not self._has(digest):
            return False
        if self._scan is not None:
            self._scan.append(digest)
        return True

    def begin_scan(self) -> None:
        self._scan = array("q")
        self._scan_recorded = False

    def end_scan(self, complete: bool) -> None:
        """A complete scan replaces the digests (forgetting versions no longer on disk); one
        cut short adds what it saw."""
        assert self._scan is not None
        # Each digest a scan sees is one of a distinct path: as many as before, all known
        # (none recorded meanwhile), means the same set, and the sort can be skipped.
        unchanged = len(self._scan) == len(self._digests) and not self._recent
        if not (complete and unchanged and not self._scan_recorded):
            seen = self._scan if complete else itertools.chain(self._digests, self._scan)
            self._digests = array("q", sorted(seen))
        if complete:
            self._recent.clear()
        self._scan = None

    def pending(self) -> int:
        return len(self._waiting)

    def retry_in(self) -> float | None:
        return self.outage.retry_in() if self._waiting else None

    def record(self, versions: Iterable[Version]) -> int:
        """Record these versions and any kept from before; returns the jobs that are new.
        While the database refuses writes they are kept, and tried again when next due."""
        for version in versions:
            if not self._has(_digest(version)):
                self._waiting[version] = None
        if not self._waiting or not self.outage.may_try():
            return 0
        added, sent = 0, False
        while self._waiting:
            batch = list(itertools.islice(self._waiting, SCAN_BATCH))
            try:
                new = self.store.enqueue_many(self.watch, batch)
            except StoreError as exc:
                self.outage.failed(exc)
                break
            self.outage.succeeded()
            sent = True
            for version in batch:
                del self._waiting[version]
                self._remember(_digest(version))
            sizes = {rel: size for rel, size, _mtime in batch}
            for job_id, rel in new:
                log.info("job.queued", job_id=job_id, path=rel, watch=self.watch, size=sizes[rel])
            added += len(new)
        if sent:
            # News for the worker even when another node queued these versions first: with a
            # shared queue, they may be waiting for this node.
            self.on_enqueue()
        return added

    def _has(self, digest: int) -> bool:
        if digest in self._recent:
            return True
        i = bisect_left(self._digests, digest)
        return i < len(self._digests) and self._digests[i] == digest

    def _remember(self, digest: int) -> None:
        if self._scan is not None:
            self._scan.append(digest)
            self._scan_recorded = True
        else:
            self._recent.add(digest)


def _digest(version: Version) -> int:
    """64 bits of the version: Python's hash, salted per process. A collision (odds of 1 in
    3.7e7 among a million versions) would hide that one version until the next start."""
    return hash(version)

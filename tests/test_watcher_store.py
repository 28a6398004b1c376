"""How the watcher uses the jobs table: rescans in batches of new versions only, and database
outages ridden out with nothing dropped. Real folders, real watchdog observers, a real SQLite
file; the outage is a switch in front of the real store, since the store's busy timeout is fixed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from blurd.config import WatchConfig
from blurd.errors import StoreError
from blurd.store import Store
from blurd.watcher import FolderWatcher, Watcher
from tests.conftest import FakeClock, wait_for


class SwitchedStore:
    """The real store behind a switch: while ``down`` is set, enqueue_many raises StoreError
    as a locked or unreachable database does. Every call is noted."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.down = threading.Event()
        self.calls: list[tuple[float, int, bool]] = []  # (monotonic time, versions, refused)

    def enqueue_many(
        self, watch: str, versions: Sequence[tuple[str, int, int]], batch: int = 1000
    ) -> list[tuple[int, str]]:
        refused = self.down.is_set()
        self.calls.append((time.monotonic(), len(versions), refused))
        if refused:
            raise StoreError("blurd.db: database is locked")
        return self.store.enqueue_many(watch, versions, batch)

    def known_versions(self, watch: str) -> Any:
        raise AssertionError("a rescan must not load every recorded version")

    def paths(self) -> set[str]:
        return {j.rel_path for j in self.store.list_jobs(limit=100_000)}

    def count(self) -> int:
        return len(self.store.list_jobs(limit=100_000))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SwitchedStore]:
    s = Store(f"sqlite:///{tmp_path}/blurd.db")
    yield SwitchedStore(s)
    s.close()


def _watcher(root: Path, store: SwitchedStore, **kw: Any) -> FolderWatcher:
    root.mkdir(parents=True, exist_ok=True)
    watch = WatchConfig(path=root, output=root.parent / "out", settle_s=kw.pop("settle_s", 5.0))
    return FolderWatcher(watch, store, rescan_s=3600, **kw)  # type: ignore[arg-type]


def _old_files(root: Path, n: int) -> set[str]:
    for i in range(n):
        (root / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 7}" / f"{i}.jpg").write_bytes(b"x")
    return {f"d{i % 7}/{i}.jpg" for i in range(n)}


def _an_hour_later() -> float:
    return time.time() + 3600


def test_a_scan_records_settled_files_in_batches_and_new_versions_only(
    tmp_path: Path, store: SwitchedStore, clock: FakeClock
) -> None:
    """Files unchanged for the settle window are recorded by the scan itself, at most 1000 per
    call; a rescan sends only versions not recorded before (a changed file), and a restarted
    watcher, which sends them all again, queues nothing twice."""
    root = tmp_path / "in"
    names = _old_files(root, 2500)
    w = _watcher(root, store, clock=clock, wall_clock=_an_hour_later)
    assert w.scan() == 2500
    assert [n for _t, n, _r in store.calls] == [1000, 1000, 500] and w.pending() == 0
    assert store.paths() == names
    (root / "d0" / "0.jpg").write_bytes(b"changed")
    store.calls.clear()
    assert w.scan() == 1
    assert [n for _t, n, _r in store.calls] == [1]
    again = _watcher(root, store, clock=clock, wall_clock=_an_hour_later)
    with capture_logs() as logs:
        assert again.scan() == 0
    assert not [e for e in logs if e["event"] == "job.queued"]
    assert store.count() == 2501


def test_a_recently_changed_file_waits_for_the_settle_window(
    tmp_path: Path, store: SwitchedStore, clock: FakeClock
) -> None:
    """A file the scan finds changed within the settle window, even one whose mtime was set a
    year back (as `cp -p` does), is not recorded by the scan; it is recorded once the window
    has passed without change."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    fresh = root / "sub" / "fresh.jpg"
    fresh.write_bytes(b"f")
    a_year_ago = time.time() - 365 * 86400
    os.utime(fresh, (a_year_ago, a_year_ago))
    w = _watcher(root, store, clock=clock)
    try:
        assert w.scan() == 0 and w.tick() == 0
        clock.advance(4.9)
        assert w.tick() == 0 and store.paths() == set()
        clock.advance(0.2)
        assert w.tick() == 1
    finally:
        w.stop()
    assert store.paths() == {"sub/fresh.jpg"}


def test_a_scan_stopped_by_an_outage_keeps_one_batch_and_runs_again(
    tmp_path: Path, store: SwitchedStore, clock: FakeClock
) -> None:
    """A scan that meets a database outage stops walking and keeps only the batch it could not
    record; once the database is back the scan runs again and records everything."""
    root = tmp_path / "in"
    names = _old_files(root, 2500)
    w = _watcher(root, store, clock=clock, wall_clock=_an_hour_later)
    store.down.set()
    try:
        with capture_logs():
            w.tick()
            assert w.pending() == 1000 and not w.scanned
            clock.advance(1.0)
            w.tick()
            assert w.pending() == 1000
            store.down.clear()
            clock.advance(1.0)
            assert w.tick() == 2500
    finally:
        w.stop()
    assert store.paths() == names and w.scanned and w.pending() == 0


def test_files_dropped_during_a_database_outage_are_recorded_when_it_ends(
    tmp_path: Path, store: SwitchedStore
) -> None:
    """While the database refuses writes, the watcher keeps what settled, logs the outage once
    (two watches share it), tries again about every second, and records it all when the
    database is back, logging that once."""
    folders = [_watcher(tmp_path / name, store, settle_s=0.2) for name in ("a", "b")]
    watcher = Watcher(folders)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    with capture_logs() as logs:
        thread.start()
        try:
            wait_for(lambda: all(f.scanned for f in folders), what="the start-up scans")
            store.down.set()
            for name in ("a", "b"):
                for i in range(3):
                    (tmp_path / name / f"{i}.jpg").write_bytes(b"x")
            wait_for(lambda: sum(r for _t, _n, r in store.calls) >= 3, what="3 refused tries")
            assert store.count() == 0
            store.down.clear()
            wait_for(lambda: store.count() == 6, timeout=5, what="the kept files")
        finally:
            stop.set()
            watcher.wake.set()
            thread.join(timeout=10)
    recorded = {(j.watch, j.rel_path) for j in store.store.list_jobs(limit=10)}
    assert recorded == {(str(tmp_path / n), f"{i}.jpg") for n in "ab" for i in range(3)}
    events = [e["event"] for e in logs]
    assert events.count("database.unavailable") == 1 and events.count("database.back") == 1
    (down,) = [e for e in logs if e["event"] == "database.unavailable"]
    assert down["error"] == "blurd.db: database is locked"
    refused = [t for t, _n, r in store.calls if r]
    gaps = [b - a for a, b in pairwise(refused)]
    assert gaps and min(gaps) > 0.8  # about a second apart, not a tight loop

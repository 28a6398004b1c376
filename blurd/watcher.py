"""Watched folders -> stable files -> the jobs table.

watchdog events (native, or polling on network and FUSE filesystems), a start-up scan and a
periodic rescan feed one :class:`StabilityTracker` per watch; a file is enqueued once it has
settled. Symlinks are recorded (the worker rejects them) but never followed, hidden and temporary
names are skipped, and output and archive folders (compared on resolved paths) are never looked
into. When the native observer cannot start for lack of inotify watches or instances, the watch
is polled instead.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserverVFS

from blurd import defaults, layout
from blurd.config import WatchConfig
from blurd.events import WANTED_EVENTS, EventHandler, wants_polling
from blurd.health import DatabaseHealth
from blurd.recorder import SCAN_BATCH, Recorder, StoreOutage, Version
from blurd.stability import StabilityTracker, is_ignored_name, is_ignored_rel
from blurd.store import Store

log = structlog.get_logger("blurd.watcher")

# Out of inotify watches (ENOSPC) or instances (EMFILE): a system limit that will not go away
# by itself, so the watch polls instead of failing again every tick.
_INOTIFY_LIMITS = frozenset({errno.ENOSPC, errno.EMFILE})
OBSERVER_RETRY_S = 30.0  # an observer that failed to start for another reason is tried again


class FolderWatcher:
    """One watched folder: finds files (events, scans), waits for them to settle, and hands
    their versions to its :class:`Recorder`."""

    def __init__(
        self,
        watch: WatchConfig,
        store: Store,
        *,
        excluded: Iterable[Path] = (),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rescan_s: float = defaults.RESCAN_INTERVAL_S,
        on_enqueue: Callable[[], None] = lambda: None,
        observer_factory: Callable[[], Any] = Observer,
    ) -> None:
        """``clock`` times settle windows and retries; ``wall_clock`` is compared with file
        timestamps; ``observer_factory`` makes the native (non-polling) observer."""
        self.watch = watch
        self.root = str(watch.path)
        self.excluded = [str(p) for p in excluded]
        self._prefix = self.root.rstrip("/") + "/"
        self._excluded_rels: frozenset[str] = frozenset()
        self._excluded_prefixes: tuple[str, ...] = ()
        self._exclude_all = False
        self.clock = clock
        self.wall_clock = wall_clock
        self.rescan_s = rescan_s
        self.observer_factory = observer_factory
        self.tracker = StabilityTracker(watch.settle_s, clock)
        self.recorder = Recorder(store, watch.name, StoreOutage(clock), on_enqueue)
        self._lock = threading.Lock()
        self._touched: set[str] = set()
        self._dirs: set[str] = set()
        self._observer: Any = None
        self._observer_retry_at: float | None = None
        self._native_failed = ""  # why native events are unavailable here; then it polls
        self._next_scan = 0.0
        self._missing_logged = False
        self.scanned = False  # the first full scan is done
        self.on_event: Callable[[], None] = lambda: None  # set by Watcher: wakes its thread
        self._resolve_exclusions()

    # ------------------------------------------------------------ events (watchdog thread)

    def note_file(self, path: str) -> None:
        if self._wanted(path):
            with self._lock:
                self._touched.add(path)
            self.on_event()

    def note_directory(self, path: str) -> None:
        if self._wanted(path):
            with self._lock:
                self._dirs.add(path)
            self.on_event()

    # ------------------------------------------------------------ the watcher loop

    def tick(self) -> int:
        """Take in events, rescan when due, enqueue what has settled. Returns jobs enqueued."""
        if not os.path.isdir(self.root):
            self._on_missing_root()
            return 0
        if self._missing_logged:
            log.info("watch.back", watch=self.root)
            self._missing_logged = False
            self._next_scan = 0.0
        self._ensure_observer()
        added = self.recorder.record(())  # what an outage kept, when a try is due
        now = self.clock()
        # During a database outage a rescan would only pile up versions in memory; it runs
        # once the database is back (events are still taken in and kept).
        if now >= self._next_scan and not self.recorder.outage.down:
            self._next_scan = now + self.rescan_s
            added += self.scan()
        with self._lock:
            touched, self._touched = self._touched, set()
            dirs, self._dirs = self._dirs, set()
        for d in dirs:
            added += self._scan_tree(d, full=False)
        for path in touched:
            self.tracker.touch(path)
        settled = [(self._rel(s.path), s.size, s.mtime_ns) for s in self.tracker.check()]
        return added + self.recorder.record(settled)

    def pending(self) -> int:
        """Files still settling, events not yet taken in, versions not yet recorded."""
        with self._lock:
            waiting = len(self.tracker) + len(self._touched) + len(self._dirs)
        return waiting + self.recorder.pending()

    def next_check_in(self) -> float | None:
        hints = (self.tracker.next_check_in(), self.recorder.retry_in())
        return min((h for h in hints if h is not None), default=None)

    def scan(self) -> int:
        """Look at every file once (start-up, and every ``rescan_s`` for missed events);
        returns the jobs enqueued. A scan cut short by a database outage runs again once the
        database is back."""
        self._resolve_exclusions()
        self.recorder.begin_scan()
        added = self._scan_tree(self.root, full=True)
        complete = not self.recorder.outage.down
        self.recorder.end_scan(complete)
        if complete:
            self.scanned = True
        else:
            self._next_scan = 0.0
        return added

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    # ------------------------------------------------------------ internals

    def _on_missing_root(self) -> None:
        # An unmounted share must not look like "every file was deleted": do nothing at all
        # until it returns, and forget the observer, which died with the folder.
        if not self._missing_logged:
            log.warning("watch.missing", watch=self.root, detail="waiting for it to return")
            self._missing_logged = True
        self.stop()

    def _ensure_observer(self) -> None:
        if self._observer is not None and self._observer.is_alive():
            return
        self.stop()
        if self._observer_retry_at is not None and self.clock() < self._observer_retry_at:
            return
        polling, why = wants_polling(self.watch)
        if self._native_failed:
            polling, why = True, self._native_failed
        observer = self._polling_observer() if polling else self.observer_factory()
        real = layout.resolved(self.root)
        observer.schedule(EventHandler(self, real), real, recursive=self.watch.recursive,
                          event_filter=WANTED_EVENTS)  # fmt: skip
        try:
            observer.start()
        except OSError as exc:
            if not polling and exc.errno in _INOTIFY_LIMITS:
                self._native_failed = f"native events are unavailable: {exc}"
                log.warning("watch.polling_fallback", watch=self.root, reason=str(exc))
                self._ensure_observer()
                return
            self._observer_retry_at = self.clock() + OBSERVER_RETRY_S
            log.warning("watch.observer_failed", watch=self.root, error=str(exc),
                        retry_in_s=OBSERVER_RETRY_S)  # fmt: skip
            return
        self._observer = observer
        self._observer_retry_at = None
        log.info("watch.started", watch=self.root, polling=polling, why=why)

    def _polling_observer(self) -> Any:
        # lstat, not stat: a symlinked folder inside the watch is not descended into (it may
        # lead to an output folder, or anywhere).
        interval = max(1.0, min(10.0, self.watch.settle_s / 2))
        return PollingObserverVFS(os.lstat, os.scandir, polling_interval=interval)

    def _resolve_exclusions(self) -> None:
        """Output and archive folders as paths relative to this watch, on resolved paths: the
        watch may be reached through a symlink, and so may they."""
        real_root = layout.resolved(self.root)
        rels: set[str] = set()
        exclude_all = False
        for folder in self.excluded:
            real = layout.resolved(folder)
            if layout.inside(real_root, real):
                exclude_all = True  # the config refuses this; never look into it anyway
            elif layout.inside(real, real_root):
                rels.add(os.path.relpath(real, real_root))
        self._excluded_rels = frozenset(rels)
        self._excluded_prefixes = tuple(rel + "/" for rel in rels)
        self._exclude_all = exclude_all

    def _wanted(self, path: str) -> bool:
        if not (path == self.root or path.startswith(self._prefix)):
            return False
        rel = self._rel(path)
        if self._exclude_all or rel in self._excluded_rels:
            return False
        if rel.startswith(self._excluded_prefixes):
            return False
        if rel and is_ignored_rel(rel):
            return False
        return self.watch.recursive or "/" not in rel

    def _rel(self, path: str) -> str:
        if path == self.root:
            return ""
        # Called a few times per file on every scan: cut the prefix when the rest is already
        # normal (no "//", no "." or ".." parts), and let relpath handle anything else.
        if path.startswith(self._prefix):
            rel = path[len(self._prefix) :]
            if "//" not in rel and "/." not in "/" + rel:
                return rel
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def _scan_tree(self, top: str, *, full: bool) -> int:
        """Walk ``top`` without following symlinks. A file unchanged for the settle window
        (by its mtime and ctime) is recorded from here, a thousand per transaction; one
        changed more recently is left to the stability tracker.

        A ``full`` scan stops at a database outage rather than keep every version of the tree
        in memory (it runs again later); a folder that came in is walked to the end, and what
        cannot be recorded yet is kept."""
        settled_before = self.wall_clock() - self.watch.settle_s
        added = 0
        batch: list[Version] = []
        stack = [top]
        while stack and not (full and self.recorder.outage.down):
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError as exc:
                if folder == self.root:
                    log.warning("watch.scan_failed", watch=self.root, error=exc.strerror)
                continue
            for entry in entries:
                if is_ignored_name(entry.name) or not self._wanted(entry.path):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if self.watch.recursive:
                            stack.append(entry.path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                version = (self._rel(entry.path), st.st_size, st.st_mtime_ns)
                if self.recorder.known(version) or entry.path in self.tracker:
                    continue
                # ctime moves with every write and every change of mtime: both old means no
                # change for the whole settle window (a timestamp in the future is not old).
                if max(st.st_mtime, st.st_ctime) > settled_before:
                    self.tracker.touch(entry.path)
                    continue
                batch.append(version)
                if len(batch) >= SCAN_BATCH:
                    added += self.recorder.record(batch)
                    batch = []
                    if full and self.recorder.outage.down:
                        break
        return added + self.recorder.record(batch)


class Watcher:
    """All watched folders, driven by one thread."""

    def __init__(
        self,
        folders: list[FolderWatcher],
        *,
        clock: Callable[[], float] = time.monotonic,
        health: DatabaseHealth | None = None,
    ) -> None:
        self.folders = folders
        self.wake = threading.Event()  # an event came in (set it too when stopping)
        # One outage for all watches: the database is down for all of them, logged once.
        self.outage = StoreOutage(clock, health=health)
        for f in folders:
            f.on_event = self.wake.set
            f.recorder.outage = self.outage

    def tick(self) -> int:
        return sum(f.tick() for f in self.folders)

    def pending(self) -> int:
        return sum(f.pending() for f in self.folders)

    def wait_hint(self) -> float:
        hints = [h for f in self.folders if (h := f.next_check_in()) is not None]
        return min([defaults.STABILITY_CHECK_S, *hints]) if hints else defaults.STABILITY_CHECK_S

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.wake.clear()
            try:
                self.tick()
            except Exception:
                log.exception("watch.error")
                stop.wait(5.0)
            # A file's settle window starts at its last event: take events in as they come,
            # not at the next check (up to 0.5 s later). The short pause after a wake lets a
            # burst of events (a folder copied in) share one tick.
            if self.wake.wait(self.wait_hint()):
                stop.wait(defaults.EVENT_BATCH_S)
        for f in self.folders:
            f.stop()

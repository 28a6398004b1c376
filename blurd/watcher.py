"""Watched folders -> stable files -> the jobs table.

watchdog events (native, or polling on network and FUSE filesystems), a start-up scan and a
periodic rescan feed one :class:`StabilityTracker` per watch; a file is enqueued once it has
settled. Symlinks are recorded (the worker rejects them) but never followed, hidden and temporary
names are skipped, and output and archive folders are never looked into.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from blurd import defaults
from blurd.config import WatchConfig
from blurd.stability import StabilityTracker, Stable, is_ignored_name, is_ignored_rel
from blurd.store import Store

log = structlog.get_logger("blurd.watcher")

NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph"})
_QUIET_EVENTS = frozenset({"opened", "closed_no_write"})  # our own reads cause these


def filesystem_type(path: Path, mounts_file: str = "/proc/mounts") -> str | None:
    """The type of the filesystem holding ``path`` (longest matching mount point)."""
    try:
        with open(mounts_file) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    best, best_type = "", None
    target = str(path)
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
            best
        ):
            best, best_type = mount, parts[2]
    return best_type


def wants_polling(watch: WatchConfig) -> tuple[bool, str]:
    """Whether to poll, and why (for the start-up log)."""
    if watch.polling is not None:
        return watch.polling, "polling is set in the config"
    fstype = filesystem_type(watch.path) or "unknown"
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse"):
        return True, f"{fstype} filesystems send no change events"
    return False, f"{fstype} filesystem sends native events"


class _Handler(FileSystemEventHandler):
    def __init__(self, owner: FolderWatcher) -> None:
        self.owner = owner

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _QUIET_EVENTS:
            return
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path) if event.dest_path else ""
        if event.is_directory:
            # A folder created or moved in may already hold files: scan it.
            if event.event_type == "created":
                self.owner.note_directory(src)
            elif event.event_type == "moved" and dest:
                self.owner.note_directory(dest)
            return
        self.owner.note_file(src)
        if dest:
            self.owner.note_file(dest)


class FolderWatcher:
    """One watched folder."""

    def __init__(
        self,
        watch: WatchConfig,
        store: Store,
        *,
        excluded: Iterable[Path] = (),
        clock: Callable[[], float] = time.monotonic,
        rescan_s: float = defaults.RESCAN_INTERVAL_S,
        on_enqueue: Callable[[], None] = lambda: None,
    ) -> None:
        self.watch = watch
        self.store = store
        self.root = str(watch.path)
        self.excluded = [str(p) for p in excluded]
        self._prefix = self.root.rstrip("/") + "/"
        self._excluded_prefixes = [(ex, ex.rstrip("/") + "/") for ex in self.excluded]
        self.clock = clock
        self.rescan_s = rescan_s
        self.on_enqueue = on_enqueue
        self.tracker = StabilityTracker(watch.settle_s, clock)
        self._lock = threading.Lock()
        self._touched: set[str] = set()
        self._dirs: set[str] = set()
        self._observer: Any = None
        self._next_scan = 0.0
        self._missing_logged = False
        self._known: set[tuple[str, int, int]] = set()
        self.scanned = False  # the first full scan is done
        self.on_event: Callable[[], None] = lambda: None  # set by Watcher: wakes its thread

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
        now = self.clock()
        if now >= self._next_scan:
            self.scan()
            self._next_scan = now + self.rescan_s
        with self._lock:
            touched, self._touched = self._touched, set()
            dirs, self._dirs = self._dirs, set()
        for d in dirs:
            self._scan_tree(d)
        for path in touched:
            self.tracker.touch(path)
        return self._enqueue(self.tracker.check())

    def pending(self) -> int:
        """Files still settling or events not yet taken in."""
        with self._lock:
            return len(self.tracker) + len(self._touched) + len(self._dirs)

    def next_check_in(self) -> float | None:
        return self.tracker.next_check_in()

    def scan(self) -> None:
        """Look at every file once (start-up, and every ``rescan_s`` for missed events)."""
        self._known = self.store.known_versions(self.watch.name)
        self._scan_tree(self.root)
        self.scanned = True

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
        polling, why = wants_polling(self.watch)
        if polling:
            observer: Any = PollingObserver(timeout=max(1.0, min(10.0, self.watch.settle_s / 2)))
        else:
            observer = Observer()
        observer.schedule(_Handler(self), self.root, recursive=self.watch.recursive)
        try:
            observer.start()
        except OSError as exc:
            log.warning("watch.observer_failed", watch=self.root, error=str(exc))
            return
        self._observer = observer
        log.info("watch.started", watch=self.root, polling=polling, why=why)

    def _wanted(self, path: str) -> bool:
        if not (path == self.root or path.startswith(self._prefix)):
            return False
        if any(path == ex or path.startswith(p) for ex, p in self._excluded_prefixes):
            return False
        rel = self._rel(path)
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

    def _scan_tree(self, top: str) -> None:
        stack = [top]
        while stack:
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
                key = (self._rel(entry.path), st.st_size, st.st_mtime_ns)
                if key not in self._known and entry.path not in self.tracker:
                    self.tracker.touch(entry.path)

    def _enqueue(self, ready: list[Stable]) -> int:
        """Queue the settled files: one transaction per thousand, so a scan of a big folder
        does not cost a commit (an fsync, on PostgreSQL) per file."""
        fresh: dict[tuple[str, int, int], Stable] = {}
        for item in ready:
            key = (self._rel(item.path), item.size, item.mtime_ns)
            if key not in self._known:
                fresh[key] = item
        if not fresh:
            return 0
        versions = list(fresh)
        added = self.store.enqueue_many(self.watch.name, versions)
        self._known.update(versions)
        sizes = {rel: size for rel, size, _mtime in versions}
        for job_id, rel in added:
            log.info("job.queued", job_id=job_id, path=rel, watch=self.root, size=sizes[rel])
        # News for the worker even when another node queued these versions first: with a
        # shared queue, they may be waiting for this node.
        self.on_enqueue()
        return len(added)


class Watcher:
    """All watched folders, driven by one thread."""

    def __init__(self, folders: list[FolderWatcher]) -> None:
        self.folders = folders
        self.wake = threading.Event()  # an event came in (set it too when stopping)
        for f in folders:
            f.on_event = self.wake.set

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

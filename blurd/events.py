"""What a watch listens to: native events or polling, the events it asks for, and where they go.

Native events come from inotify through watchdog; network and FUSE filesystems send none, so
they are polled (``wants_polling``). The observer watches the resolved root and hands each
event's paths, rewritten under the root as configured, to its folder watcher.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from blurd.config import WatchConfig

NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph"})
# The events blurd acts on. Opening and closing without writing are left out of the inotify
# mask: blurd's own reads of its inputs (hashing, uploading, reading their metadata) each made
# an opened and a closed event, which watchdog parsed and dispatched for nothing.
WANTED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, DirCreatedEvent, FileMovedEvent, DirMovedEvent, FileModifiedEvent,
    DirModifiedEvent, FileDeletedEvent, DirDeletedEvent, FileClosedEvent,
]  # fmt: skip


class Owner(Protocol):
    """The folder watcher that events are for (``watcher.FolderWatcher``)."""

    root: str

    def note_file(self, path: str) -> None: ...

    def note_directory(self, path: str) -> None: ...


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


class EventHandler(FileSystemEventHandler):
    """Passes events on, their paths under the watch's root as configured: the observer
    watches the resolved root (inotify does not follow a symlinked root)."""

    def __init__(self, owner: Owner, watched: str) -> None:
        self.owner = owner
        self.watched = watched

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = self._as_configured(os.fsdecode(event.src_path))
        dest = self._as_configured(os.fsdecode(event.dest_path)) if event.dest_path else ""
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

    def _as_configured(self, path: str) -> str:
        if path == self.watched:
            return self.owner.root
        prefix = self.watched.rstrip("/") + "/"
        if path.startswith(prefix):
            return os.path.join(self.owner.root, path[len(prefix) :])
        return path

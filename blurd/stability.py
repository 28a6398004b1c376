"""Pure logic: which names to ignore, and when a file is done being written.

A file is *stable* once ``settle_s`` seconds have passed with no event for it and no change
in its size or mtime. The clock is a parameter, so tests never sleep through a settle window.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

IGNORED_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "@eadir", "#recycle"})
IGNORED_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", ".swp")


def is_ignored_name(name: str) -> bool:
    """Hidden, temporary and NAS housekeeping names (``.*``, ``~*``, ``*.part``, ``@eaDir``…)."""
    lower = name.lower()
    return (
        lower.startswith((".", "~")) or lower in IGNORED_NAMES or lower.endswith(IGNORED_SUFFIXES)
    )


def is_ignored_rel(rel_path: str) -> bool:
    """True when any component of a path relative to the watch root is ignored."""
    return any(is_ignored_name(part) for part in rel_path.split("/") if part)


@dataclass
class _Seen:
    size: int | None
    mtime_ns: int | None
    since: float


@dataclass(frozen=True)
class Stable:
    path: str
    size: int
    mtime_ns: int
    is_symlink: bool


StatFn = Callable[[str], os.stat_result | None]


def lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


class StabilityTracker:
    """Candidates under observation, keyed by absolute path."""

    def __init__(self, settle_s: float, clock: Callable[[], float]) -> None:
        self.settle_s = settle_s
        self.clock = clock
        self._seen: dict[str, _Seen] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, path: str) -> bool:
        return path in self._seen

    def touch(self, path: str) -> None:
        """An event (or a scan) saw this path: its settle window starts again."""
        seen = self._seen.get(path)
        if seen is None:
            self._seen[path] = _Seen(None, None, self.clock())
        else:
            seen.since = self.clock()

    def forget(self, path: str) -> None:
        self._seen.pop(path, None)

    def check(self, stat: StatFn = lstat_or_none) -> list[Stable]:
        """Stat every candidate; return (and stop tracking) those that are now stable."""
        now = self.clock()
        ready: list[Stable] = []
        for path, seen in list(self._seen.items()):
            st = stat(path)
            if st is None:
                del self._seen[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
                seen.size, seen.mtime_ns, seen.since = st.st_size, st.st_mtime_ns, now
                if self.settle_s > 0:
                    continue
            if now - seen.since >= self.settle_s:
                del self._seen[path]
                is_link = (st.st_mode & 0o170000) == 0o120000
                ready.append(Stable(path, st.st_size, st.st_mtime_ns, is_link))
        return ready

    def next_check_in(self) -> float | None:
        """Seconds until the earliest candidate could be stable; None when there is none."""
        if not self._seen:
            return None
        now = self.clock()
        return max(0.0, min(s.since + self.settle_s - now for s in self._seen.values()))

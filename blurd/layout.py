"""Where things are on disk: paths as written made absolute, resolved paths compared, the
default database location, who may read a file, and the watch layouts refused because blurd
would feed on its own files (DESIGN.md section 4).

Layouts are judged on resolved paths (``os.path.realpath``): a watch folder reached through a
symlink is the folder it points to, and an output inside that folder would be watched.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from blurd.errors import ConfigError


@dataclass(frozen=True)
class Folders:
    """One watch's folders, and the key that names it (``watch[1]``, ``--inbox/--outbox``)."""

    label: str
    path: Path
    output: Path
    archive: Path | None = None


def absolute(value: str) -> Path:
    """A path as the user wrote it, ``~`` expanded, made absolute; symlinks kept."""
    return Path(os.path.abspath(Path(value).expanduser()))


def resolved(path: Path | str) -> str:
    """The real path, every symlink resolved (a part that does not exist yet is kept as is)."""
    return os.path.realpath(path)


def inside(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or below it; both resolved, absolute paths."""
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def overlap(a: str, b: str) -> bool:
    return inside(a, b) or inside(b, a)


def database_url(value: str) -> str:
    """Any SQLAlchemy URL; a bare path means SQLite."""
    if "://" in value:
        return value
    return "sqlite:///" + str(Path(value).expanduser().absolute())


def default_database_url(env: Mapping[str, str]) -> str:
    """$STATE_DIRECTORY under systemd, else $XDG_STATE_HOME/blurd (~/.local/state/blurd)."""
    if env.get("STATE_DIRECTORY"):
        base = Path(env["STATE_DIRECTORY"].split(":")[0])
    elif env.get("XDG_STATE_HOME"):
        base = Path(env["XDG_STATE_HOME"]) / "blurd"
    else:
        base = Path(env.get("HOME", "~")).expanduser() / ".local" / "state" / "blurd"
    return database_url(str(base / "blurd.db"))


def readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def check_layout(watches: Sequence[Folders], source: str) -> None:
    """Refuse nested watch folders, an output or archive inside any watch folder, a watch
    folder inside any output or archive, and an archive overlapping any output.

    Each of these makes blurd take in its own results (forever, as each result is a new file)
    or publish originals beside anonymized files. The error names the key and the file.
    """
    real = [_Real.of(w) for w in watches]
    for j, b in enumerate(real):
        for a in real[:j]:
            if overlap(b.path, a.path):
                relation = "the same folder as" if b.path == a.path else "nested with"
                raise _error(source, b.w, "path", f"is {relation} {a.w.label}.path ({a.w.path})")
    for b in real:
        for kind, mine in (("output", b.output), ("archive", b.archive)):
            for a in real:
                if mine is not None and inside(mine, a.path):
                    whose = "its own watch folder" if a is b else f"{a.w.label}.path"
                    why = "its files would be taken in again"
                    raise _error(source, b.w, kind, f"is inside {whose} ({a.w.path}): {why}")
                if kind == "archive" and mine is not None and overlap(mine, a.output):
                    why = "originals would sit among anonymized files"
                    where = f"{a.w.label}.output ({a.w.output})"
                    raise _error(source, b.w, kind, f"overlaps {where}: {why}")
    for b in real:
        for a in real:
            for kind, theirs in (("output", a.output), ("archive", a.archive)):
                if theirs is not None and inside(b.path, theirs):
                    where = f"{a.w.label}.{kind} ({getattr(a.w, kind)})"
                    why = "blurd's own files would be taken in"
                    raise _error(source, b.w, "path", f"is inside {where}: {why}")


@dataclass(frozen=True)
class _Real:
    w: Folders
    path: str
    output: str
    archive: str | None

    @classmethod
    def of(cls, w: Folders) -> _Real:
        archive = resolved(w.archive) if w.archive is not None else None
        return cls(w, resolved(w.path), resolved(w.output), archive)


def _error(source: str, w: Folders, kind: str, message: str) -> ConfigError:
    written = getattr(w, kind)
    real = resolved(written)
    shown = f"{written}" if real == str(written) else f"{written} (resolved: {real})"
    return ConfigError(f"{shown} {message}", key=f"{w.label}.{kind}", file=source)

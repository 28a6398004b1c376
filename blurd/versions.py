"""The version of an input file that was processed, reached without following symlinks.

Between hashing a file and finishing its job, the file may be replaced under the same name, or
a folder on its path swapped for a symlink leading outside the watch. Whatever acts on the
input afterwards (the originals policy, the metadata carried into the output) must act on the
version processed, or on nothing: every path is walked from the watch root one folder at a
time with ``O_NOFOLLOW``, relative to the folder already open, and the file is used only if it
is a regular file matching the recorded version (size, mtime; device, inode and ctime when
recorded).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from blurd.errors import RejectedInput
from blurd.models import int64

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW_DIR_FLAGS = _DIR_FLAGS | os.O_NOFOLLOW
# O_NOFOLLOW on a symlink gives ELOOP; with O_DIRECTORY Linux reports ENOTDIR instead.
NOT_A_FOLDER = frozenset({errno.ELOOP, errno.ENOTDIR})


@dataclass(frozen=True)
class Version:
    """The version of a source file that was processed, recorded when it was hashed.

    ``dev``, ``ino`` and ``ctime_ns`` None (rows recorded before they were kept): only size
    and mtime are compared. Only the ctime shows a file rewritten in place with the same size
    and mtime; blurd only reads the file, which leaves its ctime alone.
    """

    size: int
    mtime_ns: int
    dev: int | None
    ino: int | None
    ctime_ns: int | None = None

    @classmethod
    def of(cls, st: os.stat_result) -> Version:
        """The version described by ``st`` (an ``lstat`` of the file being hashed)."""
        return cls(st.st_size, st.st_mtime_ns, int64(st.st_dev), int64(st.st_ino),
                   int64(st.st_ctime_ns))  # fmt: skip

    def matches(self, st: os.stat_result) -> bool:
        """Whether ``st`` is a regular file and this version of it."""
        # dev and ino as the jobs table stores them: folded into signed 64 bits
        same_id = self.dev in (None, int64(st.st_dev)) and self.ino in (None, int64(st.st_ino))
        same_id = same_id and self.ctime_ns in (None, int64(st.st_ctime_ns))
        same_data = (st.st_size, st.st_mtime_ns) == (self.size, self.mtime_ns)
        return stat.S_ISREG(st.st_mode) and same_data and same_id


class OriginalChanged(Exception):
    """The file at the path is not the version processed (or is a symlink, or not a regular
    file, or is reached through a symlink); nothing was done to it."""


def split_rel(rel_path: str) -> tuple[tuple[str, ...], str]:
    """``rel_path``'s folder names and file name; refuses paths that could leave the root."""
    rel = PurePosixPath(rel_path)
    if not rel_path or "\x00" in rel_path or rel.name in ("", ".", ".."):
        raise RejectedInput(f"not a file path: {rel_path!r}")
    if rel.is_absolute() or ".." in rel.parts:
        raise RejectedInput(f"path must be relative and stay inside its folder: {rel_path!r}")
    return rel.parts[:-1], rel.name


def named(exc: OSError, path: Path) -> OSError:
    """``exc`` again (same errno, so the same subclass) with the full ``path`` as its name."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def walk(root: Path, folders: tuple[str, ...], *, create: bool) -> int:
    """Open ``root/folders`` one component at a time, never following a symlink below
    ``root``; with ``create``, missing folders are made on the way.

    ``root`` is the configured folder, opened as given (with ``create``, made as by
    ``mkdir -p``). A component that is a symlink or a file raises ``OSError`` (ELOOP or
    ENOTDIR) naming it.
    """
    try:
        if create:
            os.makedirs(root, exist_ok=True)
        fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise named(exc, root) from exc
    here = root
    try:
        for part in folders:
            here = here / part
            try:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                child = os.open(part, _NOFOLLOW_DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in NOT_A_FOLDER:
                    what = "a symlink or a file, not a folder (symlinks are not followed)"
                    raise OSError(exc.errno, what, str(here)) from exc
                raise named(exc, here) from exc
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def checked_stat(dir_fd: int, name: str, version: Version, path: Path) -> os.stat_result:
    """``lstat`` of ``name`` in ``dir_fd``; ``OriginalChanged`` unless it is ``version``."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        raise named(exc, path) from exc
    if stat.S_ISLNK(st.st_mode):
        raise OriginalChanged(f"{path} was left alone: it is now a symlink.")
    if not version.matches(st):
        raise OriginalChanged(not_processed(path))
    return st


def not_processed(path: Path) -> str:
    return f"{path} was left alone: it is not the version that was processed."


def open_folder(watch_root: Path, rel_path: str) -> tuple[int, tuple[str, ...], str, Path]:
    """The folder of ``<watch_root>/<rel_path>``, opened by ``walk``: (its descriptor, the
    folder names, the file name, the full path). ``OriginalChanged`` when a folder on the way
    is a symlink or a file; ``RejectedInput`` for a path that leaves its folder."""
    folders, name = split_rel(rel_path)
    path = watch_root.joinpath(*folders, name)
    try:
        return walk(watch_root, folders, create=False), folders, name, path
    except OSError as exc:
        if exc.errno not in NOT_A_FOLDER:
            raise
        raise OriginalChanged(f"{path} was left alone: {exc.filename} is not a folder.") from exc


@contextlib.contextmanager
def open_version(watch_root: Path, rel_path: str, version: Version) -> Iterator[BinaryIO]:
    """``<watch_root>/<rel_path>`` opened for reading if it is still ``version``.

    Raises ``OriginalChanged`` when it is not (or is reached through a symlink),
    ``FileNotFoundError`` when it is gone, ``RejectedInput`` for a path that leaves its folder.
    The open file is checked again (``fstat``) so that a file swapped in after the check is
    not the one read.
    """
    dir_fd, _folders, name, path = open_folder(watch_root, rel_path)
    try:
        checked_stat(dir_fd, name, version, path)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            raise named(exc, path) from exc
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as f:
        if not version.matches(os.fstat(fd)):
            raise OriginalChanged(not_processed(path))
        yield f

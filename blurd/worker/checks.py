"""What may be sent, and what was read: input rejection and hashing with the file's identity.

The identity (device, inode, ctime) recorded with the hash lets later steps notice a file
rewritten in place with the same size and mtime, which the watcher cannot see: the upload
sends the bytes that were hashed, or it is not sent.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from blurd import defaults, heap
from blurd.models import int64

_HASH_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Identity:
    """What ``lstat`` says of one version of a file."""

    size: int
    mtime_ns: int
    dev: int
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        """Device, inode and ctime folded as the jobs table stores them (``models.int64``)."""
        dev, ino, ctime = int64(st.st_dev), int64(st.st_ino), int64(st.st_ctime_ns)
        return cls(st.st_size, st.st_mtime_ns, dev, ino, ctime)


class FileChanged(Exception):
    """The file changed while it was read; its hash says nothing."""


def rejection(
    path: Path, supported: frozenset[str], version: tuple[int, int] | None = None
) -> str | None:
    """Why ``path`` must not be sent to an engine, in one sentence; None when it may be.

    ``version`` is the (size, mtime_ns) the file had when it was queued, if it was.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "the file disappeared before it could be uploaded"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link; blurd never follows links"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if version is not None and (st.st_size, st.st_mtime_ns) != version:
        return "changed after it was queued; its new version is queued on its own"
    if st.st_size == 0:
        return "is empty"
    ext = path.suffix.lower()
    if ext not in supported:
        allowed = " ".join(sorted(supported))
        return f"has an unsupported extension {ext or '(none)'} (supported: {allowed})"
    if st.st_size > defaults.MAX_INPUT_BYTES:
        return f"is larger than the {defaults.MAX_INPUT_BYTES // 1024**3} GiB upload limit"
    if not os.access(path, os.R_OK):
        return "cannot be read: permission denied"
    return None


def identity(path: Path) -> Identity | None:
    """The identity of whatever is at ``path`` now (a link is not followed); None if nothing."""
    try:
        return Identity.of(os.lstat(path))
    except FileNotFoundError:
        return None


def hash_file(path: Path) -> tuple[str, Identity]:
    """The sha256 of ``path`` and the identity of the version read.

    Raises ``FileChanged`` when the file was written to while it was read (its size, mtime or
    ctime moved), and ``OSError`` when it cannot be read.
    """
    sha = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        before = Identity.of(os.fstat(fh.fileno()))
        for chunk in heap.chunks(fh, _HASH_CHUNK_BYTES):
            sha.update(chunk)
        after = Identity.of(os.fstat(fh.fileno()))
    if after != before:
        raise FileChanged(f"{path.name} was written to while it was hashed")
    return sha.hexdigest(), before


def file_sha256(path: Path) -> str:
    """The sha256 of a file that nobody is expected to change (an output, say)."""
    return hash_file(path)[0]

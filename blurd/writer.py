"""Placing files durably: output names, temp files, no-overwrite placement.

Every result is written to a temp file in its target folder (named ``.blurd-…``, so watchers
and media servers skip it), fsynced, then given its final name with ``os.link``, which fails
instead of overwriting. A name already taken by a different file moves the new one to
``-1``, ``-2``, … before its extension; a name taken by an identical file (an output placed
just before a crash) counts as placed. Then the temp name is removed and the folder fsynced.

I/O failures surface as ``OSError`` subclasses whose message names the path; the worker turns
them into retries. Paths that could land outside the output folder raise ``RejectedInput``.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import BinaryIO

from blurd import heap
from blurd.defaults import TEMP_PREFIX
from blurd.errors import RejectedInput

# The umask is process-global and can only be read by setting it, so read it once, at import,
# before any thread of ours creates files. Final files get the mode a plain open() would give.
_UMASK = os.umask(0o077)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK

_COPY_CHUNK_BYTES = 1024 * 1024
_MAX_NUMBERED_NAMES = 10_000  # "-1" … "-9999"; past that something is wrong with the folder
_TEMP_NAME_ATTEMPTS = 16
_SANE_EXTENSION = re.compile(r"[A-Za-z0-9]{1,8}")
# link() errors that mean "this filesystem cannot hard-link" (SMB, some FUSE): fall back to
# rename(), which cannot refuse to overwrite, after checking that the name is free.
_LINK_UNSUPPORTED = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}
)
# fsync() on a directory is refused by some network filesystems; there is nothing more to do.
_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


# --- names -------------------------------------------------------------------------------


def _safe_rel(rel_path: str) -> PurePosixPath:
    """``rel_path`` as a relative POSIX path that cannot climb out of the folder it joins."""
    rel = PurePosixPath(rel_path)
    if not rel_path or "\x00" in rel_path or rel.name in ("", "."):
        raise RejectedInput(f"not a file path: {rel_path!r}")
    if rel.is_absolute() or ".." in rel.parts:
        raise RejectedInput(f"path must be relative and stay inside its folder: {rel_path!r}")
    return rel


def _inside(root: Path, path: Path) -> Path:
    """``path``, after checking that its folder resolves inside ``root`` (no symlink escape).

    ``os.path.realpath`` on strings: ``Path.resolve`` builds a path object and stats the
    result besides, which was 2 % of blurd's CPU per job (two targets a job)."""
    real_root, real_folder = os.path.realpath(root), os.path.realpath(path.parent)
    if real_folder != real_root and not real_folder.startswith(real_root.rstrip(os.sep) + os.sep):
        raise RejectedInput(f"{path} would land outside {root}")
    return path


def _result_extension(result_name: str | None) -> str | None:
    """The lower-cased extension (with the dot) of an untrusted file name, if it is a sane one."""
    if not result_name:
        return None
    last_segment = re.split(r"[/\\]", result_name)[-1]
    suffix = PurePosixPath(last_segment).suffix if last_segment not in ("", ".", "..") else ""
    if not _SANE_EXTENSION.fullmatch(suffix[1:]):
        return None
    return suffix.lower()


def media_target(output_root: Path, rel_path: str, result_name: str | None) -> Path:
    """Where the anonymized media for ``<watch>/<rel_path>`` goes: ``<output_root>/<rel_path>``.

    ``rel_path`` is the source path relative to the watch root, with ``/`` separators. When
    the engine's result file (``result_name``, untrusted: only its extension is used, and only
    a sane one of 1-8 letters or digits) has another extension than the input (``.jpg`` and
    ``.jpeg`` count as different), the name becomes the input's stem plus the result's
    lower-cased extension. Raises ``RejectedInput`` for an absolute ``rel_path``, one with
    ``..``, or one whose folder resolves outside ``output_root``.
    """
    rel = _safe_rel(rel_path)
    name = rel.name
    new_ext = _result_extension(result_name)
    if new_ext is not None and new_ext != rel.suffix.lower():
        name = rel.stem + new_ext
    return _inside(output_root, output_root.joinpath(*rel.parent.parts, name))


def detections_target(output_root: Path, rel_path: str) -> Path:
    """Where the detections JSON for ``<watch>/<rel_path>`` goes: ``<output_root>/<rel_path>.json``.

    The input's full name is kept (``a.jpg`` gives ``a.jpg.json``). Raises ``RejectedInput``
    like ``media_target``.
    """
    rel = _safe_rel(rel_path)
    return _inside(output_root, output_root.joinpath(*rel.parent.parts, rel.name + ".json"))


def numbered(target: Path, n: int) -> Path:
    """``target`` with ``-n`` before its last extension: ``a.jpg`` → ``a-1.jpg``, ``a.jpg.json``
    → ``a.jpg-1.json``; ``n == 0`` is ``target`` itself."""
    if n == 0:
        return target
    return target.with_name(f"{target.stem}-{n}{target.suffix}")


# --- temp files --------------------------------------------------------------------------


def temp_name(target: Path, *, suffix: str = "") -> Path:
    """A new temp file name (``TEMP_PREFIX``, 64 random bits) in ``target``'s folder, for a
    writer that creates the file itself with O_EXCL; the folder is made if needed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return _temp_path(target.parent, suffix)


def _temp_path(folder: Path, suffix: str) -> Path:
    return folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}{suffix}"


class TempFile:
    """A new, private (0o600) temp file in ``target``'s folder, created along with that folder.

    Its name starts with ``TEMP_PREFIX`` so that nothing takes it for a finished file. Write to
    ``.file``, then ``close()`` it and ``place()`` it, preferably still inside the ``with``
    block::

        with TempFile(target) as tmp:
            engine.fetch(remote_id, status, "media", tmp.file)
            tmp.close()
            final = place(tmp.path, target)

    An exception inside the block closes and removes the temp file. Leaving the block normally
    only closes it, so ``place()`` may also come after the block (a temp file left behind by a
    crash is removed by ``clean_temp_files`` at start-up).
    """

    def __init__(self, target: Path, *, suffix: str = ".tmp") -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
        for _ in range(_TEMP_NAME_ATTEMPTS):
            path = _temp_path(target.parent, suffix)
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                continue
            break
        else:
            raise FileExistsError(errno.EEXIST, "no free temp file name", str(target.parent))
        self.path: Path = path
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def close(self) -> None:
        """Flush and close ``.file`` (so ``place()`` sees every byte written); idempotent."""
        self.file.close()

    def seal(self, mode: int) -> None:
        """Flush, give the final ``mode``, fsync and close: ready for ``_claim``."""
        self.file.flush()
        os.fchmod(self.file.fileno(), mode)
        os.fsync(self.file.fileno())
        self.file.close()

    def discard(self) -> None:
        """Close and remove the temp file, if it is still there."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> TempFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


# --- placement ---------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (a new or removed name) durable, where the filesystem can."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def same_content(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are regular files (symlinks are not followed) with equal bytes."""
    try:
        sa, sb = a.lstat(), b.lstat()
    except FileNotFoundError:
        return False
    if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)) or sa.st_size != sb.st_size:
        return False
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    with a.open("rb") as fa, b.open("rb") as fb:
        size = heap.read_size(fa, _COPY_CHUNK_BYTES)
        while True:
            chunk = fa.read(size)
            if chunk != fb.read(size):
                return False
            if not chunk:
                return True


def _claim(src: Path, target: Path, *, sync_folder: bool = True) -> Path:
    """Give ``src`` the first free name among ``target``, ``target-1``, … and drop ``src``.

    Never overwrites: ``os.link`` fails on a taken name. Where hard links are unsupported it
    falls back to "check the name is free, then ``os.rename``", which leaves a small race: a
    file created under that name between the check and the rename is overwritten (blurd's own
    writers never race there, since each job has its own target). A taken name whose file has
    the same bytes as ``src`` counts as the placement: ``src`` is dropped and that name
    returned. Cross-device ``src`` raises ``OSError(EXDEV)`` with nothing changed. The folder
    is fsynced afterwards unless ``sync_folder`` is False (see ``place_bytes_from``).
    """
    use_link = True
    for n in range(_MAX_NUMBERED_NAMES):
        candidate = numbered(target, n)
        if use_link:
            try:
                os.link(src, candidate)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno not in _LINK_UNSUPPORTED:
                    raise
                use_link = False
            else:
                src.unlink()
                break
        if not use_link and not os.path.lexists(candidate):
            os.rename(src, candidate)
            break
        if same_content(src, candidate):
            src.unlink()
            break
    else:
        raise FileExistsError(errno.EEXIST, "no free numbered name", str(target))
    if sync_folder:
        _fsync_dir(candidate.parent)
    return candidate


def _place(tmp: Path, target: Path, mode: int) -> Path:
    os.chmod(tmp, mode)
    _fsync_path(tmp)
    return _claim(tmp, target)


def place(tmp: Path, target: Path) -> Path:
    """Give the finished temp file ``tmp`` its final name, ``target`` or ``target-N``; return it.

    ``tmp`` must be closed and in ``target``'s folder (``TempFile`` does both). Its data is
    fsynced and its mode set to ``0o666 & ~umask`` before it appears under the final name; an
    existing different file is never overwritten (``-1``, ``-2``, … before the extension), an
    existing identical one counts as placed. Afterwards ``tmp`` is gone and the folder fsynced.
    On filesystems without hard links, see ``_claim`` for the small race of the fallback.
    """
    return _place(tmp, target, FILE_MODE)


def place_bytes_from(
    stream_writer: Callable[[BinaryIO], int], target: Path, *, sync_folder: bool = True
) -> tuple[Path, int]:
    """Write a file with ``stream_writer(out) -> bytes written`` and place it at ``target`` as
    ``place()`` does (data fsynced through the open file, then linked).

    Returns the final path and the byte count. If anything fails, no temp file is left.
    ``sync_folder`` False leaves the folder's fsync to the caller: two files placed in one
    folder, one after the other, need only one (``sync_folder()`` after the second).
    """
    with TempFile(target) as tmp:
        written = stream_writer(tmp.file)
        tmp.seal(FILE_MODE)
        return _claim(tmp.path, target, sync_folder=sync_folder), written


def sync_folder(path: Path) -> None:
    """Make the names placed in folder ``path`` durable (after ``sync_folder=False``)."""
    _fsync_dir(path)


# --- start-up clean-up -------------------------------------------------------------------


def clean_temp_files(root: Path, *, min_age_s: float = 0.0) -> int:
    """Remove the temp files (``TEMP_PREFIX*``) left under ``root`` by a crash; return the count.

    Walks ``root`` recursively without following symlinked folders; unreadable folders are
    skipped, a missing ``root`` gives 0. With ``min_age_s``, temp files modified more recently
    than that are left alone (another blurd process sharing the folder may be writing them).
    """
    cutoff = time.time() - min_age_s
    removed = 0
    for folder, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            if not name.startswith(TEMP_PREFIX):
                continue
            path = Path(folder, name)
            try:
                if min_age_s > 0 and path.lstat().st_mtime > cutoff:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
    return removed

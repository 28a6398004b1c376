"""The originals policy (keep, move, delete), applied only to the version that was processed.

Between hashing a file and finishing its job, the file may be replaced under the same name,
or a folder on its path swapped for a symlink leading outside the watch: acting on whatever is
at the path would delete or archive a file blurd never anonymized. So every path is walked
from the watch root one folder at a time with ``O_NOFOLLOW``, relative to the folder already
open, and the file is acted on only if it is a regular file matching the version processed
(size, mtime; device, inode and ctime when recorded); else ``OriginalChanged``, nothing done.
The archive tree is walked (and created) the same way.

Checking and unlinking are two system calls; a file swapped in between is the one window left
(POSIX has no unlink-if-inode). Linux only: ``writer.same_content`` is given names inside an
open folder through ``/proc/self/fd``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import BinaryIO

from blurd import heap
from blurd.defaults import TEMP_PREFIX
from blurd.versions import (
    OriginalChanged,
    Version,
    checked_stat,
    named,
    not_processed,
    open_folder,
    walk,
)
from blurd.writer import numbered, same_content

# link() errors meaning "this filesystem cannot hard-link" (SMB, some FUSE); EXDEV is handled
# before these, as a copy.
_LINK_UNSUPPORTED = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})
_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})
_MAX_NUMBERED_NAMES = 10_000
_TEMP_NAME_ATTEMPTS = 16
_COPY_CHUNK_BYTES = 1024 * 1024


def apply(
    policy: str, watch_root: Path, rel_path: str, version: Version, archive_root: Path | None
) -> Path | None:
    """Apply a watch's ``originals`` policy to ``<watch_root>/<rel_path>`` if it is ``version``.

    Call it only once every output of the job is durably in place.

    - ``"keep"``: nothing is touched; returns None.
    - ``"delete"``: the file is unlinked and its folder fsynced; returns None.
    - ``"move"``: the file goes to ``<archive_root>/<rel_path>``, never overwriting: a name
      taken by a different file gives ``-1``, ``-2``, … (``writer.numbered``), one taken by an
      identical file counts as the move. Same device: a hard link, then the source is unlinked
      (a rename where hard links are unsupported). Across devices: a copy (mode and times kept,
      fsynced) placed the same way, then the source is re-checked and unlinked. Returns the
      archived path.

    Raises ``OriginalChanged`` when the file is not ``version``, not a regular file, a symlink,
    or reached through a symlinked folder; ``FileNotFoundError`` when it (or a folder on its
    path) is gone, before anything is created; ``OSError`` naming the path for I/O errors,
    including a symlink or a non-folder inside the archive tree, which is never followed.
    ``ValueError`` for an unknown policy or "move" without ``archive_root``; ``RejectedInput``
    for a ``rel_path`` that could leave its folder.
    """
    if policy == "keep":
        return None
    if policy not in ("move", "delete"):
        raise ValueError(f"unknown originals policy {policy!r} (keep, move or delete)")
    if policy == "move" and archive_root is None:
        raise ValueError(f"originals = 'move' needs an archive folder (moving {rel_path!r})")
    src_dir, folders, name, source = open_folder(watch_root, rel_path)
    try:
        st = checked_stat(src_dir, name, version, source)
        if policy == "delete":
            _unlink(src_dir, name, source)
            return None
        assert archive_root is not None
        dest_folder = archive_root.joinpath(*folders)
        arc_dir = walk(archive_root, folders, create=True)
        try:
            if os.fstat(arc_dir).st_dev == st.st_dev:
                try:
                    final = _move_same_device(src_dir, name, st, source, arc_dir, dest_folder)
                    return dest_folder / final
                except OSError as exc:
                    if exc.errno != errno.EXDEV:  # a bind mount: one device, yet no links
                        raise
            return dest_folder / _move_across(src_dir, name, version, source, arc_dir, dest_folder)
        finally:
            os.close(arc_dir)
    finally:
        os.close(src_dir)


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _at(dir_fd: int, name: str) -> Path:
    """A path to ``name`` inside the open folder ``dir_fd`` that no rename or symlink can
    redirect to another folder (for ``same_content``, which takes paths)."""
    return Path(f"/proc/self/fd/{dir_fd}") / name


def _exists(dir_fd: int, name: str) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return bool(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
    return False


def _unlink(dir_fd: int, name: str, path: Path, *, missing_ok: bool = False) -> None:
    """Unlink ``name`` in ``dir_fd`` and fsync the folder; errors name ``path``."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return
    except OSError as exc:
        raise named(exc, path) from exc
    _fsync_dir(dir_fd)


def _discard(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _fsync_dir(dir_fd: int) -> None:
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise


def _claim(src_dir: int, src: str, arc_dir: int, name: str, dest_folder: Path) -> tuple[str, str]:
    """Give the file ``src`` (in ``src_dir``) a second, free name among ``name``, ``name-1``,
    … in ``arc_dir``; return that name and how: ``"linked"`` (``src`` is still there too),
    ``"renamed"`` (it is not), or ``"identical"`` (a file with the same bytes already had it).

    Never overwrites with ``os.link``. Where hard links are unsupported, "the name is free,
    then rename" is the best there is: a file created under it in between would be replaced.
    ``OSError(EXDEV)`` propagates with nothing changed; other errors name the path.
    """
    link = functools.partial(os.link, src_dir_fd=src_dir, dst_dir_fd=arc_dir, follow_symlinks=False)
    use_link = True
    for n in range(_MAX_NUMBERED_NAMES):
        candidate = numbered(Path(name), n).name
        try:
            if use_link:
                try:
                    link(src, candidate)
                    return candidate, "linked"
                except FileExistsError:
                    pass
                except OSError as exc:
                    if exc.errno not in _LINK_UNSUPPORTED:
                        raise
                    use_link = False
            if not use_link and not _exists(arc_dir, candidate):
                os.rename(src, candidate, src_dir_fd=src_dir, dst_dir_fd=arc_dir)
                return candidate, "renamed"
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise
            raise named(exc, dest_folder / candidate) from exc
        if same_content(_at(src_dir, src), _at(arc_dir, candidate)):
            return candidate, "identical"
    raise FileExistsError(errno.EEXIST, "no free numbered name", str(dest_folder / name))


def _unlink_if_same_inode(src_dir: int, name: str, st: os.stat_result, source: Path) -> None:
    """Unlink ``name`` if it is still the inode ``st`` describes.

    Used once that inode is safely in the archive: a name since removed or given to another
    file is left as it is, since the version processed is archived either way.
    """
    try:
        now = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise named(exc, source) from exc
    if _same_inode(now, st):
        _unlink(src_dir, name, source, missing_ok=True)


def _move_same_device(
    src_dir: int, name: str, st: os.stat_result, source: Path, arc_dir: int, dest_folder: Path
) -> str:
    """Link the checked source into the archive, then unlink it; return the archived name."""
    final, how = _claim(src_dir, name, arc_dir, name, dest_folder)
    if how == "linked":
        linked = os.stat(final, dir_fd=arc_dir, follow_symlinks=False)
        if not _same_inode(linked, st):  # the name was swapped between check and link
            _unlink(arc_dir, final, dest_folder / final)
            raise OriginalChanged(not_processed(source))
    _fsync_dir(arc_dir)
    if how == "renamed":
        _fsync_dir(src_dir)
    else:
        _unlink_if_same_inode(src_dir, name, st, source)
    return final


def _move_across(
    src_dir: int, name: str, version: Version, source: Path, arc_dir: int, dest_folder: Path
) -> str:
    """Copy the source into the archive through one open file (mode and times kept), place
    the copy, re-check the source is still the version processed, then unlink it.

    A source written to during the copy, or replaced before the unlink, raises
    ``OriginalChanged`` and the copy is removed; a source gone meanwhile leaves the copy,
    the only trace left of the version processed.
    """
    try:
        src_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OriginalChanged(f"{source} was left alone: it is now a symlink.") from exc
        raise named(exc, source) from exc
    with os.fdopen(src_fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not version.matches(st):
            raise OriginalChanged(not_processed(source))
        tmp = _copy_to_temp(src, st, arc_dir, dest_folder)
        copied_clean = version.matches(os.fstat(src.fileno()))
    try:
        final, how = _claim(arc_dir, tmp, arc_dir, name, dest_folder)
    except BaseException:
        _discard(arc_dir, tmp)
        raise
    if how != "renamed":
        _discard(arc_dir, tmp)
    _fsync_dir(arc_dir)
    try:
        now: os.stat_result | None = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
    except FileNotFoundError:
        now = None
    except OSError as exc:
        raise named(exc, source) from exc
    replaced = now is not None and not (version.matches(now) and _same_inode(now, st))
    if not copied_clean or replaced:
        if how != "identical":  # a copy of a version nobody asked to archive
            _unlink(arc_dir, final, dest_folder / final, missing_ok=True)
        raise OriginalChanged(not_processed(source))
    if now is not None:
        _unlink(src_dir, name, source, missing_ok=True)
    return final


def _copy_to_temp(src: BinaryIO, st: os.stat_result, arc_dir: int, dest_folder: Path) -> str:
    """A fsynced copy of ``src`` with ``st``'s mode and times, under a temp name (hidden from
    watchers and media servers, removed at start-up if a crash leaves it) in ``arc_dir``."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    for _ in range(_TEMP_NAME_ATTEMPTS):
        tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=arc_dir)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise named(exc, dest_folder / tmp) from exc
    else:
        raise FileExistsError(errno.EEXIST, "no free temp file name", str(dest_folder))
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, heap.read_size(src, _COPY_CHUNK_BYTES))
            out.flush()
            os.fchmod(out.fileno(), stat.S_IMODE(st.st_mode))
            os.utime(out.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(out.fileno())
    except BaseException as exc:
        _discard(arc_dir, tmp)
        if isinstance(exc, OSError):
            raise named(exc, dest_folder / tmp) from exc
        raise
    return tmp

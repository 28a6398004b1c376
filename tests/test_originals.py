"""The originals policy acts only on the version processed and never follows a symlink."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blurd import originals
from blurd.defaults import TEMP_PREFIX
from blurd.errors import RejectedInput
from blurd.originals import OriginalChanged, Version

OLD_NS = 1_600_000_000_000_000_000


def make_source(tmp_path: Path, rel: str, data: bytes = b"original") -> tuple[Path, Version]:
    """Create ``<tmp_path>/inbox/<rel>`` and record its version, as hashing does."""
    source = tmp_path / "inbox" / rel
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    return source, Version.of(source.lstat())


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (symlinks not followed): its bytes, link target or 'dir'."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[rel] = "dir"
            elif not path.is_file():
                found[rel] = "special"  # a FIFO: reading it would block
            else:
                found[rel] = path.read_bytes().decode("latin-1")
    return found


@pytest.fixture
def other_device(tmp_path: Path) -> Iterator[Path]:
    """A fresh folder on another filesystem than ``tmp_path`` (/dev/shm), removed afterwards."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("/dev/shm is missing or on the same device as tmp_path: no second device")
    folder = Path(tempfile.mkdtemp(prefix="blurd-test-", dir=shm))
    yield folder
    shutil.rmtree(folder)


# --- keep and delete ---------------------------------------------------------------------


def test_keep_touches_nothing_even_for_a_changed_or_missing_file(tmp_path: Path) -> None:
    """'keep' returns None without looking: a changed file stays, a missing one raises nothing."""
    source, version = make_source(tmp_path, "a/b.jpg")
    source.write_bytes(b"changed since")
    assert originals.apply("keep", tmp_path / "inbox", "a/b.jpg", version, None) is None
    assert originals.apply("keep", tmp_path / "inbox", "gone.jpg", version, None) is None
    assert source.read_bytes() == b"changed since"


def test_delete_removes_the_processed_version(tmp_path: Path) -> None:
    """'delete' unlinks the file when it is the version processed, nested folders included."""
    source, version = make_source(tmp_path, "2024/x/b.jpg")
    assert originals.apply("delete", tmp_path / "inbox", "2024/x/b.jpg", version, None) is None
    assert not source.exists()
    assert (tmp_path / "inbox/2024/x").is_dir()


def test_delete_without_recorded_inode_compares_size_and_mtime(tmp_path: Path) -> None:
    """Rows without device and inode still match on size and mtime alone."""
    source, version = make_source(tmp_path, "b.jpg")
    old_row = Version(version.size, version.mtime_ns, None, None)
    originals.apply("delete", tmp_path / "inbox", "b.jpg", old_row, None)
    assert not source.exists()


@pytest.mark.parametrize("policy", ["delete", "move"])
def test_missing_file_raises_file_not_found_and_creates_nothing(
    tmp_path: Path, policy: str
) -> None:
    """A file (or folder) already gone raises FileNotFoundError naming it; no archive is made."""
    (tmp_path / "inbox").mkdir()
    version = Version(8, OLD_NS, None, None)
    archive = tmp_path / "archive"
    with pytest.raises(FileNotFoundError, match=r"gone\.jpg"):
        originals.apply(policy, tmp_path / "inbox", "gone.jpg", version, archive)
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        originals.apply(policy, tmp_path / "inbox", "no-such-folder/a.jpg", version, archive)
    assert not archive.exists()


# --- the file is not the version processed -----------------------------------------------


def replace_with_new_inode(source: Path, version: Version) -> None:
    """Another file under the same name: same size and mtime, new inode."""
    other = source.with_name("other")
    other.write_bytes(b"imposter")  # same length as b"original"
    os.utime(other, ns=(version.mtime_ns, version.mtime_ns))
    os.replace(other, source)


def rewrite_in_place(source: Path, version: Version) -> None:
    """The same inode rewritten: same size, another mtime."""
    source.write_bytes(b"imposter")
    os.utime(source, ns=(OLD_NS, OLD_NS))


@pytest.mark.parametrize("policy", ["delete", "move"])
@pytest.mark.parametrize("change", [replace_with_new_inode, rewrite_in_place])
def test_file_replaced_under_the_same_name_is_left_alone(
    tmp_path: Path, policy: str, change: Callable[[Path, Version], None]
) -> None:
    """A file that is not the version processed raises OriginalChanged; nothing is touched."""
    source, version = make_source(tmp_path, "a/b.jpg")
    change(source, version)
    archive = tmp_path / "archive"
    before = tree(tmp_path / "inbox")
    with pytest.raises(OriginalChanged, match=str(source)):
        originals.apply(policy, tmp_path / "inbox", "a/b.jpg", version, archive)
    assert tree(tmp_path / "inbox") == before
    assert source.read_bytes() == b"imposter"
    assert not archive.exists()


@pytest.mark.parametrize("policy", ["delete", "move"])
@pytest.mark.parametrize("recorded", ["processed inode", "no inode", "outside file's inode"])
def test_folder_swapped_for_symlink_leading_outside_is_refused(
    tmp_path: Path, policy: str, recorded: str
) -> None:
    """inbox/sub replaced by a symlink to a look-alike folder outside the watch: refused, and
    the outside file is untouched, whatever identity the version recorded."""
    _, version = make_source(tmp_path, "sub/a.jpg")
    shutil.rmtree(tmp_path / "inbox/sub")
    outside = tmp_path / "elsewhere/sub/a.jpg"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(b"original")
    os.utime(outside, ns=(version.mtime_ns, version.mtime_ns))
    (tmp_path / "inbox/sub").symlink_to(outside.parent, target_is_directory=True)
    if recorded == "no inode":
        version = Version(version.size, version.mtime_ns, None, None)
    elif recorded == "outside file's inode":
        version = Version.of(outside.lstat())
    archive = tmp_path / "archive"
    with pytest.raises(OriginalChanged, match=str(tmp_path / "inbox/sub")):
        originals.apply(policy, tmp_path / "inbox", "sub/a.jpg", version, archive)
    assert outside.read_bytes() == b"original"
    assert (tmp_path / "inbox/sub").is_symlink()
    assert not archive.exists()


def make_symlink(path: Path, outside: Path) -> None:
    path.symlink_to(outside)


def make_folder(path: Path, outside: Path) -> None:
    path.mkdir()


def make_fifo(path: Path, outside: Path) -> None:
    os.mkfifo(path)


@pytest.mark.parametrize("policy", ["delete", "move"])
@pytest.mark.parametrize("make", [make_symlink, make_folder, make_fifo])
def test_file_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, policy: str, make: Callable[[Path, Path], None]
) -> None:
    """A symlink (even to a file matching the version), a folder or a FIFO at the file's name
    raises OriginalChanged; it and the symlink's target stay as they were."""
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"original")
    version = Version.of(outside.stat())
    (tmp_path / "inbox").mkdir()
    make(tmp_path / "inbox/a.jpg", outside)
    before = tree(tmp_path / "inbox")
    archive = tmp_path / "archive"
    with pytest.raises(OriginalChanged, match=str(tmp_path / "inbox/a.jpg")):
        originals.apply(policy, tmp_path / "inbox", "a.jpg", version, archive)
    assert tree(tmp_path / "inbox") == before
    assert outside.read_bytes() == b"original"
    assert not archive.exists()


# --- move --------------------------------------------------------------------------------


def test_move_mirrors_relative_path_keeping_inode_and_mode(tmp_path: Path) -> None:
    """'move' puts the file at <archive>/<rel> with the same inode, bytes and mode."""
    source, _ = make_source(tmp_path, "2024/x/b.jpg")
    source.chmod(0o640)
    version = Version.of(source.lstat())
    archive = tmp_path / "archive"
    moved = originals.apply("move", tmp_path / "inbox", "2024/x/b.jpg", version, archive)
    assert moved == archive / "2024/x/b.jpg"
    assert moved.read_bytes() == b"original"
    assert moved.stat().st_ino == version.ino
    assert stat.S_IMODE(moved.stat().st_mode) == 0o640
    assert not source.exists()


def test_move_never_overwrites_a_taken_name(tmp_path: Path) -> None:
    """A different file already at the archive name makes the moved one '-1'."""
    archive = tmp_path / "archive"
    (archive / "a").mkdir(parents=True)
    (archive / "a/b.jpg").write_bytes(b"older")
    source, version = make_source(tmp_path, "a/b.jpg")
    moved = originals.apply("move", tmp_path / "inbox", "a/b.jpg", version, archive)
    assert moved == archive / "a/b-1.jpg"
    assert (archive / "a/b.jpg").read_bytes() == b"older"
    assert moved.read_bytes() == b"original"
    assert not source.exists()


def test_move_identical_existing_file_counts_as_placed(tmp_path: Path) -> None:
    """An identical file already archived (moved just before a crash) is the move's result."""
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "b.jpg").write_bytes(b"original")
    source, version = make_source(tmp_path, "b.jpg")
    assert originals.apply("move", tmp_path / "inbox", "b.jpg", version, archive) == (
        archive / "b.jpg"
    )
    assert not source.exists()
    assert tree(archive) == {"b.jpg": "original"}


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_inside_archive_tree_is_refused(tmp_path: Path, dangling: bool) -> None:
    """A symlinked folder inside the archive raises OSError naming it (a symlink there is an
    archive problem, not a changed original); nothing is written where it points, and the
    source stays."""
    archive = tmp_path / "archive"
    archive.mkdir()
    pointed = tmp_path / "pointed-at"
    if not dangling:
        pointed.mkdir()
    (archive / "a").symlink_to(pointed, target_is_directory=True)
    source, version = make_source(tmp_path, "a/b.jpg")
    with pytest.raises(OSError, match=str(archive / "a")) as info:
        originals.apply("move", tmp_path / "inbox", "a/b.jpg", version, archive)
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert source.read_bytes() == b"original"
    assert tree(archive) == {"a": f"-> {pointed}"}
    assert pointed.exists() is not dangling
    if not dangling:
        assert list(pointed.iterdir()) == []


@pytest.mark.parametrize("blocked", ["archive", "archive/a"])
def test_archive_disk_errors_surface_as_oserror_naming_the_path(
    tmp_path: Path, blocked: str
) -> None:
    """A file where an archive folder must be (root or below) is an OSError naming that path;
    the source stays."""
    (tmp_path / blocked).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / blocked).write_bytes(b"in the way")
    source, version = make_source(tmp_path, "a/b.jpg")
    with pytest.raises(OSError, match=str(tmp_path / blocked)):
        originals.apply("move", tmp_path / "inbox", "a/b.jpg", version, tmp_path / "archive")
    assert source.read_bytes() == b"original"
    assert (tmp_path / blocked).read_bytes() == b"in the way"


def test_move_across_devices_copies_keeps_mode_and_times_then_unlinks(
    tmp_path: Path, other_device: Path
) -> None:
    """Across filesystems the file is copied (bytes, mode, mtime kept) and placed without
    overwriting, then the source is unlinked; no temp file is left."""
    source, _ = make_source(tmp_path, "a/b.jpg", b"x" * 3_000_000)
    source.chmod(0o640)
    os.utime(source, ns=(OLD_NS, OLD_NS))
    version = Version.of(source.lstat())
    (other_device / "a").mkdir()
    (other_device / "a/b.jpg").write_bytes(b"older")
    moved = originals.apply("move", tmp_path / "inbox", "a/b.jpg", version, other_device)
    assert moved == other_device / "a/b-1.jpg"
    assert moved.read_bytes() == b"x" * 3_000_000
    assert stat.S_IMODE(moved.stat().st_mode) == 0o640
    assert moved.stat().st_mtime_ns == OLD_NS
    assert (other_device / "a/b.jpg").read_bytes() == b"older"
    assert not source.exists()
    assert not any(name.startswith(TEMP_PREFIX) for name in tree(other_device))


def test_move_across_devices_identical_existing_counts_as_placed(
    tmp_path: Path, other_device: Path
) -> None:
    """Across filesystems too, an identical archived file is the result and no copy is left."""
    (other_device / "b.jpg").write_bytes(b"original")
    source, version = make_source(tmp_path, "b.jpg")
    moved = originals.apply("move", tmp_path / "inbox", "b.jpg", version, other_device)
    assert moved == other_device / "b.jpg"
    assert not source.exists()
    assert tree(other_device) == {"b.jpg": "original"}


def test_move_across_devices_refuses_a_changed_file(tmp_path: Path, other_device: Path) -> None:
    """Across filesystems a file that is not the version processed is neither copied nor
    removed."""
    source, version = make_source(tmp_path, "b.jpg")
    replace_with_new_inode(source, version)
    with pytest.raises(OriginalChanged, match=str(source)):
        originals.apply("move", tmp_path / "inbox", "b.jpg", version, other_device)
    assert source.read_bytes() == b"imposter"
    assert tree(other_device) == {}


# --- arguments ---------------------------------------------------------------------------


def test_refuses_bad_policy_missing_archive_and_escaping_paths(tmp_path: Path) -> None:
    """Unknown policy or 'move' without archive is ValueError; a rel_path that could leave its
    folder is RejectedInput; the source stays in every case."""
    source, version = make_source(tmp_path, "b.jpg")
    inbox = tmp_path / "inbox"
    with pytest.raises(ValueError, match="unknown originals policy"):
        originals.apply("shred", inbox, "b.jpg", version, None)
    with pytest.raises(ValueError, match="archive"):
        originals.apply("move", inbox, "b.jpg", version, None)
    for rel in ("../b.jpg", "/etc/passwd", "a/../../b.jpg", "", "a/.."):
        with pytest.raises(RejectedInput):
            originals.apply("delete", inbox, rel, version, tmp_path / "archive")
    assert source.read_bytes() == b"original"


@pytest.mark.parametrize("policy", ["delete", "move"])
def test_a_file_rewritten_in_place_with_the_same_size_and_mtime_is_left_alone(
    tmp_path: Path, policy: str
) -> None:
    """Same inode, same size, same mtime, other bytes (an editor that restores the mtime):
    only the ctime tells, and the original is not the version processed."""
    inbox, archive = tmp_path / "in", tmp_path / "archive"
    inbox.mkdir()
    path = inbox / "a.jpg"
    path.write_bytes(b"processed version")
    version = originals.Version.of(path.lstat())
    st = path.lstat()
    path.write_bytes(b"another  version!")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(originals.OriginalChanged):
        originals.apply(policy, inbox, "a.jpg", version, archive)
    assert path.read_bytes() == b"another  version!"

"""The stability gate and the ignore rules, with a clock the test moves by hand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blurd.stability import StabilityTracker, is_ignored_name, is_ignored_rel
from tests.conftest import FakeClock


@pytest.mark.parametrize(
    "name",
    [".hidden.jpg", "~lock.jpg", "a.jpg.part", "a.partial", "a.tmp", "a.crdownload",
     "@eaDir", ".DS_Store", "Thumbs.db", ".blurd-123.tmp"],
)  # fmt: skip
def test_ignored_names(name: str) -> None:
    """Hidden, temporary and NAS housekeeping names are never picked up."""
    assert is_ignored_name(name)


def test_ordinary_names_and_nested_ignores() -> None:
    """Ordinary names pass; anything inside a hidden or @eaDir folder does not."""
    assert not is_ignored_name("holiday photo (1).JPG")
    assert is_ignored_rel("@eaDir/a.jpg/SYNOFILE_THUMB_M.jpg")
    assert is_ignored_rel(".sync/a.jpg")
    assert not is_ignored_rel("2024/july/a.jpg")


def test_a_file_is_stable_only_after_settling_unchanged(tmp_path: Path, clock: FakeClock) -> None:
    """A growing file is not ready; once unchanged for settle seconds it is, exactly once."""
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x")
    t = StabilityTracker(5.0, clock)
    t.touch(str(f))
    assert t.check() == []  # first look: size recorded, window starts
    clock.advance(4.9)
    assert t.check() == []
    with f.open("ab") as fh:
        fh.write(b"more")
    clock.advance(0.2)
    assert t.check() == []  # it grew: the window starts again
    clock.advance(4.9)
    assert t.check() == []
    clock.advance(0.2)
    (ready,) = t.check()
    assert ready.path == str(f) and ready.size == 5 and not ready.is_symlink
    assert t.check() == [] and len(t) == 0


def test_an_event_restarts_the_window_and_deleted_files_are_dropped(
    tmp_path: Path, clock: FakeClock
) -> None:
    """touch() restarts the settle window even with no size change; a deleted file is dropped."""
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x")
    t = StabilityTracker(1.0, clock)
    t.touch(str(f))
    t.check()
    clock.advance(0.9)
    t.touch(str(f))
    clock.advance(0.5)
    assert t.check() == []
    f.unlink()
    assert t.check() == [] and len(t) == 0


def test_symlinks_are_seen_as_links(tmp_path: Path, clock: FakeClock) -> None:
    """A symlink is reported as one (lstat), never as its target."""
    target = tmp_path / "t.jpg"
    target.write_bytes(b"x" * 100)
    link = tmp_path / "l.jpg"
    os.symlink(target, link)
    t = StabilityTracker(0.0, clock)
    t.touch(str(link))
    (ready,) = t.check()
    assert ready.is_symlink and ready.size != 100

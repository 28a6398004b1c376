"""The writer places files durably, under the right names, without ever overwriting."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from blurd import writer
from blurd.defaults import TEMP_PREFIX
from blurd.errors import RejectedInput
from blurd.writer import (
    TempFile,
    clean_temp_files,
    detections_target,
    media_target,
    place,
    place_bytes_from,
)


def current_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def write_placed(target: Path, data: bytes) -> Path:
    """Place ``data`` at ``target`` through the public API, as the worker does."""

    def put(out: BinaryIO) -> int:
        return out.write(data)

    final, written = place_bytes_from(put, target)
    assert written == len(data)
    return final


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


# --- names -------------------------------------------------------------------------------


def test_media_target_mirrors_nested_relative_path(tmp_path: Path) -> None:
    """The output mirrors the source's folders under the output root and keeps its name."""
    out = tmp_path / "out"
    assert media_target(out, "2024/summer/beach.jpg", None) == out / "2024/summer/beach.jpg"
    assert media_target(out, "top.png", "result.png") == out / "top.png"


def test_media_target_swaps_extension_to_the_results(tmp_path: Path) -> None:
    """A result with another extension gives the input's stem plus the result's extension."""
    out = tmp_path / "out"
    assert media_target(out, "dir/a.png", "x.jpeg") == out / "dir/a.jpeg"
    assert media_target(out, "a.jpg", "x.jpeg") == out / "a.jpeg"  # jpg vs jpeg: different
    assert media_target(out, "a.MOV", "remote-id.MP4") == out / "a.mp4"  # lower-cased
    assert media_target(out, "noext", "x.jpg") == out / "noext.jpg"


def test_media_target_keeps_input_name_when_extension_matches_ignoring_case(
    tmp_path: Path,
) -> None:
    """Same extension up to case keeps the input's name exactly, case included."""
    out = tmp_path / "out"
    assert media_target(out, "IMG_1.JPG", "abc.jpg") == out / "IMG_1.JPG"


@pytest.mark.parametrize(
    "hostile",
    [
        "../../etc/passwd",
        "x.jpg/../../a",
        "evil.j/pg",
        "x." + "a" * 9,
        "/etc/shadow",
        "..",
        ".",
        "",
        "x.jpg\\..\\..\\a",
        "x.jp g",
        "x.jpg?token=secret",
        "x.jp\x00g",
        "x.٣٣",
    ],
)
def test_media_target_hostile_result_names_never_escape(tmp_path: Path, hostile: str) -> None:
    """Only a sane result extension is used; anything else keeps the input's own name."""
    out = tmp_path / "out"
    target = media_target(out, "sub/a.png", hostile)
    assert target == out / "sub/a.png"


def test_media_target_uses_only_the_extension_of_a_result_path(tmp_path: Path) -> None:
    """A result name with folders in it contributes its extension and nothing else."""
    out = tmp_path / "out"
    assert media_target(out, "a.png", "../../elsewhere/b.webp") == out / "a.webp"


@pytest.mark.parametrize(
    "rel", ["../a.jpg", "x/../../a.jpg", "/etc/a.jpg", "a/..", "", ".", "a\x00.jpg"]
)
def test_targets_refuse_escaping_relative_paths(tmp_path: Path, rel: str) -> None:
    """A rel_path that is absolute, climbs with '..' or names no file is refused."""
    out = tmp_path / "out"
    with pytest.raises(RejectedInput):
        media_target(out, rel, None)
    with pytest.raises(RejectedInput):
        detections_target(out, rel)


def test_targets_refuse_symlinked_folder_leading_outside(tmp_path: Path) -> None:
    """A folder in the output tree that is a symlink to elsewhere is not written through."""
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)
    with pytest.raises(RejectedInput):
        media_target(out, "sub/a.jpg", None)
    with pytest.raises(RejectedInput):
        detections_target(out, "sub/a.jpg")


def test_targets_tell_a_sibling_with_the_same_prefix_from_a_subfolder(tmp_path: Path) -> None:
    """``out-evil`` starts with ``out`` but is not inside it; an output folder reached through
    a symlink still takes its own subfolders."""
    real = tmp_path / "out"
    (real / "d").mkdir(parents=True)
    (tmp_path / "out-evil").mkdir()
    (real / "sub").symlink_to(tmp_path / "out-evil")
    with pytest.raises(RejectedInput):
        media_target(real, "sub/a.jpg", None)
    linked = tmp_path / "link"
    linked.symlink_to(real)
    assert media_target(linked, "d/a.jpg", None) == linked / "d" / "a.jpg"
    assert media_target(linked, "new/a.jpg", None) == linked / "new" / "a.jpg"


def test_detections_target_appends_json_to_full_name(tmp_path: Path) -> None:
    """Detections go beside the media as '<name incl. extension>.json'."""
    out = tmp_path / "out"
    assert detections_target(out, "d/a.jpg") == out / "d/a.jpg.json"


# --- temp files --------------------------------------------------------------------------


def test_temp_file_is_hidden_private_and_in_target_folder(tmp_path: Path) -> None:
    """The temp file is created (with its folders) beside the target, '.blurd-'-named, 0o600."""
    target = tmp_path / "out/a/b/c.jpg"
    with TempFile(target) as tmp:
        assert tmp.path.parent == target.parent
        assert tmp.path.name.startswith(TEMP_PREFIX)
        assert stat.S_IMODE(tmp.path.stat().st_mode) == 0o600
        tmp.file.write(b"data")
    assert tmp.path.read_bytes() == b"data"  # a normal exit only closes it
    tmp.path.unlink()


def test_temp_file_removed_on_exception(tmp_path: Path) -> None:
    """An exception inside the with-block removes the temp file and propagates."""
    target = tmp_path / "out/c.jpg"
    with pytest.raises(RuntimeError), TempFile(target) as tmp:
        tmp.file.write(b"partial")
        raise RuntimeError("download broke")
    assert not tmp.path.exists()
    assert temp_files(tmp_path) == []


def test_place_bytes_from_leaves_no_temp_when_writer_fails(tmp_path: Path) -> None:
    """A stream writer that fails leaves neither a temp file nor a final file."""
    target = tmp_path / "out/c.jpg"

    def broken(out: BinaryIO) -> int:
        out.write(b"half")
        raise OSError(errno.ECONNRESET, "connection reset")

    with pytest.raises(OSError):
        place_bytes_from(broken, target)
    assert list(target.parent.iterdir()) == []


# --- placement ---------------------------------------------------------------------------


def test_place_puts_file_under_final_name_with_umask_mode(tmp_path: Path) -> None:
    """A placed file has its bytes, 0o666 & ~umask, and no temp file is left."""
    target = tmp_path / "out/nested/a.jpg"
    final = write_placed(target, b"anonymized")
    assert final == target
    assert target.read_bytes() == b"anonymized"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~current_umask()
    assert temp_files(tmp_path) == []


def test_place_after_with_block(tmp_path: Path) -> None:
    """place() also works after the with-block has closed the temp file."""
    target = tmp_path / "out/a.jpg"
    with TempFile(target) as tmp:
        tmp.file.write(b"x" * 100_000)
    assert place(tmp.path, target) == target
    assert target.read_bytes() == b"x" * 100_000
    assert not tmp.path.exists()


def test_place_never_overwrites_a_different_file(tmp_path: Path) -> None:
    """Different files for one name get '-1', '-2' before the extension; none is overwritten."""
    target = tmp_path / "out/a.jpg"
    assert write_placed(target, b"first") == target
    assert write_placed(target, b"second") == tmp_path / "out/a-1.jpg"
    assert write_placed(target, b"third") == tmp_path / "out/a-2.jpg"
    assert target.read_bytes() == b"first"
    assert (tmp_path / "out/a-1.jpg").read_bytes() == b"second"
    assert (tmp_path / "out/a-2.jpg").read_bytes() == b"third"
    assert temp_files(tmp_path) == []


def test_place_numbers_detections_before_last_extension(tmp_path: Path) -> None:
    """For 'a.jpg.json' the counter goes before '.json': 'a.jpg-1.json'."""
    out = tmp_path / "out"
    target = detections_target(out, "a.jpg")
    write_placed(target, b'{"a": 1}')
    assert write_placed(target, b'{"a": 2}') == out / "a.jpg-1.json"


def test_place_identical_existing_file_counts_as_placed(tmp_path: Path) -> None:
    """An existing file with the same bytes is the placement: no '-1' and no temp remain."""
    target = tmp_path / "out/a.jpg"
    write_placed(target, b"same")
    assert write_placed(target, b"same") == target
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.jpg"]


def test_place_identical_to_a_numbered_file_reuses_it(tmp_path: Path) -> None:
    """Identical content found at '-1' (after a different base file) counts as placed there."""
    target = tmp_path / "out/a.jpg"
    write_placed(target, b"other")
    write_placed(target, b"mine")
    assert write_placed(target, b"mine") == tmp_path / "out/a-1.jpg"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a-1.jpg", "a.jpg"]


def test_place_same_size_different_bytes_is_not_identical(tmp_path: Path) -> None:
    """Equal sizes are not enough: the bytes are compared."""
    target = tmp_path / "out/a.jpg"
    write_placed(target, b"aaaa")
    assert write_placed(target, b"aaab") == tmp_path / "out/a-1.jpg"


def test_place_does_not_follow_symlink_at_target(tmp_path: Path) -> None:
    """A symlink under the target name is neither overwritten, followed nor counted identical."""
    real = tmp_path / "real.jpg"
    real.write_bytes(b"same")
    target = tmp_path / "out/a.jpg"
    target.parent.mkdir()
    target.symlink_to(real)
    assert write_placed(target, b"same") == tmp_path / "out/a-1.jpg"
    assert target.is_symlink()
    assert real.read_bytes() == b"same"


def link_unsupported(*_args: Any, **_kwargs: Any) -> None:
    raise OSError(errno.EPERM, "Operation not permitted")


def test_place_falls_back_to_rename_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where link() is unsupported (SMB, FUSE) placement still never overwrites."""
    monkeypatch.setattr(os, "link", link_unsupported)
    target = tmp_path / "out/a.jpg"
    assert write_placed(target, b"one") == target
    assert write_placed(target, b"two") == tmp_path / "out/a-1.jpg"
    assert write_placed(target, b"one") == target  # identical still counts as placed
    assert target.read_bytes() == b"one"
    assert (tmp_path / "out/a-1.jpg").read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~current_umask()
    assert temp_files(tmp_path) == []


def test_place_propagates_other_link_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error from link() other than 'unsupported' propagates; no final file appears."""

    def no_space(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_space)
    target = tmp_path / "out/a.jpg"
    with pytest.raises(OSError) as info:
        write_placed(target, b"data")
    assert info.value.errno == errno.ENOSPC
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize(
    "name", ["with space.jpg", "ünïcødé 写真.jpg", "quo'te\"s.jpg", "new\nline.jpg", "-dash.jpg"]
)
def test_awkward_names_are_placed_and_numbered(tmp_path: Path, name: str) -> None:
    """Spaces, unicode, quotes and newlines survive naming, placement and numbering."""
    out = tmp_path / "out"
    target = media_target(out, f"dir with space/{name}", None)
    assert write_placed(target, b"1") == out / "dir with space" / name
    stem, ext = os.path.splitext(name)
    assert write_placed(target, b"2") == out / "dir with space" / f"{stem}-1{ext}"
    det = detections_target(out, f"dir with space/{name}")
    assert write_placed(det, b"{}") == out / "dir with space" / f"{name}.json"


# --- start-up clean-up -------------------------------------------------------------------


def test_clean_temp_files_removes_only_temp_names(tmp_path: Path) -> None:
    """Only '.blurd-*' files are removed, at any depth; others and the count are right."""
    root = tmp_path / "out"
    (root / "a/b").mkdir(parents=True)
    (root / f"{TEMP_PREFIX}1.tmp").write_bytes(b"")
    (root / f"a/b/{TEMP_PREFIX}2.tmp").write_bytes(b"")
    (root / "a/keep.jpg").write_bytes(b"")
    (root / "a/.hidden").write_bytes(b"")
    (root / "a/x.blurd-3").write_bytes(b"")
    assert clean_temp_files(root) == 2
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == [
        ".hidden",
        "keep.jpg",
        "x.blurd-3",
    ]


def test_clean_temp_files_does_not_follow_symlinked_folder(tmp_path: Path) -> None:
    """A symlinked folder under root is not entered: temp names behind it are untouched."""
    root = tmp_path / "out"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{TEMP_PREFIX}x.tmp").write_bytes(b"")
    (root / "link").symlink_to(outside)
    assert clean_temp_files(root) == 0
    assert (outside / f"{TEMP_PREFIX}x.tmp").exists()


def test_clean_temp_files_missing_root_is_zero(tmp_path: Path) -> None:
    """A root that does not exist has nothing to clean."""
    assert clean_temp_files(tmp_path / "nope") == 0


def test_clean_temp_files_min_age_spares_fresh_temp_files(tmp_path: Path) -> None:
    """With min_age_s, temp files still being written by someone else are left alone."""
    fresh = tmp_path / f"{TEMP_PREFIX}fresh.tmp"
    old = tmp_path / f"{TEMP_PREFIX}old.tmp"
    fresh.write_bytes(b"")
    old.write_bytes(b"")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert clean_temp_files(tmp_path, min_age_s=600) == 1
    assert fresh.exists()
    assert not old.exists()


def test_clean_temp_files_removes_leftover_of_interrupted_temp(tmp_path: Path) -> None:
    """A temp file abandoned mid-write (a crash) is found and removed at start-up."""
    tmp = TempFile(tmp_path / "out/a/b.jpg")
    tmp.file.write(b"partial")
    tmp.close()
    assert clean_temp_files(tmp_path / "out") == 1
    assert temp_files(tmp_path) == []


def test_file_mode_constant_matches_process_umask() -> None:
    """The mode read once at import is 0o666 minus the process umask."""
    expected = 0o666 & ~current_umask()
    assert expected == writer.FILE_MODE

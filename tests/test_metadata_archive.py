"""metadata.archive: ZIP results rewritten entry by entry."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from blurd import defaults
from blurd.metadata import archive
from blurd.metadata.policy import MetadataError, Policy
from tests.fakeblurit import result_bytes
from tests.test_metadata_pipeline import photo, read_exif


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_a_result_that_is_no_archive_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.zip"
    out.write_bytes(b"PK\x03\x04 but nothing after")
    with pytest.raises(MetadataError, match="not a readable ZIP"):
        archive.carry_zip_metadata(out, out, tmp_path / "new.zip", Policy.STRIP, upright=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zip"]


def test_an_entry_too_large_to_unpack_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = make_zip(tmp_path / "out.zip", {"a.jpg": result_bytes(b"x" * 5000, ".jpg")})
    monkeypatch.setattr(defaults, "MAX_INPUT_BYTES", 1000)
    with pytest.raises(MetadataError, match="unpacks to"):
        archive.carry_zip_metadata(out, out, tmp_path / "new.zip", Policy.STRIP, upright=False)


def test_an_unreadable_input_archive_carries_nothing_and_says_so(tmp_path: Path) -> None:
    """The engine's archive still loses its photos' metadata; the note names why nothing of
    the input came along. No temp file is left beside the new archive."""
    out = make_zip(tmp_path / "out.zip", {"a.jpg": photo(), "b/c.txt": b"text"})
    source = tmp_path / "in.zip"
    source.write_bytes(b"not a zip")
    new = tmp_path / "new.zip"
    carried = archive.carry_zip_metadata(source, out, new, Policy.KEEP, upright=False)
    assert carried.note and "input archive unreadable" in carried.note
    with zipfile.ZipFile(new) as zf:
        assert zf.read("b/c.txt") == b"text"
        (tmp_path / "a.jpg").write_bytes(zf.read("a.jpg"))
        assert zf.getinfo("a.jpg").compress_type == zipfile.ZIP_DEFLATED
    assert read_exif(tmp_path / "a.jpg")[2] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "in.zip", "new.zip", "out.zip"]

"""worker.placing: the free-space check before a download, with and without a rewrite."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from blurd.worker import placing
from tests.fakeblurit import result_bytes


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def announcing(size: int, body: bytes) -> Callable[[BinaryIO], int]:
    """An engine's fetch that announces ``size`` bytes (engines.base.announce), then sends."""

    def fetch(out: BinaryIO) -> int:
        out.expect(size)  # type: ignore[attr-defined]
        return out.write(body)

    return fetch


def copy(raw: Path, new: Path) -> None:
    new.write_bytes(raw.read_bytes())


def test_a_result_rewritten_needs_room_for_two_copies(tmp_path: Path) -> None:
    """Room for the result once, not twice: placed as it is, refused when it is to be
    rewritten (body and rewritten file exist together), before any byte is written."""
    body = result_bytes(b"x" * 1000, ".jpg")
    margin = 64 * 1024 * 1024
    size = (free_bytes(tmp_path) - margin) * 3 // 4  # fits once, not twice
    placed, _sha, _n = placing.fetch_into_place(
        announcing(size, body), tmp_path / "out" / "a.jpg", "media"
    )
    assert placed.read_bytes() == body
    with pytest.raises(OSError) as info:
        placing.fetch_into_place(
            announcing(size, body), tmp_path / "out" / "b.jpg", "media", copy
        )
    assert info.value.errno == errno.ENOSPC and "two copies" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jpg"]

"""End to end: watched folder -> jobs table -> BlurIt (the test server) -> output folder."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blurd.models import JobState
from tests.conftest import wait_for
from tests.fakeblurit import FakeBlurIt
from tests.harness import Daemon, anonymized


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt(token_lifetime_s=3, job_seconds=0.4) as f:
        yield f


def _write_slowly(path: Path, data: bytes, seconds: float) -> None:
    with path.open("wb") as fh:
        step = len(data) // 10
        for i in range(10):
            fh.write(data[i * step : (i + 1) * step if i < 9 else len(data)])
            fh.flush()
            time.sleep(seconds / 10)


def test_twenty_images_come_out_anonymized_with_detections(
    tmp_path: Path, fake: FakeBlurIt
) -> None:
    """The acceptance run: nested folders, a slow writer, a renamed temp file, bad inputs.

    20 images give 20 outputs and 20 detection files; no upload is repeated and none is made
    before its file is complete; tokens that expire every 3 s are refreshed before use; a
    `.txt` and an empty `.jpg` fail with a reason and are never uploaded.
    """
    inputs: dict[str, bytes] = {}
    with Daemon(tmp_path, fake) as d:
        for i in range(18):
            rel = f"cam{i % 3}/2026/{i:02d}.jpg" if i % 2 else f"{i:02d}.png"
            data = os.urandom(2000 + i) + rel.encode()
            (d.inbox / rel).parent.mkdir(parents=True, exist_ok=True)
            (d.inbox / rel).write_bytes(data)
            inputs[rel] = data
        slow = os.urandom(300_000)
        writer = threading.Thread(target=_write_slowly, args=(d.inbox / "slow.jpg", slow, 3.0))
        writer.start()
        inputs["slow.jpg"] = slow
        hidden = d.inbox / ".incoming.jpg.tmp"
        renamed = os.urandom(5000)
        hidden.write_bytes(renamed)
        hidden.rename(d.inbox / "renamed.jpg")
        inputs["renamed.jpg"] = renamed
        (d.inbox / "notes.txt").write_text("not media")
        (d.inbox / "empty.jpg").write_bytes(b"")
        writer.join()
        wait_for(
            lambda: d.counts()[JobState.DONE] == 20 and d.counts()[JobState.FAILED] == 2,
            timeout=60,
            what="20 done and 2 failed",
        )
        jobs = d.jobs()
    assert len(inputs) == 20
    for rel, data in inputs.items():
        out = d.outbox / rel
        assert out.read_bytes() == anonymized(data, out.suffix), rel
        detections = json.loads((d.outbox / (rel + ".json")).read_text())
        assert detections["input_sha256"] == hashlib.sha256(data).hexdigest()
        assert fake.upload_count(hashlib.sha256(data).hexdigest()) == 1, rel
    assert len(fake.uploads) == 20
    uploaded_slow = [u for u in fake.uploads if u.sha256 == hashlib.sha256(slow).hexdigest()]
    assert uploaded_slow[0].size == len(slow)
    assert "unsupported extension .txt" in (jobs["notes.txt"].error or "")
    assert jobs["empty.jpg"].error == "is empty"
    assert {u.filename for u in fake.uploads} == {"media.jpg", "media.png"}
    assert not [r for r in fake.requests if r.status == 401], "a request went out with a dead token"
    assert fake.refreshes >= 1
    assert not list(d.outbox.rglob(".blurd-*"))
    assert d.result == [0]


def test_identical_content_is_not_paid_for_twice(tmp_path: Path, fake: FakeBlurIt) -> None:
    """A second file with the same bytes and options reuses the first result: one upload."""
    data = os.urandom(4000)
    with Daemon(tmp_path, fake) as d:
        (d.inbox / "a.jpg").write_bytes(data)
        wait_for(lambda: d.counts()[JobState.DONE] == 1, timeout=20, what="first done")
        (d.inbox / "copy").mkdir()
        (d.inbox / "copy" / "a.jpg").write_bytes(data)
        wait_for(lambda: d.counts()[JobState.DONE] == 2, timeout=20, what="second done")
    assert (d.outbox / "copy" / "a.jpg").read_bytes() == anonymized(data)
    assert (d.outbox / "copy" / "a.jpg.json").is_file()
    assert len(fake.uploads) == 1


def test_originals_move_only_after_output_is_placed(tmp_path: Path, fake: FakeBlurIt) -> None:
    """originals = "move": the source lands in the archive, mirrored, once its output exists."""
    archive = tmp_path / "archive"
    with Daemon(tmp_path, fake, originals="move", archive=str(archive)) as d:
        (d.inbox / "sub").mkdir()
        (d.inbox / "sub" / "a.jpg").write_bytes(b"original")
        wait_for(lambda: d.counts()[JobState.DONE] == 1, timeout=20, what="done")
    assert (archive / "sub" / "a.jpg").read_bytes() == b"original"
    assert not (d.inbox / "sub" / "a.jpg").exists()
    assert (d.outbox / "sub" / "a.jpg").read_bytes() == anonymized(b"original")

"""Crash safety: `blurd run` killed with SIGKILL at random moments, then restarted."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blurd.models import JobState
from tests.conftest import wait_for
from tests.fakeblurit import FakeBlurIt
from tests.harness import anonymized
from tests.test_restart import counts, run_until_done, start_blurd, write_config

S = JobState


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt(token_lifetime_s=5, job_seconds=1.5) as f:
        yield f


@pytest.mark.slow
def test_three_kill_9s_during_a_40_file_run(tmp_path: Path, fake: FakeBlurIt) -> None:
    """After three SIGKILLs and a restart: every output intact, at most one repeat upload per
    crash, no temp file left, no job stuck in uploading or downloading."""
    write_config(tmp_path, fake, max_in_flight=8)  # 40 files take at least 5 batches
    inbox = tmp_path / "in"
    inbox.mkdir()
    files = {f"d{i % 4}/f{i:02d}.jpg": os.urandom(20_000 + i) for i in range(40)}
    for rel, data in files.items():
        (inbox / rel).parent.mkdir(exist_ok=True)
        (inbox / rel).write_bytes(data)
    rng = random.Random(int(os.environ.get("BLURD_CRASH_SEED", "7")))
    for crash in range(3):
        proc = start_blurd(tmp_path, fake)
        try:
            if crash == 0:
                wait_for(lambda: fake.uploads, timeout=30, what="the first upload")
            time.sleep(rng.uniform(0.2, 1.5))  # a random moment is the point of this test
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert counts(tmp_path)[S.DONE] < 40, "the run ended before the crashes: it proves nothing"
    run_until_done(tmp_path, fake, 40, timeout=90)
    final = counts(tmp_path)
    assert final[S.UPLOADING] == final[S.DOWNLOADING] == final[S.FAILED] == 0
    repeats = 0
    for rel, data in files.items():
        assert (tmp_path / "out" / rel).read_bytes() == anonymized(data), rel
        repeats += fake.upload_count(hashlib.sha256(data).hexdigest()) - 1
    assert repeats <= 3
    assert not list((tmp_path / "out").rglob(".blurd-*"))
    extra = [p for p in (tmp_path / "out").rglob("*-1.*")]
    assert extra == [], "a re-placed output must count as placed, not make a copy"

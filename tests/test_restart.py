"""`blurd run` as a real process: SIGTERM mid-run stops it cleanly, a restart finishes the work."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blurd.models import JobState
from blurd.store import Store
from tests.conftest import wait_for
from tests.fakeblurit import FakeBlurIt, result_bytes


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt(token_lifetime_s=3, job_seconds=2.0) as f:
        yield f


def start_blurd(tmp_path: Path, fake: FakeBlurIt, *args: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "BLURIT_CLIENT_ID": fake.client_id,
        "BLURIT_SECRET_ID": fake.secret_id,
    }
    env.pop("BLURD_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "blurd", "run", "--config", str(tmp_path / "c.toml"), *args],
        env=env,
        stdout=open(tmp_path / "log.jsonl", "ab"),
        stderr=subprocess.STDOUT,
    )


def write_config(tmp_path: Path, fake: FakeBlurIt, max_in_flight: int = 32) -> None:
    (tmp_path / "c.toml").write_text(
        f'[daemon]\ndatabase = "{tmp_path}/blurd.db"\nmax_in_flight = {max_in_flight}\n'
        f'[blurit]\nurl = "{fake.url}"\n'
        f'[[watch]]\npath = "{tmp_path}/in"\noutput = "{tmp_path}/out"\nsettle_seconds = 0.3\n'
    )


def run_until_done(tmp_path: Path, fake: FakeBlurIt, n: int, timeout: float) -> None:
    """Start `blurd run`, wait for ``n`` jobs done, stop it with SIGTERM: it must exit 0."""
    proc = start_blurd(tmp_path, fake)
    try:
        wait_for(lambda: counts(tmp_path)[JobState.DONE] == n, timeout=timeout,
                 what=f"{n} jobs done")  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def counts(tmp_path: Path) -> dict[JobState, int]:
    store = Store(f"sqlite:///{tmp_path}/blurd.db")
    try:
        return store.counts()
    finally:
        store.close()


def test_sigterm_during_processing_then_restart_uploads_nothing_twice(
    tmp_path: Path, fake: FakeBlurIt
) -> None:
    """SIGTERM with jobs at the API: exit 0 within seconds; the restart polls, never re-uploads."""
    write_config(tmp_path, fake)
    inbox = tmp_path / "in"
    inbox.mkdir()
    files = {f"f{i}.jpg": os.urandom(3000) for i in range(10)}
    for name, data in files.items():
        (inbox / name).write_bytes(data)
    proc = start_blurd(tmp_path, fake)
    try:
        wait_for(lambda: len(fake.uploads) >= 4, timeout=30, what="uploads under way")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    first = counts(tmp_path)
    assert first[JobState.DONE] < 10, "the run finished before the signal: test proves nothing"
    assert first[JobState.PROCESSING] >= 1, "no job was at the API when the signal came"
    assert first[JobState.UPLOADING] == 0, "a clean stop leaves no upload half-done"
    run_until_done(tmp_path, fake, 10, timeout=60)
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        assert fake.upload_count(sha) == 1, name
        assert (tmp_path / "out" / name).read_bytes() == result_bytes(data, ".jpg")
    log = (tmp_path / "log.jsonl").read_text()
    assert fake.secret_id not in log
    assert '"event": "daemon.stopped"' in log


def test_once_exits_when_the_queue_is_empty(tmp_path: Path, fake: FakeBlurIt) -> None:
    """`blurd run --once` processes what is there and exits 0."""
    write_config(tmp_path, fake)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"a" * 100)
    proc = start_blurd(tmp_path, fake, "--once")
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert counts(tmp_path)[JobState.DONE] == 1
    assert (tmp_path / "out" / "a.jpg").is_file()

"""A 1 GiB upload and its download go through in bounded memory (streamed both ways)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakeblurit import FakeBlurIt, result_head

GIB = 1024**3
RSS_LIMIT_MIB = 200  # blurd's process; the file is 1024 MiB


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt(token_lifetime_s=60, job_seconds=0.0) as f:
        yield f


ROUND_TRIP = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from blurd.engines.base import Phase
    from blurd.engines.blurit import BlurItEngine
    from blurd.options import Options

    url, src, dest = sys.argv[1:4]
    engine = BlurItEngine(url, "client_test", "secret_test")
    remote = engine.submit(Path(src), Options(detections=False))
    while (status := engine.poll(remote)).phase is Phase.PENDING:
        time.sleep(0.2)
    assert status.phase is Phase.SUCCEEDED, status
    with open(dest, "wb") as out:
        n = engine.fetch(remote, status, "media", out)
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent that
    # forked us (pytest, large after the local engine's tests), VmHWM belongs to this program.
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"bytes": n, "peak_rss_mib": peak_kib / 1024}))
    """
)


@pytest.mark.slow
def test_one_gib_round_trip_in_bounded_memory(tmp_path: Path, fake: FakeBlurIt) -> None:
    """1 GiB up and 1 GiB (plus a header) down with a peak RSS far below the file's size."""
    if shutil.disk_usage(tmp_path).free < 4 * GIB:
        pytest.skip("needs 4 GiB of free disk for the file, the server's copy and the result")
    src = tmp_path / "big.mp4"
    sha = hashlib.sha256()
    with open(src, "wb") as fh:
        block = os.urandom(8 * 1024 * 1024)
        for i in range(GIB // len(block)):
            chunk = block[:-8] + i.to_bytes(8, "big")  # no two blocks alike
            sha.update(chunk)
            fh.write(chunk)
    dest = tmp_path / "out.mp4"
    done = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP, fake.url, str(src), str(dest)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    header = result_head(sha.hexdigest(), ".mp4")
    assert report["bytes"] == GIB + len(header) == dest.stat().st_size
    with open(dest, "rb") as fh:
        assert fh.read(len(header)) == header
    assert fake.uploads[0].sha256 == sha.hexdigest() and fake.uploads[0].size == GIB
    assert report["peak_rss_mib"] < RSS_LIMIT_MIB, report

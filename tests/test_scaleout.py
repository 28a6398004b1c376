"""Scale-out: three `blurd run` processes share one folder and one PostgreSQL queue."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from blurd import cli
from blurd.models import SCHEMA_VERSION, JobState
from blurd.store import Store
from tests.conftest import wait_for
from tests.fakeblurit import FakeBlurIt
from tests.harness import anonymized

S = JobState
LEASE_S = 2.0


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt(token_lifetime_s=30, job_seconds=1.0) as f:
        yield f


def start_node(
    tmp_path: Path, fake: FakeBlurIt, url: str, node: str, *args: str, daemon_extra: str = ""
) -> subprocess.Popen[bytes]:
    """`blurd run` as node ``node`` on the shared folder and database."""
    conf = tmp_path / f"{node}.toml"
    conf.write_text(
        f'[daemon]\ndatabase = "{url}"\nnode_id = "{node}"\nlease_seconds = {LEASE_S}\n'
        f"max_in_flight = 4\n{daemon_extra}"
        f'[blurit]\nurl = "{fake.url}"\n'
        f'[[watch]]\npath = "{tmp_path}/in"\noutput = "{tmp_path}/out"\nsettle_seconds = 0.3\n'
    )
    env = {**os.environ, "BLURIT_CLIENT_ID": fake.client_id, "BLURIT_SECRET_ID": fake.secret_id}
    env.pop("BLURD_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "blurd", "run", "--config", str(conf), *args],
        env=env,
        stdout=open(tmp_path / f"{node}.log", "ab"),
        stderr=subprocess.STDOUT,
    )


def stop_all(procs: list[subprocess.Popen[bytes]]) -> list[int | None]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=20))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(None)
    return codes


def run_until_done(procs: list[subprocess.Popen[bytes]], url: str, n: int, timeout: float) -> None:
    """Wait for ``n`` jobs done, then stop the nodes with SIGTERM: each must exit 0."""
    try:
        wait_for(lambda: sum(j.state is S.DONE for j in jobs(url)) == n, timeout=timeout,
                 what=f"{n} jobs done")  # fmt: skip
    finally:
        codes = stop_all(procs)
    assert codes == [0] * len(procs)


def jobs(url: str) -> list[Any]:
    store = Store(url)
    try:
        return store.list_jobs(limit=10_000)
    finally:
        store.close()


def drop_files(tmp_path: Path, n: int) -> dict[str, bytes]:
    inbox = tmp_path / "in"
    inbox.mkdir(exist_ok=True)
    files = {f"d{i % 3}/f{i:02d}.jpg": os.urandom(5_000 + i) for i in range(n)}
    for rel, data in files.items():
        (inbox / rel).parent.mkdir(exist_ok=True)
        (inbox / rel).write_bytes(data)
    return files


def check_outputs(tmp_path: Path, files: dict[str, bytes]) -> None:
    out = tmp_path / "out"
    for rel, data in files.items():
        assert (out / rel).read_bytes() == anonymized(data), rel
    assert not [p for p in out.rglob("*") if p.name.startswith(".blurd-")]
    assert not [p for p in out.rglob("*-1.*")], "an output was written twice"


@pytest.mark.slow
def test_three_daemons_on_one_folder_upload_each_file_once(
    tmp_path: Path, fake: FakeBlurIt, postgres: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three nodes watching the same folder: each file is queued once, uploaded once and
    written once, and the work is shared; `blurd jobs` then says which node did each."""
    url = postgres.new_database()
    files = drop_files(tmp_path, 30)
    run_until_done([start_node(tmp_path, fake, url, f"n{i}") for i in range(3)], url, 30, 90)
    rows = jobs(url)
    assert len(rows) == 30, "a file was queued twice"
    for data in files.values():
        assert fake.upload_count(hashlib.sha256(data).hexdigest()) == 1
    check_outputs(tmp_path, files)
    workers = {j.node for j in rows}
    assert len(workers) >= 2, f"one node did everything ({workers}): nothing was shared"
    capsys.readouterr()
    assert cli.main(["jobs", "--config", str(tmp_path / "n0.toml"), "--limit", "100"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 30
    assert {line.split()[2] for line in listed} == workers


@pytest.mark.slow
def test_a_node_killed_mid_run_has_its_jobs_finished_by_the_others(
    tmp_path: Path, fake: FakeBlurIt, postgres: Any
) -> None:
    """kill -9 on a node holding jobs at the API: once its lease runs out (not before), the
    others, already running, poll those jobs by their remote id (no second upload) and finish
    everything."""
    fake.job_seconds = 3.0
    url = postgres.new_database()
    files = drop_files(tmp_path, 24)
    victim = start_node(tmp_path, fake, url, "victim")
    wait_for(
        lambda: [j for j in jobs(url) if j.node == "victim" and j.state is S.PROCESSING],
        timeout=30, what="the victim holding jobs at the API",
    )  # fmt: skip
    others = [start_node(tmp_path, fake, url, f"n{i}") for i in range(2)]
    for i in range(2):
        wait_for(lambda i=i: '"daemon.ready"' in (tmp_path / f"n{i}.log").read_text(),
                 timeout=30, what=f"n{i} ready")  # fmt: skip
    held = [j for j in jobs(url) if j.node == "victim" and j.state is S.PROCESSING]
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    held_ids = {j.id for j in held}
    assert held_ids, "the victim held no job at the API when it was killed"
    run_until_done(others, url, 24, 120)
    rows = {j.id: j for j in jobs(url)}
    for job_id in held_ids:
        row = rows[job_id]
        assert row.node in {"n0", "n1"}, "a held job was not taken over"
        data = files[row.rel_path]
        assert fake.upload_count(hashlib.sha256(data).hexdigest()) == 1, row.rel_path
    repeats = sum(fake.upload_count(hashlib.sha256(d).hexdigest()) - 1 for d in files.values())
    assert repeats <= 2, "more repeat uploads than the victim had uploads running"
    check_outputs(tmp_path, files)
    log = "".join((tmp_path / f"n{i}.log").read_text() for i in range(2))
    taken = [json.loads(line) for line in log.splitlines() if "jobs.taken_over" in line]
    assert sum(e["resumed_processing"] for e in taken) >= len(held_ids)
    # The victim renewed its lease every LEASE_S / 4: it ran out no earlier than that.
    first = min(datetime.fromisoformat(e["timestamp"]).timestamp() for e in taken)
    assert first >= killed_at + 0.75 * LEASE_S - 0.1, "taken over before the lease ran out"


def test_two_daemons_started_at_once_with_one_node_id_let_one_run(
    tmp_path: Path, fake: FakeBlurIt, postgres: Any
) -> None:
    """Two live daemons may not share a node id, even when they start at the same moment
    (the id is taken in one conditional step before any job is touched): one exits 2 naming
    the key, the other runs on."""
    url = postgres.new_database()
    (tmp_path / "in").mkdir()
    pair = [start_node(tmp_path, fake, url, "same") for _ in range(2)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in pair), timeout=30,
                 what="one of the two refused")  # fmt: skip
        refused = [p for p in pair if p.poll() is not None]
        assert [p.returncode for p in refused] == [cli.EXIT_CONFIG]
        wait_for(lambda: '"daemon.ready"' in (tmp_path / "same.log").read_text(), timeout=30,
                 what="the other one ready")  # fmt: skip
        assert all(p.poll() is None for p in pair if p not in refused)
    finally:
        codes = stop_all(pair)
    assert sorted(codes, key=str) == sorted([0, cli.EXIT_CONFIG], key=str)
    assert "daemon.node_id" in (tmp_path / "same.log").read_text()


def test_a_node_with_another_engine_is_refused(
    tmp_path: Path, fake: FakeBlurIt, postgres: Any
) -> None:
    """A node that would run another engine than the running ones exits 2 naming
    daemon.engine: it would upload again (and pay again for) the BlurIt jobs it took over."""
    url = postgres.new_database()
    (tmp_path / "in").mkdir()
    first = start_node(tmp_path, fake, url, "cloud")
    try:
        wait_for(lambda: '"daemon.ready"' in (tmp_path / "cloud.log").read_text(), timeout=30,
                 what="the BlurIt node ready")  # fmt: skip
        local = start_node(tmp_path, fake, url, "cpu", daemon_extra='engine = "local"\n')
        assert local.wait(timeout=30) == cli.EXIT_CONFIG
    finally:
        assert stop_all([first]) == [0]
    text = (tmp_path / "cpu.log").read_text()
    assert "daemon.engine" in text and "cloud runs blurit" in text


def test_db_upgrade_and_version_commands(
    tmp_path: Path, postgres: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`blurd db version` exits 1 on an older schema and `blurd db upgrade` brings it forward;
    `blurd run` on an older shared database refuses with exit 1, naming the command."""
    from tests.test_store_migrations import _make_v1

    url = postgres.new_database()
    _make_v1(url)
    conf = tmp_path / "c.toml"
    conf.write_text(f'[daemon]\ndatabase = "{url}"\n')
    assert cli.main(["db", "version", "--config", str(conf)]) == cli.EXIT_FAIL
    assert f"schema version 1 (this blurd: {SCHEMA_VERSION})" in capsys.readouterr().out
    (tmp_path / "in").mkdir()
    # `blurd run` in its own process: run in this one, it would leave structlog's cached
    # loggers writing to this test's captured (then closed) stdout.
    run = subprocess.run(
        [sys.executable, "-m", "blurd", "run", "--config", str(conf), "--inbox",
         str(tmp_path / "in"), "--outbox", str(tmp_path / "out"), "--once"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == cli.EXIT_FAIL
    assert "`blurd db upgrade`" in run.stderr
    assert cli.main(["db", "upgrade", "--config", str(conf)]) == cli.EXIT_OK
    assert f"from schema version 1 to {SCHEMA_VERSION}" in capsys.readouterr().out
    assert cli.main(["db", "version", "--config", str(conf)]) == cli.EXIT_OK
    assert cli.main(["db", "upgrade", "--config", str(conf)]) == cli.EXIT_OK
    assert "nothing to do" in capsys.readouterr().out

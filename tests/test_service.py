"""blurd as a service, in real subprocesses: sd_notify over a datagram socket, the watchdog,
SIGHUP reload, --detach with a pid file, and the metrics endpoint."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import wait_for
from tests.fakeblurit import FakeBlurIt


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt(token_lifetime_s=60, job_seconds=0.1) as f:
        yield f


def config_text(tmp_path: Path, fake: FakeBlurIt, watches: list[str], extra: str = "") -> str:
    text = f'[daemon]\ndatabase = "{tmp_path}/blurd.db"\n{extra}[blurit]\nurl = "{fake.url}"\n'
    for name in watches:
        (tmp_path / name).mkdir(exist_ok=True)
        text += (
            f'[[watch]]\npath = "{tmp_path}/{name}"\noutput = "{tmp_path}/{name}-out"\n'
            "settle_seconds = 0.2\n"
        )
    return text


def env_for(fake: FakeBlurIt, **extra: str) -> dict[str, str]:
    env = {**os.environ, "BLURIT_CLIENT_ID": fake.client_id, "BLURIT_SECRET_ID": fake.secret_id}
    env.pop("BLURD_CONFIG", None)
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


def blurd(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "blurd", *args],
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_notify_ready_status_watchdog_and_stopping(tmp_path: Path, fake: FakeBlurIt) -> None:
    """Under Type=notify: READY=1 after the first scan, STATUS= with counts, WATCHDOG=1 while
    WATCHDOG_USEC is set, STOPPING=1 on SIGTERM — over a real datagram socket."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text(tmp_path, fake, ["in"]))
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    received: list[str] = []

    def collect() -> list[str]:
        try:
            while True:
                received.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        return received

    env = env_for(fake, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000")
    proc = blurd("run", "--config", str(cfg), env=env, log=tmp_path / "log")
    try:
        wait_for(lambda: any("READY=1" in m for m in collect()), timeout=40, what="READY=1")
        wait_for(lambda: sum("WATCHDOG=1" in m for m in collect()) >= 3, timeout=30, what="pings")
        assert any("STATUS=jobs:" in m for m in received)
        assert stop(proc) == 0
    finally:
        stop(proc)
    collect()
    assert any("STOPPING=1" in m for m in received)
    sock.close()


def test_sighup_reloads_watches_and_a_bad_config_keeps_the_old(
    tmp_path: Path, fake: FakeBlurIt
) -> None:
    """SIGHUP adds a new watch folder; a broken config on the next SIGHUP is refused, logged,
    and the daemon goes on with the config it had."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text(tmp_path, fake, ["a"]))
    log = tmp_path / "log"
    proc = blurd("run", "--config", str(cfg), env=env_for(fake), log=log)
    try:
        wait_for(lambda: '"daemon.ready"' in log.read_text(), timeout=20, what="ready")
        cfg.write_text(config_text(tmp_path, fake, ["a", "b"]))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: '"config.reloaded"' in log.read_text(), what="reloaded")
        (tmp_path / "b" / "new.jpg").write_bytes(b"in the new watch")
        wait_for(lambda: (tmp_path / "b-out" / "new.jpg").is_file(), timeout=20, what="output")
        cfg.write_text("[daemon\nthis is broken")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: '"config.reload_failed"' in log.read_text(), what="reload refused")
        (tmp_path / "b" / "after.jpg").write_bytes(b"still watched")
        wait_for(lambda: (tmp_path / "b-out" / "after.jpg").is_file(), timeout=20,
                 what="the old config still at work")  # fmt: skip
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0


def test_detach_with_a_locked_pidfile(tmp_path: Path, fake: FakeBlurIt) -> None:
    """`run --detach --pidfile F`: the launcher returns, the daemon works in the background with
    a private pid file and its own log file, and SIGTERM removes the pid file."""
    pidfile = tmp_path / "run" / "blurd.pid"
    pidfile.parent.mkdir()
    logfile = tmp_path / "blurd.log"
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text(tmp_path, fake, ["in"], extra=f'log_file = "{logfile}"\n'))
    launcher = subprocess.run(
        [sys.executable, "-m", "blurd", "run", "--detach", "--pidfile", str(pidfile),
         "--config", str(cfg)],
        env=env_for(fake), capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert launcher.returncode == 0, launcher.stderr
    pid = int(wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip(), what="pid"))
    try:
        assert stat.S_IMODE(pidfile.stat().st_mode) & 0o007 == 0, "pid file is world-readable"
        (tmp_path / "in" / "a.jpg").write_bytes(b"detached")
        wait_for(lambda: (tmp_path / "in-out" / "a.jpg").is_file(), timeout=20, what="output")
        wait_for(lambda: '"event": "job.done"' in logfile.read_text(), what="job.done logged")
        again = subprocess.run(
            [sys.executable, "-m", "blurd", "run", "--detach", "--pidfile", str(pidfile),
             "--config", str(cfg)],
            env=env_for(fake), capture_output=True, timeout=30, text=True,
        )  # fmt: skip
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pidfile.exists(), timeout=20, what="the pid file removed")
    assert '"event": "daemon.stopped"' in logfile.read_text()
    with pytest.raises(ProcessLookupError):
        wait_for(lambda: os.kill(pid, 0), timeout=10, what="the process gone")  # type: ignore[func-returns-value]


def test_metrics_endpoint(tmp_path: Path, fake: FakeBlurIt) -> None:
    """`metrics = "127.0.0.1:PORT"` serves jobs by state and bytes uploaded in Prometheus text."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text(tmp_path, fake, ["in"], extra=f'metrics = "127.0.0.1:{port}"\n'))
    proc = blurd("run", "--config", str(cfg), env=env_for(fake), log=tmp_path / "log")
    try:
        (tmp_path / "in" / "a.jpg").write_bytes(b"x" * 1234)

        def scrape() -> str:
            try:
                return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.ConnectionError:
                return ""

        text = wait_for(lambda: 'blurd_jobs{state="done"} 1.0' in (t := scrape()) and t,
                        timeout=20, what="a done job in the metrics")  # fmt: skip
        assert "blurd_uploaded_bytes_total 1234.0" in text
        assert "blurd_oldest_waiting_job_age_seconds" in text
    finally:
        assert stop(proc) == 0


def test_no_secret_or_token_in_logs_or_command_output(tmp_path: Path, fake: FakeBlurIt) -> None:
    """The secret, and every access and refresh token the API handed out, appear nowhere: not
    in the daemon's debug log, not in any command's output."""
    fake.token_lifetime_s = 1.0  # several refreshes during the run
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text(tmp_path, fake, ["in"]))
    log = tmp_path / "log"
    proc = blurd("run", "--verbose", "--config", str(cfg), env=env_for(fake), log=log)
    try:
        for i in range(3):
            (tmp_path / "in" / f"{i}.jpg").write_bytes(os.urandom(500))
        wait_for(lambda: len(list((tmp_path / "in-out").glob("*.json"))) == 3, timeout=30,
                 what="3 outputs")  # fmt: skip
        wait_for(lambda: fake.refreshes >= 1, timeout=10, what="a token refresh")
    finally:
        assert stop(proc) == 0
    outputs = [log.read_text()]
    one_shot = ["anonymize", "-o", str(tmp_path / "x"), str(tmp_path / "in" / "0.jpg")]
    for args in (["status"], ["status", "--json"], ["jobs", "--json"], ["check"], one_shot):
        done = subprocess.run(
            [sys.executable, "-m", "blurd", *args, "--config", str(cfg)],
            env=env_for(fake), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        outputs += [done.stdout, done.stderr]
    with fake._lock:
        secrets = [fake.secret_id, *fake._tokens, *fake._refresh_tokens]
    assert len(secrets) >= 3
    for text in outputs:
        for secret in secrets:
            assert secret not in text


def test_a_second_signal_exits_at_once(tmp_path: Path, fake: FakeBlurIt) -> None:
    """SIGTERM waits for the running step (bounded); a second SIGTERM exits at once."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text(tmp_path, fake, ["in"]))
    log = tmp_path / "log"
    fake.delay_next("submit", 20.0)  # an upload that will not finish soon
    proc = blurd("run", "--config", str(cfg), env=env_for(fake), log=log)
    try:
        wait_for(lambda: '"daemon.ready"' in log.read_text(), timeout=30, what="ready")
        (tmp_path / "in" / "a.jpg").write_bytes(b"slow upload")
        wait_for(lambda: '"job.uploading"' in log.read_text(), timeout=20, what="uploading")
        proc.send_signal(signal.SIGTERM)
        # Two signals that arrive before Python runs its handler count as one: wait until the
        # first was handled before sending the second.
        wait_for(lambda: '"daemon.stopping"' in log.read_text(), what="the first signal handled")
        assert proc.poll() is None, "the first signal must wait for the running upload"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()


def test_run_with_inbox_and_outbox_creates_the_inbox(tmp_path: Path, fake: FakeBlurIt) -> None:
    """`blurd run --inbox D --outbox D --once` on a fresh machine: no config file, the inbox is
    created, the database goes to the XDG state folder, and it exits 0."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "anonymized"
    env = env_for(fake, XDG_STATE_HOME=str(tmp_path / "state"))
    del env["BLURIT_CLIENT_ID"], env["BLURIT_SECRET_ID"]  # no account: the local engine
    done = subprocess.run(
        [sys.executable, "-m", "blurd", "run", "--inbox", str(inbox), "--outbox", str(outbox),
         "--once"],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert inbox.is_dir()
    assert (tmp_path / "state" / "blurd" / "blurd.db").is_file()
    assert '"engine": "local"' in done.stdout

"""The command line: help and README coverage, status/jobs/retry/check/anonymize and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from blurd import cli
from blurd.models import JobState
from tests.conftest import wait_for
from tests.fakeblurit import FakeBlurIt
from tests.harness import Daemon, anonymized

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt(token_lifetime_s=60, job_seconds=0.1) as f:
        yield f


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch, fake: FakeBlurIt) -> None:
    monkeypatch.setenv("BLURIT_CLIENT_ID", fake.client_id)
    monkeypatch.setenv("BLURIT_SECRET_ID", fake.secret_id)
    monkeypatch.delenv("BLURD_CONFIG", raising=False)


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_has_help_and_is_in_the_readme() -> None:
    """No command ships undocumented: each has help text and a row in the README."""
    readme = (ROOT / "README.md").read_text()
    commands = _commands()
    assert set(commands) == {"run", "status", "jobs", "retry", "check", "db", "anonymize"}
    for name, parser in commands.items():
        assert parser.description, name
        assert f"`blurd {name}" in readme, f"blurd {name} is not in the README"
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"blurd {name} {action.option_strings} has no help"


def write_config(tmp_path: Path, fake: FakeBlurIt, extra: str = "") -> Path:
    p = tmp_path / "c.toml"
    p.write_text(
        f'[daemon]\ndatabase = "{tmp_path}/blurd.db"\n{extra}'
        f'[blurit]\nurl = "{fake.url}"\n'
        f'[[watch]]\npath = "{tmp_path}/in"\noutput = "{tmp_path}/out"\n'
    )
    p.chmod(0o600)
    return p


def test_status_json_counts_after_a_run(
    tmp_path: Path, fake: FakeBlurIt, creds: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a run, `status --json` has the documented shape with the right counts."""
    cfg = write_config(tmp_path, fake)
    with Daemon(tmp_path, fake) as d:
        for i in range(3):
            (d.inbox / f"{i}.jpg").write_bytes(os.urandom(100))
        (d.inbox / "x.txt").write_text("no")
        wait_for(lambda: d.counts()[JobState.DONE] == 3 and d.counts()[JobState.FAILED] == 1,
                 what="3 done, 1 failed")  # fmt: skip

        def status() -> dict[str, object]:
            assert cli.main(["status", "--json", "--config", str(cfg)]) == 0
            data: dict[str, object] = json.loads(capsys.readouterr().out)
            return data

        live = wait_for(lambda: (s := status())["auth"] == "ok" and s, timeout=15,
                        what="the daemon's state, logged in")  # fmt: skip
        assert live["running"] is True
    assert live["engine"] == "blurit" and live["auth"] == "ok"
    assert live["counts"] == {"queued": 0, "uploading": 0, "processing": 0, "downloading": 0,
                              "done": 3, "failed": 1}  # fmt: skip
    assert live["last_error"]["path"] == "x.txt"
    assert live["uploaded_today_bytes"] == 300
    assert cli.main(["status", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "not running" in text and "done 3" in text
    assert fake.secret_id not in text


def test_jobs_and_retry(
    tmp_path: Path, fake: FakeBlurIt, creds: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`jobs --state failed --json` lists failed jobs; `retry --failed` requeues them."""
    cfg = write_config(tmp_path, fake)
    with Daemon(tmp_path, fake) as d:
        (d.inbox / "x.txt").write_text("no")
        wait_for(lambda: d.counts()[JobState.FAILED] == 1, what="failed")
    assert cli.main(["jobs", "--state", "failed", "--json", "--config", str(cfg)]) == 0
    (job,) = json.loads(capsys.readouterr().out)
    assert job["path"] == "x.txt" and job["state"] == "failed" and job["error"]
    assert cli.main(["retry", "--failed", "--config", str(cfg)]) == 0
    assert "1 job(s)" in capsys.readouterr().out
    assert cli.main(["jobs", "--state", "queued", "--config", str(cfg)]) == 0
    assert "x.txt" in capsys.readouterr().out
    assert cli.main(["retry", "--config", str(cfg)]) == 2


def test_check_exit_codes(
    tmp_path: Path, fake: FakeBlurIt, creds: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check`: 0 when all is well, 2 naming a bad key, 3 for refused credentials."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    cfg = write_config(tmp_path, fake)
    assert cli.main(["check", "--config", str(cfg)]) == 0
    assert "ok: engine blurit" in capsys.readouterr().out
    bad = write_config(tmp_path, fake, extra="max_uploads = 0\n")
    assert cli.main(["check", "--config", str(bad)]) == 2
    assert "daemon.max_uploads" in capsys.readouterr().err
    cfg = write_config(tmp_path, fake)
    fake.wrong_credentials = True
    assert cli.main(["check", "--config", str(cfg)]) == 3
    err = capsys.readouterr().err
    assert "refused" in err and fake.secret_id not in err


def test_check_unreachable_api_is_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An API nobody answers is a credentials/API problem (3), not a config one."""
    monkeypatch.setenv("BLURIT_CLIENT_ID", "c")
    monkeypatch.setenv("BLURIT_SECRET_ID", "s")
    p = tmp_path / "c.toml"
    p.write_text(
        f'[daemon]\ndatabase = "{tmp_path}/b.db"\n[blurit]\nurl = "http://127.0.0.1:9"\n'
        f'[[watch]]\npath = "{tmp_path}"\noutput = "{tmp_path}-out"\n'
    )
    assert cli.main(["check", "--config", str(p)]) == 3


def test_anonymize_one_shot(
    tmp_path: Path, fake: FakeBlurIt, creds: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`anonymize a.jpg b.png c.txt -o DIR`: two results with detections, exit 1 for the .txt."""
    files = []
    for name in ("a.jpg", "b.png", "c.txt"):
        (tmp_path / name).write_bytes(name.encode() * 10)
        files.append(str(tmp_path / name))
    cfg = write_config(tmp_path, fake)
    out = tmp_path / "results"
    assert cli.main(["anonymize", "--config", str(cfg), "-o", str(out), *files]) == 1
    assert (out / "a.jpg").read_bytes() == anonymized(b"a.jpg" * 10)
    assert (out / "b.png.json").is_file()
    assert "failed:" in capsys.readouterr().err
    assert len(fake.uploads) == 2


def test_bad_config_is_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` with a bad key exits 2 and says which key in which file, on one line."""
    p = tmp_path / "c.toml"
    p.write_text('[daemon]\nmax_uploadz = 1\n[[watch]]\npath = "/a"\noutput = "/b"\n')
    assert cli.main(["run", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "daemon.max_uploadz" in err and str(p) in err


def test_corrupt_database_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corrupt database stops `status` with one clear line and is not reset."""
    db = tmp_path / "blurd.db"
    db.write_bytes(b"garbage" * 1000)
    p = tmp_path / "c.toml"
    p.write_text(f'[daemon]\ndatabase = "{db}"\n')
    assert cli.main(["status", "--config", str(p)]) == 1
    err = capsys.readouterr().err
    assert "database error" in err and str(db) in err
    assert db.read_bytes() == b"garbage" * 1000


def test_db_version_with_an_unreachable_server_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`db version` against a PostgreSQL URL whose server does not answer exits 1 with one
    line naming the database, its password hidden."""
    with socket.socket() as s:  # a port that was just free, and now nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = tmp_path / "c.toml"
    p.write_text(f'[daemon]\ndatabase = "postgresql://blurd:hunter2@127.0.0.1:{port}/jobs"\n')
    assert cli.main(["db", "version", "--config", str(p)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"postgresql://blurd:***@127.0.0.1:{port}/jobs" in err
    assert "hunter2" not in err and "Traceback" not in err

"""scripts/install (in --dry-run mode), scripts/verify-unit, and the unit file's promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install"
VERIFY_UNIT = ROOT / "scripts" / "verify-unit"
UNIT = ROOT / "systemd" / "blurd.service"
TIMEOUT_S = 60


def install(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": python}
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT_S,
        check=False,
    )


def commands(output: str) -> list[str]:
    """The commands a dry run shows, without their '+ ' prefix."""
    return [line[2:] for line in output.splitlines() if line.startswith("+ ")]


def position(cmds: list[str], pattern: str) -> int:
    """Index of the first command matching ``pattern``; fails the test when there is none."""
    for i, cmd in enumerate(cmds):
        if re.search(pattern, cmd):
            return i
    pytest.fail(f"no step matches {pattern!r} in:\n" + "\n".join(cmds))


def done_or_said(output: str, cmds: list[str], pattern: str, already: str) -> None:
    """The step is either shown as a command or reported as already done on this machine."""
    assert any(re.search(pattern, c) for c in cmds) or already in output, output


@pytest.mark.parametrize("script", [INSTALL, VERIFY_UNIT])
def test_scripts_parse(script: Path) -> None:
    """bash -n accepts both scripts (a syntax error would only show on an admin's machine)."""
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=TIMEOUT_S)
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_dry_run_shows_every_step_in_order() -> None:
    """A dry run lists user, virtualenv, link, /etc/blurd, unit, daemon-reload and enable --now."""
    result = install("--dry-run")
    assert result.returncode == 0, result.stderr
    out, cmds = result.stdout, commands(result.stdout)
    done_or_said(out, cmds, r"^groupadd --system blurd$", "group blurd exists")
    done_or_said(
        out,
        cmds,
        r"^useradd --system --gid blurd --home-dir /var/lib/blurd .*--shell /usr/sbin/nologin",
        "user blurd exists",
    )
    done_or_said(out, cmds, r" -m venv /opt/blurd$", "virtualenv /opt/blurd exists")
    pip = position(cmds, re.escape(f"-m pip install --quiet --upgrade '{ROOT}[local]'"))
    assert cmds[pip].startswith("/opt/blurd/bin/python ")
    link = position(cmds, r"^ln -sfn /opt/blurd/bin/blurd /usr/local/bin/blurd$")
    etc = position(cmds, r"^install -d -m 0750 -o root -g blurd /etc/blurd$")
    done_or_said(
        out,
        cmds,
        rf"^install -m 0640 -o root -g blurd {re.escape(str(ROOT))}/config.example.toml "
        r"/etc/blurd/config.toml$",
        "/etc/blurd/config.toml exists",
    )
    unit = position(
        cmds, rf"^install -m 0644 {re.escape(str(UNIT))} /etc/systemd/system/blurd.service$"
    )
    reload = position(cmds, r"^systemctl daemon-reload$")
    enable = position(cmds, r"^systemctl enable --now blurd$")
    assert pip < link < etc < unit < reload < enable


def test_dry_run_leaves_optional_steps_out_unless_asked() -> None:
    """No secret and no media folders without their flags; --no-start enables nothing."""
    result = install("--dry-run", "--no-start")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert not [c for c in cmds if "/srv/media" in c]
    assert not [c for c in cmds if "blurit_secret_id" in c]
    assert not [c for c in cmds if c.startswith("systemctl enable")]
    assert "not started (--no-start)" in result.stdout


def test_dry_run_with_folders_and_secret() -> None:
    """--create-folders makes inbox and anonymized for group blurd; the secret is never read."""
    result = install("--dry-run", "--create-folders", "--secret-from-stdin")
    assert result.returncode == 0, result.stderr
    out, cmds = result.stdout, commands(result.stdout)
    for folder in ("/srv/media/inbox", "/srv/media/anonymized"):
        done_or_said(
            out, cmds, rf"^install -d -m 2770 -o blurd -g blurd {folder}$", f"{folder} exists"
        )
    assert (
        "would read one line from standard input into /etc/blurd/blurit_secret_id" in out
        or "/etc/blurd/blurit_secret_id exists" in out
    )


def test_the_example_configs_secret_file_line_is_commented_out() -> None:
    """The copied config must not point blurd at the root-only secret file it cannot read."""
    result = install("--dry-run")
    if "/etc/blurd/config.toml exists" in result.stdout:
        pytest.skip("this machine already has /etc/blurd/config.toml")
    sed = position(commands(result.stdout), r"^sed -i ")
    assert "secret_id_file" in commands(result.stdout)[sed]


def test_bad_options_and_old_python_are_refused() -> None:
    """An unknown option exits 2; a missing or too old Python stops before any step."""
    bad = install("--dry-run", "--frobnicate")
    assert bad.returncode == 2
    assert "unknown option --frobnicate" in bad.stderr
    old = install("--dry-run", python="/nonexistent/python3")
    assert old.returncode == 1
    assert "older than 3.11" in old.stderr
    assert commands(old.stdout) == []


def test_help_describes_the_options() -> None:
    """--help prints the header comment, naming every option."""
    result = install("--help")
    assert result.returncode == 0
    for option in ("--secret-from-stdin", "--create-folders", "--no-start", "--dry-run"):
        assert option in result.stdout


def test_the_unit_verifies() -> None:
    """systemd-analyze verify finds nothing to say about the unit (skipped without the tool)."""
    result = subprocess.run(
        [str(VERIFY_UNIT)], capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verifies" in result.stdout or "skipped: systemd-analyze not installed" in result.stdout


def _unit() -> dict[str, list[str]]:
    """Every Key=value of the unit (repeatable keys keep all their values)."""
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_the_unit_keeps_its_promises() -> None:
    """The settings DESIGN and the docs rely on: notify, watchdog, credential, user, hardening."""
    unit = _unit()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/usr/local/bin/blurd run",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "User": "blurd",
        "Group": "blurd",
        "StateDirectory": "blurd",
        "StateDirectoryMode": "0700",
        "ConfigurationDirectory": "blurd",
        "LoadCredential": "blurit_secret_id:/etc/blurd/blurit_secret_id",
        "SetCredential": "blurit_secret_id:\\n",  # a missing secret file must not fail start
        "WatchdogSec": "60",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",  # a bad config would otherwise restart forever
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/srv/media",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], f"{key}= is {unit.get(key)}, expected {value!r}"

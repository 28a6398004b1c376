"""The systemd notify protocol over real AF_UNIX datagram sockets, as systemd sees it."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from blurd.notify import Notifier, watchdog_usec
from tests.conftest import FakeClock

RECV_TIMEOUT_S = 5.0


class Listener:
    """Stands in for systemd: a bound datagram socket and what arrives on it."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value  # what $NOTIFY_SOCKET holds

    def receive(self) -> str:
        self.sock.settimeout(RECV_TIMEOUT_S)
        return self.sock.recv(4096).decode()

    def receive_lines(self) -> list[str]:
        return self.receive().split("\n")


def _short_socket_path(tmp_path: Path) -> Path:
    # sun_path holds 108 bytes; pytest's tmp_path is usually shorter, but not always.
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix="blurd-")) / "n.sock"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    path = _short_socket_path(tmp_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield Listener(sock, str(path))
    sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"blurd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    yield Listener(sock, "@" + name)
    sock.close()


def test_ready_and_status_reach_the_socket(listener: Listener) -> None:
    """READY=1 and STATUS=… arrive as datagrams on the path named by $NOTIFY_SOCKET."""
    n = Notifier.from_env({"NOTIFY_SOCKET": listener.env_value})
    assert n.enabled
    assert n.ready()
    assert listener.receive() == "READY=1"
    assert n.status("3 queued, 1 processing")
    assert listener.receive() == "STATUS=3 queued, 1 processing"


def test_ready_can_carry_a_status_in_the_same_datagram(listener: Listener) -> None:
    """ready(status) sends READY=1 and STATUS= together, so systemctl never shows a stale line."""
    Notifier(listener.env_value).ready("watching 2 folders")
    assert listener.receive_lines() == ["READY=1", "STATUS=watching 2 folders"]


def test_a_newline_in_a_status_cannot_inject_another_assignment(listener: Listener) -> None:
    """Newlines in status text are flattened: 'x\\nREADY=1' must not read as a READY message."""
    Notifier(listener.env_value).status("bad file\nREADY=1")
    assert listener.receive_lines() == ["STATUS=bad file READY=1"]


def test_abstract_socket_names_start_with_an_at_sign(abstract_listener: Listener) -> None:
    """$NOTIFY_SOCKET=@name means the abstract socket \\0name (no file on disk)."""
    n = Notifier.from_env({"NOTIFY_SOCKET": abstract_listener.env_value})
    assert n.ready()
    assert abstract_listener.receive() == "READY=1"


def test_stopping_and_reloading(listener: Listener) -> None:
    """STOPPING=1 is sent as is; RELOADING=1 carries MONOTONIC_USEC from CLOCK_MONOTONIC."""
    n = Notifier(listener.env_value)
    n.stopping()
    assert listener.receive() == "STOPPING=1"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = listener.receive_lines()
    assert reloading == "RELOADING=1"
    key, _, value = monotonic.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_everything_is_a_no_op_without_notify_socket() -> None:
    """Outside systemd nothing is sent, nothing raises, and the watchdog is off."""
    n = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert not n.watchdog_enabled
    assert n.watchdog_interval_s is None
    assert not n.ready("x")
    assert not n.status("x")
    assert not n.reloading()
    assert not n.stopping()
    assert not n.watchdog()


def test_watchdog_pings_when_watchdog_usec_names_this_process(listener: Listener) -> None:
    """With WATCHDOG_USEC (and WATCHDOG_PID equal to our pid) watchdog() sends WATCHDOG=1."""
    env = {
        "NOTIFY_SOCKET": listener.env_value,
        "WATCHDOG_USEC": "60000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    n = Notifier.from_env(env)
    assert n.watchdog_enabled
    assert n.watchdog_interval_s == 60.0
    assert n.watchdog()
    assert listener.receive() == "WATCHDOG=1"


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "me"},
    ],
    ids=["unset", "another-pid", "zero", "not-a-number", "bad-pid"],
)
def test_watchdog_stays_silent_unless_enabled_for_us(
    listener: Listener, extra: dict[str, str]
) -> None:
    """No WATCHDOG=1 when WATCHDOG_USEC is unset or invalid, or WATCHDOG_PID is another process.

    A marker datagram sent right after proves nothing came before it (datagrams keep order).
    """
    n = Notifier.from_env({"NOTIFY_SOCKET": listener.env_value, **extra})
    assert not n.watchdog_enabled
    assert not n.watchdog()
    n.status("marker")
    assert listener.receive() == "STATUS=marker"


def test_watchdog_usec_follows_sd_watchdog_enabled() -> None:
    """The parsing rules of sd_watchdog_enabled(3): positive integer, pid match when given."""
    assert watchdog_usec({"WATCHDOG_USEC": "5000000"}, pid=42) == 5_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "42"}, pid=42) == 5_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "43"}, pid=42) is None
    assert watchdog_usec({"WATCHDOG_USEC": str(2**64 - 1)}, pid=42) is None
    assert watchdog_usec({"WATCHDOG_USEC": "-5"}, pid=42) is None
    assert watchdog_usec({}, pid=42) is None


def test_watchdog_pings_at_most_once_per_half_interval(listener: Listener) -> None:
    """Calling watchdog() on every loop turn sends one ping per WatchdogSec/2, not one per call."""
    clock = FakeClock()
    env = {"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "10000000"}  # 10 s
    n = Notifier.from_env(env, clock=clock)
    assert n.watchdog()
    assert listener.receive() == "WATCHDOG=1"
    clock.advance(4.9)
    assert not n.watchdog()
    clock.advance(0.1)
    assert n.watchdog()
    assert listener.receive() == "WATCHDOG=1"
    assert not n.watchdog()


def test_send_errors_are_logged_once_and_never_raised(tmp_path: Path) -> None:
    """A socket that is gone logs notify.failed once per failure streak; no call ever raises."""
    path = _short_socket_path(tmp_path)
    n = Notifier(str(path))
    with capture_logs() as logs:
        assert not n.ready()
        assert not n.status("still nobody")
    failed = [e for e in logs if e["event"] == "notify.failed"]
    assert len(failed) == 1
    assert failed[0]["socket"] == str(path)
    assert failed[0]["message"] == "READY=1"

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        assert n.status("back")
    finally:
        sock.close()
    path.unlink()
    with capture_logs() as logs:
        assert not n.status("gone again")
    assert [e["event"] for e in logs] == ["notify.failed"]


def test_a_relative_notify_socket_is_refused_without_raising() -> None:
    """$NOTIFY_SOCKET must be absolute or @abstract; anything else is logged, not sent."""
    n = Notifier("relative/notify.sock")
    with capture_logs() as logs:
        assert not n.ready()
    assert [e["event"] for e in logs] == ["notify.failed"]

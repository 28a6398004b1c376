"""The systemd notify protocol (sd_notify(3), sd_watchdog_enabled(3)), written by hand.

A :class:`Notifier` sends ``READY=1``, ``STATUS=…``, ``RELOADING=1``, ``STOPPING=1`` and
``WATCHDOG=1`` as datagrams to ``$NOTIFY_SOCKET`` (a path, or an abstract socket written with a
leading ``@``). Without that variable every method does nothing, so the daemon calls them
unconditionally. Sending never raises: a failure is logged once (``notify.failed``) and logged
again only after a send has worked in between.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("blurd.notify")

# sd_watchdog_enabled() refuses 0 and USEC_INFINITY (2**64 - 1) and anything it cannot parse.
_USEC_INFINITY = 2**64 - 1


def watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """The watchdog interval in microseconds, or None when this process is not asked to ping.

    Same rules as sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` must be a positive integer; when
    ``$WATCHDOG_PID`` is set it must name this process (a child that inherited the environment
    must not ping for its parent).
    """
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0 or usec >= _USEC_INFINITY:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            if int(raw_pid) != pid:
                return None
        except ValueError:
            return None
    return usec


def socket_address(value: str) -> str:
    """``$NOTIFY_SOCKET`` as Python's AF_UNIX address: ``@name`` is the abstract ``\\0name``."""
    if value.startswith("@"):
        return "\0" + value[1:]
    return value


class Notifier:
    """Talks to the service manager; every method is a no-op when it is not listening."""

    def __init__(
        self,
        notify_socket: str | None = None,
        *,
        watchdog_usec: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notify_socket = notify_socket or None
        self._watchdog_usec = watchdog_usec if self.notify_socket else None
        self._clock = clock
        self._lock = threading.Lock()
        self._last_watchdog: float | None = None
        self._failing = False

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Notifier:
        """Built from ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``."""
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        return cls(
            env.get("NOTIFY_SOCKET") or None,
            watchdog_usec=watchdog_usec(env, pid),
            clock=clock,
        )

    # ------------------------------------------------------------ what the daemon calls

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens (``$NOTIFY_SOCKET`` was set)."""
        return self.notify_socket is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self._watchdog_usec is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """``WatchdogSec=`` in seconds, or None when no watchdog pings are expected."""
        return self._watchdog_usec / 1e6 if self._watchdog_usec is not None else None

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete; ``Type=notify`` waits for this."""
        return self.send("READY=1", *_status_lines(status))

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status``."""
        return self.send(*_status_lines(text))

    def reloading(self, status: str | None = None) -> bool:
        """A reload starts; call :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` is what systemd ≥ 253 requires with ``Type=notify-reload``; older
        versions ignore it.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_usec}", *_status_lines(status))

    def stopping(self, status: str | None = None) -> bool:
        """The daemon is shutting down."""
        return self.send("STOPPING=1", *_status_lines(status))

    def watchdog(self) -> bool:
        """Ping the watchdog, at most once per half interval; True when a ping was sent.

        Cheap to call on every turn of the main loop: it does nothing when the watchdog is off
        or when the last ping is recent enough.
        """
        if self._watchdog_usec is None:
            return False
        half_s = self._watchdog_usec / 2e6
        with self._lock:
            now = self._clock()
            if self._last_watchdog is not None and now - self._last_watchdog < half_s:
                return False
            self._last_watchdog = now
        return self.send("WATCHDOG=1")

    def send(self, *assignments: str) -> bool:
        """Send ``VAR=value`` lines in one datagram; True when it was delivered."""
        if self.notify_socket is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        error = None
        if not self.notify_socket.startswith(("/", "@")):
            error = "not an absolute path nor an abstract socket name (@name)"
        else:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                    sock.sendto(message, socket_address(self.notify_socket))
            except OSError as exc:
                error = exc.strerror or str(exc)
        if error is not None:
            with self._lock:
                first, self._failing = not self._failing, True
            if first:
                log.warning(
                    "notify.failed", socket=self.notify_socket, message=assignments[0], error=error
                )
            return False
        with self._lock:
            self._failing = False
        return True


def _status_lines(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # A newline would end the assignment and start another one.
    return ("STATUS=" + " ".join(text.splitlines()),)

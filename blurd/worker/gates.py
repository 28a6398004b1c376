"""Gates in front of the engine: credentials, quota and outputs, each a small state machine
with its own lock, told the outcome of every step that concerns it.

A gate that is paused lets one probe through once its wait is over; a probe that ends with an
answer decides (open, or paused again), and a probe that ends in anything else (a dropped
connection, a 429, a crash, a stop) re-arms the gate, so that another probe follows. A gate
never waits for a flag that only one kind of ending would clear.

All times are monotonic seconds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

State = Literal["open", "paused", "probing"]


@dataclass(frozen=True)
class GateView:
    state: State
    reason: str | None
    wait_s: float  # until a probe may start (0 when open or probing)


class AuthGate:
    """Bad credentials pause every engine call; a login is the probe.

    open → paused (told bad credentials) → probing (``take_probe``) → open (the login
    succeeded) | paused with a longer wait (refused) | paused with the first wait (no answer).
    """

    def __init__(self, first_wait_s: float, max_wait_s: float) -> None:
        self._lock = threading.Lock()
        self._first = first_wait_s
        self._max = max_wait_s
        self._wait = first_wait_s
        self._state: State = "open"
        self._until = 0.0
        self.reason: str | None = None

    def is_open(self) -> bool:
        with self._lock:
            return self._state == "open"

    def closed(self, reason: str, now: float) -> None:
        """A step met bad credentials."""
        with self._lock:
            if self._state == "open":
                self._state, self._until, self.reason = "paused", now + self._wait, reason

    def take_probe(self, now: float) -> bool:
        """True once per pause, when its wait is over: the caller runs the login probe."""
        with self._lock:
            if self._state != "paused" or now < self._until:
                return False
            self._state = "probing"
            return True

    def probe_ended(self, answer: bool | None, reason: str | None, now: float) -> None:
        """True: the login succeeded; False: the credentials were refused again; None: the
        probe got no answer (network, 5xx, a crash) and says nothing about the credentials."""
        with self._lock:
            if answer is True:
                self._state, self.reason, self._wait = "open", None, self._first
                return
            if answer is False:
                self._wait = min(self._wait * 2, self._max)
            self._state, self._until = "paused", now + (self._wait if answer is False else
                                                         self._first)  # fmt: skip
            self.reason = reason or self.reason

    def view(self, now: float) -> GateView:
        with self._lock:
            wait = max(0.0, self._until - now) if self._state == "paused" else 0.0
            return GateView(self._state, self.reason, wait)


class PaymentGate:
    """A 402 pauses new uploads (polls and downloads go on); one upload is the probe.

    open → paused (told a 402) → probing (``claimed`` gave the probe to one upload) → open
    (an upload was accepted) | paused (402 again) | paused, re-armed (the probe ended any
    other way: not sent, a transient error, a failure, a crash).
    """

    def __init__(self, probe_every_s: float) -> None:
        self._lock = threading.Lock()
        self._every = probe_every_s
        self._state: State = "open"
        self._until = 0.0
        self._probe: int | None = None
        self.reason: str | None = None

    def room(self, now: float, wanted: int) -> int:
        """How many uploads may be claimed now: all, one probe, or none."""
        with self._lock:
            if self._state == "open":
                return wanted
            if self._state == "paused" and now >= self._until:
                return min(wanted, 1)
            return 0

    def claimed(self, job_id: int) -> bool:
        """An upload was claimed; True when it is the probe of a pause."""
        with self._lock:
            if self._state != "paused":
                return False
            self._state, self._probe = "probing", job_id
            return True

    def may_send(self, job_id: int) -> bool:
        with self._lock:
            return self._state == "open" or self._probe == job_id

    def accepted(self, job_id: int) -> bool:
        """An upload was accepted by the engine; True when that ended a pause."""
        with self._lock:
            if self._state == "open":
                return False
            self._state, self._probe, self.reason = "open", None, None
            return True

    def refused(self, reason: str, now: float) -> bool:
        """A 402; True when it started a pause (it was open)."""
        with self._lock:
            started = self._state == "open"
            self._state, self._until, self._probe = "paused", now + self._every, None
            self.reason = reason
            return started

    def ended_otherwise(self, job_id: int, now: float) -> None:
        """An upload ended without an answer about payment; if it was the probe, re-arm."""
        with self._lock:
            if self._state == "probing" and self._probe == job_id:
                self._state, self._until, self._probe = "paused", now + self._every, None

    def view(self, now: float) -> GateView:
        with self._lock:
            wait = max(0.0, self._until - now) if self._state == "paused" else 0.0
            return GateView(self._state, self.reason, wait)


class OutputGate:
    """While an output cannot be written (a full disk, a folder that is not writable), new
    uploads pause for a while: their results would have nowhere to go. Any output placed
    reopens it; otherwise it reopens by itself after ``pause_s``, and the next failure closes
    it again."""

    def __init__(self, pause_s: float) -> None:
        self._lock = threading.Lock()
        self._pause = pause_s
        self._until = 0.0
        self.reason: str | None = None

    def blocked(self, reason: str, now: float) -> bool:
        """True when this closed an open gate."""
        with self._lock:
            was_open = now >= self._until
            self._until, self.reason = now + self._pause, reason
            return was_open

    def written(self) -> bool:
        """An output was placed; True when this reopened the gate."""
        with self._lock:
            was_closed = self.reason is not None
            self._until, self.reason = 0.0, None
            return was_closed

    def is_open(self, now: float) -> bool:
        with self._lock:
            return now >= self._until

    def view(self, now: float) -> GateView:
        with self._lock:
            if now >= self._until:
                return GateView("open", None, 0.0)
            return GateView("paused", self.reason, self._until - now)

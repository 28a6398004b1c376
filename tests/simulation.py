"""A world for the worker without threads or time: a fake clock, a scripted engine, a store
that fails on demand, and folders on disk.

The worker is driven by ``Worker.tick()`` alone (no pools: every step runs in the ticking
thread), so a sequence of events replays exactly. Used by tests/test_simulation.py.
"""

from __future__ import annotations

import errno
import hashlib
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from blurd.engines.base import Engine, Part, Phase, RemoteStatus, announce
from blurd.errors import (
    AuthError,
    BadResult,
    InputChanged,
    JobRefused,
    PaymentRequired,
    PermanentApiError,
    PossiblySubmitted,
    ResultMissing,
    StoreError,
    TransientApiError,
)
from blurd.options import Options
from tests.fakeblurit import result_bytes

JPEG = b"\xff\xd8\xff\xe0"


class Crash(BaseException):
    """The process dies here (kill -9): nothing in blurd may catch it."""


class Clock:
    """Wall and monotonic time that move only when told; the wall clock may step."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.offset = 1_700_000_000.0

    def wall(self) -> float:
        return self.mono + self.offset

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.mono += max(0.0, seconds)


class SimStop(threading.Event):
    """A stop event whose waits pass simulated time instead of real time."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.advance(timeout or 0.0)
        return self.is_set()


def anonymized(data: bytes) -> bytes:
    """What the scripted engine returns for an input: a JPEG whose scan names the input."""
    return result_bytes(data, ".jpg")


@dataclass
class Remote:
    sha: str
    data: bytes
    ready_at: float
    status: str = "ok"  # ok | lost | failed
    known: bool = True  # the worker got its id (False: created by a submit it never saw end)
    released: bool = False


@dataclass
class SimEngine(Engine):
    """Scripted BlurIt: each call may meet the next fault queued for its kind of call."""

    clock: Clock
    processing_s: float = 3.0
    faults: dict[str, list[str]] = field(
        default_factory=lambda: {"submit": [], "poll": [], "fetch": [], "login": []}
    )
    remote: dict[str, Remote] = field(default_factory=dict)
    bad_credentials: bool = False
    no_credit: bool = False
    # Standing faults: each call of that kind fails this way with this probability.
    rates: dict[str, tuple[str, float]] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    violations: list[str] = field(default_factory=list)
    submits: Counter[str] = field(default_factory=Counter)

    name = "blurit"
    supported_extensions = frozenset({".jpg"})

    def _fault(self, call: str) -> str | None:
        queue = self.faults[call]
        if queue:
            return queue.pop(0)
        kind, rate = self.rates.get(call, ("", 0.0))
        return kind if self.rng.random() < rate else None

    def _common(self, fault: str | None) -> None:
        if self.bad_credentials:
            raise AuthError("BlurIt login: 401 invalid credentials", status=401)
        match fault:
            case "503":
                raise TransientApiError("503 Service Unavailable", status=503)
            case "429":
                raise TransientApiError("429 Too Many Requests", status=429, retry_after_s=7.0)
            case "drop":
                raise TransientApiError("connection dropped")
            case "403":
                raise JobRefused("403 Forbidden (a WAF rule)", status=403)
            case "crash":
                raise Crash()

    def alive_known(self, sha: str) -> int:
        return sum(
            r.sha == sha and r.known and not r.released and r.status == "ok"
            for r in self.remote.values()
        )

    def submit(self, path: Path, options: Options) -> str:
        fault = self._fault("submit")
        self._common(fault)
        if self.no_credit:
            raise PaymentRequired("402 Payment Required", status=402)
        if fault == "400":
            raise PermanentApiError("400 invalid parameters", status=400)
        if fault == "shrank":  # the file got shorter mid-upload: the API saw too few bytes
            raise InputChanged("the file became shorter while it was sent")
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if self.alive_known(sha):
            self.violations.append(f"{path.name}: uploaded while an identical job is alive")
        rid = f"r{len(self.remote) + 1}"
        self.remote[rid] = Remote(sha, data, self.clock.wall() + self.processing_s)
        self.submits[sha] += 1
        if fault in ("timeout_after_send", "garbage_2xx", "crash_after_send"):
            self.remote[rid].known = False
            if fault == "crash_after_send":
                raise Crash()
            raise PossiblySubmitted(f"{fault}: the API may have created a job")
        return rid

    def poll(self, remote_id: str) -> RemoteStatus:
        fault = self._fault("poll")
        self._common(fault)
        r = self.remote.get(remote_id)
        if fault == "garbage":
            raise BadResult("BlurIt poll: the reply is not a JSON object")
        if r is not None and fault == "unknown":
            r.status = "lost"
        if r is not None and fault in ("failed", "revoked"):
            r.status = "failed"
        if r is None or r.status == "lost":
            return RemoteStatus(Phase.UNKNOWN, raw="Unknown job")
        if r.status == "failed":
            return RemoteStatus(Phase.FAILED, raw="Failed", error="the API failed the job")
        if self.clock.wall() < r.ready_at:
            return RemoteStatus(Phase.PENDING, raw="Started")
        return RemoteStatus(Phase.SUCCEEDED, raw="Succeeded", media_name="out.jpg",
                            detections_name="out.json")  # fmt: skip

    def fetch(self, remote_id: str, status: RemoteStatus, part: Part, out: BinaryIO) -> int:
        fault = self._fault("fetch")
        self._common(fault)
        r = self.remote.get(remote_id)
        if fault == "404_lost" and r is not None:
            r.status = "lost"
        if fault == "404" or r is None or r.status == "lost":
            raise ResultMissing("404 result file gone", status=404)
        body = anonymized(r.data) if part == "media" else b'{"faces": []}'
        announce(out, len(body))
        match fault:
            case "truncated":
                out.write(body[: len(body) // 2])
                raise TransientApiError(f"truncated download: got {len(body) // 2}")
            case "garbage":
                body = b"<html><body>502 Bad Gateway</body></html>"
            case "empty":
                body = b""
            case "disk_full":
                raise OSError(errno.ENOSPC, "No space left on device")
            case "crash_mid_write":
                out.write(body[:5])
                raise Crash()
        out.write(body)
        return len(body)

    def release(self, remote_id: str) -> None:
        if remote_id in self.remote:
            self.remote[remote_id].released = True

    def check(self) -> None:
        fault = self._fault("login")
        if fault is not None:
            raise TransientApiError(f"login: {fault}")
        if self.bad_credentials:
            raise AuthError("BlurIt login: 401 invalid credentials", status=401)


class FlakyStore:
    """A real store whose next ``fail`` calls raise StoreError (the database went away), or
    whose next call raises Crash (the process dies inside a database step)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.fail = 0
        self.crash_in = -1

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.crash_in == 0:
                self.crash_in = -1
                raise Crash()
            if self.crash_in > 0:
                self.crash_in -= 1
            if self.fail > 0:
                self.fail -= 1
                raise StoreError("database is locked (simulated)")
            return value(*args, **kwargs)

        return call


Ticker = Callable[[], float]

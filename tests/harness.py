"""A blurd daemon running in a thread of the test, against the BlurIt test server."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blurd import config, daemon
from blurd.models import Job, JobState
from blurd.signals import Signals
from blurd.store import Store
from blurd.worker import Timing
from tests.fakeblurit import FakeBlurIt, result_bytes

FAST = Timing(backoff_base_s=0.05, backoff_cap_s=0.5, poll_first_s=0.1, poll_max_s=0.3,
              auth_retry_first_s=0.2, auth_retry_max_s=0.5, payment_probe_s=0.5)  # fmt: skip


def anonymized(data: bytes, extension: str = ".jpg") -> bytes:
    """What the test server returns for an input."""
    return result_bytes(data, extension)


class Daemon:
    """blurd's daemon running in a thread of the test, against a test server."""

    def __init__(
        self,
        tmp_path: Path,
        fake: FakeBlurIt,
        *,
        daemon_keys: dict[str, Any] | None = None,
        database: str | None = None,
        **watch: object,
    ) -> None:
        """``database``: a database URL instead of a new SQLite file in ``tmp_path``."""
        self.inbox, self.outbox = tmp_path / "in", tmp_path / "out"
        self.inbox.mkdir(exist_ok=True)
        self.db = database or f"sqlite:///{tmp_path}/blurd.db"
        raw = {
            "daemon": {"database": self.db, "max_uploads": 2, "max_in_flight": 8,
                       **(daemon_keys or {})},
            "blurit": {"url": fake.url},
            "watch": [{"path": str(self.inbox), "output": str(self.outbox),
                       "settle_seconds": 0.5, **watch}],
        }  # fmt: skip
        env = {"BLURIT_CLIENT_ID": fake.client_id, "BLURIT_SECRET_ID": fake.secret_id}
        self.config = config.parse(raw, env)
        self.stop = threading.Event()
        self.timing = FAST
        self.result: list[int] = []
        # Set before entering: `once` runs like `blurd run --once`; `signals.reload.set()` is a
        # SIGHUP, which reads the config again by calling `reload_config`.
        self.once = False
        self.signals = Signals()
        self.reload_config: Callable[[], config.Config] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        code = daemon.run(self.config, stop=self.stop, timing=self.timing, rescan_s=30,
                          once=self.once, signals=self.signals,
                          reload_config=self.reload_config)  # fmt: skip
        self.result.append(code)

    def __enter__(self) -> Daemon:
        """Start the daemon; set `timing` before entering to change its delays."""
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the daemon did not stop"

    def counts(self) -> dict[JobState, int]:
        store = Store(self.db)
        try:
            return store.counts()
        finally:
            store.close()

    def jobs(self) -> dict[str, Job]:
        store = Store(self.db)
        try:
            return {j.rel_path: j for j in store.list_jobs(limit=1000)}
        finally:
            store.close()

    def job(self, rel: str) -> Job:
        return self.jobs()[rel]

    def all_jobs(self) -> list[Job]:
        """Every row, versions of the same path included."""
        store = Store(self.db)
        try:
            return store.list_jobs(limit=10_000)
        finally:
            store.close()

"""The jobs database's health, shared by the worker and the watcher of one daemon: an outage
is one ``database.unavailable`` line and its end one ``database.back``, whoever meets them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("blurd.database")


class DatabaseHealth:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._mono = monotonic
        self._down_since: float | None = None

    @property
    def down(self) -> bool:
        with self._lock:
            return self._down_since is not None

    def failed(self, exc: Exception) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = self._mono()
        log.error("database.unavailable", error=str(exc))

    def ok(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            away = self._mono() - self._down_since
            self._down_since = None
        log.info("database.back", away_s=round(away, 1))

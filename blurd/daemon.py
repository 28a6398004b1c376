"""Process lifecycle: signals, start-up recovery, the watcher and worker threads, clean stop."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping
from types import FrameType

import structlog

from blurd import defaults, writer
from blurd.config import Config
from blurd.engines.base import Engine
from blurd.errors import ConfigError
from blurd.store import Store
from blurd.watcher import FolderWatcher, Watcher
from blurd.worker import Timing, Worker

log = structlog.get_logger("blurd.daemon")

STOP_GRACE_S = 8.0


def make_engine(config: Config) -> Engine:
    """The engine the configuration asks for (or implies)."""
    name, _why = config.engine_choice()
    if name == "blurit":
        from blurd.engines.blurit import BlurItEngine

        b = config.blurit
        return BlurItEngine(b.url, b.client_id, b.secret_id)
    try:
        from blurd.engines.local import LocalEngine
    except ImportError as exc:
        raise ConfigError(
            "no BlurIt credentials are configured and the local engine is not installed: "
            "set $BLURIT_CLIENT_ID and $BLURIT_SECRET_ID (or [blurit] in the config), "
            "or install it with: pip install 'blurd[local]'",
            key="daemon.engine",
        ) from exc
    return LocalEngine(plate_model=config.local.plate_model)


class StopSignals:
    """First SIGTERM/SIGINT sets the stop event; a second one exits at once."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.count = 0

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        if self.count > 1:
            os._exit(128 + signum)
        self.stop.set()


def run(
    config: Config,
    *,
    once: bool = False,
    stop: threading.Event | None = None,
    engine: Engine | None = None,
    timing: Timing | None = None,
    rescan_s: float = defaults.RESCAN_INTERVAL_S,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run the daemon until ``stop`` is set (or, with ``once``, until the queue is empty)."""
    stop = stop or threading.Event()
    StopSignals(stop).install()
    for warning in config.warnings:
        log.warning("config.warning", detail=warning)
    name, why = config.engine_choice()
    store = Store(config.daemon.database)
    try:
        return _run(config, store, name, why, once, stop, engine, timing, rescan_s)
    finally:
        store.close()


def _run(
    config: Config,
    store: Store,
    name: str,
    why: str,
    once: bool,
    stop: threading.Event,
    engine: Engine | None,
    timing: Timing | None,
    rescan_s: float,
) -> int:
    recovered = store.recover()
    log.info("daemon.recovered", **recovered)
    for w in config.watches:
        for folder in (w.output, w.archive):
            if folder is not None:
                removed = writer.clean_temp_files(folder)
                if removed:
                    log.info("daemon.temp_removed", folder=str(folder), files=removed)
    engine = engine or make_engine(config)
    log.info("engine.selected", engine=engine.name, why=why, once=once)
    for w in config.watches:
        for sentence in engine.limitations(w.options):
            log.warning("engine.limitation", watch=str(w.path), detail=sentence)
    if stop.is_set():
        engine.close()
        return 0
    worker = Worker(
        store,
        engine,
        list(config.watches),
        max_uploads=config.daemon.max_uploads,
        max_in_flight=config.daemon.max_in_flight,
        timing=timing,
    )
    excluded = [p for w in config.watches for p in (w.output, w.archive) if p is not None]
    watcher = Watcher(
        [
            FolderWatcher(w, store, excluded=excluded, rescan_s=rescan_s, on_enqueue=worker.wake)
            for w in config.watches
        ]
    )
    threads = [
        threading.Thread(target=watcher.run, args=(stop,), name="watcher", daemon=True),
        threading.Thread(target=worker.run, args=(stop,), name="worker", daemon=True),
    ]
    for t in threads:
        t.start()
    log.info("daemon.started", watches=[str(w.path) for w in config.watches])
    code = 0
    try:
        while not stop.wait(0.2):
            if once and _finished(watcher, worker, store):
                log.info("daemon.queue_empty")
                break
            if once and worker.auth_paused_until is not None:
                log.error("daemon.stopping", reason="the engine refused the credentials")
                code = 1
                break
    finally:
        stop.set()
        worker.wake()
        deadline = time.monotonic() + STOP_GRACE_S
        for t in threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        engine.close()
        log.info("daemon.stopped", code=code)
    return code


def _finished(watcher: Watcher, worker: Worker, store: Store) -> bool:
    if not all(f.scanned for f in watcher.folders):
        return False
    return watcher.pending() == 0 and worker.busy() == 0 and store.active() == 0

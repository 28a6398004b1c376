"""Process lifecycle: signals, start-up recovery, the watcher and worker threads, systemd
notifications, metrics, config reload on SIGHUP, and a clean stop."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from blurd import defaults, heap, writer
from blurd.config import Config
from blurd.engines.base import Engine
from blurd.errors import BlurdError, ConfigError
from blurd.health import DatabaseHealth
from blurd.metrics import Metrics
from blurd.models import JobState
from blurd.notify import Notifier
from blurd.signals import Signals
from blurd.store import Store
from blurd.watcher import FolderWatcher, Watcher
from blurd.worker import Timing, Worker

log = structlog.get_logger("blurd.daemon")

# A stop fits in the unit's TimeoutStopSec (30 s): running steps get STOP_GRACE_S to end,
# then leases are released, the engine and the store closed.
STOP_GRACE_S = 15.0
MAIN_LOOP_S = 0.2
STATUS_EVERY_S = 5.0


def make_engine(config: Config, metrics: Metrics | None = None) -> Engine:
    """The engine the configuration asks for (or implies)."""
    name, _why = config.engine_choice()
    if name == "blurit":
        from blurd.engines.blurit import BlurItEngine

        b = config.blurit
        on_refresh = metrics.token_refreshed if metrics is not None else None
        return BlurItEngine(b.url, b.client_id, b.secret_id, on_token_refresh=on_refresh)
    try:
        from blurd.engines.local import LocalEngine
    except ImportError as exc:
        raise ConfigError(
            "no BlurIt credentials are configured and the local engine is not installed: "
            "set $BLURIT_CLIENT_ID and $BLURIT_SECRET_ID (or [blurit] in the config), "
            f"or install it with: pip install 'blurd[local]' ({exc})",
            key="daemon.engine",
        ) from exc
    engine: Engine = LocalEngine(plate_model=config.local.plate_model)
    return engine


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(
    config: Config,
    *,
    once: bool = False,
    stop: threading.Event | None = None,
    signals: Signals | None = None,
    reload_config: Callable[[], Config] | None = None,
    engine: Engine | None = None,
    timing: Timing | None = None,
    rescan_s: float = defaults.RESCAN_INTERVAL_S,
    notifier: Notifier | None = None,
) -> int:
    """Run the daemon until stopped (or, with ``once``, until the queue is empty)."""
    heap.fix_mmap_threshold()
    if signals is None:
        signals = Signals()
        signals.install()
    if stop is not None:
        signals.stop = stop
    for warning in config.warnings:
        log.warning("config.warning", detail=warning)
    d_cfg = config.daemon
    store = Store(d_cfg.database, node=d_cfg.node_id, lease_s=d_cfg.lease_seconds)
    if store.schema_change is not None:
        before, after = store.schema_change
        log.info("database.upgraded", schema_from=before, schema_to=after)
    try:
        d = Daemon(config, store, signals, notifier or Notifier.from_env(), timing, rescan_s)
        return d.run(once=once, engine=engine, reload_config=reload_config)
    finally:
        store.close()


class Daemon:
    def __init__(
        self,
        config: Config,
        store: Store,
        signals: Signals,
        notifier: Notifier,
        timing: Timing | None,
        rescan_s: float,
    ) -> None:
        self.config = config
        self.store = store
        self.signals = signals
        self.stop = signals.stop
        self.notifier = notifier
        self.timing = timing
        self.rescan_s = rescan_s
        self.node = store.node
        self.metrics = Metrics(store)
        self.health = DatabaseHealth()  # one outage, one line, for the worker and the watcher
        self.engine: Engine | None = None
        self.worker: Worker | None = None
        self.watcher: Watcher | None = None
        self._watcher_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._limitations: list[str] = []

    def run(
        self, *, once: bool, engine: Engine | None, reload_config: Callable[[], Config] | None
    ) -> int:
        name, why = self.config.engine_choice()
        engine_name = engine.name if engine is not None else name
        self._register_node(engine_name)
        try:
            self._refuse_other_engines(engine_name)
        except BaseException:
            self.store.clear_daemon_state(self.node)
            raise
        self._clean_temp_files()
        server = self.metrics.serve(self.config.daemon.metrics)
        try:
            self.engine = engine or make_engine(self.config, self.metrics)
            log.info("engine.selected", engine=self.engine.name, why=why, once=once)
            recovered = self.store.recover(
                keeps_remote_jobs=self.engine.keeps_jobs_across_restarts
            )
            log.info("daemon.recovered", node=self.node, **recovered)
            self._log_limitations()
            if self.stop.is_set():  # a signal during start-up
                return 0
            return self._serve(once, reload_config)
        finally:
            if self.engine is not None:
                self.engine.close()
            if server is not None:
                server.stop()
            self.store.clear_daemon_state(self.node)

    def _serve(self, once: bool, reload_config: Callable[[], Config] | None) -> int:
        assert self.engine is not None
        self.worker = Worker(
            self.store,
            self.engine,
            list(self.config.watches),
            max_uploads=self.config.daemon.max_uploads,
            max_in_flight=self.config.daemon.max_in_flight,
            timing=self.timing,
            metrics=self.metrics,
            retention_s=self.config.daemon.retention_days * 86400,
            health=self.health,
        )
        worker_thread = threading.Thread(
            target=self.worker.run, args=(self.stop, STOP_GRACE_S), name="worker", daemon=True
        )
        worker_thread.start()
        self._threads.append(worker_thread)
        self._start_watcher()
        log.info("daemon.started", watches=[str(w.path) for w in self.config.watches])
        code = 0
        ready = False
        next_status = 0.0
        try:
            while not self.stop.wait(MAIN_LOOP_S):
                if self._moving():
                    self.notifier.watchdog()
                if not ready and self._scanned():
                    ready = True
                    self.notifier.ready(self._status_line())
                    log.info("daemon.ready")
                now = time.monotonic()
                if now >= next_status:
                    next_status = now + STATUS_EVERY_S
                    self._publish_status()
                if self.signals.reload.is_set():
                    self.signals.reload.clear()
                    self._reload(reload_config)
                if once and self._finished():
                    log.info("daemon.queue_empty")
                    break
                if once and self.worker.auth_refused():
                    log.error("daemon.stopping", reason="the engine refused the credentials")
                    code = 1
                    break
        finally:
            log.info(
                "daemon.stopping",
                detail="finishing the running steps; a second signal exits at once",
            )
            self.notifier.stopping()
            self.stop.set()
            self._stop_watcher_thread(join=False)
            self.worker.wake()
            # The worker ends its steps within STOP_GRACE_S and then releases its leases; the
            # engine and the store are closed only after that (Daemon.run, then run()).
            deadline = time.monotonic() + STOP_GRACE_S + 5.0
            for t in self._threads:
                t.join(timeout=max(0.1, deadline - time.monotonic()))
            log.info("daemon.stopped", code=code)
        return code

    # ------------------------------------------------------------------ pieces

    def _register_node(self, engine_name: str) -> None:
        """Take this daemon's node id in the database before touching any job: two live
        daemons with one node id would each take the other's jobs for their own."""

        def left_behind(state: dict[str, Any]) -> bool:
            # Left by this process or by one of this host that died (kill -9).
            pid = state.get("pid")
            return state.get("host") == socket.gethostname() and (
                pid == os.getpid() or not _pid_alive(pid)
            )

        mine = {"pid": os.getpid(), "host": socket.gethostname(), "engine": engine_name}
        other = self.store.claim_node(self.node, mine, defaults.NODE_STATE_FRESH_S, left_behind)
        if other is None:
            return
        raise ConfigError(
            f"another daemon already runs as node {self.node!r} on this database (pid "
            f"{other.get('pid')} on {other.get('host')}); give each daemon sharing a database "
            "its own [daemon] node_id",
            key="daemon.node_id",
        )

    def _refuse_other_engines(self, engine_name: str) -> None:
        """Nodes sharing a queue take over each other's jobs: a job at BlurIt adopted by a node
        running the local engine would be uploaded (and paid for) again, and a local job
        polled at BlurIt would fail. Every node must run the same engine."""
        others = self.store.daemon_states(defaults.NODE_STATE_FRESH_S)
        differ = {n: s["engine"] for n, s in others.items()
                  if n != self.node and s.get("engine") not in (None, engine_name)}  # fmt: skip
        if not differ:
            return
        names = ", ".join(f"{n} runs {e}" for n, e in sorted(differ.items()))
        raise ConfigError(
            f"this node would run the {engine_name} engine, but other nodes on this database "
            f"do not ({names}); give every node the same engine (and credentials)",
            key="daemon.engine",
        )

    def _others_running(self) -> bool:
        return any(n != self.node for n in self.store.daemon_states(defaults.NODE_STATE_FRESH_S))

    def _clean_temp_files(self) -> None:
        # With a shared database, another node may be writing into the same output folders:
        # only temp files older than a lease are certainly left by a crash. (Several daemons
        # may share one SQLite file too, on one machine.)
        shared = not self.store.is_sqlite or self._others_running()
        min_age = self.store.lease_s if shared else 0.0
        for w in self.config.watches:
            for folder in (w.output, w.archive):
                if folder is not None:
                    removed = writer.clean_temp_files(folder, min_age_s=min_age)
                    if removed:
                        log.info("daemon.temp_removed", folder=str(folder), files=removed)

    def _log_limitations(self) -> None:
        assert self.engine is not None
        self._limitations = []
        for w in self.config.watches:
            for sentence in self.engine.limitations(w.options):
                log.warning("engine.limitation", watch=str(w.path), detail=sentence)
                self._limitations.append(f"{w.path}: {sentence}")

    def _start_watcher(self) -> None:
        assert self.worker is not None
        excluded = [p for w in self.config.watches for p in (w.output, w.archive) if p]
        self.watcher = Watcher(
            [
                FolderWatcher(
                    w,
                    self.store,
                    excluded=excluded,
                    rescan_s=self.rescan_s,
                    on_enqueue=self.worker.wake,
                )
                for w in self.config.watches
            ],
            health=self.health,
        )
        self._watcher_stop = threading.Event()
        t = threading.Thread(
            target=self.watcher.run, args=(self._watcher_stop,), name="watcher", daemon=True
        )
        t.start()
        self._threads = [x for x in self._threads if x.name != "watcher"] + [t]

    def _stop_watcher_thread(self, *, join: bool) -> None:
        self._watcher_stop.set()
        if self.watcher is not None:
            self.watcher.wake.set()
        if join:
            for t in self._threads:
                if t.name == "watcher":
                    t.join(timeout=STOP_GRACE_S)

    def _moving(self) -> bool:
        """Whether the work is moving: systemd's watchdog is fed only then, so a daemon whose
        scheduler or watcher is stuck or dead is restarted instead of idling "active"."""
        assert self.worker is not None
        threads_ok = all(t.is_alive() for t in self._threads)
        return threads_ok and self.worker.alive()

    def _scanned(self) -> bool:
        return self.watcher is not None and all(f.scanned for f in self.watcher.folders)

    def _finished(self) -> bool:
        assert self.watcher is not None and self.worker is not None
        if not self._scanned():
            return False
        return self.watcher.pending() == 0 and self.worker.busy() == 0 and self.store.active() == 0

    def _reload(self, reload_config: Callable[[], Config] | None) -> None:
        """SIGHUP: read the config again; a bad one keeps the old one running."""
        if reload_config is None:
            log.warning("config.reload_skipped", reason="no config file to read again")
            return
        self.notifier.reloading()
        try:
            new = reload_config()
        except BlurdError as exc:
            log.error("config.reload_failed", error=str(exc), detail="keeping the old config")
            self.notifier.ready(self._status_line())
            return
        old = self.config
        restart_keys = ("engine", "database", "max_uploads", "max_in_flight", "metrics",
                        "node_id", "lease_seconds")  # fmt: skip
        for key in restart_keys:
            if getattr(new.daemon, key) != getattr(old.daemon, key):
                log.warning("config.needs_restart", key=f"daemon.{key}")
        if new.engine_choice()[0] != old.engine_choice()[0] or new.blurit != old.blurit:
            log.warning("config.needs_restart", key="engine or [blurit]")
        self.config = Config(
            old.daemon, old.blurit, new.watches, old.local, new.source, new.warnings
        )
        assert self.worker is not None and self.watcher is not None
        self._stop_watcher_thread(join=True)
        self.worker.set_watches(list(new.watches))
        self._log_limitations()
        self._start_watcher()
        log.info("config.reloaded", watches=[str(w.path) for w in new.watches])
        self.notifier.ready(self._status_line())

    def _status_line(self) -> str:
        counts = self.store.counts()
        parts = [f"{counts[s]} {s.value}" for s in JobState if counts[s]]
        return "jobs: " + (", ".join(parts) if parts else "none")

    def _publish_status(self) -> None:
        try:
            self.notifier.status(self._status_line())
            self.store.save_daemon_state(self.node, self._state())
        except BlurdError as exc:
            log.warning("daemon.status_failed", error=str(exc))

    def _state(self) -> dict[str, Any]:
        assert self.engine is not None and self.worker is not None
        name, why = self.config.engine_choice()
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "engine": self.engine.name,
            "engine_reason": why if name == self.engine.name else "given by the caller",
            "engine_state": self.engine.describe(),
            "worker": self.worker.state(),
            "limitations": self._limitations,
            "watches": [str(w.path) for w in self.config.watches],
        }

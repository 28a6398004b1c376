"""The scheduler: hands due steps to small thread pools and applies what they return.

One thread looks at the board (jobs held at the engine, in memory) and at the queue (claims in
the database, only while there is room and only on news or once per ``queue_look_s``) and
hands each due step to a pool; a pool thread runs the step, then applies its outcome, then any
step that outcome makes due at once. Nothing kills a thread: a step that raises is retried
later, a pool thread that dies anyway is replaced, and ``alive`` tells the daemon whether the
work is moving (it feeds systemd's watchdog only then).

Schedules use the monotonic clock; the wall clock only fills the database's fields that other
nodes read (due times of queued jobs, leases).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from blurd import defaults
from blurd.config import WatchConfig
from blurd.engines.base import Engine
from blurd.errors import AuthError, StoreError
from blurd.health import DatabaseHealth
from blurd.metrics import Metrics
from blurd.models import Job, JobState
from blurd.store import Store
from blurd.worker import outcomes as o
from blurd.worker.apply import Applier, FollowUp, Gates
from blurd.worker.board import Board, Kind
from blurd.worker.gates import AuthGate, OutputGate, PaymentGate
from blurd.worker.steps import Steps, download_step
from blurd.worker.timing import Timing

log = structlog.get_logger("blurd.worker")
S = JobState
_Item = tuple[o.Step, Job, Job | None, Kind]
# The scheduler counts as stuck when it has not finished a loop for this long.
_STUCK_S = 60.0


class _Pool:
    """A few daemon threads running steps; a thread that dies is replaced by ``ensure``."""

    def __init__(self, name: str, size: int, run: Callable[[_Item], None]) -> None:
        self.name = name
        self.q: queue.Queue[_Item | None] = queue.Queue()
        self._run = run
        self.threads = [self._start(i) for i in range(size)]

    def _start(self, i: int) -> threading.Thread:
        t = threading.Thread(target=self._loop, name=f"{self.name}-{i}", daemon=True)
        t.start()
        return t

    def _loop(self) -> None:
        while (item := self.q.get()) is not None:
            self._run(item)

    def ensure(self) -> int:
        """Replace dead threads; returns how many were replaced."""
        dead = [i for i, t in enumerate(self.threads) if not t.is_alive()]
        for i in dead:
            log.error("worker.thread_replaced", thread=self.threads[i].name)
            self.threads[i] = self._start(i)
        return len(dead)

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)


class Worker:
    def __init__(
        self,
        store: Store,
        engine: Engine,
        watches: list[WatchConfig],
        *,
        max_uploads: int = defaults.MAX_UPLOADS,
        max_in_flight: int = defaults.MAX_IN_FLIGHT,
        timing: Timing | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        io_threads: int = 4,
        metrics: Metrics | None = None,
        retention_s: float = defaults.RETENTION_DAYS * 86400,
        health: DatabaseHealth | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.watches = {w.name: w for w in watches}
        self.max_uploads = max_uploads
        self.max_in_flight = max_in_flight
        self.timing = timing or Timing()
        self.clock = clock
        self.mono = monotonic
        self.io_threads = io_threads
        self.metrics = metrics or Metrics()
        self.retention_s = retention_s
        self.board = Board()
        self.wake_event = self.board.wake
        self.health = health or DatabaseHealth(monotonic)
        t = self.timing
        self.gates = Gates(AuthGate(t.auth_retry_first_s, t.auth_retry_max_s),
                           PaymentGate(t.payment_probe_s), OutputGate(t.output_pause_s))
        self.stop = threading.Event()
        self.stopping = False
        self.steps = Steps(engine, lambda: self.watches, self.timing, self.metrics, self._permit)
        self.applier = Applier(
            store, engine, self.board, self.gates, self.metrics, self.health,
            timing=self.timing, clock=clock, monotonic=monotonic, rng=rng, stop=self.stop,
            detections_wanted=self._detections_wanted,
            originals_kept=self._originals_kept,
        )  # fmt: skip
        self._pools: dict[Kind, _Pool] = {}
        self._leases_due = 0.0
        self._prune_due = 0.0
        self.heartbeat = monotonic()

    # ------------------------------------------------------------------ public

    def set_watches(self, watches: list[WatchConfig]) -> None:
        self.watches = {w.name: w for w in watches}

    def wake(self) -> None:
        """Something outside the worker may have queued jobs: look at the queue at once."""
        now = self.mono()
        self.board.news(False, now)
        self.board.news(True, now)

    def busy(self) -> int:
        return self.board.busy()

    def auth_refused(self) -> bool:
        return not self.gates.auth.is_open()

    def alive(self) -> bool:
        """Whether the work is moving: the scheduler loops and every pool has its threads."""
        if self.mono() - self.heartbeat > _STUCK_S:
            return False
        return all(t.is_alive() for p in self._pools.values() for t in p.threads)

    def state(self) -> dict[str, Any]:
        now = self.mono()
        auth, pay, out = (g.view(now) for g in self.gates)
        return {
            "auth": "ok" if auth.state == "open" else f"paused: {auth.reason or ''}",
            "uploads_paused": pay.state != "open",
            "uploads_paused_for_s": pay.wait_s,
            "outputs_blocked": out.reason,
            "originals_failing": len(self.applier.originals_failing),
            "database": "unavailable" if self.health.down else "ok",
        }

    def run(self, stop: threading.Event, grace_s: float = 10.0) -> None:
        """Schedule steps until ``stop`` is set; then stop claiming, let running steps end
        within ``grace_s``, and release this node's leases."""
        self.stop = self.applier.stop = stop
        self._pools = {
            "upload": _Pool("upload", self.max_uploads, self._run_item),
            "io": _Pool("io", self.io_threads, self._run_item),
        }
        try:
            while not stop.is_set():
                wait = self.tick()
                if self.board.wake.wait(wait):
                    # Steps end in bursts; let them share one tick.
                    stop.wait(defaults.TICK_BATCH_S)
                self.board.wake.clear()
        finally:
            self.stopping = True
            for pool in self._pools.values():
                pool.close()
            deadline = self.mono() + grace_s
            while self.busy() and self.mono() < deadline:
                time.sleep(0.05)
            if self.busy():
                log.warning("worker.stopped_with_steps_running", steps=self.busy())
            try:
                self.store.release_all()
            except StoreError as exc:  # the database is gone: the holds lapse with the lease
                log.warning("worker.release_failed", error=str(exc))

    def tick(self) -> float:
        """One round of scheduling (see ``_tick``) that no error ends: a database outage is
        one ``database.unavailable`` line and a look again in a second. Returns how long the
        scheduler may sleep."""
        try:
            wait = self._tick()
        except StoreError as exc:
            self.health.failed(exc)
            wait = 1.0
        except Exception:
            log.exception("worker.error")
            wait = 5.0
        else:
            self.health.ok()
        self.heartbeat = self.mono()
        return wait

    def _tick(self) -> float:
        """Hand out every due step; return how long the scheduler may sleep."""
        for pool in self._pools.values():
            pool.ensure()
        now, wall = self.mono(), self.clock()
        if now >= self._leases_due:
            self._keep_leases(now, wall)
        if now >= self._prune_due:
            self._prune(now, wall)
        if self.gates.auth.take_probe(now):
            if self._pools:
                threading.Thread(target=self._probe_login, name="auth-probe", daemon=True).start()
            else:  # driven by tick() alone (the simulation test): everything in this thread
                self._probe_login()
        api_ok = self.gates.auth.is_open()
        if api_ok:
            self._dispatch_held(now, wall)
        want = 0 if self.stopping else 2 * self.io_threads - self.board.running("prepare")
        hash_more = self._claim(now, wall, want, prepared=False)
        room = self._upload_room(now) if api_ok and not self.stopping else 0
        upload_more = self._claim(now, wall, room, prepared=True)
        if hash_more or upload_more:
            return defaults.TICK_BATCH_S
        queues = [p for p, r in ((False, want), (True, room)) if r > 0]
        wait = min(self.board.next_due(now, queues), self._leases_due) - now
        for view in (g.view(now) for g in self.gates):
            # A pause whose wait is over needs no wake-up of its own: its probe goes with the
            # next claim, which news or the queue look bring (waking every 50 ms instead, with
            # nothing queued to probe with, was a busy loop).
            if view.state == "paused" and view.wait_s > 0:
                wait = min(wait, view.wait_s)
        return max(defaults.TICK_BATCH_S, min(wait, self.timing.idle_wait_max_s))

    # ------------------------------------------------------------------ handing out

    def _dispatch_held(self, now: float, wall: float) -> None:
        due = self.board.due(now, 100)
        rows = self.store.get_many(due)
        for job_id in set(due) - {j.id for j in rows}:
            self.board.drop(job_id)  # deleted from the database by hand
        for job in rows:
            if job.node != self.store.node or job.state not in (S.PROCESSING, S.DOWNLOADING):
                self.board.drop(job.id)  # taken over by another node, or moved on
            elif job.next_attempt_at > wall:
                self.board.hold(job.id, now + (job.next_attempt_at - wall))
            elif job.state is S.PROCESSING:
                self._put("poll", job, "io")
            else:
                self._put(download_step(job, self._detections_wanted(job)), job, "io")

    def _upload_room(self, now: float) -> int:
        if not self.gates.output.is_open(now):
            return 0
        # Claimed ahead: twice as many uploads wait in the pool's queue as it has threads, so
        # a thread that finishes one starts the next at once (with only as many waiting as
        # threads, the threads idled 30 % of the time: scripts/bench, overhead row).
        uploads = self.board.running("upload")
        slots = 3 * self.max_uploads - uploads
        room = min(slots, self.max_in_flight - self.board.held_count() - uploads)
        return self.gates.payment.room(now, room)

    def _claim(self, now: float, wall: float, limit: int, *, prepared: bool) -> bool:
        """Claim up to ``limit`` queued jobs and hand each to its step; True when the claim
        was full (more may be due)."""
        news = self.board.claimable(prepared, now) if limit > 0 else None
        if news is None:
            return False
        rehashed = self.store.rehashed
        claimed = self.store.claim(wall, limit, prepared=prepared)
        if self.store.rehashed != rehashed:  # back to be hashed, to reuse a done twin's result
            self.board.news(False, now)
        if len(claimed) < limit:
            due = self.store.next_queued_at(wall, prepared=prepared)
            # Nothing due now: the next due job, or another look soon (other nodes and `blurd
            # retry` queue jobs without telling this node). Something due that could not be
            # claimed is being claimed by another node: look again next tick.
            if due is None:
                at = now + self.timing.queue_look_s
            elif due > wall:
                at = now + min(due - wall, self.timing.queue_look_s)
            else:
                at = now
            self.board.looked(prepared, news, at)
        for job in claimed:
            if not prepared:
                self._put("prepare", job, "prepare")
                continue
            if self.gates.payment.claimed(job.id):
                log.info("engine.probe", job_id=job.id, path=job.rel_path, reason="402")
            self._put("upload", job, "upload")
        return len(claimed) == limit

    def _put(self, step: o.Step, job: Job, kind: Kind, earlier: Job | None = None) -> None:
        self.board.start(job.id, kind)
        pool = self._pools.get("upload" if kind == "upload" else "io")
        if pool is None:  # tick() driven by a test without pools: run here
            self._run_item((step, job, earlier, kind))
        else:
            pool.q.put((step, job, earlier, kind))

    def _run_item(self, item: _Item) -> None:
        """Run a step, apply its outcome, and run what that makes due at once."""
        step, job, earlier, kind = item
        follow: FollowUp | None = FollowUp(step, job, earlier)
        try:
            while follow is not None:
                follow = self._step_and_apply(follow)
        finally:
            if step == "upload":  # a probe that ended without any outcome re-arms its gate
                self.gates.payment.ended_otherwise(job.id, self.mono())
            self.board.end(job.id, kind)

    def _step_and_apply(self, f: FollowUp) -> FollowUp | None:
        try:
            outcome = self.steps.run(f.step, f.job, f.earlier)
        except Exception as exc:
            # A bug or an unexpected error: retry the step later, from wherever the job got to.
            log.exception("job.step_error", job_id=f.job.id, path=f.job.rel_path, step=f.step)
            outcome = o.Retry(f"{type(exc).__name__}: {exc}")
        try:
            return self.applier.apply(f.job, f.step, outcome)
        except Exception:
            log.exception("job.apply_error", job_id=f.job.id, path=f.job.rel_path, step=f.step)
            self._after_apply_error(f.job)
            return None

    def _after_apply_error(self, job: Job) -> None:
        """An outcome could not be applied (a bug): leave the job where a later try finds it.
        Left as it was, an ``uploading`` or claimed ``queued`` row would keep this node's
        lease, renewed for ever, and no node would ever take it up again."""
        later = self.timing.backoff_cap_s / 10
        try:
            if job.state is S.UPLOADING:
                self.store.transition(job.id, S.UPLOADING, S.QUEUED, error="internal error",
                                      next_attempt_at=self.clock() + later)  # fmt: skip
                self.board.news(job.sha256 is not None, self.mono() + later)
            elif job.state is S.QUEUED:
                self.store.release(job.id)
            else:
                self.board.hold(job.id, self.mono() + later)
        except Exception:  # the database too: the lease lapses, a restart recovers the job
            log.exception("job.apply_error", job_id=job.id, path=job.rel_path)

    # ------------------------------------------------------------------ upkeep

    def _keep_leases(self, now: float, wall: float) -> None:
        """Renew the leases of this node's jobs; adopt those of nodes whose lease ran out."""
        self._leases_due = now + self.store.lease_s / 4
        self.store.renew_leases(wall)
        keeps = self.engine.keeps_jobs_across_restarts
        adopted = self.store.take_over(wall, keeps_remote_jobs=keeps)
        if any(adopted.values()):
            log.warning("jobs.taken_over", reason="their node's lease ran out", **adopted)
            self.wake()
        held = self.store.held_at_engine()
        self.board.replace_held({i: now + (at - wall) for i, at in held.items()})

    def _prune(self, now: float, wall: float) -> None:
        self._prune_due = now + defaults.PRUNE_EVERY_S
        pruned = self.store.prune(wall, self.retention_s)
        if pruned:
            log.info("jobs.pruned", rows=pruned, older_than_days=self.retention_s / 86400)

    def _probe_login(self) -> None:
        answer: bool | None = None
        reason: str | None = None
        try:
            self.engine.check()
            answer = True
        except AuthError as exc:
            answer, reason = False, str(exc)
        except Exception as exc:
            reason = f"login probe failed: {exc}"
        finally:
            self.gates.auth.probe_ended(answer, reason, self.mono())
            if answer:
                log.info("engine.resumed", reason="login succeeded")
            self.board.wake.set()

    def _permit(self, job: Job) -> o.Outcome | None:
        """Whether an upload claimed ahead may still be sent now."""
        if not self.gates.auth.is_open():
            return o.Gated("auth", self.gates.auth.reason or "bad credentials")
        if self.stopping:
            return o.Unsent("the daemon is stopping")
        if not self.gates.payment.may_send(job.id):
            return o.Unsent("uploads are paused (payment required)")
        return None

    def _detections_wanted(self, job: Job) -> bool:
        watch = self.watches.get(job.watch)
        return watch is None or watch.options.detections

    def _originals_kept(self, job: Job) -> bool:
        watch = self.watches.get(job.watch)
        return watch is not None and watch.originals == "keep"

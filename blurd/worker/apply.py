"""The one place where an outcome takes effect: the transition, the schedule, the gates, the
metrics and the one log line.

A database error while applying is retried (the outcome is not dropped: a remote id in
particular must be recorded) until the database answers or the worker stops; the outage is
one ``database.unavailable`` line, its end one ``database.back``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import structlog

from blurd import defaults
from blurd.engines.base import Engine
from blurd.errors import StoreError
from blurd.health import DatabaseHealth
from blurd.metrics import Metrics
from blurd.models import Job, JobState
from blurd.store import Store
from blurd.worker import outcomes as o
from blurd.worker.board import Board
from blurd.worker.gates import AuthGate, OutputGate, PaymentGate
from blurd.worker.steps import download_step
from blurd.worker.timing import Timing, backoff, poll_interval

log = structlog.get_logger("blurd.worker")
S = JobState


class FollowUp(NamedTuple):
    """A step to run at once, in the same thread, after an outcome (no tick in between)."""

    step: o.Step
    job: Job
    earlier: Job | None = None


class Gates(NamedTuple):
    auth: AuthGate
    payment: PaymentGate
    output: OutputGate


class Applier:
    def __init__(
        self,
        store: Store,
        engine: Engine,
        board: Board,
        gates: Gates,
        metrics: Metrics,
        health: DatabaseHealth,
        *,
        timing: Timing,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        rng: Callable[[], float],
        stop: threading.Event,
        detections_wanted: Callable[[Job], bool],
        originals_kept: Callable[[Job], bool],
    ) -> None:
        self.store = store
        self.engine = engine
        self.board = board
        self.gates = gates
        self.metrics = metrics
        self.health = health
        self.timing = timing
        self.clock = clock
        self.mono = monotonic
        self.rng = rng
        self.stop = stop
        self.detections_wanted = detections_wanted
        self.originals_kept = originals_kept
        self.originals_failing: set[int] = set()

    def apply(self, job: Job, step: o.Step, outcome: o.Outcome) -> FollowUp | None:
        """Apply ``outcome`` of ``step`` on ``job``; returns a step due at once, if any.

        Raises ``StoreError`` only when the worker stops while the database is away."""
        delay = 0.05
        while True:
            try:
                follow = self._apply(job, step, outcome)
            except StoreError as exc:
                self.health.failed(exc)
                if self.stop.wait(delay):
                    raise
                delay = min(delay * 2, defaults.DATABASE_RETRY_MAX_S)
                continue
            self.health.ok()
            return follow

    def _apply(self, job: Job, step: o.Step, out: o.Outcome) -> FollowUp | None:
        if step == "upload":
            self._tell_payment_gate(job, out)
        match out:
            case o.Hashed():
                return self._hashed(job, out)
            case o.Submitted():
                self._submitted(job, out)
            case o.Pending():
                self._pending(job, out)
            case o.Succeeded():
                return self._succeeded(job, out)
            case o.Placed():
                return self._placed(job, out)
            case o.Done():
                self._done(job, out)
            case o.Retry():
                self._retry(job, step, out)
            case o.Requeue():
                self._requeue(job, out.reason)
            case o.Fail():
                self._fail(job, out.reason)
            case o.Unsent():
                self._unsent(job, out)
            case o.Gated():
                self._gated(job, out)
        return None

    # ------------------------------------------------------------------ forward

    def _hashed(self, job: Job, out: o.Hashed) -> FollowUp | None:
        fields: dict[str, Any] = dict(sha256=out.sha256, fingerprint=out.fingerprint,
                                      dev=out.dev, ino=out.ino, ctime_ns=out.ctime_ns)  # fmt: skip
        if out.look_for_twin:
            identity = (out.dev, out.ino, out.ctime_ns)
            recorded, earlier = self.store.record_hash(
                job.id, out.sha256, out.fingerprint, identity=identity
            )
            if earlier is not None:
                return FollowUp("reuse", dataclasses.replace(job, **fields), earlier)
        else:
            recorded = self.store.update(job.id, S.QUEUED, node=None, lease_until=None, **fields)
        if recorded:
            self.board.news(True, self.mono())
        return None

    def _submitted(self, job: Job, out: o.Submitted) -> None:
        first = self.timing.poll_first_s
        fields: dict[str, Any] = dict(remote_id=out.remote_id, attempts=0, error=None,
                                      bytes_up=out.size, next_attempt_at=self.clock() + first)
        if out.uncertain:  # what was sent is not what was hashed: never reuse this result
            fields.update(sha256=None, fingerprint=None)
            log.warning("job.changed_while_sent", job_id=job.id, path=job.rel_path)
        moved = self.store.transition_durably(job.id, S.UPLOADING, S.PROCESSING, **fields)
        self.metrics.uploaded(out.size)
        if not moved:
            log.error("job.lost_remote_id", job_id=job.id, path=job.rel_path,
                      remote_id=out.remote_id)  # fmt: skip
            return
        self.board.hold(job.id, self.mono() + first)
        log.info("job.submitted", job_id=job.id, path=job.rel_path, remote_id=out.remote_id)

    def _pending(self, job: Job, out: o.Pending) -> None:
        polls, odd = self.board.count_poll(job.id, out.odd)
        if out.odd:
            log.warning("job.unexpected_status", job_id=job.id, path=job.rel_path,
                        status=out.raw, times=odd)  # fmt: skip
            if odd >= defaults.UNSEEN_STATUS_MAX_POLLS:
                self._fail(job, f"the engine kept answering {out.raw!r}")
                return
        wait = poll_interval(polls, self.timing, self.engine.max_poll_interval_s, self.rng)
        if self.store.update(job.id, S.PROCESSING, next_attempt_at=self.clock() + wait,
                             progress=out.progress, attempts=0):  # fmt: skip
            self.board.hold(job.id, self.mono() + wait)
        else:
            self.board.drop(job.id)

    def _succeeded(self, job: Job, out: o.Succeeded) -> FollowUp | None:
        ready: dict[str, Any] = dict(result_media_name=out.media_name, attempts=0,
                                     result_detections_name=out.detections_name,
                                     next_attempt_at=0.0, progress=None)  # fmt: skip
        if not self.store.transition(job.id, S.PROCESSING, S.DOWNLOADING, **ready):
            self.board.drop(job.id)
            return None
        self.board.hold(job.id, self.mono())
        return self._next_download(dataclasses.replace(job, state=S.DOWNLOADING, **ready))

    def _placed(self, job: Job, out: o.Placed) -> FollowUp | None:
        if out.part == "media":
            fields: dict[str, Any] = dict(output_media=str(out.path), output_sha256=out.sha256)
        else:
            fields = dict(output_detections=str(out.path))
        job = dataclasses.replace(job, **fields)
        step = download_step(job, self.detections_wanted(job))
        if step == "originals" and self.originals_kept(job):
            # The last part, and nothing to do to the original: done in the same transaction
            # (one of the 7 or 8 a job takes; scripts/bench, overhead row).
            self._done(job, o.Done(), placed=out, **fields)
            return None
        if not self.store.update(job.id, S.DOWNLOADING, attempts=0, error=None, **fields):
            self.board.drop(job.id)
            return None
        self._count_placed(job, out)
        return FollowUp(step, job)

    def _count_placed(self, job: Job, out: o.Placed) -> None:
        self.metrics.downloaded(out.size)
        if out.note:
            log.info("job.metadata", job_id=job.id, path=job.rel_path, detail=out.note)
        if self.gates.output.written():
            log.info("outputs.writable", detail="new uploads resume")

    def _next_download(self, job: Job) -> FollowUp:
        return FollowUp(download_step(job, self.detections_wanted(job)), job)

    def _done(
        self, job: Job, out: o.Done, placed: o.Placed | None = None, **placed_fields: Any
    ) -> None:
        fields: dict[str, Any] = dict(error=None, progress=None, **placed_fields)
        if out.media is not None:
            fields.update(output_media=str(out.media), output_sha256=out.media_sha256,
                          output_detections=str(out.detections) if out.detections else None)
        moved = self.store.transition(job.id, job.state, S.DONE, **fields)
        if moved and placed is not None:
            self._count_placed(job, placed)
        self.board.drop(job.id)
        self.originals_failing.discard(job.id)
        self._release(job)
        if moved:
            output = fields.get("output_media", job.output_media)
            log.info("job.done", job_id=job.id, path=job.rel_path, output=output,
                     reused_from=out.reused_from, original=out.note)  # fmt: skip

    # ------------------------------------------------------------------ back or out

    def _retry(self, job: Job, step: o.Step, out: o.Retry) -> None:
        attempts = job.attempts + 1
        if out.max_attempts is not None and attempts >= out.max_attempts:
            self._fail(job, f"{out.reason} ({attempts} times in a row; giving up)")
            return
        extra: dict[str, Any] = {}
        if out.double_charge:
            maybe_sent = (job.maybe_sent or 0) + 1
            log.warning("job.possible_double_charge", job_id=job.id, path=job.rel_path,
                        reason=out.reason, submits_that_may_exist=maybe_sent)  # fmt: skip
            if maybe_sent >= defaults.POSSIBLY_SUBMITTED_MAX:
                self._fail(job, f"{out.reason} ({maybe_sent} submits may each have created a "
                                "job; not sent again)")  # fmt: skip
                return
            extra["maybe_sent"] = maybe_sent
        now = self.mono()
        if out.output_blocked and self.gates.output.blocked(out.reason, now):
            log.error("outputs.blocked", detail=out.reason,
                      pause_uploads_s=self.timing.output_pause_s)  # fmt: skip
        if out.originals:
            self.originals_failing.add(job.id)
            self.metrics.originals_failed()
        delay = 0.0 if out.immediate else backoff(attempts, self.timing, self.rng,
                                                  out.retry_after_s)  # fmt: skip
        fields: dict[str, Any] = dict(attempts=attempts, error=out.reason,
                                      next_attempt_at=self.clock() + delay, **extra)
        if job.state is S.UPLOADING:
            moved = self.store.transition(job.id, S.UPLOADING, S.QUEUED, **fields)
            if moved:
                self.board.news(True, now + delay)
        elif job.state is S.QUEUED:
            moved = self.store.update(job.id, S.QUEUED, node=None, lease_until=None, **fields)
            if moved:
                self.board.news(job.sha256 is not None, now + delay)
        else:
            moved = self.store.update(job.id, job.state, **fields)
            if moved:
                self.board.hold(job.id, now + delay)
            else:
                self.board.drop(job.id)
        if moved:
            log.warning("job.retry", job_id=job.id, path=job.rel_path, step=step,
                        reason=out.reason, attempt=attempts, in_s=round(delay, 2))  # fmt: skip

    def _requeue(self, job: Job, reason: str) -> None:
        if job.requeues >= defaults.UNKNOWN_JOB_MAX_REQUEUES:
            self._fail(job, f"{reason}, {job.requeues + 1} times; giving up")
            return
        self.board.drop(job.id)
        self._release(job)
        if self.store.transition(job.id, job.state, S.QUEUED, remote_id=None,
                                 requeues=job.requeues + 1, next_attempt_at=0.0, error=reason,
                                 attempts=0):  # fmt: skip
            self.board.news(job.sha256 is not None, self.mono())
            log.warning("job.requeued", job_id=job.id, path=job.rel_path, reason=reason,
                        requeues=job.requeues + 1)  # fmt: skip

    def _fail(self, job: Job, reason: str) -> None:
        self.board.drop(job.id)
        self.originals_failing.discard(job.id)
        self._release(job)
        if self.store.transition(job.id, job.state, S.FAILED, error=reason, progress=None):
            log.error("job.failed", job_id=job.id, path=job.rel_path, reason=reason)

    def _unsent(self, job: Job, out: o.Unsent) -> None:
        fields: dict[str, Any] = dict(next_attempt_at=self.clock() + out.delay_s)
        if out.rehash:
            fields.update(sha256=None, fingerprint=None, error=out.reason)
        if self.store.transition(job.id, S.UPLOADING, S.QUEUED, **fields):
            self.board.news(not out.rehash, self.mono() + out.delay_s)
            if out.rehash:
                log.info("job.rehash", job_id=job.id, path=job.rel_path, reason=out.reason)

    def _gated(self, job: Job, out: o.Gated) -> None:
        now = self.mono()
        if out.gate == "auth":
            if self.gates.auth.is_open():
                log.error("engine.paused", reason="bad credentials", detail=out.reason)
            self.gates.auth.closed(out.reason, now)
        if job.state is S.UPLOADING:
            if self.store.transition(job.id, S.UPLOADING, S.QUEUED, next_attempt_at=0.0):
                self.board.news(True, now)
        else:  # due again as soon as the gate lets engine steps through
            self.board.hold(job.id, now)

    # ------------------------------------------------------------------ gates and engine

    def _tell_payment_gate(self, job: Job, out: o.Outcome) -> None:
        gate, now = self.gates.payment, self.mono()
        if isinstance(out, o.Submitted):
            if gate.accepted(job.id):
                log.info("engine.resumed", reason="an upload was accepted again")
        elif isinstance(out, o.Gated) and out.gate == "payment":
            if gate.refused(out.reason, now):
                log.error("engine.paused", reason="payment required (402)", detail=out.reason,
                          probe_every_s=self.timing.payment_probe_s)  # fmt: skip
        else:
            gate.ended_otherwise(job.id, now)

    def _release(self, job: Job) -> None:
        """The engine may drop what it keeps for this job (the local engine's work folder)."""
        if job.remote_id is None:
            return
        try:
            self.engine.release(job.remote_id)
        except Exception as exc:
            log.warning("job.release_failed", job_id=job.id, path=job.rel_path, error=str(exc))

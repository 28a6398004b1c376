"""The worker: queued jobs -> engine.submit -> poll -> fetch -> writer -> done.

One scheduler thread looks at the jobs table and hands due steps to small thread pools; every
step is a function of one job that reads the row, talks to the engine or the disk with no
transaction open, and records the outcome with a conditional transition. The engine's errors
decide what happens next (DESIGN.md section 6): transient ones are retried with capped
exponential backoff and jitter, permanent ones fail the job with one sentence, bad credentials
pause all engine work, a 402 pauses new uploads only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import queue
import random
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import structlog

from blurd import defaults, writer
from blurd.config import WatchConfig
from blurd.engines.base import Engine, Phase, RemoteStatus
from blurd.errors import (
    ApiError,
    AuthError,
    PaymentRequired,
    PermanentApiError,
    RejectedInput,
    TransientApiError,
    UnknownJob,
)
from blurd.metrics import Metrics
from blurd.models import Job, JobState
from blurd.store import Store

log = structlog.get_logger("blurd.worker")
S = JobState
_HASH_CHUNK_BYTES = 1024 * 1024
_KNOWN_PENDING = frozenset({"", "sent", "started", "retried", "queued", "running", "pending"})


@dataclass(frozen=True)
class Timing:
    """Retry and polling delays, in seconds. Tests pass a fast one."""

    backoff_base_s: float = defaults.BACKOFF_BASE_S
    backoff_cap_s: float = defaults.BACKOFF_CAP_S
    poll_first_s: float = defaults.POLL_FIRST_S
    poll_max_s: float = defaults.POLL_MAX_S
    poll_growth: float = defaults.POLL_GROWTH
    auth_retry_first_s: float = 30.0
    auth_retry_max_s: float = defaults.AUTH_RETRY_S
    payment_probe_s: float = defaults.PAYMENT_PROBE_S
    idle_wait_max_s: float = 5.0
    queue_look_s: float = defaults.QUEUE_LOOK_S


def backoff(
    attempt: int, timing: Timing, rng: Callable[[], float], retry_after: float | None
) -> float:
    """Exponential with jitter in [d/2, d], capped; never shorter than a Retry-After."""
    d: float = min(timing.backoff_cap_s, timing.backoff_base_s * 2.0 ** max(0, attempt - 1))
    delay = d / 2 + rng() * d / 2
    if retry_after is not None:
        delay = max(delay, min(retry_after, 3600.0))
    return delay


_T = TypeVar("_T")
_Step = Callable[[Job], None]
_Runner = Callable[[_Step, Job], None]


class _Pool:
    """A few daemon threads taking (function, job) pairs: a stuck call never blocks exit."""

    def __init__(
        self, name: str, size: int, run: Callable[[Callable[[Job], None], Job], None]
    ) -> None:
        self.q: queue.Queue[tuple[Callable[[Job], None], Job] | None] = queue.Queue()
        self.size = size
        self.threads = [
            threading.Thread(target=self._loop, args=(run,), name=f"{name}-{i}", daemon=True)
            for i in range(size)
        ]
        for t in self.threads:
            t.start()

    def _loop(self, run: _Runner) -> None:
        while (item := self.q.get()) is not None:
            run(*item)

    def put(self, fn: Callable[[Job], None], job: Job) -> None:
        self.q.put((fn, job))

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)


class _HashingWriter:
    """Passes writes through to a file and hashes them on the way."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def rejection(
    path: Path, supported: frozenset[str], version: tuple[int, int] | None = None
) -> str | None:
    """Why ``path`` must not be sent to an engine, in one sentence; None when it may be.

    ``version`` is the (size, mtime_ns) the file had when it was queued, if it was.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "the file disappeared before it could be uploaded"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link; blurd never follows links"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if version is not None and (st.st_size, st.st_mtime_ns) != version:
        return "changed after it was queued; its new version is queued on its own"
    if st.st_size == 0:
        return "is empty"
    ext = path.suffix.lower()
    if ext not in supported:
        allowed = " ".join(sorted(supported))
        return f"has an unsupported extension {ext or '(none)'} (supported: {allowed})"
    if st.st_size > defaults.MAX_INPUT_BYTES:
        return f"is larger than the {defaults.MAX_INPUT_BYTES // 1024**3} GiB upload limit"
    if not os.access(path, os.R_OK):
        return "cannot be read: permission denied"
    return None


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


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
        rng: Callable[[], float] = random.random,
        io_threads: int = 4,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.watches = {w.name: w for w in watches}
        self.max_uploads = max_uploads
        self.max_in_flight = max_in_flight
        self.timing = timing or Timing()
        self.clock = clock
        self.rng = rng
        self.io_threads = io_threads
        self.metrics = metrics or Metrics()
        self.wake_event = threading.Event()
        self._lock = threading.Lock()
        # Steps queued or running, per job. A count, not a set: a step can release its job
        # (a prepare hands the hashed job back to the queue) a moment before it ends, and the
        # next step of that job may be handed out in that moment.
        self._busy: dict[int, int] = {}
        self._uploads = 0  # upload steps queued or running
        self._prepares = 0  # prepare steps queued or running
        self._leases_due_at = 0.0
        self._held: dict[int, float] = {}  # jobs at the engine held by this node -> due time
        # When a claim of queued jobs (hashed: True, not yet: False) may next find one. A claim
        # that comes back short sets it from the queue's next due time; news that the queue may
        # have changed (see _queue_news) brings it forward. Between the two the queue is not
        # asked, so a node with nothing to claim costs no statement per tick.
        self._claimable_at: dict[bool, float] = {False: 0.0, True: 0.0}
        self._news = 0  # counts _queue_news() calls: a claim's look is stale if it moved
        self._stopping = False
        self._polls: dict[int, int] = {}  # polls so far per job, for the poll interval
        self._odd_polls: dict[int, int] = {}  # consecutive unexpected statuses per job
        self.auth_paused_until: float | None = None
        self._auth_delay = self.timing.auth_retry_first_s
        self._auth_probing = False
        self.auth_error: str | None = None
        self.payment_paused_until: float | None = None
        self._payment_probe: int | None = None
        self._upload_pool: _Pool | None = None
        self._io_pool: _Pool | None = None

    # ------------------------------------------------------------------ public

    def set_watches(self, watches: list[WatchConfig]) -> None:
        self.watches = {w.name: w for w in watches}

    def wake(self) -> None:
        """Something outside the worker may have queued jobs (the watcher, a restart of the
        watches): look at the queue at once."""
        self._queue_news(False)
        self._queue_news(True)

    def busy(self) -> int:
        with self._lock:
            return len(self._busy)

    def state(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "auth": "paused: " + (self.auth_error or "") if self.auth_paused_until else "ok",
            "uploads_paused": bool(self.payment_paused_until),
            "uploads_paused_for_s": max(0.0, (self.payment_paused_until or now) - now),
        }

    def run(self, stop: threading.Event, grace_s: float = 10.0) -> None:
        """Schedule steps until ``stop`` is set, then let running steps finish (bounded)."""
        self._upload_pool = _Pool("upload", self.max_uploads, self._run_step)
        self._io_pool = _Pool("io", self.io_threads, self._run_step)
        try:
            while not stop.is_set():
                try:
                    wait = self.tick()
                except Exception:
                    log.exception("worker.error")
                    wait = 5.0
                if self.wake_event.wait(wait):
                    # Steps end in bursts; let them share one tick (a tick costs a few
                    # queries, and every finished step asks for one).
                    stop.wait(defaults.TICK_BATCH_S)
                self.wake_event.clear()
        finally:
            self._stopping = True
            self._upload_pool.close()
            self._io_pool.close()
            deadline = time.monotonic() + grace_s
            while self.busy() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.busy():
                log.warning("worker.stopped_with_steps_running", steps=self.busy())
            try:
                self.store.release_all()
            except Exception as exc:  # the database is gone: the holds lapse with the lease
                log.warning("worker.release_failed", error=str(exc))

    def tick(self) -> float:
        """Hand out every due step; return how long the scheduler may sleep.

        Jobs at the engine that this node holds are scheduled from memory (``_held``: their
        due times, kept as each step records its outcome, and read again from the database
        with every lease renewal); their rows are read only when one is due. Queued jobs are
        claimed from the database, and only while there is room to start them: a backlog
        waiting for upload room costs no query until a step ends and makes room.
        """
        assert self._upload_pool is not None and self._io_pool is not None
        now = self.clock()
        api_ok = self._api_available(now)
        if now >= self._leases_due_at:
            self._keep_leases(now)
        if api_ok:
            self._dispatch_engine_steps(now)
        with self._lock:
            # Claim only what the pool will start soon: the rest stays free for other nodes.
            want = 2 * self.io_threads - self._prepares
        hash_more = self._claim(now, want, prepared=False)
        room = self._upload_room(now) if api_ok else 0  # only this thread claims uploads
        upload_more = self._claim(now, room, prepared=True)
        if hash_more or upload_more:
            return defaults.TICK_BATCH_S  # more is due than there was room for this time
        return self._wait_hint(now, hashing=want > 0, uploading=room > 0)

    def _dispatch_engine_steps(self, now: float) -> None:
        assert self._io_pool is not None
        with self._lock:
            due = [i for i, at in self._held.items() if at <= now and i not in self._busy][:100]
        rows = self.store.get_many(due)
        for job_id in set(due) - {j.id for j in rows}:
            self._drop(job_id)  # deleted from the database by hand
        for job in rows:
            if job.node != self.store.node or job.state not in (S.PROCESSING, S.DOWNLOADING):
                self._drop(job.id)  # taken over by another node, or moved on
            elif job.next_attempt_at > now:
                self._hold(job.id, job.next_attempt_at)
            elif job.state is S.PROCESSING:
                self._dispatch(self._io_pool, self._poll, job)
            else:
                self._dispatch(self._io_pool, self._download, job)

    def _upload_room(self, now: float) -> int:
        if not self._uploads_allowed(now):
            return 0
        with self._lock:
            # Claimed ahead: twice as many uploads wait in the pool's queue as it has threads,
            # so a thread that finishes one starts the next at once, without a claim of its own
            # (which cost a fifth of an upload thread's time) or a wait for the next tick (with
            # only as many waiting as threads, the threads still idled 30 % of the time).
            slots = 3 * self.max_uploads - self._uploads
            room = min(slots, self.max_in_flight - len(self._held) - self._uploads)
        if self.payment_paused_until is not None:
            room = min(room, 1) if self._payment_probe is None else 0
        return room

    def _claim(self, now: float, limit: int, *, prepared: bool) -> bool:
        """Claim up to ``limit`` queued jobs and hand each to its step: a hash, or an upload.

        True when the claim was full (more may be due). The queue is asked only once a job may
        be claimable (``_claimable_at``); a short claim looks up when the next one is due.
        """
        assert self._io_pool is not None and self._upload_pool is not None
        with self._lock:
            if limit <= 0 or now < self._claimable_at[prepared]:
                return False
            news = self._news
        claimed = self.store.claim(now, limit, prepared=prepared)
        if len(claimed) < limit:
            due = self.store.next_queued_at(now, prepared=prepared)
            # Nothing due now: the next due job, or another look soon (other nodes and `blurd
            # retry` queue jobs without telling this node). Something due that could not be
            # claimed is being claimed by another node: look again next tick.
            if due is None or due > now:
                due = min(due or math.inf, now + self.timing.queue_look_s)
            with self._lock:
                if self._news == news:  # else news came meanwhile: keep what it set
                    self._claimable_at[prepared] = due
        for job in claimed:
            if not prepared:
                with self._lock:
                    self._prepares += 1
                self._dispatch(self._io_pool, self._prepare, job)
                continue
            if self.payment_paused_until is not None:
                self._payment_probe = job.id
                log.info("engine.probe", job_id=job.id, path=job.rel_path, reason="402")
            with self._lock:
                self._uploads += 1
            self._dispatch(self._upload_pool, self._upload, job)
        return len(claimed) == limit

    def _queue_news(self, prepared: bool, at: float = 0.0) -> None:
        """A job became claimable (hashed or not) at ``at``: the next claim asks the queue."""
        with self._lock:
            self._news += 1
            self._claimable_at[prepared] = min(self._claimable_at[prepared], at)
        self.wake_event.set()

    def _hold(self, job_id: int, due_at: float) -> None:
        """This node holds the job at the engine; its next step is due at ``due_at``."""
        with self._lock:
            self._held[job_id] = due_at

    def _drop(self, job_id: int) -> None:
        with self._lock:
            self._held.pop(job_id, None)

    # ------------------------------------------------------------------ scheduling

    def _engine_call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Call the engine; count every error it raises by HTTP status ("none": no reply)."""
        try:
            return fn(*args)
        except ApiError as exc:
            self.metrics.api_error(exc.status)
            raise

    def _keep_leases(self, now: float) -> None:
        """Renew the leases of this node's jobs; adopt those of nodes whose lease ran out."""
        self._leases_due_at = now + self.store.lease_s / 4
        self.store.renew_leases(now)
        keeps = self.engine.keeps_jobs_across_restarts
        adopted = self.store.take_over(now, keeps_remote_jobs=keeps)
        if any(adopted.values()):
            log.warning("jobs.taken_over", reason="their node's lease ran out", **adopted)
            self.wake()  # requeued uploads and orphans are claimable
        held = self.store.held_at_engine()
        with self._lock:
            # The database is the truth: adopted jobs join, jobs another node took leave.
            # A job with a step running keeps the time that step will record.
            busy = {i: self._held[i] for i in self._busy if i in self._held}
            self._held = {**held, **busy}

    def _busy_now(self) -> set[int]:
        with self._lock:
            return set(self._busy)

    def _dispatch(self, pool: _Pool, fn: Callable[[Job], None], job: Job) -> None:
        with self._lock:
            self._busy[job.id] = self._busy.get(job.id, 0) + 1
        pool.put(fn, job)

    def _run_step(self, fn: Callable[[Job], None], job: Job) -> None:
        try:
            fn(job)
        except Exception as exc:
            # A bug or an unexpected error: retry the step later, from wherever the job got
            # to; a job caught mid-upload goes back to the queue, never stays `uploading`.
            log.exception("job.step_error", job_id=job.id, path=job.rel_path, step=fn.__name__)
            fresh = self.store.get(job.id) or job
            back = S.QUEUED if fresh.state is S.UPLOADING else None
            self._retry_later(fresh, fresh.state, f"{type(exc).__name__}: {exc}", None, to=back)
        finally:
            with self._lock:
                left = self._busy.pop(job.id, 1) - 1
                if left:
                    self._busy[job.id] = left
                if fn == self._upload:
                    self._uploads -= 1
                elif fn == self._prepare:
                    self._prepares -= 1
            self.wake_event.set()

    def _wait_hint(self, now: float, *, hashing: bool, uploading: bool) -> float:
        """Until the next step is due: a held job's, or a queued job's this node has room for
        (a full pool is woken by its next finished step instead)."""
        wait = min(self.timing.idle_wait_max_s, max(0.0, self._leases_due_at - now))
        with self._lock:
            waiting = [at for i, at in self._held.items() if i not in self._busy]
            waiting += [self._claimable_at[p] for p, room in ((False, hashing), (True, uploading))
                        if room]  # fmt: skip
        if waiting:
            wait = min(wait, max(0.0, min(waiting) - now))
        for until in (self.auth_paused_until, self.payment_paused_until):
            if until is not None:
                wait = min(wait, max(0.05, until - now))
        return max(wait, defaults.TICK_BATCH_S)

    def _api_available(self, now: float) -> bool:
        if self.auth_paused_until is None:
            return True
        if now >= self.auth_paused_until and not self._auth_probing:
            self._auth_probing = True
            threading.Thread(target=self._probe_login, name="auth-probe", daemon=True).start()
        return False

    def _probe_login(self) -> None:
        try:
            self.engine.check()
        except AuthError as exc:
            self._pause_auth(str(exc), again=True)
        except Exception as exc:
            self._pause_auth(f"login probe failed: {exc}", again=True)
        else:
            log.info("engine.resumed", reason="login succeeded")
            self.auth_paused_until = None
            self.auth_error = None
            self._auth_delay = self.timing.auth_retry_first_s
        finally:
            self._auth_probing = False
            self.wake_event.set()

    def _pause_auth(self, message: str, *, again: bool = False) -> None:
        if self.auth_paused_until is None or again:
            if self.auth_paused_until is None:
                log.error("engine.paused", reason="bad credentials", detail=message)
            else:
                self._auth_delay = min(self._auth_delay * 2, self.timing.auth_retry_max_s)
            self.auth_error = message
            self.auth_paused_until = self.clock() + self._auth_delay

    def _may_send(self, job: Job) -> bool:
        if self.auth_paused_until is not None:
            return False
        return self.payment_paused_until is None or self._payment_probe == job.id

    def _uploads_allowed(self, now: float) -> bool:
        if self.payment_paused_until is None:
            return True
        return now >= self.payment_paused_until

    # ------------------------------------------------------------------ steps

    def _source(self, job: Job) -> tuple[WatchConfig, Path]:
        watch = self.watches.get(job.watch)
        if watch is None:
            raise RejectedInput(f"the watch folder {job.watch} is no longer configured")
        return watch, watch.path / job.rel_path

    def _prepare(self, job: Job) -> None:
        """Reject what cannot be sent, hash the file, reuse an identical earlier result."""
        try:
            watch, path = self._source(job)
            reason = self._rejection(job, path)
            sha = file_sha256(path) if reason is None else ""
        except RejectedInput as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"cannot be read: {exc.strerror or exc}"
        if reason is not None:
            self._fail(job, S.QUEUED, reason)
            return
        fingerprint = watch.options.fingerprint(self.engine.name)
        # Hashed, the job goes back to everyone, so that any node with room may upload it,
        # unless an identical result can be reused: the look and the release are one
        # transaction (released before the look, it could be uploaded meanwhile).
        recorded, earlier = self.store.record_hash(job.id, sha, fingerprint)
        if earlier is not None:
            if self._reuse(job, watch, path, earlier, sha, fingerprint):
                return
            recorded = self.store.update(
                job.id, S.QUEUED, sha256=sha, fingerprint=fingerprint, node=None, lease_until=None
            )
        if recorded:
            self._queue_news(True, job.next_attempt_at)

    def _rejection(self, job: Job, path: Path) -> str | None:
        return rejection(path, self.engine.supported_extensions, (job.size, job.mtime_ns))

    def _reuse(
        self, job: Job, watch: WatchConfig, path: Path, earlier: Job, sha: str, fingerprint: str
    ) -> bool:
        """Copy the outputs of an identical earlier job, if they still exist unchanged."""
        assert earlier.output_media is not None
        media = Path(earlier.output_media)
        try:
            if not media.is_file() or file_sha256(media) != earlier.output_sha256:
                return False
            target = writer.media_target(watch.output, job.rel_path, media.name)
            placed, _ = writer.place_bytes_from(lambda out: _copy_into(media, out), target)
            placed_json: Path | None = None
            if watch.options.detections and earlier.output_detections:
                src_json = Path(earlier.output_detections)
                if src_json.is_file():
                    placed_json, _ = writer.place_bytes_from(
                        lambda out: _copy_into(src_json, out),
                        writer.detections_target(watch.output, job.rel_path),
                    )
        except OSError as exc:
            log.warning("job.reuse_failed", job_id=job.id, path=job.rel_path, error=str(exc))
            return False
        self.store.update(job.id, S.QUEUED, sha256=sha, fingerprint=fingerprint)
        self._finish(job, S.QUEUED, watch, path, placed, placed_json, earlier.output_sha256,
                     reused_from=earlier.id)  # fmt: skip
        return True

    def _upload(self, job: Job) -> None:
        """Upload a job that the claim moved to ``uploading``; store its remote id at once."""
        if self._stopping or not self._may_send(job):
            # Claimed ahead, but the daemon is stopping or the engine refuses uploads now (bad
            # credentials, a 402 and this job is not the probe).
            self._unsent(job)
            return
        watch, path = self._source(job)
        log.info("job.uploading", job_id=job.id, path=job.rel_path, size=job.size)
        try:
            reason = self._rejection(job, path)
            if reason is not None:
                self._fail(job, S.UPLOADING, reason)
                return
            remote_id = self._engine_call(self.engine.submit, path, watch.options)
        except PaymentRequired as exc:
            self._on_payment_required(job, str(exc))
            return
        except AuthError as exc:
            self._pause_auth(str(exc))
            self._unsent(job)
            return
        except TransientApiError as exc:
            self._retry_later(job, S.UPLOADING, str(exc), exc.retry_after_s, to=S.QUEUED)
            return
        except (PermanentApiError, RejectedInput) as exc:
            self._fail(job, S.UPLOADING, str(exc))
            return
        except OSError as exc:
            self._fail(job, S.UPLOADING, f"cannot be read: {exc.strerror or exc}")
            return
        # Store the remote id before anything else can happen: a crash from here on resumes
        # by polling this id, never by uploading again.
        first_poll = self.clock() + self.timing.poll_first_s
        moved = self.store.transition_durably(
            job.id,
            S.UPLOADING,
            S.PROCESSING,
            remote_id=remote_id,
            attempts=0,
            error=None,
            bytes_up=job.size,
            next_attempt_at=first_poll,
        )
        self.metrics.uploaded(job.size)
        if moved:
            self._hold(job.id, first_poll)
        else:
            log.error("job.lost_remote_id", job_id=job.id, path=job.rel_path, remote_id=remote_id)
            return
        if self._payment_probe == job.id:
            log.info("engine.resumed", reason="an upload was accepted again")
            self.payment_paused_until = None
            self._payment_probe = None
        log.info("job.submitted", job_id=job.id, path=job.rel_path, remote_id=remote_id)

    def _on_payment_required(self, job: Job, message: str) -> None:
        if self.payment_paused_until is None:
            log.error(
                "engine.paused",
                reason="payment required (402)",
                detail=message,
                probe_every_s=self.timing.payment_probe_s,
            )
        self.payment_paused_until = self.clock() + self.timing.payment_probe_s
        self._payment_probe = None
        self._unsent(job)

    def _unsent(self, job: Job) -> None:
        """An upload that was not sent goes back to the queue, due at once (no retry delay)."""
        if self.store.transition(job.id, S.UPLOADING, S.QUEUED, next_attempt_at=0.0):
            self._queue_news(True)

    def _poll(self, job: Job) -> None:
        assert job.remote_id is not None
        try:
            status = self._engine_call(self.engine.poll, job.remote_id)
        except UnknownJob:
            status = RemoteStatus(Phase.UNKNOWN)
        except AuthError as exc:
            self._pause_auth(str(exc))
            return
        except (TransientApiError, PaymentRequired) as exc:
            retry_after = exc.retry_after_s if isinstance(exc, TransientApiError) else None
            self._retry_later(job, S.PROCESSING, str(exc), retry_after)
            return
        if status.phase is Phase.PENDING:
            self._schedule_next_poll(job, status)
        elif status.phase is Phase.SUCCEEDED:
            self._forget(job.id)
            ready: dict[str, Any] = dict(
                result_media_name=status.media_name,
                result_detections_name=status.detections_name,
                attempts=0,
                next_attempt_at=0.0,
                progress=None,
            )
            if self.store.transition(job.id, S.PROCESSING, S.DOWNLOADING, **ready):
                self._download(dataclasses.replace(job, state=S.DOWNLOADING, **ready))
            else:
                self._drop(job.id)
        elif status.phase is Phase.FAILED:
            self._fail(job, S.PROCESSING, status.error or f"the engine reported {status.raw}")
        else:
            self._requeue(job, S.PROCESSING, "the engine no longer knows this job")

    def _schedule_next_poll(self, job: Job, status: RemoteStatus) -> None:
        n = self._polls.get(job.id, 0) + 1
        self._polls[job.id] = n
        if status.raw.lower() not in _KNOWN_PENDING and not status.progress:
            odd = self._odd_polls.get(job.id, 0) + 1
            self._odd_polls[job.id] = odd
            log.warning(
                "job.unexpected_status",
                job_id=job.id,
                path=job.rel_path,
                status=status.raw,
                times=odd,
            )
            if odd >= defaults.UNSEEN_STATUS_MAX_POLLS:
                self._fail(job, S.PROCESSING, f"the engine kept answering {status.raw!r}")
                return
        t = self.timing
        cap = min(t.poll_max_s, self.engine.max_poll_interval_s or t.poll_max_s)
        interval = min(cap, t.poll_first_s * t.poll_growth ** (n - 1))
        # Jitter only ever delays a poll: polling a job before its scheduled time finds it
        # unfinished more often, and the next poll is then a whole (longer) interval away.
        interval *= 1.0 + 0.25 * self.rng()
        due = self.clock() + interval
        if self.store.update(
            job.id, S.PROCESSING, next_attempt_at=due, progress=status.progress, attempts=0
        ):
            self._hold(job.id, due)
        else:
            self._drop(job.id)

    def _download(self, job: Job) -> None:
        watch, path = self._source(job)
        assert job.remote_id is not None
        remote_id = job.remote_id
        status = RemoteStatus(
            Phase.SUCCEEDED,
            media_name=job.result_media_name,
            detections_name=job.result_detections_name,
        )
        try:
            media_target = writer.media_target(watch.output, job.rel_path, job.result_media_name)
            hasher: list[_HashingWriter] = []

            def fetch_media(out: BinaryIO) -> int:
                hasher.append(_HashingWriter(out))
                out_ = cast(BinaryIO, hasher[-1])
                return self._engine_call(self.engine.fetch, remote_id, status, "media", out_)

            detections: Path | None = None
            both = bool(watch.options.detections and job.result_detections_name)
            # Both files go into one folder: its fsync, after the second, covers both names.
            media, size = writer.place_bytes_from(fetch_media, media_target, sync_folder=not both)
            if both:
                detections, _ = writer.place_bytes_from(
                    lambda out: self._engine_call(
                        self.engine.fetch, remote_id, status, "detections", out
                    ),
                    writer.detections_target(watch.output, job.rel_path),
                )
                if detections.parent != media.parent:
                    writer.sync_folder(media.parent)
        except UnknownJob:
            self._requeue(job, S.DOWNLOADING, "the result is no longer available")
            return
        except AuthError as exc:
            self._pause_auth(str(exc))
            return
        except TransientApiError as exc:
            # A truncated or broken transfer is fetched again at once, then with backoff.
            retry_after = exc.retry_after_s if job.attempts else 0.0
            self._retry_later(job, S.DOWNLOADING, str(exc), retry_after, immediate=not job.attempts)
            return
        except (PermanentApiError, RejectedInput) as exc:
            self._fail(job, S.DOWNLOADING, str(exc))
            return
        except OSError as exc:
            # The output folder is not writable, full or gone: wait, lose nothing.
            self._retry_later(job, S.DOWNLOADING, f"cannot write the output: {exc}", None)
            return
        self._finish(job, S.DOWNLOADING, watch, path, media, detections,
                     hasher[0].sha.hexdigest(), bytes=size)  # fmt: skip
        self.metrics.downloaded(size)
        try:
            self.engine.release(job.remote_id)
        except Exception as exc:
            log.warning("job.release_failed", job_id=job.id, path=job.rel_path, error=str(exc))

    # ------------------------------------------------------------------ outcomes

    def _finish(
        self,
        job: Job,
        state: JobState,
        watch: WatchConfig,
        source: Path,
        media: Path,
        detections: Path | None,
        media_sha256: str | None,
        **context: Any,
    ) -> None:
        """Outputs are durably in place: apply the originals policy, then mark the job done."""
        self._drop(job.id)
        self._apply_originals(job, watch, source)
        if self.store.transition(
            job.id,
            state,
            S.DONE,
            output_media=str(media),
            output_detections=str(detections) if detections else None,
            output_sha256=media_sha256,
            error=None,
            progress=None,
        ):
            log.info("job.done", job_id=job.id, path=job.rel_path, output=str(media), **context)

    def _apply_originals(self, job: Job, watch: WatchConfig, path: Path) -> None:
        if watch.originals == "keep":
            return
        try:
            moved = writer.apply_originals(watch.originals, path, job.rel_path, watch.archive)
        except FileNotFoundError:
            return  # already moved or deleted (say, just before a crash)
        except OSError as exc:
            log.warning(
                "job.originals_failed",
                job_id=job.id,
                path=job.rel_path,
                policy=watch.originals,
                error=str(exc),
            )
            return
        log.info(
            "job.original",
            job_id=job.id,
            path=job.rel_path,
            policy=watch.originals,
            archived=str(moved) if moved else None,
        )

    def _fail(self, job: Job, state: JobState, reason: str) -> None:
        self._forget(job.id)
        self._drop(job.id)
        if self.store.transition(job.id, state, S.FAILED, error=reason, progress=None):
            log.error("job.failed", job_id=job.id, path=job.rel_path, reason=reason)

    def _forget(self, job_id: int) -> None:
        self._polls.pop(job_id, None)
        self._odd_polls.pop(job_id, None)

    def _requeue(self, job: Job, state: JobState, reason: str) -> None:
        self._forget(job.id)
        self._drop(job.id)
        if job.requeues >= defaults.UNKNOWN_JOB_MAX_REQUEUES:
            self._fail(job, state, f"{reason}, {job.requeues + 1} times; giving up")
            return
        if self.store.transition(
            job.id, state, S.QUEUED, remote_id=None, requeues=job.requeues + 1,
            next_attempt_at=0.0, error=reason, attempts=0,
        ):  # fmt: skip
            self._queue_news(True)  # the content is hashed already: it waits for an upload
            log.warning(
                "job.requeued",
                job_id=job.id,
                path=job.rel_path,
                reason=reason,
                requeues=job.requeues + 1,
            )

    def _retry_later(
        self,
        job: Job,
        state: JobState,
        reason: str,
        retry_after: float | None,
        *,
        to: JobState | None = None,
        immediate: bool = False,
    ) -> None:
        attempts = job.attempts + 1
        delay = 0.0 if immediate else backoff(attempts, self.timing, self.rng, retry_after)
        fields: dict[str, Any] = dict(
            attempts=attempts, error=reason, next_attempt_at=self.clock() + delay
        )
        if to is None or to == state:
            if state is S.QUEUED:  # a queued job waits for its retry held by nobody
                fields.update(node=None, lease_until=None)
            moved = self.store.update(job.id, state, **fields)
        else:
            moved = self.store.transition(job.id, state, to, **fields)
        if moved and (to or state) in (S.PROCESSING, S.DOWNLOADING):
            self._hold(job.id, fields["next_attempt_at"])
        else:
            self._drop(job.id)
            if moved:  # back in the queue, due again after the delay
                self._queue_news(job.sha256 is not None, fields["next_attempt_at"])
        if moved:
            log.warning(
                "job.retry",
                job_id=job.id,
                path=job.rel_path,
                step=str(state),
                reason=reason,
                attempt=attempts,
                in_s=round(delay, 2),
            )


def _copy_into(src: Path, out: BinaryIO) -> int:
    n = 0
    with open(src, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            out.write(chunk)
            n += len(chunk)
    return n

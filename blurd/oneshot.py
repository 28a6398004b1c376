"""`blurd anonymize FILE…`: the daemon's steps, for a few files, now.

No daemon and no jobs table: each file goes through the worker's steps (``worker.steps``) in
turn, with the outcomes applied here in memory: retries back off as in the daemon (bounded),
anything that would wait for a gate or the queue ends the file with its reason. Originals are
never touched.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from blurd.config import WatchConfig
from blurd.engines.base import Engine
from blurd.errors import BlurdError
from blurd.metrics import Metrics
from blurd.models import Job, JobState
from blurd.options import Options
from blurd.worker import outcomes as o
from blurd.worker.steps import Steps, download_step
from blurd.worker.timing import Timing, backoff, poll_interval

MAX_TRANSIENT_RETRIES = 8


@dataclass
class Outcome:
    source: Path
    output: Path | None = None
    detections: Path | None = None
    error: str | None = None


class Progress(Protocol):
    """What the command line shows while files go through."""

    def step(self, source: Path, what: str) -> None: ...

    def done(self, outcome: Outcome) -> None: ...


class _Silent:
    def step(self, source: Path, what: str) -> None:
        pass

    def done(self, outcome: Outcome) -> None:
        pass


def anonymize(
    files: Iterable[Path],
    out_dir: Path,
    engine: Engine,
    options: Options,
    *,
    progress: Progress | None = None,
    timing: Timing | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Outcome]:
    progress = progress or _Silent()
    timing = timing or Timing()
    outcomes = []
    for source in files:
        try:
            outcome = _one(source, out_dir, engine, options, progress, timing, sleep)
        except (BlurdError, OSError) as exc:
            outcome = Outcome(source, error=str(exc))
        progress.done(outcome)
        outcomes.append(outcome)
    return outcomes


def _job(source: Path, watch: WatchConfig) -> Job:
    st = os.lstat(source)
    now = time.time()
    return Job(
        id=0, watch=watch.name, rel_path=source.name, size=st.st_size, mtime_ns=st.st_mtime_ns,
        sha256=None, fingerprint=None, state=JobState.QUEUED, remote_id=None, attempts=0,
        requeues=0, next_attempt_at=0.0, error=None, progress=None, result_media_name=None,
        result_detections_name=None, output_media=None, output_detections=None,
        output_sha256=None, bytes_up=0, created_at=now, updated_at=now,
    )  # fmt: skip


def _one(
    source: Path,
    out_dir: Path,
    engine: Engine,
    options: Options,
    progress: Progress,
    timing: Timing,
    sleep: Callable[[float], None],
) -> Outcome:
    watch = WatchConfig(path=source.parent, output=out_dir, options=options)
    steps = Steps(engine, lambda: {watch.name: watch}, timing, Metrics())
    try:
        job = _job(source, watch)
    except FileNotFoundError:
        return Outcome(source, error="the file disappeared before it could be uploaded")
    step: o.Step = "prepare"
    retries = polls = 0
    words = {"prepare": "checking", "upload": "uploading", "media": "downloading"}
    while True:
        if step in words:
            progress.step(source, words[step])
        out = steps.run(step, job)
        match out:
            case o.Hashed():
                job = dataclasses.replace(job, sha256=out.sha256, dev=out.dev, ino=out.ino,
                                          ctime_ns=out.ctime_ns)  # fmt: skip
                step = "upload"
            case o.Submitted():
                job, step, polls = dataclasses.replace(job, remote_id=out.remote_id), "poll", 0
                progress.step(source, "processing")
            case o.Pending():
                polls += 1
                if out.progress:
                    progress.step(source, f"processing {out.progress}")
                sleep(poll_interval(polls, timing, engine.max_poll_interval_s, random.random))
            case o.Succeeded():
                job = dataclasses.replace(job, result_media_name=out.media_name,
                                          result_detections_name=out.detections_name)
                step = download_step(job, options.detections)
            case o.Placed():
                if out.part == "media":
                    job = dataclasses.replace(job, output_media=str(out.path))
                else:
                    job = dataclasses.replace(job, output_detections=str(out.path))
                step = download_step(job, options.detections)
            case o.Done():
                break
            case o.Retry() | o.Unsent():
                retries += 1
                limit = getattr(out, "max_attempts", None) or MAX_TRANSIENT_RETRIES
                if retries >= limit:
                    return Outcome(source, error=out.reason)
                after = getattr(out, "retry_after_s", None)
                sleep(backoff(retries, timing, random.random, after))
                if isinstance(out, o.Unsent) and out.rehash:
                    step = "prepare"
            case o.Requeue() | o.Fail() | o.Gated():
                return Outcome(source, error=out.reason)
    if job.remote_id is not None:
        engine.release(job.remote_id)
    detections = Path(job.output_detections) if job.output_detections else None
    return Outcome(source, Path(job.output_media or ""), detections)

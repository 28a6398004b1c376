"""`blurd anonymize FILE…`: the same engine and options as the daemon, for a few files, now.

No daemon and no jobs table: each file is submitted, polled and fetched in turn, with the
worker's retry rules for transient errors, and written with the same writer.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from blurd import writer
from blurd.engines.base import Engine, Phase, RemoteStatus
from blurd.errors import BlurdError, TransientApiError, UnknownJob
from blurd.options import Options
from blurd.worker import Timing, backoff, rejection

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


def _retrying(call: Callable[[], Any], timing: Timing, sleep: Callable[[float], None]) -> Any:
    for attempt in range(1, MAX_TRANSIENT_RETRIES + 1):
        try:
            return call()
        except TransientApiError as exc:
            if attempt == MAX_TRANSIENT_RETRIES:
                raise
            sleep(backoff(attempt, timing, random.random, exc.retry_after_s))
    raise AssertionError("unreachable")


def _one(
    source: Path,
    out_dir: Path,
    engine: Engine,
    options: Options,
    progress: Progress,
    timing: Timing,
    sleep: Callable[[float], None],
) -> Outcome:
    reason = rejection(source, engine.supported_extensions)
    if reason is not None:
        return Outcome(source, error=reason)
    progress.step(source, "uploading")
    remote_id: str = _retrying(lambda: engine.submit(source, options), timing, sleep)
    progress.step(source, "processing")
    interval = timing.poll_first_s
    while True:
        status: RemoteStatus = _retrying(lambda: engine.poll(remote_id), timing, sleep)
        if status.phase is Phase.SUCCEEDED:
            break
        if status.phase is Phase.FAILED:
            return Outcome(source, error=status.error or f"the engine reported {status.raw}")
        if status.phase is Phase.UNKNOWN:
            raise UnknownJob("the engine lost the job")
        if status.progress:
            progress.step(source, f"processing {status.progress}")
        sleep(interval)
        interval = min(timing.poll_max_s, interval * timing.poll_growth)
    progress.step(source, "downloading")
    rel = source.name
    media, _ = _retrying(
        lambda: writer.place_bytes_from(
            lambda out: engine.fetch(remote_id, status, "media", out),
            writer.media_target(out_dir, rel, status.media_name),
        ),
        timing,
        sleep,
    )
    detections = None
    if options.detections and status.detections_name:
        detections, _ = _retrying(
            lambda: writer.place_bytes_from(
                lambda out: engine.fetch(remote_id, status, "detections", out),
                writer.detections_target(out_dir, rel),
            ),
            timing,
            sleep,
        )
    engine.release(remote_id)
    return Outcome(source, media, detections)

"""The steps of a job, each a function of the job and its collaborators that returns an
outcome (see ``outcomes``) and touches no database.

prepare (reject, hash) · reuse (copy an identical earlier result) · upload · poll ·
media / detections (fetch, verify, place) · originals (keep, move or delete the processed
version). Errors of the engine become outcomes through DESIGN.md section 6 (``outcomes.RULES``);
an exception that is none of those is a bug, which the scheduler turns into a retry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

import structlog

from blurd import heap, originals, versions, writer
from blurd.config import WatchConfig
from blurd.engines.base import Engine, Phase, RemoteStatus
from blurd.errors import (
    ApiError,
    BadResult,
    InputChanged,
    RejectedInput,
    ResultMissing,
    TransientApiError,
    UnknownJob,
)
from blurd.metadata import carry
from blurd.metadata.policy import MetadataError, Policy
from blurd.metrics import Metrics
from blurd.models import Job
from blurd.worker import outcomes as o
from blurd.worker.checks import FileChanged, hash_file, identity, rejection
from blurd.worker.placing import Finish, fetch_into_place
from blurd.worker.timing import Timing

log = structlog.get_logger("blurd.worker")
_T = TypeVar("_T")
_KNOWN_PENDING = frozenset({"", "sent", "started", "retried", "queued", "running", "pending"})
Permit = Callable[[Job], o.Outcome | None]  # may this upload be sent now? None: yes


class WatchGone(RejectedInput):
    """The job's watch was removed from the configuration (SIGHUP)."""


def download_step(job: Job, wants_detections: bool) -> o.Step:
    """Which part of a ``downloading`` job comes next: what is placed is not fetched again."""
    if job.output_media is None:
        return "media"
    if wants_detections and job.result_detections_name and job.output_detections is None:
        return "detections"
    return "originals"


class Steps:
    def __init__(
        self,
        engine: Engine,
        watches: Callable[[], Mapping[str, WatchConfig]],
        timing: Timing,
        metrics: Metrics,
        permit: Permit = lambda _job: None,
    ) -> None:
        self.engine = engine
        self.watches = watches
        self.timing = timing
        self.metrics = metrics
        self.permit = permit

    def run(self, step: o.Step, job: Job, earlier: Job | None = None) -> o.Outcome:
        if step == "reuse":
            assert earlier is not None
            return self.reuse(job, earlier)
        fn: Callable[[Job], o.Outcome] = getattr(self, step)
        return fn(job)

    def source(self, job: Job) -> tuple[WatchConfig, Path]:
        watch = self.watches().get(job.watch)
        if watch is None:
            raise WatchGone(f"the watch folder {job.watch} is no longer configured")
        return watch, watch.path / job.rel_path

    def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Call the engine; count every error it raises by HTTP status ("none": no reply)."""
        try:
            return fn(*args)
        except ApiError as exc:
            self.metrics.api_error(exc.status)
            raise

    # ------------------------------------------------------------------ before the engine

    def _sendable(self, job: Job) -> tuple[WatchConfig, Path] | o.Fail:
        """The job's watch and file, if the file may still be sent as it was queued."""
        try:
            watch, path = self.source(job)
        except WatchGone as exc:
            return o.Fail(str(exc))
        reason = rejection(path, self.engine.supported_extensions, (job.size, job.mtime_ns))
        return o.Fail(reason) if reason is not None else (watch, path)

    def prepare(self, job: Job) -> o.Outcome:
        sendable = self._sendable(job)
        if isinstance(sendable, o.Fail):
            return sendable
        watch, path = sendable
        try:
            sha, ident = hash_file(path)
        except FileChanged as exc:
            return o.Retry(str(exc))  # hashed again once the writer is done
        except OSError as exc:
            return o.Fail(_unreadable(exc))
        if (ident.size, ident.mtime_ns) != (job.size, job.mtime_ns):
            return o.Fail("changed after it was queued; its new version is queued on its own")
        fingerprint = watch.options.fingerprint(self.engine.name)
        return o.Hashed(sha, fingerprint, ident.dev, ident.ino, ident.ctime_ns)

    def reuse(self, job: Job, earlier: Job) -> o.Outcome:
        """Copy the outputs of an identical earlier job, if they are still there unchanged;
        otherwise the job waits for an upload of its own."""
        assert job.sha256 is not None and job.fingerprint is not None
        upload = o.Hashed(job.sha256, job.fingerprint, job.dev or 0, job.ino or 0,
                          job.ctime_ns or 0, look_for_twin=False)  # fmt: skip
        try:
            watch, _path = self.source(job)
        except WatchGone as exc:
            return o.Fail(str(exc))
        assert earlier.output_media is not None
        media = Path(earlier.output_media)
        try:
            if hash_file(media)[0] != earlier.output_sha256:
                return upload
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
        except (OSError, FileChanged):
            return upload
        return o.Done(placed, placed_json, earlier.output_sha256, reused_from=earlier.id)

    # ------------------------------------------------------------------ at the engine

    def upload(self, job: Job) -> o.Outcome:
        gated = self.permit(job)
        if gated is not None:
            return gated
        sendable = self._sendable(job)
        if isinstance(sendable, o.Fail):
            return sendable
        watch, path = sendable
        before = identity(path)
        if before is None:
            return o.Fail("the file disappeared before it could be uploaded")
        if job.ino is not None and (before.dev, before.ino, before.ctime_ns) != (
            job.dev, job.ino, job.ctime_ns):  # fmt: skip
            return o.Unsent("it was rewritten since it was hashed", rehash=True)
        log.info("job.uploading", job_id=job.id, path=job.rel_path, size=job.size)
        try:
            remote_id = self._call(self.engine.submit, path, watch.options)
        except OSError as exc:
            return o.Fail(_unreadable(exc))
        except InputChanged as exc:
            return o.Unsent(str(exc), rehash=True)
        except Exception as exc:
            return _mapped(exc, "upload")
        after = identity(path)
        if after is not None and self.engine.changes_input_ctime:
            after = dataclasses.replace(after, ctime_ns=before.ctime_ns)
        return o.Submitted(remote_id, before.size, uncertain=after != before)

    def poll(self, job: Job) -> o.Outcome:
        assert job.remote_id is not None
        try:
            status = self._call(self.engine.poll, job.remote_id)
        except UnknownJob:
            status = RemoteStatus(Phase.UNKNOWN)
        except Exception as exc:
            return _mapped(exc, "poll")
        return _status_outcome(status)

    def media(self, job: Job) -> o.Outcome:
        return self._fetch(job, "media")

    def detections(self, job: Job) -> o.Outcome:
        return self._fetch(job, "detections")

    def _fetch(self, job: Job, part: Literal["media", "detections"]) -> o.Outcome:
        assert job.remote_id is not None
        remote_id = job.remote_id
        try:
            watch, _path = self.source(job)
            if part == "media":
                target = writer.media_target(watch.output, job.rel_path, job.result_media_name)
            else:
                target = writer.detections_target(watch.output, job.rel_path)
        except RejectedInput as exc:
            return o.Fail(str(exc))
        status = RemoteStatus(Phase.SUCCEEDED, media_name=job.result_media_name,
                              detections_name=job.result_detections_name)  # fmt: skip

        def fetch(out: BinaryIO) -> int:
            return self._call(self.engine.fetch, remote_id, status, part, out)

        notes: list[str] = []
        rewritten = part == "media" and carry.rewrites(target.suffix)
        finish = self._finisher(job, watch, notes) if rewritten else None

        # A broken transfer is fetched again at once a few times (most are one dropped
        # connection) before the job backs off; a Retry-After is always honoured.
        for attempt in range(self.timing.transfer_retries + 1):
            try:
                path, sha, size = fetch_into_place(fetch, target, part, finish)
            except ResultMissing:
                return self._result_missing(job)
            except TransientApiError as exc:
                last_try = attempt == self.timing.transfer_retries
                if last_try or exc.retry_after_s is not None:
                    return o.Retry(str(exc), exc.retry_after_s)
                continue
            except OSError as exc:
                return o.Retry(f"cannot write the output: {exc}", output_blocked=True)
            except Exception as exc:
                return _mapped(exc, part)
            return o.Placed(part, path, sha, size, notes[-1] if notes else None)
        raise AssertionError("unreachable")

    def _version(self, job: Job) -> versions.Version:
        """The version of the input that was processed, as far as it can still be told."""
        ctime = None if self.engine.changes_input_ctime else job.ctime_ns
        return versions.Version(job.size, job.mtime_ns, job.dev, job.ino, ctime)

    def _finisher(self, job: Job, watch: WatchConfig, notes: list[str]) -> Finish:
        """Rewrites a verified result with what ``watch.metadata`` carries of the input: the
        version processed, read without following symlinks, or nothing if it is gone."""
        policy = Policy(watch.options.metadata)
        version = self._version(job)

        def finish(body: Path, new: Path) -> None:
            with contextlib.ExitStack() as stack:
                source: BinaryIO | None = None
                why = ""
                try:
                    source = stack.enter_context(
                        versions.open_version(watch.path, job.rel_path, version)
                    )
                except (versions.OriginalChanged, OSError, RejectedInput) as exc:
                    why = f"nothing of the input carried: {exc}"
                try:
                    upright = self.engine.outputs_upright
                    carried = carry.carry(source, body, new, policy, upright=upright, why_none=why)
                except MetadataError as exc:
                    raise BadResult(f"the result cannot be published: {exc.reason}") from exc
            if carried.note:
                notes.append(carried.note)

        return finish

    def _result_missing(self, job: Job) -> o.Outcome:
        """A 404 on a result: only the job's status can say whether the job is gone."""
        assert job.remote_id is not None
        outcome = self.poll(job)
        if isinstance(outcome, o.Requeue | o.Fail):
            return outcome
        return o.Retry("the result file is not there (404); the job is polled again")

    # ------------------------------------------------------------------ after the engine

    def originals(self, job: Job) -> o.Outcome:
        try:
            watch, _path = self.source(job)
        except WatchGone as exc:
            return o.Fail(str(exc))
        if watch.originals == "keep":
            return o.Done()
        try:
            moved = originals.apply(
                watch.originals, watch.path, job.rel_path, self._version(job), watch.archive
            )
        except FileNotFoundError:
            return o.Done(note="the original was already gone")
        except versions.OriginalChanged as exc:
            return o.Done(note=f"the original was left alone: {exc}")
        except (OSError, RejectedInput) as exc:
            return o.Retry(f"originals = {watch.originals!r} failed: {exc}", originals=True)
        return o.Done(note=f"original archived as {moved}" if moved else "original deleted")


def _status_outcome(status: RemoteStatus) -> o.Outcome:
    if status.phase is Phase.PENDING:
        odd = status.raw.lower() not in _KNOWN_PENDING and not status.progress
        return o.Pending(status.raw, status.progress, odd)
    if status.phase is Phase.SUCCEEDED:
        return o.Succeeded(status.media_name, status.detections_name)
    if status.phase is Phase.FAILED:
        return o.Fail(status.error or f"the engine reported {status.raw}")
    return o.Requeue("the engine no longer knows this job")


def _mapped(exc: Exception, step: o.Step) -> o.Outcome:
    outcome = o.outcome_of(exc, step)
    if outcome is None:
        raise exc
    return outcome


def _unreadable(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link swapped in since the checks
        return "is a symbolic link; blurd never follows links"
    return f"cannot be read: {exc.strerror or exc}"


def _copy_into(src: Path, out: BinaryIO) -> int:
    n = 0
    with open(src, "rb") as fh:
        for chunk in heap.chunks(fh, 1024 * 1024):
            out.write(chunk)
            n += len(chunk)
    return n

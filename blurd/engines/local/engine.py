"""LocalEngine: the Engine interface in front of a pool of processes that anonymize files.

The daemon process stays light: it never imports onnxruntime, OpenCV or PyAV (except in
``check``). Each pool process loads the face model once (pool initializer) and runs one job at
a time. Jobs live only in memory and in a private work folder: after a restart their ids are
unknown (``Phase.UNKNOWN``) and the worker queues them again.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from blurd import heap
from blurd.engines.base import Engine, Part, Phase, RemoteStatus
from blurd.engines.local.errors import MediaError
from blurd.engines.local.files import (
    CANCEL_NAME,
    DETECTIONS_NAME,
    IMAGE_EXTENSIONS,
    INPUT_STEM,
    PROGRESS_NAME,
    VIDEO_EXTENSIONS,
    media_name,
)
from blurd.errors import ConfigError, PermanentApiError, TransientApiError, UnknownJob
from blurd.options import Options

REQUIRED_MODULES = ("numpy", "onnxruntime", "cv2", "av")
POOL_START_METHOD = "spawn"  # the daemon has threads: never fork it
COPY_CHUNK_BYTES = 1024 * 1024

PLATES_UNSUPPORTED_WHY = (
    "no licence-plate detector that is permissively licensed and accurate enough ships with "
    "blurd (see 'The local engine' in the README)"
)
PLATES_WARNING = (
    "The local engine does not detect licence plates: plates = true is ignored and plates "
    "stay visible; use the BlurIt engine to anonymize plates."
)


@dataclass
class _Job:
    folder: Path
    ext: str
    future: Future[None]


def _run_in_pool(src: str, job_dir: str, options: Options) -> None:
    """Entry point in the pool process; imports the heavy modules there, not here."""
    from blurd.engines.local import jobs

    jobs.run_job(src, job_dir, options)


def _init_pool_process(threads: int) -> None:
    """Pool initializer: Ctrl-C is the daemon's to handle (it cancels jobs and closes the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from blurd.engines.local import jobs

    jobs.init_worker(threads)


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class LocalEngine(Engine):
    """Anonymizes on this machine's CPU: CenterFace for faces, OpenCV and PyAV for media."""

    name = "local"
    supported_extensions = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    max_poll_interval_s = 2.0
    keeps_jobs_across_restarts = False
    changes_input_ctime = True  # its input is hard-linked into the job's folder (_snapshot)
    outputs_upright = True  # images.decode applies the EXIF orientation

    def __init__(
        self, *, workers: int | None = None, plate_model: str = "", work_dir: Path | None = None
    ) -> None:
        missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"the local engine needs {', '.join(missing)}: pip install 'blurd[local]'",
                key="daemon.engine",
            )
        if plate_model:
            raise ConfigError(
                "a user-supplied plate model is not supported yet; leave it empty",
                key="local.plate_model",
            )
        cores = cpu_count()
        self.workers = max(1, workers if workers is not None else cores)
        self.threads = max(1, cores // self.workers)  # workers x threads ~ cores
        if work_dir is not None:
            work_dir.mkdir(parents=True, exist_ok=True)
        self._root = Path(tempfile.mkdtemp(prefix="blurd-local-", dir=work_dir))
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    # -- the Engine interface ---------------------------------------------------------------

    def submit(self, path: Path, options: Options) -> str:
        ext = path.suffix.lower()
        if ext not in self.supported_extensions:
            raise PermanentApiError(
                f"the local engine does not handle {ext or 'extensionless'} files"
            )
        if not path.is_file():
            raise PermanentApiError(f"{path.name} is not a readable file")
        remote_id = f"local-{uuid.uuid4().hex}"
        folder = self._root / remote_id
        try:
            folder.mkdir()
            src = _snapshot(path.absolute(), folder / f"{INPUT_STEM}{ext}")
            with self._lock:
                if self._closed:
                    raise TransientApiError("the local engine is shutting down")
                future = self._submit_locked(str(src), str(folder), options)
                self._jobs[remote_id] = _Job(folder, ext, future)
        except FileNotFoundError as exc:  # the work folder went away: closed
            raise TransientApiError("the local engine is shutting down") from exc
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return remote_id

    def poll(self, remote_id: str) -> RemoteStatus:
        with self._lock:
            job = self._jobs.get(remote_id)
        if job is None:
            return RemoteStatus(Phase.UNKNOWN, raw="unknown")
        future = job.future
        if not future.done():
            raw = "running" if future.running() else "queued"
            return RemoteStatus(Phase.PENDING, raw=raw, progress=_read_progress(job.folder))
        if future.cancelled():
            self._forget(remote_id)
            return RemoteStatus(Phase.UNKNOWN, raw="cancelled")
        exc = future.exception()
        if exc is None:
            return RemoteStatus(
                Phase.SUCCEEDED,
                raw="done",
                media_name=media_name(job.ext),
                detections_name=DETECTIONS_NAME,
            )
        if isinstance(exc, BrokenProcessPool):
            # A pool process died (killed, out of memory): every job it held is lost.
            self._forget(remote_id)
            return RemoteStatus(Phase.UNKNOWN, raw="lost", error="a local worker process died")
        return RemoteStatus(Phase.FAILED, raw="failed", error=_sentence(exc))

    def fetch(self, remote_id: str, status: RemoteStatus, part: Part, out: BinaryIO) -> int:
        with self._lock:
            job = self._jobs.get(remote_id)
        if job is None:
            raise UnknownJob(f"the local engine does not know job {remote_id}")
        path = job.folder / (media_name(job.ext) if part == "media" else DETECTIONS_NAME)
        try:
            size = path.stat().st_size
            copied = 0
            with path.open("rb") as src:
                for chunk in heap.chunks(src, COPY_CHUNK_BYTES):
                    out.write(chunk)
                    copied += len(chunk)
        except FileNotFoundError as exc:
            raise UnknownJob(f"the result of job {remote_id} is gone") from exc
        except OSError as exc:
            raise TransientApiError(f"reading the result of job {remote_id} failed: {exc}") from exc
        if copied != size:
            raise TransientApiError(f"read {copied} of {size} bytes of job {remote_id}")
        return copied

    def release(self, remote_id: str) -> None:
        job = self._forget(remote_id)
        if job is None:
            return
        if job.future.done() or job.future.cancel():
            shutil.rmtree(job.folder, ignore_errors=True)
            return
        (job.folder / CANCEL_NAME).touch()
        job.future.add_done_callback(lambda _f: shutil.rmtree(job.folder, ignore_errors=True))

    def limitations(self, options: Options) -> list[str]:
        return [PLATES_WARNING] if options.plates else []

    def describe(self) -> dict[str, Any]:
        with self._lock:
            jobs = len(self._jobs)
        return {
            "engine": self.name,
            "workers": self.workers,
            "threads_per_worker": self.threads,
            "faces": "CenterFace (MIT), on the CPU",
            "plates": f"unsupported: {PLATES_UNSUPPORTED_WHY}",
            "jobs": jobs,
        }

    def check(self) -> None:
        """Load the face model once in this process; raises if it cannot be used."""
        from blurd.engines.local.detect import FaceDetector

        try:
            FaceDetector(threads=1)
        except Exception as exc:
            raise PermanentApiError(f"the local face model cannot be loaded: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            for job in self._jobs.values():
                if not job.future.done() and job.folder.is_dir():
                    (job.folder / CANCEL_NAME).touch()
            self._jobs.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._root, ignore_errors=True)

    # -- internals ------------------------------------------------------------------------

    def _submit_locked(self, src: str, folder: str, options: Options) -> Future[None]:
        for attempt in range(2):
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=multiprocessing.get_context(POOL_START_METHOD),
                    initializer=_init_pool_process,
                    initargs=(self.threads,),
                )
            try:
                return self._pool.submit(_run_in_pool, src, folder, options)
            except BrokenProcessPool:
                self._pool = None  # a process died: start a fresh pool once
                if attempt:
                    raise TransientApiError("the local engine's process pool is broken") from None
        raise AssertionError("unreachable")

    def _forget(self, remote_id: str) -> _Job | None:
        with self._lock:
            return self._jobs.pop(remote_id, None)


def _snapshot(path: Path, target: Path) -> Path:  # see Engine.changes_input_ctime
    """A hard link to the input, so that a later change of name cannot touch the job."""
    try:
        os.link(path, target)
    except OSError:
        return path  # another filesystem or no permission: read the original in place
    return target


def _read_progress(folder: Path) -> str | None:
    try:
        return (folder / PROGRESS_NAME).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _sentence(exc: BaseException) -> str:
    """One line for ``blurd jobs``: the job's own message, else the error's type and text."""
    text = " ".join(str(exc).split())
    if isinstance(exc, MediaError):
        return text
    return f"the local engine failed: {type(exc).__name__}: {text}" if text else type(exc).__name__

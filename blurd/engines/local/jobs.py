"""What runs inside a pool process: one job from input file to result files.

A job owns a folder. While it runs, ``progress`` holds e.g. ``120/300 frames``; when it ends
well, ``result.<ext>`` and ``result.json`` appear (each renamed into place once complete). A
``cancel`` file, created by the engine, makes a running video stop at the next frame.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2

from blurd.engines.local.detect import FaceDetector
from blurd.engines.local.errors import MediaError
from blurd.engines.local.files import (
    CANCEL_NAME,
    DETECTIONS_NAME,
    IMAGE_EXTENSIONS,
    PROGRESS_NAME,
    VIDEO_EXTENSIONS,
    media_name,
)
from blurd.engines.local.frames import FrameAnonymizer
from blurd.engines.local.images import anonymize_image
from blurd.engines.local.video import anonymize_video
from blurd.options import Options

PROGRESS_EVERY_S = 0.5
CANCEL_CHECK_EVERY_S = 0.25


class _Process:
    """The state of one pool process: its detector, built once by the pool initializer."""

    detector: FaceDetector | None = None


def init_worker(threads: int) -> None:
    """Pool initializer: load the model once for every job this process will run.

    OpenCV gets the same thread budget as onnxruntime: its own pool (one thread per core by
    default) only adds wake-ups on cores that the detector and x264 already keep busy.
    """
    cv2.setNumThreads(threads)
    _Process.detector = FaceDetector(threads=threads)


def run_job(src: str, job_dir: str, options: Options) -> None:
    """Anonymize ``src`` into ``job_dir``: ``result.<ext>`` and ``result.json``."""
    folder = Path(job_dir)
    source = Path(src)
    ext = source.suffix.lower()
    if _Process.detector is None:  # not started by the engine's pool (tests, scripts)
        init_worker(threads=1)
    anonymizer = FrameAnonymizer(_Process.detector, options)
    media = folder / media_name(ext)
    detections = folder / DETECTIONS_NAME
    tmp_media = folder / f".part{ext}"
    tmp_detections = folder / ".part.json"
    try:
        if ext in IMAGE_EXTENSIONS:
            anonymize_image(source, tmp_media, tmp_detections, anonymizer)
        elif ext in VIDEO_EXTENSIONS:
            reporter = _Reporter(folder)
            anonymize_video(
                source,
                tmp_media,
                tmp_detections,
                anonymizer,
                progress=reporter.progress,
                stop=reporter.stopped,
            )
        else:
            raise MediaError(f"{ext or 'extensionless'} files are not supported")
    except FileNotFoundError as exc:
        raise MediaError("the input file disappeared before it was processed") from exc
    except PermissionError as exc:
        raise MediaError("the input file cannot be read (permission denied)") from exc
    os.replace(tmp_detections, detections)
    os.replace(tmp_media, media)


class _Reporter:
    """Writes progress for the engine to read and notices a cancel request, both throttled."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.frames = 0
        self._next_write = 0.0
        self._next_check = 0.0
        self._cancelled = False

    def progress(self, done: int, total: int | None) -> None:
        self.frames = done
        now = time.monotonic()
        if now < self._next_write:
            return
        self._next_write = now + PROGRESS_EVERY_S
        text = f"{done}/{total} frames" if total else f"{done} frames"
        tmp = self.folder / f".{PROGRESS_NAME}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.folder / PROGRESS_NAME)

    def stopped(self) -> bool:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CANCEL_CHECK_EVERY_S
            self._cancelled = (self.folder / CANCEL_NAME).exists()
        return self._cancelled

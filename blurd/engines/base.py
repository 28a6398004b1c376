"""The engine interface the worker talks to; it never knows which engine runs.

An engine works in three steps, each of which may be retried by the worker:

``submit(path, options) -> remote_id``
    Starts a job for one file and returns an opaque id that the worker stores at once.
``poll(remote_id) -> RemoteStatus``
    Says where that job is. ``Phase.UNKNOWN`` means the engine no longer knows the id
    (the worker puts the job back in the queue).
``fetch(remote_id, status, part, out) -> int``
    Streams one result part (``"media"`` or ``"detections"``) into ``out`` and returns the
    byte count. A short or broken transfer raises ``TransientApiError``. An engine that learns
    the part's size before writing it calls ``announce(out, size)`` first, so that a sink can
    refuse a download its disk has no room for before a byte is fetched.

Errors are those of ``blurd.errors``: ``TransientApiError`` (retry with backoff),
``PermanentApiError`` (the job fails), ``AuthError``, ``PaymentRequired``, ``UnknownJob``.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from blurd.options import Options

Part = Literal["media", "detections"]


class Phase(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RemoteStatus:
    phase: Phase
    raw: str = ""  # the engine's own word for the state, for logs
    media_name: str | None = None  # result file name; only its extension is used
    detections_name: str | None = None
    error: str | None = None
    progress: str | None = None  # e.g. "120/300 frames", shown by `blurd jobs`


class Engine(ABC):
    """One anonymization backend."""

    name: str = "engine"
    #: lower-case extensions with the dot that this engine accepts
    supported_extensions: frozenset[str] = frozenset()
    #: the longest wait between two polls of one job; None leaves it to the worker's timing
    #: (an engine on this machine is cheap to ask and finishes jobs sooner than a remote one)
    max_poll_interval_s: float | None = None
    #: whether a job submitted before a restart can still be polled and fetched after it
    #: (BlurIt's jobs live on the server; the local engine's die with the process)
    keeps_jobs_across_restarts: bool = True
    #: whether submitting a file changes its ctime (the local engine hard-links its input as a
    #: snapshot, and a link count change is a ctime change): then a file rewritten in place
    #: with the same size and mtime cannot be told from the version sent, and blurd compares
    #: size, mtime, device and inode only
    changes_input_ctime: bool = False
    #: whether the engine turns a photo by its EXIF orientation (the local engine writes it
    #: upright): then the orientation carried into the output is 1
    outputs_upright: bool = False

    @abstractmethod
    def submit(self, path: Path, options: Options) -> str: ...

    @abstractmethod
    def poll(self, remote_id: str) -> RemoteStatus: ...

    @abstractmethod
    def fetch(self, remote_id: str, status: RemoteStatus, part: Part, out: BinaryIO) -> int: ...

    def limitations(self, options: Options) -> list[str]:
        """One sentence per option this engine cannot honour (logged at start-up)."""
        return []

    def release(self, remote_id: str) -> None:
        """The worker has placed every part of this job's result: drop what is kept for it."""

    def describe(self) -> dict[str, Any]:
        """State worth showing in `blurd status` (auth state, pauses...)."""
        return {"engine": self.name}

    def check(self) -> None:
        """Prove the engine can work (log in once, load the model). Raises on failure."""

    def close(self) -> None:
        """Release sessions, pools and temp files."""


def announce(out: BinaryIO, size: int) -> None:
    """Tell ``out`` how many bytes are coming, if it wants to know (the worker's sinks check the
    free space of the output folder and raise ``OSError(ENOSPC)`` when it is short)."""
    expect = getattr(out, "expect", None)
    if callable(expect):
        expect(size)

"""Fetching a result part into place: written to a temp file beside its final name, hashed
and measured on the way, verified, then placed without overwriting (``writer``).

Shared by the daemon's steps and ``blurd anonymize``. Nothing is placed that failed its check:
an empty body, an HTML error page, a media type other than the name says, a detections file
that is not JSON. The free space of the folder is checked when the engine announces a size.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Literal, cast

from blurd import results, writer
from blurd.errors import BadResult
from blurd.worker.checks import hash_file

# Room kept free beyond an announced download: a full disk also stops the database and logs.
_FREE_MARGIN_BYTES = 64 * 1024 * 1024
_HEAD_BYTES = 64
# (the engine's verified body, a new file to write from it): see fetch_into_place
Finish = Callable[[Path, Path], object]


class Sink:
    """A file-like object an engine writes one part into (see ``engines.base.announce``)."""

    def __init__(self, out: BinaryIO, *, keep: bool, cap: int | None, copies: int = 1) -> None:
        self._out = out
        self._keep = keep
        self._cap = cap
        self._copies = copies  # the body, and the file rewritten from it while both exist
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.kept = bytearray()

    def write(self, data: bytes) -> int:
        if self._cap is not None and self.size + len(data) > self._cap:
            raise BadResult(f"the result is larger than {self._cap} bytes")
        if len(self.head) < _HEAD_BYTES:
            self.head += data[: _HEAD_BYTES - len(self.head)]
        if self._keep:
            self.kept += data
        self.sha.update(data)
        self.size += len(data)
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()

    def expect(self, size: int) -> None:
        """The engine is about to send ``size`` bytes: refuse now if they cannot fit."""
        st = os.fstatvfs(self._out.fileno())
        free = st.f_bavail * st.f_frsize
        if self._copies * size + _FREE_MARGIN_BYTES > free:
            copies = f"two copies of a {size}-byte result" if self._copies > 1 else (
                f"a {size}-byte result")  # fmt: skip
            raise OSError(
                errno.ENOSPC,
                f"no room for {copies} ({free} bytes free, {_FREE_MARGIN_BYTES} kept free)",
            )


def fetch_into_place(
    fetch: Callable[[BinaryIO], int],
    target: Path,
    part: Literal["media", "detections"],
    finish: Finish | None = None,
) -> tuple[Path, str, int]:
    """Fetch one part with ``fetch(out)``, verify it and place it at ``target`` (or a free
    ``-N`` name); returns (final path, sha256, size) of what was placed. With ``finish``, the
    verified body goes to a temp file and ``finish(body, new)`` writes the file placed (the
    media with the input's metadata: ``blurd.metadata.carry``). Raises ``BadResult`` when the
    body is not what was due, ``OSError`` when it cannot be written, and whatever ``fetch`` or
    ``finish`` raises; no temp file is left in any case."""
    sink: list[Sink] = []

    def write(out: BinaryIO) -> int:
        detections = part == "detections"
        cap = results.MAX_DETECTIONS_BYTES if detections else None
        s = Sink(out, keep=detections, cap=cap, copies=1 if finish is None else 2)
        sink.append(s)
        fetch(cast(BinaryIO, s))
        if detections:
            problem = results.detections_problem(bytes(s.kept))
        else:
            problem = results.media_problem(s.head, s.size, target.suffix.lower())
        if problem is not None:
            raise BadResult(problem)
        return s.size

    if finish is None:
        path, size = writer.place_bytes_from(write, target)
        return path, sink[0].sha.hexdigest(), size
    # Both temp files have the target's extension: a video's muxer is chosen by it.
    with writer.TempFile(target, suffix=target.suffix) as raw:
        write(raw.file)
        raw.close()
        final = writer.temp_name(target, suffix=target.suffix)
        try:
            finish(raw.path, final)
            sha, identity = hash_file(final)
            path = writer.place(final, target)
        finally:
            final.unlink(missing_ok=True)
            raw.discard()
    return path, sha, identity.size

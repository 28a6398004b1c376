"""The detections JSON of a local job, streamed to disk one frame at a time.

Schema (version 1), boxes in pixels of the upright original frame, clipped to it::

    {"engine": "local", "version": 1, "media": "image" | "video",
     "width": W, "height": H, "fps": 30.0,            # "fps" only for video
     "frames": [
       {"index": 0, "time_s": 0.0,
        "detections": [{"class": "face", "box": [x1, y1, x2, y2], "score": 0.93},
                       {"class": "face", "box": [...], "score": 0.88, "held": true}]}
     ]}

Every frame of a video is listed, with or without detections. ``held`` marks a box that was
not detected in that frame but carried over from neighbouring detected frames (see video.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, TextIO

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Detection:
    kind: str  # "face" | "plate"
    box: tuple[int, int, int, int]
    score: float
    held: bool = False

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "class": self.kind,
            "box": list(self.box),
            "score": round(self.score, 3),
        }
        if self.held:
            out["held"] = True
        return out


class DetectionsWriter:
    """Writes the JSON document incrementally, so a long video never holds it in memory."""

    def __init__(
        self,
        path: Path,
        *,
        media: Literal["image", "video"],
        width: int,
        height: int,
        fps: float | None = None,
    ) -> None:
        self._file: TextIO = path.open("w", encoding="utf-8")
        head: dict[str, object] = {
            "engine": "local",
            "version": SCHEMA_VERSION,
            "media": media,
            "width": width,
            "height": height,
        }
        if fps is not None:
            head["fps"] = round(fps, 6)
        self._file.write(json.dumps(head)[:-1] + ', "frames": [')
        self._count = 0
        self.total = 0  # detections written, for the job summary

    def frame(self, index: int, time_s: float, detections: list[Detection]) -> None:
        entry = {
            "index": index,
            "time_s": round(time_s, 6),
            "detections": [d.as_json() for d in detections],
        }
        self._file.write(("," if self._count else "") + "\n" + json.dumps(entry))
        self._count += 1
        self.total += len(detections)

    def close(self) -> None:
        if not self._file.closed:
            self._file.write("\n]}\n")
            self._file.close()

    def __enter__(self) -> DetectionsWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

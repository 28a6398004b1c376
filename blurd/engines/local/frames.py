"""One frame at a time: find what to hide, hide it, and say what was hidden."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from blurd.engines.local.arrays import Image
from blurd.engines.local.detect import FaceDetector
from blurd.engines.local.detections import Detection
from blurd.engines.local.styles import Region, anonymize, anonymize_yuv420, in_area, region_of
from blurd.options import Options


@dataclass(frozen=True)
class Hit:
    """One detector box in frame pixels (it may reach past the frame edges)."""

    kind: str
    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    held: bool = False

    def as_held(self) -> Hit:
        return replace(self, held=True)


class FrameAnonymizer:
    """Applies one job's options to frames; the detector is shared by every job of a process."""

    def __init__(self, detector: FaceDetector | None, options: Options) -> None:
        self.detector = detector
        self.options = options

    def find(self, bgr: Image, *, width: int | None = None, height: int | None = None) -> list[Hit]:
        """Faces whose centre lies in the options' area (none when faces are off).

        ``bgr`` may be a downscaled copy of a ``width`` x ``height`` frame: the hits are in
        the pixels of that full frame.
        """
        if not self.options.faces or self.detector is None:
            return []
        small_h, small_w = bgr.shape[:2]
        width, height = width or small_w, height or small_h
        sx, sy = width / small_w, height / small_h
        area = self.options.area
        hits = []
        for x1, y1, x2, y2, score in self.detector.detect(_as_8bit(bgr)).tolist():
            x1, x2, y1, y2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
            if in_area((x1 + x2) / 2, (y1 + y2) / 2, area, width, height):
                hits.append(Hit("face", x1, y1, x2, y2, score))
        return hits

    def hide(self, frame: Image, hits: list[Hit]) -> list[Detection]:
        """Anonymize ``hits`` in a BGR ``frame`` in place; their records for the JSON."""
        anonymize(frame, self._regions(hits), self.options)
        height, width = frame.shape[:2]
        return [_record(h, width, height) for h in hits]

    def hide_yuv420(
        self, planes: tuple[Image, Image, Image], hits: list[Hit], *, bt709: bool
    ) -> list[Detection]:
        """Anonymize ``hits`` in an 8-bit 4:2:0 frame in place; their records for the JSON."""
        anonymize_yuv420(planes, self._regions(hits), self.options, bt709=bt709)
        height, width = planes[0].shape[:2]
        return [_record(h, width, height) for h in hits]

    def _regions(self, hits: list[Hit]) -> list[Region]:
        padding = self.options.padding
        return [region_of(h.x1, h.y1, h.x2, h.y2, padding=padding) for h in hits]


def _record(hit: Hit, width: int, height: int) -> Detection:
    box = (
        int(np.clip(round(hit.x1), 0, width)),
        int(np.clip(round(hit.y1), 0, height)),
        int(np.clip(round(hit.x2), 0, width)),
        int(np.clip(round(hit.y2), 0, height)),
    )
    return Detection(hit.kind, box, hit.score, held=hit.held)


def _as_8bit(frame: Image) -> Image:
    if frame.dtype == np.uint16:
        return (frame >> 8).astype(np.uint8)
    return frame.astype(np.uint8, copy=False)

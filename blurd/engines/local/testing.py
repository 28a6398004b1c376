"""Media made on the spot for tests and the benchmark: a clip with moving faces and a tone.

Public so that tests and ``scripts/bench-local`` make the same kind of input; nothing here
runs in the daemon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from blurd.engines.local.arrays import Image

AUDIO_RATE_HZ = 48000
AUDIO_TONE_HZ = 440.0


def gradient_image(width: int, height: int, *, seed: int = 0) -> Image:
    """A face-free BGR picture: colour gradients with a little noise."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[np.newaxis, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, np.newaxis]
    b = 255 * x * np.ones_like(y)
    g = 255 * y * np.ones_like(x)
    r = 128 + 100 * np.sin(6 * x + 4 * y)
    image = np.dstack([b, g, r]) + rng.normal(0, 6, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def detail(image: Image) -> float:
    """High-frequency energy: the variance of the Laplacian of the grey image."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    return float(cv2.Laplacian(grey.astype(np.float32), cv2.CV_32F).var())


def make_clip(
    path: Path,
    *,
    background: Image,
    faces: Sequence[Image],
    width: int = 1280,
    height: int = 720,
    seconds: float = 2.0,
    fps: int = 30,
    audio: bool = True,
    crf: int = 20,
    rotation: int = 0,
) -> list[list[tuple[int, int, int, int]]]:
    """Write an H.264 clip (+ AAC tone) where ``faces`` drift over a panning ``background``.

    Each face keeps its own size and moves along its own loop. ``rotation`` (degrees,
    counter-clockwise) is stored as display metadata, as phones do. Returns, per frame, the
    box (x1, y1, x2, y2) where each face was pasted (before any rotation).
    """
    frames = max(1, round(seconds * fps))
    bg = _cover(background, int(width * 1.3), int(height * 1.3))
    with av.open(str(path), "w") as out:
        video: Any = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": str(crf), "preset": "veryfast"}
        if rotation:
            video.set_display_rotation(rotation)
        sound: Any = out.add_stream("aac", rate=AUDIO_RATE_HZ) if audio else None
        if sound is not None:
            sound.layout = "stereo"
        tone = _Tone(out, sound, int(seconds * AUDIO_RATE_HZ)) if sound is not None else None
        placed: list[list[tuple[int, int, int, int]]] = []
        for i in range(frames):
            t = i / max(1, frames - 1)
            dx = int((bg.shape[1] - width) * t)
            dy = int((bg.shape[0] - height) * (0.5 + 0.5 * math.sin(2 * math.pi * t)))
            canvas = bg[dy : dy + height, dx : dx + width].copy()
            placed.append(
                [
                    _paste(canvas, face, _path_point(k, t, canvas.shape[1], canvas.shape[0]))
                    for k, face in enumerate(faces)
                ]
            )
            frame = av.VideoFrame.from_ndarray(canvas, format="bgr24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in video.encode(frame):
                out.mux(packet)
            if tone is not None:
                tone.write_until((i + 1) / fps)
        for packet in video.encode(None):
            out.mux(packet)
        if tone is not None:
            tone.finish()
    return placed


def face_crop(image: Image, box: tuple[int, int, int, int], height_px: int) -> Image:
    """The ``box`` of ``image`` with a margin, scaled so that it is ``height_px`` tall."""
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) // 3, (y2 - y1) // 3
    crop = image[max(0, y1 - my) : y2 + my, max(0, x1 - mx) : x2 + mx]
    scale = height_px / crop.shape[0]
    size = (max(1, round(crop.shape[1] * scale)), height_px)
    resized: Image = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    return resized


def _cover(image: Image, width: int, height: int) -> Image:
    scale = max(width / image.shape[1], height / image.shape[0])
    size = (math.ceil(image.shape[1] * scale), math.ceil(image.shape[0] * scale))
    resized: Image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return resized[:height, :width]


def _path_point(k: int, t: float, width: int, height: int) -> tuple[int, int]:
    """Centre of face ``k`` at time ``t`` in [0, 1]: a slow loop, shifted per face."""
    phase = 2 * math.pi * (t + k * 0.37)
    cx = width * (0.5 + 0.42 * math.sin(phase + k))
    cy = height * (0.5 + 0.3 * math.cos(0.5 * phase + 2 * k))
    return int(cx), int(cy)


def _paste(canvas: Image, patch: Image, centre: tuple[int, int]) -> tuple[int, int, int, int]:
    """Paste ``patch`` centred at ``centre``, cut by the canvas edges; the visible box."""
    h, w = patch.shape[:2]
    x1, y1 = centre[0] - w // 2, centre[1] - h // 2
    cx1, cy1 = max(x1, 0), max(y1, 0)
    cx2, cy2 = min(x1 + w, canvas.shape[1]), min(y1 + h, canvas.shape[0])
    if cx2 > cx1 and cy2 > cy1:
        canvas[cy1:cy2, cx1:cx2] = patch[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
    return cx1, cy1, max(cx1, cx2), max(cy1, cy2)


class _Tone:
    """A stereo sine tone, encoded in step with the video so that the file is interleaved."""

    FRAME_SAMPLES = 1024

    def __init__(self, out: Any, stream: Any, total_samples: int) -> None:
        self.out, self.stream, self.total = out, stream, total_samples
        self.done = 0

    def write_until(self, seconds: float) -> None:
        until = min(self.total, int(seconds * AUDIO_RATE_HZ))
        while self.done < until:
            n = min(self.FRAME_SAMPLES, self.total - self.done)
            t = (np.arange(self.done, self.done + n) / AUDIO_RATE_HZ).astype(np.float32)
            wave = (0.2 * np.sin(2 * np.pi * AUDIO_TONE_HZ * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(
                np.stack([wave, wave]), format="fltp", layout="stereo"
            )
            frame.sample_rate = AUDIO_RATE_HZ
            frame.pts = self.done
            frame.time_base = Fraction(1, AUDIO_RATE_HZ)
            for packet in self.stream.encode(frame):
                self.out.mux(packet)
            self.done += n

    def finish(self) -> None:
        self.write_until(self.total / AUDIO_RATE_HZ)
        for packet in self.stream.encode(None):
            self.out.mux(packet)

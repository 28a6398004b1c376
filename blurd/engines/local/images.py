"""Still images: decode upright, anonymize, re-encode in the same format.

EXIF orientation is applied to the pixels and the result is written upright. Nothing of the
source's metadata is written back: OpenCV's encoders write only the pixels, so EXIF (camera,
GPS position, date), XMP and ICC profiles are all dropped. An alpha channel is kept unchanged,
and so are 16-bit samples where the format allows them (PNG, TIFF).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from blurd.engines.local.arrays import Image
from blurd.engines.local.detections import DetectionsWriter
from blurd.engines.local.errors import MediaError
from blurd.engines.local.frames import FrameAnonymizer

JPEG_QUALITY = 95
WEBP_QUALITY = 95
PNG_COMPRESSION = 3  # 0-9: 3 is close to 9 in size on photos and several times faster


def anonymize_image(src: Path, dst: Path, detections: Path, anonymizer: FrameAnonymizer) -> int:
    """Anonymize the image ``src`` into ``dst`` (same format, by extension).

    Writes the detections JSON to ``detections``; returns the number of detections.
    """
    data = np.fromfile(src, dtype=np.uint8)
    image = decode(data)
    color, alpha = _split_alpha(image)
    records = anonymizer.hide(color, anonymizer.find(color))
    height, width = color.shape[:2]
    with DetectionsWriter(detections, media="image", width=width, height=height) as writer:
        writer.frame(0, 0.0, records)
    if alpha is not None:
        color = np.dstack([color, alpha])
    dst.write_bytes(encode(color, dst.suffix.lower(), lossless_webp=_is_lossless_webp(data)))
    return len(records)


def decode(data: npt.NDArray[np.uint8]) -> Image:
    """Decode image bytes upright: 3-channel BGR, or 4-channel BGRA when there is alpha."""
    if data.size == 0:
        raise MediaError("the image is empty")
    upright = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if upright is None:
        raise MediaError("the image cannot be decoded (corrupt or not an image)")
    raw = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)  # keeps alpha but ignores EXIF orientation
    if raw is None or raw.ndim != 3 or raw.shape[2] != 4:
        return _supported_depth(upright)
    return _supported_depth(_orient_like(raw, upright))


def encode(image: Image, ext: str, *, lossless_webp: bool = False) -> bytes:
    """Encode in the format named by ``ext`` at high quality."""
    params: list[int] = []
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        image = _to_8bit(image)
    elif ext == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, 101 if lossless_webp else WEBP_QUALITY]
        image = _to_8bit(image)
    elif ext == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    elif ext == ".bmp":
        image = _to_8bit(image)
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:
        raise MediaError(f"the image cannot be encoded as {ext}")
    return bytes(buf)


def _split_alpha(image: Image) -> tuple[Image, Image | None]:
    if image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3]), image[:, :, 3]
    return image, None


def _supported_depth(image: Image) -> Image:
    if image.dtype not in (np.uint8, np.uint16):
        raise MediaError(f"images with {image.dtype} samples are not supported")
    return image


def _to_8bit(image: Image) -> Image:
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    return image


_TRANSFORMS: tuple[Callable[[Image], Image], ...] = (
    lambda a: a,
    lambda a: a[:, ::-1],
    lambda a: a[::-1, ::-1],
    lambda a: a[::-1, :],
    lambda a: a.transpose(1, 0, 2),
    lambda a: a.transpose(1, 0, 2)[:, ::-1],
    lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    lambda a: a.transpose(1, 0, 2)[::-1, :],
)


def _orient_like(raw: Image, upright: Image) -> Image:
    """Turn ``raw`` (BGRA, as stored) the way the decoder turned ``upright`` (BGR, EXIF applied).

    OpenCV applies EXIF orientation only when it drops the alpha channel, so the right one of
    the eight flips and rotations is found by comparing pixels.
    """
    best, best_err = raw, float("inf")
    for transform in _TRANSFORMS:
        candidate = transform(raw)
        if candidate.shape[:2] != upright.shape[:2]:
            continue
        err = cv2.norm(np.ascontiguousarray(candidate[:, :, :3]), upright, cv2.NORM_L1)
        if err < best_err:
            best, best_err = candidate, err
    return np.ascontiguousarray(best)


def _is_lossless_webp(data: npt.NDArray[np.uint8]) -> bool:
    """Whether a WebP file holds a lossless (VP8L) image, so it is written back lossless."""
    head = data[:4096].tobytes()
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return False
    pos = 12
    while pos + 8 <= len(head):
        kind = head[pos : pos + 4]
        if kind == b"VP8L":
            return True
        if kind == b"VP8 ":
            return False
        size = int.from_bytes(head[pos + 4 : pos + 8], "little")
        pos += 8 + size + (size & 1)
    return False

"""Still images: decode upright, anonymize, re-encode in the same format.

EXIF orientation is applied to the pixels and the result is written upright. Nothing of the
source's metadata is written back: OpenCV's encoders write only the pixels, so EXIF (camera,
GPS position, date), XMP and ICC profiles are all dropped. An alpha channel is kept unchanged,
and so are 16-bit samples where the format allows them (PNG, TIFF).

Outputs are written the way the input was (quality.py reads that from the input's bytes), so
they stay about its size: a JPEG at the input's own quality, a palette PNG as a palette PNG
with the input's colours, a grayscale PNG as grayscale.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from blurd.engines.local.arrays import Image
from blurd.engines.local.detections import DetectionsWriter
from blurd.engines.local.errors import MediaError
from blurd.engines.local.frames import FrameAnonymizer
from blurd.engines.local.quality import (
    JPEG_FALLBACK_QUALITY,
    PNG_GRAY,
    PngLayout,
    jpeg_quality,
    png_layout,
)

WEBP_QUALITY = 95
# zlib level 6 with libpng's fast filter set (none, sub, up per row). Measured on the blurred
# EgoBlur JPEG photo (1080x1920) against a libpng default PNG of it: level 3 with all filters
# (what blurd wrote before) 1.02x in 181 ms, level 6 with fast filters 0.89x in 352 ms, level 9
# 0.83x in 2.6 s; the "filtered" strategy changed sizes by under 1 %, so zlib's default stays.
PNG_COMPRESSION = 6
# Palette PNGs: zlib level 6, no row filter (libpng's advice for palettes). On the EgoBlur
# palette PNGs: 0.99x and 1.01x the input in about 410 ms; the "sub" filter 1.17x, level 9
# under 1 % smaller, "filtered" strategy 1.17x, RLE 1.5x.
PALETTE_PNG_LEVEL = 6


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
    source = data.tobytes()  # quality.py jumps from header to header; it reads no pixel data
    written = encode(
        color,
        dst.suffix.lower(),
        lossless_webp=_is_lossless_webp(data),
        jpeg_quality=jpeg_quality(source),
        png=png_layout(source),
    )
    dst.write_bytes(written)
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


def encode(
    image: Image,
    ext: str,
    *,
    lossless_webp: bool = False,
    jpeg_quality: int = JPEG_FALLBACK_QUALITY,
    png: PngLayout | None = None,
) -> bytes:
    """Encode in the format named by ``ext``; ``png`` is the input's layout when it was a PNG."""
    params: list[int] = []
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
        image = _to_8bit(image)
    elif ext == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, 101 if lossless_webp else WEBP_QUALITY]
        image = _to_8bit(image)
    elif ext == ".png":
        if png is not None and png.palette is not None:
            indexed = _palette_png(image, png.palette, png.bit_depth)
            if indexed is not None:
                return indexed
        if png is not None and png.color_type == PNG_GRAY and _is_gray(image):
            image = np.ascontiguousarray(image[:, :, 0])
        params = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
        if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV 4.11 and later
            params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FAST_FILTERS]
    elif ext == ".bmp":
        image = _to_8bit(image)
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:
        raise MediaError(f"the image cannot be encoded as {ext}")
    return bytes(buf)


def _is_gray(image: Image) -> bool:
    """Whether a 3-channel image has equal channels (a gray input stays gray unless colour
    was painted on it, such as an opaque fill)."""
    return bool(
        image.ndim == 3
        and image.shape[2] == 3
        and np.array_equal(image[:, :, 0], image[:, :, 1])
        and np.array_equal(image[:, :, 0], image[:, :, 2])
    )


def _palette_png(image: Image, palette: npt.NDArray[np.uint8], bit_depth: int) -> bytes | None:
    """Write ``image`` as a palette PNG with the input's palette; None when it cannot be.

    Pixels outside the hidden regions are palette colours already and keep their exact value.
    Colours the anonymizing brought in (blur, opaque fill) are added to the palette while there
    is room in its 256 entries, else drawn with the nearest palette colour: a hidden region
    stays hidden, only its shades are coarser.
    """
    channels = palette.shape[1]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != channels:
        return None
    indices, palette = _to_indices(image, palette)
    depth = max(bit_depth, next(d for d in (1, 2, 4, 8) if len(palette) <= 1 << d))
    rows = _pack_rows(indices, depth)
    height, width = indices.shape
    rgb = palette[:, 2::-1]  # PNG stores RGB; OpenCV's channels are BGR(A)
    size = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    chunks = [(b"IHDR", size + bytes([depth, 3, 0, 0, 0])), (b"PLTE", rgb.tobytes())]
    see_through = np.flatnonzero(palette[:, 3] != 255) if channels == 4 else np.array([])
    if see_through.size:  # tRNS may stop at the last entry that is not opaque
        chunks.append((b"tRNS", palette[: see_through[-1] + 1, 3].tobytes()))
    chunks += [(b"IDAT", zlib.compress(rows, PALETTE_PNG_LEVEL)), (b"IEND", b"")]
    out = bytearray(b"\x89PNG\r\n\x1a\n")
    for kind, body in chunks:
        out += len(body).to_bytes(4, "big") + kind + body
        out += zlib.crc32(kind + body).to_bytes(4, "big")
    return bytes(out)


def _to_indices(
    image: Image, palette: npt.NDArray[np.uint8]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Palette index of every pixel, and the palette with any colours that had to be added."""
    pixels = image.reshape(-1, palette.shape[1])
    keys = _pack_colors(pixels)
    known = _pack_colors(palette)
    order = np.argsort(known, kind="stable")
    at = np.searchsorted(known[order], keys).clip(0, len(known) - 1)
    indices = order[at].astype(np.uint8)
    missing = np.flatnonzero(known[order][at] != keys)
    if missing.size:
        # each new colour once: the 105 000 blurred pixels of the EgoBlur face PNG hold far
        # fewer colours, and sorting packed keys is much faster than rows of channels
        _, first, where = np.unique(keys[missing], return_index=True, return_inverse=True)
        new = pixels[missing[first]]
        if len(palette) + len(new) <= 256:
            indices[missing] = len(palette) + where.ravel()
            palette = np.concatenate([palette, new])
        else:
            indices[missing] = _nearest(new, palette)[where.ravel()]
    return indices.reshape(image.shape[:2]), palette


def _pack_colors(colors: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint32]:
    """One integer per colour (3 or 4 channels), for exact matching."""
    packed = np.zeros(len(colors), dtype=np.uint32)
    for channel in range(colors.shape[1]):
        packed <<= 8
        packed |= colors[:, channel]
    return packed


def _nearest(colors: npt.NDArray[np.uint8], palette: npt.NDArray[np.uint8]) -> npt.NDArray[Any]:
    """Index of the nearest palette entry (squared distance) for each colour.

    |c - p|^2 = |c|^2 - 2 c.p + |p|^2 and |c|^2 is the same for every p, so a matrix product
    does it: 0.2 s for the 105 000 blurred pixels of the EgoBlur face PNG (6 188 colours, so
    a few ms as called), where broadcasting the differences took 2.2 s. Float32 is exact
    here: every term is an integer under 2^24.
    """
    ref = palette.astype(np.float32)
    norms = (ref * ref).sum(axis=1)
    out = np.empty(len(colors), dtype=np.uint8)
    for start in range(0, len(colors), 16384):  # 16 MB of distances at a time
        part = colors[start : start + 16384].astype(np.float32)
        out[start : start + 16384] = np.argmin(norms - 2 * part @ ref.T, axis=1)
    return out


def _pack_rows(indices: npt.NDArray[np.uint8], depth: int) -> bytes:
    """PNG scanlines for ``depth``-bit indices, each with filter byte 0 (none)."""
    height, width = indices.shape
    per_byte = 8 // depth
    if per_byte > 1:
        padded = np.zeros((height, -(-width // per_byte) * per_byte), dtype=np.uint8)
        padded[:, :width] = indices
        groups = padded.reshape(height, -1, per_byte)
        packed = np.zeros(groups.shape[:2], dtype=np.uint8)
        for k in range(per_byte):  # leftmost pixel in the high bits
            packed |= groups[:, :, k] << (8 - depth * (k + 1))
        indices = packed
    rows = np.zeros((height, indices.shape[1] + 1), dtype=np.uint8)
    rows[:, 1:] = indices
    return rows.tobytes()


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

"""What an input's own bytes say about how to write its output: JPEG quality, PNG layout.

Outputs are written in the input's format; writing them with the input's settings too keeps
their size near the input's. JPEG: the quality is estimated from the luminance quantization
table (libjpeg's tables are the Annex K tables scaled by quality, and most encoders use them).
PNG: the colour type, bit depth and palette are read from the header chunks, so a palette or
grayscale input is not written back as 24-bit colour (three times the size or more).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

JPEG_FALLBACK_QUALITY = 95  # when the input says nothing usable: what blurd always wrote before
# Re-encoding below 50 stacks visible blocking on top of the input's own; above 98 the file
# grows fast for nothing visible (quality 100 is about twice the size of 95).
JPEG_MIN_QUALITY, JPEG_MAX_QUALITY = 50, 98
# A table whose entries differ from the closest scaled standard table by more than this share
# of its sum on average is some other encoder's own table: its "quality" means nothing here.
JPEG_TABLE_TOLERANCE = 0.10

# ITU T.81 Annex K.1, luminance, in natural (row by row) order.
_STD_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip


def _zigzag() -> tuple[int, ...]:
    """Natural-order index of each zigzag position: DQT segments store tables in zigzag order.

    Along each anti-diagonal (row + column = s) the scan runs up-right when s is even and
    down-left when s is odd.
    """
    cells = [(r, c) for r in range(8) for c in range(8)]
    cells.sort(key=lambda rc: (rc[0] + rc[1], rc[0] if (rc[0] + rc[1]) % 2 else -rc[0]))
    return tuple(r * 8 + c for r, c in cells)


_ZIGZAG = _zigzag()


def scaled_luminance_table(quality: int, *, limit: int = 255) -> list[int]:
    """The Annex K luminance table scaled the libjpeg way for ``quality`` (1-100), natural order.

    Qualities under 50 scale by 5000 / q %, the others by 200 - 2 q %; entries are rounded and
    kept in 1..limit (255 for 8-bit tables).
    """
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(max((v * scale + 50) // 100, 1), limit) for v in _STD_LUMINANCE]


def luminance_table(data: bytes) -> tuple[list[int], int] | None:
    """The JPEG's table 0 (luminance) in natural order and its entry limit, from its DQT segments.

    Only the header is read: the scan stops at the first SOS, before the compressed data.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no table before them
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        if marker == 0xDB:
            table = _table_zero(data[pos + 4 : pos + 2 + length])
            if table is not None:
                return table
        pos += 2 + length
    return None


def _table_zero(segment: bytes) -> tuple[list[int], int] | None:
    """Table 0 of one DQT segment (which may hold several tables), natural order."""
    at = 0
    while at < len(segment):
        precision, index = segment[at] >> 4, segment[at] & 0x0F
        size = 128 if precision else 64
        body = segment[at + 1 : at + 1 + size]
        if len(body) < size or precision > 1:
            return None
        if precision:
            stored = [int.from_bytes(body[i : i + 2], "big") for i in range(0, 128, 2)]
        else:
            stored = list(body)
        if index == 0:
            natural = [0] * 64
            for zz, value in enumerate(stored):
                natural[_ZIGZAG[zz]] = value
            return natural, 32767 if precision else 255
        at += 1 + size
    return None


def estimate_jpeg_quality(data: bytes) -> int | None:
    """The libjpeg quality (1-100) whose luminance table is closest to the input's, or None.

    None when ``data`` is not a JPEG, has no luminance table, or its table is not a scaled
    standard one (off by more than ``JPEG_TABLE_TOLERANCE``).
    """
    found = luminance_table(data)
    if found is None:
        return None
    table, limit = found
    best_quality, best_error = 0, None
    for quality in range(1, 101):
        reference = scaled_luminance_table(quality, limit=limit)
        error = sum(abs(a - b) for a, b in zip(table, reference, strict=True))
        # ties go to the higher quality: the same table, and never a lower setting than needed
        if best_error is None or error <= best_error:
            best_quality, best_error = quality, error
    reference = scaled_luminance_table(best_quality, limit=limit)
    if best_error is None or best_error > JPEG_TABLE_TOLERANCE * sum(reference):
        return None
    return best_quality


def jpeg_quality(data: bytes) -> int:
    """The quality to write a JPEG output with: the input's own, kept in the sane range.

    ``JPEG_FALLBACK_QUALITY`` when the input's quality cannot be read from its tables.
    """
    estimate = estimate_jpeg_quality(data)
    if estimate is None:
        return JPEG_FALLBACK_QUALITY
    return min(max(estimate, JPEG_MIN_QUALITY), JPEG_MAX_QUALITY)


PNG_GRAY, PNG_PALETTE = 0, 3  # IHDR colour types that blurd writes back as they came


@dataclass(frozen=True)
class PngLayout:
    """How an input PNG stores its pixels (the parts blurd keeps in the output).

    ``palette`` is the PLTE colours as BGR rows, or BGRA when a tRNS chunk gives them alpha
    (missing alpha entries are opaque), in the channel order OpenCV decodes to.
    """

    color_type: int
    bit_depth: int
    palette: npt.NDArray[np.uint8] | None = None


def png_layout(data: bytes) -> PngLayout | None:
    """The input's colour type, bit depth and palette (chunks before IDAT); None if not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    pos, header, plte, trns = 8, b"", b"", b""
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if len(body) < length or kind == b"IDAT":
            break
        if kind == b"IHDR":
            header = body
        elif kind == b"PLTE":
            plte = body
        elif kind == b"tRNS":
            trns = body
        pos += 12 + length
    if len(header) < 13:
        return None
    bit_depth, color_type = header[8], header[9]
    if color_type != PNG_PALETTE:
        return PngLayout(color_type, bit_depth)
    if not plte or len(plte) % 3 or len(plte) > 3 * 256:
        return None
    rgb = np.frombuffer(plte, dtype=np.uint8).reshape(-1, 3)
    palette = np.ascontiguousarray(rgb[:, ::-1])
    if trns:
        alpha = np.full(len(rgb), 255, dtype=np.uint8)
        given = np.frombuffer(trns[: len(rgb)], dtype=np.uint8)
        alpha[: len(given)] = given
        palette = np.column_stack([palette, alpha])
    return PngLayout(color_type, bit_depth, palette)

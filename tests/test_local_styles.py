"""The local engine's styles: what changes inside a region, and that nothing changes outside."""

from __future__ import annotations

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("cv2")
pytest.importorskip("av")
pytest.importorskip("onnxruntime")  # frames.py loads the detector module

from blurd.engines.local.frames import FrameAnonymizer, Hit  # noqa: E402
from blurd.engines.local.styles import (  # noqa: E402
    Region,
    anonymize,
    anonymize_yuv420,
    parse_color,
    region_of,
)
from blurd.engines.local.testing import detail  # noqa: E402
from blurd.options import Area, Options  # noqa: E402

REGION = Region(40, 30, 140, 150)


def noisy(height: int = 200, width: int = 240, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def outside(mask_shape: tuple[int, int], region: Region) -> np.ndarray:
    keep = np.ones(mask_shape, dtype=bool)
    keep[max(region.y1, 0) : region.y2, max(region.x1, 0) : region.x2] = False
    return keep


@pytest.mark.parametrize("style", ["blur", "opaque", "pixelate"])
def test_each_style_changes_pixels_only_inside_the_region(style: str) -> None:
    """Every style alters the region and leaves every pixel outside its box untouched."""
    frame = noisy()
    before = frame.copy()
    anonymize(frame, [REGION], Options(style=style, color="#102030", pixels=8))  # type: ignore[arg-type]
    keep = outside(frame.shape[:2], REGION)
    assert np.array_equal(frame[keep], before[keep])
    inside = frame[REGION.y1 : REGION.y2, REGION.x1 : REGION.x2]
    original = before[REGION.y1 : REGION.y2, REGION.x1 : REGION.x2]
    assert np.mean(inside != original) > 0.5


def test_blur_is_an_ellipse_that_removes_detail() -> None:
    """Blur fills the inscribed ellipse (corners of the box keep their pixels) and kills detail."""
    frame = noisy()
    before = frame.copy()
    anonymize(frame, [REGION], Options(style="blur"))
    assert np.array_equal(frame[REGION.y1, REGION.x1], before[REGION.y1, REGION.x1])  # a corner
    cy, cx = (REGION.y1 + REGION.y2) // 2, (REGION.x1 + REGION.x2) // 2
    core = (slice(cy - 25, cy + 25), slice(cx - 25, cx + 25))
    assert detail(frame[core]) < detail(before[core]) / 100


def test_opaque_fills_with_the_colour() -> None:
    """Opaque paints the whole region in ``color`` (#RRGGBB, stored as BGR)."""
    frame = noisy()
    anonymize(frame, [REGION], Options(style="opaque", color="#FF8000"))
    roi = frame[REGION.y1 : REGION.y2, REGION.x1 : REGION.x2]
    assert (roi == np.array([0, 128, 255], dtype=np.uint8)).all()
    assert parse_color("#FF8000") == (0, 128, 255)


def test_pixelate_makes_blocks_of_the_given_size() -> None:
    """Pixelate turns the region into uniform blocks of ``pixels`` x ``pixels``."""
    frame = noisy()
    anonymize(frame, [REGION], Options(style="pixelate", pixels=20))
    block = frame[REGION.y1 : REGION.y1 + 20, REGION.x1 : REGION.x1 + 20]
    assert (block == block[0, 0]).all()
    next_block = frame[REGION.y1 : REGION.y1 + 20, REGION.x1 + 20 : REGION.x1 + 40]
    assert not np.array_equal(block[0, 0], next_block[0, 0])


def test_region_grows_by_the_mask_scale_and_the_padding() -> None:
    """A 100 px box grows by 30 px per side (mask scale 1.3), plus ``padding`` pixels."""
    assert region_of(100, 100, 200, 200, padding=0) == Region(70, 70, 230, 230)
    assert region_of(100, 100, 200, 200, padding=10) == Region(60, 60, 240, 240)


def test_a_region_past_the_frame_edge_is_hidden_where_it_is_visible() -> None:
    """A face cut by the edge: the visible part of its region is still hidden."""
    frame = noisy()
    before = frame.copy()
    cut = Region(-60, 50, 60, 170)
    anonymize(frame, [cut], Options(style="blur"))
    assert detail(frame[90:130, 0:30]) < detail(before[90:130, 0:30]) / 50


class FixedDetector:
    """Stands in for the face model: always finds the same boxes."""

    def __init__(self, boxes: list[list[float]]) -> None:
        self.boxes = np.array(boxes, dtype=np.float32).reshape(-1, 5)

    def detect(self, bgr: np.ndarray, **_: object) -> np.ndarray:
        return self.boxes.copy()


def test_area_keeps_only_detections_whose_centre_lies_inside() -> None:
    """With area = right half, a face on the left stays as it is; the right one is hidden."""
    frame = noisy(200, 400)
    before = frame.copy()
    left, right = [40, 60, 100, 140, 0.9], [260, 60, 320, 140, 0.8]
    options = Options(area=Area(left=0.5, top=0.0, right=1.0, bottom=1.0))
    anonymizer = FrameAnonymizer(FixedDetector([left, right]), options)  # type: ignore[arg-type]
    hits = anonymizer.find(frame)
    records = anonymizer.hide(frame, hits)
    assert [r.box for r in records] == [(260, 60, 320, 140)]
    assert np.array_equal(frame[:, :200], before[:, :200])
    assert not np.array_equal(frame[:, 200:], before[:, 200:])


def test_faces_switch_off_finds_nothing() -> None:
    """faces = false: no detection is made, so nothing is hidden."""
    anonymizer = FrameAnonymizer(FixedDetector([[1, 1, 50, 50, 0.9]]), Options(faces=False))  # type: ignore[arg-type]
    assert anonymizer.find(noisy()) == []


def test_detections_found_on_a_downscaled_copy_come_back_in_full_frame_pixels() -> None:
    """Video detection runs on a smaller copy; its boxes are scaled to the full frame."""
    anonymizer = FrameAnonymizer(FixedDetector([[10, 20, 30, 40, 0.9]]), Options())  # type: ignore[arg-type]
    (hit,) = anonymizer.find(noisy(100, 160), width=320, height=200)
    assert (hit.x1, hit.y1, hit.x2, hit.y2) == (20, 40, 60, 80)


@pytest.mark.parametrize("style", ["blur", "opaque", "pixelate"])
def test_yuv_planes_change_only_inside_the_region(style: str) -> None:
    """On 4:2:0 video planes, luma changes only in the region and chroma in its half-size."""
    rng = np.random.default_rng(3)
    y = rng.integers(16, 236, (120, 160), dtype=np.uint8)
    u = rng.integers(16, 240, (60, 80), dtype=np.uint8)
    v = rng.integers(16, 240, (60, 80), dtype=np.uint8)
    before = (y.copy(), u.copy(), v.copy())
    region = Region(40, 20, 100, 90)
    anonymize_yuv420((y, u, v), [region], Options(style=style), bt709=True)  # type: ignore[arg-type]
    assert np.array_equal(y[outside(y.shape, region)], before[0][outside(y.shape, region)])
    half = Region(20, 10, 50, 45)
    assert np.array_equal(u[outside(u.shape, half)], before[1][outside(u.shape, half)])
    assert np.mean(y[20:90, 40:100] != before[0][20:90, 40:100]) > 0.5


def test_opaque_on_yuv_gives_the_colour_back_in_rgb() -> None:
    """Opaque on video planes uses the colour matrix, so black stays black (Y=16, U=V=128)."""
    y = np.full((40, 40), 200, dtype=np.uint8)
    u = np.full((20, 20), 90, dtype=np.uint8)
    v = np.full((20, 20), 90, dtype=np.uint8)
    anonymize_yuv420((y, u, v), [Region(0, 0, 40, 40)], Options(style="opaque"), bt709=True)
    assert (y == 16).all() and (u == 128).all() and (v == 128).all()


def test_hits_held_between_detections_are_marked_in_the_records() -> None:
    """A box carried over from a neighbouring frame is recorded with ``held``."""
    anonymizer = FrameAnonymizer(None, Options())
    records = anonymizer.hide(noisy(), [Hit("face", 10, 10, 50, 60, 0.7, held=True)])
    assert records[0].as_json() == {
        "class": "face",
        "box": [10, 10, 50, 60],
        "score": 0.7,
        "held": True,
    }

"""The packaged CenterFace model on onnxruntime's CPU provider: any size, faces at the edge."""

from __future__ import annotations

import pytest

np = pytest.importorskip("numpy")
cv2 = pytest.importorskip("cv2")
pytest.importorskip("av")
pytest.importorskip("onnxruntime")

from blurd.engines.local.detect import PROVIDER, FaceDetector, model_bytes  # noqa: E402
from blurd.engines.local.testing import gradient_image  # noqa: E402
from tests.conftest import EGOBLUR, needs_samples  # noqa: E402


@pytest.fixture(scope="module")
def person() -> np.ndarray:
    if not EGOBLUR.is_dir():
        pytest.skip(f"{EGOBLUR} is missing")
    return cv2.resize(cv2.imread(str(EGOBLUR / "gen1-test_image.jpg")), (540, 960))


def test_the_model_ships_in_the_package_and_runs_on_the_cpu_provider(
    detector: FaceDetector,
) -> None:
    """The converted model is package data and the session uses CPUExecutionProvider only."""
    assert len(model_bytes()) > 5_000_000
    assert detector.session.get_providers() == [PROVIDER]


def test_any_input_size_is_accepted(detector: FaceDetector) -> None:
    """The converted model has a dynamic input: odd sizes run, one after the other."""
    for width, height in [(333, 211), (640, 480), (97, 1000)]:
        assert detector.detect(gradient_image(width, height)).shape == (0, 5)


@needs_samples
def test_the_face_is_found_at_full_and_reduced_inference_width(
    detector: FaceDetector, person: np.ndarray
) -> None:
    """One face, with a confident score, at full resolution and at 320 px inference."""
    for width in (None, 320):
        boxes = detector.detect(person, infer_width=width)
        assert len(boxes) == 1 and boxes[0, 4] > 0.8
        x1, y1, x2, y2 = boxes[0, :4]
        assert 200 < (x1 + x2) / 2 < 320 and 100 < (y1 + y2) / 2 < 200


@needs_samples
@pytest.mark.parametrize("side", ["left", "right", "top", "bottom"])
def test_a_face_cut_by_the_frame_edge_is_still_found(
    detector: FaceDetector, person: np.ndarray, side: str
) -> None:
    """With 60 % of the face outside the frame, a box still covers the visible part."""
    (x1, y1, x2, y2, _score), *_ = detector.detect(person).tolist()
    w, h = x2 - x1, y2 - y1
    cut_x, cut_y = int(w * 0.6), int(h * 0.6)
    crops = {
        "left": person[:, int(x1) + cut_x :],
        "right": person[:, : int(x2) - cut_x],
        "top": person[int(y1) + cut_y :, :],
        "bottom": person[: int(y2) - cut_y, :],
    }
    crop = np.ascontiguousarray(crops[side])
    boxes = detector.detect(crop)
    assert len(boxes) >= 1, side
    bx1, by1, bx2, by2 = boxes[0, :4]
    ch, cw = crop.shape[:2]
    touches = {"left": bx1 <= 2, "right": bx2 >= cw - 2, "top": by1 <= 2, "bottom": by2 >= ch - 2}
    assert touches[side], (side, boxes[0])

"""The local engine on still images: real faces lose their detail, the rest stays as it was."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
cv2 = pytest.importorskip("cv2")
pytest.importorskip("av")
pytest.importorskip("onnxruntime")

from blurd.engines.local.detect import FaceDetector  # noqa: E402
from blurd.engines.local.errors import MediaError  # noqa: E402
from blurd.engines.local.frames import FrameAnonymizer  # noqa: E402
from blurd.engines.local.images import anonymize_image  # noqa: E402
from blurd.engines.local.testing import detail, gradient_image  # noqa: E402
from blurd.options import Options  # noqa: E402
from tests.conftest import EGOBLUR, needs_samples  # noqa: E402


def sample(name: str, width: int) -> np.ndarray:
    image = cv2.imread(str(EGOBLUR / name))
    height = round(image.shape[0] * width / image.shape[1])
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def run(
    tmp_path: Path, image: np.ndarray, detector: FaceDetector, ext: str = ".png", **options: object
) -> tuple[np.ndarray, dict[str, object]]:
    src, dst, found = tmp_path / f"in{ext}", tmp_path / f"out{ext}", tmp_path / "out.json"
    cv2.imwrite(str(src), image)
    anonymize_image(src, dst, found, FrameAnonymizer(detector, Options(**options)))  # type: ignore[arg-type]
    return cv2.imread(str(dst), cv2.IMREAD_UNCHANGED), json.loads(found.read_text())


@needs_samples
@pytest.mark.parametrize(
    ("name", "width", "faces"),
    [("gen1-test_image.jpg", 540, 1), ("gen2-test_face_image.png", 1280, 2)],
)
def test_faces_in_the_egoblur_samples_lose_their_detail(
    tmp_path: Path, detector: FaceDetector, name: str, width: int, faces: int
) -> None:
    """Every face is found, and the detail inside its box drops by more than 90 %."""
    image = sample(name, width)
    out, found = run(tmp_path, image, detector)
    (frame,) = found["frames"]  # type: ignore[index]
    boxes = [d["box"] for d in frame["detections"]]
    assert len(boxes) == faces
    for x1, y1, x2, y2 in boxes:
        # the middle of the face box: eyes, nose and mouth
        w, h = x2 - x1, y2 - y1
        core = (slice(y1 + h // 4, y2 - h // 4), slice(x1 + w // 4, x2 - w // 4))
        assert detail(out[core]) < 0.1 * detail(image[core]), (name, (x1, y1, x2, y2))


@needs_samples
def test_regions_far_from_faces_are_unchanged(tmp_path: Path, detector: FaceDetector) -> None:
    """Outside the grown face regions, a PNG output is pixel-equal to the input."""
    image = sample("gen2-test_face_image.png", 1280)
    out, found = run(tmp_path, image, detector)
    keep = np.ones(image.shape[:2], dtype=bool)
    for det in found["frames"][0]["detections"]:  # type: ignore[index]
        x1, y1, x2, y2 = det["box"]
        w, h = x2 - x1, y2 - y1  # regions grow by 30 % per side: 50 % is safely outside
        keep[max(0, y1 - h // 2) : y2 + h // 2, max(0, x1 - w // 2) : x2 + w // 2] = False
    assert keep.mean() > 0.9
    assert np.array_equal(out[keep], image[keep])


@needs_samples
def test_a_jpeg_stays_a_high_quality_jpeg_away_from_faces(
    tmp_path: Path, detector: FaceDetector
) -> None:
    """JPEG in, JPEG out at high quality: far from faces only re-encoding noise is left."""
    image = sample("gen1-test_image.jpg", 540)
    out, found = run(tmp_path, image, detector, ext=".jpg")
    _, y1, _, y2 = found["frames"][0]["detections"][0]["box"]  # type: ignore[index]
    below = image[y2 + (y2 - y1) :, :]
    diff = np.abs(out[y2 + (y2 - y1) :, :].astype(int) - below.astype(int))
    assert diff.mean() < 2.0
    assert (tmp_path / "out.jpg").read_bytes()[:2] == b"\xff\xd8"


def test_a_face_free_image_passes_through_untouched(tmp_path: Path, detector: FaceDetector) -> None:
    """A generated gradient with noise: 0 detections and the very same pixels."""
    image = gradient_image(640, 480)
    out, found = run(tmp_path, image, detector)
    assert found == {
        "engine": "local",
        "version": 1,
        "media": "image",
        "width": 640,
        "height": 480,
        "frames": [{"index": 0, "time_s": 0.0, "detections": []}],
    }
    assert np.array_equal(out, image)


@pytest.mark.parametrize("ext", [".png", ".webp", ".bmp", ".tif", ".tiff", ".jpeg"])
def test_each_image_format_comes_back_in_the_same_format(
    tmp_path: Path, detector: FaceDetector, ext: str
) -> None:
    """PNG, WEBP, BMP and TIFF are written in their own format, same size."""
    image = gradient_image(96, 64)
    out, _ = run(tmp_path, image, detector, ext=ext)
    assert out.shape == image.shape
    head = (tmp_path / f"out{ext}").read_bytes()[:12]
    magic = {
        ".png": b"\x89PNG",
        ".webp": b"RIFF",
        ".bmp": b"BM",
        ".tif": b"II*\x00",
        ".tiff": b"II*\x00",
        ".jpeg": b"\xff\xd8",
    }[ext]
    assert head.startswith(magic)


def test_alpha_and_16_bit_samples_are_kept(tmp_path: Path, detector: FaceDetector) -> None:
    """A 16-bit PNG with alpha comes back 16-bit with the same alpha channel."""
    base = gradient_image(64, 48).astype(np.uint16) * 257
    alpha = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (48, 1))
    image = np.dstack([base, alpha])
    out, _ = run(tmp_path, image, detector)
    assert out.dtype == np.uint16 and out.shape == (48, 64, 4)
    assert np.array_equal(out, image)


def exif_segment(orientation: int) -> bytes:
    """An EXIF APP1 segment with an orientation, a camera make and a GPS IFD."""
    make = b"SpyCam\x00\x00"
    entries = 3
    ifd0_size = 2 + entries * 12 + 4
    make_at = 8 + ifd0_size
    gps_at = make_at + len(make)
    ifd0 = struct.pack("<H", entries)
    ifd0 += struct.pack("<HHII", 0x010F, 2, len(make) - 1, make_at)  # Make
    ifd0 += struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)  # Orientation
    ifd0 += struct.pack("<HHII", 0x8825, 4, 1, gps_at)  # GPS IFD pointer
    ifd0 += struct.pack("<I", 0)
    gps = struct.pack("<H", 1) + struct.pack("<HHI4s", 0x0001, 2, 2, b"N\x00\x00\x00")
    gps += struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd0 + make + gps
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def test_exif_orientation_is_applied_and_metadata_is_dropped(
    tmp_path: Path, detector: FaceDetector
) -> None:
    """Orientation 6 (turn 90° clockwise) is applied to the pixels; EXIF, make and GPS are gone."""
    stored = np.zeros((40, 80, 3), dtype=np.uint8)
    stored[:, :40] = (0, 0, 255)  # left half red, right half blue, as stored
    stored[:, 40:] = (255, 0, 0)
    ok, jpeg = cv2.imencode(".jpg", stored, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    data = jpeg.tobytes()
    src = tmp_path / "in.jpg"
    src.write_bytes(data[:2] + exif_segment(6) + data[2:])
    dst, found = tmp_path / "out.jpg", tmp_path / "out.json"
    anonymize_image(src, dst, found, FrameAnonymizer(detector, Options()))
    out = cv2.imread(str(dst), cv2.IMREAD_IGNORE_ORIENTATION | cv2.IMREAD_COLOR)
    assert out.shape[:2] == (80, 40)  # upright: turned a quarter
    assert out[5, 20, 2] > 200 and out[75, 20, 0] > 200  # red on top, blue below
    written = dst.read_bytes()
    assert b"Exif" not in written and b"SpyCam" not in written
    assert b"\xff\xe1" not in written[:4096]


def test_a_corrupt_image_fails_with_one_sentence(tmp_path: Path, detector: FaceDetector) -> None:
    """Bytes that are not an image raise MediaError with a short reason, not a trace."""
    src = tmp_path / "broken.jpg"
    src.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(MediaError, match="cannot be decoded"):
        anonymize_image(
            src, tmp_path / "o.jpg", tmp_path / "o.json", FrameAnonymizer(detector, Options())
        )

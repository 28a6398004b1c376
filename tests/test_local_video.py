"""The local engine on videos: frames, timing and sound kept; faces hidden in every frame."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
cv2 = pytest.importorskip("cv2")
av = pytest.importorskip("av")
pytest.importorskip("onnxruntime")

from blurd.engines.local.detect import FaceDetector  # noqa: E402
from blurd.engines.local.errors import MediaError  # noqa: E402
from blurd.engines.local.frames import FrameAnonymizer, Hit  # noqa: E402
from blurd.engines.local.schedule import DetectionSchedule, carried, unmatched  # noqa: E402
from blurd.engines.local.testing import detail, face_crop, gradient_image, make_clip  # noqa: E402
from blurd.engines.local.video import DETECT_EVERY, anonymize_video  # noqa: E402
from blurd.options import Options  # noqa: E402
from tests.conftest import EGOBLUR, needs_samples  # noqa: E402

GEN1_FACE = (465, 103, 714, 461)  # the face box in gen1-test_image.jpg


def streams(path: Path) -> dict[str, object]:
    """Counts, sizes and durations of a media file's streams."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        audio = [p for p in container.demux(audio=0) if p.size] if container.streams.audio else []
        return {
            "frames": frames,
            "size": (video.codec_context.width, video.codec_context.height),
            "audio_packets": [bytes(p) for p in audio],
            "duration_s": float(container.duration or 0) / 1e6,
        }


def test_frame_count_duration_and_audio_packets_are_kept(
    tmp_path: Path, detector: FaceDetector
) -> None:
    """A 1.5 s clip with AAC sound: same frame count, duration, and byte-identical audio."""
    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    make_clip(
        src,
        background=gradient_image(400, 300),
        faces=[],
        width=320,
        height=240,
        seconds=1.5,
        fps=30,
    )
    written = anonymize_video(src, dst, tmp_path / "out.json", FrameAnonymizer(detector, Options()))
    before, after = streams(src), streams(dst)
    assert written == before["frames"] == after["frames"] == 45
    assert after["size"] == (320, 240)
    assert len(after["audio_packets"]) == len(before["audio_packets"]) > 50  # type: ignore[arg-type]
    assert after["audio_packets"] == before["audio_packets"]
    assert abs(after["duration_s"] - before["duration_s"]) < 1 / 30  # type: ignore[operator]
    with av.open(str(dst)) as container:
        assert container.streams.video[0].codec_context.name == "h264"


@needs_samples
@pytest.mark.parametrize("face_px", [110, 70, 50])
def test_a_moving_face_is_hidden_in_every_frame(
    tmp_path: Path, detector: FaceDetector, face_px: int
) -> None:
    """With the default detection interval, no frame shows the detail of a face that moves
    up to 21 px a frame: for the smaller crops, several face sizes between two detections."""
    assert DETECT_EVERY >= 2  # the frames in between are what this test is about
    man = face_crop(cv2.imread(str(EGOBLUR / "gen1-test_image.jpg")), GEN1_FACE, face_px)
    src, dst, found = tmp_path / "in.mp4", tmp_path / "out.mp4", tmp_path / "out.json"
    placed = make_clip(
        src,
        background=gradient_image(600, 400),
        faces=[man],
        width=480,
        height=320,
        seconds=2.0,
        fps=30,
        audio=False,
    )
    anonymize_video(src, dst, found, FrameAnonymizer(detector, Options()))
    checked = 0
    with av.open(str(src)) as a, av.open(str(dst)) as b:
        pairs = zip(a.decode(video=0), b.decode(video=0), strict=True)
        for index, (fa, fb) in enumerate(pairs):
            x1, y1, x2, y2 = placed[index][0]
            if (x2 - x1) * (y2 - y1) < 0.6 * man.shape[0] * man.shape[1]:
                continue  # mostly outside the frame
            w, h = x2 - x1, y2 - y1
            core = (slice(y1 + h // 3, y2 - h // 3), slice(x1 + w // 4, x2 - w // 4))
            before = detail(fa.to_ndarray(format="bgr24")[core])
            after = detail(fb.to_ndarray(format="bgr24")[core])
            assert after < 0.2 * before, f"frame {index}: detail {after:.0f} of {before:.0f}"
            checked += 1
    assert checked >= 40
    doc = json.loads(found.read_text())
    assert doc["media"] == "video" and len(doc["frames"]) == 60
    assert [f["index"] for f in doc["frames"]] == list(range(60))
    assert any(d.get("held") for f in doc["frames"] for d in f["detections"])


def test_boxes_carried_between_detections_span_the_motion() -> None:
    """A face seen at x=0-50, then at x=60-110: frames in between hide the whole path."""
    before = [Hit("face", 0, 10, 50, 60, 0.9)]
    after = [Hit("face", 60, 12, 110, 62, 0.8), Hit("face", 300, 300, 340, 350, 0.7)]
    between = carried(before, after)
    assert Hit("face", 0, 10, 110, 62, 0.8, held=True) in between
    assert Hit("face", 300, 300, 340, 350, 0.7, held=True) in between  # a face appearing
    assert carried([Hit("face", 0, 0, 10, 10, 0.5)], []) == [
        Hit("face", 0, 0, 10, 10, 0.5, held=True)  # a face leaving
    ]


def test_boxes_left_alone_on_both_sides_are_paired_nearest_first() -> None:
    """A fast face (2.5 sizes between detections) is spanned; boxes 6 sizes apart are not."""
    before = [Hit("face", 0, 0, 40, 40, 0.9), Hit("face", 1000, 0, 1040, 40, 0.9)]
    after = [Hit("face", 100, 0, 140, 40, 0.8), Hit("face", 1240, 0, 1280, 40, 0.8)]
    between = carried(before, after)
    assert Hit("face", 0, 0, 140, 40, 0.8, held=True) in between  # 100 px: 2.5 sizes
    assert Hit("face", 1000, 0, 1040, 40, 0.9, held=True) in between  # 240 px: 6 sizes
    assert Hit("face", 1240, 0, 1280, 40, 0.8, held=True) in between
    assert len(between) == 3
    # two candidates for one leaving face: the nearer one is its partner, the other stays
    near, far = Hit("face", 90, 0, 130, 40, 0.7), Hit("face", 0, 120, 40, 160, 0.6)
    assert sorted(carried(before[:1], [far, near]), key=lambda h: h.x2) == [
        Hit("face", 0, 120, 40, 160, 0.6, held=True),
        Hit("face", 0, 0, 130, 40, 0.7, held=True),
    ]


class Frame:
    """A stand-in for a decoded frame: the schedule only reads its index."""

    def __init__(self, index: int) -> None:
        self.index = index


def test_the_schedule_detects_every_nth_and_the_last_frame_and_writes_all_in_order() -> None:
    """Every 3rd frame and the last are detected; all frames are written once, in order."""
    seen: list[int] = []
    written: list[tuple[int, list[Hit]]] = []

    def find(frame: Frame) -> list[Hit]:
        seen.append(frame.index)
        x = 10.0 * frame.index  # one face moving 10 px per frame; lost on frame 6
        return [] if frame.index == 6 else [Hit("face", x, 0, x + 40, 40, 0.9)]

    count = DetectionSchedule(find, lambda f, h: written.append((f.index, h)), every=3).run(
        Frame(i) for i in range(8)
    )
    assert count == 8
    assert sorted(seen) == [0, 3, 6, 7]
    assert [i for i, _ in written] == list(range(8))
    hits = dict(written)
    assert hits[1] == [Hit("face", 0, 0, 70, 40, 0.9, held=True)]  # spans frames 0 to 3
    assert hits[6] == unmatched(hits[3], [])  # the miss on frame 6 keeps frame 3's box


def test_a_face_missed_once_is_spanned_to_its_next_detection() -> None:
    """Missed on frame 3, the face seen on frames 0 and 6 stays covered on frames 4 and 5."""
    boxes = {0: [Hit("face", 0, 0, 40, 40, 0.9)], 3: [], 6: [Hit("face", 120, 0, 160, 40, 0.8)]}
    written: dict[int, list[Hit]] = {}

    def keep(frame: Frame, hits: list[Hit]) -> None:
        written[frame.index] = hits

    DetectionSchedule(lambda f: boxes[f.index], keep, every=3).run(Frame(i) for i in range(7))
    assert written[3] == [Hit("face", 0, 0, 40, 40, 0.9, held=True)]
    for index in (4, 5):
        assert written[index] == [Hit("face", 0, 0, 160, 40, 0.8, held=True)]
    assert written[6] == [Hit("face", 120, 0, 160, 40, 0.8)]  # held boxes go no further


def test_a_rotated_phone_video_is_written_upright(tmp_path: Path, detector: FaceDetector) -> None:
    """Display rotation metadata is applied to the pixels; the output needs no rotation."""
    background = np.zeros((240, 320, 3), dtype=np.uint8)
    background[:, :160] = (0, 0, 255)  # left red, right blue, as stored
    background[:, 160:] = (255, 0, 0)
    src, dst = tmp_path / "in.mov", tmp_path / "out.mov"
    make_clip(
        src, background=background, faces=[], width=320, height=240, seconds=0.3, rotation=-90
    )
    anonymize_video(src, dst, tmp_path / "out.json", FrameAnonymizer(detector, Options()))
    with av.open(str(dst)) as container:
        frame = next(container.decode(video=0))
        assert (frame.width, frame.height) == (240, 320)
        assert not frame.rotation
        image = frame.to_ndarray(format="bgr24")
    # -90 means "turn clockwise to display": the stored left (red) becomes the top
    assert image[20, 120, 2] > 200 and image[300, 120, 0] > 200


@pytest.mark.parametrize("ext", [".mkv", ".mov", ".avi"])
def test_other_containers_come_back_in_their_own_container(
    tmp_path: Path, detector: FaceDetector, ext: str
) -> None:
    """MKV, MOV and AVI in, the same container out, H.264 with the sound copied."""
    src, dst = tmp_path / f"in{ext}", tmp_path / f"out{ext}"
    make_clip(
        src, background=gradient_image(200, 150), faces=[], width=160, height=120, seconds=0.5
    )
    anonymize_video(src, dst, tmp_path / "out.json", FrameAnonymizer(detector, Options()))
    before, after = streams(src), streams(dst)
    assert after["frames"] == before["frames"] == 15
    assert after["audio_packets"] == before["audio_packets"]
    with av.open(str(dst)) as container:
        assert container.format.name.split(",")[0] in {"matroska", "mov", "avi"}


def test_a_corrupt_video_fails_with_one_sentence(tmp_path: Path, detector: FaceDetector) -> None:
    """A file that is no video raises MediaError with a short reason."""
    src = tmp_path / "broken.mp4"
    src.write_bytes(b"\x00\x00\x00\x18ftypmp42 and then nothing useful" * 10)
    with pytest.raises(MediaError, match="video"):
        anonymize_video(
            src, tmp_path / "o.mp4", tmp_path / "o.json", FrameAnonymizer(detector, Options())
        )

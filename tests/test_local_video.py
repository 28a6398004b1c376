"""The local engine on videos: frames, timing and sound kept; faces hidden in every frame."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

np = pytest.importorskip("numpy")
cv2 = pytest.importorskip("cv2")
av = pytest.importorskip("av")
pytest.importorskip("onnxruntime")

from blurd.engines.local.containers import CONTAINERS, FrameTimes, grid_rate  # noqa: E402
from blurd.engines.local.detect import FaceDetector  # noqa: E402
from blurd.engines.local.errors import MediaError  # noqa: E402
from blurd.engines.local.files import VIDEO_EXTENSIONS  # noqa: E402
from blurd.engines.local.frames import FrameAnonymizer, Hit  # noqa: E402
from blurd.engines.local.schedule import DetectionSchedule, carried, unmatched  # noqa: E402
from blurd.engines.local.testing import detail, face_crop, gradient_image, make_clip  # noqa: E402
from blurd.engines.local.video import DETECT_EVERY, anonymize_video  # noqa: E402
from blurd.metadata.policy import Policy  # noqa: E402
from blurd.metadata.video import carry_video_metadata  # noqa: E402
from blurd.options import Options  # noqa: E402
from tests.conftest import EGOBLUR, needs_samples  # noqa: E402

GEN1_FACE = (465, 103, 714, 461)  # the face box in gen1-test_image.jpg


@dataclass(frozen=True)
class Streams:
    """Counts, sizes and durations of a media file's streams."""

    frames: int
    times_s: list[float]  # each video frame's presentation time
    size: tuple[int, int]
    audio_packets: list[bytes]  # the first sound stream's, as stored
    audio_s: float  # the first sound stream's length, from its decoded samples
    duration_s: float  # the container's


def streams(path: Path) -> Streams:
    """Reads ``path`` by its content (as the engine does)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        times = [float(f.time or 0) for f in container.decode(video=0)]
        size = (video.codec_context.width, video.codec_context.height)
    with av.open(str(path)) as container:
        sound = container.streams.audio[0] if container.streams.audio else None
        samples = sum(f.samples for f in container.decode(sound)) if sound is not None else 0
        rate = sound.codec_context.sample_rate if sound is not None else 1
    with av.open(str(path)) as container:
        audio = [p for p in container.demux(audio=0) if p.size] if container.streams.audio else []
        return Streams(
            frames=len(times),
            times_s=times,
            size=size,
            audio_packets=[bytes(p) for p in audio],
            audio_s=samples / rate,
            duration_s=float(container.duration or 0) / 1e6,
        )


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
    result = anonymize_video(src, dst, tmp_path / "out.json", FrameAnonymizer(detector, Options()))
    before, after = streams(src), streams(dst)
    assert result.frames == before.frames == after.frames == 45
    assert after.size == (320, 240)
    assert len(after.audio_packets) == len(before.audio_packets) > 50
    assert after.audio_packets == before.audio_packets
    assert abs(after.duration_s - before.duration_s) < 1 / 30
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


SECRET = "blurd-secret-tag-5e1f"  # written as the inputs' title and location


@dataclass(frozen=True)
class Source:
    """An input clip as a device or program of that container would write it."""

    video: str  # encoder
    audio: str  # encoder
    muxer: str | None = None  # None: FFmpeg's guess from the name
    rate_hz: int = 48_000
    layout: str = "stereo"
    muxer_options: dict[str, str] = field(default_factory=dict)


SOURCE_FPS = 24
SOURCE_FRAMES = 24


def make_source(path: Path, source: Source) -> None:
    """A 1 s, 160x120 clip with a tone, tagged with SECRET, in the given codecs and muxer."""
    picture = gradient_image(200, 150)
    with av.open(str(path), "w", format=source.muxer, options=source.muxer_options) as out:
        out.metadata.update({"title": SECRET, "location": f"+48.8584+002.2945/{SECRET}"})
        video: Any = out.add_stream(source.video, rate=SOURCE_FPS)
        video.width, video.height, video.pix_fmt = 160, 120, "yuv420p"
        sound: Any = out.add_stream(source.audio, rate=source.rate_hz)
        sound.layout = source.layout
        channels = 1 if source.layout == "mono" else 2
        samples = source.rate_hz // SOURCE_FPS
        for i in range(SOURCE_FRAMES):
            frame = av.VideoFrame.from_ndarray(picture[i : i + 120, i : i + 160], format="bgr24")
            frame.pts, frame.time_base = i, Fraction(1, SOURCE_FPS)
            out.mux(video.encode(frame))
            t = np.arange(i * samples, (i + 1) * samples) / source.rate_hz
            wave = np.tile((0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), (channels, 1))
            tone = av.AudioFrame.from_ndarray(wave, format="fltp", layout=source.layout)
            tone.sample_rate, tone.pts = source.rate_hz, i * samples
            tone.time_base = Fraction(1, source.rate_hz)
            out.mux(sound.encode(tone))
        out.mux(video.encode(None))
        out.mux(sound.encode(None))


@dataclass(frozen=True)
class Expected:
    """What the output must be: read back by content, not by name."""

    demuxer: str
    video: str
    audio: str
    copied: bool = True
    packet_bytes: int | None = None  # TS packet size: 188, or 192 for M2TS
    brand: str | None = None  # MP4 family: the ftyp major brand
    doctype: bytes | None = None  # Matroska family: the EBML DocType
    mpeg2_pack: bool = False  # program streams: MPEG-2 pack headers, not MPEG-1 system ones


M2TS = {"mpegts_m2ts_mode": "1"}
MP4_FAMILY = "mov,mp4,m4a,3gp,3g2,mj2"
CONTAINER_CASES = {
    ".mkv": (Source("libx264", "aac"), Expected("matroska,webm", "h264", "aac")),
    ".mov": (Source("libx264", "aac"), Expected(MP4_FAMILY, "h264", "aac")),
    ".avi": (Source("libx264", "libmp3lame"), Expected("avi", "h264", "mp3")),
    ".m4v": (Source("libx264", "aac"), Expected(MP4_FAMILY, "h264", "aac", brand="M4V ")),
    # an old phone: MPEG-4 Part 2 and AMR-NB, which 3GP carries as it is
    ".3gp": (
        Source("mpeg4", "libopencore_amrnb", rate_hz=8000, layout="mono"),
        Expected(MP4_FAMILY, "h264", "amr_nb", brand="3gp6"),
    ),
    ".ts": (Source("libx264", "aac"), Expected("mpegts", "h264", "aac", packet_bytes=188)),
    # an AVCHD camera: H.264 and AC-3 in 192-byte packets
    ".mts": (
        Source("libx264", "ac3", muxer="mpegts", muxer_options=M2TS),
        Expected("mpegts", "h264", "ac3", packet_bytes=192),
    ),
    # a Blu-ray: its PCM cannot stay in a transport stream that players read, so it becomes AAC
    ".m2ts": (
        Source("libx264", "pcm_bluray", muxer="mpegts", muxer_options=M2TS),
        Expected("mpegts", "h264", "aac", copied=False, packet_bytes=192),
    ),
    # a browser's MediaRecorder: VP8 and Opus
    ".webm": (
        Source("libvpx", "libopus"),
        Expected("matroska,webm", "vp9", "opus", doctype=b"webm"),
    ),
    # a DVD-era camcorder: MPEG-2 and MP2 in a program stream; a VCD: MPEG-1
    ".mpg": (
        Source("mpeg2video", "mp2", muxer="vob"),
        Expected("mpeg", "mpeg2video", "mp2", mpeg2_pack=True),
    ),
    ".mpeg": (Source("mpeg1video", "mp2"), Expected("mpeg", "mpeg2video", "mp2", mpeg2_pack=True)),
}


def check_container(path: Path, expected: Expected) -> None:
    """The container-specific marks of ``path``: TS packet size, MP4 brand, EBML DocType."""
    data = path.read_bytes()
    if expected.packet_bytes:
        sync = expected.packet_bytes - 188  # M2TS puts a 4-byte timestamp before each packet
        assert len(data) % expected.packet_bytes == 0
        assert all(data[i + sync] == 0x47 for i in range(0, len(data), expected.packet_bytes))
    if expected.brand:
        assert data[4:12] == b"ftyp" + expected.brand.encode()
    if expected.doctype:
        assert b"\x42\x82\x84" + expected.doctype in data[:64]  # DocType, 4 bytes long
    if expected.mpeg2_pack:
        assert data[:4] == b"\x00\x00\x01\xba" and data[4] >> 6 == 0b01  # MPEG-1: 0b0010....


def test_every_video_extension_has_a_way_to_be_written() -> None:
    """The engine's list of video extensions and the container table agree."""
    assert set(CONTAINERS) == VIDEO_EXTENSIONS == set(CONTAINER_CASES) | {".mp4"}


@pytest.mark.parametrize("ext", sorted(CONTAINER_CASES))
def test_other_containers_come_back_in_their_own_container(
    tmp_path: Path, detector: FaceDetector, ext: str
) -> None:
    """Each container in, the same container out (by content), with its own video codec, the
    frames and duration kept, the sound copied byte for byte where the container allows it
    (else re-encoded and reported), and none of the input's tags."""
    source, expected = CONTAINER_CASES[ext]
    src, dst = tmp_path / f"in{ext}", tmp_path / f"out{ext}"
    make_source(src, source)
    result = anonymize_video(src, dst, tmp_path / "out.json", FrameAnonymizer(detector, Options()))
    before, after = streams(src), streams(dst)
    assert result.frames == after.frames == before.frames == SOURCE_FRAMES
    shifts = [abs(a - b) for a, b in zip(after.times_s, before.times_s, strict=True)]
    assert max(shifts) < 0.001  # every frame at its time: none moved, the rate kept
    if ext != ".avi":  # FFmpeg's AVI muxer miscounts copied VBR sound in its header (as before)
        assert abs(after.duration_s - before.duration_s) <= 1 / SOURCE_FPS
    with av.open(str(dst)) as container:
        assert container.format.name == expected.demuxer
        assert container.streams.video[0].codec_context.name == expected.video
        (audio,) = container.streams.audio
        assert audio.codec_context.codec.canonical_name == expected.audio
        assert not {SECRET} & {*container.metadata.values()}
    check_container(dst, expected)
    assert [a.copied for a in result.audio] == [expected.copied]
    assert after.audio_packets
    if expected.copied:
        assert after.audio_packets == before.audio_packets
    else:  # all of it: an encoder holds its last frames back until it is drained
        assert after.audio_s >= before.audio_s > 0.9
    if expected.demuxer != "mpeg":  # program streams carry no tags at all
        assert SECRET.encode() in src.read_bytes()
    assert SECRET.encode() not in dst.read_bytes()
    # The daemon then rewrites the output's tags (blurd.metadata): a remux that keeps its form.
    final = tmp_path / f"final{ext}"
    carry_video_metadata(src, dst, final, Policy.SAFE)
    check_container(final, expected)
    assert streams(final).frames == after.frames
    with av.open(str(final)) as container:
        assert container.format.name == expected.demuxer


def test_re_encoded_sound_is_reported(tmp_path: Path, detector: FaceDetector) -> None:
    """Sound a container cannot carry is re-encoded, and the result and a log line say so."""
    src, dst = tmp_path / "in.m2ts", tmp_path / "out.m2ts"
    make_source(src, CONTAINER_CASES[".m2ts"][0])
    with capture_logs() as logs:
        result = anonymize_video(
            src, dst, tmp_path / "out.json", FrameAnonymizer(detector, Options())
        )
    (audio,) = result.reencoded_audio
    assert (audio.codec_in, audio.codec_out) == ("pcm_bluray", "aac")
    (line,) = [e for e in logs if e["event"] == "video.audio_reencoded"]
    assert (line["codec_in"], line["codec_out"], line["input"]) == ("pcm_bluray", "aac", str(src))


def test_a_ts_file_holding_mp4_is_read_by_its_content(
    tmp_path: Path, detector: FaceDetector
) -> None:
    """A .ts name on MP4 content: decoded as MP4, written as a transport stream, the AAC copied
    (the TS muxer only adds its 7-byte ADTS header to each packet)."""
    src, dst = tmp_path / "in.ts", tmp_path / "out.ts"
    make_source(src, Source("libx264", "aac", muxer="mp4"))
    assert src.read_bytes()[4:8] == b"ftyp"
    result = anonymize_video(src, dst, tmp_path / "out.json", FrameAnonymizer(detector, Options()))
    before, after = streams(src), streams(dst)
    assert result.frames == after.frames == SOURCE_FRAMES
    assert [a.copied for a in result.audio] == [True]
    with av.open(str(dst)) as container:
        assert container.format.name == "mpegts"
    check_container(dst, Expected("mpegts", "h264", "aac", packet_bytes=188))
    assert [p[7:] for p in after.audio_packets] == before.audio_packets


def test_mpeg2_frames_go_on_a_rate_it_can_signal_at_their_own_times() -> None:
    """MPEG-2 keeps the common rates as they are, takes the next rate up for others (so that
    frames never queue behind each other), and gives each frame the slot nearest its time."""
    assert grid_rate(Fraction(24)) == 24
    assert (
        grid_rate(Fraction(30000, 1001)) == grid_rate(Fraction(2997, 100)) == Fraction(30000, 1001)
    )
    assert grid_rate(Fraction(25)) == 25
    assert grid_rate(Fraction(125, 10)) == Fraction(15000, 1001)  # 12.5 fps is not listed
    clock = FrameTimes(Fraction(1, 90_000), Fraction(25))
    assert clock.time_base == Fraction(1, 25)
    # 40 ms apart, then 10 ms (variable rate: one slot later), then a gap of two slots
    placed = [clock.place(t) for t in (0, 3600, 7200, 8100, 18000)]
    assert placed == [(0, range(0)), (1, range(0)), (2, range(0)), (3, range(0)), (5, range(4, 5))]
    assert FrameTimes(Fraction(1, 15360), None).place(512) == (512, range(0))  # as decoded


def test_a_variable_rate_video_becomes_constant_rate_mpeg2(
    tmp_path: Path, detector: FaceDetector
) -> None:
    """Frames 33 ms apart with gaps, written as .mpg: a frame every 1/30 s in the output (the
    picture before a gap repeated), each input frame at its own time, the length kept."""
    src, dst = tmp_path / "in.mkv", tmp_path / "out.mpg"
    times_ms = [0, 33, 67, 100, 200, 233, 400, 433, 467, 500, 700, 733, 767]
    with av.open(str(src), "w") as out:
        video: Any = out.add_stream("libx264", rate=30)
        video.width, video.height = 160, 120
        video.codec_context.time_base = Fraction(1, 1000)
        for t in times_ms:
            picture = np.full((120, 160, 3), t % 256, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(picture, format="bgr24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    result = anonymize_video(src, dst, tmp_path / "out.json", FrameAnonymizer(detector, Options()))
    assert result.frames == len(times_ms)
    after = streams(dst)
    start = after.times_s[0]
    slots = [round((t - start) * 30, 3) for t in after.times_s]
    assert slots == list(range(24))  # 0 to 767 ms at 30 fps, no slot empty
    with av.open(str(dst)) as container:
        shades = [int(f.to_ndarray(format="gray")[60, 80]) for f in container.decode(video=0)]
    for t in times_ms:  # each input frame is shown at its own time
        assert abs(shades[round(t * 30 / 1000)] - t % 256) <= 3


def test_a_corrupt_video_fails_with_one_sentence(tmp_path: Path, detector: FaceDetector) -> None:
    """A file that is no video raises MediaError with a short reason."""
    src = tmp_path / "broken.mp4"
    src.write_bytes(b"\x00\x00\x00\x18ftypmp42 and then nothing useful" * 10)
    with pytest.raises(MediaError, match="video"):
        anonymize_video(
            src, tmp_path / "o.mp4", tmp_path / "o.json", FrameAnonymizer(detector, Options())
        )

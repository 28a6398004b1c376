"""carry_video_metadata: the engine's streams remuxed unchanged, the source's tags filtered.

Every file here is a real one written with PyAV (64x48, 32 frames), read back with PyAV.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from av.audio.stream import AudioStream
from av.container import OutputContainer
from av.stream import Disposition
from av.video.codeccontext import VideoCodecContext
from av.video.stream import VideoStream

from blurd.metadata.policy import MetadataError, Policy
from blurd.metadata.video import Carried, carry_video_metadata, category

RATE = 25
FRAMES = 32
AUDIO_HZ = 48000

# The source's tags: every value is unique, so finding it anywhere in a file means it leaked.
LOCATION = "+48.8577+002.2950/"
ISO6709 = "+48.8577+002.2950+035.000/"
CREATED = "2024-05-01T10:00:00.000000Z"
MAKE = "Blurdtestmake"
MODEL = "Blurdphone 15 Pro"
CONTENT_ID = "5C1D2A9E-LIVE-PHOTO-ID"
TITLE = "Secret birthday party"
ARTIST = "Jane Roe"
HANDLER = "Core Media Video"
SOURCE_TAGS = {
    "location": LOCATION,
    "com.apple.quicktime.location.ISO6709": ISO6709,
    "creation_time": CREATED,
    "com.apple.quicktime.make": MAKE,
    "com.apple.quicktime.model": MODEL,
    "com.apple.quicktime.content.identifier": CONTENT_ID,
    "title": TITLE,
    "artist": ARTIST,
}
SOURCE_STREAM_TAGS = {"language": "fra", "handler_name": HANDLER, "creation_time": CREATED}
# The engine's output carries tags of its own, a location among them: none may survive.
OUTPUT_TAGS = {
    "location": "+10.1234+020.5678/",
    "title": "Engine output title",
    "artist": "Engine Artist",
    "creation_time": "2031-02-03T04:05:06.000000Z",
}
OUTPUT_STREAM_TAGS = {"language": "deu", "handler_name": "Engine Handler"}

ALLOWED = {
    Policy.STRIP: {"fra"},
    Policy.SAFE: {"fra", CREATED, MAKE, MODEL, HANDLER},
    Policy.KEEP: {"fra", CREATED, MAKE, MODEL, HANDLER}
    | {LOCATION, ISO6709, CONTENT_ID, TITLE, ARTIST},
}
SECRETS = ALLOWED[Policy.KEEP] - {"fra", CREATED}  # long enough to grep a file's bytes for
ENGINE_VALUES = set(OUTPUT_TAGS.values()) | set(OUTPUT_STREAM_TAGS.values())


@dataclass(frozen=True)
class Kind:
    """A container under test, the encoders that can fill it, and what it can hold."""

    ext: str
    video: str
    audio: str
    source_ext: str  # the source is of the same kind when that kind can hold rich tags
    rotation: bool  # the container stores a display matrix
    present: dict[Policy, set[str]] = field(default_factory=dict)  # source values dest holds
    pix_fmt: str = "yuv420p"

    def __str__(self) -> str:
        return self.ext


RICH = {p: ALLOWED[p] for p in Policy}
KINDS = [
    Kind("mp4", "mpeg4", "aac", "mp4", True, RICH),
    Kind("mov", "mpeg4", "aac", "mov", True, RICH),
    Kind("mkv", "mpeg4", "aac", "mkv", True, RICH),
    Kind("webm", "libvpx", "libopus", "webm", True, RICH),
    # 3GP keeps its own tag set: no make, model, title or artist; its location is a 'loci' box.
    Kind(
        "3gp",
        "mpeg4",
        "aac",
        "mp4",
        True,
        {
            Policy.STRIP: {"fra"},
            Policy.SAFE: {"fra", CREATED, HANDLER},
            Policy.KEEP: {"fra", CREATED, HANDLER, LOCATION},
        },
    ),
    # AVI holds RIFF INFO tags only (title, artist, date...): no creation_time, no location.
    Kind(
        "avi",
        "mjpeg",
        "pcm_s16le",
        "mp4",
        False,
        {Policy.STRIP: set(), Policy.SAFE: set(), Policy.KEEP: {TITLE, ARTIST}},
        "yuvj420p",
    ),
    # MPEG-TS holds a language per audio stream; MPEG-PS nothing at all.
    Kind("ts", "mpeg2video", "mp2", "mp4", False, {p: {"fra"} for p in Policy}),
    Kind("m2ts", "mpeg2video", "mp2", "mp4", False, {p: {"fra"} for p in Policy}),
    Kind("mpg", "mpeg2video", "mp2", "mp4", False, {p: set() for p in Policy}),
]
RICH_EXTS = {"mp4", "mov", "mkv", "webm"}


# --- writing test files ----------------------------------------------------------------


def add_video(out: OutputContainer, codec: str, pix_fmt: str, size: tuple[int, int]) -> VideoStream:
    stream = out.add_stream(codec, rate=RATE)
    assert isinstance(stream, VideoStream)
    stream.width, stream.height = size
    stream.pix_fmt = pix_fmt
    return stream


def add_audio(out: OutputContainer, codec: str) -> AudioStream:
    stream = out.add_stream(codec, rate=AUDIO_HZ)
    assert isinstance(stream, AudioStream)
    stream.layout = "stereo"
    return stream


def write_clip(
    path: Path,
    kind: Kind,
    *,
    tags: dict[str, str] | None = None,
    stream_tags: dict[str, str] | None = None,
    rotation: int = 0,
    frames: int = FRAMES,
    audio: bool = True,
    subtitles: bool = False,
    container_options: dict[str, str] | None = None,
) -> None:
    """A small clip: noisy frames (so packets differ), a tone, and the tags asked for."""
    rng = np.random.default_rng(7)
    with av.open(str(path), "w", container_options=container_options or {}) as out:
        video = add_video(out, kind.video, kind.pix_fmt, (64, 48))
        if rotation:
            video.set_display_rotation(rotation)
        sound = add_audio(out, kind.audio) if audio else None
        text = out.add_mux_stream("subrip") if subtitles else None
        out.metadata.update(tags or {})
        for stream in (video, sound, text):
            if stream is not None:
                stream.metadata.update(stream_tags or {})
        for i in range(frames):
            pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, RATE)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if sound is not None:
            write_tone(out, sound, frames / RATE)
        if text is not None:
            for i in range(0, frames, 10):
                packet = av.Packet(f"line {i}".encode())
                packet.stream = text
                packet.time_base = Fraction(1, 1000)
                packet.pts = packet.dts = i * 1000 // RATE
                packet.duration = 200
                out.mux(packet)


def write_tone(out: OutputContainer, sound: AudioStream, seconds: float) -> None:
    size = sound.codec_context.frame_size or 1024
    planar = sound.format.is_planar
    dtype = np.float32 if sound.format.name.startswith("flt") else np.int16
    scale = 0.2 if dtype is np.float32 else 6000
    done = 0
    while done < seconds * AUDIO_HZ:
        t = (np.arange(size) + done) / AUDIO_HZ
        wave = (scale * np.sin(2 * np.pi * 440 * t)).astype(dtype)
        data = np.stack([wave, wave]) if planar else np.repeat(wave, 2)[np.newaxis, :]
        frame = av.AudioFrame.from_ndarray(data, format=sound.format.name, layout="stereo")
        frame.sample_rate, frame.pts = AUDIO_HZ, done
        out.mux(sound.encode(frame))
        done += size
    out.mux(sound.encode(None))


def source_clip(path: Path, kind: Kind) -> None:
    """The original: every tag of SOURCE_TAGS, written as QuickTime "mdta" items in MP4/MOV
    (as iPhones do), as Matroska tags in MKV/WebM."""
    options = {"movflags": "use_metadata_tags"} if kind.ext in ("mp4", "mov") else {}
    write_clip(
        path, kind, tags=SOURCE_TAGS, stream_tags=SOURCE_STREAM_TAGS, container_options=options
    )


def output_clip(path: Path, kind: Kind) -> None:
    """The engine's output: a rotation to keep, tags of its own to drop, subtitles in MKV."""
    write_clip(
        path,
        kind,
        tags=OUTPUT_TAGS,
        stream_tags=OUTPUT_STREAM_TAGS,
        rotation=90 if kind.rotation else 0,
        subtitles=kind.ext == "mkv",
    )


def jpeg(seed: int = 3) -> bytes:
    codec = av.CodecContext.create("mjpeg", "w")
    assert isinstance(codec, VideoCodecContext)
    codec.width, codec.height, codec.pix_fmt = 32, 32, "yuvj420p"
    codec.time_base = Fraction(1, RATE)
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    packets = codec.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24"))
    packets += codec.encode(None)
    return bytes(packets[0])


# --- reading them back -------------------------------------------------------------------


@dataclass
class Probe:
    """What a file says about itself."""

    container: dict[str, str]
    streams: list[tuple[str, dict[str, str], int]]  # (type, tags, disposition)
    duration: int | None
    rotation: int

    def values(self) -> set[str]:
        found = set(self.container.values())
        for _, tags, _ in self.streams:
            found |= set(tags.values())
        return found


def probe(path: Path) -> Probe:
    with av.open(str(path)) as c:
        streams: list[tuple[str, dict[str, str], int]] = [
            (s.type, dict(s.metadata), int(s.disposition)) for s in c.streams
        ]
        rotation = 0
        video = [s for s in c.streams.video if not s.disposition & Disposition.attached_pic]
        for frame in c.decode(video[0]):
            rotation = frame.rotation
            break
        return Probe(dict(c.metadata), streams, c.duration, rotation)


def packets(path: Path) -> dict[int, tuple[str, list[tuple[Fraction | None, Fraction | None]]]]:
    """Per stream index: a hash of every packet's bytes, and each packet's pts and dts in
    seconds."""
    digests: dict[int, hashlib._Hash] = {}
    times: dict[int, list[tuple[Fraction | None, Fraction | None]]] = {}
    with av.open(str(path)) as c:
        for packet in c.demux():
            if packet.pts is None and packet.dts is None and packet.size == 0:
                continue
            index = packet.stream.index
            digests.setdefault(index, hashlib.sha256()).update(bytes(packet))
            base = packet.time_base
            pts = None if packet.pts is None else packet.pts * base
            dts = None if packet.dts is None else packet.dts * base
            times.setdefault(index, []).append((pts, dts))
    return {i: (digests[i].hexdigest(), times[i]) for i in digests}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(source, output) per kind, written once for the module."""
    folder = tmp_path_factory.mktemp("clips")
    made: dict[str, tuple[Path, Path]] = {}
    for kind in KINDS:
        source = folder / f"source-{kind.ext}.{kind.source_ext}"
        output = folder / f"output.{kind.ext}"
        source_clip(source, next(k for k in KINDS if k.ext == kind.source_ext))
        output_clip(output, kind)
        made[kind.ext] = (source, output)
    return made


def carry(
    clips: dict[str, tuple[Path, Path]], kind: Kind, policy: Policy, tmp_path: Path
) -> tuple[Carried, Path]:
    source, output = clips[kind.ext]
    dest = tmp_path / f"dest.{kind.ext}"
    return carry_video_metadata(source, output, dest, policy), dest


# --- tags ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.value)
@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_tags_follow_the_policy(
    clips: dict[str, tuple[Path, Path]], kind: Kind, policy: Policy, tmp_path: Path
) -> None:
    """Each policy carries exactly its share of the source's tags, as far as the container can
    hold them; nothing of the engine's output survives in any policy, not even its language."""
    result, dest = carry(clips, kind, policy, tmp_path)
    found = probe(dest).values()
    assert kind.present[policy] <= found
    forbidden = (ALLOWED[Policy.KEEP] - ALLOWED[policy]) | ENGINE_VALUES
    assert not forbidden & found
    data = dest.read_bytes()
    for value in (SECRETS - ALLOWED[policy]) | (ENGINE_VALUES - {"deu"}):
        assert value.encode() not in data, value
    kept = {name.lower() for name in result.kept}
    dropped = {name.lower() for name in result.dropped}
    if LOCATION in kind.present[policy]:
        assert "location" in kept
    else:
        assert "location" in dropped
    if policy is Policy.KEEP and kind.ext not in RICH_EXTS:
        assert result.note is not None and "could not be written" in result.note


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_strip_leaves_only_what_the_muxer_writes(
    clips: dict[str, tuple[Path, Path]], kind: Kind, tmp_path: Path
) -> None:
    """With ``strip`` the only tags left are the muxer's own (brands, Matroska's stream
    durations, default handler names) and the source's language: no encoder version either."""
    _, dest = carry(clips, kind, Policy.STRIP, tmp_path)
    found = probe(dest)
    assert set(found.container) <= {"major_brand", "minor_version", "compatible_brands", "encoder"}
    assert found.container.get("encoder", "Lavf") == "Lavf"
    for _, tags, _ in found.streams:
        assert {k.lower() for k in tags} <= {"language", "handler_name", "vendor_id", "duration"}
        assert tags.get("handler_name", "Handler").endswith("Handler")


def test_output_tags_never_carried_even_with_keep(
    clips: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """``keep`` keeps the source's tags: a tagless source gives a tagless copy, whatever the
    output held."""
    kind = KINDS[0]
    bare = tmp_path / "bare.mp4"
    write_clip(bare, kind, frames=4, audio=False)
    dest = tmp_path / "dest.mp4"
    result = carry_video_metadata(bare, clips["mp4"][1], dest, Policy.KEEP)
    found = probe(dest)
    assert not ENGINE_VALUES & found.values()
    assert set(found.container) == {"major_brand", "minor_version", "compatible_brands"}
    assert found.rotation == 90
    # The bare source's own muxer defaults ("und", "VideoHandler") are all it had to give.
    assert result.kept == ("video0:handler_name", "video0:language")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("location", "gps"),
        ("location-eng", "gps"),
        ("com.apple.quicktime.location.ISO6709", "gps"),
        ("LOCATION", "gps"),
        ("creation_time", "time"),
        ("DATE_RECORDED", "time"),
        ("com.apple.quicktime.make", "camera"),
        ("MODEL", "camera"),
        ("handler_name", "technical"),
        ("com.apple.quicktime.content.identifier", "serial"),
        ("artist", "owner"),
        ("title-eng", "comment"),
        ("encoder", "exif-other"),
        ("com.apple.quicktime.software", "exif-other"),
    ],
)
def test_tag_categories(key: str, expected: str) -> None:
    """Video tags sort into the categories of blurd.metadata.policy, so ``safe`` means the same
    for photos and videos; a location is recognised whatever its spelling."""
    assert category(key) == expected


# --- streams -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_packets_and_timestamps_are_unchanged(
    clips: dict[str, tuple[Path, Path]], kind: Kind, tmp_path: Path
) -> None:
    """The copy holds the output's streams, packet for packet, byte for byte, at the same
    times, with the same duration and display rotation, in the same format."""
    _, output = clips[kind.ext]
    _, dest = carry(clips, kind, Policy.KEEP, tmp_path)
    before, after = probe(output), probe(dest)
    assert [s[0] for s in after.streams] == [s[0] for s in before.streams]
    assert after.duration == before.duration
    assert after.rotation == before.rotation == (90 if kind.rotation else 0)
    assert packets(dest) == packets(output)
    if "major_brand" in before.container:
        assert after.container["major_brand"] == before.container["major_brand"]
    head = dest.read_bytes()[:64]
    if kind.ext in ("mkv", "webm"):
        assert (b"webm" in head) == (kind.ext == "webm")
    if kind.ext == "m2ts":  # 192-byte packets: a 4-byte time code, then the 0x47 sync byte
        assert dest.stat().st_size % 192 == 0 and head[4] == 0x47


def test_attached_pictures_never_carried(tmp_path: Path) -> None:
    """Cover art (an MP4 attached picture, a Matroska image attachment) may show the
    un-blurred picture: it is left out even with ``keep``. A font attachment stays (subtitles
    need it); another attachment stays with ``keep`` only."""
    kind = KINDS[0]
    cover = jpeg()
    mp4 = tmp_path / "cover.mp4"
    with av.open(str(mp4), "w") as out:
        video = add_video(out, "mpeg4", "yuv420p", (64, 48))
        art = add_video(out, "mjpeg", "yuvj420p", (32, 32))
        art.disposition = Disposition.attached_pic
        frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
        out.mux(video.encode(frame) + video.encode(None))
        packet = av.Packet(cover)
        packet.stream, packet.pts, packet.dts = art, 0, 0
        out.mux(packet)
    plain_mkv, mkv = tmp_path / "plain.mkv", tmp_path / "attached.mkv"
    write_clip(plain_mkv, kind, frames=4, audio=False)
    with av.open(str(plain_mkv)) as plain, av.open(str(mkv), "w") as out:
        copy = out.add_stream_from_template(plain.streams.video[0])
        out.add_attachment("cover.jpg", "image/jpeg", cover)
        out.add_attachment("font.ttf", "font/ttf", b"\0\1\0\0 a font")
        out.add_attachment("notes.txt", "text/plain", b"some notes")
        for p in plain.demux(plain.streams.video[0]):
            if p.size:
                p.stream = copy
                out.mux(p)
    assert any(s[2] & Disposition.attached_pic for s in probe(mkv).streams)

    for output, policy, names in [
        (mp4, Policy.KEEP, []),
        (mkv, Policy.KEEP, ["font.ttf", "notes.txt"]),
        (mkv, Policy.STRIP, ["font.ttf"]),
    ]:
        dest = tmp_path / f"dest-{policy.value}{output.suffix}"
        result = carry_video_metadata(output, output, dest, policy)
        found = probe(dest)
        assert [s for s in found.streams if s[2] & Disposition.attached_pic] == []
        assert [s[1].get("filename") for s in found.streams if s[0] == "attachment"] == names
        assert cover not in dest.read_bytes()
        assert result.note is not None and "1 attached picture(s) left out" in result.note


def test_data_streams_kept_with_keep_only(tmp_path: Path) -> None:
    """A data stream may be a GPS track: ``strip`` and ``safe`` leave it out; ``keep`` copies
    it unchanged when the container takes it."""
    output = tmp_path / "klv.ts"
    with av.open(str(output), "w") as out:
        video = add_video(out, "mpeg2video", "yuv420p", (64, 48))
        data = out.add_data_stream("klv")
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, RATE)
            out.mux(video.encode(frame))
            packet = av.Packet(b"\x06\x0e\x2b\x34" + bytes([i]) * 12)
            packet.stream, packet.time_base = data, Fraction(1, 90000)
            packet.pts = packet.dts = i * 3600
            out.mux(packet)
        out.mux(video.encode(None))
    stripped, kept = tmp_path / "strip.ts", tmp_path / "keep.ts"
    result = carry_video_metadata(output, output, stripped, Policy.SAFE)
    assert result.note == "1 data stream(s) left out"
    assert [s[0] for s in probe(stripped).streams] == ["video"]
    carry_video_metadata(output, output, kept, Policy.KEEP)
    assert [s[0] for s in probe(kept).streams] == ["video", "data"]
    assert packets(kept) == packets(output)


def test_data_stream_the_muxer_refuses_is_dropped(tmp_path: Path) -> None:
    """A QuickTime timecode track cannot be copied as such: ``keep`` then retries without data
    streams rather than failing (the timecode tag makes the muxer write a new one)."""
    output = tmp_path / "timecode.mov"
    write_clip(output, KINDS[1], frames=8, stream_tags={"timecode": "01:00:00:00"})
    assert "data" in [s[0] for s in probe(output).streams]
    dest = tmp_path / "dest.mov"
    result = carry_video_metadata(output, output, dest, Policy.KEEP)
    assert result.note is not None
    assert "1 data stream(s) the container refused left out" in result.note
    assert packets(dest)[0] == packets(output)[0]


def test_subtitles_copied_without_their_tags(
    clips: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """Subtitles are the engine's content: copied unchanged, but under the source's tags."""
    kind = next(k for k in KINDS if k.ext == "mkv")
    _, output = clips["mkv"]
    _, dest = carry(clips, kind, Policy.STRIP, tmp_path)
    subtitles = [s for s in probe(dest).streams if s[0] == "subtitle"]
    assert len(subtitles) == 1
    assert "Engine Handler" not in subtitles[0][1].values()
    assert packets(dest)[2] == packets(output)[2]


def test_hevc_keeps_its_hvc1_tag(tmp_path: Path) -> None:
    """Apple devices play HEVC in MP4/MOV only when tagged ``hvc1``; a remux must not turn it
    into FFmpeg's default ``hev1``."""
    if "libx265" not in av.codecs_available:
        pytest.skip("no HEVC encoder in this PyAV build")
    output = tmp_path / "hevc.mp4"
    with av.open(str(output), "w") as out:
        video = add_video(out, "libx265", "yuv420p", (64, 64))
        video.codec_tag = "hvc1"
        video.options = {"x265-params": "log-level=none"}
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, RATE)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    dest = tmp_path / "dest.mp4"
    carry_video_metadata(output, output, dest, Policy.STRIP)
    with av.open(str(dest)) as c:
        assert c.streams.video[0].codec_context.codec_tag == "hvc1"


def test_rotate_tag_of_an_older_writer_is_kept(tmp_path: Path) -> None:
    """A numeric ``rotate`` tag on the output's video is a rotation, not metadata: it stays."""
    output = tmp_path / "rotate.mkv"
    write_clip(output, KINDS[2], frames=4, audio=False, stream_tags={"rotate": "90", "x": "y"})
    dest = tmp_path / "dest.mkv"
    carry_video_metadata(output, output, dest, Policy.STRIP)
    tags = {k.lower(): v for k, v in probe(dest).streams[0][1].items()}
    assert tags.get("rotate") == "90" and "x" not in tags


# --- memory --------------------------------------------------------------------------------


def _kib(field_name: str) -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def test_memory_stays_flat_for_a_large_file(tmp_path: Path) -> None:
    """46 MB of packets (uncompressed 640x480 frames) are copied with a peak resident memory
    growth of a few MB: packets go through one at a time. (Holding them would add 44 MB.)"""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to now
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak")
    if _kib("VmHWM") - _kib("VmRSS") > 1024:
        pytest.skip("this kernel does not reset the peak")
    output = tmp_path / "large.mkv"
    frame_bytes = 640 * 480 * 3 // 2
    with av.open(str(output), "w") as out:
        video = add_video(out, "rawvideo", "yuv420p", (640, 480))
        noise = np.random.default_rng(1).integers(0, 255, (720, 640), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(noise, format="yuv420p")
        for i in range(100):
            frame.pts, frame.time_base = i, Fraction(1, RATE)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    assert output.stat().st_size > 100 * frame_bytes
    dest = tmp_path / "dest.mkv"
    Path("/proc/self/clear_refs").write_text("5")
    before = _kib("VmRSS")
    carry_video_metadata(output, output, dest, Policy.KEEP)
    growth_mb = (_kib("VmHWM") - before) / 1024
    assert growth_mb < 20, f"peak memory grew by {growth_mb:.0f} MB"
    assert dest.stat().st_size > 100 * frame_bytes


# --- errors --------------------------------------------------------------------------------


def test_output_that_is_not_a_video(clips: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """An output that is not a media file is refused, with its name in a one-line message."""
    output = tmp_path / "output.mp4"
    output.write_text("<html>502 Bad Gateway</html>\n")
    dest = tmp_path / "dest.mp4"
    with pytest.raises(MetadataError, match=r"output\.mp4: cannot be opened as a video") as info:
        carry_video_metadata(clips["mp4"][0], output, dest, Policy.STRIP)
    assert "\n" not in str(info.value)
    assert not dest.exists()


def test_output_without_a_video_stream(tmp_path: Path) -> None:
    """Sound with cover art is not a video: the picture does not count."""
    output = tmp_path / "song.mp4"
    with av.open(str(output), "w") as out:
        sound = add_audio(out, "aac")
        art = add_video(out, "mjpeg", "yuvj420p", (32, 32))
        art.disposition = Disposition.attached_pic
        write_tone(out, sound, 0.5)
        packet = av.Packet(jpeg())
        packet.stream, packet.pts, packet.dts = art, 0, 0
        out.mux(packet)
    with pytest.raises(MetadataError, match=r"song\.mp4: has no video stream"):
        carry_video_metadata(output, output, tmp_path / "dest.mp4", Policy.STRIP)


@pytest.mark.parametrize("layout", ["mp4", "mp4-faststart", "mkv"])
def test_truncated_output(layout: str, tmp_path: Path) -> None:
    """A cut download is refused whether the MP4 index is lost (at the end) or kept (at the
    front, "faststart"), and a cut Matroska file too: FFmpeg itself reads them without error."""
    ext = layout.split("-")[0]
    kind = next(k for k in KINDS if k.ext == ext)
    whole = tmp_path / f"whole.{ext}"
    options = {"movflags": "faststart"} if layout.endswith("faststart") else {}
    write_clip(whole, kind, frames=100, container_options=options)  # 4 s
    output = tmp_path / f"cut.{ext}"
    data = whole.read_bytes()
    output.write_bytes(data[: len(data) // 2])
    dest = tmp_path / f"dest.{ext}"
    with pytest.raises(MetadataError, match=r"cut\.(mp4|mkv): (cannot be opened|has no|is trunc)"):
        carry_video_metadata(whole, output, dest, Policy.STRIP)
    assert not dest.exists()


def test_container_the_muxer_refuses(tmp_path: Path) -> None:
    """A Matroska file named .webm holding MPEG-4 video cannot be written as WebM: refused
    with the output's name, and no partial copy is left behind."""
    output = tmp_path / "fake.webm"
    write_clip(tmp_path / "real.mkv", KINDS[2], frames=4, audio=False)
    output.write_bytes((tmp_path / "real.mkv").read_bytes())
    dest = tmp_path / "dest.webm"
    with pytest.raises(MetadataError, match=r"fake\.webm: cannot be remuxed as webm"):
        carry_video_metadata(output, output, dest, Policy.STRIP)
    assert not dest.exists()


def test_unsupported_container(tmp_path: Path) -> None:
    """Only the containers listed in video.py are remuxed; others are named in the error."""
    output = tmp_path / "clip.nut"
    with av.open(str(output), "w") as out:
        video = add_video(out, "mpeg4", "yuv420p", (64, 48))
        out.mux(video.encode(av.VideoFrame(64, 48, "yuv420p")) + video.encode(None))
    with pytest.raises(MetadataError, match=r"clip\.nut: is a nut file"):
        carry_video_metadata(output, output, tmp_path / "dest.nut", Policy.STRIP)


@pytest.mark.parametrize("broken", ["garbage", "missing"])
def test_unreadable_source_carries_nothing(
    clips: dict[str, tuple[Path, Path]], broken: str, tmp_path: Path
) -> None:
    """A source whose tags cannot be read costs its tags, not the job: the copy is made,
    as ``strip`` would, even with ``keep``; the note says why."""
    source = tmp_path / "source.mp4"
    if broken == "garbage":
        source.write_bytes(b"\x00\x01 not a video" * 100)
    dest = tmp_path / "dest.mp4"
    result = carry_video_metadata(source, clips["mp4"][1], dest, Policy.KEEP)
    assert result.kept == () and result.dropped == ()
    assert result.note is not None and result.note.startswith("source tags unreadable")
    found = probe(dest)
    assert not (ENGINE_VALUES | ALLOWED[Policy.KEEP]) & found.values()
    assert found.rotation == 90
    assert packets(dest) == packets(clips["mp4"][1])


def test_carried_reads_as_one_line(clips: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """``str(Carried)`` is the log line: tag names kept and dropped, and the note."""
    result, _ = carry(clips, KINDS[5], Policy.KEEP, tmp_path)
    text = str(result)
    assert text.startswith("kept=artist,title dropped=")
    assert "\n" not in text and "note='could not be written in this container: " in text

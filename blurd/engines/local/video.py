"""Videos: decode with PyAV, anonymize frame by frame, encode, copy the sound unchanged.

- The output is written in the container of its name, with the codecs of containers.py (H.264
  for most; VP9 for WebM, MPEG-2 for MPEG program streams); the input is read by its content.
- Frames are streamed: at most ``2 x detect_every + 1`` decoded frames wait for their detections
  (about 18 MB at 720p with the default interval), whatever the video's length.
- Every frame keeps its timestamp (pts, in the input stream's time base), so the frame count
  and the duration are those of the input, variable frame rates included. MPEG-2 only has
  constant rates: there a picture is repeated where a variable-rate input leaves a gap.
- Audio packets are copied as they are, unless the output container cannot carry their codec:
  then the sound is re-encoded, and the result and a log line say so. Other video streams
  (cover art), subtitle and data streams, chapters and container metadata (which may hold a
  GPS position or the camera model) are not copied.
- A display rotation (phones) is applied to the pixels and the output is written upright.
- Detection runs on a copy ``infer_width`` wide, on every ``detect_every``-th frame and on the
  last one, in a thread ahead of the encoder; frames in between are hidden with the boxes of
  the detections on both sides (see schedule.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import structlog

from blurd.engines.local.arrays import Image
from blurd.engines.local.containers import (
    PIXEL_FORMAT,
    X264_CRF,
    X264_PRESET,
    X264_VIDEO,
    AudioOutcome,
    AudioRoute,
    Container,
    add_video_stream,
    container_for,
    open_output,
    route_audio,
)
from blurd.engines.local.detections import DetectionsWriter
from blurd.engines.local.errors import Cancelled, MediaError
from blurd.engines.local.frames import FrameAnonymizer, Hit
from blurd.engines.local.schedule import DetectionSchedule

log = structlog.get_logger(__name__)

# The MP4 path's encoder, under the names scripts/bench-local reads.
CODEC, CRF, PRESET = X264_VIDEO.encoder, X264_CRF, X264_PRESET

# The source's P and B frame types are passed on to x264 (containers.VideoCodec says which
# encoders take them), which then skips its own frame-type analysis (about 20 % of its work at
# this preset); I frames (all of them for intra-only codecs such as MJPEG) are left to the
# encoder, which places its own key frames.
KEPT_PICTURE_TYPES = frozenset({2, 3})  # AV_PICTURE_TYPE_P, AV_PICTURE_TYPE_B
# Detection every 6th frame (and on the last): on 2 cores it costs about 11 ms of CPU per frame
# instead of 33 ms every 2nd frame. The frames in between hide the boxes of both sides, spanned
# per face (schedule.py); tests/test_local_video.py checks that 50-110 px faces moving 21 px a
# frame lose their detail in every frame (at every 8th frame the 50 px face no longer does).
DETECT_EVERY = 6  # frames; 1 = detect on every frame
INFER_WIDTH_PX = 640  # detection runs on a copy this wide: 2.5x faster than 1280 (see docs)

Progress = Callable[[int, int | None], None]
StopCheck = Callable[[], bool]


@dataclass(frozen=True)
class VideoResult:
    """What was written: the frame count, and for each sound stream copied or re-encoded."""

    frames: int
    audio: tuple[AudioOutcome, ...] = ()

    @property
    def reencoded_audio(self) -> tuple[AudioOutcome, ...]:
        return tuple(a for a in self.audio if not a.copied)


class _Pending:
    """A decoded frame waiting for its turn, turned upright on demand."""

    def __init__(self, frame: Any, index: int, pts: int, time_base: Fraction | None) -> None:
        self.frame = frame
        self.index = index
        self.pts = pts
        self.time_s = float(pts * time_base) if time_base else 0.0
        self.turns = round((frame.rotation or 0) / 90) % 4

    def in_place(self) -> bool:
        """Whether the decoded frame can be anonymized and encoded as it is (no conversion)."""
        frame = self.frame
        return (
            not self.turns
            and frame.format.name == PIXEL_FORMAT
            and frame.width % 2 == 0
            and frame.height % 2 == 0
        )

    def plane_views(self) -> tuple[Image, Image, Image]:
        """Writable views of the decoded frame's Y, U and V planes (copied only if shared)."""
        self.frame.make_writable()
        y, u, v = (
            np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width]
            for p in self.frame.planes
        )
        return y, u, v

    def planes(self, width: int, height: int) -> Image:
        """The frame as one upright 8-bit 4:2:0 array (Y rows, then U, then V)."""
        frame = self.frame
        w, h = (height, width) if self.turns % 2 else (width, height)
        if (frame.width, frame.height) != (w, h):
            frame = frame.reformat(width=w, height=h)  # odd sides only: 4:2:0 needs even
        data: Image = frame.to_ndarray(format=PIXEL_FORMAT)
        if not self.turns:
            return data
        y, u, v = _split_planes(data, w, h)
        turned = [np.rot90(p, k=self.turns) for p in (y, u, v)]
        return np.concatenate([turned[0].ravel(), turned[1].ravel(), turned[2].ravel()]).reshape(
            height * 3 // 2, width
        )

    def small_bgr(self, width: int) -> Image:
        """An upright BGR copy scaled down to ``width`` (for detection)."""
        frame = self.frame
        upright_w = frame.height if self.turns % 2 else frame.width
        scale = min(1.0, width / upright_w)
        size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
        image = frame.reformat(width=size[0], height=size[1], format="bgr24").to_ndarray()
        return np.ascontiguousarray(np.rot90(image, k=self.turns)) if self.turns else image


class _Timestamps:
    """Presentation timestamps for the encoder: the decoder's, made strictly increasing.

    AVI stores no presentation times (FFmpeg guesses them from decode order, wrongly once
    there are B-frames), so there every frame gets ``first + index x frame duration``.
    """

    def __init__(self, stream: Any, *, by_index: bool) -> None:
        rate = stream.average_rate or stream.guessed_rate or Fraction(30)
        tb = stream.time_base or Fraction(1, 1000)
        self.step = max(1, round(1 / (rate * tb)))
        self.by_index = by_index
        self.first: int | None = None
        self.last: int | None = None

    def pts(self, decoded: int | None, index: int) -> int:
        if self.first is None:
            self.first = decoded or 0
        if self.by_index:
            value = self.first + index * self.step
        elif decoded is None:
            value = self.first if self.last is None else self.last + self.step
        else:
            value = decoded if self.last is None else max(decoded, self.last + 1)
        self.last = value
        return value


def _split_planes(data: Image, width: int, height: int) -> tuple[Image, Image, Image]:
    """Views of Y, U and V in a ``to_ndarray(format="yuv420p")`` array."""
    quarter = height // 4
    luma = data[:height]
    cb = data[height : height + quarter].reshape(height // 2, width // 2)
    cr = data[height + quarter :].reshape(height // 2, width // 2)
    return luma, cb, cr


def anonymize_video(
    src: Path,
    dst: Path,
    detections: Path,
    anonymizer: FrameAnonymizer,
    *,
    detect_every: int = DETECT_EVERY,
    infer_width: int = INFER_WIDTH_PX,
    progress: Progress | None = None,
    stop: StopCheck | None = None,
) -> VideoResult:
    """Anonymize the video ``src`` into ``dst`` (container chosen by its extension).

    Writes the detections JSON to ``detections``; returns the frame count and what became of
    the sound.
    """
    container = container_for(dst.suffix)
    try:
        source = av.open(str(src))  # probed by content: the name may lie
    except av.FFmpegError as exc:
        raise MediaError(f"the video cannot be opened ({_reason(exc)})") from exc
    with source:
        if source.streams.best("video") is None:  # cover art alone does not count
            raise MediaError("the file has no video stream")
        try:
            result = _transcode(
                source,
                dst,
                container,
                detections,
                anonymizer,
                detect_every,
                infer_width,
                progress,
                stop,
            )
        except av.FFmpegError as exc:
            raise MediaError(f"the video cannot be processed ({_reason(exc)})") from exc
    for audio in result.reencoded_audio:
        log.info(
            "video.audio_reencoded",
            input=str(src),  # in the engine: its job folder, named after the job's remote id
            stream=audio.index,
            codec_in=audio.codec_in,
            codec_out=audio.codec_out,
            why=audio.why,
        )
    return result


def _transcode(
    source: Any,
    dst: Path,
    container: Container,
    detections: Path,
    anonymizer: FrameAnonymizer,
    detect_every: int,
    infer_width: int,
    progress: Progress | None,
    stop: StopCheck | None,
) -> VideoResult:
    video_in = source.streams.best("video")  # the main one: not cover art
    video_in.thread_type = "AUTO"
    audio_in = list(source.streams.audio)
    rate = video_in.average_rate or video_in.guessed_rate or Fraction(30)
    total = _frame_count(video_in, rate)
    demuxer = _Demuxer(source, video_in, audio_in)
    frames = demuxer.frames()
    first = next(frames, None)
    if first is None:
        raise MediaError("the video has no decodable frame")
    upright = (
        (first.frame.height, first.frame.width)
        if first.turns % 2
        else (first.frame.width, first.frame.height)
    )
    out_w, out_h = upright[0] - upright[0] % 2, upright[1] - upright[1] % 2
    bt709 = _is_bt709(video_in.codec_context, out_h)

    with (
        open_output(str(dst), container) as sink,
        DetectionsWriter(
            detections, media="video", width=out_w, height=out_h, fps=float(rate)
        ) as writer,
    ):
        video_out, clock = add_video_stream(
            sink,
            container.video,
            rate=rate,
            time_base=video_in.time_base or Fraction(1, 90_000),
            size=(out_w, out_h),
        )
        kept_types = KEPT_PICTURE_TYPES if container.video.keeps_picture_types else frozenset()
        _copy_colour_tags(video_in.codec_context, video_out.codec_context)
        routes = {s.index: route_audio(sink, s, container) for s in audio_in}
        demuxer.attach(sink, routes)
        previous: Any = None  # the last picture encoded, to fill empty MPEG-2 slots

        def encode(frame: Any, pts: int) -> None:
            frame.pts = pts
            frame.time_base = clock.time_base
            for packet in video_out.encode(frame):
                sink.mux(packet)

        def find(item: _Pending) -> list[Hit]:
            small = item.small_bgr(infer_width)
            return anonymizer.find(small, width=out_w, height=out_h)

        def emit(item: _Pending, hits: list[Hit]) -> None:
            nonlocal previous
            if stop is not None and stop():
                raise Cancelled()
            kind = int(item.frame.pict_type)
            if item.in_place():
                frame = item.frame
                records = (
                    anonymizer.hide_yuv420(item.plane_views(), hits, bt709=bt709) if hits else []
                )
            else:
                data = item.planes(out_w, out_h)
                planes = _split_planes(data, out_w, out_h)
                records = anonymizer.hide_yuv420(planes, hits, bt709=bt709)
                frame = av.VideoFrame.from_ndarray(data, format=PIXEL_FORMAT)
            frame.pict_type = kind if kind in kept_types else 0
            writer.frame(item.index, item.time_s, records)
            pts, empty = clock.place(item.pts)
            for slot in empty:
                encode(previous, slot)
            encode(frame, pts)
            previous = frame
            if progress is not None:
                progress(item.index + 1, total)

        schedule = DetectionSchedule(find, emit, every=detect_every)
        written = schedule.run(itertools.chain([first], frames))
        for packet in video_out.encode(None):
            sink.mux(packet)
        demuxer.finish()
    return VideoResult(written, tuple(r.outcome for r in routes.values()))


class _Demuxer:
    """Reads the input: yields upright video frames and muxes audio packets as they come.

    The output exists only once the first frame is decoded (its size fixes the output
    size), so audio packets read before ``attach`` are kept and written on attachment.
    """

    def __init__(self, source: Any, video_in: Any, audio_in: list[Any]) -> None:
        self._source = source
        self._video_in = video_in
        self._audio_in = audio_in
        self._sink: Any = None
        self._routes: dict[int, AudioRoute] = {}
        self._early: list[Any] = []

    def attach(self, sink: Any, routes: dict[int, AudioRoute]) -> None:
        self._sink, self._routes = sink, routes
        for packet in self._early:
            self._mux_audio(packet)
        self._early.clear()

    def finish(self) -> None:
        """Write what re-encoded sound still holds (encoders keep a few frames back)."""
        for route in self._routes.values():
            self._sink.mux(route.finish())

    def frames(self) -> Iterator[_Pending]:
        index = 0
        time_base = self._video_in.time_base
        clock = _Timestamps(self._video_in, by_index=self._source.format.name == "avi")
        for packet in self._source.demux(self._video_in, *self._audio_in):
            if packet.stream.type != "audio":
                for frame in packet.decode():
                    yield _Pending(frame, index, clock.pts(frame.pts, index), time_base)
                    index += 1
            elif packet.dts is None:
                continue  # the demuxer's end-of-stream marker carries no data
            elif self._sink is None:
                self._early.append(packet)
            else:
                self._mux_audio(packet)

    def _mux_audio(self, packet: Any) -> None:
        self._sink.mux(self._routes[packet.stream.index].convert(packet))


def _frame_count(stream: Any, rate: Fraction) -> int | None:
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base:
        return max(1, round(float(stream.duration * stream.time_base * rate)))
    return None


def _copy_colour_tags(src: Any, dst: Any) -> None:
    """Keep the input's colour description: the frames stay in their YUV values."""
    for name in ("color_primaries", "color_trc", "colorspace"):
        value = getattr(src, name, None)
        if value:
            setattr(dst, name, value)


def _is_bt709(codec_context: Any, height: int) -> bool:
    """Whether the frames use the BT.709 matrix: tagged so, or untagged HD."""
    space = int(getattr(codec_context, "colorspace", 2) or 2)
    if space == 2:  # unspecified: players assume BT.709 from 720 lines up
        return height >= 720
    return space == 1


def _reason(exc: Exception) -> str:
    text = str(exc).strip().rstrip(".")
    return text.split(": '")[0] if text else type(exc).__name__

"""Which muxer and codecs a video is written with, chosen by its extension, and its sound.

The output keeps the input's name, so the extension chooses the muxer; the input itself is
probed by its content (a ``.ts`` file holding MP4 is read as MP4). The video is always
re-encoded (its pixels changed). Sound is copied packet for packet when the container allows
its codec and players play it there; otherwise it is decoded and re-encoded, and that is said
(``AudioOutcome.copied`` is False, and video.py logs ``video.audio_reencoded``).

| extension | muxer | video | sound copied when it is | else re-encoded to |
|---|---|---|---|---|
| .mp4 | mp4 | H.264: libx264, CRF 20, veryfast | anything the muxer takes | AAC |
| .mov | mov | H.264 | anything the muxer takes | AAC |
| .mkv | matroska | H.264 | anything the muxer takes | AAC |
| .avi | avi | H.264 | anything the muxer takes | MP3 (libmp3lame) |
| .m4v | ipod (brand ``M4V``) | H.264 | AAC, AC-3, ALAC | AAC |
| .3gp | 3gp | H.264 | AAC, AMR-NB, AMR-WB | AAC |
| .ts | mpegts, 188-byte packets | H.264 | AAC, AC-3, E-AC-3, MP2, MP3 | AAC |
| .mts, .m2ts | mpegts, 192-byte packets (M2TS, as AVCHD and Blu-ray) | H.264 | same as .ts | AAC |
| .webm | webm | VP9: libvpx-vp9, CRF 20, realtime speed 7 | Opus, Vorbis | Opus (libopus) |
| .mpg, .mpeg | vob (MPEG-2 program stream) | MPEG-2: mpeg2video, q 2 | MP2, MP3, AC-3 | MP2 |

Why:
- The mpegts and program-stream muxers take any codec without complaint and write streams
  that players cannot identify (FFmpeg puts H.264 in a program stream with no stream map, for
  example), so the sound copied into them is limited to the codecs their specifications
  carry, and their video codec is the one players expect there. WebM, ipod and 3gp
  refuse other codecs themselves; the lists say what they take (FFmpeg 8's codec tags).
- FFmpeg writes 192-byte M2TS packets on its own only for names ending in ``.m2ts``; AVCHD
  cameras name the same format ``.mts``, so the mode is set explicitly for both.
- ``.mpg`` goes through the ``vob`` muxer (an MPEG-2 program stream) rather than ``mpeg``
  (an MPEG-1 system stream): MPEG-2 video belongs in the former. MPEG-2 video has a constant
  frame rate from its own list: frames are placed on the smallest listed rate at least the
  input's average (for 30, 29.97, 25, 24 and 23.976 fps: the input's rate, every frame at
  its time). A variable-rate input, or one at an unlisted rate (12.5 fps goes to 14.985),
  gets a picture repeated where its frames leave a slot empty: the only case where the
  output has more frames than the input.
- VP9 settings and the MPEG-2 quantizer: see ``WEBM_VIDEO`` and ``MPEG2_VIDEO``.
- Sound is re-encoded at the input's sample rate when the encoder has it (else 48 kHz), with
  its channels (MP2 and MP3: at most stereo), at 64 kbit/s per channel (AAC), 48 (Opus) or
  96 (MP2, MP3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av

from blurd.engines.local.errors import MediaError

PIXEL_FORMAT = "yuv420p"  # what every player decodes


@dataclass(frozen=True)
class VideoCodec:
    """The video encoder of a container and its settings."""

    encoder: str
    options: Mapping[str, str]
    # x264 takes the source's P and B frame types and skips its own frame-type analysis; the
    # other encoders would only warn about (MPEG-2: B frames without B frames allowed) or ignore
    # them.
    keeps_picture_types: bool = False
    # MPEG-1/2 encoders count time in frames of a fixed rate taken from a list of their own.
    on_frame_grid: bool = False


X264_CRF = 20  # x264 constant quality: visually close to the phone and camera sources seen here
X264_PRESET = "veryfast"  # x264 speed/size trade-off; quality is set by the CRF
X264_VIDEO = VideoCodec(
    "libx264", {"crf": str(X264_CRF), "preset": X264_PRESET}, keeps_picture_types=True
)
# libvpx-vp9 in constant-quality mode (b=0). Encoding alone, 300 frames of a 10 s 640x360 clip
# on the project's 2-core machine (busy with other runs), PSNR against the source frames:
#   x264 CRF 20 veryfast             189 fps         428 kB  45.75 dB
#   VP9 realtime speed 7, CRF 20     117-179 fps     936 kB  45.44 dB   <- chosen
#   VP9 realtime speed 7, CRF 18     139 fps        1036 kB  45.97 dB
#   VP9 good speed 5 (its fastest)   23-27 fps       591 kB  45.82 dB
# Through the whole engine (detection included) a WebM took 1.0-1.1 times as long as the same
# clip as MP4 at speed 7, and 2.35 times at "good" speed 5, whose files are a third smaller.
# Speed 7 keeps the MP4 path's pace and quality; the price is size. (SVT-AV1, also allowed in
# WebM, was faster still, 279 fps for 471 kB at 45.2 dB, but older devices cannot play AV1.)
WEBM_VIDEO = VideoCodec(
    "libvpx-vp9",
    {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "7", "row-mt": "1"},
)
# A fixed quantizer, set as qmin = qmax (PyAV cannot set a frame's quality, which is how
# FFmpeg's own -q:v does it). Measured on the same clip made into a 3.3 Mbit/s MPEG-2 + MP2
# .mpg (DVD-like bits per pixel), faces off, PSNR of the output against that input:
#   q 2: 1.03x the input's size, 54.0 dB    <- chosen
#   q 3: 0.82x, 43.1 dB;  q 4: 0.62x, 41.1 dB
# The MP4 path loses less than q 3 does (45.9 dB against its own CRF 20 input), so q 2 keeps
# MPEG-2 at least as close to its input. A coarser input grows more: 1.41x for a 1.7 Mbit/s
# one. (From an H.264 source q 2 made 9 times x264 CRF 20's size: MPEG-2 is an older codec.)
MPEG2_QUANTIZER = 2
MPEG2_VIDEO = VideoCodec(
    "mpeg2video",
    {"qmin": str(MPEG2_QUANTIZER), "qmax": str(MPEG2_QUANTIZER)},
    on_frame_grid=True,
)

ANY_CODEC = None  # sound copied whatever its codec, when the muxer takes it


@dataclass(frozen=True)
class Container:
    """How one extension is written."""

    muxer: str
    video: VideoCodec
    copied_audio: frozenset[str] | None  # FFmpeg codec names copied as they are
    audio_encoder: str  # for the rest
    options: Mapping[str, str] = field(default_factory=dict)


_TS_AUDIO = frozenset({"aac", "ac3", "eac3", "mp2", "mp3"})
_M2TS = {"mpegts_m2ts_mode": "1"}

CONTAINERS: Mapping[str, Container] = {
    ".mp4": Container("mp4", X264_VIDEO, ANY_CODEC, "aac"),
    ".mov": Container("mov", X264_VIDEO, ANY_CODEC, "aac"),
    ".mkv": Container("matroska", X264_VIDEO, ANY_CODEC, "aac"),
    ".avi": Container("avi", X264_VIDEO, ANY_CODEC, "libmp3lame"),
    ".m4v": Container("ipod", X264_VIDEO, frozenset({"aac", "ac3", "alac"}), "aac"),
    ".3gp": Container("3gp", X264_VIDEO, frozenset({"aac", "amr_nb", "amr_wb"}), "aac"),
    ".ts": Container("mpegts", X264_VIDEO, _TS_AUDIO, "aac"),
    ".mts": Container("mpegts", X264_VIDEO, _TS_AUDIO, "aac", _M2TS),
    ".m2ts": Container("mpegts", X264_VIDEO, _TS_AUDIO, "aac", _M2TS),
    ".webm": Container("webm", WEBM_VIDEO, frozenset({"opus", "vorbis"}), "libopus"),
    ".mpg": Container("vob", MPEG2_VIDEO, frozenset({"mp2", "mp3", "ac3"}), "mp2"),
    ".mpeg": Container("vob", MPEG2_VIDEO, frozenset({"mp2", "mp3", "ac3"}), "mp2"),
}

# Re-encoded sound: bit rate per channel, the channels the encoder takes, and the sample rates
# used when the input's is not one of them (MP2 at the MPEG-1 rates, where 96 kbit/s per
# channel is a valid rate).
AUDIO_BITS_PER_CHANNEL = {"aac": 64_000, "libopus": 48_000, "mp2": 96_000, "libmp3lame": 96_000}
AUDIO_MAX_CHANNELS = {"aac": 8, "libopus": 8, "mp2": 2, "libmp3lame": 2}
AUDIO_RATES_HZ = {"mp2": (48_000, 44_100, 32_000), "libmp3lame": (48_000, 44_100, 32_000)}
FALLBACK_AUDIO_RATE_HZ = 48_000


def container_for(ext: str) -> Container:
    """The way videos named ``*<ext>`` are written."""
    try:
        return CONTAINERS[ext.lower()]
    except KeyError:
        raise MediaError(
            f"the local engine does not write {ext or 'extensionless'} videos"
        ) from None


def open_output(path: str, container: Container) -> Any:
    """The output file, with the container's muxer whatever FFmpeg would guess from ``path``."""
    return av.open(path, "w", format=container.muxer, container_options=dict(container.options))


def add_video_stream(
    sink: Any, codec: VideoCodec, *, rate: Fraction, time_base: Fraction, size: tuple[int, int]
) -> tuple[Any, FrameTimes]:
    """The video stream and the clock that turns input timestamps into the encoder's."""
    times = FrameTimes(time_base, grid_rate(rate) if codec.on_frame_grid else None)
    stream: Any = sink.add_stream(codec.encoder, rate=times.rate or rate)
    stream.width, stream.height = size
    stream.pix_fmt = PIXEL_FORMAT
    stream.time_base = times.time_base
    stream.codec_context.time_base = times.time_base
    stream.options = dict(codec.options)
    return stream, times


class FrameTimes:
    """Encoder timestamps: the input's own, or for MPEG-1/2 the slots of a fixed frame rate.

    On the grid a frame goes to the slot nearest its time, one slot after the previous frame at
    the earliest, so the order is kept and a constant-rate input keeps every timestamp. Slots
    left empty (a variable-rate input, or a rate not on MPEG-2's list) are to be filled with
    the previous picture: a program stream stores the time of only some frames and players
    place the others one frame duration apart, so a gap would shift the frames after it.
    """

    def __init__(self, time_base: Fraction, rate: Fraction | None) -> None:
        self.rate = rate
        self.source_time_base = time_base
        self.time_base = 1 / rate if rate else time_base
        self._last: int | None = None

    def place(self, source_pts: int) -> tuple[int, range]:
        """The frame's timestamp, and the empty slots just before it (none off the grid)."""
        if self.rate is None:
            return source_pts, range(0)
        slot = round(source_pts * self.source_time_base * self.rate)
        last, self._last = self._last, slot
        if last is None:
            return slot, range(0)
        slot = self._last = max(slot, last + 1)
        return slot, range(last + 1, slot)


def grid_rate(rate: Fraction) -> Fraction:
    """The smallest frame rate MPEG-2 can signal that is at least ``rate`` (29.97 stays 29.97).

    At least, not nearest: with fewer slots than frames each frame would push the next one
    later and the picture would drift behind the sound.
    """
    listed = av.Codec(MPEG2_VIDEO.encoder, "w").frame_rates or []
    rates = sorted(Fraction(r.numerator, r.denominator) for r in listed)
    # 29.97 must still find 30000/1001, and 24 must not: the two differ by a thousandth
    tolerance = Fraction(1, 10_000)
    for candidate in rates:
        if candidate >= rate * (1 - tolerance):
            return candidate
    return rates[-1]


@dataclass(frozen=True)
class AudioOutcome:
    """What happened to one sound stream of the input."""

    index: int  # the stream's index in the input
    codec_in: str
    codec_out: str
    copied: bool
    why: str = ""  # for a re-encoded stream: why it was not copied


class AudioRoute:
    """One input sound stream on its way into the output: packets in, packets to mux out."""

    def __init__(self, stream: Any, outcome: AudioOutcome) -> None:
        self.stream = stream
        self.outcome = outcome

    def convert(self, packet: Any) -> list[Any]:
        raise NotImplementedError

    def finish(self) -> list[Any]:
        return []


class _Copied(AudioRoute):
    def convert(self, packet: Any) -> list[Any]:
        packet.stream = self.stream
        return [packet]


class _Reencoded(AudioRoute):
    """Decoded and encoded again; PyAV's encoder converts format, layout and frame size."""

    def __init__(self, stream: Any, outcome: AudioOutcome, source: Any) -> None:
        super().__init__(stream, outcome)
        self._decoder = source.codec_context

    def convert(self, packet: Any) -> list[Any]:
        return [p for frame in packet.decode() for p in self.stream.encode(frame)]

    def finish(self) -> list[Any]:
        drained = [p for frame in self._decoder.decode(None) for p in self.stream.encode(frame)]
        return drained + list(self.stream.encode(None))


def route_audio(sink: Any, source: Any, container: Container) -> AudioRoute:
    """Copy the input sound stream ``source`` into ``sink`` if allowed, else re-encode it."""
    codec_in = source.codec_context.codec.canonical_name
    allowed = container.copied_audio
    if allowed is None or codec_in in allowed:
        try:
            stream = sink.add_stream_from_template(source)
        except ValueError:  # PyAV checks the muxer's own list before adding anything
            why = f"the {container.muxer} muxer does not take {codec_in}"
        else:
            return _Copied(stream, AudioOutcome(source.index, codec_in, codec_in, copied=True))
    else:
        why = f"{codec_in} is not one of {', '.join(sorted(allowed))} in {container.muxer}"
    stream = _add_audio_encoder(sink, source.codec_context, container.audio_encoder)
    codec_out = stream.codec_context.codec.canonical_name
    outcome = AudioOutcome(source.index, codec_in, codec_out, copied=False, why=why)
    return _Reencoded(stream, outcome, source)


def _add_audio_encoder(sink: Any, decoder: Any, encoder: str) -> Any:
    codec = av.Codec(encoder, "w")
    rates = AUDIO_RATES_HZ.get(encoder) or tuple(codec.audio_rates or ())
    rate = decoder.sample_rate if not rates or decoder.sample_rate in rates else None
    channels = min(decoder.channels or 2, AUDIO_MAX_CHANNELS.get(encoder, 2))
    layout = decoder.layout.name if decoder.layout and channels == decoder.channels else ""
    if not layout or layout.endswith("channels"):  # an unnamed order no encoder takes
        layout = "mono" if channels == 1 else "stereo"
        channels = min(channels, 2)
    stream: Any = sink.add_stream(encoder, rate=rate or FALLBACK_AUDIO_RATE_HZ)
    stream.layout = layout
    stream.bit_rate = AUDIO_BITS_PER_CHANNEL.get(encoder, 64_000) * channels
    stream.time_base = Fraction(1, stream.codec_context.sample_rate)
    stream.codec_context.time_base = stream.time_base
    return stream

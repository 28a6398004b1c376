"""Videos: the engine's streams remuxed without their tags, plus the input's tags the policy allows.

The engine's output is trusted for its pictures and sound only. Its packets are copied one by
one, unchanged (no re-encoding; memory stays flat whatever the size), into a new file of the
same container format with no container or stream tag of the output's. The source's tags are
then set on it, filtered with the categories of ``blurd.metadata.policy``:

- always: the video's display matrix (side data of the output: it describes the output's own
  pixels, so a phone video stays upright) and a numeric ``rotate`` tag if an older writer used
  one; each stream's ``language`` (players choose tracks by it).
- ``safe`` adds ``time`` (creation_time, date, com.apple.quicktime.creationdate), ``camera``
  (make, model, com.apple.quicktime.make/model) and ``technical`` tags (handler_name,
  com.android.capture.fps).
- ``keep`` adds everything else: locations (``gps``), com.apple.quicktime.content.identifier
  (``serial``: a unique id, like ImageUniqueID in photos), artist and copyright (``owner``),
  title and comment (``comment``), encoder and software versions (``exif-other``).

Streams: video, audio and subtitles are copied; attached pictures (cover art) and image
attachments never are (they may show the un-blurred picture); font attachments always are
(subtitles need them), other attachments with ``keep`` only. Data streams (GoPro GPMF, Apple
timed metadata: they may hold a GPS track) are copied with ``keep`` only, and dropped if the
container refuses them. Chapters are not copied (but FFmpeg shows a QuickTime chapter track
as a subtitle stream, which is copied as one). FFmpeg never writes a source's ``encoder`` tag:
it removes it in bit-exact mode and overwrites it otherwise.

The muxer is the output's own format, picked by the output's extension (``_MUXERS``); what a
container cannot hold (AVI, MPEG-TS and MPEG-PS have few or no tags) is read back from the new
file and reported in ``Carried.note``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
from av.container import InputContainer
from av.stream import Disposition, Stream

from blurd.metadata.policy import CARRIED, Carried, MetadataError, Policy

__all__ = ["Carried", "carry_video_metadata", "category"]

# Demuxer name (``av.open(output).format.name``) -> (muxer by file extension, default muxer).
# A demuxer serves a family of formats; the extension says which member the output is.
# The choices match the local engine's (blurd/engines/local/containers.py), so a rewrite keeps
# the form of its outputs: M4V brand, MPEG-2 program streams, 192-byte packets for AVCHD.
_MUXERS: dict[str, tuple[dict[str, str], str]] = {
    "mov,mp4,m4a,3gp,3g2,mj2": (
        {".mov": "mov", ".qt": "mov", ".3gp": "3gp", ".3g2": "3g2", ".m4v": "ipod"},
        "mp4",
    ),
    "matroska,webm": ({".webm": "webm"}, "matroska"),
    "avi": ({}, "avi"),
    "mpegts": ({}, "mpegts"),
    "mpeg": ({".vob": "vob", ".mpg": "vob", ".mpeg": "vob"}, "mpeg"),
}
# The mpegts muxer writes 192-byte packets by itself only for names ending in .m2ts; AVCHD's
# .mts is the same format.
_M2TS = frozenset({".mts", ".m2ts"})
# Container keys the mov and mp4 muxers write without ``movflags=use_metadata_tags`` (checked
# with FFmpeg 8.1). Any other key (com.apple.quicktime.*, com.android.*) needs that flag, which
# writes every key as a QuickTime "mdta" item.
_MP4_NATIVE = frozenset(
    {"creation_time", "title", "artist", "date", "comment", "location", "encoder"}
)
_NATIVE_KEYS = {"mp4": _MP4_NATIVE, "mov": _MP4_NATIVE | {"make", "model"}}

# An output whose packets stop this much before its declared duration is a cut download.
TRUNCATION_SLACK_S = 0.5
TRUNCATION_SLACK_RATIO = 0.05

_PLAYBACK_KEYS = frozenset({"language"})  # carried whatever the policy
# Keys that describe the file, not its content: never carried, never reported.
_STRUCTURAL_KEYS = frozenset(
    {"major_brand", "minor_version", "compatible_brands"}  # the muxer writes its own
    | {"duration", "bps", "number_of_frames", "number_of_bytes"}  # the source's encode stats
    | {"rotate"}  # the output's pixels decide their rotation, not the source's tag
)
_KEYS_BY_CATEGORY = {
    "time": ("creation_time", "date", "com.apple.quicktime.creationdate"),
    "camera": ("make", "model", "com.apple.quicktime.make", "com.apple.quicktime.model"),
    "technical": ("handler_name", "com.android.capture.fps"),
    "serial": ("com.apple.quicktime.content.identifier",),
    "owner": ("artist", "album_artist", "author", "composer", "copyright", "performer"),
    "comment": ("title", "comment", "description", "synopsis", "keywords"),
}
_CATEGORY_BY_KEY = {key: name for name, keys in _KEYS_BY_CATEGORY.items() for key in keys}
_GPS_MARKS = ("location", "gps", "xyz", "iso6709", "latitude", "longitude", "altitude")
_OTHER = "exif-other"  # policy.py's name for every other tag: carried by ``keep`` only
_FONT_MIMETYPES = frozenset(
    {"application/x-truetype-font", "application/vnd.ms-opentype", "application/font-sfnt"}
)

Slot = tuple[str, int]  # (stream type, rank among the file's streams of that type)


@dataclass
class _Copied:
    packets: int = 0
    end_s: float = 0.0  # where the last packet ends, in seconds
    notes: list[str] = field(default_factory=list)


class _DataRefused(MetadataError):
    """The muxer failed on a file that included data streams: worth a try without them."""


@dataclass
class _Tags:
    container: dict[str, str]
    streams: dict[Slot, dict[str, str]]

    def names(self) -> Iterator[tuple[str, Slot | None, str]]:
        """(display name, slot or None for the container, key) of every tag."""
        for key in self.container:
            yield key, None, key
        for slot, tags in self.streams.items():
            for key in tags:
                yield f"{slot[0]}{slot[1]}:{key}", slot, key

    def get(self, slot: Slot | None) -> dict[str, str]:
        return self.container if slot is None else self.streams.get(slot, {})


def carry_video_metadata(source: Path, output: Path, dest: Path, policy: Policy) -> Carried:
    """Write ``dest``: the streams of ``output`` remuxed as they are, with the tags of ``source``
    that ``policy`` allows and none of ``output``'s.

    ``dest`` must not exist yet (same extension as ``output``). Raises ``MetadataError`` when
    ``output`` cannot be read or remuxed; a ``source`` whose tags cannot be read carries none.
    """
    notes: list[str] = []
    try:
        found = _read_tags(source)
    except (av.FFmpegError, OSError, UnicodeError) as exc:
        found = _Tags({}, {})
        notes.append(f"source tags unreadable, none carried ({_reason(exc)})")
    chosen, dropped = _select(found, policy)
    keep = policy is Policy.KEEP
    try:
        try:
            notes += _remux(output, dest, chosen, keep=keep, with_data=keep)
        except _DataRefused:
            # A data stream the muxer refuses (a QuickTime timecode track, say) only shows when
            # the header is written: try once more without data streams.
            dest.unlink(missing_ok=True)
            notes += _remux(output, dest, chosen, keep=keep, with_data=False)
        written = _read_tags(dest)
    except (MetadataError, av.FFmpegError, OSError) as exc:
        dest.unlink(missing_ok=True)  # a partial copy is of no use to anyone
        if isinstance(exc, MetadataError):
            raise
        raise MetadataError(output, f"remuxed copy unreadable ({_reason(exc)})") from exc
    unmatched = {name for name, slot, _ in chosen.names() if slot and slot not in written.streams}
    unwritten = _unwritten(chosen, written) - unmatched
    if unwritten:
        notes.append(f"could not be written in this container: {', '.join(sorted(unwritten))}")
    missing = unwritten | unmatched  # unmatched: the output has no such stream
    kept = sorted(name for name, _, _ in chosen.names() if name not in missing)
    return Carried(tuple(kept), tuple(sorted(dropped | missing)), "; ".join(notes) or None)


def category(key: str) -> str:
    """The ``blurd.metadata.policy`` category of a container or stream tag."""
    name = key.lower()
    if any(mark in name for mark in _GPS_MARKS):
        return "gps"
    base, _, suffix = name.rpartition("-")
    if base and len(suffix) == 3 and suffix.isalpha():  # QuickTime language variants: title-eng
        name = base
    if name.startswith("date"):  # Matroska DATE_RECORDED, DATE_RELEASED...
        return "time"
    return _CATEGORY_BY_KEY.get(name, _OTHER)


def _select(tags: _Tags, policy: Policy) -> tuple[_Tags, set[str]]:
    """The tags ``policy`` lets through, and the display names of the others (structural
    keys are left out silently: they are not metadata)."""
    chosen = _Tags({}, {})
    dropped: set[str] = set()
    for name, slot, key in tags.names():
        value = tags.get(slot)[key]
        lowered = key.lower()
        if lowered in _STRUCTURAL_KEYS or lowered.startswith("_statistics_"):
            continue
        if lowered not in _PLAYBACK_KEYS and category(key) not in CARRIED[policy]:
            dropped.add(name)
        elif slot is None:
            chosen.container[key] = value
        else:
            chosen.streams.setdefault(slot, {})[key] = value
    return chosen, dropped


def _slots(container: InputContainer) -> Iterator[tuple[Stream, Slot | None]]:
    """Each stream with its slot; None for pictures and attachments, which have no match."""
    ranks: dict[str, int] = {}
    for stream in container.streams:
        if _is_picture(stream) or stream.type == "attachment":
            yield stream, None
            continue
        rank = ranks.get(stream.type, 0)
        ranks[stream.type] = rank + 1
        yield stream, (stream.type, rank)


def _is_picture(stream: Stream) -> bool:
    if stream.disposition & Disposition.attached_pic:
        return True
    mimetype = (stream.metadata.get("mimetype") or "").lower()
    return stream.type == "attachment" and mimetype.startswith("image/")


def _is_font(stream: Stream) -> bool:
    mimetype = (stream.metadata.get("mimetype") or "").lower()
    return mimetype.startswith("font/") or mimetype in _FONT_MIMETYPES


def _read_tags(path: Path) -> _Tags:
    # "replace": an undecodable tag must not make a whole file unreadable.
    with av.open(str(path), metadata_errors="replace") as container:
        streams = {slot: dict(s.metadata) for s, slot in _slots(container) if slot is not None}
        return _Tags(dict(container.metadata), streams)


def _remux(output: Path, dest: Path, tags: _Tags, *, keep: bool, with_data: bool) -> list[str]:
    """Copy ``output``'s streams into ``dest`` with ``tags``; returns notes on dropped streams."""
    try:
        source = av.open(str(output), metadata_errors="replace")
    except (av.FFmpegError, OSError) as exc:
        raise MetadataError(output, f"cannot be opened as a video ({_reason(exc)})") from exc
    with source:
        if not any(not _is_picture(s) for s in source.streams.video):
            raise MetadataError(output, "has no video stream")
        muxer = _muxer(source.format.name, output)
        # Bit-exact: no "encoder=Lavf<version>" tag of FFmpeg's own, no random Matroska UIDs.
        options = {"fflags": "+bitexact"}
        if muxer == "mpegts" and output.suffix.lower() in _M2TS:
            options["mpegts_m2ts_mode"] = "1"
        native = _NATIVE_KEYS.get(muxer)
        if native is not None and any(key.lower() not in native for key in tags.container):
            options["movflags"] = "use_metadata_tags"
        try:
            copied = _copy(source, dest, muxer, options, tags, keep=keep, with_data=with_data)
        except (av.FFmpegError, ValueError) as exc:
            refused = _DataRefused if with_data and source.streams.data else MetadataError
            raise refused(output, f"cannot be remuxed as {muxer} ({_reason(exc)})") from exc
        _check_complete(source, output, copied)
        return copied.notes


def _check_complete(source: InputContainer, output: Path, copied: _Copied) -> None:
    """Refuse an output whose packets stop well before the duration its header declares: a
    cut download. (FFmpeg reads such files without error; MPEG-TS declares no duration, and
    AVI without its index re-derives it, so a cut there looks like a shorter video.)"""
    if not copied.packets:
        raise MetadataError(output, "has no packets (truncated?)")
    if not source.duration or not copied.end_s:  # nothing declared, or no timestamps to judge
        return
    declared_s = source.duration / 1_000_000  # AV_TIME_BASE
    lasted_s = copied.end_s - (source.start_time or 0) / 1_000_000
    if lasted_s < declared_s - max(TRUNCATION_SLACK_S, TRUNCATION_SLACK_RATIO * declared_s):
        raise MetadataError(
            output, f"is truncated: its packets stop at {lasted_s:.2f} s of {declared_s:.2f} s"
        )


def _copy(
    source: InputContainer,
    dest: Path,
    muxer: str,
    options: dict[str, str],
    tags: _Tags,
    *,
    keep: bool,
    with_data: bool,
) -> _Copied:
    left_out: dict[str, int] = {}
    copied = _Copied()
    with av.open(str(dest), "w", format=muxer, container_options=options) as sink:
        copies: dict[int, Stream] = {}
        for stream, slot in _slots(source):
            reason = _left_out(stream, keep=keep, with_data=with_data)
            if reason:
                left_out[reason] = left_out.get(reason, 0) + 1
                continue
            # opaque: reuse the decoder's description instead of opening an encoder, which a
            # codec may not have in this build; no packet is decoded or encoded.
            copy = sink.add_stream_from_template(stream, opaque=True)
            if stream.codec_context is not None:
                _keep_codec_tag(stream, copy)
            copy.disposition = stream.disposition
            if stream.type == "attachment":  # fonts: their name and type are needed to use them
                copy.metadata.clear()
                for key in ("filename", "mimetype"):
                    if key in stream.metadata:
                        copy.metadata[key] = stream.metadata[key]
            if slot is not None:
                copy.metadata.update(tags.streams.get(slot, {}))
            for key, value in stream.metadata.items():  # an older writer's rotation tag
                if stream.type == "video" and key.lower() == "rotate" and _is_int(value):
                    copy.metadata[key] = value
            copies[stream.index] = copy
        sink.metadata.update(tags.container)
        wanted = [source.streams[i] for i in copies]
        for packet in source.demux(wanted):
            start = packet.pts if packet.pts is not None else packet.dts
            if start is None and packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            if start is not None and packet.time_base:
                end_s = float((start + (packet.duration or 0)) * packet.time_base)
                copied.end_s = max(copied.end_s, end_s)
            copied.packets += 1
            packet.stream = copies[packet.stream.index]
            sink.mux(packet)
    copied.notes = [f"{count} {reason} left out" for reason, count in sorted(left_out.items())]
    return copied


def _keep_codec_tag(stream: Stream, copy: Stream) -> None:
    """PyAV resets the codec tag of a stream made from a template; put the output's back.
    QuickTime needs HEVC tagged ``hvc1`` (the muxer's default, ``hev1``, does not play on Apple
    devices) and Matroska needs the FourCC of uncompressed video. The tag came from a file of
    this very format, so the muxer accepts it."""
    try:
        tag = stream.codec_context.codec_tag
    except UnicodeDecodeError:  # not a printable FourCC: leave the muxer's default
        return
    if tag != "\0\0\0\0":
        copy.codec_context.codec_tag = tag


def _left_out(stream: Stream, *, keep: bool, with_data: bool) -> str | None:
    """Why ``stream`` is not copied, or None."""
    if _is_picture(stream):
        return "attached picture(s)"
    if stream.type == "attachment" and not _is_font(stream) and not keep:
        return "attachment(s)"
    if stream.type == "data" and not with_data:
        return "data stream(s) the container refused" if keep else "data stream(s)"
    if stream.type not in ("video", "audio", "subtitle", "data", "attachment"):
        return "unknown stream(s)"
    return None


def _muxer(demuxer: str, output: Path) -> str:
    if demuxer not in _MUXERS:
        raise MetadataError(output, f"is a {demuxer} file: not a supported video container")
    by_extension, default = _MUXERS[demuxer]
    return by_extension.get(output.suffix.lower(), default)


def _unwritten(chosen: _Tags, written: _Tags) -> set[str]:
    """Names of ``chosen`` tags whose value the new file does not hold, under their own name
    (case aside: Matroska upper-cases keys) or under another one the demuxer chose."""
    missing: set[str] = set()
    for name, slot, key in chosen.names():
        value = chosen.get(slot)[key]
        back = {k.lower(): v for k, v in written.get(slot).items()}
        if back.get(key.lower()) != value and value not in back.values():
            missing.add(name)
    return missing


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _reason(exc: BaseException) -> str:
    # FFmpeg's and the OS's own words, without the file name the message already starts with.
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).replace("\n", " ")

"""JPEG (JFIF/EXIF): reading an input's metadata segments, rewriting an engine's output.

An output is rewritten segment by segment: every APPn and COM segment is dropped, except the
JFIF APP0 (rebuilt without its thumbnail) and an Adobe APP14 (it says how to turn the
components into colours); tables, frame headers and scans are copied unchanged; the
entropy-coded data after each SOS is streamed through in chunks, so the bytes from the first
SOS to EOI are the engine's own; anything after EOI (multi-picture images, "motion photo"
videos, junk) is dropped. The input's metadata, filtered, goes in right after SOI (after the
JFIF APP0 when there is one): APP1 Exif, APP1 XMP, APP2 ICC_PROFILE chunks, APP13 Photoshop,
COM.

From the input, only the segments before its first SOS are read. Its EXIF is rebuilt (see
``blurd.metadata.exif``); its XMP, Photoshop resources and comments are copied when the
policy carries them. Extended XMP, MPF and every other APPn (JUMBF/C2PA, FlashPix, vendor
blobs) are never carried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from blurd.metadata.embedded import filter_photoshop, icc_fits, xmp_holds_picture
from blurd.metadata.exif import JPEG_EXIF_LIMIT, filter_exif
from blurd.metadata.policy import Tally
from blurd.metadata.streams import (
    COPY_CHUNK_BYTES,
    MAX_METADATA_BYTES,
    Items,
    Malformed,
    Reader,
    be16,
)

SOI = 0xD8
EOI = 0xD9
SOS = 0xDA
COM = 0xFE
APP0 = 0xE0
APP1 = 0xE1
APP2 = 0xE2
APP13 = 0xED
APP14 = 0xEE
TEM = 0x01
_RST = range(0xD0, 0xD8)
_APPN = range(0xE0, 0xF0)
# Frame headers (SOF0-SOF15 minus DHT, JPG and DAC), where the component count is.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

_EXIF = b"Exif\x00"
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_EXTENSION = b"http://ns.adobe.com/xmp/extension/\x00"
_ICC = b"ICC_PROFILE\x00"
_MPF = b"MPF\x00"
_PHOTOSHOP = b"Photoshop 3.0\x00"
_JFIF = b"JFIF\x00"
_ADOBE = b"Adobe"

_MAX_PAYLOAD_BYTES = 65535 - 2
_MAX_FILL_BYTES = 65536  # 0xFF padding before a marker; more is not a JPEG
_SPACES = {1: "GRAY", 3: "RGB", 4: "CMYK"}

_Header = Callable[[int, int], bytes]  # (sequence number, count) -> a segment's own header


def collect(path: Path, tally: Tally, *, upright: bool, space: str | None) -> Items:
    """The segments of ``path``'s metadata that ``tally``'s policy carries, filtered."""
    with open(path, "rb") as fh:
        found = _read_metadata(Reader(fh), tally)
    return _filter(found, tally, upright=upright, space=space)


@dataclass
class _Found:
    """An input's metadata segments, as read (only what blurd might carry is held)."""

    exif: bytes | None = None
    xmp: bytes | None = None
    icc_chunks: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    photoshop: list[bytes] = field(default_factory=list)
    comments: list[bytes] = field(default_factory=list)
    held: dict[str, int] = field(default_factory=dict)  # bytes held so far, by kind


def _read_metadata(reader: Reader, tally: Tally) -> _Found:
    if reader.read_exact(2, "JPEG start") != b"\xff\xd8":
        raise Malformed("not a JPEG file")
    found = _Found()
    while True:
        marker = _read_marker(reader)
        if marker in (SOS, EOI):
            return found
        if marker == TEM or marker in _RST:
            continue
        if marker == SOI:
            raise Malformed(f"a second start-of-image marker at byte {reader.position}")
        size = _read_length(reader)
        if marker in _APPN or marker == COM:
            _sort(marker, reader.read_exact(size, "JPEG segment"), found, tally)
        else:
            reader.skip(size, "JPEG segment")


def _sort(marker: int, payload: bytes, found: _Found, tally: Tally) -> None:
    """Keeps an APPn or COM segment's payload in ``found`` if blurd might carry it."""
    if marker == COM:
        if _within(found.held, "comment", len(payload), tally):
            found.comments.append(payload)
    elif marker == APP0:
        if payload.startswith(b"JFXX\x00") or (
            payload[:5] == _JFIF and payload[12:14].strip(b"\x00")
        ):
            tally.drop("thumbnail")
    elif marker == APP1 and payload.startswith(_EXIF) and len(payload) > 6:
        if found.exif is None:
            found.exif = payload[6:]
        else:
            tally.drop("app-other")
    elif marker == APP1 and payload.startswith(_XMP):
        if found.xmp is None:
            found.xmp = payload[len(_XMP) :]
    elif marker == APP1 and payload.startswith(_XMP_EXTENSION):
        tally.drop("extended-xmp")
    elif marker == APP2 and payload.startswith(_ICC) and len(payload) > 14:
        if _within(found.held, "icc", len(payload), tally):
            found.icc_chunks.setdefault(payload[12], (payload[13], payload[14:]))
    elif marker == APP2 and payload.startswith(_MPF):
        tally.drop("mpf")
    elif marker == APP13 and payload.startswith(_PHOTOSHOP):
        if _within(found.held, "iptc", len(payload), tally):
            found.photoshop.append(payload[len(_PHOTOSHOP) :])
    elif marker != APP14:
        tally.drop("app-other")


def _filter(found: _Found, tally: Tally, *, upright: bool, space: str | None) -> Items:
    items: list[tuple[bytes, bytes]] = []
    if found.exif is not None:
        exif = filter_exif(found.exif, tally.policy, tally, upright=upright, limit=JPEG_EXIF_LIMIT)
        if exif is not None:
            items.append((bytes([APP1]), b"Exif\x00\x00" + exif))
    if found.xmp is not None:
        if xmp_holds_picture(found.xmp):
            tally.drop("xmp-picture")
        elif tally.allows("xmp"):
            items.append((bytes([APP1]), _XMP + found.xmp))
    fits = {kind: size <= MAX_METADATA_BYTES for kind, size in found.held.items()}
    if found.icc_chunks and fits["icc"]:
        profile = _join_icc(found.icc_chunks)
        if not icc_fits(profile, space):
            tally.drop("icc-mismatch")
        elif tally.allows("icc"):
            items += _split(APP2, profile, lambda seq, count: _ICC + bytes([seq, count]))
    if found.photoshop and fits["iptc"]:
        resources = filter_photoshop(b"".join(found.photoshop), tally)
        if resources and tally.allows("iptc"):
            items += _split(APP13, resources, lambda seq, count: _PHOTOSHOP)
    if found.comments and fits["comment"] and tally.allows("comment"):
        items += [(bytes([COM]), comment) for comment in found.comments if comment]
    return tuple(items)


def _within(held: dict[str, int], kind: str, size: int, tally: Tally) -> bool:
    """Counts ``size`` more bytes of ``kind`` held in memory; False (and ``oversized``) once
    there is more than we parse."""
    held[kind] = held.get(kind, 0) + size
    if held[kind] > MAX_METADATA_BYTES:
        tally.drop("oversized")
        return False
    return True


def _join_icc(chunks: dict[int, tuple[int, bytes]]) -> bytes:
    """The ICC profile from its APP2 chunks."""
    counts = {count for count, _ in chunks.values()}
    if len(counts) != 1 or sorted(chunks) != list(range(1, len(chunks) + 1)):
        raise Malformed("ICC profile chunks are missing or numbered inconsistently")
    if counts.pop() != len(chunks):
        raise Malformed("ICC profile is missing chunks")
    return b"".join(chunks[seq][1] for seq in sorted(chunks))


def _split(marker: int, data: bytes, header: _Header) -> list[tuple[bytes, bytes]]:
    """``data`` cut into segments that fit, each behind ``header(seq, count)``; at most
    ``MAX_METADATA_BYTES`` of it, so that the count stays under 256."""
    room = _MAX_PAYLOAD_BYTES - len(header(1, 1))
    pieces = [data[at : at + room] for at in range(0, len(data), room)]
    n = len(pieces)
    return [(bytes([marker]), header(i + 1, n) + piece) for i, piece in enumerate(pieces)]


def pixel_space(path: Path) -> str | None:
    """``"GRAY"``, ``"RGB"`` or ``"CMYK"`` from the output's frame header, if it has one."""
    with open(path, "rb") as fh:
        reader = Reader(fh)
        if reader.read_exact(2, "JPEG start") != b"\xff\xd8":
            raise Malformed("not a JPEG file")
        while True:
            marker = _read_marker(reader)
            if marker in (SOS, EOI):
                return None
            if marker == TEM or marker in _RST:
                continue
            size = _read_length(reader)
            if marker in _SOF:
                header = reader.read_exact(size, "JPEG frame header")
                return _SPACES.get(header[5]) if len(header) > 5 else None
            reader.skip(size, "JPEG segment")


def rewrite(path: Path, dst: BinaryIO, items: Items) -> None:
    """Writes ``path``'s image to ``dst`` with its metadata replaced by ``items``."""
    with open(path, "rb") as fh:
        _rewrite(Reader(fh), dst, items)


def _rewrite(reader: Reader, dst: BinaryIO, items: Items) -> None:
    if reader.read_exact(2, "JPEG start") != b"\xff\xd8":
        raise Malformed("not a JPEG file")
    dst.write(b"\xff\xd8")
    inserted = scanned = False
    while True:
        marker = _read_marker(reader)
        if marker == EOI:
            if not scanned:
                raise Malformed(f"end-of-image marker before any scan at byte {reader.position}")
            dst.write(b"\xff\xd9")
            return  # whatever follows EOI is not part of this image
        if marker == SOI or marker in _RST:
            raise Malformed(f"marker 0x{marker:02X} out of place at byte {reader.position}")
        if marker == TEM:
            continue
        size = _read_length(reader)
        if marker in _APPN or marker == COM:
            payload = reader.read_exact(size, "JPEG segment")
            if marker == APP0 and not inserted and payload[:5] == _JFIF and len(payload) >= 14:
                # Keep version and density; a JFIF thumbnail is 0 x 0.
                dst.write(_segment(APP0, payload[:12] + b"\x00\x00"))
            elif marker == APP14 and payload.startswith(_ADOBE) and len(payload) == 12:
                dst.write(_segment(APP14, payload))
            if not inserted:
                dst.write(b"".join(_segment(m[0], p) for m, p in items))
                inserted = True
            continue
        if not inserted:
            dst.write(b"".join(_segment(m[0], p) for m, p in items))
            inserted = True
        dst.write(bytes([0xFF, marker]) + (size + 2).to_bytes(2, "big"))
        reader.copy(dst, size, "JPEG segment")
        if marker == SOS:
            scanned = True
            _copy_entropy_coded(reader, dst)


def _copy_entropy_coded(reader: Reader, dst: BinaryIO) -> None:
    """Copies a scan's entropy-coded data, up to the marker that ends it (pushed back)."""
    while True:
        chunk = reader.read_some(COPY_CHUNK_BYTES)
        if not chunk:
            raise Malformed("image data ends without an end-of-image marker")
        at = 0
        while True:
            ff = chunk.find(b"\xff", at)
            if ff < 0:
                dst.write(chunk)
                break
            if ff + 1 == len(chunk):
                more = reader.read_some(1)
                if not more:
                    raise Malformed("image data ends without an end-of-image marker")
                chunk += more
            following = chunk[ff + 1]
            if following == 0x00 or following in _RST:
                at = ff + 2  # a stuffed 0xFF data byte, or a restart marker inside the scan
                continue
            view = memoryview(chunk)
            dst.write(view[:ff])
            reader.unread(bytes(view[ff:]))
            return


def _read_marker(reader: Reader) -> int:
    at = reader.position
    if reader.read_exact(1, "JPEG marker") != b"\xff":
        raise Malformed(f"expected a JPEG marker at byte {at}")
    for _ in range(_MAX_FILL_BYTES):
        code = reader.read_exact(1, "JPEG marker")[0]
        if code != 0xFF:
            if code == 0x00:
                raise Malformed(f"expected a JPEG marker at byte {at}")
            return code
    raise Malformed(f"too many fill bytes at byte {at}")


def _read_length(reader: Reader) -> int:
    length = be16(reader.read_exact(2, "JPEG segment length"))
    if length < 2:
        raise Malformed(f"JPEG segment length {length} at byte {reader.position - 2}")
    return length - 2


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

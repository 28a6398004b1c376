"""PNG (and APNG): reading an input's metadata chunks, rewriting an engine's output.

An output keeps only the chunks that make up its picture: IHDR, PLTE, tRNS, sBIT, bKGD, pHYs,
IDAT, IEND and the APNG chunks acTL, fcTL, fdAT, copied with their CRCs checked (image data is
streamed through in chunks). Everything else it has is dropped: text, eXIf, tIME, and also its
colour chunks, since the input's describe the pixels the engine kept. An unknown critical
chunk, a bad CRC or a missing IEND make it unpublishable. Anything after IEND is dropped.

From the input, these are carried, inserted right after IHDR:

- colour chunks, in every policy: iCCP (``icc``), sRGB, gAMA, cHRM, cICP, mDCv, cLLI
  (``colour``);
- eXIf, rebuilt and filtered like a JPEG's EXIF (see ``blurd.metadata.exif``);
- tIME and text whose keyword is "Creation Time" (``time``, so ``safe`` and ``keep``);
- XMP, the iTXt "XML:com.adobe.xmp" (``xmp``, ``keep`` only, and never with a picture in it);
- other text chunks (tEXt, zTXt, iTXt) as ``comment`` (``keep`` only), except ImageMagick's
  "Raw profile type ..." copies of EXIF/XMP/Photoshop blocks (``nested-metadata``: they can
  hold a thumbnail).

Every input chunk carried has its CRC checked; text beyond 1 MiB in all is ``oversized``.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import BinaryIO

from blurd.metadata.embedded import icc_fits, xmp_holds_picture
from blurd.metadata.exif import filter_exif
from blurd.metadata.policy import Tally
from blurd.metadata.streams import (
    MAX_METADATA_BYTES,
    Items,
    Malformed,
    Reader,
    be32,
    inflate_bounded,
)

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_CHUNK_BYTES = 0x7FFFFFFF
_PICTURE = frozenset(
    {b"IHDR", b"PLTE", b"tRNS", b"sBIT", b"bKGD", b"pHYs", b"IDAT", b"IEND"}
    | {b"acTL", b"fcTL", b"fdAT"}
)
_COLOUR = {
    b"iCCP": "icc",
    b"sRGB": "colour",
    b"gAMA": "colour",
    b"cHRM": "colour",
    b"cICP": "colour",
    b"mDCv": "colour",
    b"cLLI": "colour",
}
_TEXT = frozenset({b"tEXt", b"zTXt", b"iTXt"})
_WANTED = frozenset(_COLOUR) | _TEXT | {b"eXIf", b"tIME"}
_XMP_KEYWORD = b"XML:com.adobe.xmp"
_RAW_PROFILE = b"Raw profile type "
_CREATION_TIME = b"Creation Time"
# IHDR colour types: 0 grey, 2 RGB, 3 palette (RGB), 4 grey + alpha, 6 RGB + alpha.
_SPACES = {0: "GRAY", 2: "RGB", 3: "RGB", 4: "GRAY", 6: "RGB"}


def collect(path: Path, tally: Tally, *, upright: bool, space: str | None) -> Items:
    """The chunks of ``path``'s metadata that ``tally``'s policy carries, filtered."""
    with open(path, "rb") as fh:
        reader = Reader(fh)
        _read_signature(reader)
        colour: dict[bytes, bytes] = {}
        exif: bytes | None = None
        times: list[tuple[bytes, bytes]] = []
        texts: list[tuple[bytes, bytes]] = []
        text_budget = MAX_METADATA_BYTES
        first = True
        while True:
            kind, length = _read_head(reader)
            if first and kind != b"IHDR":
                raise Malformed("PNG does not start with IHDR")
            first = False
            if kind == b"IEND":
                break
            if kind not in _WANTED:
                reader.skip(length + 4, f"PNG {_name(kind)} chunk")
                continue
            if length > MAX_METADATA_BYTES or (kind in _TEXT and length > text_budget):
                tally.drop("oversized")
                reader.skip(length + 4, f"PNG {_name(kind)} chunk")
                continue
            data = _read_checked(reader, kind, length)
            if kind in _COLOUR:
                colour.setdefault(kind, data)
            elif kind == b"eXIf":
                if exif is None:
                    exif = data[6:] if data.startswith(b"Exif\x00\x00") else data
            elif kind == b"tIME":
                times = times or [(kind, data)]
            else:
                text_budget -= length
                texts.append((kind, data))

    items: list[tuple[bytes, bytes]] = []
    for kind, data in colour.items():
        if kind == b"iCCP" and not icc_fits(_iccp_head(data), space):
            tally.drop("icc-mismatch")
        elif tally.allows(_COLOUR[kind]):
            items.append((kind, data))
    if exif is not None:
        kept = filter_exif(exif, tally.policy, tally, upright=upright, limit=MAX_METADATA_BYTES)
        if kept is not None:
            items.append((b"eXIf", kept))
    if times and tally.allows("time"):
        items += times
    for kind, data in texts:
        category = _text_category(kind, data)
        if category in ("nested-metadata", "xmp-picture"):
            tally.drop(category)
        elif tally.allows(category):
            items.append((kind, data))
    return tuple(items)


def _text_category(kind: bytes, data: bytes) -> str:
    keyword, sep, rest = data.partition(b"\x00")
    if not sep or not 1 <= len(keyword) <= 79:
        raise Malformed(f"PNG {_name(kind)} chunk has no keyword")
    if keyword == _CREATION_TIME:
        return "time"
    if keyword.startswith(_RAW_PROFILE):
        return "nested-metadata"
    if keyword != _XMP_KEYWORD:
        return "comment"
    packet = _itxt_text(rest) if kind == b"iTXt" else rest
    if packet is None or xmp_holds_picture(packet):
        return "xmp-picture"  # unreadable XMP could hold anything
    return "xmp"


def _itxt_text(rest: bytes) -> bytes | None:
    """The text of an iTXt chunk after its keyword, inflated if need be."""
    if len(rest) < 2:
        return None
    compressed, fields = rest[0], rest[2:]
    _language, sep1, fields = fields.partition(b"\x00")
    _translated, sep2, text = fields.partition(b"\x00")
    if not (sep1 and sep2):
        return None
    return inflate_bounded(text) if compressed else text


def _iccp_head(data: bytes) -> bytes:
    """The start of an iCCP chunk's profile (enough for its header)."""
    _profile_name, _, compressed = data.partition(b"\x00")
    try:
        return zlib.decompressobj().decompress(compressed[1:], 128)
    except zlib.error as exc:
        raise Malformed("PNG iCCP chunk does not inflate") from exc


def pixel_space(path: Path) -> str | None:
    """``"GRAY"`` or ``"RGB"`` from the output's IHDR."""
    with open(path, "rb") as fh:
        reader = Reader(fh)
        _read_signature(reader)
        kind, length = _read_head(reader)
        if kind != b"IHDR" or length != 13:
            raise Malformed("PNG does not start with a 13-byte IHDR")
        return _SPACES.get(reader.read_exact(13, "PNG IHDR chunk")[9])


def rewrite(path: Path, dst: BinaryIO, items: Items) -> None:
    """Writes ``path``'s image to ``dst`` with its metadata replaced by ``items``."""
    with open(path, "rb") as fh:
        reader = Reader(fh)
        _read_signature(reader)
        dst.write(SIGNATURE)
        kind, length = _read_head(reader)
        if kind != b"IHDR":
            raise Malformed("PNG does not start with IHDR")
        _copy_checked(reader, dst, kind, length)
        for item_kind, data in items:
            crc = zlib.crc32(data, zlib.crc32(item_kind))
            dst.write(len(data).to_bytes(4, "big") + item_kind + data + crc.to_bytes(4, "big"))
        while True:
            kind, length = _read_head(reader)
            if kind in _PICTURE:
                _copy_checked(reader, dst, kind, length)
                if kind == b"IEND":
                    return  # whatever follows IEND is not part of this image
            elif kind[0] & 0x20 == 0:
                raise Malformed(f"PNG has an unknown critical chunk {_name(kind)}")
            else:
                reader.skip(length + 4, f"PNG {_name(kind)} chunk")


def _read_signature(reader: Reader) -> None:
    if reader.read_exact(8, "PNG signature") != SIGNATURE:
        raise Malformed("not a PNG file")


def _read_head(reader: Reader) -> tuple[bytes, int]:
    head = reader.read_exact(8, "PNG chunk header")
    length, kind = be32(head), head[4:]
    if not kind.isalpha():
        raise Malformed(f"PNG chunk type {kind!r} at byte {reader.position - 8} is not a name")
    if length > _MAX_CHUNK_BYTES:
        raise Malformed(f"PNG {_name(kind)} chunk length {length} is too large")
    return kind, length


def _read_checked(reader: Reader, kind: bytes, length: int) -> bytes:
    data = reader.read_exact(length, f"PNG {_name(kind)} chunk")
    stored = be32(reader.read_exact(4, f"PNG {_name(kind)} CRC"))
    if zlib.crc32(data, zlib.crc32(kind)) != stored:
        raise Malformed(f"PNG {_name(kind)} chunk has a bad CRC")
    return data


def _copy_checked(reader: Reader, dst: BinaryIO, kind: bytes, length: int) -> None:
    at = reader.position - 8
    dst.write(length.to_bytes(4, "big") + kind)
    crc = reader.copy(dst, length, f"PNG {_name(kind)} chunk", zlib.crc32(kind))
    stored = reader.read_exact(4, f"PNG {_name(kind)} CRC")
    if be32(stored) != crc:
        raise Malformed(f"PNG {_name(kind)} chunk at byte {at} has a bad CRC")
    dst.write(stored)


def _name(kind: bytes) -> str:
    return kind.decode("latin-1")

"""WEBP (RIFF): reading an input's metadata chunks, rewriting an engine's output.

An output keeps only the chunks that make up its picture: VP8X (rewritten), ANIM, ANMF, ALPH,
VP8 and VP8L, in their order, with their data streamed through in chunks. Its ICCP, EXIF, XMP
and unknown chunks are dropped, and so is anything after the RIFF size. The input's ICCP goes
right after VP8X, its EXIF (rebuilt, see ``blurd.metadata.exif``) and XMP (``keep`` only, and
never with a picture in it) at the end, as the container specification orders them.

Metadata chunks only exist in the extended format, so a simple-format output (a lone VP8 or
VP8L chunk) that receives any gets a VP8X header, its canvas size read from the bitstream.
The VP8X flags for ICC, EXIF and XMP always match the chunks present, and the RIFF size is
recomputed. An EXIF chunk starting with "Exif\\0\\0" (some writers add it) is accepted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from blurd.metadata.embedded import icc_fits, xmp_holds_picture
from blurd.metadata.exif import filter_exif
from blurd.metadata.policy import Tally
from blurd.metadata.streams import MAX_METADATA_BYTES, Items, Malformed, Reader, le32

VP8X = b"VP8X"
VP8 = b"VP8 "
VP8L = b"VP8L"
ICCP = b"ICCP"
EXIF = b"EXIF"
XMP = b"XMP "
_PICTURE = frozenset({b"ANIM", b"ANMF", b"ALPH", VP8, VP8L})
_BITSTREAMS = frozenset({VP8, VP8L, b"ANMF"})
_MAX_RIFF_BYTES = 0xFFFFFFFE

_ICC_FLAG = 0x20
_ALPHA_FLAG = 0x10
_EXIF_FLAG = 0x08
_XMP_FLAG = 0x04
_ANIMATION_FLAG = 0x02


@dataclass(frozen=True)
class _Chunk:
    kind: bytes
    at: int  # where its payload starts in the file
    size: int


def collect(path: Path, tally: Tally, *, upright: bool, space: str | None) -> Items:
    """The chunks of ``path``'s metadata that ``tally``'s policy carries, filtered."""
    found: dict[bytes, bytes] = {}
    with open(path, "rb") as fh:
        reader = Reader(fh)
        for chunk in _walk(reader):
            if chunk.kind not in (ICCP, EXIF, XMP) or chunk.kind in found:
                continue
            if chunk.size > MAX_METADATA_BYTES:
                tally.drop("oversized")
                continue
            reader.seek(chunk.at)
            found[chunk.kind] = reader.read_exact(chunk.size, f"WEBP {_name(chunk.kind)} chunk")

    items: list[tuple[bytes, bytes]] = []
    if ICCP in found:
        if not icc_fits(found[ICCP], space):
            tally.drop("icc-mismatch")
        elif tally.allows("icc"):
            items.append((ICCP, found[ICCP]))
    if EXIF in found:
        blob = found[EXIF]
        blob = blob[6:] if blob.startswith(b"Exif\x00\x00") else blob
        kept = filter_exif(blob, tally.policy, tally, upright=upright, limit=MAX_METADATA_BYTES)
        if kept is not None:
            items.append((EXIF, kept))
    if XMP in found:
        if xmp_holds_picture(found[XMP]):
            tally.drop("xmp-picture")
        elif tally.allows("xmp"):
            items.append((XMP, found[XMP]))
    return tuple(items)


def pixel_space(path: Path) -> str | None:
    """Always ``"RGB"``: WEBP has no other colour model."""
    return "RGB"


def rewrite(path: Path, dst: BinaryIO, items: Items) -> None:
    """Writes ``path``'s image to ``dst`` with its metadata replaced by ``items``."""
    carried = dict(items)
    with open(path, "rb") as fh:
        reader = Reader(fh)
        first = next(_walk(reader))
        if first.kind == VP8X:
            if first.size < 10:
                raise Malformed("WEBP VP8X chunk is shorter than 10 bytes")
            reader.seek(first.at)
            head = reader.read_exact(10, "WEBP VP8X chunk")
            inherited = head[0] & (_ALPHA_FLAG | _ANIMATION_FLAG)
            canvas = head[4:10]
        elif first.kind in (VP8, VP8L):
            inherited, canvas = _canvas_from_bitstream(reader, first)
        else:
            raise Malformed(f"WEBP starts with a {_name(first.kind)} chunk")

        # Two walks rather than a list of chunks: an animation may have any number of them.
        picture_bytes = 0
        bitstream = False
        for chunk in _picture_chunks(reader, first):
            picture_bytes += 8 + chunk.size + (chunk.size & 1)
            bitstream = bitstream or chunk.kind in _BITSTREAMS
        if not bitstream:
            raise Malformed("WEBP has no image data")

        head_items: list[tuple[bytes, bytes]] = []
        if first.kind == VP8X or carried:
            flags = inherited
            flags |= _ICC_FLAG if ICCP in carried else 0
            flags |= _EXIF_FLAG if EXIF in carried else 0
            flags |= _XMP_FLAG if XMP in carried else 0
            head_items.append((VP8X, bytes([flags, 0, 0, 0]) + canvas))
        if ICCP in carried:
            head_items.append((ICCP, carried[ICCP]))
        tail_items = [(k, carried[k]) for k in (EXIF, XMP) if k in carried]

        in_memory = head_items + tail_items
        size = 4 + picture_bytes + sum(8 + len(d) + (len(d) & 1) for _, d in in_memory)
        if size > _MAX_RIFF_BYTES:
            raise Malformed("WEBP would be larger than a RIFF file can be")
        dst.write(b"RIFF" + size.to_bytes(4, "little") + b"WEBP")
        for kind, data in head_items:
            dst.write(_chunk_bytes(kind, data))
        for chunk in _picture_chunks(reader, first):
            reader.seek(chunk.at)
            dst.write(chunk.kind + chunk.size.to_bytes(4, "little"))
            reader.copy(dst, chunk.size, f"WEBP {_name(chunk.kind)} chunk")
            dst.write(b"\x00" * (chunk.size & 1))
        for kind, data in tail_items:
            dst.write(_chunk_bytes(kind, data))


def _picture_chunks(reader: Reader, first: _Chunk) -> Iterator[_Chunk]:
    """The chunks that make up the picture, in file order."""
    if first.kind != VP8X:
        yield first  # the simple format has nothing else that belongs to the picture
        return
    for chunk in _walk(reader):
        if chunk.kind in _PICTURE:
            yield chunk


def _walk(reader: Reader) -> Iterator[_Chunk]:
    """The chunks within the RIFF size, each checked to fit in it; trailing bytes are
    ignored. Safe to interleave with other reads: it seeks to each chunk header."""
    reader.seek(0)
    head = reader.read_exact(12, "RIFF header")
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        raise Malformed("not a WEBP file")
    end = 8 + le32(head, 4)
    if end > reader.size:
        raise Malformed(f"RIFF size {end - 8} is larger than the {reader.size}-byte file")
    if end < 12 + 8:
        raise Malformed("WEBP has no chunks")
    at = 12
    while at < end:
        if end - at < 8:
            raise Malformed(f"truncated WEBP chunk header at byte {at}")
        reader.seek(at)
        header = reader.read_exact(8, "WEBP chunk header")
        size = le32(header, 4)
        stop = at + 8 + size + (size & 1)
        if stop > end:
            raise Malformed(f"WEBP {_name(header[:4])} chunk at byte {at} runs past the RIFF end")
        yield _Chunk(header[:4], at + 8, size)
        at = stop


def _canvas_from_bitstream(reader: Reader, chunk: _Chunk) -> tuple[int, bytes]:
    """(alpha flag, VP8X canvas bytes) for a simple-format file's only bitstream."""
    reader.seek(chunk.at)
    if chunk.kind == VP8:
        frame = reader.read_exact(min(chunk.size, 10), "WEBP VP8 frame header")
        # A key frame: 3-byte tag with bit 0 clear, start code 9D 01 2A, 14-bit sizes.
        if len(frame) < 10 or frame[0] & 1 or frame[3:6] != b"\x9d\x01\x2a":
            raise Malformed("WEBP VP8 data does not start with a key frame")
        width = int.from_bytes(frame[6:8], "little") & 0x3FFF
        height = int.from_bytes(frame[8:10], "little") & 0x3FFF
        alpha = 0
    else:
        frame = reader.read_exact(min(chunk.size, 5), "WEBP VP8L header")
        if len(frame) < 5 or frame[0] != 0x2F:
            raise Malformed("WEBP VP8L data has no signature")
        bits = le32(frame, 1)
        width = (bits & 0x3FFF) + 1
        height = ((bits >> 14) & 0x3FFF) + 1
        alpha = _ALPHA_FLAG if bits >> 28 & 1 else 0
    if not (width and height):
        raise Malformed("WEBP image has no size")
    return alpha, (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")


def _chunk_bytes(kind: bytes, data: bytes) -> bytes:
    return kind + len(data).to_bytes(4, "little") + data + b"\x00" * (len(data) & 1)


def _name(kind: bytes) -> str:
    return kind.decode("latin-1").strip()

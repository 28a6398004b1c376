"""TIFF structures as EXIF uses them (TIFF 6.0, EXIF 2.3): read safely, written back anew.

Reading takes IFD0, the Exif IFD (tag 0x8769), the GPS IFD (0x8825) and the Interop IFD
(0xA005, inside the Exif IFD) out of an EXIF blob, in either byte order. Every offset and
every count times type size is checked against the blob before use, and an IFD referenced
twice is refused, so a hostile blob ends in ``Malformed`` rather than a loop or a crash. The
IFD chain after IFD0 (IFD1, the thumbnail) is only noted, never read.

Writing lays out a new blob in the source's byte order, with IFD0 and whichever sub-IFDs are
left and nothing else: no IFD1, no bytes that no entry references (the gaps are zeros). With
``preserve_layout``, each IFD and value goes back at its source offset when nothing before it
is in the way, so that MakerNotes whose inner offsets count from the TIFF header still work.
"""

from __future__ import annotations

from dataclasses import dataclass

from blurd.metadata.streams import Malformed

# Bytes per value, by TIFF field type; 13 is IFD (a LONG offset), 129 is EXIF 3.0's UTF-8.
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
TYPE_SIZES[129] = 1
SHORT = 3
LONG = 4
IFD_TYPE = 13

EXIF_IFD = 0x8769
GPS_IFD = 0x8825
INTEROP_IFD = 0xA005
POINTER_TAGS = frozenset({EXIF_IFD, GPS_IFD, INTEROP_IFD})

_HEADER_BYTES = 8
_ENTRY_BYTES = 12


@dataclass(frozen=True)
class Entry:
    """One IFD entry; ``value`` holds exactly count * type size bytes in the blob's order."""

    tag: int
    type: int
    count: int
    value: bytes
    origin: int | None = None  # offset of an out-of-line value in the source blob


@dataclass(frozen=True)
class Ifd:
    entries: tuple[Entry, ...]
    origin: int | None = None  # offset of the IFD in the source blob


@dataclass(frozen=True)
class Tiff:
    """The parts of an EXIF blob that blurd can carry."""

    order: str  # struct-style byte order: "<" (II) or ">" (MM)
    ifd0: Ifd
    exif: Ifd | None
    gps: Ifd | None
    interop: Ifd | None
    next_ifd: int  # offset of IFD1 (the thumbnail); 0 when there is none


def parse_tiff(blob: bytes) -> Tiff:
    """The IFDs of ``blob``; ``Malformed`` when its structure cannot be trusted."""
    if len(blob) < _HEADER_BYTES:
        raise Malformed("EXIF is shorter than a TIFF header")
    if blob[:4] == b"II*\x00":
        order = "<"
    elif blob[:4] == b"MM\x00*":
        order = ">"
    else:
        raise Malformed("EXIF does not start with a TIFF header")
    seen: set[int] = set()
    ifd0, next_ifd = _read_ifd(blob, order, _uint(blob, 4, 4, order), seen, "IFD0")
    entries0, exif_at = _take_pointer(ifd0.entries, EXIF_IFD, order)
    entries0, gps_at = _take_pointer(entries0, GPS_IFD, order)
    exif = gps = interop = None
    if exif_at is not None:
        exif, _ = _read_ifd(blob, order, exif_at, seen, "Exif IFD")
        exif_entries, interop_at = _take_pointer(exif.entries, INTEROP_IFD, order)
        exif = Ifd(_without_pointers(exif_entries), exif.origin)
        if interop_at is not None:
            interop, _ = _read_ifd(blob, order, interop_at, seen, "Interop IFD")
            interop = Ifd(_without_pointers(interop.entries), interop.origin)
    if gps_at is not None:
        gps, _ = _read_ifd(blob, order, gps_at, seen, "GPS IFD")
        gps = Ifd(_without_pointers(gps.entries), gps.origin)
    return Tiff(order, Ifd(_without_pointers(entries0), ifd0.origin), exif, gps, interop, next_ifd)


def _read_ifd(blob: bytes, order: str, at: int, seen: set[int], name: str) -> tuple[Ifd, int]:
    if at in seen:
        raise Malformed(f"EXIF {name} at {at} is referenced twice (a loop)")
    seen.add(at)
    if at < _HEADER_BYTES or at + 2 > len(blob):
        raise Malformed(f"EXIF {name} offset {at} is outside the {len(blob)}-byte blob")
    count = _uint(blob, at, 2, order)
    table_end = at + 2 + count * _ENTRY_BYTES
    if table_end > len(blob):
        raise Malformed(f"EXIF {name} with {count} entries runs past the end of the blob")
    # Some writers end the blob right after the last entry, without a next-IFD offset.
    next_ifd = _uint(blob, table_end, 4, order) if table_end + 4 <= len(blob) else 0
    entries: list[Entry] = []
    tags: set[int] = set()
    for start in range(at + 2, table_end, _ENTRY_BYTES):
        tag = _uint(blob, start, 2, order)
        kind = _uint(blob, start + 2, 2, order)
        count_ = _uint(blob, start + 4, 4, order)
        size = TYPE_SIZES.get(kind)
        if size is None or tag in tags:
            # TIFF 6.0: readers skip fields of an unexpected type; a repeated tag is junk.
            continue
        tags.add(tag)
        total = size * count_
        if total <= 4:
            entries.append(Entry(tag, kind, count_, blob[start + 8 : start + 8 + total]))
            continue
        offset = _uint(blob, start + 8, 4, order)
        if total > len(blob) or offset < _HEADER_BYTES or offset + total > len(blob):
            raise Malformed(
                f"EXIF {name} tag 0x{tag:04X}: {total} bytes at offset {offset} "
                f"are outside the {len(blob)}-byte blob"
            )
        entries.append(Entry(tag, kind, count_, blob[offset : offset + total], offset))
    return Ifd(tuple(entries), at), next_ifd


def _take_pointer(
    entries: tuple[Entry, ...], tag: int, order: str
) -> tuple[tuple[Entry, ...], int | None]:
    """``entries`` without the sub-IFD pointer ``tag``, and the offset it held."""
    for entry in entries:
        if entry.tag == tag:
            if entry.type not in (LONG, IFD_TYPE) or entry.count != 1:
                raise Malformed(f"EXIF sub-IFD pointer 0x{tag:04X} is not a single offset")
            rest = tuple(e for e in entries if e is not entry)
            return rest, _uint(entry.value, 0, 4, order)
    return entries, None


def _without_pointers(entries: tuple[Entry, ...]) -> tuple[Entry, ...]:
    # A sub-IFD pointer found anywhere but its own IFD would point at bytes never copied.
    return tuple(e for e in entries if e.tag not in POINTER_TAGS)


def _uint(blob: bytes, at: int, width: int, order: str) -> int:
    return int.from_bytes(blob[at : at + width], "little" if order == "<" else "big")


def pack_uint(value: int, width: int, order: str) -> bytes:
    return value.to_bytes(width, "little" if order == "<" else "big")


def read_short(entry: Entry, order: str) -> int | None:
    """The value of a single-SHORT entry, or None when the entry is anything else."""
    if entry.type != SHORT or entry.count != 1:
        return None
    return _uint(entry.value, 0, 2, order)


@dataclass(frozen=True)
class _Block:
    key: tuple[str, int]  # (IFD name, entry index) for a value, (IFD name, -1) for a table
    size: int
    origin: int | None


def build_tiff(
    order: str,
    ifd0: Ifd,
    exif: Ifd | None,
    gps: Ifd | None,
    interop: Ifd | None,
    *,
    preserve_layout: bool,
) -> bytes:
    """A new EXIF blob holding these IFDs (sub-IFDs without entries are left out)."""
    interop = interop if exif and interop and interop.entries else None
    exif = exif if (exif and exif.entries) or interop else None
    gps = gps if gps and gps.entries else None
    tables: list[tuple[str, Ifd, list[tuple[int, str]]]] = []
    pointers0 = [(EXIF_IFD, "exif")] if exif else []
    pointers0 += [(GPS_IFD, "gps")] if gps else []
    tables.append(("ifd0", ifd0, pointers0))
    if exif:
        tables.append(("exif", exif, [(INTEROP_IFD, "interop")] if interop else []))
    if gps:
        tables.append(("gps", gps, []))
    if interop:
        tables.append(("interop", interop, []))

    blocks: list[_Block] = []
    for name, ifd, pointers in tables:
        table_size = 2 + (len(ifd.entries) + len(pointers)) * _ENTRY_BYTES + 4
        blocks.append(_Block((name, -1), table_size, ifd.origin))
        for index, entry in enumerate(ifd.entries):
            if len(entry.value) > 4:
                blocks.append(_Block((name, index), len(entry.value), entry.origin))
    where, end = _layout(blocks, preserve_layout)

    out = bytearray(end)
    out[0:4] = b"II*\x00" if order == "<" else b"MM\x00*"
    out[4:8] = pack_uint(where[("ifd0", -1)], 4, order)
    for name, ifd, pointers in tables:
        rows: list[tuple[int, bytes]] = []
        for index, entry in enumerate(ifd.entries):
            if len(entry.value) > 4:
                at = where[(name, index)]
                out[at : at + len(entry.value)] = entry.value
                field = pack_uint(at, 4, order)
            else:
                field = entry.value.ljust(4, b"\x00")
            head = pack_uint(entry.tag, 2, order) + pack_uint(entry.type, 2, order)
            rows.append((entry.tag, head + pack_uint(entry.count, 4, order) + field))
        for tag, child in pointers:
            offset = pack_uint(where[(child, -1)], 4, order)
            head = pack_uint(tag, 2, order) + pack_uint(LONG, 2, order)
            rows.append((tag, head + pack_uint(1, 4, order) + offset))
        rows.sort(key=lambda row: row[0])  # TIFF requires ascending tags
        at = where[(name, -1)]
        table = pack_uint(len(rows), 2, order) + b"".join(row for _, row in rows)
        out[at : at + len(table) + 4] = table + b"\x00\x00\x00\x00"  # no next IFD
    return bytes(out)


def _layout(blocks: list[_Block], preserve: bool) -> tuple[dict[tuple[str, int], int], int]:
    """Word-aligned offsets for ``blocks``, and the blob's length."""
    if preserve:
        blocks = sorted(blocks, key=lambda b: (b.origin is None, b.origin or 0))
    where: dict[tuple[str, int], int] = {}
    cursor = _HEADER_BYTES
    for block in blocks:
        at = cursor + (cursor & 1)
        if preserve and block.origin is not None and block.origin >= at and block.origin % 2 == 0:
            at = block.origin
        where[block.key] = at
        cursor = at + block.size
    return where, cursor

"""Filtering an input's EXIF by policy into a new, minimal EXIF blob.

Each tag falls in one category of ``blurd.metadata.policy``; the policy keeps whole
categories. The tags named here are the whole list for ``safe``: anything unnamed is
``exif-other``, which only ``keep`` carries. The GPS IFD is carried whole or not at all
(``gps``); the Interop IFD, which only says which colour-space rules apply, counts as
``technical``.

Orientation: with ``upright`` (the engine already turned the pixels) a carried Orientation is
1, otherwise the input's value (1-8; anything else is dropped). An EXIF left with nothing but
Orientation 1 is not written at all, since that is what a missing EXIF means.

The result is a new TIFF blob in the input's byte order (see ``blurd.metadata.tiff``), never
the input's bytes, so nothing an entry does not reference survives. ``keep`` lays it out like
the input so that MakerNotes stay readable. A blob over ``limit`` bytes is laid out compactly,
then loses its largest values (``oversized``) until it fits: a huge UserComment is dropped
rather than the whole EXIF, or the file.
"""

from __future__ import annotations

from blurd.metadata.embedded import holds_jpeg
from blurd.metadata.policy import Policy, Tally
from blurd.metadata.tiff import SHORT, Entry, Ifd, build_tiff, pack_uint, parse_tiff, read_short

ORIENTATION = 0x0112
MAKER_NOTE = 0x927C
XMP_IN_TIFF = 0x02BC

# The largest TIFF blob a JPEG APP1 segment holds: 65535 - 2 (length) - 6 ("Exif\0\0").
JPEG_EXIF_LIMIT = 65527

_CATEGORIES: dict[str, tuple[int, ...]] = {
    "orientation": (ORIENTATION,),
    "time": (
        0x0132,  # DateTime
        0x9003,  # DateTimeOriginal
        0x9004,  # DateTimeDigitized
        0x9010,  # OffsetTime
        0x9011,  # OffsetTimeOriginal
        0x9012,  # OffsetTimeDigitized
        0x9290,  # SubSecTime
        0x9291,  # SubSecTimeOriginal
        0x9292,  # SubSecTimeDigitized
    ),
    "camera": (
        0x010F,  # Make
        0x0110,  # Model
        0xA432,  # LensSpecification
        0xA433,  # LensMake
        0xA434,  # LensModel
    ),
    "technical": (
        0x829A,  # ExposureTime
        0x829D,  # FNumber
        0x8822,  # ExposureProgram
        0x8827,  # PhotographicSensitivity (ISO)
        0x8830,  # SensitivityType
        0x8831,  # StandardOutputSensitivity
        0x8832,  # RecommendedExposureIndex
        0x8833,  # ISOSpeed
        0x9000,  # ExifVersion
        0x9201,  # ShutterSpeedValue
        0x9202,  # ApertureValue
        0x9203,  # BrightnessValue
        0x9204,  # ExposureBiasValue
        0x9205,  # MaxApertureValue
        0x9207,  # MeteringMode
        0x9208,  # LightSource
        0x9209,  # Flash
        0x920A,  # FocalLength
        0xA000,  # FlashpixVersion
        0xA001,  # ColorSpace
        0xA217,  # SensingMethod
        0xA402,  # ExposureMode
        0xA403,  # WhiteBalance
        0xA404,  # DigitalZoomRatio
        0xA405,  # FocalLengthIn35mmFilm
        0xA406,  # SceneCaptureType
        0xA408,  # Contrast
        0xA409,  # Saturation
        0xA40A,  # Sharpness
    ),
    "serial": (
        0xA420,  # ImageUniqueID
        0xA431,  # BodySerialNumber
        0xA435,  # LensSerialNumber
        0xC62F,  # CameraSerialNumber
    ),
    "owner": (
        0x013B,  # Artist
        0x8298,  # Copyright
        0xA430,  # CameraOwnerName
        0xA437,  # Photographer (EXIF 3.0)
        0xA438,  # ImageEditor (EXIF 3.0)
        0x9C9D,  # XPAuthor
    ),
    "comment": (
        0x010E,  # ImageDescription
        0x9286,  # UserComment
        0x9C9B,  # XPTitle
        0x9C9C,  # XPComment
        0x9C9E,  # XPKeywords
        0x9C9F,  # XPSubject
        0xA436,  # ImageTitle (EXIF 3.0)
    ),
    "makernote": (MAKER_NOTE,),
    "iptc": (0x83BB,),  # IPTC-NAA record
    # Tags that point at image data by offset: in EXIF, only thumbnails and previews.
    "thumbnail": (
        0x0111,  # StripOffsets
        0x0117,  # StripByteCounts
        0x0144,  # TileOffsets
        0x0145,  # TileByteCounts
        0x014A,  # SubIFDs
        0x0201,  # JPEGInterchangeFormat
        0x0202,  # JPEGInterchangeFormatLength
    ),
    "nested-metadata": (
        XMP_IN_TIFF,
        0x8649,  # Photoshop image resources, which can hold thumbnails
    ),
}


def _by_tag(categories: dict[str, tuple[int, ...]]) -> dict[int, str]:
    table: dict[int, str] = {}
    for name, tags in categories.items():
        for tag in tags:
            if tag in table:
                raise ValueError(f"EXIF tag 0x{tag:04X} is in {table[tag]} and {name}")
            table[tag] = name
    return table


TAG_CATEGORY = _by_tag(_CATEGORIES)


def filter_exif(
    blob: bytes, policy: Policy, tally: Tally, *, upright: bool, limit: int
) -> bytes | None:
    """A new EXIF blob with what ``policy`` carries of ``blob``, or None when nothing is left.
    ``Malformed`` when ``blob`` cannot be trusted."""
    tiff = parse_tiff(blob)
    if tiff.next_ifd:
        tally.drop("thumbnail")
    ifd0 = _filter_ifd(tiff.ifd0, tiff.order, tally, upright=upright, top=True)
    exif = _filter_ifd(tiff.exif, tiff.order, tally, upright=upright, top=False)
    gps = tiff.gps if tiff.gps and tiff.gps.entries and tally.allows("gps") else None
    interop = tiff.interop
    if interop and interop.entries and not tally.allows("technical"):
        interop = None
    if not (exif or gps or interop) and all(_is_default_orientation(e, tiff.order) for e in ifd0):
        return None

    sections = [
        ifd0,
        exif or [],
        list(gps.entries) if gps else [],
        list(interop.entries) if interop else [],
    ]

    def build(preserve: bool) -> bytes:
        return build_tiff(
            tiff.order,
            Ifd(tuple(sections[0]), tiff.ifd0.origin),
            Ifd(tuple(sections[1]), tiff.exif.origin if tiff.exif else None),
            Ifd(tuple(sections[2]), gps.origin if gps else None),
            Ifd(tuple(sections[3]), interop.origin if interop else None),
            preserve_layout=preserve,
        )

    out = build(policy is Policy.KEEP)
    if len(out) > limit:
        out = build(False)
    while len(out) > limit:
        if not _drop_largest(sections):
            return None
        tally.drop("oversized")
        out = build(False)
    return out


def _filter_ifd(
    ifd: Ifd | None, order: str, tally: Tally, *, upright: bool, top: bool
) -> list[Entry]:
    if ifd is None:
        return []
    kept: list[Entry] = []
    for entry in ifd.entries:
        category = TAG_CATEGORY.get(entry.tag, "exif-other")
        if category == "orientation" and not top:
            category = "exif-other"  # readers only look at IFD0's
        if category == "makernote" and holds_jpeg(entry.value):
            tally.drop("makernote-preview")
            continue
        if not tally.allows(category):
            continue
        if category == "orientation":
            value = read_short(entry, order)
            if value is None or not 1 <= value <= 8:
                continue
            if upright:
                entry = Entry(ORIENTATION, SHORT, 1, pack_uint(1, 2, order))
        kept.append(entry)
    return kept


def _is_default_orientation(entry: Entry, order: str) -> bool:
    return entry.tag == ORIENTATION and read_short(entry, order) == 1


def _drop_largest(sections: list[list[Entry]]) -> bool:
    """Removes the entry taking the most room (never Orientation); False if none is left."""
    best: tuple[int, int, int] | None = None
    for s, entries in enumerate(sections):
        for i, entry in enumerate(entries):
            if entry.tag == ORIENTATION and s == 0:
                continue
            room = 12 + (len(entry.value) if len(entry.value) > 4 else 0)
            if best is None or room > best[0]:
                best = (room, s, i)
    if best is None:
        return False
    del sections[best[1]][best[2]]
    return True

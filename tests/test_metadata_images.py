"""Metadata carried from input photos onto engine results (``blurd.metadata``): JPEG, PNG, WEBP.

Every file here is a real image built with Pillow or OpenCV (or one of the EgoBlur samples),
and every result is read back with Pillow, an independent reader, or with the few lines of
container walking below, which share nothing with the code under test.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageCms, PngImagePlugin, TiffImagePlugin

from blurd.metadata import Carried, MetadataError, Policy, parse
from blurd.metadata.exif import JPEG_EXIF_LIMIT, filter_exif
from blurd.metadata.images import carry_image_metadata
from blurd.metadata.policy import Tally
from blurd.metadata.streams import Malformed

EGOBLUR = Path("/work/shared/testdata/egoblur")
FORMATS = ("JPEG", "PNG", "WEBP")
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
R = TiffImagePlugin.IFDRational
GPS = ExifTags.IFD.GPSInfo
EXIF = ExifTags.IFD.Exif
IFD1 = ExifTags.IFD.IFD1

ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
ENGINE_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
XMP = (
    b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
    b'xmlns:exif="http://ns.adobe.com/exif/1.0/" exif:GPSLatitude="48,51.5N" '
    b'exif:GPSLongitude="2,17.7E"/></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
)
ENGINE_XMP = XMP.replace(b"48,51.5N", b"10,10.0S")
MAKER_NOTE = b"Apple iOS\x00\x00\x01MM" + bytes(range(64))

# EXIF written into every "camera" input; tags by IFD.
IFD0_VALUES: dict[int, Any] = {
    0x010F: "Canon",  # Make
    0x0110: "Canon EOS R6",  # Model
    0x0112: 6,  # Orientation
    0x0132: "2024:05:06 07:08:09",  # DateTime
    0x013B: "Alice Example",  # Artist
    0x8298: "(c) Alice",  # Copyright
    0x0131: "Camera Firmware 1.0",  # Software
    0xC62F: "CAMSERIAL42",  # CameraSerialNumber
}
EXIF_VALUES: dict[int, Any] = {
    0x9003: "2024:05:06 07:08:09",  # DateTimeOriginal
    0x9004: "2024:05:06 07:08:09",  # DateTimeDigitized
    0x9011: "+02:00",  # OffsetTimeOriginal
    0x9291: "123",  # SubSecTimeOriginal
    0x829A: R(1, 250),  # ExposureTime
    0x829D: R(28, 10),  # FNumber
    0x8827: 400,  # ISO
    0x920A: R(50, 1),  # FocalLength
    0xA431: "BODYSERIAL1",  # BodySerialNumber
    0xA435: "LENSSERIAL2",  # LensSerialNumber
    0xA420: "UNIQUEID3",  # ImageUniqueID
    0xA430: "Alice Owner",  # CameraOwnerName
    0x927C: MAKER_NOTE,  # MakerNote
    0x9286: b"ASCII\x00\x00\x00at home",  # UserComment
}
SOURCE_GPS = (R(48), R(51), R(30))
ENGINE_GPS = (R(10), R(10), R(10))

SAFE_IFD0 = {0x010F, 0x0110, 0x0112, 0x0132}
SAFE_EXIF = {0x9003, 0x9004, 0x9011, 0x9291, 0x829A, 0x829D, 0x8827, 0x920A}
EXPECTED_IFD0 = {"strip": {0x0112}, "safe": SAFE_IFD0, "keep": set(IFD0_VALUES)}
EXPECTED_EXIF = {"strip": set(), "safe": SAFE_EXIF, "keep": set(EXIF_VALUES)}


# --- building inputs -----------------------------------------------------------------------


def pixels(seed: int = 1, size: tuple[int, int] = (48, 32)) -> np.ndarray:
    """A small RGB picture with structure (so that every format compresses it for real)."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = (np.add.outer(np.arange(h), np.arange(w)) * 3 % 200).astype(np.uint8)
    noise = rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8)
    return np.dstack([ramp, ramp[::-1], ramp[:, ::-1]]) + noise


def camera_exif(
    *, endian: str = ">", orientation: int = 6, maker_note: bytes = MAKER_NOTE
) -> Image.Exif:
    exif = Image.Exif()
    exif.endian = endian
    for tag, value in IFD0_VALUES.items():
        exif[tag] = value
    exif[0x0112] = orientation
    sub = exif.get_ifd(EXIF)
    sub.update(EXIF_VALUES)
    sub[0x927C] = maker_note
    gps = exif.get_ifd(GPS)
    gps.update({1: "N", 2: SOURCE_GPS, 3: "E", 4: (R(2), R(17), R(42))})
    return exif


def engine_exif() -> bytes:
    """What a cloud engine copies or writes: its own GPS and camera name."""
    exif = Image.Exif()
    exif[0x010F] = "EngineCam"
    exif[0x0112] = 3
    exif.get_ifd(GPS).update({1: "S", 2: ENGINE_GPS})
    return exif.tobytes()


def tiff_of(exif_segment: bytes) -> bytes:
    return exif_segment[6:] if exif_segment.startswith(b"Exif\x00\x00") else exif_segment


def with_thumbnail(exif_segment: bytes, thumbnail: bytes) -> bytes:
    """``exif_segment`` (Pillow's, IFD0 at offset 8) with an IFD1 pointing at ``thumbnail``."""
    tiff = bytearray(tiff_of(exif_segment))
    bo = "<" if tiff[:2] == b"II" else ">"
    count = struct.unpack_from(bo + "H", tiff, 8)[0]
    next_at = 8 + 2 + 12 * count
    if len(tiff) % 2:
        tiff += b"\x00"
    ifd1_at = len(tiff)
    data_at = ifd1_at + 2 + 3 * 12 + 4
    struct.pack_into(bo + "I", tiff, next_at, ifd1_at)
    tiff += struct.pack(bo + "H", 3)
    tiff += struct.pack(bo + "HHIHH", 0x0103, 3, 1, 6, 0)  # Compression: JPEG
    tiff += struct.pack(bo + "HHII", 0x0201, 4, 1, data_at)
    tiff += struct.pack(bo + "HHII", 0x0202, 4, 1, len(thumbnail))
    tiff += b"\x00\x00\x00\x00" + thumbnail
    return b"Exif\x00\x00" + bytes(tiff)


def cv2_encode(fmt: str, image: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode("." + EXT[fmt], cv2.cvtColor(image, cv2.COLOR_RGB2BGR), list(params))
    assert ok
    return bytes(buf.tobytes())


THUMBNAIL = cv2_encode("JPEG", pixels(7, (16, 12)), cv2.IMWRITE_JPEG_QUALITY, 91)


def pil_save(fmt: str, image: np.ndarray, **options: Any) -> bytes:
    out = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt == "PNG":
        info = options.pop("pnginfo", None) or PngImagePlugin.PngInfo()
        xmp = options.pop("xmp", None)
        if xmp is not None:
            info.add_itxt("XML:com.adobe.xmp", xmp.decode())
        options["pnginfo"] = info
        options.pop("comment", None)
    elif fmt == "WEBP":
        options.pop("comment", None)
        options.setdefault("quality", 90)
    pil.save(out, fmt, **options)
    return out.getvalue()


def camera_file(fmt: str, *, exif: bytes | None = None, **options: Any) -> bytes:
    """An input photo with every kind of metadata: EXIF (GPS, serials, owner, MakerNote...),
    ICC profile, XMP with a location, and a comment where the format has one."""
    options.setdefault("icc_profile", ICC)
    options.setdefault("xmp", XMP)
    options.setdefault("comment", b"taken at Alice's home")
    return pil_save(fmt, pixels(1), exif=exif or camera_exif().tobytes(), **options)


def engine_file(fmt: str, *, leaky: bool = True) -> bytes:
    """An engine's result: blurred pixels, and (cloud engine) its own metadata."""
    blurred = cv2.GaussianBlur(pixels(1), (5, 5), 0)
    if not leaky:
        return cv2_encode(fmt, blurred)
    options: dict[str, Any] = {"exif": engine_exif(), "icc_profile": ENGINE_ICC}
    options["xmp"] = ENGINE_XMP
    options["comment"] = b"engine comment"
    return pil_save(fmt, blurred, **options)


# --- reading results -----------------------------------------------------------------------


def run(
    tmp_path: Path,
    source: bytes,
    output: bytes,
    fmt: str,
    policy: Policy = Policy.KEEP,
    *,
    upright: bool = False,
    source_ext: str | None = None,
) -> tuple[Path, Path, Carried]:
    """Writes the two files, carries, returns (dest, output path, what was carried)."""
    names = (f"in.{source_ext or EXT[fmt]}", f"engine.{EXT[fmt]}", f"out.{EXT[fmt]}")
    src, out, dest = (tmp_path / name for name in names)
    src.write_bytes(source)
    out.write_bytes(output)
    carried = carry_image_metadata(src, out, dest, policy, upright=upright)
    return dest, out, carried


def decoded(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"))


def jpeg_scans(data: bytes) -> bytes:
    """The bytes from the first SOS to EOI, found by walking the segments."""
    at = 2
    while data[at + 1] != 0xDA:
        at += 2 + struct.unpack_from(">H", data, at + 2)[0]
    return data[at : data.rindex(b"\xff\xd9") + 2]


def jpeg_segments(data: bytes) -> Iterator[tuple[int, bytes]]:
    at = 2
    while data[at + 1] != 0xDA:
        length = struct.unpack_from(">H", data, at + 2)[0]
        yield data[at + 1], data[at + 4 : at + 2 + length]
        at += 2 + length


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(data):
        length = struct.unpack_from(">I", data, at)[0]
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        assert struct.unpack_from(">I", data, at + 8 + length)[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        at += 12 + length
    return chunks


def webp_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert struct.unpack_from("<I", data, 4)[0] == len(data) - 8
    chunks, at = [], 12
    while at < len(data):
        kind, size = data[at : at + 4], struct.unpack_from("<I", data, at + 4)[0]
        chunks.append((kind, data[at + 8 : at + 8 + size]))
        at += 8 + size + (size & 1)
    assert at == len(data)
    return chunks


def read_meta(path: Path) -> tuple[Image.Exif, dict[str | tuple[int, int], Any]]:
    with Image.open(path) as image:
        image.load()
        return image.getexif(), dict(image.info)


def assert_same_picture(dest: Path, output: Path) -> None:
    assert np.array_equal(decoded(dest), decoded(output))
    if dest.suffix == ".jpg":
        assert jpeg_scans(dest.read_bytes()) == jpeg_scans(output.read_bytes())


# --- the policy setting --------------------------------------------------------------------


def test_parse_accepts_the_three_policies_and_names_them_in_errors() -> None:
    """The setting's values parse to the enum; anything else names the allowed values."""
    assert [parse(v) for v in ("strip", "safe", "keep")] == list(Policy)
    with pytest.raises(ValueError, match="'strip', 'safe', 'keep'") as info:
        parse("all")
    assert "'all'" in str(info.value)


def test_metadata_error_is_a_one_line_value_error_naming_the_file() -> None:
    """Callers log it as one line and may catch it as a ValueError."""
    error = MetadataError(Path("/x/out.jpg"), "truncated\nsegment")
    assert isinstance(error, ValueError)
    assert str(error) == "/x/out.jpg: truncated segment"
    assert error.path == Path("/x/out.jpg")


def test_carried_reads_as_one_log_line() -> None:
    """What was kept and dropped, and why, fits in one line."""
    carried = Carried(("icc", "orientation"), ("gps",), "input metadata unreadable")
    assert str(carried) == "kept=icc,orientation dropped=gps note='input metadata unreadable'"
    assert str(Carried()) == "kept=- dropped=-"


# --- what each policy carries --------------------------------------------------------------


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("policy", list(Policy))
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_policy_carries_its_categories(
    tmp_path: Path, fmt: str, policy: Policy, endian: str
) -> None:
    """strip keeps ICC and Orientation; safe adds time, camera and exposure; keep keeps all
    (GPS, serials, owner, MakerNote, XMP); never the engine's own GPS, XMP or ICC; the
    engine's pixels are unchanged, and for JPEG its scans byte for byte."""
    source = camera_file(fmt, exif=camera_exif(endian=endian).tobytes())
    dest, output, carried = run(tmp_path, source, engine_file(fmt), fmt, policy)

    exif, info = read_meta(dest)
    assert set(exif) - {EXIF, GPS} == EXPECTED_IFD0[policy.value]
    assert set(exif.get_ifd(EXIF)) == EXPECTED_EXIF[policy.value]
    for tag in EXPECTED_IFD0[policy.value]:
        assert exif[tag] == IFD0_VALUES[tag]
    assert exif.endian == endian
    gps = exif.get_ifd(GPS)
    if policy is Policy.KEEP:
        assert gps[2] == SOURCE_GPS
        assert exif.get_ifd(EXIF)[0x927C] == MAKER_NOTE
        assert info["xmp"] == XMP
    else:
        assert gps == {}
        assert "xmp" not in info
    assert info["icc_profile"] == ICC
    raw = dest.read_bytes()
    for leak in (b"EngineCam", b"10,10.0S", ENGINE_ICC):
        assert leak not in raw
    assert_same_picture(dest, output)

    assert {"icc", "orientation"} <= set(carried.kept)
    assert ("gps" in carried.kept) is (policy is Policy.KEEP)
    assert ("time" in carried.kept) is (policy is not Policy.STRIP)
    assert carried.note is None


@pytest.mark.parametrize("policy", list(Policy))
@pytest.mark.parametrize("fmt", FORMATS)
def test_upright_output_carries_orientation_1_or_none(
    tmp_path: Path, fmt: str, policy: Policy
) -> None:
    """When the engine already turned the pixels, the carried Orientation is 1; strip then
    has nothing left to say and writes no EXIF at all."""
    dest, _, _ = run(tmp_path, camera_file(fmt), engine_file(fmt), fmt, policy, upright=True)
    exif, _ = read_meta(dest)
    assert exif.get(0x0112, 1) == 1
    if policy is Policy.STRIP:
        assert len(exif) == 0
    else:
        assert exif[0x010F] == "Canon"


@pytest.mark.parametrize("policy", list(Policy))
@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_metadata_never_survives(tmp_path: Path, fmt: str, policy: Policy) -> None:
    """An input without metadata gives an output without metadata, whatever the engine
    wrote into its result (GPS, XMP, ICC, comments)."""
    source = cv2_encode(fmt, pixels(1))
    dest, output, carried = run(tmp_path, source, engine_file(fmt), fmt, policy)
    exif, info = read_meta(dest)
    assert len(exif) == 0
    assert not {"xmp", "icc_profile", "comment", "exif"} & set(info)
    assert b"EngineCam" not in dest.read_bytes()
    assert carried == Carried()
    assert_same_picture(dest, output)


@pytest.mark.parametrize("policy", list(Policy))
def test_jpeg_comments_and_photoshop_resources(tmp_path: Path, policy: Policy) -> None:
    """COM comments and IPTC (APP13) are carried by keep only, and Photoshop's thumbnail
    resource never is."""
    iptc = b"\x1c\x02\x78\x00\x0bHello World"
    thumb_resource = b"\x00" * 28 + THUMBNAIL
    resources = photoshop_resource(0x0404, iptc) + photoshop_resource(0x040C, thumb_resource)
    source = insert_segments(camera_file("JPEG"), (0xED, b"Photoshop 3.0\x00" + resources))
    dest, _, carried = run(tmp_path, source, engine_file("JPEG"), "JPEG", policy)
    _, info = read_meta(dest)
    if policy is Policy.KEEP:
        assert info["comment"] == b"taken at Alice's home"
        assert info["photoshop"] == {0x0404: iptc}
    else:
        assert "comment" not in info and "photoshop" not in info
    assert THUMBNAIL not in dest.read_bytes()
    assert "thumbnail" in carried.dropped


@pytest.mark.parametrize("policy", list(Policy))
def test_png_text_chunks_per_policy(tmp_path: Path, policy: Policy) -> None:
    """PNG text: "Creation Time" and tIME are time (safe, keep); XMP and other text are keep
    only; ImageMagick's raw EXIF profile is never carried (it can hold a thumbnail)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Alice")
    info.add_text("Creation Time", "2024-05-06T07:08:09")
    info.add_text("Raw profile type exif", "exif\n 12\n" + THUMBNAIL[:6].hex())
    info.add(b"tIME", struct.pack(">HBBBBB", 2024, 5, 6, 7, 8, 9))
    source = camera_file("PNG", pnginfo=info)
    dest, _, _ = run(tmp_path, source, engine_file("PNG"), "PNG", policy)
    chunks = png_chunks(dest.read_bytes())
    keywords = {body.split(b"\x00")[0] for kind, body in chunks if kind in (b"tEXt", b"iTXt")}
    kinds = {kind for kind, _ in chunks}
    expected = {
        Policy.STRIP: set(),
        Policy.SAFE: {b"Creation Time"},
        Policy.KEEP: {b"Creation Time", b"Author", b"XML:com.adobe.xmp"},
    }[policy]
    assert keywords == expected
    assert (b"tIME" in kinds) is (policy is not Policy.STRIP)
    assert kinds >= {b"IHDR", b"IDAT", b"IEND", b"iCCP"}
    assert chunks[0][0] == b"IHDR"


def test_large_icc_profile_spans_segments(tmp_path: Path) -> None:
    """An ICC profile too big for one JPEG segment is reassembled and split again."""
    profile = ICC + bytes(range(256)) * 600
    dest, _, _ = run(
        tmp_path, camera_file("JPEG", icc_profile=profile), engine_file("JPEG"), "JPEG"
    )
    assert read_meta(dest)[1]["icc_profile"] == profile
    segments = [p for m, p in jpeg_segments(dest.read_bytes()) if m == 0xE2]
    assert [p[12:14] for p in segments] == [b"\x01\x03", b"\x02\x03", b"\x03\x03"]


def test_oversized_input_metadata_is_dropped_alone(tmp_path: Path) -> None:
    """Over 1 MiB of comments is not held in memory: the comments are dropped as oversized,
    the rest of the metadata is carried."""
    comments = [(0xFE, b"c" * 60_000)] * 20
    source = insert_segments(camera_file("JPEG"), *comments)
    dest, _, carried = run(tmp_path, source, engine_file("JPEG"), "JPEG")
    exif, info = read_meta(dest)
    assert "comment" not in info and b"c" * 1000 not in dest.read_bytes()
    assert exif.get_ifd(GPS)[2] == SOURCE_GPS
    assert "oversized" in carried.dropped


# --- embedded pictures: never carried --------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_exif_thumbnail_is_never_carried(tmp_path: Path, fmt: str) -> None:
    """keep carries every EXIF tag, but not IFD1 and its thumbnail of the un-blurred photo."""
    exif = with_thumbnail(camera_exif().tobytes(), THUMBNAIL)
    probe = Image.Exif()
    probe.load(exif)
    assert probe.get_ifd(IFD1)[0x0202] == len(THUMBNAIL)

    dest, _, carried = run(tmp_path, camera_file(fmt, exif=exif), engine_file(fmt), fmt)
    read, _ = read_meta(dest)
    assert read.get_ifd(IFD1) == {}
    assert read.get_ifd(GPS)[2] == SOURCE_GPS
    assert THUMBNAIL not in dest.read_bytes()
    assert THUMBNAIL[100:160] not in dest.read_bytes()
    assert "thumbnail" in carried.dropped


@pytest.mark.filterwarnings("ignore:Image appears to be a malformed MPO file")
def test_jpeg_multi_picture_segments_and_trailers_are_never_carried(tmp_path: Path) -> None:
    """MPF segments and the images after EOI (secondary images, depth maps), in the input or
    the engine's result, do not reach the output."""
    secondary = cv2_encode("JPEG", pixels(9))
    mpf = (0xE2, b"MPF\x00MM\x00*\x00\x00\x00\x08" + b"\x00" * 32)
    source = insert_segments(camera_file("JPEG"), mpf) + secondary
    output = insert_segments(engine_file("JPEG"), mpf) + secondary + b"trailing junk"
    dest, out, carried = run(tmp_path, source, output, "JPEG")
    raw = dest.read_bytes()
    assert raw.endswith(b"\xff\xd9") and raw.count(b"\xff\xd9") == 1
    assert b"MPF\x00" not in raw and jpeg_scans(secondary)[40:120] not in raw
    assert "mpf" in carried.dropped
    assert np.array_equal(decoded(dest), decoded(out))


@pytest.mark.parametrize("fmt", FORMATS)
def test_xmp_holding_a_picture_is_never_carried(tmp_path: Path, fmt: str) -> None:
    """An XMP packet with an xmpGImg thumbnail (or Google's GImage original) is dropped whole."""
    with_picture = XMP.replace(
        b"xmlns:exif=",
        b'xmlns:xmpGImg="http://ns.adobe.com/xap/1.0/g/img/" xmpGImg:image="'
        + THUMBNAIL[:48].hex().encode()
        + b'" xmlns:exif=',
    )
    dest, _, carried = run(tmp_path, camera_file(fmt, xmp=with_picture), engine_file(fmt), fmt)
    _, info = read_meta(dest)
    assert "xmp" not in info
    assert "xmp-picture" in carried.dropped and "xmp" not in carried.kept


def test_jpeg_extended_xmp_is_never_carried(tmp_path: Path) -> None:
    """Extended XMP (where phones keep the original image and depth map) is dropped; the main
    packet is kept."""
    guid = b"0123456789ABCDEF0123456789ABCDEF"
    chunk = b"<x:xmpmeta GImage:Data='" + THUMBNAIL[:40].hex().encode() + b"'/>"
    extension = b"http://ns.adobe.com/xmp/extension/\x00" + guid
    extension += struct.pack(">II", len(chunk), 0) + chunk
    source = insert_segments(camera_file("JPEG"), (0xE1, extension))
    dest, _, carried = run(tmp_path, source, engine_file("JPEG"), "JPEG")
    raw = dest.read_bytes()
    assert guid not in raw and THUMBNAIL[:40].hex().encode() not in raw
    assert read_meta(dest)[1]["xmp"] == XMP
    assert "extended-xmp" in carried.dropped


@pytest.mark.parametrize("fmt", FORMATS)
def test_makernote_holding_a_preview_is_never_carried(tmp_path: Path, fmt: str) -> None:
    """A MakerNote with a JPEG preview inside is dropped; the rest of the EXIF is kept."""
    exif = camera_exif(maker_note=b"Nikon\x00\x02\x10\x00\x00" + THUMBNAIL).tobytes()
    dest, _, carried = run(tmp_path, camera_file(fmt, exif=exif), engine_file(fmt), fmt)
    read, _ = read_meta(dest)
    assert 0x927C not in read.get_ifd(EXIF)
    assert read.get_ifd(EXIF)[0xA431] == "BODYSERIAL1"
    assert THUMBNAIL not in dest.read_bytes()
    assert "makernote-preview" in carried.dropped and "makernote" not in carried.kept


def test_jfif_thumbnail_in_the_engine_result_is_removed(tmp_path: Path) -> None:
    """The result's JFIF header is kept (density) but loses its thumbnail."""
    output = engine_file("JPEG", leaky=False)
    marker, jfif = next(jpeg_segments(output))
    assert marker == 0xE0 and jfif.startswith(b"JFIF\x00")
    thumb_pixels = b"THUMBPIXELS!"  # 2 x 2 RGB
    with_thumb = jfif[:12] + b"\x02\x02" + thumb_pixels
    segment = b"\xff\xe0" + struct.pack(">H", len(with_thumb) + 2) + with_thumb
    output = output[:2] + segment + output[2 + 4 + len(jfif) :]
    dest, out, _ = run(tmp_path, camera_file("JPEG"), output, "JPEG", Policy.STRIP)
    raw = dest.read_bytes()
    assert thumb_pixels not in raw
    marker, jfif = next(jpeg_segments(raw))
    assert marker == 0xE0 and jfif == with_thumb[:12] + b"\x00\x00"
    assert_same_picture(dest, out)


def photoshop_resource(resource_id: int, data: bytes) -> bytes:
    block = b"8BIM" + struct.pack(">HBx", resource_id, 0) + struct.pack(">I", len(data)) + data
    return block + b"\x00" * (len(data) & 1)


def insert_segments(jpeg: bytes, *segments: tuple[int, bytes]) -> bytes:
    """``jpeg`` with ``segments`` (marker, payload) right after SOI."""
    raw = b"".join(bytes([0xFF, m]) + struct.pack(">H", len(p) + 2) + p for m, p in segments)
    return jpeg[:2] + raw + jpeg[2:]


# --- containers ----------------------------------------------------------------------------


@pytest.mark.parametrize("lossless", [False, True])
def test_simple_webp_result_gets_a_correct_vp8x_header(tmp_path: Path, lossless: bool) -> None:
    """A VP8 or VP8L result (no VP8X) that receives EXIF and ICC gets a VP8X with the canvas
    size from the bitstream, the right flags and chunk order, and a correct RIFF size."""
    quality = (cv2.IMWRITE_WEBP_QUALITY, 101) if lossless else (cv2.IMWRITE_WEBP_QUALITY, 80)
    output = cv2_encode("WEBP", pixels(3, (45, 29)), *quality)
    assert output[12:16] == (b"VP8L" if lossless else b"VP8 ")
    dest, out, _ = run(tmp_path, camera_file("WEBP"), output, "WEBP", Policy.SAFE)
    chunks = webp_chunks(dest.read_bytes())
    assert [k for k, _ in chunks] == [b"VP8X", b"ICCP", output[12:16], b"EXIF"]
    vp8x = chunks[0][1]
    assert vp8x[0] == 0x20 | 0x08  # ICC and EXIF, no XMP, no alpha, no animation
    width = int.from_bytes(vp8x[4:7], "little") + 1
    height = int.from_bytes(vp8x[7:10], "little") + 1
    assert (width, height) == (45, 29)
    assert_same_picture(dest, out)


def test_webp_flags_follow_the_chunks_removed(tmp_path: Path) -> None:
    """An extended result losing its ICC, EXIF and XMP keeps a VP8X with those flags cleared."""
    output = engine_file("WEBP")
    assert webp_chunks(output)[0][1][0] & 0x2C == 0x2C
    dest, out, _ = run(tmp_path, cv2_encode("WEBP", pixels(1)), output, "WEBP")
    chunks = webp_chunks(dest.read_bytes())
    assert [k for k, _ in chunks] == [b"VP8X", b"VP8 "]
    assert chunks[0][1][0] & 0x2C == 0
    assert_same_picture(dest, out)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animations_keep_their_frames(tmp_path: Path, fmt: str) -> None:
    """APNG (acTL/fcTL/fdAT) and animated WEBP (ANIM/ANMF) results keep every frame."""
    frames = [Image.fromarray(pixels(i)) for i in (1, 2, 3)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    dest, out, _ = run(tmp_path, camera_file(fmt), buf.getvalue(), fmt, Policy.SAFE)
    with Image.open(dest) as got, Image.open(out) as want:
        assert getattr(got, "n_frames", 1) == getattr(want, "n_frames", 1) == 3
        for index in range(3):
            got.seek(index)
            want.seek(index)
            assert np.array_equal(np.asarray(got.convert("RGBA")), np.asarray(want.convert("RGBA")))
        assert got.getexif()[0x010F] == "Canon"


@pytest.mark.parametrize("style", ["progressive", "restart-markers"])
def test_multi_scan_and_restart_jpegs_are_copied_exactly(tmp_path: Path, style: str) -> None:
    """Progressive scans (markers between scans) and restart markers inside scans are copied
    byte for byte."""
    if style == "progressive":
        output = cv2_encode("JPEG", pixels(4, (64, 64)), cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    else:
        output = cv2_encode("JPEG", pixels(4, (64, 64)), cv2.IMWRITE_JPEG_RST_INTERVAL, 1)
        assert b"\xff\xd0" in output
    dest, out, _ = run(tmp_path, camera_file("JPEG"), output, "JPEG", Policy.STRIP)
    assert_same_picture(dest, out)


def test_grey_profile_is_not_put_on_colour_pixels(tmp_path: Path) -> None:
    """A greyscale input's GRAY ICC profile is not carried onto an engine's RGB result."""
    grey_icc = ICC[:16] + b"GRAY" + ICC[20:]
    grey = Image.fromarray(pixels(1)[:, :, 0])
    buf = io.BytesIO()
    grey.save(buf, "JPEG", icc_profile=grey_icc, exif=camera_exif().tobytes())
    dest, _, carried = run(tmp_path, buf.getvalue(), engine_file("JPEG"), "JPEG", Policy.STRIP)
    assert "icc_profile" not in read_meta(dest)[1]
    assert "icc-mismatch" in carried.dropped
    assert read_meta(dest)[0][0x0112] == 6


@pytest.mark.parametrize(
    ("source_fmt", "fmt"), [("JPEG", "PNG"), ("PNG", "WEBP"), ("WEBP", "JPEG")]
)
def test_other_format_input_carries_nothing(tmp_path: Path, source_fmt: str, fmt: str) -> None:
    """An input in another format than the result gives nothing, says so, and the result is
    still stripped of the engine's metadata."""
    source = camera_file(source_fmt)
    dest, out, carried = run(tmp_path, source, engine_file(fmt), fmt, source_ext=EXT[source_fmt])
    exif, info = read_meta(dest)
    assert len(exif) == 0 and "xmp" not in info and "icc_profile" not in info
    assert carried.kept == () and carried.note is not None
    assert f"input is {source_fmt}, output is {fmt}" in carried.note
    assert_same_picture(dest, out)


def test_real_egoblur_photos(tmp_path: Path) -> None:
    """The EgoBlur samples: the JPEG's comment is kept by keep only; its palette PNGs come
    through with identical pixels."""
    photo = (EGOBLUR / "gen1-test_image.jpg").read_bytes()
    assert read_meta(EGOBLUR / "gen1-test_image.jpg")[1]["comment"]
    rgb = np.ascontiguousarray(decoded(EGOBLUR / "gen1-test_image.jpg")[:, :, :3])
    engine = cv2_encode("JPEG", cv2.GaussianBlur(rgb, (9, 9), 0))
    for policy in Policy:
        out_dir = tmp_path / policy.value
        out_dir.mkdir()
        dest, out, _ = run(out_dir, photo, engine, "JPEG", policy)
        assert ("comment" in read_meta(dest)[1]) is (policy is Policy.KEEP)
        assert_same_picture(dest, out)
    for name in ("gen2-test_face_image.png", "gen2-test_lp_image.png"):
        png = (EGOBLUR / name).read_bytes()
        out_dir = tmp_path / name
        out_dir.mkdir()
        dest, out, carried = run(out_dir, png, png, "PNG", Policy.KEEP)
        assert_same_picture(dest, out)
        assert carried.note is None


# --- broken files --------------------------------------------------------------------------


def exif_blob(entries: list[tuple[int, int, int, bytes]], tail: bytes = b"") -> bytes:
    """A little-endian TIFF blob with one IFD0 of raw (tag, type, count, 4-byte field)."""
    head = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    body = b"".join(struct.pack("<HHI", t, k, c) + f for t, k, c, f in entries)
    return head + body + b"\x00\x00\x00\x00" + tail


HOSTILE_EXIF = {
    "exif-ifd-loop": exif_blob([(0x8769, 4, 1, struct.pack("<I", 8))]),
    "offset-past-end": exif_blob([(0x010F, 2, 100, struct.pack("<I", 4000))]),
    "count-overflow": exif_blob([(0x010F, 12, 0xFFFFFFFF, struct.pack("<I", 8))]),
    "ifd-past-end": b"MM\x00*" + struct.pack(">I", 0xFFFFFF00),
    "too-many-entries": b"II*\x00" + struct.pack("<IH", 8, 5000),
    "not-tiff": b"JUNKJUNKJUNK",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_EXIF))
@pytest.mark.parametrize("fmt", FORMATS)
def test_broken_input_exif_gives_a_stripped_output_and_a_note(
    tmp_path: Path, fmt: str, case: str
) -> None:
    """Loops, bad offsets, overflowing counts: the input's metadata is ignored, with a note
    for the log, and the output is the stripped result."""
    source = camera_file(fmt, exif=b"Exif\x00\x00" + HOSTILE_EXIF[case])
    dest, out, carried = run(tmp_path, source, engine_file(fmt), fmt, Policy.KEEP)
    assert carried.kept == () and carried.note and "unreadable" in carried.note
    exif, info = read_meta(dest)
    assert len(exif) == 0 and "icc_profile" not in info
    assert_same_picture(dest, out)


def test_hostile_exif_raises_only_malformed() -> None:
    """The EXIF reader turns every hostile structure into Malformed, in both byte orders."""
    for blob in HOSTILE_EXIF.values():
        with pytest.raises(Malformed):
            filter_exif(blob, Policy.KEEP, Tally(Policy.KEEP), upright=False, limit=1 << 20)
    loop = bytearray(tiff_of(camera_exif(endian=">").tobytes()))
    gps_entry = loop.index(b"\x88\x25\x00\x04\x00\x00\x00\x01")
    loop[gps_entry + 8 : gps_entry + 12] = struct.pack(">I", 8)  # GPS IFD is IFD0
    with pytest.raises(Malformed, match="twice"):
        filter_exif(bytes(loop), Policy.KEEP, Tally(Policy.KEEP), upright=False, limit=1 << 20)


def test_oversized_exif_values_are_dropped_not_fatal() -> None:
    """An EXIF that would not fit a JPEG segment loses its biggest values, not everything."""
    exif = camera_exif()
    exif.get_ifd(EXIF)[0x9286] = b"ASCII\x00\x00\x00" + b"x" * 70_000
    tally = Tally(Policy.KEEP)
    blob = tiff_of(exif.tobytes())
    assert len(blob) > JPEG_EXIF_LIMIT
    kept = filter_exif(blob, Policy.KEEP, tally, upright=False, limit=JPEG_EXIF_LIMIT)
    assert kept is not None and len(kept) <= JPEG_EXIF_LIMIT
    read = Image.Exif()
    read.load(b"Exif\x00\x00" + kept)
    assert 0x9286 not in read.get_ifd(EXIF)
    assert read[0x010F] == "Canon" and read.get_ifd(GPS)[2] == SOURCE_GPS
    assert "oversized" in tally.dropped


def test_keep_leaves_the_makernote_where_it_was() -> None:
    """keep lays the EXIF out like the input's, so maker notes with offsets counted from the
    TIFF header still point at the right bytes; strip and safe pack it tight."""
    blob = tiff_of(with_thumbnail(camera_exif().tobytes(), THUMBNAIL))
    kept = filter_exif(blob, Policy.KEEP, Tally(Policy.KEEP), upright=True, limit=1 << 20)
    assert kept is not None
    assert kept.index(MAKER_NOTE) == blob.index(MAKER_NOTE)
    assert THUMBNAIL not in kept and len(kept) < len(blob)


BROKEN_OUTPUTS: dict[str, dict[str, Callable[[bytes], bytes]]] = {
    "JPEG": {
        "no-eoi": lambda data: data[: len(data) // 2 + 40],
        "segment-past-end": lambda data: data[:2] + b"\xff\xe1\xff\xff" + b"x" * 20,
        "no-scan": lambda data: data[:2] + b"\xff\xd9",
    },
    "PNG": {
        "bad-idat-crc": lambda data: corrupt_png_chunk(data, b"IDAT"),
        "no-iend": lambda data: data[:-12],
        "unknown-critical": lambda data: data[:33] + png_chunk(b"ABCD", b"x") + data[33:],
    },
    "WEBP": {
        "riff-size-too-big": lambda data: data[:4] + struct.pack("<I", len(data)) + data[8:],
        "chunk-past-end": lambda data: data[:16] + struct.pack("<I", 1 << 30) + data[20:],
        "no-image": lambda data: data[:4] + struct.pack("<I", 4) + b"WEBP",
    },
}


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def corrupt_png_chunk(data: bytes, kind: bytes) -> bytes:
    at = data.index(kind) + 4 + 3
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("fmt", "case"), [(f, c) for f in FORMATS for c in sorted(BROKEN_OUTPUTS[f])]
)
def test_broken_result_raises_metadata_error_and_leaves_no_file(
    tmp_path: Path, fmt: str, case: str
) -> None:
    """A result blurd cannot vouch for is refused with MetadataError naming it; the half-written
    output is removed."""
    broken = BROKEN_OUTPUTS[fmt][case](engine_file(fmt))
    with pytest.raises(MetadataError) as info:
        run(tmp_path, camera_file(fmt), broken, fmt)
    assert str(tmp_path / f"engine.{EXT[fmt]}") in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / f"out.{EXT[fmt]}").exists()


def test_result_that_is_no_image_raises_metadata_error(tmp_path: Path) -> None:
    """A result in no supported format is refused before anything is written."""
    with pytest.raises(MetadataError, match="not a JPEG, PNG or WEBP"):
        run(tmp_path, camera_file("JPEG"), b"GIF89a" + b"\x00" * 40, "JPEG")
    assert not (tmp_path / "out.jpg").exists()


def test_existing_dest_is_never_overwritten(tmp_path: Path) -> None:
    """dest is created exclusively: the caller's temp-file scheme decides names."""
    (tmp_path / "out.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        run(tmp_path, camera_file("JPEG"), engine_file("JPEG"), "JPEG")
    assert (tmp_path / "out.jpg").read_bytes() == b"precious"


# --- fuzzing -------------------------------------------------------------------------------

SMALL = {
    fmt: camera_file(fmt, exif=with_thumbnail(camera_exif().tobytes(), THUMBNAIL[:64]))
    for fmt in FORMATS
}
RESULTS = {fmt: engine_file(fmt) for fmt in FORMATS}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_example = itertools.count()


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes replaced, a slice removed or duplicated, or cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out) - 1))
        action = draw(st.sampled_from(["set", "set", "delete", "repeat", "cut"]))
        if action == "set":
            out[at] = draw(st.integers(0, 255))
        elif action == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        elif action == "repeat":
            out[at:at] = out[at : at + draw(st.integers(1, 16))]
        else:
            del out[at:]
        if not out:
            out = bytearray(b"\x00")
    return bytes(out)


def fresh_dir(base: Path) -> Path:
    path = base / f"example-{next(_example)}"
    path.mkdir()
    return path


@FUZZ
@given(
    fmt=st.sampled_from(FORMATS),
    policy=st.sampled_from(list(Policy)),
    data=st.data(),
)
def test_any_input_gives_a_valid_result(
    tmp_path: Path, fmt: str, policy: Policy, data: st.DataObject
) -> None:
    """Random bytes or a mutated photo as input never raise: the result is always written,
    decodes to the engine's pixels, and never holds the engine's metadata."""
    prefixes = [b"", SMALL[fmt][:12], SMALL[fmt][:64]]
    source = data.draw(
        st.one_of(
            mutated(SMALL[fmt]),
            st.builds(lambda p, b: p + b, st.sampled_from(prefixes), st.binary(max_size=300)),
        )
    )
    dest, out, carried = run(fresh_dir(tmp_path), source, RESULTS[fmt], fmt, policy)
    assert np.array_equal(decoded(dest), decoded(out))
    assert b"EngineCam" not in dest.read_bytes()
    if policy is not Policy.KEEP:
        assert len(read_meta(dest)[0].get_ifd(GPS)) == 0
    assert isinstance(carried, Carried)


@FUZZ
@given(fmt=st.sampled_from(FORMATS), data=st.data())
def test_any_result_gives_a_file_or_metadata_error(
    tmp_path: Path, fmt: str, data: st.DataObject
) -> None:
    """A mutated engine result either comes through or raises MetadataError (and leaves no
    file); never any other exception."""
    output = data.draw(mutated(RESULTS[fmt]))
    where = fresh_dir(tmp_path)
    try:
        dest, _, _ = run(where, SMALL[fmt], output, fmt, Policy.SAFE)
    except MetadataError:
        assert not (where / f"out.{EXT[fmt]}").exists()
    else:
        assert b"EngineCam" not in dest.read_bytes()


# --- big files -----------------------------------------------------------------------------

HUGE_BYTES = 50 * 1024 * 1024
MEMORY_BOUND_BYTES = 4 * 1024 * 1024


def huge_jpeg(path: Path) -> None:
    """A JPEG whose single scan is 50 MB (sparse zeros: valid entropy-coded bytes)."""
    small = engine_file("JPEG", leaky=False)
    scan = jpeg_scans(small)
    sos_length = struct.unpack_from(">H", scan, 2)[0]
    with open(path, "wb") as fh:
        fh.write(small[: small.index(scan)] + scan[: 2 + sos_length])
        fh.seek(HUGE_BYTES, os.SEEK_CUR)
        fh.write(b"\xff\xd9")


def huge_png(path: Path) -> None:
    """A PNG with one 50 MB IDAT chunk (sparse zeros) and a correct CRC."""
    small = engine_file("PNG", leaky=False)
    crc = zlib.crc32(b"IDAT")
    zeros = bytes(1024 * 1024)
    for _ in range(HUGE_BYTES // len(zeros)):
        crc = zlib.crc32(zeros, crc)
    with open(path, "wb") as fh:
        fh.write(small[:33] + struct.pack(">I", HUGE_BYTES) + b"IDAT")
        fh.seek(HUGE_BYTES, os.SEEK_CUR)
        fh.write(struct.pack(">I", crc) + png_chunk(b"IEND", b""))


def huge_webp(path: Path) -> None:
    """A simple-format WEBP whose VP8 chunk is 50 MB (a real frame header, then zeros)."""
    small = cv2_encode("WEBP", pixels(1), cv2.IMWRITE_WEBP_QUALITY, 80)
    assert small[12:16] == b"VP8 "
    header = small[20:30]
    with open(path, "wb") as fh:
        fh.write(b"RIFF" + struct.pack("<I", 4 + 8 + HUGE_BYTES) + b"WEBP")
        fh.write(b"VP8 " + struct.pack("<I", HUGE_BYTES) + header)
        fh.seek(HUGE_BYTES - len(header) - 1, os.SEEK_CUR)
        fh.write(b"\x00")


@pytest.mark.parametrize("fmt", FORMATS)
def test_huge_results_stream_in_bounded_memory(tmp_path: Path, fmt: str) -> None:
    """A 50 MB image is copied through in chunks: peak Python memory stays under 4 MiB."""
    output = tmp_path / f"engine.{EXT[fmt]}"
    {"JPEG": huge_jpeg, "PNG": huge_png, "WEBP": huge_webp}[fmt](output)
    source = tmp_path / f"in.{EXT[fmt]}"
    source.write_bytes(camera_file(fmt))
    dest = tmp_path / f"out.{EXT[fmt]}"
    tracemalloc.start()
    try:
        carried = carry_image_metadata(source, output, dest, Policy.KEEP, upright=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND_BYTES
    assert "gps" in carried.kept
    assert dest.stat().st_size > HUGE_BYTES
    with open(dest, "rb") as fh:
        head = fh.read(12)
        fh.seek(-12, os.SEEK_END)
        tail = fh.read()
    if fmt == "WEBP":
        assert struct.unpack_from("<I", head, 4)[0] == dest.stat().st_size - 8
    else:
        assert tail.endswith(b"\xff\xd9" if fmt == "JPEG" else png_chunk(b"IEND", b""))
    dest.unlink()
    output.unlink()

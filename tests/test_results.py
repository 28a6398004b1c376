"""Results are checked before placement: error pages, empty bodies and wrong formats are refused.

The media samples are real files: images from OpenCV, containers from PyAV (FFmpeg's muxers),
the MP4 from the shared test data. HEIC is the exception: nothing here writes it, so its
header (an ISO BMFF 'ftyp' box with the 'heic' brand) is built by hand.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from blurd.results import HEAD_BYTES, MAX_DETECTIONS_BYTES, detections_problem, media_problem

SAMPLE_VIDEO = Path("/work/shared/testdata/egoblur/gen1-test_video.mp4")
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head></html>\n"
JSON_ERROR = b'{"error": "result not ready"}'

# Extensions a result of one family can be placed under; ISO BMFF covers video and HEIF/AVIF.
FAMILIES = [
    (".jpg", ".jpeg"),
    (".png",),
    (".webp",),
    (".avi",),
    (".mp4", ".mov", ".m4v", ".3gp", ".heic", ".heif", ".avif"),
    (".mkv", ".webm"),
    (".zip",),
    (".ts",),
    (".m2ts", ".mts"),
    (".mpg",),
]
MEDIA_EXTS = [ext for family in FAMILIES for ext in family]


def image(ext: str) -> bytes:
    rng = np.random.default_rng(7)
    ok, data = cv2.imencode(ext, rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    assert ok
    return bytes(data.tobytes())


def video(
    fmt: str,
    codec: str,
    path: Path,
    *,
    size: tuple[int, int] = (32, 32),
    rate: int = 10,
    options: dict[str, str] | None = None,
) -> bytes:
    """A three-frame video written by PyAV with ``fmt`` and ``codec``; its bytes."""
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream(codec, rate=rate)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for shade in (0, 90, 180):
            pixels = np.full((size[1], size[0], 3), shade, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


def zipped(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """One real result per extension (whole files, except the MP4's first kilobytes)."""
    folder = tmp_path_factory.mktemp("samples")
    with SAMPLE_VIDEO.open("rb") as mp4:
        mp4_head = mp4.read(1024)
    mov = video("mov", "mpeg4", folder / "a.mov")
    return {
        ".jpg": image(".jpg"),
        ".jpeg": image(".jpg"),
        ".png": image(".png"),
        ".webp": image(".webp"),
        ".avif": image(".avif"),
        ".heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(40),
        ".heif": b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic" + bytes(40),
        ".mp4": mp4_head,
        ".mov": mov,
        ".m4v": video("mp4", "mpeg4", folder / "a.m4v"),
        ".3gp": video("3gp", "h263", folder / "a.3gp", size=(176, 144)),
        ".avi": video("avi", "mpeg4", folder / "a.avi"),
        ".mkv": video("matroska", "mpeg4", folder / "a.mkv"),
        ".webm": video("webm", "libvpx", folder / "a.webm"),
        ".ts": video("mpegts", "mpeg2video", folder / "a.ts"),
        ".m2ts": video(
            "mpegts", "mpeg2video", folder / "a.m2ts", options={"mpegts_m2ts_mode": "1"}
        ),
        ".mts": video("mpegts", "mpeg2video", folder / "a.mts", options={"mpegts_m2ts_mode": "1"}),
        ".mpg": video("mpeg", "mpeg1video", folder / "a.mpg", rate=25),
        ".zip": zipped({"a.jpg": image(".jpg"), "a.jpg.json": b"{}"}),
        "old QuickTime": mov[int.from_bytes(mov[:4], "big") :],  # the same movie minus 'ftyp'
    }


def check(data: bytes, ext: str) -> str | None:
    """``media_problem`` as the worker calls it: the first bytes and the full size."""
    return media_problem(data[:HEAD_BYTES], len(data), ext)


# --- media -------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", MEDIA_EXTS)
def test_each_format_is_accepted_with_real_headers(samples: dict[str, bytes], ext: str) -> None:
    """A real file of each format passes under its own extension."""
    assert check(samples[ext], ext) is None


@pytest.mark.parametrize("ext", MEDIA_EXTS)
def test_a_result_is_refused_under_another_family_extension(
    samples: dict[str, bytes], ext: str
) -> None:
    """A real file is refused under every extension outside its own family."""
    family = next(f for f in FAMILIES if ext in f)
    for other in MEDIA_EXTS:
        if other not in family:
            assert check(samples[ext], other) is not None, f"{ext} accepted as {other}"


def test_old_quicktime_without_ftyp_is_a_movie_not_an_image(samples: dict[str, bytes]) -> None:
    """A QuickTime movie opening with another box than 'ftyp' passes as video, not as HEIF."""
    old = samples["old QuickTime"]
    assert old[4:8] != b"ftyp"
    for ext in (".mov", ".mp4"):
        assert check(old, ext) is None
    assert check(old, ".heic") is not None


@pytest.mark.parametrize("ext", [*MEDIA_EXTS, ".xyz"])
def test_html_error_page_is_refused_for_every_type(ext: str) -> None:
    """An HTML page served with 200 is refused for every extension, known or not."""
    assert check(HTML_PAGE, ext) == f"the result is an HTML page, not a {ext} file"


@pytest.mark.parametrize("ext", [*MEDIA_EXTS, ".xyz"])
def test_json_body_is_refused_for_every_type(ext: str) -> None:
    """A JSON error body served as the media result is refused, named as JSON."""
    assert check(JSON_ERROR, ext) == f"the result is a JSON document, not a {ext} file"
    assert check(b"[1, 2]", ext) == f"the result is a JSON document, not a {ext} file"


@pytest.mark.parametrize(
    "body",
    [
        b"\xef\xbb\xbf\r\n  <html><body>error</body></html>",
        "\ufeff<html><body>error</body></html>".encode("utf-16-le"),
        "\ufeff<html><body>error</body></html>".encode("utf-16-be"),
        b"\n\t  <?xml version='1.0'?><Error><Code>NoSuchKey</Code></Error>",
    ],
)
def test_html_after_bom_or_whitespace_is_refused(body: bytes) -> None:
    """Leading whitespace or a byte-order mark does not hide an HTML (or XML) page."""
    problem = check(body, ".jpg")
    assert problem is not None
    assert "an HTML page" in problem


@pytest.mark.parametrize("ext", [*MEDIA_EXTS, ".xyz"])
def test_empty_result_is_refused(ext: str) -> None:
    """An empty body is refused for every extension."""
    assert media_problem(b"", 0, ext) == "the result is empty"


def test_png_served_where_jpg_expected_is_refused_and_named(samples: dict[str, bytes]) -> None:
    """A PNG where a .jpg is due is refused, naming what it is."""
    assert check(samples[".png"], ".jpg") == "the result is a PNG image, not a .jpg file"


def test_unrecognised_bytes_are_refused_showing_their_start() -> None:
    """Bytes of no known format under a known extension are refused, quoting the first ones."""
    problem = check(b"\x00\x01\x02\x03 not a video at all", ".mkv")
    assert (
        problem
        == "the result is not a Matroska/WebM video (it starts with 00 01 02 03 20 6e 6f 74)"
    )


def test_truncated_header_is_refused(samples: dict[str, bytes]) -> None:
    """A result shorter than its format's signature cannot pass."""
    assert check(samples[".jpg"][:2], ".jpg") is not None
    assert check(samples[".png"][:7], ".png") is not None


def test_unknown_extension_gets_only_the_empty_and_text_checks() -> None:
    """An extension blurd has no signature for accepts any binary body."""
    assert check(b"\x00\x01binary", ".xyz") is None
    assert check(b"\x00\x01binary", ".jpg") is not None


def test_empty_zip_is_accepted() -> None:
    """A ZIP with no entries (end-of-directory record only) is still a ZIP."""
    empty = zipped({})
    assert empty[:4] == b"PK\x05\x06"
    assert check(empty, ".zip") is None


# --- detections --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        json.dumps({"faces": [{"box": [1, 2, 3, 4], "score": 0.9}]}).encode(),
        b"[]",
        b"\xef\xbb\xbf" + json.dumps({"nom": "Zo\u00eb"}, ensure_ascii=False).encode(),
    ],
)
def test_detections_objects_and_arrays_are_accepted(data: bytes) -> None:
    """A JSON object or array in UTF-8 (with or without BOM) passes."""
    assert detections_problem(data) is None


def test_detections_empty_is_refused() -> None:
    """An empty detections body is refused."""
    assert detections_problem(b"") == "the detections are empty"


def test_detections_larger_than_the_limit_are_refused() -> None:
    """Detections up to MAX_DETECTIONS_BYTES pass; one byte more is refused."""
    at_limit = b"[" + b" " * (MAX_DETECTIONS_BYTES - 2) + b"]"
    assert detections_problem(at_limit) is None
    problem = detections_problem(at_limit + b" ")
    assert problem is not None
    assert "more than" in problem


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (HTML_PAGE, "an HTML page"),
        (b'{"name": "Zo\xeb"}', "not UTF-8"),
        (b'{"faces": [', "not valid JSON"),
        (b"NOT JSON", "not valid JSON"),
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    ],
)
def test_detections_that_are_not_json_are_refused(data: bytes, says: str) -> None:
    """HTML, non-UTF-8 bytes, broken JSON and absurd nesting are each refused by name."""
    problem = detections_problem(data)
    assert problem is not None
    assert says in problem


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b'"ok"', "string"),
        (b"42", "number"),
        (b"1.5", "number"),
        (b"true", "boolean"),
        (b"null", "null"),
    ],
)
def test_detections_scalars_are_refused(data: bytes, kind: str) -> None:
    """Valid JSON that is not an object or array is refused, naming its type."""
    assert detections_problem(data) == f"the detections are a JSON {kind}, not an object or array"

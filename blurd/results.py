"""A result is checked before it is placed: an engine's 2xx body may be an error page.

``media_problem`` looks at the first bytes of a downloaded media result and says, in one
sentence, why it cannot be the file expected (empty, an HTML page or JSON document, or another
format than its extension says); ``detections_problem`` does the same for detections JSON. Both
return None when the result is fine. The worker never places a result with a problem.
"""

from __future__ import annotations

import json
from collections.abc import Callable

MAX_DETECTIONS_BYTES = 64 * 1024 * 1024
HEAD_BYTES = 64  # how much of a media result media_problem needs

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_EBML = b"\x1a\x45\xdf\xa3"
_MPEG_PS = b"\x00\x00\x01\xba"
_TS_SYNC = 0x47
# Top-level boxes an ISO BMFF file may start with: 'ftyp' in anything recent; old QuickTime
# movies may open with the movie, the data or padding instead.
_OLD_QUICKTIME_BOXES = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
_WHITESPACE = " \t\r\n\f\v"  # ASCII only: str.isspace() also takes \x1c-\x1f and \x85
_JSON_NAMES = {str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def _riff(kind: bytes) -> Callable[[bytes], bool]:
    return lambda head: head[:4] == b"RIFF" and head[8:12] == kind


def _box_at_4(boxes: frozenset[bytes]) -> Callable[[bytes], bool]:
    return lambda head: head[4:8] in boxes


# Each format: what it is called in messages and how its first bytes look.
_FORMATS: dict[str, tuple[str, Callable[[bytes], bool]]] = {
    "jpeg": ("a JPEG image", lambda head: head[:3] == _JPEG),
    "png": ("a PNG image", lambda head: head[:8] == _PNG),
    "webp": ("a WebP image", _riff(b"WEBP")),
    "avi": ("an AVI video", _riff(b"AVI ")),
    "movie": ("an MP4/QuickTime video", _box_at_4(_OLD_QUICKTIME_BOXES | {b"ftyp"})),
    "heif": ("a HEIF/AVIF image", _box_at_4(frozenset({b"ftyp"}))),
    "matroska": ("a Matroska/WebM video", lambda head: head[:4] == _EBML),
    "zip": ("a ZIP archive", lambda head: head[:4] in (b"PK\x03\x04", b"PK\x05\x06")),
    "ts": ("an MPEG transport stream", lambda head: head[:1] == bytes([_TS_SYNC])),
    # 192-byte packets: a 4-byte arrival timestamp before each sync byte.
    "m2ts": ("an MPEG transport stream", lambda head: head[4:5] == bytes([_TS_SYNC])),
    "mpeg": ("an MPEG program stream", lambda head: head[:4] == _MPEG_PS),
    "gif": ("a GIF image", lambda head: head[:6] in (b"GIF87a", b"GIF89a")),
}
# Formats too loosely recognised (one byte) to name what a result is instead.
_WEAK = frozenset({"ts", "m2ts"})

_EXPECTED: dict[str, str] = {
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".png": "png",
    ".webp": "webp",
    ".avi": "avi",
    ".mp4": "movie",
    ".mov": "movie",
    ".m4v": "movie",
    ".3gp": "movie",
    ".heic": "heif",
    ".heif": "heif",
    ".avif": "heif",
    ".mkv": "matroska",
    ".webm": "matroska",
    ".zip": "zip",
    ".ts": "ts",
    ".mts": "m2ts",
    ".m2ts": "m2ts",
    ".mpg": "mpeg",
    ".mpeg": "mpeg",
}


def _first_char(head: bytes) -> str:
    """The first non-whitespace character of ``head`` read as text (after any BOM), or ''."""
    encoding = "latin-1"
    for bom, name in _BOMS:
        if head.startswith(bom):
            head, encoding = head[len(bom) :], name
            break
    text = head.decode(encoding, errors="replace").lstrip(_WHITESPACE)
    return text[:1]


def _text_kind(head: bytes) -> str | None:
    """What text document ``head`` starts like: an HTML page, a JSON document, or None."""
    first = _first_char(head)
    if first == "<":
        return "an HTML page"
    if first in ("{", "["):
        return "a JSON document"
    return None


def media_problem(head: bytes, size: int, expected_ext: str) -> str | None:
    """Why a media result cannot be placed as ``expected_ext``, in one sentence; None if fine.

    ``head`` is the result's first bytes (up to ``HEAD_BYTES``; fewer only when the result is
    shorter), ``size`` its total size, ``expected_ext`` the extension the output will have
    (lower case, with the dot). Empty results and text documents (HTML, JSON) are refused for
    any extension; for a known extension the first bytes must also be that format's.
    """
    if size == 0 or not head:
        return "the result is empty"
    text = _text_kind(head)
    if text is not None:
        return f"the result is {text}, not a {expected_ext} file"
    key = _EXPECTED.get(expected_ext.lower())
    if key is None:
        return None
    name, looks_like = _FORMATS[key]
    if looks_like(head):
        return None
    for other_key, (other_name, other_looks_like) in _FORMATS.items():
        if other_key not in _WEAK and other_name != name and other_looks_like(head):
            return f"the result is {other_name}, not a {expected_ext} file"
    return f"the result is not {name} (it starts with {head[:8].hex(' ')})"


def detections_problem(data: bytes) -> str | None:
    """Why a detections result cannot be placed, in one sentence; None if fine.

    It must be non-empty, at most ``MAX_DETECTIONS_BYTES``, UTF-8 (a BOM is allowed) and
    parse as a JSON object or array.
    """
    if not data:
        return "the detections are empty"
    if len(data) > MAX_DETECTIONS_BYTES:
        return (
            f"the detections are {len(data)} bytes, more than the "
            f"{MAX_DETECTIONS_BYTES} bytes allowed"
        )
    if _first_char(data[:HEAD_BYTES]) == "<":
        return "the detections are an HTML page, not JSON"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return f"the detections are not UTF-8 text (byte {exc.start} is invalid)"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"the detections are not valid JSON ({exc.msg} at line {exc.lineno})"
    except RecursionError:
        return "the detections are JSON nested too deeply to read"
    if not isinstance(value, dict | list):
        return f"the detections are a JSON {_JSON_NAMES[type(value)]}, not an object or array"
    return None

"""A BlurIt-compatible HTTP server for tests (behaviour from /work/shared/blurit-api.md).

Routes: POST /login, POST /token, POST and GET /innovation-service/anonymization,
GET /innovation-service/result/<name>. Tokens expire server-side; refresh tokens rotate;
both encodings of nested fields are accepted; faults can be switched on per route: an error
status, a dropped connection, a late answer, a request served as usual but answered with a
mangled body, and a server that stops taking connections.
The anonymized media (``result_bytes(input, ext)``) holds ``b"BLURRED:" + sha256_hex(input) +
b"\\n"`` and the input: photos as well-formed JPEG, PNG or WEBP files (blurd rewrites their
metadata before placing them), other types behind the leading bytes of a file of their type
(blurd checks them before it places a result, as it would a real API's).

Uploads are spooled to a temp file and parsed in chunks, so a 1 GiB upload never sits in
memory; the result is streamed from that same file.

Run by hand: ``python tests/fakeblurit.py --port 8765 --token-lifetime 3 --job-seconds 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import mimetypes
import random
import secrets
import shutil
import socket
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import collapse_rfc2231_value
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

ROUTES = ("login", "token", "submit", "status", "result")
SUBMIT_PATH = "/innovation-service/anonymization"
RESULT_PREFIX = "/innovation-service/result/"
CHUNK_BYTES = 64 * 1024
MAX_SMALL_BODY_BYTES = 1024 * 1024  # JSON bodies and plain form fields
BOOLEAN_FIELDS = ("activation_faces_blur", "activation_plates_blur", "output_detections_url")
AREA_KEYS = frozenset({"top", "bottom", "left", "right"})
STYLES = ("blur", "opaque", "pixelate")
# The first bytes of a file of each result type (its "magic"): enough for blurd's check.
MEDIA_HEADS = {
    ".jpg": b"\xff\xd8\xff\xe0", ".jpeg": b"\xff\xd8\xff\xe0",
    ".png": b"\x89PNG\r\n\x1a\n", ".webp": b"RIFF\x00\x00\x00\x00WEBP",
    ".mp4": b"\x00\x00\x00\x18ftypisom", ".mov": b"\x00\x00\x00\x14ftypqt  ",
    ".avi": b"RIFF\x00\x00\x00\x00AVI ", ".mkv": b"\x1a\x45\xdf\xa3",
    ".zip": b"PK\x03\x04",
}  # fmt: skip


# Photos come back as well-formed files, since blurd rewrites their metadata segments before
# placing them: the marker and the input travel as a JPEG scan (0xFF stuffed), a PNG IDAT
# chunk or a WEBP VP8L bitstream, which blurd copies unchanged.
_JPEG_FRAME = (
    b"\xff\xd8"  # SOI
    + b"\xff\xc0\x00\x0b\x08\x00\x01\x00\x01\x01\x01\x11\x00"  # SOF0: 1x1, one component
    + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"  # SOS
)
_PNG_IHDR = b"\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00"  # 1x1, 8-bit grey
_FRAMED = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}


def result_head(sha256_hex: str, extension: str) -> bytes:
    """What the anonymized media of an input with this digest starts with, before the input
    (for a JPEG, the input's 0xFF bytes are then stuffed); not for PNG or WEBP, whose first
    bytes depend on the input's size."""
    marker = b"BLURRED:" + sha256_hex.encode() + b"\n"
    kind = _FRAMED.get(extension.lower())
    if kind == "jpeg":
        return _JPEG_FRAME + marker
    if kind is not None:
        raise ValueError(f"a {extension} result's first bytes depend on its size")
    return MEDIA_HEADS.get(extension.lower(), b"") + marker


def _chunk_head(kind: bytes, size: int) -> bytes:
    return size.to_bytes(4, "big") + kind


def _result_frame(
    sha256_hex: str, extension: str, size: int, crc: Callable[[int], int]
) -> tuple[bytes, Callable[[bytes], bytes], bytes]:
    """(prefix, how each piece of the input is written, suffix) of the result for an input of
    ``size`` bytes; ``crc(start)`` is zlib.crc32 of the input continued from ``start`` (only
    PNG asks for it)."""
    marker = b"BLURRED:" + sha256_hex.encode() + b"\n"
    kind = _FRAMED.get(extension.lower())
    if kind == "jpeg":
        return _JPEG_FRAME + marker, lambda b: b.replace(b"\xff", b"\xff\x00"), b"\xff\xd9"
    if kind == "png":
        ihdr = _chunk_head(b"IHDR", 13) + _PNG_IHDR
        ihdr += zlib.crc32(ihdr[4:]).to_bytes(4, "big")
        idat = _chunk_head(b"IDAT", len(marker) + size) + marker
        tail = crc(zlib.crc32(idat[4:])).to_bytes(4, "big")
        iend = _chunk_head(b"IEND", 0) + zlib.crc32(b"IEND").to_bytes(4, "big")
        return b"\x89PNG\r\n\x1a\n" + ihdr + idat, lambda b: b, tail + iend
    if kind == "webp":
        bitstream = 5 + len(marker) + size  # signature, 1x1 header, then the payload
        pad = bitstream % 2
        riff = 4 + 8 + bitstream + pad
        head = b"RIFF" + riff.to_bytes(4, "little") + b"WEBP" + b"VP8L"
        head += bitstream.to_bytes(4, "little") + b"\x2f\x00\x00\x00\x00" + marker
        return head, lambda b: b, b"\x00" * pad
    return MEDIA_HEADS.get(extension.lower(), b"") + marker, lambda b: b, b""


def result_bytes(data: bytes, extension: str) -> bytes:
    """The whole anonymized media the server returns for the input ``data``."""
    sha = hashlib.sha256(data).hexdigest()
    prefix, piece, suffix = _result_frame(
        sha, extension, len(data), lambda start: zlib.crc32(data, start)
    )
    return prefix + piece(data) + suffix


@dataclass(frozen=True)
class Upload:
    job_id: str
    filename: str
    content_type: str | None
    sha256: str
    size: int
    fields: dict[str, str]  # every plain form field, as received
    time: float  # time.monotonic()
    options: dict[str, Any] = field(default_factory=dict)  # the fields as the server parsed them


@dataclass(frozen=True)
class Req:
    method: str
    path: str  # without the query string
    authorization: str | None
    status: int | None  # None: the connection was dropped without a response
    time: float  # time.monotonic()


@dataclass
class _Fault:
    kind: str  # "fail" | "drop" | "delay" | "garble"
    count: int
    status: int = 0
    body: Any = None
    retry_after: Any = None
    seconds: float = 0.0
    content_type: str = ""


@dataclass
class _Job:
    upload: Upload
    spool: Path  # the raw request body; the media is at [offset, offset + size)
    offset: int
    stem: str
    extension: str
    created: float
    outcome: dict[str, str] | None = None  # set by forget_job / fail_job / revoke_job


class _Refusal(Exception):
    """An error reply in the NestJS shape."""

    def __init__(self, status: int, message: Any = None, *, raw: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message  # str or list of str; None: the reason phrase
        self.raw = raw  # a body to send as is instead (dict: JSON, str: text, bytes)


class _Scanner:
    """Reads a spooled body in chunks, finding markers that may straddle chunk edges."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.buf = b"\r\n"  # a virtual CRLF, so the first boundary looks like the others
        self.base = -2  # file offset of buf[0]

    def _more(self) -> bool:
        data = self.f.read(CHUNK_BYTES)
        self.buf += data
        return bool(data)

    def _drop(self, n: int) -> None:
        self.base += n
        self.buf = self.buf[n:]

    def take(self, n: int) -> bytes:
        while len(self.buf) < n and self._more():
            pass
        out = self.buf[:n]
        self._drop(len(out))
        return out

    def until(self, marker: bytes, sink: Any = None) -> int:
        """Consumes through ``marker``, feeding what precedes it to ``sink``; returns its offset."""
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                if sink:
                    sink(self.buf[:i])
                at = self.base + i
                self._drop(i + len(marker))
                return at
            cut = max(0, len(self.buf) - len(marker) + 1)
            if sink and cut:
                sink(self.buf[:cut])
            self._drop(cut)
            if not self._more():
                raise _Refusal(400, "malformed multipart body")


def _parse_multipart(f: BinaryIO, boundary: bytes) -> list[tuple[Message, int, int, str, bytes]]:
    """Parts of a spooled multipart body: (headers, offset, size, sha256, first bytes)."""
    delimiter = b"\r\n--" + boundary
    scanner = _Scanner(f)
    scanner.until(delimiter)
    parts = []
    while scanner.take(2) == b"\r\n":
        head = bytearray()
        scanner.until(b"\r\n\r\n", head.extend)
        headers = BytesHeaderParser().parsebytes(bytes(head))
        digest, small = hashlib.sha256(), bytearray()

        def sink(data: bytes, digest: Any = digest, small: bytearray = small) -> None:
            digest.update(data)
            if len(small) <= MAX_SMALL_BODY_BYTES:
                small.extend(data)

        start = scanner.base
        end = scanner.until(delimiter, sink)
        parts.append((headers, start, end - start, digest.hexdigest(), bytes(small)))
    return parts


def _param(headers: Message, name: str) -> str | None:
    value = headers.get_param(name, header="content-disposition")
    return None if value is None else collapse_rfc2231_value(value)


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _nested(fields: dict[str, str], name: str) -> dict[str, Any] | None:
    """A nested field sent as one JSON string or as bracket keys; empty or "null" is absent."""
    raw = fields.get(name, "").strip()
    value: Any = {}
    if raw and raw != "null":
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise _Refusal(400, [f"{name} must be a JSON object"])
    prefix = name + "["
    for key, text in fields.items():
        if key.startswith(prefix) and key.endswith("]"):
            value[key[len(prefix) : -1]] = _scalar(text)
    return value or None


def _parse_options(fields: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in BOOLEAN_FIELDS:
        text = fields.get(name, "").strip().lower()
        if text:
            if text not in ("true", "false"):
                raise _Refusal(400, [f"{name} must be a boolean value"])
            options[name] = text == "true"
    area = _nested(fields, "included_area")
    if area is not None:
        fractions = all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1
            for v in area.values()
        )
        if set(area) != AREA_KEYS or not fractions:
            message = "included_area must be an object of top, bottom, left, right in [0, 1]"
            raise _Refusal(400, [message])
        options["included_area"] = area
    blur = _nested(fields, "blur_type")
    if blur is not None:
        if blur.get("anonymization_type", "blur") not in STYLES:
            message = "blur_type.anonymization_type must be one of blur, opaque, pixelate"
            raise _Refusal(400, [message])
        options["blur_type"] = blur
    return options


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeBlurIt
    connections: set[socket.socket]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out or vanish are part of the tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # http.server writes headers and body in two sends; with Nagle on, the body waits for
        # the client's delayed ACK: ~40 ms per reply on loopback. Real servers set NODELAY.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeBlurIt:
    def __init__(
        self,
        *,
        client_id: str = "client_test",
        secret_id: str = "secret_test",
        token_lifetime_s: float = 3600.0,
        expiry_field: str | None = "expireTime",
        job_seconds: float = 0.0,
        status_steps: tuple[str, ...] = ("Sent", "Started"),
        result_extension: str | None = None,
        port: int = 0,
    ) -> None:
        self.client_id, self.secret_id = client_id, secret_id
        self.token_lifetime_s, self.expiry_field = token_lifetime_s, expiry_field
        self.job_seconds, self.status_steps = job_seconds, tuple(status_steps)
        self.result_extension, self.port = result_extension, port
        self.url = ""
        self.result_url_base: str | None = None  # result URLs on another host (a hostile API)
        self._chaos_rate, self._chaos_rng = 0.0, random.Random(0)
        self.chaos_faults = 0  # faults injected by chaos()
        self.payment_required = False
        self.wrong_credentials = False
        # text around each token and refresh token in login/refresh replies (the server keeps
        # the bare token): a sloppy API that pads them with whitespace
        self.token_padding = ("", "")
        self.result_content_length = True  # False: results end when the connection closes
        # True: the media result is the upload itself, metadata included, as the real API
        # returns a photo's EXIF (GPS too) with its blurred pixels
        self.echo_media = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._tokens: dict[str, float] = {}  # access token -> expiry (monotonic)
        self._refresh_tokens: dict[str, str] = {}  # unused refresh token -> its access token
        self._jobs: dict[str, _Job] = {}
        self._results: dict[str, tuple[_Job, str]] = {}  # file name -> (job, "media"|"json")
        self._faults: dict[str, list[_Fault]] = {route: [] for route in ROUTES}
        self._truncations = 0
        # observations: appended under the lock, safe to read from any thread
        self.uploads: list[Upload] = []
        self.requests: list[Req] = []
        self.logins = 0  # successful logins
        self.refreshes = 0  # successful refreshes
        self._server: _Server | None = None
        self._fillers: list[socket.socket] = []  # stop_accepting(): sockets to close at stop
        self._tmp: str | None = None

    # life cycle
    def start(self) -> FakeBlurIt:
        self._tmp = tempfile.mkdtemp(prefix="fakeblurit-")
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.fake, server.connections = self, set()
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            for conn in list(self._server.connections):
                with contextlib.suppress(OSError):  # wakes handlers waiting on idle clients
                    conn.shutdown(socket.SHUT_RDWR)
            self._server = None
        for sock in self._fillers:
            sock.close()
        self._fillers.clear()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> FakeBlurIt:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def upload_count(self, sha256: str) -> int:
        return sum(1 for u in self.uploads if u.sha256 == sha256)

    # fault switches
    def _add_fault(self, route: str, fault: _Fault) -> None:
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}")
        with self._lock:
            self._faults[route].append(fault)

    def fail_next(
        self, route: str, status: int, *, count: int = 1, body: Any = None, retry_after: Any = None
    ) -> None:
        self._add_fault(route, _Fault("fail", count, status, body, retry_after))

    def drop_next(self, route: str, count: int = 1) -> None:
        self._add_fault(route, _Fault("drop", count))

    def delay_next(self, route: str, seconds: float, count: int = 1) -> None:
        self._add_fault(route, _Fault("delay", count, seconds=seconds))

    def garble_next(
        self,
        route: str,
        body: bytes | str | dict[str, Any],
        *,
        status: int = 200,
        content_type: str = "application/json; charset=utf-8",
        count: int = 1,
    ) -> None:
        """The next ``count`` requests to ``route`` are served as usual (a submit creates its
        job, a login issues its token) but answered with ``status`` and ``body`` as given."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        data = data.encode() if isinstance(data, str) else data
        self._add_fault(route, _Fault("garble", count, status, data, content_type=content_type))

    def stop_accepting(self) -> None:
        """From now on the server takes no new connection: its listen queue is full, so a
        client's connect times out (the kernel drops its SYNs). Open connections are closed."""
        assert self._server is not None
        server, self._server = self._server, None
        server.shutdown()  # the socket stays open and listening, but nothing accepts
        for conn in list(server.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        address = server.server_address
        while True:  # fill the accept queue; a connect that hangs shows it is full
            probe = socket.socket()
            probe.settimeout(0.2)
            try:
                probe.connect(address)
            except OSError:
                probe.close()
                break
            self._fillers.append(probe)
        self._fillers.append(server.socket)

    def truncate_next_download(self, count: int = 1) -> None:
        with self._lock:
            self._truncations += count

    def _set_outcome(self, job_id: str, outcome: dict[str, str]) -> None:
        with self._lock:
            self._jobs[job_id].outcome = outcome

    def forget_job(self, job_id: str) -> None:
        self._set_outcome(job_id, {"status": "Unknown job"})

    def fail_job(self, job_id: str, message: str) -> None:
        self._set_outcome(job_id, {"status": "Failed", "error": message})

    def revoke_job(self, job_id: str) -> None:
        self._set_outcome(job_id, {"status": "Revoked"})

    def expire_all_tokens(self) -> None:
        with self._lock:
            for token in self._tokens:
                self._tokens[token] = float("-inf")

    # request handling
    def _handle(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        route = {
            ("POST", "/login"): "login",
            ("POST", "/token"): "token",
            ("POST", SUBMIT_PATH): "submit",
            ("GET", SUBMIT_PATH): "status",
        }.get((h.command, split.path))
        if route is None and h.command == "GET" and split.path.startswith(RESULT_PREFIX):
            route = "result"
        spool: Path | None = None
        try:
            if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
                h.close_connection = True
                raise _Refusal(411, "Length Required")
            body, spool = self._read_body(h, route == "submit")
            fault = self._take_fault(route)
            if fault and fault.kind == "drop":
                h.close_connection = True
                self._record(h, None)
                return
            if fault and fault.kind == "delay":
                self._stopping.wait(fault.seconds)
            if fault and fault.kind == "fail":
                self._refuse(h, _Refusal(fault.status, raw=fault.body), fault.retry_after)
            elif route is None:
                raise _Refusal(404, f"Cannot {h.command} {split.path}")
            elif route == "submit":
                assert spool is not None
                self._answer(h, self._submit(h, spool), fault)
                spool = None  # the job owns it now
            elif route == "result" and fault and fault.kind == "garble":
                self._authorize(h)
                self._answer(h, None, fault)
            elif route == "result":
                self._result(h, unquote(split.path[len(RESULT_PREFIX) :]))
            else:
                handler = {"login": self._login, "token": self._token, "status": self._status}
                self._answer(h, handler[route](h, body, parse_qs(split.query)), fault)
        except _Refusal as refusal:
            self._refuse(h, refusal)
        except OSError:
            h.close_connection = True
        finally:
            if spool is not None:
                spool.unlink(missing_ok=True)

    def _read_body(self, h: _Handler, to_file: bool) -> tuple[bytes, Path | None]:
        remaining = int(h.headers.get("Content-Length") or 0)
        if not to_file:
            if remaining > MAX_SMALL_BODY_BYTES:
                h.close_connection = True
                raise _Refusal(413, "Payload Too Large")
            return h.rfile.read(remaining), None
        assert self._tmp is not None
        fd, name = tempfile.mkstemp(dir=self._tmp, suffix=".upload")
        with open(fd, "wb") as out:
            while remaining > 0:
                data = h.rfile.read(min(CHUNK_BYTES, remaining))
                if not data:
                    break
                out.write(data)
                remaining -= len(data)
        return b"", Path(name)

    def chaos(self, rate: float, seed: int = 0) -> None:
        """From now on, a share ``rate`` of submit/status/result requests fails at random:
        500, 503, 429 (Retry-After: 1), a dropped connection or (results) a truncated body."""
        with self._lock:
            self._chaos_rate, self._chaos_rng = rate, random.Random(seed)

    def _chaos_fault(self, route: str | None) -> _Fault | None:
        if (
            route not in ("submit", "status", "result")
            or self._chaos_rng.random() >= self._chaos_rate
        ):
            return None
        kinds = ["500", "503", "429", "drop"] + (["truncate"] if route == "result" else [])
        kind = self._chaos_rng.choice(kinds)
        self.chaos_faults += 1
        if kind == "drop":
            return _Fault("drop", 1)
        if kind == "truncate":
            self._truncations += 1
            return None
        return _Fault("fail", 1, int(kind), None, "1" if kind == "429" else None)

    def _take_fault(self, route: str | None) -> _Fault | None:
        with self._lock:
            queue = self._faults.get(route or "", [])
            if not queue:
                return self._chaos_fault(route)
            fault = queue[0]
            fault.count -= 1
            if fault.count <= 0:
                queue.pop(0)
            return fault

    def _record(self, h: _Handler, status: int | None) -> None:
        req = Req(
            h.command,
            urlsplit(h.path).path,
            h.headers.get("Authorization"),
            status,
            time.monotonic(),
        )
        with self._lock:
            self.requests.append(req)

    def _send_head(
        self,
        h: _Handler,
        status: int,
        length: int | None,
        ctype: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Status and headers; a ``length`` of None ends the body with the connection."""
        self._record(h, status)
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        if length is None:
            h.send_header("Connection", "close")
            h.close_connection = True
        else:
            h.send_header("Content-Length", str(length))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()

    def _reply(
        self,
        h: _Handler,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        ctype: str = "application/json; charset=utf-8",
    ) -> None:
        if isinstance(payload, str):
            payload, ctype = payload.encode(), "text/plain; charset=utf-8"
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self._send_head(h, status, len(data), ctype, headers)
        h.wfile.write(data)

    def _answer(self, h: _Handler, payload: Any, fault: _Fault | None) -> None:
        """A 200 with ``payload``, or what a "garble" fault says instead."""
        if fault and fault.kind == "garble":
            self._reply(h, fault.status, fault.body, ctype=fault.content_type)
        else:
            self._reply(h, 200, payload)

    def _refuse(self, h: _Handler, refusal: _Refusal, retry_after: Any = None) -> None:
        try:
            phrase = HTTPStatus(refusal.status).phrase
        except ValueError:
            phrase = "Error"
        body = refusal.raw
        if body is None:
            message = refusal.message or phrase
            body = {"statusCode": refusal.status, "error": phrase, "message": message}
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        self._reply(h, refusal.status, body, headers)

    def _authorize(self, h: _Handler) -> str:
        header = h.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        with self._lock:
            expiry = self._tokens.get(token)
        if expiry is None or time.monotonic() >= expiry:
            raise _Refusal(401, "invalid token")
        return token

    def _issue(self) -> dict[str, Any]:
        token, refresh = secrets.token_hex(24), secrets.token_hex(24)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.token_lifetime_s
            self._refresh_tokens[refresh] = token
        lifetime = self.token_lifetime_s
        before, after = self.token_padding
        reply: dict[str, Any] = {
            "token": before + token + after,
            "refreshToken": before + refresh + after,
        }
        if self.expiry_field:
            reply[self.expiry_field] = int(lifetime) if lifetime == int(lifetime) else lifetime
        return reply

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        try:
            value = json.loads(body or b"null")
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise _Refusal(400, "invalid parameters")
        return value

    def _login(self, h: _Handler, body: bytes, query: Any) -> dict[str, Any]:
        creds = self._json(body)
        if not all(isinstance(creds.get(k), str) for k in ("clientId", "secretId")):
            raise _Refusal(400, "invalid parameters")
        if self.wrong_credentials or (creds["clientId"], creds["secretId"]) != (
            self.client_id,
            self.secret_id,
        ):
            raise _Refusal(401, "Invalid credentials")
        reply = self._issue()
        with self._lock:
            self.logins += 1
        return reply

    def _token(self, h: _Handler, body: bytes, query: Any) -> dict[str, Any]:
        header = h.headers.get("Authorization", "")
        bearer = header[7:] if header.startswith("Bearer ") else ""
        refresh = self._json(body).get("refreshToken")
        if not isinstance(refresh, str):
            raise _Refusal(400, "invalid parameters")
        with self._lock:  # an expired access token is fine, an unknown one is not
            if bearer not in self._tokens or self._refresh_tokens.get(refresh) != bearer:
                raise _Refusal(401, "invalid token")
            del self._refresh_tokens[refresh]
            self.refreshes += 1
        return self._issue()

    def _submit(self, h: _Handler, spool: Path) -> dict[str, str]:
        self._authorize(h)
        if self.payment_required:
            raise _Refusal(402, "Payment Required")
        ctype = Message()
        ctype["Content-Type"] = h.headers.get("Content-Type", "")
        boundary = ctype.get_param("boundary")
        if ctype.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
            raise _Refusal(400, "expected multipart/form-data")
        with spool.open("rb") as f:
            parts = _parse_multipart(f, boundary.encode())
        fields: dict[str, str] = {}
        media = None
        for headers, offset, size, digest, head in parts:
            name, filename = _param(headers, "name"), _param(headers, "filename")
            if name == "input_media" and filename is not None:
                media = (filename, headers.get("Content-Type"), offset, size, digest)
            elif name and filename is None:
                fields[name] = head.decode("utf-8", "replace")
        if media is None:
            raise _Refusal(400, ["input_media is required"])
        filename, content_type, offset, size, digest = media
        options = _parse_options(fields)
        job_id = f"{self.client_id}-SRV_ANONYMIZATION-{secrets.token_hex(6)}"
        now = time.monotonic()
        upload = Upload(job_id, filename, content_type, digest, size, fields, now, options)
        extension = self.result_extension or Path(filename).suffix or ".bin"
        job = _Job(upload, spool, offset, str(uuid.uuid4()), extension, now)
        with self._lock:
            self._jobs[job_id] = job
            self.uploads.append(upload)
            self._results[job.stem + extension] = (job, "media")
            if options.get("output_detections_url"):
                self._results[job.stem + ".json"] = (job, "json")
        return {"anonymization_job_id": job_id}

    def _state(self, job: _Job) -> dict[str, str]:
        if job.outcome is not None:
            return dict(job.outcome)
        elapsed = time.monotonic() - job.created
        if elapsed >= self.job_seconds:
            reply = {"status": "Succeeded"}
            base = self.result_url_base or self.url
            reply["output_media"] = f"{base}{RESULT_PREFIX}{job.stem}{job.extension}"
            if job.upload.options.get("output_detections_url"):
                reply["output_json"] = f"{base}{RESULT_PREFIX}{job.stem}.json"
            return reply
        steps = self.status_steps or ("Sent",)
        return {"status": steps[min(int(elapsed / self.job_seconds * len(steps)), len(steps) - 1)]}

    def _status(self, h: _Handler, body: bytes, query: dict[str, list[str]]) -> dict[str, str]:
        self._authorize(h)
        job_id = (query.get("anonymization_job_id") or [""])[0]
        if not job_id:
            raise _Refusal(400, "invalid job id")
        with self._lock:
            job = self._jobs.get(job_id)
        return {"status": "Unknown job"} if job is None else self._state(job)

    @staticmethod
    def _media(job: _Job) -> Iterator[bytes]:
        """The uploaded media, in chunks, from the job's spool."""
        left = job.upload.size
        with job.spool.open("rb") as f:
            f.seek(job.offset)
            while left > 0 and (data := f.read(min(CHUNK_BYTES, left))):
                left -= len(data)
                yield data

    def _scan(self, job: _Job) -> tuple[int, Callable[[int], int]]:
        """(0xFF bytes in the media, zlib.crc32 of the media continued from a start value)."""
        ff = sum(chunk.count(b"\xff") for chunk in self._media(job))

        def crc(start: int) -> int:
            for chunk in self._media(job):
                start = zlib.crc32(chunk, start)
            return start

        return ff, crc

    def _result(self, h: _Handler, name: str) -> None:
        self._authorize(h)
        with self._lock:
            job, kind = self._results.get(name, (None, ""))
        if job is None or self._state(job)["status"] != "Succeeded":
            raise _Refusal(404, "file not found")
        upload = job.upload
        if kind == "json":
            detections = [{"class": "face", "box": [0.1, 0.1, 0.2, 0.2], "score": 0.9}]
            doc = {
                "input_sha256": upload.sha256,
                "filename": upload.filename,
                "options": upload.options,
                "detections": detections,
            }
            data = json.dumps(doc).encode()
            self._send_head(
                h, 200, len(data) if self.result_content_length else None, "application/json"
            )
            h.wfile.write(data)
            return
        framed = job.extension.lower() in _FRAMED and not self.echo_media
        ff_count, crc_start = self._scan(job) if framed else (0, lambda start: start)
        head, piece, tail = _result_frame(upload.sha256, job.extension, upload.size, crc_start)
        if self.echo_media:
            head, piece, tail = b"", (lambda b: b), b""
        stuffed = ff_count if framed and _FRAMED.get(job.extension.lower()) == "jpeg" else 0
        total = len(head) + upload.size + stuffed + len(tail)
        with self._lock:
            truncate = self._truncations > 0
            self._truncations -= int(truncate)
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self._send_head(h, 200, total if self.result_content_length else None, ctype)
        budget = total // 2 if truncate else total
        for data in itertools.chain([head], map(piece, self._media(job)), [tail]):
            if budget <= 0:
                break
            h.wfile.write(data[:budget])
            budget -= len(data)
        if truncate:
            h.close_connection = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake BlurIt API for manual tries.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token-lifetime", type=float, default=3600.0)
    parser.add_argument("--job-seconds", type=float, default=1.0)
    parser.add_argument("--client-id", default="client_test")
    parser.add_argument("--secret-id", default="secret_test")
    parser.add_argument("--expiry-field", default="expireTime", choices=["expireTime", "expiresIn"])
    parser.add_argument("--chaos", type=float, default=0.0, help="share of requests that fail")
    parser.add_argument("--echo-media", action="store_true",
                        help="return each upload as its result, byte for byte")  # fmt: skip
    args = parser.parse_args(argv)
    fake = FakeBlurIt(
        client_id=args.client_id,
        secret_id=args.secret_id,
        port=args.port,
        token_lifetime_s=args.token_lifetime,
        job_seconds=args.job_seconds,
        expiry_field=args.expiry_field,
    )
    fake.echo_media = args.echo_media
    with fake:
        fake.chaos(args.chaos)
        print(
            f"FakeBlurIt at {fake.url}  client_id={fake.client_id}  secret_id={fake.secret_id}",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()

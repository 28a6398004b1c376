"""The BlurIt cloud engine: upload, poll and download over HTTP (see blurit-api.md).

Every call has a timeout; the token is kept fresh by ``TokenKeeper``; a request answered 401
is replayed once after a renewal. Nothing here sleeps or retries otherwise: backoff is the
worker's job. Results are fetched by file name through the configured URL, so the bearer
token never goes to another host. How failures map to errors is in ``blurit_http``.
"""

from __future__ import annotations

import functools
import json
import mimetypes
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit

import structlog
from urllib3 import encode_multipart_formdata

from blurd import defaults
from blurd.engines.base import Engine, Part, Phase, RemoteStatus, announce
from blurd.engines.blurit_auth import TokenKeeper
from blurd.engines.blurit_http import (
    api_error,
    api_message,
    json_object,
    submit_error,
    submitted_job_id,
)
from blurd.engines.transport import Reply, Timeout, Transport, TransportError, streamed_form
from blurd.errors import (
    ApiError,
    BadResult,
    JobRefused,
    PermanentApiError,
    RejectedInput,
    ResultMissing,
    TransientApiError,
)
from blurd.options import Options

log = structlog.get_logger(__name__)

JOB_PATH = "/innovation-service/anonymization"
RESULT_PATH = "/innovation-service/result/"
PENDING_WORDS = frozenset({"sent", "started", "retried"})

BodyFactory = Callable[[], Any]  # a context manager yielding (body, content type)
ErrorMap = Callable[[str, TransportError], ApiError]


def upload_name(path: Path) -> str:
    """The file name sent with an upload: its extension only.

    Names on a media server often say who is in the picture; the API needs only the type.
    This also keeps quotes and newlines out of the multipart headers.
    """
    ext = path.suffix.lower()
    return "media" + (ext if ext[1:].isascii() and ext[1:].isalnum() else "")


class BlurItEngine(Engine):
    """Anonymization by the BlurIt cloud API."""

    name = "blurit"
    supported_extensions = defaults.SUPPORTED_EXTENSIONS

    def __init__(
        self,
        url: str,
        client_id: str,
        secret_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        connect_timeout_s: float = defaults.CONNECT_TIMEOUT_S,
        read_timeout_s: float = defaults.READ_TIMEOUT_S,
        upload_read_timeout_s: float = defaults.UPLOAD_READ_TIMEOUT_S,
        on_token_refresh: Callable[[], None] | None = None,
    ) -> None:
        self._url = url.rstrip("/")
        self._timeout: Timeout = (connect_timeout_s, read_timeout_s)
        self._upload_timeout: Timeout = (connect_timeout_s, upload_read_timeout_s)
        self._http = Transport(self._url, defaults.MAX_IN_FLIGHT)
        self._auth = TokenKeeper(
            self._http, self._url, client_id, secret_id, clock=clock, timeout=self._timeout,
            on_renewed=on_token_refresh,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"BlurItEngine(url={self._url!r})"

    # the three steps
    def submit(self, path: Path, options: Options) -> str:
        response = self._send(
            "POST",
            JOB_PATH,
            "submit",
            body=lambda: self._multipart(path, options),
            timeout=self._upload_timeout,
            errors=submit_error,
        )
        with response:
            if not _success(response):
                raise submit_error("submit", response)
            return submitted_job_id(response)

    def poll(self, remote_id: str) -> RemoteStatus:
        response = self._send("GET", JOB_PATH, "poll", params={"anonymization_job_id": remote_id})
        with response:
            if not _success(response):
                raise api_error("poll", response)
            body = json_object(response)
            if body is None:
                status = response.status_code
                raise BadResult(
                    f"BlurIt poll: the {status} reply is not a JSON object", status=status
                )
            return self._status(body)

    def fetch(self, remote_id: str, status: RemoteStatus, part: Part, out: BinaryIO) -> int:
        name = status.media_name if part == "media" else status.detections_name
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise PermanentApiError(f"BlurIt gave no usable {part} file name: {name!r}")
        response = self._send("GET", RESULT_PATH + quote(name, safe=""), "download", stream=True)
        with response:
            if response.status_code == 404:
                # A result may be missing for a while (not yet stored, served by a node that
                # lags); only a status saying the job is unknown sends it back to the queue.
                raise ResultMissing(f"BlurIt result file not found: {name}", status=404)
            if not _success(response):
                raise api_error("download", response)
            return self._stream(response, out)

    # what `blurd status` and `blurd check` show
    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "url": self._url,
            "auth": self._auth.state,
            "token_expires_in_s": self._auth.expires_in_s(),
        }

    def check(self) -> None:
        self._auth.login()

    def close(self) -> None:
        self._http.close()

    # HTTP
    def _send(
        self,
        method: str,
        path: str,
        action: str,
        *,
        params: dict[str, str] | None = None,
        body: BodyFactory | None = None,
        timeout: Timeout | None = None,
        stream: bool = False,
        errors: ErrorMap = api_error,
    ) -> Reply:
        """One request with a fresh token; a 401 renews the token and replays it once.

        A renewed token refused again is either bad credentials or a refusal of this one
        request (a gateway rule, a job of another account). A fresh login tells them apart:
        it raises ``AuthError`` (all API work pauses) or succeeds, and then only this request
        is refused. The request is not sent a third time: an upload may be gigabytes, and the
        worker retries a refused job with backoff anyway."""
        call = (method, path, action, params, body, timeout, stream, errors)
        token = self._auth.bearer()
        response = self._request(token, *call)
        if response.status_code != 401:
            return response
        response.close()
        self._auth.rejected(token)
        token = self._auth.bearer()
        response = self._request(token, *call)
        if response.status_code != 401:
            return response
        with response:
            message = f"BlurIt {action} failed: 401 {api_message(response)}"
        self._auth.verify(token)
        raise JobRefused(message, status=401)

    def _request(
        self,
        token: str,
        method: str,
        path: str,
        action: str,
        params: dict[str, str] | None,
        body: BodyFactory | None,
        timeout: Timeout | None,
        stream: bool,
        errors: ErrorMap,
    ) -> Reply:
        with ExitStack() as stack:
            data, headers = None, {"Authorization": f"Bearer {token}"}
            if body is not None:  # built anew for each attempt: the file is read again
                data, headers["Content-Type"], length = stack.enter_context(body())
                headers["Content-Length"] = str(length)
            try:
                return self._http.request(
                    method, path, params=params, body=data, headers=headers,
                    timeout=timeout or self._timeout, stream=stream,
                )  # fmt: skip
            except TransportError as exc:
                raise errors(action, exc) from exc

    @staticmethod
    @contextmanager
    def _multipart(path: Path, options: Options) -> Iterator[tuple[Any, str, int]]:
        """The job form, its content type and length. A file up to ``SMALL_UPLOAD_BYTES`` is
        sent as one buffer (streaming it in small pieces cost more CPU than the rest of its
        upload); a larger one is streamed from the file, never whole in memory."""
        try:
            media = path.open("rb")
        except OSError as exc:
            raise RejectedInput(f"cannot read {path.name}: {exc.strerror or exc}") from exc
        mime = _media_type(path.suffix)
        with media:
            fields: list[tuple[str, Any]] = [*_form_fields(options)]
            try:
                small = os.fstat(media.fileno()).st_size <= defaults.SMALL_UPLOAD_BYTES
                content = media.read() if small else media
            except OSError as exc:
                raise RejectedInput(f"cannot read {path.name}: {exc.strerror or exc}") from exc
            if small:
                fields.append(("input_media", (upload_name(path), content, mime)))
                body, content_type = encode_multipart_formdata(fields)
                yield body, content_type, len(body)
            else:
                yield streamed_form(fields, "input_media", upload_name(path), mime, media)

    @staticmethod
    def _status(body: dict[str, Any]) -> RemoteStatus:
        raw = str(body.get("status") or "")
        word = raw.strip().lower()
        if word in PENDING_WORDS:
            return RemoteStatus(Phase.PENDING, raw=raw)
        if word == "succeeded":
            return RemoteStatus(
                Phase.SUCCEEDED,
                raw=raw,
                media_name=_file_name(body.get("output_media")),
                detections_name=_file_name(body.get("output_json")),
            )
        if word == "failed":
            error = str(body.get("error") or "failed without a reason")
            return RemoteStatus(Phase.FAILED, raw=raw, error=error)
        if word == "revoked":
            return RemoteStatus(Phase.FAILED, raw=raw, error="revoked by the API")
        if word.startswith("unknown"):
            return RemoteStatus(Phase.UNKNOWN, raw=raw)
        log.warning("blurit.unseen_status", status=raw)
        return RemoteStatus(Phase.PENDING, raw=raw)

    @staticmethod
    def _stream(response: Reply, out: BinaryIO) -> int:
        """Copy the body into ``out``; a body shorter than announced is a transient error, an
        empty one a bad result."""
        announced = response.headers.get("Content-Length")
        expected = int(announced) if announced and announced.isdigit() else None
        encoded = bool(response.headers.get("Content-Encoding"))
        if expected is not None and not encoded:
            # the sink checks its free space before a byte comes; under a Content-Encoding the
            # length counts the compressed bytes, not what lands on disk
            announce(out, expected)
        written = 0
        try:
            for chunk in response.iter_content(defaults.DOWNLOAD_CHUNK_BYTES):
                out.write(chunk)
                written += len(chunk)
        except TransportError as exc:
            if expected is not None:
                raise _truncated(written, expected) from exc
            raise api_error("download", exc) from exc
        # Content-Length counts the bytes on the wire, before any Content-Encoding is undone
        received = response.received() if encoded else written
        if expected is not None and received != expected:
            raise _truncated(received, expected)
        if written == 0:
            status = response.status_code
            raise BadResult(f"BlurIt download: the {status} reply is empty", status=status)
        return written


def _form_fields(options: Options) -> list[tuple[str, str]]:
    """The text fields of a job; nested objects as JSON strings (the best-trodden encoding)."""
    fields = [
        ("activation_faces_blur", _bool(options.faces)),
        ("activation_plates_blur", _bool(options.plates)),
        ("output_detections_url", _bool(options.detections)),
    ]
    if not options.area.is_full():
        area = options.area
        box = {"left": area.left, "top": area.top, "right": area.right, "bottom": area.bottom}
        fields.append(("included_area", json.dumps(box)))
    blur: dict[str, Any] = {"anonymization_type": options.style}
    if options.style == "opaque":
        blur["hex_color"] = options.color
    if options.style == "pixelate":
        blur["num_pixels"] = options.pixels
    blur["smooth_padding"] = options.padding
    fields.append(("blur_type", json.dumps(blur)))
    return fields


@functools.lru_cache(maxsize=64)
def _media_type(suffix: str) -> str:
    """The upload's media type, by its extension (looked up once per extension)."""
    return mimetypes.guess_type("media" + suffix)[0] or "application/octet-stream"


def _success(response: Reply) -> bool:
    return 200 <= response.status_code < 300


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _file_name(url: Any) -> str | None:
    """The last path segment of a result URL (``output_media`` / ``output_json``)."""
    if not isinstance(url, str) or not url:
        return None
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or None


def _truncated(got: int, expected: int) -> TransientApiError:
    return TransientApiError(f"truncated download: got {got} of {expected} bytes")

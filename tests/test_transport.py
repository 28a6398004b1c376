"""blurd.engines.transport: the BlurIt engine's HTTP client over urllib3, against real
servers on 127.0.0.1 (the engine's own behaviour is in test_blurit_engine.py)."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from urllib3 import encode_multipart_formdata

from blurd import __version__
from blurd.engines.blurit import BlurItEngine
from blurd.engines.transport import Transport, TransportError, streamed_form
from blurd.errors import ConfigError, InputChanged

TIMEOUT = (5.0, 5.0)
BODY = b"0123456789" * 5000


class _Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, dict[str, str]]]
    connections: list[int]

    def setup(self) -> None:
        super().setup()
        self.connections.append(1)

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append(("POST", self.path, {k.lower(): v for k, v in self.headers.items()}))
        reply = json.dumps({"token": "t0k3n", "expiresIn": 3600}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up on a half-read reply does so on purpose here


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Handler", (_Recorder,), {"seen": [], "connections": []})
    srv = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", handler
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_streamed_form_is_the_same_bytes_as_the_one_built_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(BODY)
    fields: list[tuple[str, Any]] = [("activation_faces_blur", "true"), ("blur_type", "{}")]
    with path.open("rb") as fh:
        pieces, content_type, length = streamed_form(fields, "input_media", "media.jpg",
                                                     "image/jpeg", fh)  # fmt: skip
        sent = b"".join(bytes(p) for p in pieces)
    boundary = content_type.split("boundary=")[1]
    whole, whole_type = encode_multipart_formdata(
        [*fields, ("input_media", ("media.jpg", BODY, "image/jpeg"))], boundary
    )
    assert (sent, content_type, length) == (whole, whole_type, len(whole))


def test_a_file_that_shrinks_while_it_is_sent_ends_the_upload(tmp_path: Path) -> None:
    """Shorter than announced: InputChanged (the server, short of the length, makes no job);
    longer: only the announced bytes go."""
    path = tmp_path / "a.jpg"
    path.write_bytes(BODY * 4)
    with path.open("rb") as fh:
        pieces, _type, length = streamed_form([], "input_media", "m.jpg", "image/jpeg", fh)
        next(pieces)  # the form's head
        next(pieces)  # the first block of the file
        path.write_bytes(b"short")  # truncated and rewritten in place
        with pytest.raises(InputChanged, match="shorter while it was sent"):
            list(pieces)
    path.write_bytes(BODY)
    with path.open("rb") as fh:
        pieces, _type, length = streamed_form([], "input_media", "m.jpg", "image/jpeg", fh)
        with path.open("ab") as grow:
            grow.write(b"more")
        assert len(b"".join(bytes(p) for p in pieces)) == length


def test_a_reply_closed_unread_gives_up_its_connection_and_a_read_one_is_reused(
    server: tuple[str, type[_Recorder]],
) -> None:
    url, handler = server
    http = Transport(url, 4)
    for _ in range(3):  # read to the end: one connection serves all three
        with http.request("GET", "/r", timeout=TIMEOUT, stream=True) as reply:
            assert b"".join(reply.iter_content(4096)) == BODY
    assert len(handler.connections) == 1
    with http.request("GET", "/half", timeout=TIMEOUT, stream=True) as reply:
        next(reply.iter_content(100))
    with http.request("GET", "/next", timeout=TIMEOUT) as reply:
        assert reply.content == BODY
    assert len(handler.connections) == 2  # the half-read one was not handed back
    http.close()


def test_requests_carry_blurd_s_user_agent_and_no_redirect_is_followed(
    server: tuple[str, type[_Recorder]],
) -> None:
    url, handler = server
    http = Transport(url, 4)
    with http.request("GET", "/x", timeout=TIMEOUT, params={"a": "1 2"}) as reply:
        assert reply.status_code == 200
    method, path, headers = handler.seen[-1]
    assert (method, path) == ("GET", "/x?a=1+2")
    assert headers["user-agent"] == f"blurd/{__version__}"


def test_a_proxy_from_the_environment_gets_its_credentials(
    server: tuple[str, type[_Recorder]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY with a user and password: the request goes to the proxy, for the API's URL,
    with Proxy-Authorization (requests did this; urllib3 alone does not)."""
    url, handler = server
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", url.replace("http://", "http://us%40er:p%3Ass@"))
    engine = BlurItEngine("http://blurit.invalid", "client", "secret")
    engine.check()  # the "proxy" answers the login
    method, target, headers = handler.seen[-1]
    assert (method, target) == ("POST", "http://blurit.invalid/login")
    expected = base64.b64encode(b"us@er:p:ss").decode()
    assert headers["proxy-authorization"] == f"Basic {expected}"
    engine.close()


def test_no_reply_is_a_transport_error_named_as_people_know_it() -> None:
    http = Transport("http://127.0.0.1:9", 1)
    with pytest.raises(TransportError, match=r"^ConnectionError: ") as caught:
        http.request("GET", "/", timeout=(2.0, 2.0))
    assert caught.value.kind == "ConnectionError"


@pytest.mark.filterwarnings("ignore:SOCKS support in urllib3")  # urllib3's own, on import
def test_a_socks_proxy_without_pysocks_is_a_clear_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    try:
        import socks  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("PySocks is installed here")
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:9")
    with pytest.raises(ConfigError, match="install PySocks"):
        Transport("https://api.example.invalid", 1)

"""The BlurIt engine's HTTP client: urllib3's connection pools, nothing on top.

requests' layers over urllib3 (preparing, merging session settings, hooks, cookies, adapters)
cost more CPU than the exchange itself: a 16 KiB GET took 1.95 to 2.24 ms of the calling thread's
CPU through a ``requests.Session`` and 1.12 to 1.16 ms through urllib3 (loopback, 2,000 calls,
same run), and blurd makes four calls per job. What requests did for blurd is done here once:
proxies, ``NO_PROXY`` and the CA bundle are read from the environment when the engine starts
(a change takes a restart, like every setting); redirects are never followed (the bearer
token must not travel to another host), and nothing is retried (backoff is the worker's).

``TransportError`` is every way an exchange can end without an HTTP reply, with ``kind``
naming it as people know it (``ConnectionError``, ``ConnectTimeout``, ``ReadTimeout``…).
"""

from __future__ import annotations

import binascii
import http.client
import io
import json
import os
import socket
import urllib.request
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import certifi
import urllib3
from urllib3 import encode_multipart_formdata
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)

from blurd import __version__
from blurd.errors import ConfigError, InputChanged

Timeout = tuple[float, float]  # (connect, read) seconds

#: urllib3 sends a streamed body in blocks of this size (its default, 16 KiB, made a 1 GiB
#: upload 65,536 Python-level reads); below glibc's mmap threshold (see ``blurd.heap``)
SEND_BLOCK_BYTES = 64 * 1024
_FILE_BLOCK_BYTES = 64 * 1024  # an upload's reads from its file, into one reused buffer
_FAILURES = (HTTPError, OSError, http.client.HTTPException)
_DEFAULT_HEADERS = {
    "User-Agent": f"blurd/{__version__}",
    "Accept": "*/*",
    "Accept-Encoding": "gzip, deflate",
}


class TransportError(Exception):
    """An exchange that got no (complete) HTTP reply; ``cause`` is what urllib3 raised."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        self.kind = _kind(cause)
        super().__init__(f"{self.kind}: {cause}")


class Reply:
    """One HTTP reply. Close it (or use ``with``): a body not read to its end closes its
    connection rather than handing a half-read one back to the pool."""

    def __init__(self, raw: urllib3.BaseHTTPResponse, *, read: bool) -> None:
        self._raw = raw
        self._read = read  # the body has been read to its end
        self.status_code = raw.status
        self.reason = raw.reason or ""
        self.headers = raw.headers

    def __enter__(self) -> Reply:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def content(self) -> bytes:
        """The whole body (a reply asked for with ``stream=False`` has it already)."""
        try:
            data = self._raw.data
        except _FAILURES as exc:
            raise TransportError(exc) from exc
        self._read = True
        return data

    def json(self) -> Any:
        """The body parsed as JSON; ``ValueError`` when it is empty, HTML or not UTF-8."""
        return json.loads(self.content)

    def iter_content(self, size: int) -> Iterator[bytes]:
        """The body in pieces of up to ``size`` bytes, any Content-Encoding undone."""
        try:
            yield from self._raw.stream(size, decode_content=True)
        except _FAILURES as exc:
            raise TransportError(exc) from exc
        self._read = True

    def received(self) -> int:
        """The bytes of body read off the wire so far (before a Content-Encoding is undone)."""
        return self._raw.tell()

    def close(self) -> None:
        if not self._read:
            self._raw.close()  # unread body: this connection cannot serve another request
        self._raw.release_conn()


class Transport:
    """Connections to one API, shared by every thread of one engine; requests name a path
    under its URL."""

    def __init__(self, base_url: str, pool_size: int) -> None:
        base = urlsplit(base_url.rstrip("/"))
        self._origin, self._prefix = f"{base.scheme}://{base.netloc}", base.path
        pool_kw: dict[str, Any] = dict(
            num_pools=4, maxsize=pool_size, block=False, blocksize=SEND_BLOCK_BYTES,
            cert_reqs="CERT_REQUIRED", ca_certs=_ca_bundle(),
        )  # fmt: skip
        proxy = _proxy_for(base_url)
        self._pool: urllib3.PoolManager
        # Without a proxy, requests go straight to the API host's pool: the manager's own
        # routing (parsing the URL, keying and finding the pool) was a sixth of each request.
        self._direct: urllib3.HTTPConnectionPool | None = None
        if proxy is None:
            self._pool = urllib3.PoolManager(**pool_kw)
            self._direct = self._pool.connection_from_url(self._origin)
        elif proxy.startswith("socks"):
            try:
                from urllib3.contrib.socks import SOCKSProxyManager
            except ImportError as exc:
                raise ConfigError(
                    "the environment names a SOCKS proxy for the BlurIt API; install PySocks "
                    "(pip install pysocks) or name an HTTP proxy", key="HTTPS_PROXY/ALL_PROXY"
                ) from exc
            self._pool = SOCKSProxyManager(proxy, **pool_kw)
        else:
            parts = urlsplit(proxy)
            headers = None
            if parts.username is not None:
                userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                headers = urllib3.make_headers(proxy_basic_auth=userinfo)
            self._pool = urllib3.ProxyManager(proxy, proxy_headers=headers, **pool_kw)

    def request(
        self,
        method: str,
        path: str,
        *,
        timeout: Timeout,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        stream: bool = False,
    ) -> Reply:
        """Send one request for ``path`` (under the base URL) and return its reply, its body
        read already unless ``stream``; ``TransportError`` when no reply came."""
        target = self._prefix + path + (f"?{urlencode(params)}" if params else "")
        kw: dict[str, Any] = dict(
            body=body, headers={**_DEFAULT_HEADERS, **(headers or {})},
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
            retries=False, redirect=False, preload_content=not stream, decode_content=True,
        )  # fmt: skip
        try:
            if self._direct is not None:
                raw = self._direct.urlopen(method, target, **kw)
            else:
                raw = self._pool.urlopen(method, self._origin + target, **kw)
        except _FAILURES as exc:
            raise TransportError(exc) from exc
        return Reply(raw, read=not stream)

    def post_json(self, path: str, payload: Any, *, timeout: Timeout, **headers: str) -> Reply:
        body = json.dumps(payload).encode()
        return self.request("POST", path, timeout=timeout, body=body,
                            headers={"Content-Type": "application/json", **headers})  # fmt: skip

    def close(self) -> None:
        self._pool.clear()


def _kind(cause: BaseException) -> str:
    """The failure's name in the words requests used (and operators search for)."""
    if isinstance(cause, ProxyError):
        return "ProxyError"
    if isinstance(cause, NewConnectionError):  # refused, unreachable, unresolvable
        return "ConnectionError"
    if isinstance(cause, ConnectTimeoutError):
        return "ConnectTimeout"
    if isinstance(cause, ReadTimeoutError | socket.timeout):
        return "ReadTimeout"
    if isinstance(cause, SSLError):
        return "SSLError"
    return "ConnectionError"


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``ALL_PROXY``…), or None
    when there is none or ``NO_PROXY`` exempts its host."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass_environment(parts.netloc):  # type: ignore[attr-defined]
        return None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _ca_bundle() -> str:
    """The CA certificates to trust: the file ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE``
    names (as with requests, which blurd used before), else certifi's."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if os.environ.get(name):
            return os.environ[name]
    return certifi.where()


def streamed_form(
    fields: list[tuple[str, Any]], name: str, filename: str, mime: str, fh: io.BufferedIOBase
) -> tuple[Iterator[bytes | memoryview], str, int]:
    """A multipart form whose last part is ``fh`` from where it stands to its end, read as it
    is sent: (the body's pieces, its content type, its length). The length is fixed up front,
    so a file that shrinks meanwhile ends the upload with ``InputChanged`` (the server, short of
    the announced length, creates no job), and bytes it gains are not sent."""
    boundary = binascii.hexlify(os.urandom(16)).decode()
    head, content_type = encode_multipart_formdata([*fields, (name, (filename, b"", mime))],
                                                   boundary)  # fmt: skip
    tail = f"\r\n--{boundary}--\r\n".encode()
    head = head[: -len(tail)]
    size = os.fstat(fh.fileno()).st_size - fh.tell()

    def pieces() -> Iterator[bytes | memoryview]:
        yield head
        buffer = bytearray(min(_FILE_BLOCK_BYTES, max(size, 1)))
        left = size
        while left:
            n = fh.readinto(memoryview(buffer)[: min(left, len(buffer))])
            if not n:
                raise InputChanged("the file became shorter while it was sent")
            left -= n
            yield memoryview(buffer)[:n]
        yield tail

    return pieces(), content_type, len(head) + size + len(tail)

"""BlurIt authentication.

``TokenKeeper`` logs in, keeps the access token with its expiry and renews it before it
expires (so no request is sent with a dead token), and again when the API answers 401.
Renewal is a refresh (``POST /token`` with the old bearer, even if expired), else a fresh
login. One thread at a time renews ("single flight"); the threads that waited on the lock
reuse what it got. Tokens and the secret never reach a log line, a message or a repr; a token
that could not travel in a header is refused before anything tries to send it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from blurd import defaults
from blurd.engines.blurit_http import api_error, api_message, json_object
from blurd.engines.transport import Reply, Timeout, Transport, TransportError
from blurd.errors import ApiError, AuthError, TransientApiError

log = structlog.get_logger(__name__)


class TokenKeeper:
    """The access token of one BlurIt account, shared by every thread of one engine."""

    def __init__(
        self,
        http: Transport,
        url: str,
        client_id: str,
        secret_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout: Timeout = (defaults.CONNECT_TIMEOUT_S, defaults.READ_TIMEOUT_S),
        on_renewed: Callable[[], None] | None = None,
    ) -> None:
        self._on_renewed = on_renewed or (lambda: None)
        self._http = http
        self._url = url
        self._client_id = client_id
        self._secret_id = secret_id
        self._clock = clock
        self._timeout = timeout
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_token: str | None = None
        self._expires_at = 0.0
        self._renew_at = 0.0
        self.state = "logged out"  # "ok" | "logged out" | "bad credentials"

    def __repr__(self) -> str:
        return f"TokenKeeper(url={self._url!r}, state={self.state!r})"

    def bearer(self) -> str:
        """A token that will still be valid when the request arrives."""
        with self._lock:
            if self._token is None or self._clock() >= self._renew_at:
                self._renew()
            assert self._token is not None
            return self._token

    def rejected(self, token: str) -> None:
        """The API answered 401 to ``token``: renew it, unless another thread already did."""
        with self._lock:
            if token == self._token:
                log.info("auth.rejected")
                self._renew()

    def verify(self, token: str) -> None:
        """The API refused ``token`` although it was just renewed: log in afresh, which raises
        ``AuthError`` if the credentials are what is wrong. Nothing to do when another thread
        has got a good token since (the lock makes this single flight too)."""
        with self._lock:
            if token == self._token or self._token is None:
                log.info("auth.rejected_again")
                self._login()
                self._on_renewed()

    def login(self) -> None:
        """Log in now, whatever the current token (``blurd check``)."""
        with self._lock:
            self._login()

    def expires_in_s(self) -> float | None:
        if self._token is None:
            return None
        return round(max(0.0, self._expires_at - self._clock()), 1)

    def _renew(self) -> None:
        """Refresh the token, or log in again; either way tell ``on_renewed``."""
        if self._token is not None and self._refresh_token is not None:
            try:
                self._refresh()
            except ApiError as exc:
                log.warning("auth.failed", step="refresh", error=str(exc), status=exc.status)
            else:
                self._on_renewed()
                return
        had_token = self._token is not None
        self._login()
        if had_token:
            self._on_renewed()

    def _login(self) -> None:
        started = self._clock()
        body = {"clientId": self._client_id, "secretId": self._secret_id}
        try:
            response = self._http.post_json("/login", body, timeout=self._timeout)
        except TransportError as exc:
            raise api_error("login", exc) from exc
        with response:
            if response.status_code in (400, 401, 403):
                self._token = self._refresh_token = None
                self.state = "bad credentials"
                error = AuthError(
                    f"BlurIt login refused: {response.status_code} {api_message(response)}",
                    status=response.status_code,
                )
                log.warning("auth.failed", step="login", error=str(error), status=error.status)
                raise error
            if response.status_code not in (200, 201):
                raise api_error("login", response)
            self._store(response, started, "login")
        log.info("auth.login", expires_in_s=self.expires_in_s())

    def _refresh(self) -> None:
        started = self._clock()
        assert self._token is not None
        try:
            response = self._http.post_json(
                "/token", {"refreshToken": self._refresh_token},
                timeout=self._timeout, Authorization=f"Bearer {self._token}",
            )  # fmt: skip
        except TransportError as exc:
            raise api_error("token refresh", exc) from exc
        with response:
            if response.status_code not in (200, 201):
                raise api_error("token refresh", response, credentials=True)
            self._store(response, started, "token refresh")
        log.info("auth.refreshed", expires_in_s=self.expires_in_s())

    def _store(self, response: Reply, started: float, action: str) -> None:
        """Keep the new token; its lifetime counts from before the request was sent."""
        body = json_object(response)
        if body is None or body.get("token") is None:
            raise TransientApiError(f"BlurIt {action}: the reply carries no token")
        token = _header_safe(body["token"])
        new_refresh = body.get("refreshToken")
        refresh = None if _blank(new_refresh) else _header_safe(new_refresh)
        if token is None or (refresh is None and not _blank(new_refresh)):
            # the value stays out of the message, the log and the exception chain: it may be
            # a working credential with one stray byte
            raise TransientApiError(f"BlurIt {action}: the reply carries an unusable token")
        lifetime = _lifetime_s(body)
        self._token = token
        if refresh is not None:  # a reply without one leaves the one we have
            self._refresh_token = refresh
        self._expires_at = started + lifetime
        margin = min(
            lifetime * (1 - defaults.TOKEN_REFRESH_AT_FRACTION), defaults.TOKEN_REFRESH_MARGIN_MAX_S
        )
        self._renew_at = self._expires_at - margin
        self.state = "ok"


def _lifetime_s(body: dict[str, Any]) -> float:
    """``expireTime`` or ``expiresIn`` (the docs use both), in seconds; else the default."""
    for key in ("expireTime", "expiresIn"):
        value = body.get(key)
        if not isinstance(value, int | float | str) or isinstance(value, bool):
            continue
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            continue
        if seconds > 0:
            return seconds
    return defaults.TOKEN_LIFETIME_DEFAULT_S


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _header_safe(value: object) -> str | None:
    """A token without its surrounding whitespace, or None when it is empty or holds a byte a
    header cannot carry (control characters, non-ASCII, inner spaces): the HTTP client would
    refuse such a header with an error that quotes it."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or not all("!" <= char <= "~" for char in value):
        return None
    return value

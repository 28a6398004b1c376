"""How a BlurIt HTTP exchange that went wrong becomes a blurd error (DESIGN.md section 6).

Two rules shape the mapping besides the plain "5xx and 429 are worth a retry":

* 401/403 say the credentials are wrong only on ``/login`` and ``/token``. Elsewhere they refuse
  one request (a gateway rule, a file the account may not send), not the account, so they
  must not pause every job.
* A submit may have created a job (and cost money) although no job id came back. Such a
  failure is ``PossiblySubmitted``, never "not sent", so that a retry is known and logged for
  the possible double charge it is.
"""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from urllib3.exceptions import ClosedPoolError, ConnectTimeoutError, LocationParseError

from blurd.engines.transport import Reply, TransportError
from blurd.errors import (
    ApiError,
    AuthError,
    JobRefused,
    PaymentRequired,
    PermanentApiError,
    PossiblySubmitted,
    TransientApiError,
)

MESSAGE_MAX_CHARS = 300

#: failures that happen before a byte of the request leaves (urllib3's NewConnectionError, a
#: refused or unresolvable host, is a ConnectTimeoutError too; a URL it cannot parse is never
#: sent)
_NOT_SENT = (ConnectTimeoutError, ClosedPoolError, LocationParseError)


def retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def api_message(response: Reply) -> str:
    """The API's own words: NestJS ``message`` (maybe a list), else ``error``, else the reason."""
    reason = response.reason or _phrase(response.status_code)
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} {reason}"
    detail: Any = None
    if isinstance(body, dict):
        detail = body.get("message") or body.get("error")
    if isinstance(detail, list):
        detail = "; ".join(str(item) for item in detail)
    text = str(detail) if detail else reason
    return text[:MESSAGE_MAX_CHARS]


def json_object(response: Reply) -> dict[str, Any] | None:
    """The reply's body as a JSON object, or None when it is empty, HTML or other JSON."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def api_error(
    action: str,
    failure: Reply | TransportError,
    *,
    credentials: bool = False,
) -> ApiError:
    """The one mapping from a failed HTTP exchange to a blurd error. ``credentials`` is for
    ``/login`` and ``/token``, the only routes whose 401/403 mean the account is refused."""
    if isinstance(failure, TransportError):
        return TransientApiError(f"BlurIt {action}: {_describe(failure)}")
    status = failure.status_code
    message = f"BlurIt {action} failed: {status} {api_message(failure)}"
    if status in (408, 429) or status >= 500:
        retry = retry_after_s(failure.headers.get("Retry-After"))
        return TransientApiError(message, status=status, retry_after_s=retry)
    if status == 402:
        return PaymentRequired(message, status=status)
    if status in (401, 403):
        if credentials:
            return AuthError(message, status=status)
        return JobRefused(message, status=status)
    return PermanentApiError(message, status=status)


def submit_error(
    action: str,
    failure: Reply | TransportError,
    *,
    credentials: bool = False,
) -> ApiError:
    """``api_error`` for a job upload, where a failure after the body left may hide a job.

    502 and 504 come from a gateway that lost the backend's answer, not its request, so the
    job may exist. 500 and 503 could in theory hide one too, but they are the API's own "I did
    not do it" (an error handling the request, a refusal to take it); counting them as not sent
    keeps a flapping backend from spending the few retries a possible double charge gets.
    429 refuses before any work. A 2xx reply never reaches here (see ``submitted_job_id``).
    """
    if isinstance(failure, TransportError):
        if never_sent(failure):
            return api_error(action, failure)
        return PossiblySubmitted(f"BlurIt {action}: {_describe(failure)}; the job may exist")
    if failure.status_code in (502, 504):
        status = failure.status_code
        retry = retry_after_s(failure.headers.get("Retry-After"))
        message = f"BlurIt {action} failed: {status} {api_message(failure)}; the job may exist"
        return PossiblySubmitted(message, status=status, retry_after_s=retry)
    return api_error(action, failure, credentials=credentials)


def submitted_job_id(response: Reply) -> str:
    """The job id of a 2xx submit reply. The API took the upload, so a reply without a usable
    id is ``PossiblySubmitted``, whatever is wrong with it."""
    body = json_object(response)
    job_id = None if body is None else body.get("anonymization_job_id")
    if isinstance(job_id, str) and job_id.strip():
        return job_id
    what = "is not a JSON object" if body is None else "carries no usable anonymization_job_id"
    status = response.status_code
    raise PossiblySubmitted(
        f"BlurIt submit: the {status} reply {what}; the job may exist", status=status
    )


def never_sent(failure: TransportError) -> bool:
    """Whether the request surely never left this machine: no connection was made (a connect
    timeout, a refused or unresolvable host or proxy), or its URL could not be parsed."""
    todo: list[BaseException] = [failure.cause]
    seen: set[int] = set()
    while todo:
        exc = todo.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, _NOT_SENT):
            return True
        # urllib3's ProxyError (``original_error``) names the failed connection in its
        # arguments; a MaxRetryError (``reason``) would wrap the last failure
        todo += [arg for arg in exc.args if isinstance(arg, BaseException)]
        for attr in ("reason", "original_error"):
            inner = getattr(exc, attr, None)
            if isinstance(inner, BaseException):
                todo.append(inner)
    return False


def _describe(failure: TransportError) -> str:
    return str(failure)[:MESSAGE_MAX_CHARS]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "HTTP error"

"""The error tree. Errors carry data; callers chain them with ``from``."""

from __future__ import annotations


class BlurdError(Exception):
    """Base of every error blurd raises on purpose."""


class ConfigError(BlurdError):
    """The configuration is wrong; the message names the key and the file."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None) -> None:
        self.key = key
        self.file = file
        where = ""
        if file:
            where = f"{file}: "
        if key:
            where += f"{key}: "
        super().__init__(f"{where}{message}")


class StoreError(BlurdError):
    """The jobs database cannot be used (corrupt, locked, newer schema)."""


class InvalidTransition(StoreError):
    """A job was asked to move along a transition the state table does not allow."""


class RejectedInput(BlurdError):
    """A file blurd refuses before any upload (empty, unsupported, too large...)."""


class InputChanged(BlurdError):
    """An input changed while an engine read it: what was sent is not what was hashed."""


class ApiError(BlurdError):
    """Something went wrong talking to an engine."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class TransientApiError(ApiError):
    """Worth retrying later: connection errors, timeouts, 5xx, 429, truncated downloads."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, status=status)


class PermanentApiError(ApiError):
    """The engine refused the job for good (400, 413, Failed, Revoked)."""


class AuthError(ApiError):
    """The credentials are wrong: all API work pauses until a login succeeds."""


class PaymentRequired(ApiError):
    """402: no credit. New submissions pause; polling and downloads go on."""


class UnknownJob(ApiError):
    """The engine no longer knows this job id: it goes back to the queue."""


class JobRefused(ApiError):
    """403 on submit, poll or result: this one job is refused (a WAF rule, a forbidden file),
    not the account. The job backs off and, after a few refusals, fails; other jobs go on."""


class PossiblySubmitted(TransientApiError):
    """A submit that may have created a job at the API although no job id came back: a
    timeout or dropped connection after the body was sent, a 502 or 504, a 2xx reply that is
    not JSON or carries no id. Retried a bounded number of times, each logged as a possible
    double charge; never treated as "not sent"."""


class ResultMissing(TransientApiError):
    """404 on a result file: the job is polled again; only a status saying the job is unknown
    sends it back to the queue."""


class BadResult(ApiError):
    """A 2xx reply whose body is not what was due: empty, HTML, not JSON where JSON is due,
    shorter than announced, or not the media type expected. Never placed; retried a bounded
    number of times, then the job fails."""

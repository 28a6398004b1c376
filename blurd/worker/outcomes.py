"""How a step ends, as values; and DESIGN.md section 6 as a table from errors to outcomes.

A step returns one of these and touches no database; ``apply.Applier`` turns it into the
transition, the schedule, the gates, the metrics and the one log line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from blurd import defaults
from blurd.errors import (
    AuthError,
    BadResult,
    JobRefused,
    PaymentRequired,
    PermanentApiError,
    PossiblySubmitted,
    RejectedInput,
    ResultMissing,
    TransientApiError,
    UnknownJob,
)

Step = Literal["prepare", "reuse", "upload", "poll", "media", "detections", "originals"]
Gate = Literal["auth", "payment"]


@dataclass(frozen=True)
class Hashed:
    """prepare: the content is hashed; the job waits for an upload (or reuses a result)."""

    sha256: str
    fingerprint: str
    dev: int
    ino: int
    ctime_ns: int
    look_for_twin: bool = True  # False: an identical result was found but could not be reused


@dataclass(frozen=True)
class Submitted:
    """upload: the engine accepted the job under ``remote_id``.

    ``uncertain``: the file changed while it was sent, so its recorded hash no longer
    describes what the engine got, and the result must never be reused for that hash."""

    remote_id: str
    size: int
    uncertain: bool = False


@dataclass(frozen=True)
class Pending:
    """poll: not finished yet. ``odd``: the engine's word for it is not one blurd knows."""

    raw: str
    progress: str | None = None
    odd: bool = False


@dataclass(frozen=True)
class Succeeded:
    """poll: the result is ready under these names."""

    media_name: str | None
    detections_name: str | None


@dataclass(frozen=True)
class Placed:
    """media / detections: one output is verified and durably in place."""

    part: Literal["media", "detections"]
    path: Path
    sha256: str
    size: int
    note: str | None = None  # what became of the input's metadata, when worth a log line


@dataclass(frozen=True)
class Done:
    """Every output is in place and the originals policy applied (or the result reused)."""

    media: Path | None = None  # set when the outputs were not recorded by Placed outcomes
    detections: Path | None = None
    media_sha256: str | None = None
    reused_from: int | None = None
    note: str | None = None  # said in the log line (an original left alone, and why)


@dataclass(frozen=True)
class Retry:
    """Try this step again later (``immediate``: at once). With ``max_attempts``, the job
    fails once that many tries in a row ended like this."""

    reason: str
    retry_after_s: float | None = None
    immediate: bool = False
    max_attempts: int | None = None
    double_charge: bool = False  # the engine may have created a job that blurd never saw
    output_blocked: bool = False  # an output could not be written: uploads pause a while
    originals: bool = False  # the originals policy could not be applied (counted, shown)


@dataclass(frozen=True)
class Requeue:
    """The engine lost the job: upload it again (a bounded number of times)."""

    reason: str


@dataclass(frozen=True)
class Fail:
    reason: str


@dataclass(frozen=True)
class Unsent:
    """upload: nothing was sent; back to the queue. ``rehash``: the file changed since it
    was hashed, so hash it again first. ``delay_s``: not before this long."""

    reason: str
    rehash: bool = False
    delay_s: float = 0.0


@dataclass(frozen=True)
class Gated:
    """A gate closed (bad credentials, 402) or was closed already; the step waits for it."""

    gate: Gate
    reason: str


Outcome = (
    Hashed | Submitted | Pending | Succeeded | Placed | Done
    | Retry | Requeue | Fail | Unsent | Gated
)


# ------------------------------------------------------------------ DESIGN.md section 6


@dataclass(frozen=True)
class Rule:
    """One row of DESIGN.md section 6: ``happens`` is its first cell, word for word."""

    happens: str
    errors: tuple[type[BaseException], ...]
    outcome: Callable[[BaseException, Step], Outcome] | None = None
    handled_by: str = "worker"  # or "engine": the engine deals with it before the worker sees it
    steps: tuple[Step, ...] = field(default=())  # empty: every step


def _transient(exc: BaseException, step: Step) -> Outcome:
    assert isinstance(exc, TransientApiError)
    if step == "upload" and isinstance(exc, PossiblySubmitted):
        # bounded by the job's own count of such submits (jobs.maybe_sent), not by attempts
        return Retry(str(exc), exc.retry_after_s, double_charge=True)
    return Retry(str(exc), exc.retry_after_s)


def _payment(exc: BaseException, step: Step) -> Outcome:
    if step == "upload":
        return Gated("payment", str(exc))
    return Retry(str(exc))  # polls and downloads go on through a 402 pause


# fmt: off
RULES: tuple[Rule, ...] = (
    Rule("connection error, timeout, 5xx, 429", (TransientApiError,), _transient),
    Rule("token about to expire", (), handled_by="engine"),
    Rule("401", (AuthError,), lambda exc, _s: Gated("auth", str(exc))),
    Rule("402", (PaymentRequired,), _payment),
    Rule("400 / 413 on submit, `Failed`, `Revoked`", (PermanentApiError, RejectedInput),
         lambda exc, _s: Fail(str(exc))),
    Rule("`Unknown job`", (UnknownJob,), lambda exc, _s: Requeue(str(exc))),
    Rule("truncated download (fewer bytes than announced)", (), handled_by="steps.fetch"),
    Rule("a 2xx body that is empty, HTML, not JSON where JSON is due, or not the media type "
         "expected", (BadResult,),
         lambda exc, _s: Retry(str(exc), max_attempts=defaults.BAD_RESULT_MAX_ATTEMPTS)),
    Rule("403 on submit, poll or result", (JobRefused,),
         lambda exc, _s: Retry(str(exc), max_attempts=defaults.REFUSED_MAX_ATTEMPTS)),
    Rule("404 on a result", (ResultMissing,), handled_by="steps.fetch"),
)
# fmt: on

# Checked in this order: subclasses before the classes they extend.
_ORDER: tuple[type[BaseException], ...] = (
    PossiblySubmitted, ResultMissing, TransientApiError, AuthError, PaymentRequired,
    JobRefused, BadResult, UnknownJob, PermanentApiError, RejectedInput,
)  # fmt: skip


def outcome_of(exc: BaseException, step: Step) -> Outcome | None:
    """What an engine error means for ``step`` (DESIGN.md section 6); None: not an engine
    error (the caller decides)."""
    for cls in _ORDER:
        if isinstance(exc, cls):
            for rule in RULES:
                if cls in rule.errors and rule.outcome is not None:
                    return rule.outcome(exc, step)
            if cls is ResultMissing:  # reached only where the fetch step did not handle it
                return Retry(str(exc))
    return None

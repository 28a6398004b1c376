"""The outcome table against the document, and the gates' state machines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from blurd.errors import (
    AuthError,
    BadResult,
    JobRefused,
    PaymentRequired,
    PermanentApiError,
    PossiblySubmitted,
    ResultMissing,
    TransientApiError,
    UnknownJob,
)
from blurd.worker import outcomes as o
from blurd.worker.gates import AuthGate, OutputGate, PaymentGate

DESIGN = Path(__file__).resolve().parents[2] / "shared" / "DESIGN.md"


def design_rows() -> list[str]:
    """The first cell of every row of DESIGN.md section 6's table."""
    text = DESIGN.read_text()
    section = text.split("## 6.", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [r.split("|")[1].strip() for r in rows[1:] if not re.fullmatch(r"[-| ]+", r)]


@pytest.mark.skipif(not DESIGN.exists(), reason="../shared/DESIGN.md is not beside the checkout")
def test_the_outcome_table_has_every_row_of_design_section_6_and_no_other() -> None:
    """outcomes.RULES is DESIGN.md section 6 as code: same rows, same order."""
    assert [r.happens for r in o.RULES] == design_rows()


@pytest.mark.parametrize(
    ("error", "step", "expected"),
    [
        (TransientApiError("503", status=503), "poll", o.Retry),
        (PossiblySubmitted("timeout after the body was sent"), "upload", o.Retry),
        (AuthError("401 at login"), "upload", o.Gated),
        (PaymentRequired("402"), "upload", o.Gated),
        (PaymentRequired("402"), "poll", o.Retry),
        (PermanentApiError("400"), "upload", o.Fail),
        (UnknownJob("unknown"), "poll", o.Requeue),
        (BadResult("HTML"), "media", o.Retry),
        (JobRefused("403"), "upload", o.Retry),
        (ResultMissing("404"), "media", o.Retry),
    ],
)
def test_each_engine_error_has_its_outcome(
    error: Exception, step: o.Step, expected: type[object]
) -> None:
    """Every error class of the engine maps to the outcome DESIGN.md section 6 gives it."""
    assert isinstance(o.outcome_of(error, step), expected)


def test_bounded_outcomes_carry_their_bound() -> None:
    """A refused job and a bad body are retried a bounded number of times in a row; a possible
    double charge is marked (the applier bounds it by the job's own count); an ordinary
    transient error is not bounded."""
    possibly = o.outcome_of(PossiblySubmitted("x"), "upload")  # bounded by jobs.maybe_sent
    assert isinstance(possibly, o.Retry) and possibly.double_charge
    for error in (JobRefused("403"), BadResult("empty")):
        bounded = o.outcome_of(error, "poll")
        assert isinstance(bounded, o.Retry) and bounded.max_attempts
    plain = o.outcome_of(TransientApiError("503"), "upload")
    assert isinstance(plain, o.Retry) and plain.max_attempts is None
    assert o.outcome_of(ValueError("a bug"), "upload") is None


def test_a_payment_probe_that_ends_without_an_answer_re_arms_the_gate() -> None:
    """402 pause → probe → the probe's upload is dropped → another probe after the wait →
    accepted → open. (The old worker cleared its probe only on a 402 or a success.)"""
    gate = PaymentGate(probe_every_s=30)
    assert gate.refused("402", now=0)
    assert gate.room(10, 5) == 0
    assert gate.room(30, 5) == 1 and gate.claimed(7)
    assert gate.room(31, 5) == 0 and gate.may_send(7) and not gate.may_send(8)
    gate.ended_otherwise(7, now=31)
    assert gate.view(31).state == "paused" and gate.room(60, 5) == 0
    assert gate.room(61, 5) == 1 and gate.claimed(9)
    assert gate.accepted(9) and gate.room(62, 5) == 5


def test_a_login_probe_without_an_answer_retries_at_the_first_wait() -> None:
    """A login probe that meets a network error says nothing about the credentials: the next
    probe comes after the first wait, not a doubled one; a refusal doubles it up to the cap."""
    gate = AuthGate(first_wait_s=30, max_wait_s=100)
    gate.closed("401", now=0)
    assert not gate.take_probe(29) and gate.take_probe(30)
    gate.probe_ended(False, "401 again", now=30)
    assert not gate.take_probe(89) and gate.take_probe(90)
    gate.probe_ended(None, "timeout", now=90)
    assert gate.take_probe(120)
    gate.probe_ended(True, None, now=120)
    assert gate.is_open() and gate.view(120).reason is None


def test_the_output_gate_reopens_on_the_next_placed_output_or_after_its_pause() -> None:
    """A full disk pauses uploads for a while; an output placed reopens at once."""
    gate = OutputGate(pause_s=30)
    assert gate.blocked("ENOSPC", now=0) and not gate.is_open(10)
    assert gate.is_open(30)
    gate.blocked("ENOSPC", now=40)
    assert gate.written() and gate.is_open(41)

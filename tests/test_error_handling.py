"""DESIGN.md section 6, row by row: what blurd does when the API misbehaves.

Each test runs the real daemon against the BlurIt test server with a fault switched on.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from blurd.models import JobState
from tests.conftest import wait_for
from tests.fakeblurit import FakeBlurIt
from tests.harness import Daemon, anonymized

S = JobState
SUBMIT = "/innovation-service/anonymization"


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt(token_lifetime_s=60, job_seconds=0.2) as f:
        yield f


def drop(d: Daemon, name: str = "a.jpg", size: int = 3000) -> bytes:
    data = os.urandom(size)
    (d.inbox / name).write_bytes(data)
    return data


def done(d: Daemon, n: int = 1, timeout: float = 30) -> None:
    wait_for(lambda: d.counts()[S.DONE] == n, timeout=timeout, what=f"{n} job(s) done")


def submits(fake: FakeBlurIt) -> list[int | None]:
    return [r.status for r in fake.requests if r.method == "POST" and r.path == SUBMIT]


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_transient_submit_errors_are_retried(tmp_path: Path, fake: FakeBlurIt, status: int) -> None:
    """5xx and 429 on upload: retried with backoff until accepted, exactly one job created."""
    fake.fail_next("submit", status, count=2)
    with Daemon(tmp_path, fake) as d:
        data = drop(d)
        done(d)
    assert submits(fake) == [status, status, 200]
    assert (d.outbox / "a.jpg").read_bytes() == anonymized(data)
    assert len(fake.uploads) == 1


def test_retry_after_is_honoured(tmp_path: Path, fake: FakeBlurIt) -> None:
    """A 429 with Retry-After: 1 is not retried sooner than one second later."""
    fake.fail_next("submit", 429, retry_after="1")
    with Daemon(tmp_path, fake) as d:
        drop(d)
        done(d)
    times = [r.time for r in fake.requests if r.path == SUBMIT]
    assert times[1] - times[0] >= 0.95


@pytest.mark.parametrize("route", ["submit", "status", "result"])
def test_dropped_connections_are_retried(tmp_path: Path, fake: FakeBlurIt, route: str) -> None:
    """A connection closed without an answer, at any step, is retried; the output is right."""
    fake.drop_next(route, count=2)
    with Daemon(tmp_path, fake) as d:
        data = drop(d)
        done(d)
    assert (d.outbox / "a.jpg").read_bytes() == anonymized(data)
    assert fake.upload_count(hashlib.sha256(data).hexdigest()) == 1


def test_401_at_every_step_refreshes_and_goes_on(tmp_path: Path, fake: FakeBlurIt) -> None:
    """Tokens revoked server-side: each step refreshes once and replays; nothing fails."""
    with Daemon(tmp_path, fake) as d:
        fake.job_seconds = 1.0
        drop(d, "a.jpg")
        wait_for(lambda: fake.uploads, what="the upload")
        fake.expire_all_tokens()  # the next poll gets a 401
        wait_for(lambda: [r for r in fake.requests if r.status == 401], what="a 401")
        fake.expire_all_tokens()
        done(d)
    assert d.counts()[S.FAILED] == 0
    assert fake.refreshes + fake.logins >= 2


def test_wrong_credentials_pause_everything_and_resume(tmp_path: Path, fake: FakeBlurIt) -> None:
    """Bad credentials: no job fails, API work pauses and login is retried until it works."""
    fake.wrong_credentials = True
    with Daemon(tmp_path, fake) as d:
        drop(d)
        wait_for(lambda: fake.requests and fake.requests[-1].status == 401, what="a refused login")
        wait_for(lambda: len([r for r in fake.requests if r.path == "/login"]) >= 2,
                 what="a second login attempt")  # fmt: skip
        assert d.counts()[S.FAILED] == 0 and not fake.uploads
        fake.wrong_credentials = False
        done(d)
    assert len(fake.uploads) == 1


def test_402_pauses_new_uploads_but_not_polls_and_resumes(tmp_path: Path, fake: FakeBlurIt) -> None:
    """Out of credit: jobs already at the API finish; new ones wait; a probe resumes them."""
    fake.job_seconds = 1.0
    with Daemon(tmp_path, fake) as d:
        first = drop(d, "first.jpg")
        wait_for(lambda: fake.uploads, what="first upload")
        fake.payment_required = True
        for i in range(3):
            drop(d, f"later{i}.jpg")
        wait_for(lambda: 402 in submits(fake), what="a 402")
        done(d, 1)  # the first job is polled and downloaded during the pause
        assert (d.outbox / "first.jpg").read_bytes() == anonymized(first)
        refused = submits(fake).count(402)
        wait_for(lambda: submits(fake).count(402) > refused, timeout=10, what="a probe")
        wait_for(lambda: submits(fake).count(402) > refused + 1, timeout=10, what="2nd probe")
        assert len(fake.uploads) == 1
        fake.payment_required = False
        done(d, 4)
    assert d.counts()[S.FAILED] == 0
    assert len(fake.uploads) == 4
    # Once paused, one probe per probe interval (0.5 s): never a burst of refused uploads.
    times = [r.time for r in fake.requests if r.path == SUBMIT and r.status == 402]
    probes = [t for t in times if t > times[0] + 0.2]
    assert len(probes) >= 2
    assert all(b - a >= 0.4 for a, b in itertools.pairwise(probes))


@pytest.mark.parametrize(("status", "message"), [(400, "invalid parameters"), (413, "too big")])
def test_400_and_413_fail_the_job_with_the_api_message(
    tmp_path: Path, fake: FakeBlurIt, status: int, message: str
) -> None:
    """A refused upload is failed at once with the API's message; it is not retried."""
    body = {"statusCode": status, "error": "Bad", "message": message}
    fake.fail_next("submit", status, body=body)
    with Daemon(tmp_path, fake) as d:
        drop(d)
        wait_for(lambda: d.counts()[S.FAILED] == 1, what="failed")
        job = d.job("a.jpg")
    assert message in (job.error or "")
    assert submits(fake) == [status]


@pytest.mark.parametrize("outcome", ["fail", "revoke"])
def test_failed_and_revoked_jobs_fail(tmp_path: Path, fake: FakeBlurIt, outcome: str) -> None:
    """`Failed` and `Revoked` end the job as failed with a reason, with no second upload."""
    fake.job_seconds = 2.0
    with Daemon(tmp_path, fake) as d:
        drop(d)
        wait_for(lambda: fake.uploads, what="upload")
        job_id = fake.uploads[0].job_id
        if outcome == "fail":
            fake.fail_job(job_id, "corrupt media")
        else:
            fake.revoke_job(job_id)
        wait_for(lambda: d.counts()[S.FAILED] == 1, what="failed")
        error = d.job("a.jpg").error or ""
    assert ("corrupt media" in error) if outcome == "fail" else ("revoked" in error.lower())
    assert len(fake.uploads) == 1


def test_unknown_job_is_queued_again_a_bounded_number_of_times(
    tmp_path: Path, fake: FakeBlurIt
) -> None:
    """`Unknown job` sends the file back to the queue; after a few times it fails for good."""
    fake.job_seconds = 30.0
    with Daemon(tmp_path, fake) as d:
        drop(d)
        wait_for(lambda: fake.uploads, what="upload")
        fake.forget_job(fake.uploads[0].job_id)
        wait_for(lambda: len(fake.uploads) == 2, what="a second upload")
        assert d.job("a.jpg").requeues == 1
        for n in range(2, 5):
            wait_for(lambda n=n: len(fake.uploads) >= n, what=f"upload {n}")  # type: ignore[misc]
            fake.forget_job(fake.uploads[n - 1].job_id)
        wait_for(lambda: d.counts()[S.FAILED] == 1, what="failed after the bound")
    assert len(fake.uploads) == 4
    assert "giving up" in (d.job("a.jpg").error or "")


def test_a_truncated_download_is_fetched_again(tmp_path: Path, fake: FakeBlurIt) -> None:
    """A body shorter than its Content-Length is discarded and fetched again; output intact."""
    fake.truncate_next_download(count=2)
    with Daemon(tmp_path, fake) as d:
        data = drop(d, size=200_000)
        done(d)
    assert (d.outbox / "a.jpg").read_bytes() == anonymized(data)
    assert not list(d.outbox.rglob(".blurd-*"))
    assert len(fake.uploads) == 1


def test_unwritable_output_folder_waits_and_loses_nothing(tmp_path: Path, fake: FakeBlurIt) -> None:
    """An output folder that cannot be written keeps the job waiting; fixed, it completes.

    A plain file stands where the output folder should be (a blocked path even for root).
    """
    blocker = tmp_path / "out" / "sub"
    blocker.parent.mkdir()
    blocker.write_text("in the way")
    with Daemon(tmp_path, fake) as d:
        (d.inbox / "sub").mkdir()
        data = drop(d, "sub/a.jpg")
        wait_for(lambda: (d.job("sub/a.jpg").attempts if d.jobs() else 0) >= 2, what="retries")
        assert d.counts()[S.DOWNLOADING] == 1
        assert "cannot write the output" in (d.job("sub/a.jpg").error or "")
        blocker.unlink()
        done(d)
    assert (tmp_path / "out" / "sub" / "a.jpg").read_bytes() == anonymized(data)
    assert len(fake.uploads) == 1


def test_an_unexpected_error_mid_upload_requeues_the_job(
    tmp_path: Path, fake: FakeBlurIt, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a step (here: the engine raising a plain RuntimeError once) never leaves a job
    stuck in `uploading`: it goes back to the queue and completes."""
    from blurd.engines.blurit import BlurItEngine

    real_submit = BlurItEngine.submit
    calls = []

    def buggy_submit(self: BlurItEngine, *args: object) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real_submit(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(BlurItEngine, "submit", buggy_submit)
    with Daemon(tmp_path, fake) as d:
        data = drop(d)
        done(d)
    assert (d.outbox / "a.jpg").read_bytes() == anonymized(data)
    assert len(calls) == 2

"""BlurItEngine against FakeBlurIt: a real HTTP server on 127.0.0.1, no mocks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from blurd.engines.base import Phase, RemoteStatus
from blurd.engines.blurit import BlurItEngine
from blurd.engines.blurit_http import retry_after_s
from blurd.errors import (
    ApiError,
    AuthError,
    BadResult,
    JobRefused,
    PaymentRequired,
    PermanentApiError,
    PossiblySubmitted,
    RejectedInput,
    ResultMissing,
    TransientApiError,
)
from blurd.options import Area, Options
from tests.conftest import FakeClock, wait_for
from tests.fakeblurit import FakeBlurIt, result_bytes

JOB = "/innovation-service/anonymization"


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt() as server:
        yield server


def make_engine(fake: FakeBlurIt, **kwargs: Any) -> BlurItEngine:
    return BlurItEngine(fake.url, "client_test", "secret_test", **kwargs)


@pytest.fixture
def engine(fake: FakeBlurIt) -> Iterator[BlurItEngine]:
    engine = make_engine(fake)
    yield engine
    engine.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff\xd8\xff" + os.urandom(4000))
    return path


def blurred(data: bytes, extension: str = ".jpeg") -> bytes:
    return result_bytes(data, extension)


def finished(engine: BlurItEngine, job_id: str) -> RemoteStatus:
    def settled() -> RemoteStatus | None:
        status = engine.poll(job_id)
        return None if status.phase == Phase.PENDING else status

    status = wait_for(settled, what=f"job {job_id} to finish")
    assert status is not None
    return status


def statuses(fake: FakeBlurIt, path: str | None = None) -> list[int | None]:
    return [r.status for r in fake.requests if path is None or r.path == path]


def test_full_cycle_for_an_image_with_detections(engine: BlurItEngine, image: Path) -> None:
    """submit -> poll -> fetch yields the anonymized media and the detections JSON."""
    job_id = engine.submit(image, Options())
    status = finished(engine, job_id)
    assert status.phase == Phase.SUCCEEDED
    assert status.media_name and status.media_name.endswith(".jpg")
    assert status.detections_name and status.detections_name.endswith(".json")
    media, detections = io.BytesIO(), io.BytesIO()
    data = image.read_bytes()
    assert engine.fetch(job_id, status, "media", media) == len(blurred(data))
    assert media.getvalue() == blurred(data)
    engine.fetch(job_id, status, "detections", detections)
    doc = json.loads(detections.getvalue())
    assert doc["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert doc["filename"] == "media.jpg" and doc["detections"]


def test_result_extension_comes_from_the_api(image: Path) -> None:
    """The result file name (and so its extension) is the one in output_media."""
    with FakeBlurIt(result_extension=".jpeg") as fake:
        engine = make_engine(fake)
        status = finished(engine, engine.submit(image, Options(detections=False)))
        assert status.media_name and status.media_name.endswith(".jpeg")
        assert status.detections_name is None


@pytest.mark.parametrize(
    ("field", "expected_s"), [("expireTime", 120.0), ("expiresIn", 120.0), (None, 3600.0)]
)
def test_token_lifetime_from_either_field_or_the_default(
    field: str | None, expected_s: float
) -> None:
    """Lifetime is read from expireTime or expiresIn; without either it is 3600 s."""
    with FakeBlurIt(expiry_field=field, token_lifetime_s=120) as fake:
        engine = make_engine(fake, clock=FakeClock())
        assert engine.describe()["auth"] == "logged out"
        engine.check()
        assert engine.describe() == {
            "engine": "blurit",
            "url": fake.url,
            "auth": "ok",
            "token_expires_in_s": expected_s,
        }


def test_proactive_refresh_happens_before_expiry_by_the_margin(fake: FakeBlurIt) -> None:
    """With a 3600 s token the refresh comes 300 s before expiry (the capped margin)."""
    clock = FakeClock()
    engine = make_engine(fake, clock=clock)
    engine.check()
    clock.now += 3299
    engine.poll("some-id")
    assert fake.refreshes == 0
    clock.now += 2
    engine.poll("some-id")
    assert (fake.refreshes, fake.logins) == (1, 1)
    assert engine.describe()["token_expires_in_s"] == 3600.0


def test_short_lived_tokens_are_refreshed_before_they_die(image: Path) -> None:
    """A 1 s token over ~2.5 s of calls: refreshed ahead of time, no request ever gets 401."""
    with FakeBlurIt(token_lifetime_s=1.0, job_seconds=2.5) as fake:
        engine = make_engine(fake)
        job_id = engine.submit(image, Options())
        status = finished(engine, job_id)
        engine.fetch(job_id, status, "media", io.BytesIO())
        assert status.phase == Phase.SUCCEEDED
        assert fake.refreshes >= 2 and fake.logins == 1
        assert 401 not in statuses(fake)


def test_401_refreshes_once_and_replays_the_request(fake: FakeBlurIt, engine: BlurItEngine) -> None:
    """A token the server no longer takes is refreshed, and the request goes again, once."""
    engine.check()
    fake.expire_all_tokens()
    assert engine.poll("some-id").phase == Phase.UNKNOWN
    assert [(r.path, r.status) for r in fake.requests[1:]] == [
        (JOB, 401),
        ("/token", 200),
        (JOB, 200),
    ]
    assert (fake.refreshes, fake.logins) == (1, 1)


def test_replayed_upload_sends_the_whole_file_again(
    fake: FakeBlurIt, engine: BlurItEngine, image: Path
) -> None:
    """After a 401 on submit the multipart body is rebuilt: the upload arrives intact."""
    engine.check()
    fake.expire_all_tokens()
    engine.submit(image, Options())
    assert statuses(fake, JOB) == [401, 200]
    (upload,) = fake.uploads
    assert upload.sha256 == hashlib.sha256(image.read_bytes()).hexdigest()


def test_failed_refresh_falls_back_to_a_fresh_login(fake: FakeBlurIt, engine: BlurItEngine) -> None:
    """When /token refuses, the engine logs in again and the request still succeeds."""
    engine.check()
    fake.expire_all_tokens()
    fake.fail_next("token", 401)
    assert engine.poll("some-id").phase == Phase.UNKNOWN
    assert (fake.refreshes, fake.logins) == (0, 2)


def test_second_401_with_good_credentials_refuses_only_that_request(
    fake: FakeBlurIt, engine: BlurItEngine
) -> None:
    """A 401 to the renewed token is checked by a fresh login; when that works, the request is
    JobRefused (status 401, the API's words), it is not sent a third time, and the account
    stays usable."""
    engine.check()
    fake.fail_next("status", 401, count=2)
    with pytest.raises(JobRefused, match="poll failed: 401 Unauthorized") as caught:
        engine.poll("some-id")
    assert caught.value.status == 401
    assert [(r.path, r.status) for r in fake.requests[1:]] == [
        (JOB, 401),
        ("/token", 200),
        (JOB, 401),
        ("/login", 200),
    ]
    assert engine.describe()["auth"] == "ok"
    assert engine.poll("some-id").phase == Phase.UNKNOWN


def test_second_401_with_bad_credentials_is_an_auth_error(
    fake: FakeBlurIt, engine: BlurItEngine
) -> None:
    """A 401 to the renewed token, then a login refused with 401: AuthError, "bad credentials"."""
    engine.check()
    fake.fail_next("status", 401, count=2)
    fake.wrong_credentials = True
    with pytest.raises(AuthError, match="login refused: 401 Invalid credentials"):
        engine.poll("some-id")
    assert statuses(fake)[-1] == 401 and fake.requests[-1].path == "/login"
    assert engine.describe()["auth"] == "bad credentials"


@pytest.mark.parametrize("route", ["submit", "status", "result"])
def test_403_refuses_only_that_request(
    fake: FakeBlurIt, engine: BlurItEngine, image: Path, route: str
) -> None:
    """403 on submit, poll or result is JobRefused with the API's words and status 403: no
    renewal, no login, the account stays "ok" and the next request goes through."""
    job_id = engine.submit(image, Options())
    status = finished(engine, job_id)
    body = {"statusCode": 403, "error": "Forbidden", "message": "blocked by rule 7"}
    fake.fail_next(route, 403, body=body)
    calls: dict[str, Callable[[], Any]] = {
        "submit": lambda: engine.submit(image, Options()),
        "status": lambda: engine.poll(job_id),
        "result": lambda: engine.fetch(job_id, status, "media", io.BytesIO()),
    }
    with pytest.raises(JobRefused, match="failed: 403 blocked by rule 7") as caught:
        calls[route]()
    assert caught.value.status == 403
    assert (fake.logins, fake.refreshes) == (1, 0)
    assert engine.describe()["auth"] == "ok"
    calls[route]()


@pytest.mark.parametrize("route", ["login", "token"])
def test_403_at_login_or_refresh_means_bad_credentials(fake: FakeBlurIt, route: str) -> None:
    """403 from /login is AuthError; 403 from /token falls back to a login, whose 403 is too."""
    engine = make_engine(fake)
    if route == "token":
        engine.check()
        fake.expire_all_tokens()
    fake.fail_next(route, 403)
    fake.fail_next("login", 403)
    with pytest.raises(AuthError, match="403"):
        engine.poll("some-id")
    assert engine.describe()["auth"] == "bad credentials"


def test_threads_hitting_an_expired_token_share_one_refresh(
    fake: FakeBlurIt, engine: BlurItEngine
) -> None:
    """Eight threads get 401 together; exactly one refresh happens, all calls succeed."""
    engine.check()
    fake.expire_all_tokens()
    barrier = threading.Barrier(8)
    results: list[Phase] = []

    def worker() -> None:
        barrier.wait(timeout=5)
        results.append(engine.poll("some-id").phase)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert results == [Phase.UNKNOWN] * 8
    assert (fake.refreshes, fake.logins) == (1, 1)


def test_threads_past_the_refresh_time_share_one_proactive_refresh(fake: FakeBlurIt) -> None:
    """When the token is due, concurrent calls refresh it once, before sending anything."""
    clock = FakeClock()
    engine = make_engine(fake, clock=clock)
    engine.check()
    clock.now += 3500
    threads = [threading.Thread(target=engine.poll, args=("x",)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert (fake.refreshes, fake.logins) == (1, 1)
    assert 401 not in statuses(fake)


def test_wrong_credentials_raise_auth_error(fake: FakeBlurIt, image: Path) -> None:
    """A 401 at login is AuthError, shown as "bad credentials" in describe()."""
    engine = BlurItEngine(fake.url, "client_test", "wrong")
    with pytest.raises(AuthError, match="Invalid credentials"):
        engine.check()
    assert engine.describe()["auth"] == "bad credentials"
    with pytest.raises(AuthError):
        engine.submit(image, Options())
    assert fake.uploads == []


def test_429_is_transient_and_carries_retry_after(fake: FakeBlurIt, engine: BlurItEngine) -> None:
    """429 becomes TransientApiError with retry_after_s from the Retry-After header."""
    fake.fail_next("status", 429, retry_after=7)
    with pytest.raises(TransientApiError) as caught:
        engine.poll("some-id")
    assert caught.value.status == 429 and caught.value.retry_after_s == 7.0


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    """Retry-After is delta-seconds or an HTTP date; garbage gives None."""
    assert retry_after_s("12") == 12.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 120))
    assert 100 < (retry_after_s(future) or 0) <= 120
    assert retry_after_s("soon") is None and retry_after_s(None) is None


def test_server_errors_are_transient_even_without_json(
    fake: FakeBlurIt, engine: BlurItEngine
) -> None:
    """5xx is transient; a non-JSON gateway body falls back to status and reason."""
    fake.fail_next("status", 500)
    with pytest.raises(TransientApiError, match="500 Internal Server Error"):
        engine.poll("some-id")
    fake.fail_next("status", 502, body="<html>upstream down</html>")
    with pytest.raises(TransientApiError, match="502 Bad Gateway"):
        engine.poll("some-id")


def test_submit_read_timeout_is_possibly_submitted(fake: FakeBlurIt, image: Path) -> None:
    """A submit whose reply is later than the upload read timeout is PossiblySubmitted: the
    server got the whole body and does create the job."""
    engine = make_engine(fake, upload_read_timeout_s=0.3)
    engine.check()
    fake.delay_next("submit", 1.0)
    with pytest.raises(PossiblySubmitted, match="ReadTimeout"):
        engine.submit(image, Options())
    wait_for(lambda: fake.uploads, what="the late job to be created")


def test_submit_dropped_after_sending_is_possibly_submitted(
    fake: FakeBlurIt, engine: BlurItEngine, image: Path
) -> None:
    """A connection closed after the upload, without a reply, is PossiblySubmitted."""
    engine.check()
    fake.drop_next("submit")
    with pytest.raises(PossiblySubmitted, match="ConnectionError"):
        engine.submit(image, Options())
    assert statuses(fake, JOB) == [None]


@pytest.mark.parametrize("code", [502, 504])
def test_submit_gateway_errors_are_possibly_submitted(
    fake: FakeBlurIt, engine: BlurItEngine, image: Path, code: int
) -> None:
    """502 and 504 on submit are PossiblySubmitted (the gateway lost the answer, not the
    request), still transient, with their status and Retry-After."""
    fake.fail_next("submit", code, body="<html>gateway</html>", retry_after=3)
    with pytest.raises(PossiblySubmitted, match=f"{code}") as caught:
        engine.submit(image, Options())
    assert isinstance(caught.value, TransientApiError)
    assert (caught.value.status, caught.value.retry_after_s) == (code, 3.0)


@pytest.mark.parametrize("code", [500, 503, 429])
def test_submit_500_503_429_are_plain_transient(
    fake: FakeBlurIt, engine: BlurItEngine, image: Path, code: int
) -> None:
    """500, 503 and 429 on submit count as not sent: TransientApiError, not PossiblySubmitted."""
    fake.fail_next("submit", code)
    with pytest.raises(TransientApiError) as caught:
        engine.submit(image, Options())
    assert type(caught.value) is TransientApiError and caught.value.status == code


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (200, b"", "application/json"),
        (200, "<html><body>Welcome</body></html>", "text/html"),
        (200, b"not json", "application/json"),
        (200, b'["client_test-SRV_ANONYMIZATION-1"]', "application/json"),
        (200, {"anonymization_job_id": ""}, "application/json"),
        (200, {"anonymization_job_id": 42}, "application/json"),
        (201, {"id": "client_test-SRV_ANONYMIZATION-1"}, "application/json"),
        (204, b"", "application/json"),
    ],
)
def test_submit_2xx_without_a_usable_job_id_is_possibly_submitted(
    fake: FakeBlurIt,
    engine: BlurItEngine,
    image: Path,
    status: int,
    body: Any,
    content_type: str,
) -> None:
    """A 2xx submit reply that is empty, HTML, not a JSON object or has no usable id is
    PossiblySubmitted with the reply's status: never "not sent", never permanent."""
    fake.garble_next("submit", body, status=status, content_type=content_type)
    with pytest.raises(PossiblySubmitted, match="the job may exist") as caught:
        engine.submit(image, Options())
    assert caught.value.status == status
    assert len(fake.uploads) == 1  # the API did create the job


def test_submit_to_a_refused_connection_is_not_sent(image: Path) -> None:
    """A submit that cannot connect (nothing listening) is plain TransientApiError: not sent."""
    with FakeBlurIt() as fake:
        engine = make_engine(fake, connect_timeout_s=1)
        engine.check()
    with pytest.raises(TransientApiError, match="ConnectionError") as caught:
        engine.submit(image, Options())
    assert type(caught.value) is TransientApiError


def test_submit_connect_timeout_is_not_sent(fake: FakeBlurIt, image: Path) -> None:
    """A submit whose connect times out is plain TransientApiError, and nothing arrived."""
    engine = make_engine(fake, connect_timeout_s=0.3)
    engine.check()
    fake.stop_accepting()
    with pytest.raises(TransientApiError, match="ConnectTimeout") as caught:
        engine.submit(image, Options())
    assert type(caught.value) is TransientApiError
    assert fake.uploads == []


@pytest.mark.parametrize(
    "body", [b"", "<html>maintenance</html>", b"[]", b'"Succeeded"', b"{truncated"]
)
def test_poll_reply_that_is_not_a_json_object_is_bad_result(
    fake: FakeBlurIt, engine: BlurItEngine, body: Any
) -> None:
    """A 200 poll reply that is not a JSON object is BadResult, not a transient error."""
    fake.garble_next("status", body, content_type="text/html")
    with pytest.raises(BadResult, match="poll: the 200 reply is not a JSON object"):
        engine.poll("some-id")
    assert engine.poll("some-id").phase == Phase.UNKNOWN


def test_dropped_connection_is_transient(fake: FakeBlurIt, engine: BlurItEngine) -> None:
    """A connection closed without an answer is TransientApiError."""
    fake.drop_next("status")
    with pytest.raises(TransientApiError):
        engine.poll("some-id")
    assert engine.poll("some-id").phase == Phase.UNKNOWN


def test_read_timeout_is_transient(fake: FakeBlurIt) -> None:
    """A reply slower than read_timeout_s is TransientApiError, raised without waiting it out."""
    engine = make_engine(fake, read_timeout_s=0.2)
    engine.check()
    fake.delay_next("status", 3.0)
    started = time.monotonic()
    with pytest.raises(TransientApiError, match="ReadTimeout"):
        engine.poll("some-id")
    assert time.monotonic() - started < 2.0


def test_connection_refused_is_transient() -> None:
    """Nothing listening at the URL is TransientApiError (from the login)."""
    with FakeBlurIt() as fake:
        url = fake.url
    with pytest.raises(TransientApiError):
        BlurItEngine(url, "client_test", "secret_test", connect_timeout_s=1).check()


def test_payment_required_stops_submit_only(
    fake: FakeBlurIt, engine: BlurItEngine, image: Path
) -> None:
    """402 on submit is PaymentRequired; polling still works."""
    job_id = engine.submit(image, Options())
    fake.payment_required = True
    with pytest.raises(PaymentRequired):
        engine.submit(image, Options())
    assert engine.poll(job_id).phase == Phase.SUCCEEDED


def test_400_carries_the_api_message(engine: BlurItEngine, image: Path) -> None:
    """An area the API rejects is PermanentApiError with the API's (list) message."""
    options = Options(area=Area(left=1.5))
    with pytest.raises(PermanentApiError, match="400 included_area must be") as caught:
        engine.submit(image, options)
    assert caught.value.status == 400


def test_413_carries_the_api_message(fake: FakeBlurIt, engine: BlurItEngine, image: Path) -> None:
    """413 on submit is PermanentApiError with the API's message."""
    body = {"statusCode": 413, "error": "Payload Too Large", "message": "File is over 8 GB"}
    fake.fail_next("submit", 413, body=body)
    with pytest.raises(PermanentApiError, match="413 File is over 8 GB"):
        engine.submit(image, Options())


def test_unknown_job_is_phase_unknown(fake: FakeBlurIt, engine: BlurItEngine, image: Path) -> None:
    """ "Unknown job" (HTTP 200) maps to Phase.UNKNOWN, for forgotten and never-seen ids."""
    job_id = engine.submit(image, Options())
    fake.forget_job(job_id)
    assert engine.poll(job_id).phase == Phase.UNKNOWN
    odd = engine.poll("client_test-SRV_ANONYMIZATION-a b&c=d/é")
    assert odd == RemoteStatus(Phase.UNKNOWN, raw="Unknown job")


def test_failed_and_revoked_jobs_are_failed_with_a_reason(image: Path) -> None:
    """Failed carries the API's error; Revoked says it was revoked by the API."""
    with FakeBlurIt(job_seconds=60) as fake:
        engine = make_engine(fake)
        failed, revoked = (engine.submit(image, Options()) for _ in range(2))
        fake.fail_job(failed, "corrupt media")
        fake.revoke_job(revoked)
        assert engine.poll(failed) == RemoteStatus(
            Phase.FAILED, raw="Failed", error="corrupt media"
        )
        assert engine.poll(revoked).error == "revoked by the API"
        assert engine.poll(revoked).phase == Phase.FAILED


@pytest.mark.parametrize("word", ["Retried", "Sent", "Started", "Transcoding"])
def test_non_terminal_and_unseen_statuses_keep_pending(word: str, image: Path) -> None:
    """Sent/Started/Retried, and words never seen before, are PENDING with the raw word."""
    with FakeBlurIt(job_seconds=60, status_steps=(word,)) as fake:
        engine = make_engine(fake)
        status = engine.poll(engine.submit(image, Options()))
        assert status == RemoteStatus(Phase.PENDING, raw=word)


def test_truncated_download_is_transient_and_retriable(
    fake: FakeBlurIt, engine: BlurItEngine, image: Path
) -> None:
    """A body shorter than its Content-Length raises TransientApiError; the next try works."""
    job_id = engine.submit(image, Options())
    status = finished(engine, job_id)
    fake.truncate_next_download()
    total = len(blurred(image.read_bytes()))
    with pytest.raises(TransientApiError, match=f"truncated download: got \\d+ of {total} bytes"):
        engine.fetch(job_id, status, "media", io.BytesIO())
    out = io.BytesIO()
    assert engine.fetch(job_id, status, "media", out) == total


def test_result_gone_is_result_missing(engine: BlurItEngine) -> None:
    """A 404 on the result file raises ResultMissing (status 404), which is transient."""
    status = RemoteStatus(Phase.SUCCEEDED, media_name="0000-gone.jpg")
    with pytest.raises(ResultMissing) as caught:
        engine.fetch("x", status, "media", io.BytesIO())
    assert caught.value.status == 404 and isinstance(caught.value, TransientApiError)


def test_result_404_while_the_job_still_succeeded_is_result_missing(
    fake: FakeBlurIt, engine: BlurItEngine, image: Path
) -> None:
    """A 404 on a result whose job the API still calls Succeeded is ResultMissing; the poll
    still says Succeeded and the next fetch works."""
    job_id = engine.submit(image, Options())
    status = finished(engine, job_id)
    fake.fail_next("result", 404)
    with pytest.raises(ResultMissing):
        engine.fetch(job_id, status, "media", io.BytesIO())
    assert engine.poll(job_id).phase == Phase.SUCCEEDED
    out = io.BytesIO()
    engine.fetch(job_id, status, "media", out)
    assert out.getvalue() == blurred(image.read_bytes())


class SizeAwareSink(io.BytesIO):
    """A sink that wants the size before the bytes, as the worker's sinks do."""

    def __init__(self) -> None:
        super().__init__()
        self.announced: list[tuple[int, int]] = []  # (size, bytes written when told)

    def expect(self, size: int) -> None:
        self.announced.append((size, self.tell()))


def test_result_size_is_announced_before_the_first_byte(engine: BlurItEngine, image: Path) -> None:
    """With a Content-Length, fetch tells the sink the size once, before writing anything."""
    job_id = engine.submit(image, Options())
    status = finished(engine, job_id)
    sink = SizeAwareSink()
    total = engine.fetch(job_id, status, "media", sink)
    assert sink.announced == [(total, 0)]
    assert total == len(blurred(image.read_bytes()))


def test_result_without_content_length_is_fetched_unannounced(
    fake: FakeBlurIt, engine: BlurItEngine, image: Path
) -> None:
    """A 200 result without Content-Length (ended by closing) is fetched whole; no size is
    announced."""
    job_id = engine.submit(image, Options())
    status = finished(engine, job_id)
    fake.result_content_length = False
    sink = SizeAwareSink()
    assert engine.fetch(job_id, status, "media", sink) == len(blurred(image.read_bytes()))
    assert sink.getvalue() == blurred(image.read_bytes()) and sink.announced == []


@pytest.mark.parametrize("with_length", [True, False])
def test_empty_result_is_bad_result(
    fake: FakeBlurIt, engine: BlurItEngine, image: Path, with_length: bool
) -> None:
    """A 2xx result with an empty body (Content-Length 0 or none) is BadResult."""
    job_id = engine.submit(image, Options())
    status = finished(engine, job_id)
    fake.result_content_length = with_length
    fake.garble_next("result", b"", content_type="image/jpeg")
    with pytest.raises(BadResult, match="download: the 200 reply is empty"):
        engine.fetch(job_id, status, "media", io.BytesIO())


@pytest.mark.parametrize("name", ["", "..", ".", "a/b", None])
def test_unusable_result_names_are_refused_without_a_request(
    fake: FakeBlurIt, engine: BlurItEngine, name: str | None
) -> None:
    """Result names that are empty, dot-dot or contain a slash are PermanentApiError."""
    status = RemoteStatus(Phase.SUCCEEDED, media_name=name)
    with pytest.raises(PermanentApiError):
        engine.fetch("x", status, "media", io.BytesIO())
    assert fake.requests == []


def test_result_is_fetched_from_the_configured_url(fake: FakeBlurIt, image: Path) -> None:
    """Result URLs naming another host are fetched from the configured one: the bearer token
    never leaves for a host blurd was not configured with."""
    with FakeBlurIt() as other:
        other.result_url_base = fake.url  # the API points the result at another host
        engine = make_engine(other)
        job_id = engine.submit(image, Options())
        status = finished(engine, job_id)
        engine.fetch(job_id, status, "media", io.BytesIO())
    assert status.media_name and fake.url not in status.media_name
    assert fake.requests == []
    assert other.requests[-1].path == f"/innovation-service/result/{status.media_name}"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (Options(), {"blur_type": {"anonymization_type": "blur", "smooth_padding": 0}}),
        (
            Options(
                style="opaque",
                color="#ff0000",
                padding=3,
                faces=False,
                detections=False,
                area=Area(left=0.5, top=0.0, right=1.0, bottom=0.75),
            ),
            {
                "blur_type": {
                    "anonymization_type": "opaque",
                    "hex_color": "#ff0000",
                    "smooth_padding": 3,
                },
                "included_area": {"left": 0.5, "top": 0.0, "right": 1.0, "bottom": 0.75},
                "activation_faces_blur": False,
                "output_detections_url": False,
            },
        ),
        (
            Options(style="pixelate", pixels=16, plates=False),
            {
                "blur_type": {
                    "anonymization_type": "pixelate",
                    "num_pixels": 16,
                    "smooth_padding": 0,
                },
                "activation_plates_blur": False,
            },
        ),
    ],
)
def test_options_arrive_parsed_exactly_as_configured(
    fake: FakeBlurIt,
    engine: BlurItEngine,
    image: Path,
    options: Options,
    expected: dict[str, Any],
) -> None:
    """Booleans as "true"/"false", JSON-string nested fields, no area when it is the full frame."""
    engine.submit(image, options)
    (upload,) = fake.uploads
    parsed = {
        "activation_faces_blur": True,
        "activation_plates_blur": True,
        "output_detections_url": True,
    } | expected
    assert upload.options == parsed
    assert upload.fields["activation_faces_blur"] in ("true", "false")
    assert ("included_area" in upload.fields) == (not options.area.is_full())


def test_one_mebibyte_upload_arrives_byte_identical(
    fake: FakeBlurIt, engine: BlurItEngine, tmp_path: Path
) -> None:
    """A 1 MiB file arrives unchanged, with its name and MIME type, and comes back blurred."""
    path = tmp_path / "clip.mp4"
    data = os.urandom(1024 * 1024)
    path.write_bytes(data)
    job_id = engine.submit(path, Options(detections=False))
    (upload,) = fake.uploads
    assert (upload.filename, upload.content_type) == ("media.mp4", "video/mp4")
    assert (upload.size, upload.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    out = io.BytesIO()
    engine.fetch(job_id, finished(engine, job_id), "media", out)
    assert out.getvalue() == blurred(data, ".mp4")


def test_unknown_extension_is_sent_as_octet_stream(
    fake: FakeBlurIt, engine: BlurItEngine, tmp_path: Path
) -> None:
    """A name mimetypes cannot place gets application/octet-stream."""
    path = tmp_path / "scan.blurdunknown"
    path.write_bytes(b"data")
    engine.submit(path, Options())
    assert fake.uploads[0].content_type == "application/octet-stream"


def test_unreadable_file_is_rejected_input(engine: BlurItEngine, tmp_path: Path) -> None:
    """A file that vanished before upload is RejectedInput, not an API error."""
    with pytest.raises(RejectedInput, match=r"gone\.jpg"):
        engine.submit(tmp_path / "gone.jpg", Options())


def test_secrets_never_appear_in_errors_logs_or_repr(fake: FakeBlurIt, image: Path) -> None:
    """No access token, refresh token or secret in exception text, log events or repr."""
    errors: list[BaseException] = []
    engine = make_engine(fake, read_timeout_s=0.3)
    with capture_logs() as logs:
        engine.check()
        job_id = engine.submit(image, Options())
        fake.expire_all_tokens()
        fake.fail_next("token", 401)
        status = engine.poll(job_id)
        fake.fail_next("status", 429)
        fake.fail_next("status", 500)
        fake.fail_next("status", 401, count=2)
        fake.drop_next("status")
        fake.delay_next("status", 2.0)
        fake.fail_next("submit", 413)
        attempts: list[Callable[[], Any]] = [lambda: engine.poll(job_id)] * 5
        attempts += [lambda: engine.submit(image, Options())]
        fake.truncate_next_download()
        attempts += [lambda: engine.fetch(job_id, status, "media", io.BytesIO())]
        for attempt in attempts:
            with pytest.raises(ApiError) as caught:
                attempt()
            errors.append(caught.value)
        with pytest.raises(AuthError) as wrong:
            BlurItEngine(fake.url, "client_test", "not-the-secret").check()
        errors.append(wrong.value)
    assert [type(e).__name__ for e in errors] == [
        "TransientApiError",
        "TransientApiError",
        "JobRefused",
        "TransientApiError",
        "TransientApiError",
        "PermanentApiError",
        "TransientApiError",
        "AuthError",
    ]
    tokens = {r.authorization.split()[1] for r in fake.requests if r.authorization}
    assert len(tokens) >= 3
    texts = [str(e) + repr(e) + str(e.__cause__) + repr(e.__cause__) for e in errors]
    texts += [repr(event) for event in logs]
    texts += [repr(engine), repr(engine.describe())]
    for secret in [*tokens, "secret_test", "not-the-secret"]:
        assert not any(secret in text for text in texts)
    assert {e["event"] for e in logs} >= {"auth.login", "auth.failed"}


def test_proxy_settings_come_from_the_environment_at_start(
    fake: FakeBlurIt, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment is read once, when the engine starts: a proxy variable set then is
    used (here a closed port, so the login fails), and NO_PROXY for the API host bypasses it;
    a change after the start is not seen."""
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    proxied = BlurItEngine(fake.url, fake.client_id, fake.secret_id, connect_timeout_s=2)
    with pytest.raises(TransientApiError):
        proxied.check()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = BlurItEngine(fake.url, fake.client_id, fake.secret_id)
    monkeypatch.delenv("NO_PROXY")
    direct.check()  # NO_PROXY was read at its start and still holds
    with pytest.raises(TransientApiError):
        proxied.check()


def test_tokens_padded_with_whitespace_are_stripped(image: Path) -> None:
    """Whitespace around the token and refresh token of a login/refresh reply is dropped: the
    bearer header carries the bare token, and the refresh token still refreshes."""
    with FakeBlurIt() as fake:
        fake.token_padding = (" ", "\r\n")
        engine = make_engine(fake)
        engine.check()
        assert engine.poll("some-id").phase == Phase.UNKNOWN
        fake.expire_all_tokens()
        assert engine.poll("some-id").phase == Phase.UNKNOWN
        assert (fake.logins, fake.refreshes) == (1, 1)
        sent = [r.authorization for r in fake.requests if r.path == JOB]
        assert all(a and a.startswith("Bearer ") and a == a.strip() for a in sent)
        assert statuses(fake, JOB) == [200, 401, 200]


SECRET = "SECRETTOKEN"


@pytest.mark.parametrize(
    "reply",
    [
        {"token": SECRET + "\nrest"},  # a newline inside survives the strip
        {"token": SECRET + "\x00tail"},
        {"token": SECRET + "\u00e9"},
        {"token": SECRET + " tail"},
        {"token": " \t\n"},
        {"token": 12345},
        {"token": "goodtoken", "refreshToken": SECRET + "\x7f"},
    ],
)
def test_unusable_login_token_is_refused_without_leaking_it(
    fake: FakeBlurIt, reply: dict[str, Any]
) -> None:
    """A login reply whose token (or refresh token) is empty or holds a byte a header cannot
    carry is TransientApiError("... unusable token"), not AuthError; the token is in no
    exception text, no exception in the chain and no log event."""
    engine = make_engine(fake)
    fake.garble_next("login", {**reply, "expireTime": 3600})
    with capture_logs() as logs, pytest.raises(TransientApiError) as caught:
        engine.poll("some-id")
    assert type(caught.value) is TransientApiError
    assert str(caught.value) == "BlurIt login: the reply carries an unusable token"
    everything = "".join(traceback.format_exception(caught.value))
    chained = [caught.value.__cause__, caught.value.__context__]
    everything += repr(chained) + repr(logs) + repr(engine) + repr(engine.describe())
    assert SECRET not in everything
    assert statuses(fake, JOB) == []  # nothing was sent with it
    assert engine.poll("some-id").phase == Phase.UNKNOWN  # the next login is fine


def test_unusable_refreshed_token_falls_back_to_login_without_leaking_it(
    fake: FakeBlurIt, engine: BlurItEngine
) -> None:
    """A refresh reply with an unusable token is logged (without the token) as a failed
    refresh; a fresh login takes over and the request succeeds."""
    engine.check()
    fake.expire_all_tokens()
    fake.garble_next("token", {"token": SECRET + "\x01", "refreshToken": "r", "expireTime": 60})
    with capture_logs() as logs:
        assert engine.poll("some-id").phase == Phase.UNKNOWN
    assert (fake.logins, fake.refreshes) == (2, 1)
    failed = [e for e in logs if e["event"] == "auth.failed"]
    assert failed and "token refresh: the reply carries an unusable token" in failed[0]["error"]
    assert SECRET not in repr(logs)

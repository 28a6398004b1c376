"""The BlurIt emulator's own behaviour, driven with plain ``requests``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import wait_for
from tests.fakeblurit import FakeBlurIt, result_bytes, result_head

JOB = "/innovation-service/anonymization"
CREDS = {"clientId": "client_test", "secretId": "secret_test"}


def login(fake: FakeBlurIt) -> dict[str, Any]:
    response = requests.post(f"{fake.url}/login", json=CREDS, timeout=5)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(fake: FakeBlurIt, token: str, data: dict[str, str], media: bytes = b"jpeg") -> Any:
    files = {"input_media": ("photo.jpg", media, "image/jpeg")}
    return requests.post(fake.url + JOB, headers=bearer(token), data=data, files=files, timeout=10)


def status(fake: FakeBlurIt, token: str, job_id: str) -> dict[str, Any]:
    params = {"anonymization_job_id": job_id}
    response = requests.get(fake.url + JOB, headers=bearer(token), params=params, timeout=5)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt() as server:
        yield server


@pytest.mark.parametrize("field", ["expireTime", "expiresIn", None])
def test_login_reports_lifetime_under_the_configured_field(field: str | None) -> None:
    """/login answers token, refreshToken and the lifetime under expireTime, expiresIn or none."""
    with FakeBlurIt(expiry_field=field, token_lifetime_s=120) as fake:
        body = login(fake)
    expected = {"token", "refreshToken"} | ({field} if field else set())
    assert set(body) == expected
    if field:
        assert body[field] == 120
    assert fake.logins == 1


def test_wrong_credentials_get_a_nestjs_401(fake: FakeBlurIt) -> None:
    """Bad credentials (or the wrong_credentials switch) give 401 "Invalid credentials"."""
    response = requests.post(f"{fake.url}/login", json={**CREDS, "secretId": "nope"}, timeout=5)
    assert response.status_code == 401
    assert response.json() == {
        "statusCode": 401, "error": "Unauthorized", "message": "Invalid credentials",
    }
    fake.wrong_credentials = True
    assert requests.post(f"{fake.url}/login", json=CREDS, timeout=5).status_code == 401


def test_access_tokens_expire_server_side() -> None:
    """A token works until its lifetime is over, then every authed route answers 401."""
    with FakeBlurIt(token_lifetime_s=0.3) as fake:
        token = login(fake)["token"]
        assert status(fake, token, "x")["status"] == "Unknown job"
        wait_for(lambda: requests.get(fake.url + JOB, headers=bearer(token), timeout=5,
                                        params={"anonymization_job_id": "x"}).status_code == 401)
        assert fake.requests[-1].status == 401


def test_refresh_accepts_an_expired_bearer_and_rotates_the_refresh_token(
    fake: FakeBlurIt,
) -> None:
    """/token takes the old (even expired) bearer; each refresh token works exactly once."""
    first = login(fake)
    fake.expire_all_tokens()
    refresh = {"refreshToken": first["refreshToken"]}
    response = requests.post(f"{fake.url}/token", json=refresh,
                             headers=bearer(first["token"]), timeout=5)
    assert response.status_code == 200
    second = response.json()
    assert second["token"] != first["token"] and second["refreshToken"] != first["refreshToken"]
    assert status(fake, second["token"], "x")["status"] == "Unknown job"
    again = requests.post(f"{fake.url}/token", json=refresh,
                          headers=bearer(first["token"]), timeout=5)
    assert again.status_code == 401
    unknown = requests.post(f"{fake.url}/token", json={"refreshToken": second["refreshToken"]},
                            headers=bearer("forged"), timeout=5)
    assert unknown.status_code == 401
    assert fake.refreshes == 1


def test_both_nested_encodings_parse_alike(fake: FakeBlurIt) -> None:
    """included_area/blur_type as a JSON string or as bracket keys give the same options."""
    token = login(fake)["token"]
    area = {"left": 0.5, "top": 0, "right": 1, "bottom": 1}
    blur = {"anonymization_type": "pixelate", "num_pixels": 10, "smooth_padding": 2}
    as_json = {"included_area": json.dumps(area), "blur_type": json.dumps(blur),
               "activation_faces_blur": "True", "activation_plates_blur": "false"}
    as_brackets = {f"included_area[{k}]": str(v) for k, v in area.items()}
    as_brackets |= {f"blur_type[{k}]": str(v) for k, v in blur.items()}
    as_brackets |= {"activation_faces_blur": "true", "activation_plates_blur": "FALSE"}
    for data in (as_json, as_brackets):
        assert submit(fake, token, data).status_code == 200
    first, second = fake.uploads
    assert first.options == second.options == {
        "activation_faces_blur": True, "activation_plates_blur": False,
        "included_area": area, "blur_type": blur,
    }


def test_empty_or_null_nested_fields_are_absent(fake: FakeBlurIt) -> None:
    """included_area "" or "null" (seen in old clients) means no area at all."""
    token = login(fake)["token"]
    for value in ("", "null"):
        assert submit(fake, token, {"included_area": value}).status_code == 200
    assert [u.options for u in fake.uploads] == [{}, {}]


@pytest.mark.parametrize(
    "data",
    [
        {"included_area": "BAD_AREA"},
        {"included_area": '{"left": 2, "top": 0, "right": 1, "bottom": 1}'},
        {"included_area[left]": "0"},
        {"blur_type": '{"anonymization_type": "swirl"}'},
        {"activation_faces_blur": "yes"},
    ],
)
def test_invalid_fields_get_a_nestjs_400(fake: FakeBlurIt, data: dict[str, str]) -> None:
    """Malformed options get 400 with statusCode, error and a list of messages."""
    response = submit(fake, login(fake)["token"], data)
    assert response.status_code == 400
    body = response.json()
    assert body["statusCode"] == 400 and body["error"] == "Bad Request"
    assert isinstance(body["message"], list)
    assert fake.uploads == []


def test_missing_media_is_refused(fake: FakeBlurIt) -> None:
    """A job without an input_media file part is a 400."""
    token = login(fake)["token"]
    response = requests.post(fake.url + JOB, headers=bearer(token),
                             files={"activation_faces_blur": (None, "true")}, timeout=5)
    assert response.status_code == 400


def test_job_runs_through_its_steps_and_serves_verifiable_results() -> None:
    """Statuses follow status_steps, then Succeeded with absolute result URLs; bytes check out."""
    with FakeBlurIt(job_seconds=0.4, status_steps=("Sent", "Retried"),
                    result_extension=".jpeg") as fake:
        token = login(fake)["token"]
        media = os.urandom(3000) + b"\r\n--" + os.urandom(3000)
        job_id = submit(fake, token, {"output_detections_url": "true"}, media).json()[
            "anonymization_job_id"]
        assert job_id.startswith("client_test-SRV_ANONYMIZATION-")
        seen: list[dict[str, Any]] = []

        def succeeded() -> dict[str, Any] | None:
            seen.append(status(fake, token, job_id))
            return seen[-1] if seen[-1]["status"] == "Succeeded" else None

        done = wait_for(succeeded)
        assert done is not None
        words = [s["status"] for s in seen]
        assert words[0] == "Sent" and "Succeeded" not in words[:-1]
        assert set(words) <= {"Sent", "Retried", "Succeeded"}
        assert done["output_media"].startswith(f"{fake.url}/innovation-service/result/")
        assert done["output_media"].endswith(".jpeg") and done["output_json"].endswith(".json")
        got = requests.get(done["output_media"], headers=bearer(token), timeout=5)
        digest = hashlib.sha256(media).hexdigest()
        assert got.content == result_bytes(media, ".jpeg")
        doc = requests.get(done["output_json"], headers=bearer(token), timeout=5).json()
        assert doc["input_sha256"] == digest and doc["filename"] == "photo.jpg"
        assert fake.upload_count(digest) == 1


def test_results_are_404_until_success_and_jobs_can_be_failed_revoked_forgotten() -> None:
    """fail_job/revoke_job/forget_job change the status; unknown result names are 404."""
    with FakeBlurIt(job_seconds=60) as fake:
        token = login(fake)["token"]
        ids = [submit(fake, token, {}).json()["anonymization_job_id"] for _ in range(3)]
        assert status(fake, token, ids[0])["status"] == "Sent"
        fake.fail_job(ids[0], "corrupt media")
        fake.revoke_job(ids[1])
        fake.forget_job(ids[2])
        assert status(fake, token, ids[0]) == {"status": "Failed", "error": "corrupt media"}
        assert status(fake, token, ids[1]) == {"status": "Revoked"}
        assert status(fake, token, ids[2]) == {"status": "Unknown job"}
        missing = requests.get(f"{fake.url}/innovation-service/result/nope.jpg",
                               headers=bearer(token), timeout=5)
        assert missing.status_code == 404


def test_faults_fire_as_many_times_as_asked(fake: FakeBlurIt) -> None:
    """fail_next (with Retry-After), drop_next and delay_next are consumed one by one."""
    token = login(fake)["token"]
    fake.fail_next("status", 429, count=2, retry_after=7)
    for _ in range(2):
        response = requests.get(fake.url + JOB, headers=bearer(token), timeout=5,
                                params={"anonymization_job_id": "x"})
        assert response.status_code == 429 and response.headers["Retry-After"] == "7"
        assert response.json()["statusCode"] == 429
    assert status(fake, token, "x")["status"] == "Unknown job"
    fake.drop_next("status")
    with pytest.raises(requests.ConnectionError):
        status(fake, token, "x")
    fake.delay_next("status", 2.0)
    with pytest.raises(requests.Timeout):
        requests.get(fake.url + JOB, headers=bearer(token), timeout=(5, 0.2),
                     params={"anonymization_job_id": "x"})
    fake.payment_required = True
    assert submit(fake, token, {}).status_code == 402
    assert status(fake, token, "x")["status"] == "Unknown job"
    # the delayed request is recorded only when its late answer goes out
    assert [r.status for r in fake.requests[1:7]] == [429, 429, 200, None, 402, 200]


def test_truncated_download_announces_more_than_it_sends(fake: FakeBlurIt) -> None:
    """truncate_next_download sends a short body under the full Content-Length, once."""
    token = login(fake)["token"]
    job_id = submit(fake, token, {}, b"x" * 10000).json()["anonymization_job_id"]
    url = status(fake, token, job_id)["output_media"]
    fake.truncate_next_download()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url, headers=bearer(token), timeout=5)
    assert len(requests.get(url, headers=bearer(token), timeout=5).content) > 10000


def test_large_upload_is_parsed_in_chunks() -> None:
    """A multi-chunk upload with boundary-like bytes inside arrives intact."""
    with FakeBlurIt() as fake:
        token = login(fake)["token"]
        media = (os.urandom(65536 * 3 - 3) + b"\r\n--\r\n") * 8
        job_id = submit(fake, token, {"activation_faces_blur": "false"}, media).json()[
            "anonymization_job_id"]
        (upload,) = fake.uploads
        assert upload.size == len(media)
        assert upload.sha256 == hashlib.sha256(media).hexdigest()
        url = status(fake, token, job_id)["output_media"]
        got = requests.get(url, headers=bearer(token), timeout=10).content
        assert got == result_bytes(media, ".jpeg")


def test_garbled_replies_serve_the_request_but_mangle_the_answer(fake: FakeBlurIt) -> None:
    """garble_next runs the route as usual (the login counts, the job exists) but answers
    with the given status, body and content type, once."""
    fake.garble_next("login", {"token": "x\n"})
    response = requests.post(f"{fake.url}/login", json=CREDS, timeout=5)
    assert (response.status_code, response.json()) == (200, {"token": "x\n"})
    assert fake.logins == 1
    token = login(fake)["token"]
    fake.garble_next("submit", "<html>hi</html>", status=201, content_type="text/html")
    response = submit(fake, token, {})
    assert (response.status_code, response.text) == (201, "<html>hi</html>")
    assert response.headers["Content-Type"] == "text/html"
    assert len(fake.uploads) == 1
    assert submit(fake, token, {}).json()["anonymization_job_id"]
    url = status(fake, token, fake.uploads[0].job_id)["output_media"]
    fake.garble_next("result", b"")
    assert requests.get(url, headers=bearer(token), timeout=5).content == b""
    clean = requests.get(url, headers=bearer(token), timeout=5).content
    assert clean.startswith(result_head(fake.uploads[0].sha256, ".jpeg"))


def test_token_padding_surrounds_tokens_but_the_server_keeps_them_bare(fake: FakeBlurIt) -> None:
    """token_padding wraps both tokens in replies; the bare token is what authorizes."""
    fake.token_padding = (" ", "\n")
    body = login(fake)
    assert body["token"].startswith(" ") and body["token"].endswith("\n")
    assert body["refreshToken"].startswith(" ") and body["refreshToken"].endswith("\n")
    assert status(fake, body["token"].strip(), "x")["status"] == "Unknown job"


def test_results_can_come_without_content_length(fake: FakeBlurIt) -> None:
    """With result_content_length off, results carry no Content-Length and end at close."""
    token = login(fake)["token"]
    reply = submit(fake, token, {"output_detections_url": "true"}, b"abc")
    job_id = reply.json()["anonymization_job_id"]
    fake.result_content_length = False
    done = status(fake, token, job_id)
    for url in (done["output_media"], done["output_json"]):
        got = requests.get(url, headers=bearer(token), timeout=5)
        assert got.status_code == 200 and "Content-Length" not in got.headers
        assert got.content
    assert got.json()["filename"] == "photo.jpg"


def test_stop_accepting_makes_connects_time_out(fake: FakeBlurIt) -> None:
    """After stop_accepting, a new connection cannot even be made: the connect times out."""
    login(fake)
    fake.stop_accepting()
    with pytest.raises(requests.ConnectTimeout):
        requests.post(f"{fake.url}/login", json=CREDS, timeout=(0.3, 5))

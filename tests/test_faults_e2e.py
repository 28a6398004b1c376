"""End to end under faults: the real daemon in a thread against the BlurIt test server (and a
real PostgreSQL), each scenario a mix of DESIGN.md sections 2 and 6 that no row test covers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from blurd import defaults
from blurd.models import Job, JobState
from tests.conftest import wait_for
from tests.fakeblurit import RESULT_PREFIX, FakeBlurIt, _Handler, _Refusal
from tests.harness import Daemon, anonymized

S = JobState
SUBMIT = "/innovation-service/anonymization"
WAF_PAGE = (
    "<html><head><title>403 Forbidden</title></head><body><center><h1>403 Forbidden</h1>"
    "</center><hr><center>Request blocked by the web application firewall</center></body></html>"
)
HTML_ERROR = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    "<body><h1>Bad Gateway</h1><p>The upstream server failed.</p></body></html>"
)


class _BodyCount:
    """Wraps a handler's output stream: the first write is the status line and headers, the
    rest is the body, counted."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.head: bytes | None = None
        self.body = 0

    def write(self, data: bytes) -> int:
        if self.head is None:
            self.head = bytes(data)
        else:
            self.body += len(data)
        return int(self.raw.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


@dataclasses.dataclass(frozen=True)
class MediaDownload:
    name: str
    complete: bool  # the whole announced body was sent
    time: float  # time.monotonic() when it ended


class Fake(FakeBlurIt):
    """The test server, plus: submits of chosen contents refused (``refuse``), a share of result
    downloads cut short (``truncate_rate``), and a record of each media download's end."""

    def __init__(self, *, truncate_rate: float = 0.0, seed: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        self.refuse: dict[bytes, tuple[int, str]] = {}  # content -> (status, body)
        self.truncate_rate = truncate_rate
        self._rng = random.Random(seed)
        self.media_downloads: list[MediaDownload] = []

    def __enter__(self) -> Fake:
        self.start()
        return self

    def _submit(self, h: _Handler, spool: Path) -> dict[str, str]:
        body = spool.read_bytes()
        for content, (status, text) in self.refuse.items():
            if content in body:
                raise _Refusal(status, raw=text)
        return super()._submit(h, spool)

    def _result(self, h: _Handler, name: str) -> None:
        with self._lock:
            if self._rng.random() < self.truncate_rate:
                self._truncations += 1
        raw, counter = h.wfile, _BodyCount(h.wfile)
        h.wfile = counter  # type: ignore[assignment]
        try:
            super()._result(h, name)
        finally:
            h.wfile = raw
            head = counter.head or b""
            length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
            if head.startswith(b"HTTP/1.1 200") and not name.endswith(".json"):
                complete = length is not None and counter.body == int(length.group(1))
                with self._lock:
                    self.media_downloads.append(MediaDownload(name, complete, time.monotonic()))


@pytest.fixture
def fake() -> Iterator[Fake]:
    with Fake(token_lifetime_s=60, job_seconds=0.2) as f:
        yield f


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drop(folder: Path, name: str, size: int = 3000) -> bytes:
    data = os.urandom(size)
    (folder / name).write_bytes(data)
    return data


def submits(fake: FakeBlurIt) -> list[int | None]:
    return [r.status for r in fake.requests if r.method == "POST" and r.path == SUBMIT]


def media_outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".json")


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(defaults.TEMP_PREFIX)]


def done(d: Daemon, n: int, timeout: float = 20) -> None:
    wait_for(lambda: d.counts()[S.DONE] == n, timeout=timeout, what=f"{n} job(s) done")


def test_402_probe_survives_drop_429_503_then_resumes(tmp_path: Path, fake: Fake) -> None:
    """A 402 pauses uploads; the probes that follow meet a dropped connection, a 429 and a 503
    (each ending without an answer about credit, so the gate re-arms and probes again), then
    the credit is back: all 6 files end `done` with one output each, and each content was
    accepted by the API exactly once."""
    fake.fail_next("submit", 402)
    fake.drop_next("submit")
    fake.fail_next("submit", 429)
    fake.fail_next("submit", 503)
    # One upload at a time, so the faults above meet the first upload and then the probes.
    with Daemon(tmp_path, fake, daemon_keys={"max_uploads": 1}) as d:
        files = {f"p{i}.jpg": drop(d.inbox, f"p{i}.jpg") for i in range(6)}
        done(d, 6)
        rows = d.jobs()
    assert submits(fake)[:5] == [402, None, 429, 503, 200]
    assert submits(fake)[5:] == [200] * 5
    assert all(j.state is S.DONE for j in rows.values()), rows
    for name, data in files.items():
        assert (d.outbox / name).read_bytes() == anonymized(data)
        assert fake.upload_count(sha(data)) == 1, name
    assert [p.name for p in media_outputs(d.outbox)] == sorted(files)
    # The pause held: each probe came a probe interval after the one before it.
    times = [r.time for r in fake.requests if r.path == SUBMIT][:5]
    assert all(b - a >= 0.4 for a, b in itertools.pairwise(times)), times


@pytest.mark.slow
def test_postgresql_outage_while_files_arrive(tmp_path: Path, fake: Fake) -> None:
    """The PostgreSQL server goes away for a few seconds while files keep arriving, then comes
    back on the same port and data folder: the daemon (one thread, never restarted) processes
    every file soon after, and says so once: one `database.unavailable`, then `database.back`."""
    from tests.pgserver import PostgresServer

    with PostgresServer() as pg, capture_logs() as logs:
        d = Daemon(tmp_path, fake, database=pg.new_database())
        with d:

            def alive_and(cond: bool) -> bool:
                assert d.thread.is_alive() and not d.result, "the daemon stopped"
                return cond

            before = {f"before{i}.jpg": drop(d.inbox, f"before{i}.jpg") for i in range(3)}
            done(d, 3)
            pg.halt()
            down_at = time.monotonic()
            during = {f"during{i}.jpg": drop(d.inbox, f"during{i}.jpg") for i in range(3)}
            wait_for(lambda: alive_and(any(e["event"] == "database.unavailable" for e in logs)),
                     timeout=10, what="database.unavailable")  # fmt: skip
            during |= {f"later{i}.jpg": drop(d.inbox, f"later{i}.jpg") for i in range(3)}
            # Down for at least 6 s (the watcher settles and retries meanwhile).
            wait_for(lambda: alive_and(time.monotonic() - down_at >= 6), timeout=10,
                     what="six seconds of outage")  # fmt: skip
            assert d.thread.is_alive()
            pg.resume()
            wait_for(lambda: alive_and(d.counts()[S.DONE] == 9), timeout=60, what="9 jobs done")
            wait_for(lambda: any(e["event"] == "database.back" for e in logs), timeout=5,
                     what="database.back")  # fmt: skip
            assert d.thread.is_alive() and not d.result
            rows = d.jobs()
    events = Counter(str(e["event"]) for e in logs)
    outage = [(e["event"], e.get("log_level")) for e in logs
              if e["event"] in ("database.unavailable", "database.back")]  # fmt: skip
    assert events["database.unavailable"] == 1, outage
    assert events["database.back"] >= 1
    assert d.result == [0]
    for name, data in (before | during).items():
        assert rows[name].state is S.DONE, rows[name]
        assert (d.outbox / name).read_bytes() == anonymized(data)
        assert fake.upload_count(sha(data)) == 1, name


def test_chaos_and_truncated_downloads_give_exact_outputs(tmp_path: Path) -> None:
    """15 % of submits, polls and downloads fail (5xx, 429, dropped connections) and 30 % of
    result downloads are cut short: all 40 outputs are byte-exact, and no media is fetched
    again once it was placed (one complete download per job, nothing after it)."""
    with Fake(token_lifetime_s=60, job_seconds=0.2, truncate_rate=0.3, seed=3) as fake:
        fake.chaos(0.15, seed=7)
        with Daemon(tmp_path, fake, daemon_keys={"max_in_flight": 16}) as d:
            files = {f"c{i:02d}.jpg": drop(d.inbox, f"c{i:02d}.jpg", 2000 + i) for i in range(40)}
            done(d, 40, timeout=28)
            rows = d.jobs()
        downloads = list(fake.media_downloads)
        requests = list(fake.requests)
        truncated = sum(not m.complete for m in downloads)
        assert fake.chaos_faults > 0 and truncated > 0, (fake.chaos_faults, truncated)
        for name, data in files.items():
            assert (d.outbox / name).read_bytes() == anonymized(data), name
            assert fake.upload_count(sha(data)) == 1, name
        assert [p.name for p in media_outputs(d.outbox)] == sorted(files)
        assert not temp_files(d.outbox)
        assert all(j.state is S.DONE for j in rows.values())
        complete = Counter(m.name for m in downloads if m.complete)
        assert len(complete) == 40
        assert max(complete.values()) == 1, [n for n, k in complete.items() if k > 1]
        for m in downloads:
            if m.complete:
                later = [r for r in requests
                         if r.path == RESULT_PREFIX + m.name and r.time > m.time]  # fmt: skip
                assert not later, f"{m.name} fetched again after it was placed"


def test_403_on_one_submit_does_not_hold_up_the_others(tmp_path: Path, fake: Fake) -> None:
    """One file's upload is refused with a 403 and a WAF page, every time: the 12 others all
    end `done` while that one still backs off; after REFUSED_MAX_ATTEMPTS refusals it is
    `failed` with the 403 in its reason, and nothing paused the credentials."""
    d = Daemon(tmp_path, fake)
    # Backoff slow enough (0.8 s, 1.6 s, 2 s) that the refused job is still retrying when the
    # others are done.
    d.timing = dataclasses.replace(d.timing, backoff_base_s=0.8, backoff_cap_s=2.0)
    with d:
        refused = os.urandom(3000)
        fake.refuse[refused] = (403, WAF_PAGE)
        (d.inbox / "blocked.jpg").write_bytes(refused)
        files = {f"ok{i:02d}.jpg": drop(d.inbox, f"ok{i:02d}.jpg") for i in range(12)}
        wait_for(lambda: sum(j.state is S.DONE for j in d.jobs().values()) == 12,
                 timeout=20, what="the 12 others done")  # fmt: skip
        blocked = d.job("blocked.jpg")
        assert blocked.state in (S.QUEUED, S.UPLOADING), blocked
        assert submits(fake).count(403) < defaults.REFUSED_MAX_ATTEMPTS
        wait_for(lambda: d.job("blocked.jpg").state is S.FAILED, timeout=15, what="failed")
        blocked = d.job("blocked.jpg")
    assert submits(fake).count(403) == defaults.REFUSED_MAX_ATTEMPTS
    assert "403" in (blocked.error or ""), blocked.error
    assert fake.upload_count(sha(refused)) == 0
    assert fake.logins == 1, "a 403 on a submit is no reason to log in again"
    for name, data in files.items():
        assert (d.outbox / name).read_bytes() == anonymized(data)
    assert not (d.outbox / "blocked.jpg").exists()


def test_html_result_is_never_placed_and_fails_after_bound(tmp_path: Path, fake: Fake) -> None:
    """A 200 result whose body is an HTML error page is never placed (no output, no temp file)
    and, with `originals = "delete"`, the original stays; after BAD_RESULT_MAX_ATTEMPTS such
    bodies the job is `failed` naming HTML; a later file then goes through cleanly."""
    fake.garble_next("result", HTML_ERROR, content_type="text/html; charset=utf-8",
                     count=defaults.BAD_RESULT_MAX_ATTEMPTS)  # fmt: skip
    with Daemon(tmp_path, fake, originals="delete") as d:
        bad = drop(d.inbox, "bad.jpg")
        wait_for(lambda: d.counts()[S.FAILED] == 1, timeout=20, what="bad.jpg failed")
        job = d.job("bad.jpg")
        assert (d.inbox / "bad.jpg").read_bytes() == bad
        assert not list(d.outbox.rglob("bad*")), "an HTML page was placed"
        assert not temp_files(d.outbox)
        good = drop(d.inbox, "good.jpg")
        wait_for(lambda: (j := d.jobs().get("good.jpg")) is not None and j.state is S.DONE,
                 timeout=15, what="good.jpg done")  # fmt: skip
    assert job.state is S.FAILED and "HTML" in (job.error or ""), job.error
    results = [r for r in fake.requests if r.path.startswith(RESULT_PREFIX)]
    assert [r.status for r in results[: defaults.BAD_RESULT_MAX_ATTEMPTS]] == [200] * 5
    assert len(fake.uploads) == 2
    assert (d.outbox / "good.jpg").read_bytes() == anonymized(good)
    assert not (d.inbox / "good.jpg").exists(), "originals = 'delete' applies to a clean run"
    assert (d.inbox / "bad.jpg").read_bytes() == bad
    assert [p.name for p in media_outputs(d.outbox)] == ["good.jpg"]
    assert not temp_files(d.outbox)


def test_identical_content_in_flight_is_uploaded_once(tmp_path: Path) -> None:
    """The same bytes dropped as two files at once, and a third copy renamed in while the first
    is at the API: the content is uploaded once, and all three jobs end `done` with identical
    outputs."""
    with Fake(token_lifetime_s=60, job_seconds=2.0) as fake:
        with Daemon(tmp_path, fake) as d:
            data = os.urandom(4000)
            (tmp_path / "x.jpg").write_bytes(data)
            (tmp_path / "y.jpg").write_bytes(data)
            os.rename(tmp_path / "x.jpg", d.inbox / "a.jpg")
            os.rename(tmp_path / "y.jpg", d.inbox / "b.jpg")
            wait_for(lambda: fake.uploads, timeout=10, what="the first upload")

            def at_api() -> list[Job]:
                return [j for j in d.jobs().values() if j.state is S.PROCESSING]

            first = wait_for(at_api, timeout=5, what="a job at the API")
            (tmp_path / "z.jpg").write_bytes(data)
            os.rename(tmp_path / "z.jpg", d.inbox / "c.jpg")
            assert [j.state for j in at_api()] == [S.PROCESSING], "the first left the API early"
            done(d, 3, timeout=20)
            rows = d.jobs()
        assert fake.upload_count(sha(data)) == 1
        assert len(fake.uploads) == 1
    assert first[0].rel_path in ("a.jpg", "b.jpg")
    assert {n: j.state for n, j in rows.items()} == {n: S.DONE for n in ("a.jpg", "b.jpg", "c.jpg")}
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        assert (d.outbox / name).read_bytes() == anonymized(data), name


def test_watch_removed_by_sighup_fails_its_queued_jobs(tmp_path: Path, fake: Fake) -> None:
    """A watch removed by a config reload (SIGHUP): its jobs, retrying (503) in the queue, end
    `failed` with "no longer configured" instead of retrying forever, and a `--once` run then
    finds its queue empty and ends by itself (code 0)."""
    d = Daemon(tmp_path, fake)
    kept = d.config.watches[0]
    gone = dataclasses.replace(kept, path=tmp_path / "in2", output=tmp_path / "out2")
    gone.path.mkdir()
    d.config = dataclasses.replace(d.config, watches=(kept, gone))
    d.reload_config = lambda: dataclasses.replace(d.config, watches=(kept,))
    d.once = True
    stuck = {f"s{i}.jpg": drop(gone.path, f"s{i}.jpg") for i in range(3)}
    for data in stuck.values():
        fake.refuse[data] = (503, "Service Unavailable")
    files = {f"k{i}.jpg": drop(d.inbox, f"k{i}.jpg") for i in range(2)}
    with d:

        def retrying() -> bool:
            rows = [j for j in d.all_jobs() if j.watch == gone.name]
            return len(rows) == 3 and all(j.attempts >= 2 for j in rows)

        wait_for(retrying, timeout=15, what="the removed watch's jobs retrying")
        done(d, 2)
        assert d.thread.is_alive(), "a --once run ended with jobs still queued"
        d.signals.reload.set()
        wait_for(lambda: not d.thread.is_alive(), timeout=15, what="the --once run to end")
        rows = d.all_jobs()
    assert d.result == [0]
    gone_rows = [j for j in rows if j.watch == gone.name]
    assert len(gone_rows) == 3
    for j in gone_rows:
        assert j.state is S.FAILED, j
        assert "no longer configured" in (j.error or ""), j.error
    for name, data in files.items():
        assert (d.outbox / name).read_bytes() == anonymized(data)
    assert not list(gone.output.rglob("*.jpg"))

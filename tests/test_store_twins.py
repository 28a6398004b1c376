"""One upload per content: an upload claim holds back a job whose twin (identical content and
options) is in flight or done, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import threading
from collections import Counter

from sqlalchemy import select, update

from blurd.models import JobState, jobs
from blurd.store import Store
from tests.conftest import FakeClock

S = JobState
SHA = "a" * 64


def _hashed(store: Store, rel: str, sha: str = SHA, fp: str = "f") -> int:
    """A queued job whose hash is recorded: waiting for an upload claim."""
    job = store.enqueue("w", rel, 1, 1)
    assert job is not None
    assert store.record_hash(job, sha, fp) == (True, None)
    return job


def _uploaded(store: Store, rel: str, to: JobState) -> int:
    """A hashed job claimed for its upload and moved on to ``to``."""
    job = _hashed(store, rel)
    assert [j.id for j in store.claim(store.clock(), 1, prepared=True)] == [job]
    if to is not S.UPLOADING:
        assert store.transition(job, S.UPLOADING, S.PROCESSING, remote_id=f"r-{rel}")
    if to is S.DOWNLOADING:
        assert store.transition(job, S.PROCESSING, S.DOWNLOADING)
    return job


def test_of_two_twins_in_one_claim_only_the_first_is_uploaded(
    db_url: str, clock: FakeClock
) -> None:
    """Two hashed twins claimed together: the lower id comes back uploading; the other goes back
    to the queue, free, for twin_wait_s, saying whom it waits for. Other content is unaffected."""
    store = Store(db_url, node="a", clock=clock, twin_wait_s=7.0)
    try:
        first, second = _hashed(store, "1.jpg"), _hashed(store, "2.jpg")
        other = _hashed(store, "3.jpg", sha="b" * 64)
        assert [j.id for j in store.claim(clock(), 5, prepared=True)] == [first, other]
        row = store.get(second)
        assert row is not None and row.state is S.QUEUED
        assert (row.node, row.lease_until, row.next_attempt_at) == (None, None, clock() + 7.0)
        assert row.error == f"waiting for job {first}, which has identical content"
        assert row.sha256 == SHA and row.fingerprint == "f"
        assert store.claim(clock(), 5, prepared=True) == []
    finally:
        store.close()


def test_a_twin_in_flight_makes_a_job_wait_until_it_ends(db_url: str, clock: FakeClock) -> None:
    """A job whose twin is uploading, processing or downloading is not uploaded, claim after
    claim, and is due again twin_wait_s later each time; once the twin failed, it is uploaded."""
    store = Store(db_url, node="a", clock=clock, twin_wait_s=5.0)
    try:
        busy = _uploaded(store, "busy.jpg", S.UPLOADING)
        job = _hashed(store, "job.jpg")
        for state in (S.UPLOADING, S.PROCESSING, S.DOWNLOADING):
            if state is not S.UPLOADING:
                assert store.transition(busy, S.PROCESSING if state is S.DOWNLOADING
                                        else S.UPLOADING, state)  # fmt: skip
            assert store.claim(clock(), 5, prepared=True) == []
            row = store.get(job)
            assert row is not None and row.state is S.QUEUED and row.node is None
            assert row.error == f"waiting for job {busy}, which has identical content"
            assert store.next_queued_at(clock(), prepared=True) == clock() + 5.0
            clock.advance(5.0)
        assert store.transition(busy, S.DOWNLOADING, S.FAILED, error="gone")
        assert [j.id for j in store.claim(clock(), 5, prepared=True)] == [job]
    finally:
        store.close()


def test_a_done_twin_sends_the_job_back_to_its_hash_and_its_result_is_reused(
    db_url: str, clock: FakeClock
) -> None:
    """A claimed job with a done twin (with a result) goes back to the queue unhashed and due
    now, so that the hash step runs again; record_hash then finds that twin. A done twin
    without a result does not hold a job back."""
    store = Store(db_url, node="a", clock=clock)
    try:
        done = _uploaded(store, "done.jpg", S.DOWNLOADING)
        job = _hashed(store, "job.jpg")  # hashed while its twin was still in flight
        assert store.transition(done, S.DOWNLOADING, S.DONE, output_media="/out/done.jpg")
        assert store.claim(clock(), 5, prepared=True) == []
        row = store.get(job)
        assert row is not None and row.state is S.QUEUED and row.node is None
        assert (row.sha256, row.fingerprint, row.next_attempt_at) == (None, None, clock())
        assert [j.id for j in store.claim(clock(), 5, prepared=False)] == [job]
        recorded, earlier = store.record_hash(job, SHA, "f")
        assert not recorded and earlier is not None and earlier.id == done

        with store.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == done).values(output_media=None))
        assert store.update(job, S.QUEUED, sha256=SHA, fingerprint="f", node=None)
        assert [j.id for j in store.claim(clock(), 5, prepared=True)] == [job]
    finally:
        store.close()


def test_concurrent_upload_claims_never_upload_two_twins_at_once(db_url: str) -> None:
    """Two nodes claiming uploads at the same moment, round after round, from a queue of twins:
    at no point are two jobs of one content uploading, each content is uploaded once, and no
    claim takes more than its limit. (On PostgreSQL each claim would otherwise miss the
    other's, uncommitted.)"""
    clock = FakeClock()
    a, b = (Store(db_url, node=n, clock=clock, twin_wait_s=0.0) for n in ("a", "b"))
    contents = [c * 64 for c in "abcdef"]
    for i in range(3):
        for sha in contents:
            _hashed(a, f"{sha[0]}{i}.jpg", sha=sha)
    start = threading.Barrier(2)
    got: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def claim(store: Store) -> None:
        try:
            start.wait(timeout=30)
            got[store.node] = [str(j.sha256) for j in store.claim(clock(), 4, prepared=True)]
        except BaseException as exc:  # reported below, with the test's own failure
            errors.append(exc)

    uploading = select(jobs.c.sha256).where(jobs.c.state == S.UPLOADING.value)
    reset = update(jobs).values(state=S.QUEUED.value, node=None, lease_until=None, error=None,
                                next_attempt_at=0.0)  # fmt: skip
    try:
        for _round in range(300):
            threads = [threading.Thread(target=claim, args=(s,)) for s in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert not errors, errors
            with a.engine.begin() as conn:
                in_flight = Counter(r.sha256 for r in conn.execute(uploading))
                conn.execute(reset)
            assert max(in_flight.values()) == 1, in_flight
            assert max(len(got["a"]), len(got["b"])) <= 4, got
            assert set(in_flight) == set(contents), "a content was held back for nothing"
            assert sorted(got["a"] + got["b"]) == sorted(in_flight)
    finally:
        a.close()
        b.close()

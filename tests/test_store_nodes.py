"""Several nodes on one jobs table: claims, leases, take-over and shared enqueues, on SQLite
and on a real PostgreSQL server."""

from __future__ import annotations

import threading

from blurd.models import JobState
from blurd.store import Store
from tests.conftest import FakeClock

S = JobState


def _store(url: str, node: str, clock: FakeClock, lease_s: float = 10.0) -> Store:
    return Store(url, node=node, lease_s=lease_s, clock=clock)


def test_a_claimed_job_is_held_until_released(db_url: str, clock: FakeClock) -> None:
    """A queued job claimed by one node is not claimable by another until released; a lapsed
    hold is claimable again."""
    a, b = _store(db_url, "a", clock), _store(db_url, "b", clock)
    try:
        job = a.enqueue("w", "x.jpg", 1, 1)
        assert [j.id for j in a.claim(clock(), 5, prepared=False)] == [job]
        assert b.claim(clock(), 5, prepared=False) == []
        assert a.release(job)
        assert [j.id for j in b.claim(clock(), 5, prepared=False)] == [job]
        clock.advance(11)  # b's hold lapses without renewal
        assert [j.id for j in a.claim(clock(), 5, prepared=False)] == [job]
        row = a.get(job)
        assert row is not None and row.node == "a" and row.lease_until == clock() + 10
    finally:
        a.close()
        b.close()


def test_concurrent_claims_hand_out_each_job_once(db_url: str) -> None:
    """Four nodes claiming in a tight loop from threads: every job is claimed exactly once, and
    no claim takes more than its limit."""
    first = Store(db_url, node="n0")
    for i in range(300):
        first.enqueue("w", f"{i}.jpg", 1, 1)
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    stores = [first] + [Store(db_url, node=f"n{i}") for i in range(1, 4)]
    start = threading.Barrier(len(stores))  # all open first: a claim takes well under 1 ms

    def node(store: Store) -> None:
        mine = got.setdefault(store.node, [])
        try:
            start.wait(timeout=30)
            while batch := store.claim(store.clock(), 7, prepared=False):
                assert len(batch) <= 7, f"a claim of 7 took {len(batch)}"
                mine.extend(j.id for j in batch)
        except BaseException as exc:  # reported below, with the test's own failure
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(store,)) for store in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for store in stores:
        store.close()
    assert not errors, errors
    claimed = [i for ids in got.values() for i in ids]
    assert len(claimed) == 300 and len(set(claimed)) == 300
    assert sum(1 for ids in got.values() if ids) >= 2, "one node took everything: no contention"


def _at_engine(store: Store, rel: str, state: JobState = S.PROCESSING) -> int:
    job = store.enqueue("w", rel, 1, 1)
    assert job is not None and store.claim(store.clock(), 1, prepared=False)
    store.transition(job, S.QUEUED, S.UPLOADING)
    if state is not S.UPLOADING:
        store.transition(job, S.UPLOADING, S.PROCESSING, remote_id=f"r-{rel}")
    if state is S.DOWNLOADING:
        store.transition(job, S.PROCESSING, S.DOWNLOADING)
    return job


def test_a_lapsed_node_s_jobs_are_taken_over_from_their_state(
    db_url: str, clock: FakeClock
) -> None:
    """After a's lease runs out, b adopts a's processing job with its remote id (polled, not
    uploaded again) and sends a's interrupted upload back to the queue; a renewing lease keeps
    b away, and a can no longer move a job b took."""
    a, b = _store(db_url, "a", clock), _store(db_url, "b", clock)
    try:
        polled = _at_engine(a, "p.jpg")
        uploading = _at_engine(a, "u.jpg", S.UPLOADING)
        clock.advance(8)
        a.renew_leases(clock())
        clock.advance(8)  # 16 s after the claim, 8 s after the renewal: still a's
        assert not any(b.take_over(clock(), keeps_remote_jobs=True).values())
        clock.advance(3)
        adopted = b.take_over(clock(), keeps_remote_jobs=True)
        assert adopted["resumed_processing"] == 1 and adopted["requeued_uploads"] == 1
        row = b.get(polled)
        assert row is not None and row.state is S.PROCESSING and row.remote_id == "r-p.jpg"
        assert row.node == "b" and row.next_attempt_at == 0.0
        back = b.get(uploading)
        assert back is not None and back.state is S.QUEUED and back.node is None
        assert not a.update(polled, S.PROCESSING, progress="late"), "a moved b's job"
        assert b.update(polled, S.PROCESSING, progress="mine")
    finally:
        a.close()
        b.close()


def test_a_node_that_stops_cleanly_hands_its_jobs_over_at_once(
    db_url: str, clock: FakeClock
) -> None:
    """release_all (a clean stop) lets go of a's queued jobs and ends the lease of its job at
    the engine: b adopts that one at its next look, not a lease later."""
    a, b = _store(db_url, "a", clock), _store(db_url, "b", clock)
    try:
        polled = _at_engine(a, "p.jpg")
        waiting = a.enqueue("w", "q.jpg", 1, 1)
        assert waiting is not None and a.claim(clock(), 1, prepared=False)
        assert not any(b.take_over(clock(), keeps_remote_jobs=True).values())
        assert a.release_all() == 1
        clock.advance(0.1)
        assert b.take_over(clock(), keeps_remote_jobs=True)["resumed_processing"] == 1
        row = b.get(polled)
        assert row is not None and row.node == "b" and row.remote_id == "r-p.jpg"
        free = b.get(waiting)
        assert free is not None and free.node is None and free.state is S.QUEUED
    finally:
        a.close()
        b.close()


def test_a_forgetful_engine_s_jobs_are_requeued_on_take_over(
    db_url: str, clock: FakeClock
) -> None:
    """With an engine whose jobs live in the dead node (the local engine), a lapsed job at the
    engine goes back to the queue without its remote id."""
    a, b = _store(db_url, "a", clock), _store(db_url, "b", clock)
    try:
        job = _at_engine(a, "d.jpg", S.DOWNLOADING)
        clock.advance(11)
        assert b.take_over(clock(), keeps_remote_jobs=False)["requeued_orphans"] == 1
        row = b.get(job)
        assert row is not None and row.state is S.QUEUED and row.remote_id is None
        assert row.node is None and row.requeues == 0
    finally:
        a.close()
        b.close()


def test_recovery_at_start_up_touches_only_this_node_s_jobs(
    db_url: str, clock: FakeClock
) -> None:
    """A restarting node resumes its own jobs at once and leaves another live node's alone."""
    a, b = _store(db_url, "a", clock), _store(db_url, "b", clock)
    try:
        mine = _at_engine(a, "a.jpg", S.UPLOADING)
        theirs = _at_engine(b, "b.jpg", S.UPLOADING)
        held = a.enqueue("w", "held.jpg", 1, 1)
        a.claim(clock(), 5, prepared=False)
        a.close()
        a = _store(db_url, "a", clock)
        assert a.recover()["requeued_uploads"] == 1
        assert (row := a.get(mine)) is not None and row.state is S.QUEUED
        assert (row := a.get(theirs)) is not None and row.state is S.UPLOADING
        assert (row := a.get(held)) is not None and row.node is None
    finally:
        a.close()
        b.close()


def test_watchers_on_two_nodes_queue_each_version_once(db_url: str, clock: FakeClock) -> None:
    """enqueue_many from two nodes that saw the same files: each version is one job, and each
    node is told only about the rows it added."""
    a, b = _store(db_url, "a", clock), _store(db_url, "b", clock)
    try:
        first = a.enqueue_many("w", [("x.jpg", 1, 1), ("y.jpg", 1, 1)], batch=1)
        second = b.enqueue_many("w", [("y.jpg", 1, 1), ("z.jpg", 1, 1), ("x.jpg", 1, 2)])
        assert [rel for _id, rel in first] == ["x.jpg", "y.jpg"]
        assert sorted(rel for _id, rel in second) == ["x.jpg", "z.jpg"]
        assert a.counts()[S.QUEUED] == 4
    finally:
        a.close()
        b.close()

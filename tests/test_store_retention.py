"""Retention: old finished jobs are deleted in short batches, except the newest done job of
each content with a result, which a new identical job reuses; on SQLite and PostgreSQL."""

from __future__ import annotations

from itertools import pairwise

import pytest

from blurd.models import JobState
from blurd.store import Store
from tests.conftest import FakeClock

S = JobState


def _finished(
    store: Store, rel: str, state: JobState, sha: str | None = None, output: str | None = None
) -> int:
    """A job that ends ``state`` now (by the store's clock), with this content and result."""
    job = store.enqueue("w", rel, 1, 1)
    assert job is not None
    if sha is not None:
        assert store.update(job, S.QUEUED, sha256=sha, fingerprint="f")
    if state is S.FAILED:
        assert store.transition(job, S.QUEUED, S.FAILED, error="bad")
        return job
    path = (S.QUEUED, S.UPLOADING, S.PROCESSING, S.DOWNLOADING, S.DONE)
    for old, new in pairwise(path):
        fields = {"output_media": output} if new is S.DONE else {}
        assert store.transition(job, old, new, **fields)
    return job


def test_old_finished_jobs_go_and_what_reuse_needs_stays(db_url: str, clock: FakeClock) -> None:
    """prune deletes done and failed jobs older than the cut (a done job with a newer done twin
    with a result, one without a result, a failed one) and keeps active and young jobs and the
    newest done job with a result of each content, which record_hash still finds."""
    store = Store(db_url, node="a", clock=clock)
    try:
        gone = {
            _finished(store, "failed.jpg", S.FAILED),
            _finished(store, "a1.jpg", S.DONE, "a" * 64, "/out/a1.jpg"),
            _finished(store, "b.jpg", S.DONE, "b" * 64),
        }
        clock.advance(1)
        a2 = _finished(store, "a2.jpg", S.DONE, "a" * 64, "/out/a2.jpg")
        c = _finished(store, "c.jpg", S.DONE, "c" * 64, "/out/c.jpg")
        waiting = store.enqueue("w", "queued.jpg", 1, 1)
        clock.advance(100)
        young = {
            _finished(store, "young.jpg", S.FAILED),
            _finished(store, "c-nores.jpg", S.DONE, "c" * 64),
        }
        assert store.prune(clock(), older_than_s=50, batch=2) == len(gone) == 3
        left = {j.id for j in store.list_jobs()}
        assert left == {a2, c, waiting, *young} and not left & gone
        for sha, twin in (("a" * 64, a2), ("c" * 64, c)):
            job = store.enqueue("w", f"new-{sha[0]}.jpg", 1, 1)
            assert job is not None
            recorded, earlier = store.record_hash(job, sha, "f")
            assert not recorded and earlier is not None and earlier.id == twin
        clock.advance(1000)
        assert store.prune(clock(), older_than_s=50) == len(young)
        assert {j.id for j in store.list_jobs(S.DONE)} == {a2, c}
    finally:
        store.close()


def test_pages_of_kept_jobs_do_not_stop_the_prune(db_url: str, clock: FakeClock) -> None:
    """With kept jobs older than deletable ones, filling whole batches, prune goes on past them
    and deletes every deletable job; a batch below 1 is refused."""
    store = Store(db_url, node="a", clock=clock)
    try:
        kept = set()
        for i in range(5):
            kept.add(_finished(store, f"k{i}.jpg", S.DONE, f"{i}" * 64, f"/out/k{i}.jpg"))
            clock.advance(1)
        for i in range(3):
            _finished(store, f"d{i}.jpg", S.DONE, "d" * 64)
            clock.advance(1)
        clock.advance(100)
        with pytest.raises(ValueError):
            store.prune(clock(), older_than_s=50, batch=0)
        assert store.prune(clock(), older_than_s=50, batch=2) == 3
        assert {j.id for j in store.list_jobs()} == kept
    finally:
        store.close()

"""The worker's scheduler: what a wait costs, and jobs held in memory."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from blurd.models import JobState
from blurd.store import Store
from tests.conftest import wait_for
from tests.fakeblurit import FakeBlurIt
from tests.harness import Daemon

S = JobState


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt(job_seconds=60) as f:
        yield f


class StatementCounter:
    """Counts the SQL statements run by this process's threads, except the test's own."""

    def __init__(self) -> None:
        self.count = 0
        self.mine = threading.get_ident()

    def __call__(self, *_args: Any) -> None:
        if threading.get_ident() != self.mine:
            self.count += 1


def test_a_backlog_waiting_for_room_costs_almost_no_queries(
    tmp_path: Path, fake: FakeBlurIt
) -> None:
    """With max_in_flight jobs at the API and the rest hashed and waiting, the scheduler sleeps
    until a poll is due instead of asking the database again and again (it used to find the
    waiting jobs due and look 50 times a second, six queries each)."""
    with Daemon(tmp_path, fake, daemon_keys={"max_in_flight": 2}) as d:
        for i in range(12):
            (d.inbox / f"f{i}.jpg").write_bytes(os.urandom(2000 + i))

        def backlog() -> bool:
            jobs = d.all_jobs()
            hashed = [j for j in jobs if j.state is S.QUEUED and j.sha256]
            return len(hashed) == 10 and sum(j.state is S.PROCESSING for j in jobs) == 2

        wait_for(backlog, timeout=30, what="2 jobs at the API and 10 waiting")
        counter = StatementCounter()
        event.listen(Engine, "before_cursor_execute", counter)
        try:
            time.sleep(3.0)  # the quantity under test is what happens during this window
        finally:
            event.remove(Engine, "before_cursor_execute", counter)
    # Polls of the two jobs (the test timing polls every 0.1-0.3 s) and the status row are
    # all that should run: about 2 jobs x 2 statements x 4 polls a second (40-44 in 3 s here).
    # Claiming on every tick although nothing was claimable gave 120-125.
    assert counter.count < 3.0 * 25, f"{counter.count} statements in 3 s while waiting"


def test_a_job_queued_by_another_process_is_claimed_within_a_queue_look(tmp_path: Path) -> None:
    """A job made claimable behind the daemon's back (`blurd retry`, another node's watcher)
    sends it no wake-up: its scheduler, which asks the queue only on news, still looks again
    within `queue_look_s`."""
    with FakeBlurIt(job_seconds=0) as fake:
        fake.fail_next("submit", 400, body={"statusCode": 400, "message": "invalid parameters"})
        d = Daemon(tmp_path, fake)
        d.timing = dataclasses.replace(d.timing, queue_look_s=1.0, idle_wait_max_s=5.0)
        with d:
            (d.inbox / "a.jpg").write_bytes(os.urandom(3000))
            wait_for(lambda: d.counts()[S.FAILED] == 1, timeout=20, what="the refused upload")
            time.sleep(1.5)  # the scheduler is idle now, with nothing left to claim
            store = Store(d.db)
            try:
                assert store.retry() == 1
            finally:
                store.close()
            wait_for(lambda: d.counts()[S.DONE] == 1, timeout=3.0, what="the retried job done")
    assert len(fake.uploads) == 1  # the accepted one; the refused one left no job


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_pool_thread_that_dies_is_replaced_and_the_work_goes_on(tmp_path: Path) -> None:
    """A step that kills its thread (a BaseException no step handler catches) does not leave
    the pool short: the scheduler replaces the thread, logs it, and the next files are done."""
    import structlog

    from blurd.worker import steps

    original = steps.Steps.prepare
    killed: list[int] = []

    def prepare_once_fatal(self: steps.Steps, job: Any) -> Any:
        if not killed:
            killed.append(job.id)
            raise SystemExit("a thread-killing bug")
        return original(self, job)

    with FakeBlurIt(job_seconds=0) as fake, structlog.testing.capture_logs() as logs:
        steps.Steps.prepare = prepare_once_fatal  # type: ignore[method-assign]
        try:
            with Daemon(tmp_path, fake, daemon_keys={"max_uploads": 1}) as d:
                for i in range(6):
                    (d.inbox / f"f{i}.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(3000))
                wait_for(lambda: d.counts()[S.DONE] == 5, timeout=30, what="five done")
        finally:
            steps.Steps.prepare = original  # type: ignore[method-assign]
    assert [e for e in logs if e["event"] == "worker.thread_replaced"]


def test_a_scheduler_that_stops_looping_is_not_alive() -> None:
    """systemd's watchdog is fed only while the work moves: a scheduler whose last loop is
    older than a minute reports itself not alive, one that just looped reports alive."""
    from blurd.worker import Worker

    now = [0.0]
    worker = Worker(None, None, [], monotonic=lambda: now[0])  # type: ignore[arg-type]
    assert worker.alive()
    now[0] = 61.0
    assert not worker.alive()
    worker.heartbeat = now[0]
    assert worker.alive()

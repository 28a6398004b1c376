"""Leases and recovery: what this node holds, for how long, and who resumes a job whose holder
stopped (DESIGN.md §2: recovery at start-up; scale-out: take-over of a lapsed node's jobs)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.sql.elements import ColumnElement

from blurd.models import ACTIVE_STATES, JobState, jobs
from blurd.store.database import Database

_AT_ENGINE = [JobState.PROCESSING.value, JobState.DOWNLOADING.value]
_ACTIVE = [s.value for s in ACTIVE_STATES]


class Leases(Database):
    def release(self, job_id: int) -> bool:
        """Let go of a queued job this node held for a step that left it queued."""
        stmt = (
            update(jobs)
            .where(
                jobs.c.id == job_id,
                jobs.c.state == JobState.QUEUED.value,
                jobs.c.node == self.node,
            )
            .values(node=None, lease_until=None)
        )
        with self._tx() as conn:
            return conn.execute(stmt).rowcount == 1

    def release_all(self) -> int:
        """At a clean stop: queued jobs this node held go back to everyone, and the leases of
        its other jobs end now, so that another node sharing the queue adopts them at once
        instead of a lease later. (Restarted under the same id, this node takes back whatever
        is still its own at start-up.) Returns how many queued jobs it let go."""
        queued = (
            update(jobs)
            .where(jobs.c.state == JobState.QUEUED.value, jobs.c.node == self.node)
            .values(node=None, lease_until=None)
        )
        held = (
            update(jobs)
            .where(jobs.c.node == self.node, jobs.c.state.in_(_ACTIVE))
            .values(lease_until=self.clock())
        )
        with self._tx() as conn:
            released = int(conn.execute(queued).rowcount)
            conn.execute(held)
        return released

    def renew_leases(self, now: float) -> int:
        """Extend the lease of every active job this node holds; returns how many it holds."""
        stmt = (
            update(jobs)
            .where(jobs.c.node == self.node, jobs.c.state.in_(_ACTIVE))
            .values(lease_until=now + self.lease_s)
        )
        with self._tx() as conn:
            return int(conn.execute(stmt).rowcount)

    def take_over(self, now: float, *, keeps_remote_jobs: bool) -> dict[str, int]:
        """Adopt the active jobs of nodes whose lease ran out, resuming each from its state.

        A job at the engine is polled (or downloaded) again by its remote id, never uploaded
        again; with an engine whose jobs live only in the node that ran them
        (``keeps_remote_jobs`` False) it goes back to the queue instead. An interrupted upload
        goes back to the queue: the dead node may or may not have sent it. Queued jobs need no
        adoption: a lapsed hold is claimable as it is.
        """
        lapsed = (jobs.c.node.is_not(None), jobs.c.node != self.node, jobs.c.lease_until < now)
        return self._adopt(lapsed, now, keeps_remote_jobs)

    def recover(self, *, keeps_remote_jobs: bool = True) -> dict[str, int]:
        """At start-up: this node's jobs (and those held by no node) resume from their state.

        Interrupted uploads go back to the queue; ``processing`` jobs are polled again by their
        stored remote id and ``downloading`` jobs download again, so nothing is uploaded twice.
        With an engine that forgets its jobs on a restart they go back to the queue as if never
        sent (their requeue budget is for jobs an API lost).
        """
        now = self.clock()
        mine = (or_(jobs.c.node == self.node, jobs.c.node.is_(None)),)
        counts = self._adopt(mine, now, keeps_remote_jobs)
        with self._tx() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.state == JobState.QUEUED.value, jobs.c.node == self.node)
                .values(node=None, lease_until=None)
            )
        return counts

    def _adopt(
        self, which: tuple[ColumnElement[bool], ...], now: float, keeps_remote_jobs: bool
    ) -> dict[str, int]:
        requeue: dict[str, Any] = dict(state=JobState.QUEUED.value, node=None, lease_until=None,
                                       next_attempt_at=0.0, updated_at=now)  # fmt: skip
        with self._tx() as conn:
            uploads = conn.execute(
                update(jobs).where(jobs.c.state == JobState.UPLOADING.value, *which).values(requeue)
            ).rowcount
            if keeps_remote_jobs:
                resumed = conn.execute(
                    update(jobs)
                    .where(jobs.c.state.in_(_AT_ENGINE), *which)
                    .values(node=self.node, lease_until=now + self.lease_s, next_attempt_at=0.0)
                    .returning(jobs.c.state)
                ).all()
                orphans = 0
            else:
                resumed = []
                orphans = conn.execute(
                    update(jobs)
                    .where(jobs.c.state.in_(_AT_ENGINE), *which)
                    .values(**requeue, remote_id=None, progress=None)
                ).rowcount
        return {
            "requeued_uploads": int(uploads),
            "resumed_processing": sum(r.state == JobState.PROCESSING.value for r in resumed),
            "resumed_downloads": sum(r.state == JobState.DOWNLOADING.value for r in resumed),
            "requeued_orphans": int(orphans),
        }

"""Reading the jobs table: single jobs, and the figures behind `blurd status` and the metrics."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import bindparam, func, select

from blurd.models import ACTIVE_STATES, IN_FLIGHT_STATES, Job, JobState, jobs
from blurd.store.database import Database, padded_ids


class Status(Database):
    def get(self, job_id: int) -> Job | None:
        with self._tx() as conn:
            _count, names, values = self._execute(conn, _GET_ONE, {"k_id": job_id})
        return Job.from_values(names, values[0]) if values else None

    def get_many(self, ids: Iterable[int]) -> list[Job]:
        """These jobs (those that still exist), in one query."""
        wanted = list(ids)
        if not wanted:
            return []
        with self._tx() as conn:
            return [Job.from_row(r) for r in conn.execute(_GET_MANY, {"k_ids": padded_ids(wanted)})]

    def held_at_engine(self) -> dict[int, float]:
        """The jobs at the engine that this node holds: id -> when their next step is due."""
        at_engine = [JobState.PROCESSING.value, JobState.DOWNLOADING.value]
        stmt = select(jobs.c.id, jobs.c.next_attempt_at).where(
            jobs.c.node == self.node, jobs.c.state.in_(at_engine)
        )
        with self._tx() as conn:
            return {int(r.id): float(r.next_attempt_at) for r in conn.execute(stmt)}

    def known_versions(self, watch: str) -> set[tuple[str, int, int]]:
        """Every (rel_path, size, mtime_ns) recorded for this watch."""
        stmt = select(jobs.c.rel_path, jobs.c.size, jobs.c.mtime_ns).where(jobs.c.watch == watch)
        with self._tx() as conn:
            return {(r[0], int(r[1]), int(r[2])) for r in conn.execute(stmt)}

    def counts(self) -> dict[JobState, int]:
        stmt = select(jobs.c.state, func.count()).group_by(jobs.c.state)
        result = dict.fromkeys(JobState, 0)
        with self._tx() as conn:
            for state, n in conn.execute(stmt):
                result[JobState(state)] = int(n)
        return result

    def in_flight(self) -> int:
        return self.count_in(*IN_FLIGHT_STATES)

    def count_in(self, *states: JobState) -> int:
        """Jobs in any of these states (an index lookup, unlike counts(), which reads all)."""
        stmt = select(func.count()).where(jobs.c.state.in_([s.value for s in states]))
        with self._tx() as conn:
            return int(conn.execute(stmt).scalar() or 0)

    def active(self) -> int:
        return self.count_in(*ACTIVE_STATES)

    def list_jobs(self, state: JobState | None = None, limit: int = 50) -> list[Job]:
        stmt = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if state is not None:
            stmt = stmt.where(jobs.c.state == state.value)
        with self._tx() as conn:
            return [Job.from_row(r) for r in conn.execute(stmt)]

    def oldest_waiting(self) -> Job | None:
        stmt = (
            select(jobs)
            .where(jobs.c.state.in_([s.value for s in ACTIVE_STATES]))
            .order_by(jobs.c.created_at, jobs.c.id)
            .limit(1)
        )
        with self._tx() as conn:
            row = conn.execute(stmt).first()
        return Job.from_row(row) if row else None

    def last_error(self) -> Job | None:
        stmt = (
            select(jobs)
            .where(jobs.c.error.is_not(None))
            .order_by(jobs.c.updated_at.desc())
            .limit(1)
        )
        with self._tx() as conn:
            row = conn.execute(stmt).first()
        return Job.from_row(row) if row else None

    def bytes_uploaded_since(self, since: float) -> int:
        stmt = select(func.coalesce(func.sum(jobs.c.bytes_up), 0)).where(jobs.c.updated_at >= since)
        with self._tx() as conn:
            return int(conn.execute(stmt).scalar() or 0)


# Statements of the hot path, built once (see Database._execute).
_GET_ONE = select(jobs).where(jobs.c.id == bindparam("k_id"))
_GET_MANY = select(jobs).where(jobs.c.id.in_(bindparam("k_ids", expanding=True)))

"""Retention: finished jobs are deleted once old, except what result reuse still needs."""

from __future__ import annotations

import math

from sqlalchemy import Integer, and_, bindparam, delete, exists, not_, or_, select

from blurd.models import JobState, jobs
from blurd.store.database import Database, padded_ids


class Retention(Database):
    def prune(self, now: float, older_than_s: float, batch: int = 500) -> int:
        """Delete ``done`` and ``failed`` jobs last changed before ``now - older_than_s``, at
        most ``batch`` per transaction; returns how many were deleted.

        The newest done job of each content and options with a result (``output_media``) is
        kept, whatever its age: it is the one a new identical job reuses (see record_hash).
        Each transaction reads the next ``batch`` old rows in (updated_at, id) order from where
        the previous one stopped, so rows kept are read once, not once per transaction.
        """
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        cut = now - older_than_s
        deleted = 0
        for state in (JobState.FAILED, JobState.DONE):
            after: tuple[float, int] = (-math.inf, 0)  # (updated_at, id) of the last row read
            while True:
                page = dict(k_state=state.value, k_cut=cut, k_batch=batch)
                with self._tx() as conn:
                    rows = conn.execute(_PAGE, {**page, "k_at": after[0], "k_id": after[1]}).all()
                    if rows:
                        ids = [int(r.id) for r in rows]
                        gone = conn.execute(_DELETE, {**page, "k_ids": padded_ids(ids)}).rowcount
                        deleted += int(gone)
                if len(rows) < batch:
                    break
                after = (float(rows[-1].updated_at), int(rows[-1].id))
        return deleted


# The next rows of one state older than the cut, after (k_at, k_id), on ix_jobs_retention.
_PAGE = (
    select(jobs.c.id, jobs.c.updated_at)
    .where(
        jobs.c.state == bindparam("k_state"),
        jobs.c.updated_at < bindparam("k_cut"),
        jobs.c.updated_at >= bindparam("k_at"),
        or_(jobs.c.updated_at > bindparam("k_at"), jobs.c.id > bindparam("k_id")),
    )
    .order_by(jobs.c.updated_at, jobs.c.id)
    .limit(bindparam("k_batch", type_=Integer))
)

_newer = jobs.alias("newer")
# The job a new identical job would reuse: done, with a result, and no newer such twin.
_REUSABLE = and_(
    jobs.c.state == JobState.DONE.value,
    jobs.c.output_media.is_not(None),
    jobs.c.sha256.is_not(None),
    jobs.c.fingerprint.is_not(None),
    ~exists().where(
        _newer.c.sha256 == jobs.c.sha256,
        _newer.c.fingerprint == jobs.c.fingerprint,
        _newer.c.state == JobState.DONE.value,
        _newer.c.output_media.is_not(None),
        _newer.c.id > jobs.c.id,
    ),
)
# Rows of the page still in their state and still old (another node may have moved them).
_DELETE = delete(jobs).where(
    jobs.c.id.in_(bindparam("k_ids", expanding=True)),
    jobs.c.state == bindparam("k_state"),
    jobs.c.updated_at < bindparam("k_cut"),
    not_(_REUSABLE),
)

"""Writing the queue: new file versions, conditional transitions, hashes, retries.

A state change is ``UPDATE … WHERE id = ? AND state = ?`` (and held by this node or nobody)
and reports whether the row really moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, bindparam, insert, or_, select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import IntegrityError

from blurd.errors import InvalidTransition
from blurd.models import Job, JobState, allowed, int64, jobs
from blurd.store.database import Database

_IDENTITY = ("dev", "ino", "ctime_ns")
# A multi-row INSERT is one statement per row count, and the drivers keep the statements they
# ran (sqlite3: the last 128 per connection, psycopg: 100 prepared): with a row count per
# batch of settled files, the cache filled with INSERTs of up to 330 KiB each, the daemon's
# memory grew by 1.1 MiB per 1,000 files (scripts/soak). Rows therefore go in chunks of this
# many, and the rest one by one: two statements whatever the batch. 64 is also faster than
# one statement per 1,000 rows: 20,000 versions in batches of 997 took 0.83 s against 3.31 s
# (1,000 per statement), 1.33 s (256) and 0.86 s (16), best of 3 on SQLite.
ENQUEUE_CHUNK_ROWS = 64


class Queue(Database):
    def enqueue(self, watch: str, rel_path: str, size: int, mtime_ns: int) -> int | None:
        """Record one version of a file; None when that version is already known."""
        now = self.clock()
        values = dict(
            watch=watch,
            rel_path=rel_path,
            size=size,
            mtime_ns=mtime_ns,
            state=JobState.QUEUED.value,
            attempts=0,
            requeues=0,
            bytes_up=0,
            next_attempt_at=0.0,
            created_at=now,
            updated_at=now,
        )
        try:
            with self._tx() as conn:
                result = conn.execute(insert(jobs).values(**values))
                key = result.inserted_primary_key
                return int(key[0]) if key else None
        except IntegrityError:
            return None

    def enqueue_many(
        self, watch: str, versions: Sequence[tuple[str, int, int]], batch: int = 1000
    ) -> list[tuple[int, str]]:
        """Record many file versions (rel_path, size, mtime_ns), ``batch`` per transaction;
        returns (id, rel_path) of those that were new. Versions already known (by this node or
        another) are skipped by the unique key, without an error."""
        dialect = pg_dialect if self.engine.dialect.name == "postgresql" else sqlite_dialect
        stmt = (
            dialect.insert(jobs)
            .on_conflict_do_nothing(index_elements=["watch", "rel_path", "size", "mtime_ns"])
            .returning(jobs.c.id, jobs.c.rel_path)
        )
        added: list[tuple[int, str]] = []
        for start in range(0, len(versions), batch):
            now = self.clock()
            common = dict(state=JobState.QUEUED.value, attempts=0, requeues=0, bytes_up=0,
                          next_attempt_at=0.0, created_at=now, updated_at=now)  # fmt: skip
            rows = [
                dict(watch=watch, rel_path=rel, size=size, mtime_ns=mtime, **common)
                for rel, size, mtime in versions[start : start + batch]
            ]
            with self._tx() as conn:
                for chunk in _fixed_chunks(rows):
                    result = (
                        conn.execute(stmt, chunk)
                        if len(chunk) > 1
                        else conn.execute(stmt, chunk[0])
                    )
                    added.extend((int(r.id), str(r.rel_path)) for r in result)
        return added

    def transition(self, job_id: int, old: JobState, new: JobState, /, **fields: Any) -> bool:
        """Move a job from ``old`` to ``new``; False if it was no longer in ``old`` (or another
        node holds it now). A job that goes back to the queue belongs to nobody."""
        if not allowed(old, new):
            raise InvalidTransition(f"job {job_id}: {old} -> {new} is not an allowed transition")
        return self._conditional(job_id, old, _moving(new, fields))

    def transition_durably(
        self, job_id: int, old: JobState, new: JobState, /, **fields: Any
    ) -> bool:
        """transition(), flushed to disk before it returns, even on a power cut.

        SQLite runs with ``synchronous = NORMAL`` (a crash of blurd loses nothing; a power cut
        may undo the last commits). The commit that records a remote job id must survive a
        power cut too, or the file would be uploaded (and paid for) again: it is made FULL.
        """
        if not allowed(old, new):
            raise InvalidTransition(f"job {job_id}: {old} -> {new} is not an allowed transition")
        # On SQLite, through a second pool whose connections run with synchronous = FULL (the
        # setting is per connection); elsewhere every commit is durable already.
        return self._conditional(job_id, old, _moving(new, fields), engine=self._durable)

    def update(self, job_id: int, state: JobState, /, **fields: Any) -> bool:
        """Change fields of a job that is still in ``state``; False if it moved meanwhile.

        ``dev``, ``ino`` and ``ctime_ns`` are stored as signed 64-bit integers (see
        :func:`blurd.models.file_identity`)."""
        if "state" in fields:
            raise InvalidTransition("use transition() to change a job's state")
        return self._conditional(job_id, state, fields)

    def record_hash(
        self,
        job_id: int,
        sha256: str,
        fingerprint: str,
        identity: tuple[int, int, int] | None = None,
    ) -> tuple[bool, Job | None]:
        """A queued job's content is hashed: look for an identical done job and, when there is
        none, record the hash (and ``identity``, the file's (dev, ino, ctime_ns) when hashed)
        and hand the job back to every node, in one transaction.

        Returns (recorded, the identical earlier job or None). With an earlier job nothing is
        recorded: the caller reuses its result, or records the hash with update() if it
        cannot. ``recorded`` False without an earlier job: the job moved on meanwhile.
        """
        find = dict(k_sha=sha256, k_fp=fingerprint, k_id=job_id)
        fields: dict[str, Any] = dict(
            sha256=sha256, fingerprint=fingerprint, node=None, lease_until=None
        )
        if identity is not None:
            fields.update(zip(_IDENTITY, identity, strict=True))
        stmt, params = self._conditional_statement(job_id, JobState.QUEUED, fields)
        with self._tx() as conn:
            _count, names, values = self._execute(conn, _FIND_REUSABLE, find)
            if values:
                return False, Job.from_values(names, values[0])
            return self._execute(conn, stmt, params)[0] == 1, None

    def retry(self, ids: Sequence[int] | None = None) -> int:
        """Put failed jobs (these ids, or all of them) back in the queue."""
        stmt = update(jobs).where(jobs.c.state == JobState.FAILED.value)
        if ids is not None:
            stmt = stmt.where(jobs.c.id.in_(list(ids)))
        stmt = stmt.values(
            state=JobState.QUEUED.value,
            node=None,
            lease_until=None,
            attempts=0,
            requeues=0,
            error=None,
            next_attempt_at=0.0,
            updated_at=self.clock(),
        )
        with self._tx() as conn:
            return int(conn.execute(stmt).rowcount)

    def _conditional(
        self,
        job_id: int,
        expected: JobState,
        fields: dict[str, Any],
        *,
        engine: Engine | None = None,
    ) -> bool:
        stmt, params = self._conditional_statement(job_id, expected, fields)
        with self._tx(engine) as conn:
            return self._execute(conn, stmt, params)[0] == 1

    def _conditional_statement(
        self, job_id: int, expected: JobState, fields: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        """The statement and parameters of a conditional update: the job ``job_id``, still in
        ``expected`` and held by this node or nobody, gets ``fields`` (and a new updated_at)."""
        names = tuple(sorted(fields))
        stmt = self._statement(("conditional", names), lambda: _conditional_update(names))
        params = {f"v_{n}": v for n, v in fields.items()}
        for name in _IDENTITY:
            if params.get(f"v_{name}") is not None:
                params[f"v_{name}"] = int64(params[f"v_{name}"])
        params.update(k_id=job_id, k_state=expected.value, k_node=self.node)
        params["v_updated_at"] = self.clock()
        return stmt, params


def _conditional_update(names: tuple[str, ...]) -> Any:
    # A node whose lease ran out (a long pause, a lost database) must not move a job that
    # another node has taken over since.
    return (
        update(jobs)
        .where(
            jobs.c.id == bindparam("k_id"),
            jobs.c.state == bindparam("k_state"),
            or_(jobs.c.node.is_(None), jobs.c.node == bindparam("k_node")),
        )
        .values({n: bindparam(f"v_{n}") for n in (*names, "updated_at")})
    )


def _moving(new: JobState, fields: dict[str, Any]) -> dict[str, Any]:
    """The values of a transition to ``new``: a job back in the queue belongs to nobody."""
    values = {"state": new.value, **fields}
    if new is JobState.QUEUED:
        values.setdefault("node", None)
        values.setdefault("lease_until", None)
    return values


# The newest done job with the same content and options whose result can be reused.
_FIND_REUSABLE = (
    select(jobs)
    .where(
        jobs.c.sha256 == bindparam("k_sha"),
        jobs.c.fingerprint == bindparam("k_fp"),
        jobs.c.state == JobState.DONE.value,
        jobs.c.id != bindparam("k_id"),
        jobs.c.output_media.is_not(None),
    )
    .order_by(jobs.c.id.desc())
    .limit(1)
)


def _fixed_chunks(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``rows`` in chunks of ENQUEUE_CHUNK_ROWS, then the rest one row at a time."""
    full = len(rows) - len(rows) % ENQUEUE_CHUNK_ROWS
    chunks = [rows[i : i + ENQUEUE_CHUNK_ROWS] for i in range(0, full, ENQUEUE_CHUNK_ROWS)]
    return chunks + [[row] for row in rows[full:]]

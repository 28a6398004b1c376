"""Claiming queued work: a job to hash, or a hashed job to upload, one upload per content.

One statement claims (``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING``): on
PostgreSQL concurrent claimers skip each other's rows instead of waiting, on SQLite the write
lock serializes them. An upload claim then looks, in the same transaction, for twins of what
it took (identical content with identical options) and puts back what must not be uploaded.

On SQLite the claim statements name their partial claim index (``INDEXED BY``) rather than
leave the choice to its planner, whose estimates blurd does not control (see _on_claim_index).
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    Table,
    bindparam,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Select

from blurd.models import IN_FLIGHT_STATES, Job, JobState, allowed, jobs
from blurd.store.database import Database

Content = tuple[str, str]  # (sha256, fingerprint)
Row = tuple[Any, ...]


class Claims(Database):
    twin_wait_s: float
    #: jobs an upload claim sent back to be hashed (a done twin's result to reuse), ever: the
    #: scheduler, which alone claims, tells its hash queue when this moves
    rehashed: int

    def claim(self, now: float, limit: int, *, prepared: bool) -> list[Job]:
        """Hold up to ``limit`` due queued jobs that nobody holds (or whose holder's lease
        ran out) for a step of this node; oldest first.

        ``prepared`` False: jobs not hashed yet, held (still ``queued``) for their hash.
        ``prepared`` True: hashed jobs, whose upload the claim starts: they come back
        ``uploading`` (the claim is their QUEUED -> UPLOADING transition). A claimed job with
        a twin in flight (or a twin earlier in the same claim) goes back to the queue for
        ``twin_wait_s``; one with a done twin goes back to be hashed again, which reuses that
        twin's result. Neither is returned.
        """
        if limit <= 0:
            return []
        stmt = self._statement(("claim", prepared), lambda: self._claim_statement(prepared))
        params = dict(k_now=now, k_limit=limit, v_node=self.node, v_lease=now + self.lease_s)
        with self._tx() as conn:
            _count, names, found = self._execute(conn, stmt, params)
            going = self._upload_once(conn, names, found, now) if prepared and found else found
        claimed = (Job.from_values(names, v) for v in going)
        return sorted(claimed, key=lambda j: (j.next_attempt_at, j.id))

    def next_queued_at(self, now: float, *, prepared: bool) -> float | None:
        """When the earliest claimable queued job (hashed or not) is due; None if there is none.

        Walks the partial claim index in due order and stops at the first free row.
        """
        stmt = self._statement(
            ("next_queued", prepared), lambda: self._next_queued_statement(prepared)
        )
        with self._tx() as conn:
            _count, _names, values = self._execute(conn, stmt, {"k_now": now})
        return float(values[0][0]) if values and values[0][0] is not None else None

    def _next_queued_statement(self, prepared: bool) -> Any:
        free = or_(jobs.c.node.is_(None), jobs.c.lease_until < bindparam("k_now"))
        stmt = (
            select(jobs.c.next_attempt_at)
            .where(_queued(prepared), free)
            .order_by(jobs.c.next_attempt_at, jobs.c.id)
            .limit(1)
        )
        return _on_claim_index(stmt, prepared)

    def _claim_statement(self, prepared: bool) -> Any:
        free = or_(jobs.c.node.is_(None), jobs.c.lease_until < bindparam("k_now"))
        candidates = (
            select(jobs.c.id)
            .where(_queued(prepared), jobs.c.next_attempt_at <= bindparam("k_now"), free)
            .order_by(jobs.c.next_attempt_at, jobs.c.id)
            # Written into the SQL on PostgreSQL, so that its generic plan knows the limit;
            # SQLite plans every statement with its values.
            .limit(bindparam("k_limit", type_=Integer, literal_execute=not self.is_sqlite))
            .with_for_update(skip_locked=True)
        )
        candidates = _on_claim_index(candidates, prepared)
        values: dict[str, Any] = dict(
            node=bindparam("v_node"),
            lease_until=bindparam("v_lease"),
            updated_at=bindparam("k_now"),
        )
        if prepared:
            assert allowed(JobState.QUEUED, JobState.UPLOADING)
            values["state"] = JobState.UPLOADING.value
        if self.is_sqlite:
            # SQLite runs the subquery once into a list and updates the rows listed, within the
            # one statement and under its write lock: nothing can change them in between, so
            # nothing is checked again. Checked again (state, sha256, free), the update walked
            # the whole partial index (state=?) testing each id against the list instead of
            # looking the listed ids up: 13 to 16 ms per claim at 100,000 queued rows.
            return (
                update(jobs)
                .where(jobs.c.id.in_(candidates.scalar_subquery()))
                .values(values)
                .returning(*jobs.c)
            )
        # PostgreSQL may run the subquery of IN again for each row it compares, each run
        # locking ``limit`` more rows, so that one claim takes several times its limit:
        # materialized, it runs once.
        chosen = select(candidates.cte("claimable").prefix_with("MATERIALIZED").c.id)
        return (
            update(jobs)
            .where(jobs.c.id.in_(chosen), _queued(prepared), free)
            .values(values)
            .returning(*jobs.c)
        )

    def _upload_once(
        self, conn: Connection, names: tuple[str, ...], claimed: list[Row], now: float
    ) -> list[Row]:
        """The claimed uploads (rows of ``names``) that may go ahead; the others are put back,
        in ``conn``'s transaction, so that no content is uploaded twice while one is in flight.

        On PostgreSQL two claims of identical content could each miss the other's uncommitted
        claim: an advisory lock per content, taken in sorted order (no deadlock), serializes
        them, and the look that follows (a new snapshot under READ COMMITTED) sees what the
        other committed. On SQLite the write lock already serializes claims.
        """
        at = {name: names.index(name) for name in ("id", "sha256", "fingerprint")}
        contents = {
            int(row[at["id"]]): (str(row[at["sha256"]]), str(row[at["fingerprint"]]))
            for row in claimed
            if row[at["fingerprint"]] is not None  # the claim asks for a sha256
        }
        first: dict[Content, int] = {}  # the lowest id of each content in this claim
        for job_id in sorted(contents):
            first.setdefault(contents[job_id], job_id)
        if not self.is_sqlite:
            for key in sorted({_lock_key(content) for content in first}):
                self._execute(conn, _LOCK, {"k_key": key})
        in_flight: dict[Content, int] = {}  # the lowest id of a twin in flight, not ours
        done: set[Content] = set()
        for content in first:
            twins = self._execute(conn, _TWINS, {"k_sha": content[0], "k_fp": content[1]})[2]
            for twin_id, state in twins:
                if state == JobState.DONE.value:
                    done.add(content)
                elif twin_id not in contents:
                    in_flight[content] = min(twin_id, in_flight.get(content, twin_id))
        going: list[Row] = []
        for row in claimed:
            job_id = int(row[at["id"]])
            same = contents.get(job_id)
            if same is None:
                going.append(row)
                continue
            waits_for = in_flight.get(same)
            if waits_for is None and same not in done and first[same] != job_id:
                waits_for = first[same]
            if waits_for is not None:
                error = f"waiting for job {waits_for}, which has identical content"
                wait = dict(k_at=now + self.twin_wait_s, k_error=error)
                self._execute(conn, _WAIT, {**wait, "k_id": job_id, "k_now": now})
            elif same in done:
                self._execute(conn, _REHASH, {"k_id": job_id, "k_now": now})
                self.rehashed += 1
            else:
                going.append(row)
        return going


def _queued(prepared: bool) -> ColumnElement[bool]:
    """Queued jobs, hashed or not. The state is written into the SQL, not bound: only then can
    SQLite and PostgreSQL (with a generic plan) see that a partial claim index covers it."""
    queued = jobs.c.state == literal_column(f"'{JobState.QUEUED.value}'")
    return queued & (jobs.c.sha256.is_not(None) if prepared else jobs.c.sha256.is_(None))


def _on_claim_index(stmt: Select[Any], prepared: bool) -> Select[Any]:
    """``stmt`` (rows of ``_queued(prepared)`` in due order) made to walk its partial claim index
    on SQLite; PostgreSQL, which keeps statistics of its own (autovacuum), ignores the hint.

    Fast path: SQLite's planner picks among the indexes by estimates blurd does not control.
    Without statistics it guessed right; after an ANALYZE (which blurd never runs, but an
    operator or a tool may) sqlite_stat1 says 2 rows per sha256 value (most are distinct) and
    nothing of the NULLs, and the hash claim took ix_jobs_content for ``sha256 IS NULL``, read
    every unhashed row and sorted them: 45 to 80 ms per claim at 100,000 rows of each kind,
    against 0.3 ms along ix_jobs_claim_hash. INDEXED BY is no hint to SQLite but an order: a
    statement it cannot run on that index fails when prepared (the tests would), and the index
    exists from schema 2 on.
    """
    name = "ix_jobs_claim_upload" if prepared else "ix_jobs_claim_hash"
    return stmt.with_hint(jobs, f"INDEXED BY {name}", "sqlite")


@compiles(Table, "sqlite")
def _sqlite_table(table: Table, compiler: SQLCompiler, **kw: Any) -> str:
    """A table as SQLite's compiler renders it, followed in a FROM by its hint, if any.

    SQLAlchemy's SQLite compiler drops table hints (its get_from_hint_text returns None), so
    that ``with_hint(jobs, "INDEXED BY …", "sqlite")`` would silently change nothing. Only
    hints given for SQLite (or for every dialect) reach it; a table without one renders as
    before.
    """
    sql: str = compiler.visit_table(table, **kw)  # type: ignore[no-untyped-call]
    hint = (kw.get("fromhints") or {}).get(table)
    if kw.get("asfrom") and hint and compiler.get_from_hint_text(table, hint) is None:
        sql += f" {hint}"
    return sql


def _lock_key(content: Content) -> int:
    """The PostgreSQL advisory lock key of a content: 64 bits of a hash of it, signed."""
    digest = hashlib.sha256(f"{content[0]}\0{content[1]}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


_LOCK = select(func.pg_advisory_xact_lock(bindparam("k_key", type_=BigInteger)))

# The twins of a content (ix_jobs_content): those in flight, and one done with a result.
_SAME = (jobs.c.sha256 == bindparam("k_sha"), jobs.c.fingerprint == bindparam("k_fp"))
_TWINS = (
    select(jobs.c.id, jobs.c.state)
    .where(
        # Written into the SQL: a list of values would be an expanding parameter (see _execute).
        *_SAME,
        jobs.c.state.in_([literal_column(f"'{s.value}'") for s in IN_FLIGHT_STATES]),
    )
    .union_all(
        select(jobs.c.id, jobs.c.state)
        .where(*_SAME, jobs.c.state == JobState.DONE.value, jobs.c.output_media.is_not(None))
        .limit(1)
        .subquery()
        .select()
    )
)

# A claimed upload put back: it belongs to nobody again, and comes back after ``k_at``.
_BACK: dict[str, Any] = dict(
    state=JobState.QUEUED.value, node=None, lease_until=None, updated_at=bindparam("k_now")
)
_MINE = (jobs.c.id == bindparam("k_id"), jobs.c.state == JobState.UPLOADING.value)
_WAIT = (
    update(jobs)
    .where(*_MINE)
    .values(**_BACK, next_attempt_at=bindparam("k_at"), error=bindparam("k_error"))
)
# A done twin's result is reused by the hash step (record_hash): the job goes back to it.
_REHASH = (
    update(jobs)
    .where(*_MINE)
    .values(**_BACK, sha256=None, fingerprint=None, next_attempt_at=bindparam("k_now"))
)

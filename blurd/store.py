"""The jobs table: enqueue, conditional transitions, recovery, and the queries behind `status`.

Every change is one short transaction; a state change is ``UPDATE … WHERE id = ? AND state = ?``
and reports whether the row really moved. No I/O other than the database happens in here.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError
from sqlalchemy.sql.elements import ColumnElement

from blurd import defaults, migrations
from blurd.errors import InvalidTransition, StoreError
from blurd.models import (
    ACTIVE_STATES,
    IN_FLIGHT_STATES,
    SCHEMA_VERSION,
    Job,
    JobState,
    allowed,
    daemon_state,
    jobs,
)

SQLITE_BUSY_TIMEOUT_MS = 10_000
SQLITE_CACHE_KIB = 512  # per connection


class Store:
    """All access to the jobs table goes through here.

    ``node`` names this daemon among those sharing the database: the jobs it claims carry it,
    with a lease of ``lease_s`` seconds that :meth:`renew_leases` extends.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        node: str = "",
        lease_s: float = defaults.LEASE_S,
        upgrade: bool | None = None,
    ) -> None:
        """Open the database; ``upgrade``: True applies pending migrations, False refuses an
        older schema, None (the default) upgrades a SQLite file or a new database only: a
        shared database is upgraded on purpose, with `blurd db upgrade`."""
        url = _with_driver(url)
        self.url = url
        self.clock = clock
        self.node = node or socket.gethostname()
        self.lease_s = lease_s
        self.schema_change: tuple[int | None, int] | None = None  # (from, to) when upgraded
        self._updates: dict[tuple[str, ...], Any] = {}
        self._claims: dict[bool, Any] = {}
        self._next_queued: dict[bool, Any] = {}
        self._sqlite_path = _prepare_sqlite_file(url)
        # One transaction at a time in this process, on SQLite (see _tx); elsewhere the server
        # takes care of concurrent transactions.
        self._one_at_a_time: threading.Lock | None = None
        self._kept: dict[Engine, Connection] = {}  # SQLite: the connection of each pool, open
        self._compiled: dict[int, tuple[Any, str, tuple[str, ...], dict[str, Any]]] = {}
        if self._sqlite_path is None:
            # A pre-ping (one more statement per checkout) guards against a server that
            # dropped the connection.
            try:
                self.engine: Engine = create_engine(url, future=True, pool_pre_ping=True)
            except ImportError as exc:
                raise StoreError(
                    f"{self._describe()}: the database driver is not installed ({exc}); for "
                    "PostgreSQL: pip install 'blurd[postgres]'"
                ) from exc
            self._durable = self.engine
        else:
            # SQLite lets one writer in at a time, and a connection that finds the write lock
            # taken sleeps in its busy handler (1, 2, 5, 10 ms…) however short the other's
            # transaction: with a connection per thread that was 17 sleeps per job under load,
            # and every commit emptied the other connections' page caches. The daemon's
            # threads therefore take turns on one connection, kept open (plus one with
            # synchronous = FULL for the remote-id commit); a thread waiting for its turn wakes
            # the moment the previous one ends, and no transaction pays for a pool checkout.
            # Other processes (`blurd status`, a second daemon) still meet the busy timeout.
            self._one_at_a_time = threading.Lock()
            single = dict(pool_size=1, max_overflow=4, pool_pre_ping=False)
            self.engine = create_engine(url, future=True, **single)
            self._durable = create_engine(url, future=True, **single)
            for engine in (self.engine, self._durable):
                event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(self._durable, "connect", _sqlite_full_sync)
        try:
            self._open_schema(upgrade)
        except (DatabaseError, OperationalError) as exc:
            self.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreError(
                    f"{self._describe()}: the database stayed locked by another process "
                    f"for {SQLITE_BUSY_TIMEOUT_MS // 1000} s ({_short(exc)})"
                ) from exc
            raise StoreError(
                f"{self._describe()}: the database cannot be opened ({_short(exc)}); "
                "blurd does not reset it: move the file aside to start with an empty queue"
            ) from exc
        except StoreError:
            self.close()
            raise

    def _describe(self) -> str:
        if self._sqlite_path is not None:
            return str(self._sqlite_path)
        return make_url(self.url).render_as_string(hide_password=True)

    @property
    def is_sqlite(self) -> bool:
        return self._sqlite_path is not None or self.engine.dialect.name == "sqlite"

    def _open_schema(self, upgrade: bool | None) -> None:
        with self.engine.begin() as conn:
            version = migrations.current_version(conn)
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(
                f"{self._describe()}: the database has schema version {version}, newer than "
                f"this blurd understands ({SCHEMA_VERSION}); upgrade blurd"
            )
        if version != SCHEMA_VERSION:
            if upgrade is False or (upgrade is None and version is not None and not self.is_sqlite):
                raise StoreError(
                    f"{self._describe()}: the database has schema version {version}, older "
                    f"than this blurd needs ({SCHEMA_VERSION}); run `blurd db upgrade` once, "
                    "from one node"
                )
            self.schema_change = self._upgrade()
        if self.is_sqlite:
            with self.engine.begin() as conn:
                conn.exec_driver_sql("PRAGMA quick_check(1)")

    def _upgrade(self) -> tuple[int | None, int]:
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    return migrations.upgrade(conn, self.clock())
            except migrations.SchemaTooNew as exc:
                raise StoreError(
                    f"{self._describe()}: the database has schema version {exc.version}, newer "
                    f"than this blurd understands ({SCHEMA_VERSION}); upgrade blurd"
                ) from exc
            except (OperationalError, IntegrityError) as exc:
                # SQLite: another process created or upgraded the tables between our look
                # and our change; look again.
                text = str(exc).lower()
                racing = ("already exists", "duplicate", "unique")
                if not any(word in text for word in racing) or attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._one_at_a_time is not None:
            with self._one_at_a_time:
                for conn in self._kept.values():
                    conn.close()
                self._kept.clear()
        self.engine.dispose()
        if self._durable is not self.engine:
            self._durable.dispose()

    @contextmanager
    def _tx(self, engine: Engine | None = None) -> Iterator[Connection]:
        """One transaction; on SQLite, the only one of this process at the time, on the
        connection kept open for it (closed after an error, and opened again when next used)."""
        engine = engine or self.engine
        try:
            if self._one_at_a_time is None:
                with engine.begin() as conn:
                    yield conn
                return
            with self._one_at_a_time:
                kept = self._kept.get(engine)
                if kept is None:
                    kept = self._kept[engine] = engine.connect()
                try:
                    with kept.begin():
                        yield kept
                except BaseException:
                    del self._kept[engine]
                    kept.close()
                    raise
        except OperationalError as exc:
            raise StoreError(f"{self._describe()}: {_short(exc)}") from exc

    def _execute(
        self, conn: Connection, stmt: Any, params: dict[str, Any]
    ) -> tuple[int, tuple[str, ...], list[tuple[Any, ...]]]:
        """Run one of the hot path's statements: (rows changed, column names, rows).

        On SQLite the statement, compiled once, goes straight to the driver's cursor:
        SQLAlchemy's execution path (compiled-cache lookup, execution context, result
        objects) cost about twice the statement itself, on every step of every job. Every
        column here is an integer, a float or a string, which the driver passes as they are.
        """
        if self._one_at_a_time is None:
            result = conn.execute(stmt, params)
            if not result.returns_rows:
                return result.rowcount, (), []
            return result.rowcount, tuple(result.keys()), [tuple(r) for r in result]
        compiled = self._compiled.get(id(stmt))
        if compiled is None or compiled[0] is not stmt:
            sql = stmt.compile(dialect=self.engine.dialect)
            fixed = {name: b.value for name, b in sql.binds.items() if not b.required}
            compiled = self._compiled[id(stmt)] = (stmt, sql.string, tuple(sql.positiontup), fixed)
        _stmt, sql_text, order, fixed = compiled
        given = {**fixed, **params} if fixed else params
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(sql_text, [given[name] for name in order])
            if cursor.description is None:
                return int(cursor.rowcount), (), []
            names = tuple(str(d[0]) for d in cursor.description)
            return int(cursor.rowcount), names, list(cursor.fetchall())
        finally:
            cursor.close()

    # ------------------------------------------------------------------ writing

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
        from sqlalchemy.dialects import postgresql, sqlite

        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
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
                result = conn.execute(stmt, rows) if len(rows) > 1 else conn.execute(stmt, rows[0])
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
        """Change fields of a job that is still in ``state``; False if it moved meanwhile."""
        if "state" in fields:
            raise InvalidTransition("use transition() to change a job's state")
        return self._conditional(job_id, state, fields)

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
        """The statement and parameters of a conditional update (see _conditional)."""
        names = tuple(sorted(fields))
        stmt = self._updates.get(names)
        if stmt is None:
            # Built once per set of fields, with bound parameters: building and cache-keying
            # a new statement cost two thirds of each update (600 µs against 200 µs).
            stmt = (
                update(jobs)
                .where(
                    jobs.c.id == bindparam("k_id"),
                    jobs.c.state == bindparam("k_state"),
                    or_(jobs.c.node.is_(None), jobs.c.node == bindparam("k_node")),
                )
                .values({n: bindparam(f"v_{n}") for n in (*names, "updated_at")})
            )
            self._updates[names] = stmt
        params = {f"v_{n}": v for n, v in fields.items()}
        params.update(k_id=job_id, k_state=expected.value, k_node=self.node)
        params["v_updated_at"] = self.clock()
        return stmt, params

    def _mine_or_free(self) -> ColumnElement[bool]:
        # A node whose lease ran out (a long pause, a lost database) must not move a job that
        # another node has taken over since.
        return or_(jobs.c.node.is_(None), jobs.c.node == self.node)

    # ------------------------------------------------------------------ nodes and leases

    def claim(self, now: float, limit: int, *, prepared: bool) -> list[Job]:
        """Hold up to ``limit`` due queued jobs that nobody holds (or whose holder's lease
        ran out) for a step of this node; oldest first.

        ``prepared`` False: jobs not hashed yet, held (still ``queued``) for their hash.
        ``prepared`` True: hashed jobs, whose upload the claim starts: they come back
        ``uploading`` (the claim is their QUEUED -> UPLOADING transition).

        One statement: ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING``;
        on PostgreSQL concurrent claimers skip each other's rows instead of waiting, on SQLite
        the write lock serializes them.
        """
        if limit <= 0:
            return []
        stmt = self._claims.get(prepared)
        if stmt is None:
            free = or_(jobs.c.node.is_(None), jobs.c.lease_until < bindparam("k_now"))
            candidates = (
                select(jobs.c.id)
                .where(
                    _queued(prepared),
                    jobs.c.next_attempt_at <= bindparam("k_now"),
                    free,
                )
                .order_by(jobs.c.next_attempt_at, jobs.c.id)
                # Written into the SQL on PostgreSQL, so that its generic plan knows the
                # limit; SQLite plans every statement with its values.
                .limit(bindparam("k_limit", type_=Integer, literal_execute=not self.is_sqlite))
                .with_for_update(skip_locked=True)
            )
            values: dict[str, Any] = dict(
                node=bindparam("v_node"),
                lease_until=bindparam("v_lease"),
                updated_at=bindparam("k_now"),
            )
            if prepared:
                assert allowed(JobState.QUEUED, JobState.UPLOADING)
                values["state"] = JobState.UPLOADING.value
            stmt = self._claims[prepared] = (
                update(jobs)
                .where(jobs.c.id.in_(candidates.scalar_subquery()), _queued(prepared), free)
                .values(values)
                .returning(*jobs.c)
            )
        params = dict(k_now=now, k_limit=limit, v_node=self.node, v_lease=now + self.lease_s)
        with self._tx() as conn:
            _count, names, found = self._execute(conn, stmt, params)
        return sorted((Job.from_values(names, v) for v in found),
                      key=lambda j: (j.next_attempt_at, j.id))  # fmt: skip

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
            .where(jobs.c.node == self.node, jobs.c.state.in_([s.value for s in ACTIVE_STATES]))
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
            .where(jobs.c.node == self.node, jobs.c.state.in_([s.value for s in ACTIVE_STATES]))
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
        at_engine = [JobState.PROCESSING.value, JobState.DOWNLOADING.value]
        requeue: dict[str, Any] = dict(state=JobState.QUEUED.value, node=None, lease_until=None,
                                       next_attempt_at=0.0, updated_at=now)  # fmt: skip
        with self._tx() as conn:
            uploads = conn.execute(
                update(jobs).where(jobs.c.state == JobState.UPLOADING.value, *which).values(requeue)
            ).rowcount
            if keeps_remote_jobs:
                resumed = conn.execute(
                    update(jobs)
                    .where(jobs.c.state.in_(at_engine), *which)
                    .values(node=self.node, lease_until=now + self.lease_s, next_attempt_at=0.0)
                    .returning(jobs.c.state)
                ).all()
                orphans = 0
            else:
                resumed = []
                orphans = conn.execute(
                    update(jobs)
                    .where(jobs.c.state.in_(at_engine), *which)
                    .values(**requeue, remote_id=None, progress=None)
                ).rowcount
        return {
            "requeued_uploads": int(uploads),
            "resumed_processing": sum(r.state == JobState.PROCESSING.value for r in resumed),
            "resumed_downloads": sum(r.state == JobState.DOWNLOADING.value for r in resumed),
            "requeued_orphans": int(orphans),
        }

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

    # ------------------------------------------------------------------ reading

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
            return [Job.from_row(r) for r in conn.execute(_GET_MANY, {"k_ids": wanted})]

    def held_at_engine(self) -> dict[int, float]:
        """The jobs at the engine that this node holds: id -> when their next step is due."""
        at_engine = [JobState.PROCESSING.value, JobState.DOWNLOADING.value]
        stmt = select(jobs.c.id, jobs.c.next_attempt_at).where(
            jobs.c.node == self.node, jobs.c.state.in_(at_engine)
        )
        with self._tx() as conn:
            return {int(r.id): float(r.next_attempt_at) for r in conn.execute(stmt)}

    def next_queued_at(self, now: float, *, prepared: bool) -> float | None:
        """When the earliest claimable queued job (hashed or not) is due; None if there is none.

        Walks the partial claim index in due order and stops at the first free row.
        """
        stmt = self._next_queued.get(prepared)
        if stmt is None:
            free = or_(jobs.c.node.is_(None), jobs.c.lease_until < bindparam("k_now"))
            stmt = self._next_queued[prepared] = (
                select(jobs.c.next_attempt_at)
                .where(_queued(prepared), free)
                .order_by(jobs.c.next_attempt_at, jobs.c.id)
                .limit(1)
            )
        with self._tx() as conn:
            _count, _names, values = self._execute(conn, stmt, {"k_now": now})
        return float(values[0][0]) if values and values[0][0] is not None else None

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
        stmt = select(func.count()).where(jobs.c.state.in_([s.value for s in ACTIVE_STATES]))
        with self._tx() as conn:
            return int(conn.execute(stmt).scalar() or 0)

    def record_hash(self, job_id: int, sha256: str, fingerprint: str) -> tuple[bool, Job | None]:
        """A queued job's content is hashed: look for an identical done job and, when there is
        none, record the hash and hand the job back to every node, in one transaction.

        Returns (recorded, the identical earlier job or None). With an earlier job nothing is
        recorded: the caller reuses its result, or records the hash with update() if it
        cannot. ``recorded`` False without an earlier job: the job moved on meanwhile.
        """
        find = dict(k_sha=sha256, k_fp=fingerprint, k_id=job_id)
        fields = dict(sha256=sha256, fingerprint=fingerprint, node=None, lease_until=None)
        stmt, params = self._conditional_statement(job_id, JobState.QUEUED, fields)
        with self._tx() as conn:
            _count, names, values = self._execute(conn, _FIND_REUSABLE, find)
            if values:
                return False, Job.from_values(names, values[0])
            return self._execute(conn, stmt, params)[0] == 1, None

    def known_versions(self, watch: str) -> set[tuple[str, int, int]]:
        stmt = select(jobs.c.rel_path, jobs.c.size, jobs.c.mtime_ns).where(jobs.c.watch == watch)
        with self._tx() as conn:
            return {(r[0], int(r[1]), int(r[2])) for r in conn.execute(stmt)}

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

    # ------------------------------------------------------------------ daemons

    def claim_node(
        self,
        node: str,
        data: dict[str, Any],
        fresh_s: float,
        left_behind: Callable[[dict[str, Any]], bool],
    ) -> dict[str, Any] | None:
        """Write this daemon's state row as ``node``, unless a running daemon holds that name:
        then return that daemon's state and write nothing.

        A row counts as a running daemon's when it is younger than ``fresh_s`` and
        ``left_behind(state)`` is False (the caller knows a dead process of its own host). The
        look and the write are one conditional step, so that of two daemons starting at once
        under one name, one is refused.
        """
        text = json.dumps(data, sort_keys=True)
        for _attempt in range(5):
            now = self.clock()
            try:
                with self._tx() as conn:
                    row = conn.execute(
                        select(daemon_state).where(daemon_state.c.node == node)
                    ).first()
                    if row is None:
                        conn.execute(
                            insert(daemon_state).values(node=node, data=text, updated_at=now)
                        )
                        return None
                    other: dict[str, Any] = json.loads(row.data)
                    if row.updated_at >= now - fresh_s and not left_behind(other):
                        return other
                    moved = conn.execute(
                        update(daemon_state)
                        .where(
                            daemon_state.c.node == node,
                            daemon_state.c.updated_at == row.updated_at,
                        )
                        .values(data=text, updated_at=now)
                    ).rowcount
                    if moved == 1:
                        return None
            except IntegrityError:
                pass  # another daemon inserted the row between our look and our write
        raise StoreError(f"{self._describe()}: could not register node {node!r}: it kept changing")

    def save_daemon_state(self, node: str, data: dict[str, Any]) -> None:
        """What a running daemon wants `blurd status` to show (engine, auth, pauses)."""
        text = json.dumps(data, sort_keys=True)
        now = self.clock()
        with self._tx() as conn:
            moved = conn.execute(
                update(daemon_state)
                .where(daemon_state.c.node == node)
                .values(data=text, updated_at=now)
            ).rowcount
            if not moved:
                conn.execute(insert(daemon_state).values(node=node, data=text, updated_at=now))

    def clear_daemon_state(self, node: str) -> None:
        with self._tx() as conn:
            conn.execute(delete(daemon_state).where(daemon_state.c.node == node))

    def daemon_states(self, fresher_than_s: float) -> dict[str, dict[str, Any]]:
        """The states saved by daemons within the last ``fresher_than_s`` seconds."""
        since = self.clock() - fresher_than_s
        stmt = select(daemon_state).where(daemon_state.c.updated_at >= since)
        with self._tx() as conn:
            return {r.node: json.loads(r.data) for r in conn.execute(stmt)}


def _queued(prepared: bool) -> ColumnElement[bool]:
    """Queued jobs, hashed or not. The state is written into the SQL, not bound: only then can
    SQLite and PostgreSQL (with a generic plan) see that a partial claim index covers it."""
    queued = jobs.c.state == literal_column(f"'{JobState.QUEUED.value}'")
    return queued & (jobs.c.sha256.is_not(None) if prepared else jobs.c.sha256.is_(None))


# Statements of the hot path, built once (see Store._conditional).
_GET_ONE = select(jobs).where(jobs.c.id == bindparam("k_id"))
_GET_MANY = select(jobs).where(jobs.c.id.in_(bindparam("k_ids", expanding=True)))
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


def _moving(new: JobState, fields: dict[str, Any]) -> dict[str, Any]:
    """The values of a transition to ``new``: a job back in the queue belongs to nobody."""
    values = {"state": new.value, **fields}
    if new is JobState.QUEUED:
        values.setdefault("node", None)
        values.setdefault("lease_until", None)
    return values


def _with_driver(url: str) -> str:
    """A PostgreSQL URL without a driver names psycopg 3 (the `postgres` extra): SQLAlchemy's
    own default would be psycopg2, which blurd does not install."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def _prepare_sqlite_file(url: str) -> Path | None:
    """Create the SQLite file (and its folder) private to its owner before SQLAlchemy opens it."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:":
        return None
    path = Path(parsed.database)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        os.close(fd)
    except OSError as exc:
        raise StoreError(f"{path}: cannot create the database file: {exc.strerror}") from exc
    return path


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    # Switching to WAL needs the database to itself, and SQLite does not wait for that through
    # the busy timeout: when two processes open a new database at once, one is refused at once.
    # Switch only when needed, and retry for as long as the busy timeout would have waited.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            cur.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    # FULL fsyncs every commit (6 per job, one at a time under the write lock). In WAL mode
    # NORMAL cannot corrupt the database and loses nothing when blurd crashes or is killed;
    # only a power cut or kernel crash can undo the last commits, and those jobs then repeat
    # their step (an undone remote id: one repeat upload).
    cur.execute("PRAGMA synchronous = NORMAL")
    # Each pooled connection keeps its own page cache (2 MiB by default), which fills as the
    # table grows; with a dozen threads that was most of the daemon's memory growth in the soak.
    cur.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
    cur.close()


def _sqlite_full_sync(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous = FULL")
    cur.close()


def _short(exc: Exception) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0]

"""Database plumbing: engines, the schema at open, one transaction at a time, errors.

Every access of the store's parts goes through :meth:`Database._tx` (a short transaction,
whose OperationalError becomes a StoreError) and, on the hot path, :meth:`Database._execute`.
A SQLite file is created private and runs in WAL mode, with a busy timeout and a small cache.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError

from blurd import defaults, migrations
from blurd.errors import StoreError
from blurd.models import SCHEMA_VERSION

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 10_000
SQLITE_CACHE_KIB = 512  # per connection


class Database:
    """The connection to the jobs database, shared by the parts of :class:`blurd.store.Store`.

    ``node`` names this daemon among those sharing the database: the jobs it claims carry it,
    with a lease of ``lease_s`` seconds.
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
        self._statements: dict[Hashable, Any] = {}
        self._compiled: dict[int, tuple[Any, str, tuple[str, ...], dict[str, Any]]] = {}
        self._sqlite_path = _prepare_sqlite_file(url)
        # One transaction at a time in this process, on SQLite (see _tx); elsewhere the server
        # takes care of concurrent transactions.
        self._one_at_a_time: threading.Lock | None = None
        self._kept: dict[Engine, Connection] = {}  # SQLite: the connection of each pool, open
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
            # Fast path: with a connection per thread, a thread finding the write lock taken
            # slept in SQLite's busy handler (1, 2, 5, 10 ms…): 17 sleeps per job under load,
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

    # The two fast paths of the hot path (every step of every job) are these two methods.

    def _statement(self, key: Hashable, build: Callable[[], T]) -> T:
        """The statement ``build`` makes, built once per ``key`` for this store.

        Fast path: building and cache-keying a new statement cost two thirds of each
        conditional update (600 µs against 200 µs); statements take their values as
        bound parameters instead.
        """
        stmt: T | None = self._statements.get(key)
        if stmt is None:
            stmt = self._statements[key] = build()
        return stmt

    def _execute(
        self, conn: Connection, stmt: Any, params: dict[str, Any]
    ) -> tuple[int, tuple[str, ...], list[tuple[Any, ...]]]:
        """Run one of the hot path's statements: (rows changed, column names, rows).

        Fast path: on SQLite the statement, compiled once, goes straight to the driver's
        cursor; SQLAlchemy's execution path (compiled-cache lookup, execution context, result
        objects) cost about twice the statement itself. Every column passed this way is an
        integer, a float or a string, which the driver takes as they are; expanding
        parameters (``IN :list``) need conn.execute.
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


def padded_ids(ids: list[int]) -> list[int]:
    """``ids`` lengthened to the next power of two by repeating the last one.

    ``IN (?, ?, …)`` is a new statement for each list length, and the drivers keep the
    statements they ran (sqlite3: 128 per connection, psycopg: 100 prepared); with padded
    lists a lookup of up to 128 jobs is one of 8 statements instead of one of 128.
    """
    if not ids:
        return ids
    size = 1 << (len(ids) - 1).bit_length()
    return ids + [ids[-1]] * (size - len(ids))


def _with_driver(url: str) -> str:
    """A PostgreSQL URL without a driver names psycopg 3 (the `postgres` extra): SQLAlchemy's
    own default would be psycopg2, which blurd does not install."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def _short(exc: Exception) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0]


def _prepare_sqlite_file(url: str) -> Path | None:
    """Create the SQLite file (and its folder) private to its owner before SQLAlchemy opens it;
    its path, or None for another database or one in memory."""
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
    """The settings of every new connection (a SQLAlchemy "connect" event)."""
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
    """The setting of the connections whose commits must survive a power cut."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous = FULL")
    cur.close()

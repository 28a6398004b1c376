"""Versioned schema migrations, the same for SQLite and PostgreSQL.

The ``blurd_schema`` table records every version applied. A new database is created at the
newest version in one go (the tables of :mod:`blurd.models`) and recorded as that version; an
older one is brought forward one recorded step at a time. A step only ever adds (columns,
indexes, tables); still, nodes are upgraded with all of them stopped: a daemon of the previous
release refuses a newer schema, and one left running would ignore what the step added.

On PostgreSQL the whole upgrade is one transaction (DDL is transactional there) under an
advisory lock, so two nodes upgrading at once apply each step once. SQLite commits each DDL
statement on its own; a step interrupted there is completed by the next upgrade, which checks
what already exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, func, insert, inspect, select

from blurd.models import SCHEMA_VERSION, jobs, metadata, schema_info

# Any fixed number: the key of the PostgreSQL advisory lock held while upgrading.
_PG_LOCK_KEY = 0x626C757264  # "blurd"


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    apply: Callable[[Connection], None]


def _add_column(conn: Connection, table: str, column: str, sql_type: str) -> None:
    if column not in {c["name"] for c in inspect(conn).get_columns(table)}:
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")


def _create_index(conn: Connection, name: str) -> None:
    if name not in {i["name"] for i in inspect(conn).get_indexes("jobs")}:
        next(i for i in jobs.indexes if i.name == name).create(conn)


def _v2_node_and_lease(conn: Connection) -> None:
    _add_column(conn, "jobs", "node", "VARCHAR(255)")
    _add_column(conn, "jobs", "lease_until", "FLOAT")
    for index in ("ix_jobs_node", "ix_jobs_claim_hash", "ix_jobs_claim_upload"):
        _create_index(conn, index)


def _v3_identity_and_retention(conn: Connection) -> None:
    for column in ("dev", "ino", "ctime_ns"):
        _add_column(conn, "jobs", column, "BIGINT")
    _add_column(conn, "jobs", "maybe_sent", "INTEGER")
    _create_index(conn, "ix_jobs_retention")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "jobs.node and jobs.lease_until: which daemon holds a job", _v2_node_and_lease),
    Migration(
        3,
        "jobs.dev, jobs.ino and jobs.ctime_ns: the file hashed; jobs.maybe_sent: submits that "
        "may have created a job; an index for retention",
        _v3_identity_and_retention,
    ),
)
assert MIGRATIONS[-1].version == SCHEMA_VERSION


class SchemaTooNew(Exception):
    def __init__(self, version: int) -> None:
        super().__init__(version)
        self.version = version


def current_version(conn: Connection) -> int | None:
    """The database's schema version; None for a database without blurd's tables."""
    if not inspect(conn).has_table(schema_info.name):
        return None
    version = conn.execute(select(func.max(schema_info.c.version))).scalar()
    return int(version) if version is not None else None


def pending(version: int | None) -> list[Migration]:
    """The steps a database at ``version`` still needs (all of them for a new database)."""
    return [m for m in MIGRATIONS if version is None or m.version > version]


def upgrade(conn: Connection, now: float) -> tuple[int | None, int]:
    """Bring the schema to SCHEMA_VERSION inside ``conn``'s transaction; (from, to).

    Raises SchemaTooNew for a database written by a newer blurd; it is left untouched.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
    before = current_version(conn)
    if before is not None and before > SCHEMA_VERSION:
        raise SchemaTooNew(before)
    if before is None:
        metadata.create_all(conn)
        conn.execute(insert(schema_info).values(version=SCHEMA_VERSION, applied_at=now))
        return None, SCHEMA_VERSION
    for step in pending(before):
        step.apply(conn)
        conn.execute(insert(schema_info).values(version=step.version, applied_at=now))
    return before, SCHEMA_VERSION

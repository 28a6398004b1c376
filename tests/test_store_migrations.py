"""Versioned migrations: older databases are brought forward to the shape of a new one, on
SQLite and on a real PostgreSQL server; newer ones are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    insert,
    inspect,
)

from blurd import migrations
from blurd.errors import StoreError
from blurd.models import SCHEMA_VERSION, schema_info
from blurd.store import Store
from tests.conftest import FakeClock


def _v1_tables(md: MetaData) -> None:
    """The schema as blurd 0.1 created it (version 1), frozen here for the upgrade test."""
    Table(
        "jobs", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("watch", String(1024), nullable=False),
        Column("rel_path", String(4096), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("mtime_ns", BigInteger, nullable=False),
        *(Column(n, String(64)) for n in ("sha256", "fingerprint")),
        Column("state", String(16), nullable=False),
        Column("remote_id", String(512)),
        Column("attempts", Integer, nullable=False, default=0),
        Column("requeues", Integer, nullable=False, default=0),
        Column("next_attempt_at", Float, nullable=False, default=0.0),
        Column("error", Text),
        Column("progress", String(128)),
        *(Column(n, String(512)) for n in ("result_media_name", "result_detections_name")),
        *(Column(n, String(4096)) for n in ("output_media", "output_detections")),
        Column("output_sha256", String(64)),
        Column("bytes_up", BigInteger, nullable=False, default=0),
        *(Column(n, Float, nullable=False) for n in ("created_at", "updated_at")),
        UniqueConstraint("watch", "rel_path", "size", "mtime_ns", name="uq_jobs_version"),
        Index("ix_jobs_state_due", "state", "next_attempt_at"),
        Index("ix_jobs_content", "sha256", "fingerprint", "state"),
    )  # fmt: skip
    Table("daemon_state", md, Column("node", String(255), primary_key=True),
          Column("data", Text, nullable=False),
          Column("updated_at", Float, nullable=False))  # fmt: skip
    Table("blurd_schema", md, Column("version", Integer, primary_key=True),
          Column("applied_at", Float, nullable=False))  # fmt: skip


def _make_v1(url: str) -> None:
    md = MetaData()
    _v1_tables(md)
    engine = create_engine(url)
    with engine.begin() as conn:
        md.create_all(conn)
        conn.execute(insert(md.tables["blurd_schema"]).values(version=1, applied_at=0.0))
        conn.execute(insert(md.tables["jobs"]).values(
            watch="w", rel_path="old.jpg", size=1, mtime_ns=1, state="processing",
            remote_id="r-old", attempts=0, requeues=0, next_attempt_at=0.0, bytes_up=0,
            created_at=0.0, updated_at=0.0))  # fmt: skip
    engine.dispose()


def _shape(url: str) -> dict[str, object]:
    engine = create_engine(url)
    insp = inspect(engine)
    shape: dict[str, object] = {}
    for table in sorted(insp.get_table_names()):
        shape[table] = (
            sorted((c["name"], c["nullable"]) for c in insp.get_columns(table)),
            sorted((i["name"], tuple(i["column_names"])) for i in insp.get_indexes(table)),
        )
    engine.dispose()
    return shape


def test_an_upgraded_database_has_the_shape_of_a_new_one(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A version-1 database brought forward by the migrations has the same tables, columns and
    indexes as one created new, keeps its rows, and records every version."""
    _make_v1(db_url)
    fresh_url = _fresh(db_url, tmp_path, request)
    store = Store(db_url, upgrade=True)
    try:
        assert store.schema_change == (1, SCHEMA_VERSION)
        old = store.list_jobs()
        assert [(j.rel_path, j.remote_id, j.node) for j in old] == [("old.jpg", "r-old", None)]
        with store.engine.begin() as conn:
            assert migrations.current_version(conn) == SCHEMA_VERSION
    finally:
        store.close()
    assert _shape(db_url) == _shape(fresh_url)
    again = Store(db_url)
    assert again.schema_change is None  # nothing left to apply
    again.close()


def test_a_shared_database_is_upgraded_only_on_purpose(
    postgres: object, clock: FakeClock
) -> None:
    """On PostgreSQL an older schema is refused with the command that upgrades it; a new, empty
    database is created at once."""
    url = postgres.new_database()  # type: ignore[attr-defined]
    _make_v1(url)
    with pytest.raises(StoreError, match=r"schema version 1, older .* `blurd db upgrade`"):
        Store(url)
    Store(url, upgrade=True).close()
    Store(url).close()
    Store(postgres.new_database()).close()  # type: ignore[attr-defined]


def test_a_database_from_a_newer_blurd_is_refused_on_every_backend(db_url: str) -> None:
    """A schema version above this blurd's is refused, not touched, even with upgrade=True."""
    Store(db_url).close()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"INSERT INTO blurd_schema (version, applied_at) VALUES ({SCHEMA_VERSION + 1}, 0)"
        )
    engine.dispose()
    for upgrade in (None, True):
        with pytest.raises(StoreError, match="newer than this blurd understands"):
            Store(db_url, upgrade=upgrade)


def _make_v2(url: str) -> None:
    """A version-2 database: version 1 brought forward by the steps up to 2, as blurd 0.2 did."""
    _make_v1(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        for step in migrations.MIGRATIONS:
            if step.version <= 2:
                step.apply(conn)
                conn.execute(insert(schema_info).values(version=step.version, applied_at=0.0))
    engine.dispose()


def _fresh(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database of the same kind as ``db_url``, created new at the newest version."""
    fresh_url = (
        f"sqlite:///{tmp_path}/fresh.db"
        if db_url.startswith("sqlite")
        else request.getfixturevalue("postgres").new_database()
    )
    Store(fresh_url).close()
    return str(fresh_url)


def test_a_version_2_database_gains_the_file_identity_and_the_retention_index(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Version 2 to 3: the jobs keep their values and have no file identity yet, an identity
    can be recorded with a hash (folded into signed 64 bits), and the database has the shape
    of a new one, the retention index included."""
    _make_v2(db_url)
    fresh_url = _fresh(db_url, tmp_path, request)
    store = Store(db_url, upgrade=True, clock=FakeClock())
    try:
        assert store.schema_change == (2, SCHEMA_VERSION) == (2, 3)
        [old] = store.list_jobs()
        assert (old.rel_path, old.remote_id) == ("old.jpg", "r-old")
        assert (old.dev, old.ino, old.ctime_ns) == (None, None, None)
        job = store.enqueue("w", "new.jpg", 1, 1)
        assert job is not None
        identity = (2**64 - 1, 7, 1_700_000_000_123_456_789)
        assert store.record_hash(job, "a" * 64, "f", identity=identity) == (True, None)
        row = store.get(job)
        assert row is not None and (row.dev, row.ino, row.ctime_ns) == (-1, 7, identity[2])
    finally:
        store.close()
    shape = _shape(db_url)
    assert shape == _shape(fresh_url)
    assert ("ix_jobs_retention", ("state", "updated_at")) in shape["jobs"][1]  # type: ignore[index]

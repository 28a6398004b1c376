"""The jobs table: unique versions, allowed and conditional transitions, recovery, safety."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from blurd.errors import InvalidTransition, StoreError
from blurd.models import TRANSITIONS, JobState, file_identity
from blurd.store import Store

S = JobState


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/db/blurd.db")
    yield s
    s.close()


def test_a_file_version_is_queued_once(store: Store) -> None:
    """The same (watch, path, size, mtime) is recorded once; a new mtime is a new job."""
    a = store.enqueue("w", "a.jpg", 10, 1)
    assert a is not None
    assert store.enqueue("w", "a.jpg", 10, 1) is None
    assert store.enqueue("w", "a.jpg", 10, 2) not in (None, a)
    assert store.counts()[S.QUEUED] == 2


def test_only_allowed_transitions_and_only_from_the_expected_state(store: Store) -> None:
    """A transition outside the table raises; one from a state the row is not in changes nothing."""
    job = store.enqueue("w", "a.jpg", 10, 1)
    assert job is not None
    with pytest.raises(InvalidTransition):
        store.transition(job, S.QUEUED, S.PROCESSING)
    assert store.transition(job, S.QUEUED, S.UPLOADING)
    assert not store.transition(job, S.QUEUED, S.UPLOADING)  # already moved: rowcount 0
    assert store.transition(job, S.UPLOADING, S.PROCESSING, remote_id="r1")
    row = store.get(job)
    assert row is not None and row.state is S.PROCESSING and row.remote_id == "r1"
    assert not store.update(job, S.QUEUED, error="x")
    with pytest.raises(InvalidTransition):
        store.update(job, S.PROCESSING, state="done")


def test_transition_table_matches_the_design() -> None:
    """Every state but done has a way out; done has none; failed only goes back to queued."""
    assert {new for old, new in TRANSITIONS if old is S.FAILED} == {S.QUEUED}
    assert not [t for t in TRANSITIONS if t[0] is S.DONE]
    assert {old for old, _ in TRANSITIONS} == set(JobState) - {S.DONE}


def test_recovery_requeues_uploads_and_keeps_remote_ids(store: Store) -> None:
    """At start-up uploading goes back to queued; processing keeps its remote id for polling."""
    up = store.enqueue("w", "up.jpg", 1, 1)
    proc = store.enqueue("w", "proc.jpg", 1, 1)
    assert up and proc
    store.transition(up, S.QUEUED, S.UPLOADING)
    store.transition(proc, S.QUEUED, S.UPLOADING)
    store.transition(proc, S.UPLOADING, S.PROCESSING, remote_id="rid", next_attempt_at=9e9)
    result = store.recover()
    assert result["requeued_uploads"] == 1 and result["resumed_processing"] == 1
    p = store.get(proc)
    assert p is not None and p.remote_id == "rid" and p.next_attempt_at == 0.0
    u = store.get(up)
    assert u is not None and u.state is S.QUEUED


def test_retry_puts_failed_jobs_back(store: Store) -> None:
    """`retry` moves failed jobs (by id or all) to queued and clears their error."""
    ids = [store.enqueue("w", f"{i}.jpg", 1, 1) for i in range(3)]
    for i in ids:
        assert i is not None
        store.transition(i, S.QUEUED, S.FAILED, error="bad")
    assert store.retry([ids[0]]) == 1  # type: ignore[list-item]
    assert store.retry() == 2
    assert all(j.state is S.QUEUED and j.error is None for j in store.list_jobs())


def test_sqlite_is_private_and_in_wal_mode(tmp_path: Path, store: Store) -> None:
    """The database file is readable by its owner only and runs in WAL mode."""
    db = tmp_path / "db" / "blurd.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_corrupt_database_is_a_clear_error_not_a_reset(tmp_path: Path) -> None:
    """A corrupt file raises StoreError naming it, and is left as it was."""
    db = tmp_path / "bad.db"
    junk = b"this is not a database" * 200
    db.write_bytes(junk)
    with pytest.raises(StoreError, match=r"bad\.db") as err:
        Store(f"sqlite:///{db}")
    assert "move the file aside" in str(err.value)
    assert db.read_bytes() == junk


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database written by a newer blurd is not touched."""
    url = f"sqlite:///{tmp_path}/b.db"
    Store(url).close()
    with sqlite3.connect(tmp_path / "b.db") as conn:
        conn.execute("INSERT INTO blurd_schema VALUES (99, 0)")
    with pytest.raises(StoreError, match="newer"):
        Store(url)


def test_the_remote_id_commit_is_flushed_and_the_connection_restored(
    tmp_path: Path, store: Store
) -> None:
    """transition_durably moves the row like transition(), through connections in FULL mode;
    the other connections stay in NORMAL mode."""
    job = store.enqueue("w", "a.jpg", 1, 1)
    assert job is not None
    store.transition(job, S.QUEUED, S.UPLOADING)
    assert store.transition_durably(job, S.UPLOADING, S.PROCESSING, remote_id="r")
    assert not store.transition_durably(job, S.UPLOADING, S.PROCESSING, remote_id="again")
    row = store.get(job)
    assert row is not None and row.remote_id == "r"
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with store._durable.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_orphans_of_a_forgetful_engine_go_back_to_the_queue_unpenalised(store: Store) -> None:
    """recover() with an engine that forgets its jobs: processing and downloading jobs return
    to queued without a remote id and without using their requeue budget; other states stay."""
    ids = {}
    for name, path in (("proc", [S.UPLOADING, S.PROCESSING]),
                       ("down", [S.UPLOADING, S.PROCESSING, S.DOWNLOADING]),
                       ("done", [S.UPLOADING, S.PROCESSING, S.DOWNLOADING, S.DONE])):  # fmt: skip
        job = store.enqueue("w", f"{name}.jpg", 1, 1)
        assert job is not None
        old = S.QUEUED
        for new in path:
            store.transition(job, old, new, remote_id="local-x")
            old = new
        ids[name] = job
    assert store.recover(keeps_remote_jobs=False)["requeued_orphans"] == 2
    for name in ("proc", "down"):
        row = store.get(ids[name])
        assert row is not None and row.state is S.QUEUED
        assert row.remote_id is None and row.requeues == 0
    done = store.get(ids["done"])
    assert done is not None and done.state is S.DONE


def test_the_file_identity_is_recorded_with_the_hash(tmp_path: Path, store: Store) -> None:
    """record_hash stores the file's (dev, ino, ctime_ns) as file_identity reads them; without
    an identity it keeps the one stored; update() records one too, folded into signed 64 bits."""
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x")
    st = path.stat()
    identity = file_identity(st)
    assert identity == (st.st_dev, st.st_ino, st.st_ctime_ns)  # small enough to stay as they are
    job = store.enqueue("w", "a.jpg", 1, 1)
    assert job is not None
    assert store.record_hash(job, "a" * 64, "f", identity=identity) == (True, None)
    row = store.get(job)
    assert row is not None and (row.dev, row.ino, row.ctime_ns) == identity
    assert store.record_hash(job, "b" * 64, "f") == (True, None)
    row = store.get(job)
    assert row is not None and row.sha256 == "b" * 64
    assert (row.dev, row.ino, row.ctime_ns) == identity
    assert store.update(job, S.QUEUED, dev=2**63, ino=5, ctime_ns=6)
    row = store.get(job)
    assert row is not None and (row.dev, row.ino, row.ctime_ns) == (-(2**63), 5, 6)


def test_batches_and_lookups_of_any_size_reuse_a_few_statements(store: Store) -> None:
    """The drivers keep every statement they ran (sqlite3: 128 per connection, up to 330 KiB
    each for a multi-row INSERT), so a statement per batch size made the daemon's memory grow
    with every file (scripts/soak). Whatever the sizes, only a few distinct statements run."""
    from sqlalchemy import event

    seen: set[str] = set()

    def record(_conn, _cursor, statement, _params, _context, _many) -> None:  # type: ignore[no-untyped-def]
        seen.add(statement)

    n = 0
    for engine in (store.engine, store._durable):
        event.listen(engine, "before_cursor_execute", record)
    for size in [1, 2, 3, 63, 64, 65, 127, 200, 333, 999, 1000, 1001]:
        added = store.enqueue_many("w", [(f"f{n + i}.jpg", 1, 1) for i in range(size)])
        assert len(added) == size
        n += size
    inserts = {s for s in seen if s.startswith("INSERT")}
    seen.clear()
    for size in range(1, 101):
        ids = list(range(1, size + 1))
        assert [j.id for j in sorted(store.get_many(ids), key=lambda j: j.id)] == ids
    assert len(inserts) == 2  # a full chunk and a single row
    assert len(seen) <= 8  # lookups of 1, 2, 4 … 128 jobs
    assert store.counts()[S.QUEUED] == n

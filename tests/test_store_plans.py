"""The plans of the claim statements: on SQLite each walks its partial claim index in due order,
whatever the planner's statistics (none, as blurd leaves them, or after an ANALYZE), so that a
claim costs the same with 1,000 queued rows as with 100,000."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import String, cast, literal, update

from blurd.models import jobs
from blurd.store import Store

ROWS = 500  # of each kind; enough for ANALYZE to see 2 rows per sha256 value, as at 100,000

INDEX = {False: "ix_jobs_claim_hash", True: "ix_jobs_claim_upload"}


@pytest.fixture(params=[False, True], ids=["no-statistics", "analyzed"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Path]]:
    """A SQLite store with ROWS queued jobs waiting to be hashed and ROWS hashed ones, each of
    its own content, as in scripts/bench-claims."""
    path = tmp_path / "blurd.db"
    store = Store(f"sqlite:///{path}", node="n")
    for kind in ("d", "h"):
        store.enqueue_many("w", [(f"{kind}/{i}.jpg", 1, 1) for i in range(ROWS)])
    with store.engine.begin() as conn:
        hashed = literal("0" * 48) + cast(jobs.c.id, String)
        conn.execute(
            update(jobs).where(jobs.c.rel_path.like("h/%")).values(sha256=hashed, fingerprint="f")
        )
        if request.param:
            conn.exec_driver_sql("ANALYZE")
    yield store, path
    store.close()


def plan(store: Store, path: Path, stmt: Any) -> list[str]:
    """EXPLAIN QUERY PLAN of ``stmt`` as the store runs it: compiled for its SQLite, positional."""
    sql = stmt.compile(dialect=store.engine.dialect)
    given = {**sql.params, "k_now": 1e9, "k_limit": 1, "v_node": "n", "v_lease": 2e9}
    with closing(sqlite3.connect(path)) as conn:
        query = "EXPLAIN QUERY PLAN " + sql.string
        return [row[3] for row in conn.execute(query, [given[n] for n in sql.positiontup])]


def on_index(line: str, index: str) -> bool:
    return (
        re.fullmatch(rf"SEARCH (TABLE )?jobs USING (COVERING )?INDEX {index} \(.*\)", line)
        is not None
    )


@pytest.mark.parametrize("prepared", [False, True], ids=["hash", "upload"])
def test_a_claim_walks_its_partial_index_and_updates_by_rowid(
    queue: tuple[Store, Path], prepared: bool
) -> None:
    store, path = queue
    lines = plan(store, path, store._claim_statement(prepared))
    # The update looks up the ids listed by the subquery, which walks the partial index in
    # due order: no other index, no sort.
    assert re.fullmatch(r"SEARCH (TABLE )?jobs USING INTEGER PRIMARY KEY \(rowid=\?\)", lines[0])
    assert lines[1] == "LIST SUBQUERY 1"
    assert on_index(lines[2], INDEX[prepared]), lines
    assert len(lines) == 3, lines


@pytest.mark.parametrize("prepared", [False, True], ids=["hash", "upload"])
def test_the_next_due_time_walks_the_partial_index(
    queue: tuple[Store, Path], prepared: bool
) -> None:
    store, path = queue
    lines = plan(store, path, store._next_queued_statement(prepared))
    assert len(lines) == 1 and on_index(lines[0], INDEX[prepared]), lines


def test_the_index_is_named_for_sqlite_only_and_the_claims_run(db_url: str) -> None:
    """PostgreSQL gets no INDEXED BY (it would be a syntax error there); both run the claims."""
    store = Store(db_url, node="n")
    try:
        store.enqueue_many("w", [("a.jpg", 1, 1), ("b.jpg", 1, 1)])
        for prepared in (False, True):
            for stmt in (store._claim_statement(prepared), store._next_queued_statement(prepared)):
                sql = str(stmt.compile(dialect=store.engine.dialect))
                named = f"FROM jobs INDEXED BY {INDEX[prepared]} " in sql
                assert named is store.is_sqlite and ("INDEXED" in sql) is store.is_sqlite
        assert store.next_queued_at(1e9, prepared=False) == 0.0
        assert store.next_queued_at(1e9, prepared=True) is None
        assert [j.rel_path for j in store.claim(1e9, 5, prepared=False)] == ["a.jpg", "b.jpg"]
        assert store.claim(1e9, 5, prepared=True) == []
    finally:
        store.close()

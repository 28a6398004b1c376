"""The node registry: one ``daemon_state`` row per running daemon, under its node id."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from blurd.errors import StoreError
from blurd.models import daemon_state
from blurd.store.database import Database


class Nodes(Database):
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

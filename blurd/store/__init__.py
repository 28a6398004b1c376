"""The jobs table: enqueue, conditional transitions, claims, leases, recovery, retention, and
the queries behind `status`.

Every change is one short transaction; a state change is ``UPDATE … WHERE id = ? AND state = ?``
and reports whether the row really moved. No I/O other than the database happens in here.

:class:`Store` is made of one part per concern, each a module of this package: the database
plumbing (:mod:`.database`), writing the queue (:mod:`.queue`), claims (:mod:`.claims`),
leases and recovery (:mod:`.leases`), the node registry (:mod:`.nodes`), the read model
(:mod:`.status`) and retention (:mod:`.retention`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from blurd import defaults
from blurd.store.claims import Claims
from blurd.store.leases import Leases
from blurd.store.nodes import Nodes
from blurd.store.queue import Queue
from blurd.store.retention import Retention
from blurd.store.status import Status

__all__ = ["Store"]


class Store(Queue, Claims, Leases, Nodes, Status, Retention):
    """All access to the jobs table goes through here.

    ``node`` names this daemon among those sharing the database: the jobs it claims carry it,
    with a lease of ``lease_s`` seconds that :meth:`renew_leases` extends. An upload claimed
    while a twin (identical content and options) is in flight waits ``twin_wait_s`` seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        node: str = "",
        lease_s: float = defaults.LEASE_S,
        upgrade: bool | None = None,
        twin_wait_s: float = defaults.TWIN_WAIT_S,
    ) -> None:
        """Open the database (see ``Database.__init__``); ``twin_wait_s`` as above."""
        self.twin_wait_s = twin_wait_s
        self.rehashed = 0
        super().__init__(url, clock=clock, node=node, lease_s=lease_s, upgrade=upgrade)

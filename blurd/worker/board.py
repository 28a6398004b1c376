"""What the scheduler knows without asking the database, in monotonic seconds.

Jobs this node holds at the engine and when their next step is due; the steps queued or
running; when the queue may next hold something claimable. The database stays the truth:
``replace_held`` resyncs the jobs at the engine with every lease renewal.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

Kind = str  # "prepare", "upload" or "io": which pool a step runs in


class Board:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self._held: dict[int, float] = {}
        # Steps queued or running, per job. A count, not a set: a step may hand its job back
        # to the queue a moment before it ends, and the job's next step may start meanwhile.
        self._busy: dict[int, int] = {}
        self._running: dict[Kind, int] = {"prepare": 0, "upload": 0, "io": 0}
        # When a claim of queued jobs (hashed: True, not yet: False) may next find one; news
        # that the queue changed brings it forward. Between the two the queue is not asked.
        self._claimable_at: dict[bool, float] = {False: 0.0, True: 0.0}
        self._news = 0
        self._polls: dict[int, int] = {}
        self._odd: dict[int, int] = {}

    # ------------------------------------------------------------ jobs at the engine

    def hold(self, job_id: int, due: float) -> None:
        with self.lock:
            self._held[job_id] = due
        self.wake.set()

    def drop(self, job_id: int) -> None:
        with self.lock:
            self._held.pop(job_id, None)
            self._polls.pop(job_id, None)
            self._odd.pop(job_id, None)

    def holds(self, job_id: int) -> bool:
        with self.lock:
            return job_id in self._held

    def held_count(self) -> int:
        with self.lock:
            return len(self._held)

    def due(self, now: float, limit: int) -> list[int]:
        """Held jobs whose step is due and not running."""
        with self.lock:
            due = [i for i, at in self._held.items() if at <= now and i not in self._busy]
        return due[:limit]

    def replace_held(self, from_db: dict[int, float]) -> None:
        """The database's view of this node's jobs at the engine; a job with a step running
        keeps the time that step will record."""
        with self.lock:
            busy = {i: self._held[i] for i in self._busy if i in self._held}
            self._held = {**from_db, **busy}

    def count_poll(self, job_id: int, odd: bool) -> tuple[int, int]:
        """One more poll of this job: (polls so far, unexpected statuses in a row)."""
        with self.lock:
            n = self._polls[job_id] = self._polls.get(job_id, 0) + 1
            k = self._odd[job_id] = self._odd.get(job_id, 0) + 1 if odd else 0
            return n, k

    # ------------------------------------------------------------ steps

    def start(self, job_id: int, kind: Kind) -> None:
        with self.lock:
            self._busy[job_id] = self._busy.get(job_id, 0) + 1
            self._running[kind] += 1

    def end(self, job_id: int, kind: Kind) -> None:
        with self.lock:
            left = self._busy.pop(job_id, 1) - 1
            if left:
                self._busy[job_id] = left
            self._running[kind] -= 1
        self.wake.set()

    def running(self, kind: Kind) -> int:
        with self.lock:
            return self._running[kind]

    def busy(self) -> int:
        with self.lock:
            return len(self._busy)

    # ------------------------------------------------------------ the queue

    def news(self, prepared: bool, at: float) -> None:
        """A queued job (hashed or not) becomes claimable at ``at``."""
        with self.lock:
            self._news += 1
            self._claimable_at[prepared] = min(self._claimable_at[prepared], at)
        self.wake.set()

    def claimable(self, prepared: bool, now: float) -> int | None:
        """None when the queue need not be asked now; else the news count to hand back to
        ``looked`` (news that arrives meanwhile wins over a claim's stale look)."""
        with self.lock:
            return self._news if now >= self._claimable_at[prepared] else None

    def looked(self, prepared: bool, news: int, next_at: float) -> None:
        with self.lock:
            if self._news == news:
                self._claimable_at[prepared] = next_at

    def next_due(self, now: float, queues: Iterable[bool]) -> float:
        """The earliest time something may be due: a held job, or a queue this node has
        room for; ``now + 3600`` when nothing is."""
        with self.lock:
            times = [at for i, at in self._held.items() if i not in self._busy]
            times += [self._claimable_at[p] for p in queues]
        return min(times, default=now + 3600.0)

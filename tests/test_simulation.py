"""Deterministic simulation of the worker under every fault, in every order.

Hypothesis drives the real scheduler, steps, outcome table and gates, on a real SQLite file and
real folders, against a scripted engine and a fake clock (tests/simulation.py). Each run is a
sequence of events — files added, replaced, renamed or rewritten in place, engine faults,
bad credentials, no credit, database outages, crashes, a watch removed by SIGHUP — with the
invariants checked after every one; at the end the faults stop and every job must finish.
A failing sequence is a reproducible bug: keep it below as a regression test.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from structlog.testing import capture_logs

from blurd import writer
from blurd.config import WatchConfig
from blurd.defaults import TEMP_PREFIX
from blurd.metrics import Metrics
from blurd.models import JobState
from blurd.store import Store
from blurd.worker import Timing, Worker
from tests.simulation import JPEG, Clock, Crash, FlakyStore, SimEngine, SimStop, anonymized

S = JobState
FINAL = (S.DONE, S.FAILED)
# Production delays, but the scheduler may sleep longer between looks (the simulation tells it
# of every file it queues, and leases last an hour): idle simulated time is then almost free,
# while jobs that are due still tick as often as their retries ask.
TIMING = Timing(idle_wait_max_s=900.0, queue_look_s=600.0)
LEASE_S = 3600.0
# A job whose twin is in flight looks again this often: 5 s in production (0.3 ms a look), but
# through a simulated three-day outage that is 50,000 looks of real time for nothing new.
TWIN_WAIT_S = 60.0
CONTENTS = [JPEG + bytes([i]) * (200 + i) for i in range(6)]
SUBMIT_FAULTS = ["503", "429", "drop", "403", "400", "timeout_after_send", "garbage_2xx",
                 "crash_after_send", "crash", "shrank"]  # fmt: skip
POLL_FAULTS = ["503", "429", "drop", "403", "garbage", "unknown", "failed", "revoked", "crash"]
FETCH_FAULTS = ["503", "drop", "403", "404", "404_lost", "truncated", "garbage", "empty",
                "disk_full", "crash_mid_write", "crash"]  # fmt: skip
FAMILIES = ("crash", "database", "sighup", "credentials", "credit", "replace")
FAULTS = {"submit": SUBMIT_FAULTS, "poll": POLL_FAULTS, "fetch": FETCH_FAULTS,
          "login": ["drop", "503"]}  # fmt: skip


class World:
    """blurd's worker and store on a fake clock, restartable as after a kill -9."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.clock = Clock()
        self.engine = SimEngine(self.clock, rng=random.Random(seed))
        self.rng = random.Random(seed)
        self.db = f"sqlite:///{root}/blurd.db"
        self.all_watches = [
            WatchConfig(path=root / "a", output=root / "a-out", originals="delete"),
            WatchConfig(path=root / "b", output=root / "b-out", originals="keep"),
        ]
        for w in self.all_watches:
            w.path.mkdir()
        self.watches = list(self.all_watches)
        self.files: dict[Path, bytes] = {}  # what the test put in the inboxes, and still there
        self.contents = {hashlib.sha256(c).hexdigest(): c for c in CONTENTS}
        self.crashes = 0
        self._start()

    def _start(self) -> None:
        self.raw = Store(self.db, clock=self.clock.wall, node="sim", twin_wait_s=TWIN_WAIT_S,
                         lease_s=LEASE_S)
        self.store = FlakyStore(self.raw)
        self.raw.recover(keeps_remote_jobs=True)
        for w in self.all_watches:
            writer.clean_temp_files(w.output)
        self.worker = Worker(cast(Store, self.store), self.engine, self.watches, timing=TIMING,
                             clock=self.clock.wall, monotonic=self.clock.monotonic,
                             rng=self.rng.random, metrics=Metrics())  # fmt: skip
        self.worker.stop = self.worker.applier.stop = SimStop(self.clock)

    def crash(self) -> None:
        """kill -9 and a restart: memory is gone; the database and the folders stay."""
        self.crashes += 1
        self.raw.close()
        self._start()
        # A remote id the engine handed out but the database never recorded died with the
        # process: uploading that file again is the documented crash window, not a bug.
        recorded = {j.remote_id for j in self.raw.list_jobs(limit=10_000) if j.remote_id}
        for rid, remote in self.engine.remote.items():
            if rid not in recorded:
                remote.known = False
        self.run(0.01)  # the daemon's first tick follows its start at once

    def close(self) -> None:
        self.raw.close()

    def run(self, seconds: float) -> None:
        end = self.clock.mono + seconds
        while self.clock.mono < end:
            try:
                wait = self.worker.tick()
            except Crash:
                self.crash()
                continue
            self.clock.advance(min(max(wait, 0.01), end - self.clock.mono))

    def enqueue(self, path: Path) -> None:
        watch = next(w for w in self.all_watches if path.parent == w.path)
        st = path.lstat()
        self.raw.enqueue(watch.name, path.name, st.st_size, st.st_mtime_ns)
        self.worker.wake()

    def settle(self, limit_s: float = 6 * 3600) -> None:
        """The faults stop: run until every job is done or failed."""
        self.engine.faults = {k: [] for k in self.engine.faults}
        self.engine.rates.clear()
        self.engine.bad_credentials = self.engine.no_credit = False
        self.store.fail, self.store.crash_in = 0, -1
        self.watches[:] = self.all_watches
        self.worker.set_watches(self.watches)
        end = self.clock.mono + limit_s
        while self.clock.mono < end:
            self.run(600)
            if all(j.state in FINAL for j in self.raw.list_jobs(limit=10_000)):
                return


class WorkerUnderFaults(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="blurd-sim-")
        self.world: World

    @initialize(seed=st.integers(0, 2**16), background=st.data())
    def start(self, seed: int, background: st.DataObject) -> None:
        """Each run starts with faults of its own in the background (swarm testing): a kind
        and a rate for every kind of call, so that whatever else happens meets faults."""
        self.world = World(Path(self.tmp.name), seed)
        # Swarm testing: each run enables some families of events only. A crash restarts the
        # worker with fresh gates, so runs full of crashes hide bugs that live in memory.
        self.swarm = background.draw(st.sets(st.sampled_from(FAMILIES)), label="swarm")
        for call, choices in FAULTS.items():
            kind = background.draw(st.sampled_from([k for k in choices if "crash" not in k]))
            rate = background.draw(st.sampled_from([0.0, 0.1, 0.3]))
            self.world.engine.rates[call] = (kind, rate)

    # ------------------------------------------------------------------ the user's files

    @rule(watch=st.integers(0, 1), name=st.integers(0, 5), content=st.integers(0, 5))
    def add_file(self, watch: int, name: int, content: int) -> None:
        path = self.world.all_watches[watch].path / f"f{name}.jpg"
        if path.exists():
            return
        path.write_bytes(CONTENTS[content])
        self.world.files[path] = CONTENTS[content]
        self.world.enqueue(path)

    @rule(which=st.integers(0, 50), content=st.integers(0, 5))
    def replace_file(self, which: int, content: int) -> None:
        """A new file saved under the same name (new inode, new mtime)."""
        if "replace" not in self.swarm:
            return
        path = self._pick(which)
        if path is None:
            return
        tmp = path.with_name(".incoming")
        tmp.write_bytes(CONTENTS[content] + b"v2")
        os.replace(tmp, path)
        self.world.files[path] = CONTENTS[content] + b"v2"
        self.world.contents[hashlib.sha256(self.world.files[path]).hexdigest()] = (
            self.world.files[path]
        )
        self.world.enqueue(path)

    @rule(which=st.integers(0, 50))
    def rename_file(self, which: int) -> None:
        if "replace" not in self.swarm:
            return
        path = self._pick(which)
        if path is None:
            return
        new = path.with_name(f"renamed-{path.name}")
        if new.exists():
            return
        os.rename(path, new)
        self.world.files[new] = self.world.files.pop(path)
        self.world.enqueue(new)

    @rule(which=st.integers(0, 50), content=st.integers(0, 5))
    def rewrite_in_place(self, which: int, content: int) -> None:
        """Same size and mtime, other bytes: invisible to the watcher, not to the worker."""
        if "replace" not in self.swarm:
            return
        path = self._pick(which)
        if path is None:
            return
        old, st_ = self.world.files[path], path.lstat()
        new = (CONTENTS[content] * 3)[: len(old)]
        with open(path, "r+b") as fh:
            fh.write(new)
        os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))
        self.world.files[path] = new
        self.world.contents[hashlib.sha256(new).hexdigest()] = new

    def _pick(self, which: int) -> Path | None:
        present = sorted(p for p in self.world.files if p.exists())
        return present[which % len(present)] if present else None

    # ------------------------------------------------------------------ the world's faults

    @rule(kind=st.sampled_from(SUBMIT_FAULTS), times=st.integers(1, 4))
    def submit_fault(self, kind: str, times: int) -> None:
        self._queue("submit", kind, times)

    @rule(kind=st.sampled_from(POLL_FAULTS), times=st.integers(1, 4))
    def poll_fault(self, kind: str, times: int) -> None:
        self._queue("poll", kind, times)

    @rule(kind=st.sampled_from(FETCH_FAULTS), times=st.integers(1, 6))
    def fetch_fault(self, kind: str, times: int) -> None:
        self._queue("fetch", kind, times)

    def _queue(self, call: str, kind: str, times: int) -> None:
        if "crash" in kind and "crash" not in self.swarm:
            return
        self.world.engine.faults[call] += [kind] * times

    @rule(kind=st.sampled_from(["drop", "503"]), times=st.integers(1, 3))
    def login_fault(self, kind: str, times: int) -> None:
        self.world.engine.faults["login"] += [kind] * times

    @rule(call=st.sampled_from(["submit", "poll", "fetch", "login"]), kinds=st.data(),
          rate=st.sampled_from([0.0, 0.15, 0.5]))  # fmt: skip
    def standing_fault(self, call: str, kinds: st.DataObject, rate: float) -> None:
        """From now on, each call of this kind fails this way with this probability."""
        kind = kinds.draw(st.sampled_from([k for k in FAULTS[call] if "crash" not in k]))
        self.world.engine.rates[call] = (kind, rate)

    @rule(on=st.booleans())
    def credentials(self, on: bool) -> None:
        if "credentials" not in self.swarm:
            return
        self.world.engine.bad_credentials = not on

    @rule(on=st.booleans())
    def credit(self, on: bool) -> None:
        if "credit" not in self.swarm:
            return
        self.world.engine.no_credit = not on

    @rule(calls=st.integers(1, 8))
    def database_outage(self, calls: int) -> None:
        if "database" not in self.swarm:
            return
        self.world.store.fail = calls

    @rule(after=st.integers(0, 12))
    def crash_in_database_step(self, after: int) -> None:
        """kill -9 at the ``after``-th database call from now (0: the next one)."""
        if "crash" not in self.swarm:
            return
        self.world.store.crash_in = after

    @rule(present=st.booleans())
    def sighup(self, present: bool) -> None:
        """SIGHUP with watch b removed from the config, or put back."""
        if "sighup" not in self.swarm:
            return
        w = self.world
        w.watches[:] = w.all_watches if present else w.all_watches[:1]
        w.worker.set_watches(w.watches)

    @rule(seconds=st.sampled_from([0.5, 2.0, 10.0, 60.0, 400.0, 7200.0, 86400.0, 259200.0]))
    def time_passes(self, seconds: float) -> None:
        self.world.run(seconds)

    # ------------------------------------------------------------------ what must hold

    @invariant()
    def nothing_is_lost_or_stuck(self) -> None:
        if not hasattr(self, "world"):
            return
        w = self.world
        assert not w.engine.violations, w.engine.violations
        for job in w.raw.list_jobs(limit=10_000):
            assert job.state is not S.UPLOADING or job.node == "sim", job
            if job.state in (S.PROCESSING, S.DOWNLOADING):
                assert w.worker.board.holds(job.id), f"job {job.id} is stuck in {job.state}"
            if job.state is S.DONE and job.sha256 is not None and job.output_media:
                placed = Path(job.output_media).read_bytes()
                assert placed == anonymized(w.contents[job.sha256]), f"job {job.id} output"
                if job.output_detections:
                    json.loads(Path(job.output_detections).read_bytes())
        self._originals_only_after_outputs()

    def _originals_only_after_outputs(self) -> None:
        w = self.world
        jobs = w.raw.list_jobs(limit=10_000)
        for path, content in w.files.items():
            if path.exists():
                continue
            assert path.parent == w.all_watches[0].path, f"{path} vanished from a keep watch"
            sha = hashlib.sha256(content).hexdigest()
            done = [j for j in jobs if j.state is S.DONE and j.rel_path == path.name
                    and j.sha256 == sha and j.output_media]  # fmt: skip
            assert done, f"{path} was deleted without a verified output of that version"

    def teardown(self) -> None:
        if hasattr(self, "world"):
            try:
                self._finishes()
            finally:
                self.world.close()
        self.tmp.cleanup()

    def _finishes(self) -> None:
        w = self.world
        w.settle()
        self.nothing_is_lost_or_stuck()
        jobs = w.raw.list_jobs(limit=10_000)
        stuck = [(j.id, j.state, j.error) for j in jobs if j.state not in FINAL]
        assert not stuck, f"not finished once the faults stopped: {stuck}"
        assert w.worker.gates.auth.is_open()
        left = [n for n in os.listdir(w.all_watches[0].output) if n.startswith(TEMP_PREFIX)] if (
            w.all_watches[0].output.exists()) else []  # fmt: skip
        assert not left, left


WorkerUnderFaults.TestCase.settings = settings(
    max_examples=int(os.environ.get("BLURD_SIM_EXAMPLES", "100")),
    stateful_step_count=int(os.environ.get("BLURD_SIM_STEPS", "80")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestWorkerUnderFaults = WorkerUnderFaults.TestCase


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path, seed=1)


def test_a_probe_that_meets_a_dropped_connection_does_not_pause_uploads_for_good(
    world: World,
) -> None:
    """402, then the probe upload meets a dropped connection: the gate is re-armed and, once
    credit is back, every file is done (the old worker stayed paused forever)."""
    world.engine.no_credit = True
    for i in range(6):
        path = world.all_watches[1].path / f"f{i}.jpg"
        path.write_bytes(CONTENTS[i])
        world.enqueue(path)
    world.run(5)
    world.engine.no_credit = False
    world.engine.faults["submit"] = ["drop", "429", "503"]
    world.run(600)
    assert all(j.state is S.DONE for j in world.raw.list_jobs()), world.raw.list_jobs()
    world.close()


def test_a_403_on_one_file_holds_up_no_other(world: World) -> None:
    """A 403 at submit is that job's, not the account's: the others go on at once."""
    world.engine.faults["submit"] = ["403"] * 10
    for i in range(3):
        path = world.all_watches[1].path / f"f{i}.jpg"
        path.write_bytes(CONTENTS[i])
        world.enqueue(path)
    world.run(30)
    states = sorted(j.state for j in world.raw.list_jobs())
    assert states.count(S.DONE) >= 1 and world.worker.gates.auth.is_open()
    world.run(3600)
    jobs = world.raw.list_jobs()
    assert [j.state for j in jobs].count(S.FAILED) >= 1
    assert all(j.state in FINAL for j in jobs)
    world.close()


def test_identical_content_in_flight_is_uploaded_once(world: World) -> None:
    """Two copies dropped together, and a third in the other watch: one upload."""
    for w, name in ((0, "a.jpg"), (0, "b.jpg"), (1, "c.jpg")):
        path = world.all_watches[w].path / name
        path.write_bytes(CONTENTS[0])
        world.files[path] = CONTENTS[0]
        world.enqueue(path)
    world.run(120)
    assert [j.state for j in world.raw.list_jobs()] == [S.DONE] * 3
    assert sum(world.engine.submits.values()) == 1
    world.close()


def test_a_garbage_result_is_never_placed_and_costs_no_original(world: World) -> None:
    """A 200 result that is an HTML page: not placed, the original (originals = delete)
    untouched; after five such bodies the job fails."""
    path = world.all_watches[0].path / "a.jpg"
    path.write_bytes(CONTENTS[1])
    world.files[path] = CONTENTS[1]
    world.engine.faults["fetch"] = ["garbage"] * 20
    world.enqueue(path)
    world.run(3600)
    (job,) = world.raw.list_jobs()
    assert job.state is S.FAILED and "HTML" in (job.error or ""), job
    assert path.read_bytes() == CONTENTS[1]
    assert not any(world.all_watches[0].output.glob("*.jpg"))
    world.close()


def test_media_placed_is_not_fetched_again_when_the_detections_fail(world: World) -> None:
    """The detections fetch fails (truncated, then 503s): only the detections are fetched
    again; the media is placed once."""
    fetched: list[str] = []
    original = world.engine.fetch

    def counting(remote_id, status, part, out):  # type: ignore[no-untyped-def]
        fetched.append(part)
        if part == "detections" and fetched.count("detections") < 4:
            world.engine.faults["fetch"].insert(0, "truncated")
        return original(remote_id, status, part, out)

    world.engine.fetch = counting  # type: ignore[method-assign]
    path = world.all_watches[1].path / "a.jpg"
    path.write_bytes(CONTENTS[2])
    world.enqueue(path)
    world.run(600)
    (job,) = world.raw.list_jobs()
    assert job.state is S.DONE
    assert fetched.count("media") == 1 and fetched.count("detections") == 4
    world.close()


def test_a_402_pause_with_nothing_left_to_upload_lets_the_scheduler_sleep(world: World) -> None:
    """After a 402, the one queued file fails otherwise (403s): the pause is due for a probe
    but nothing is queued to probe with. The scheduler sleeps until news or its queue look
    instead of waking every 50 ms (found by the simulation: 20,000 ticks in one minute)."""
    world.engine.no_credit = True
    path = world.all_watches[1].path / "a.jpg"
    path.write_bytes(CONTENTS[0])
    world.enqueue(path)
    world.run(1)
    world.engine.no_credit = False
    world.engine.faults["submit"] = ["403"] * 10
    world.run(3600)
    assert [j.state for j in world.raw.list_jobs()] == [S.FAILED]
    for _ in range(100):
        world.clock.advance(world.worker.tick())
    assert world.clock.mono - 1000.0 > 3600 + 100 * 60, "the scheduler woke up too often"
    world.close()


def test_only_submits_that_may_have_created_a_job_count_towards_their_bound(world: World) -> None:
    """A 503, a 429 and two timeouts after the body was sent: the job is still retried and
    done (only the two may have cost money); a third such submit ends it without a fourth.
    (The soak found jobs failed by a 503, a 429 and one drop counted together.)"""
    first, second = (world.all_watches[1].path / n for n in ("a.jpg", "b.jpg"))
    first.write_bytes(CONTENTS[0])
    world.engine.faults["submit"] = ["503", "429", "timeout_after_send", "timeout_after_send"]
    world.enqueue(first)
    world.run(3600)
    (job,) = world.raw.list_jobs()
    assert job.state is S.DONE and job.maybe_sent == 2
    second.write_bytes(CONTENTS[1])
    world.engine.faults["submit"] = ["timeout_after_send"] * 3 + ["503"] * 5
    world.enqueue(second)
    world.run(3600)
    jobs = {j.rel_path: j for j in world.raw.list_jobs()}
    assert jobs["b.jpg"].state is S.FAILED and "not sent again" in (jobs["b.jpg"].error or "")
    assert world.engine.faults["submit"] == ["503"] * 5  # no fourth submit
    world.close()


def test_a_file_that_shrinks_while_it_is_sent_is_hashed_again_and_sent_once_more(
    world: World,
) -> None:
    """An upload cut short because the file got shorter (the API saw fewer bytes than
    announced, so no job exists): not a failure and not a possible double charge; the job is
    hashed again and sent."""
    path = world.all_watches[1].path / "a.jpg"
    path.write_bytes(CONTENTS[0])
    world.engine.faults["submit"] = ["shrank"]
    world.enqueue(path)
    with capture_logs() as logs:
        world.run(3600)
    (job,) = world.raw.list_jobs()
    assert job.state is S.DONE and not job.maybe_sent
    events = [e["event"] for e in logs]
    assert "job.rehash" in events and "job.step_error" not in events
    assert world.engine.faults["submit"] == [] and sum(world.engine.submits.values()) == 1
    world.close()


def test_an_outcome_that_cannot_be_applied_leaves_no_job_held_for_ever(world: World) -> None:
    """A bug while an upload's outcome is applied (not a database error): the job goes back
    to the queue instead of staying `uploading` under a lease this node renews for ever, and
    it is done once the bug is gone."""
    original = world.worker.applier._submitted
    calls: list[int] = []

    def broken_once(job, out):  # type: ignore[no-untyped-def]
        calls.append(job.id)
        if len(calls) == 1:
            raise ValueError("a bug in applying")
        original(job, out)

    world.worker.applier._submitted = broken_once  # type: ignore[method-assign]
    path = world.all_watches[1].path / "a.jpg"
    path.write_bytes(CONTENTS[0])
    world.enqueue(path)
    world.run(1)
    (job,) = world.raw.list_jobs()
    assert job.state is S.QUEUED and job.node is None, job
    world.run(600)
    (job,) = world.raw.list_jobs()
    assert job.state is S.DONE and len(calls) == 2
    world.close()

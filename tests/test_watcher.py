"""The folder watcher with real folders and real watchdog events; the settle clock is faked."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from watchdog.events import FileSystemEvent
from watchdog.observers.inotify import InotifyObserver

from blurd.config import WatchConfig
from blurd.events import filesystem_type, wants_polling
from blurd.models import Job
from blurd.store import Store
from blurd.watcher import FolderWatcher
from tests.conftest import FakeClock, wait_for

SETTLE = 5.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/blurd.db")
    yield s
    s.close()


def make_watcher(
    tmp_path: Path, store: Store, clock: FakeClock, *, polling: bool = False, **kw: object
) -> FolderWatcher:
    root = tmp_path / "in"
    root.mkdir(exist_ok=True)
    watch = WatchConfig(path=root, output=tmp_path / "out", settle_s=SETTLE, polling=polling)
    return FolderWatcher(watch, store, clock=clock, rescan_s=3600, **kw)  # type: ignore[arg-type]


def queued(store: Store) -> dict[str, Job]:
    return {j.rel_path: j for j in store.list_jobs(limit=1000)}


def settle(w: FolderWatcher, clock: FakeClock) -> None:
    """Take in pending events, then let the whole settle window pass; again while events that
    came in late (a close after a write) restarted some window."""
    w.tick()
    for _ in range(5):
        clock.advance(SETTLE + 0.1)
        w.tick()
        if not w.pending():
            break


@pytest.fixture
def watcher(tmp_path: Path, store: Store, clock: FakeClock) -> Iterator[FolderWatcher]:
    w = make_watcher(tmp_path, store, clock)
    w.tick()  # starts the observer and does the start-up scan
    yield w
    w.stop()


def test_a_file_is_queued_only_once_complete(
    watcher: FolderWatcher, store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    """A file still being written is not queued; once it stops changing it is, at full size."""
    nested = tmp_path / "in" / "2024" / "july"
    nested.mkdir(parents=True)
    f = nested / "a.jpg"
    with f.open("wb") as fh:
        fh.write(b"x" * 1000)
        fh.flush()
        wait_for(lambda: watcher.pending(), what="the first write event")
        watcher.tick()
        clock.advance(SETTLE - 1)
        watcher.tick()
        assert queued(store) == {}
        fh.write(b"y" * 1000)
        fh.flush()
        wait_for(lambda: watcher._touched, what="the second write event")
        watcher.tick()
        clock.advance(2)
        watcher.tick()
        assert queued(store) == {}  # the window restarted with the write
    # Closing the file is an event too (it restarts the window): take it in before settling.
    wait_for(lambda: watcher._touched, what="the close event")
    settle(watcher, clock)
    job = queued(store)["2024/july/a.jpg"]
    assert job.size == 2000


def test_a_file_renamed_from_a_hidden_temp_name_is_queued(
    watcher: FolderWatcher, store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    """Writing `.a.jpg.tmp` queues nothing; renaming it to `a.jpg` queues `a.jpg`."""
    tmp = tmp_path / "in" / ".a.jpg.tmp"
    tmp.write_bytes(b"data")
    settle(watcher, clock)
    assert queued(store) == {}
    tmp.rename(tmp_path / "in" / "a.jpg")
    wait_for(lambda: watcher.pending(), what="the rename event")
    settle(watcher, clock)
    assert list(queued(store)) == ["a.jpg"]


def test_ignored_names_are_never_queued(
    watcher: FolderWatcher, store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    """Hidden, temporary and NAS housekeeping files are skipped by events and by scans."""
    root = tmp_path / "in"
    (root / "@eaDir").mkdir()
    for name in (".DS_Store", "Thumbs.db", "~x.jpg", "a.jpg.part", "b.crdownload", "@eaDir/t.jpg"):
        (root / name).write_bytes(b"x")
    (root / "ok.jpg").write_bytes(b"x")
    wait_for(lambda: watcher.pending(), what="events")
    settle(watcher, clock)
    watcher.scan()
    settle(watcher, clock)
    assert list(queued(store)) == ["ok.jpg"]


def test_symlinks_are_recorded_but_never_followed(
    watcher: FolderWatcher, store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    """A link to a folder outside is not traversed; links are recorded (the worker rejects them)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"x")
    os.symlink(outside, tmp_path / "in" / "linkdir")
    os.symlink(outside / "secret.jpg", tmp_path / "in" / "link.jpg")
    watcher.scan()
    settle(watcher, clock)
    jobs = queued(store)
    assert "linkdir/secret.jpg" not in jobs
    assert set(jobs) <= {"linkdir", "link.jpg"} and "link.jpg" in jobs


def test_startup_scan_finds_existing_files_and_knows_queued_ones(
    tmp_path: Path, store: Store, clock: FakeClock
) -> None:
    """Files present before start are queued once; a second start queues nothing new."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"a")
    (root / "sub" / "b.png").write_bytes(b"b")
    for _ in range(2):
        w = make_watcher(tmp_path, store, clock)
        try:
            settle(w, clock)
        finally:
            w.stop()
    assert sorted(queued(store)) == ["a.jpg", "sub/b.png"]
    assert len(store.list_jobs()) == 2


def test_a_folder_moved_in_is_scanned(
    watcher: FolderWatcher, store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    """Moving a folder full of files into the watch queues the files inside it."""
    src = tmp_path / "album"
    (src / "deep").mkdir(parents=True)
    (src / "1.jpg").write_bytes(b"1")
    (src / "deep" / "2.jpg").write_bytes(b"2")
    shutil.move(str(src), tmp_path / "in" / "album")
    wait_for(lambda: watcher.pending(), what="the move event")
    settle(watcher, clock)
    assert sorted(queued(store)) == ["album/1.jpg", "album/deep/2.jpg"]


def test_excluded_folders_are_never_looked_into(
    tmp_path: Path, store: Store, clock: FakeClock
) -> None:
    """Files under an excluded (output or archive) folder are not queued."""
    excluded = tmp_path / "in" / "done"
    excluded.mkdir(parents=True)
    (excluded / "x.jpg").write_bytes(b"x")
    (tmp_path / "in" / "y.jpg").write_bytes(b"y")
    w = make_watcher(tmp_path, store, clock, excluded=[excluded])
    try:
        settle(w, clock)
    finally:
        w.stop()
    assert list(queued(store)) == ["y.jpg"]


def test_a_vanished_watch_folder_is_waited_for(
    watcher: FolderWatcher, store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    """A missing watch folder queues and forgets nothing; when it returns, watching resumes."""
    root = tmp_path / "in"
    (root / "a.jpg").write_bytes(b"a")
    wait_for(lambda: watcher.pending(), what="the create event")
    settle(watcher, clock)
    shutil.rmtree(root)
    settle(watcher, clock)
    assert list(queued(store)) == ["a.jpg"]
    root.mkdir()
    (root / "b.jpg").write_bytes(b"b")
    settle(watcher, clock)
    settle(watcher, clock)
    assert sorted(queued(store)) == ["a.jpg", "b.jpg"]
    (root / "c.jpg").write_bytes(b"c")  # events flow again from the restarted observer
    wait_for(lambda: watcher.pending(), what="an event from the new observer")
    settle(watcher, clock)
    assert "c.jpg" in queued(store)


def test_polling_observer_sees_new_files(tmp_path: Path, store: Store, clock: FakeClock) -> None:
    """With polling = true (network shares) new files are still seen without a rescan."""
    w = make_watcher(tmp_path, store, clock, polling=True)
    try:
        w.tick()
        (tmp_path / "in" / "p.jpg").write_bytes(b"p")
        wait_for(lambda: w.pending(), timeout=15, what="a polling event")
        settle(w, clock)
    finally:
        w.stop()
    assert list(queued(store)) == ["p.jpg"]


def test_filesystem_type_picks_the_longest_mount(tmp_path: Path) -> None:
    """Network and FUSE mounts switch `polling = "auto"` to polling."""
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\nserver:/media /srv/media nfs4 rw 0 0\n"
        "sshfs#x /mnt/fuse fuse.sshfs rw 0 0\n"
    )
    assert filesystem_type(Path("/srv/media/inbox"), str(mounts)) == "nfs4"
    assert filesystem_type(Path("/srv/mediaX"), str(mounts)) == "ext4"
    assert filesystem_type(Path("/mnt/fuse/a"), str(mounts)) == "fuse.sshfs"
    forced = WatchConfig(path=Path("/srv/media/inbox"), output=Path("/x"), polling=True)
    assert wants_polling(forced) == (True, "polling is set in the config")
    off = WatchConfig(path=Path("/srv/media/inbox"), output=Path("/x"), polling=False)
    assert wants_polling(off)[0] is False


@pytest.mark.parametrize("polling", [False, True], ids=["native", "polling"])
def test_outputs_reached_through_symlinks_are_never_queued(
    tmp_path: Path, store: Store, clock: FakeClock, polling: bool
) -> None:
    """The watch is reached through a symlink and its output sits in the real folder; an
    archive is linked from inside the watch: none of their files is queued, by scans or by
    events, native or polled. Links are recorded, never followed."""
    real, archive = tmp_path / "real", tmp_path / "elsewhere" / "archive"
    (real / "out").mkdir(parents=True)
    archive.mkdir(parents=True)
    os.symlink(real, tmp_path / "link")
    os.symlink(archive, real / "arch")
    for folder in (real / "out", archive):
        (folder / "old.jpg").write_bytes(b"o")
    (real / "keep1.jpg").write_bytes(b"1")
    watch = WatchConfig(
        path=tmp_path / "link", output=real / "out", settle_s=SETTLE, polling=polling
    )
    w = FolderWatcher(
        watch, store, excluded=[tmp_path / "link" / "out", archive], clock=clock, rescan_s=3600
    )
    try:
        settle(w, clock)
        for folder in (real / "out", archive):
            (folder / "new.jpg").write_bytes(b"n")
        (real / "keep2.jpg").write_bytes(b"2")
        wait_for(lambda: w.pending(), timeout=15, what="the keep2.jpg event")
        # Events come in order: once a file made after keep2.jpg is seen, every event of the
        # files written before it has been delivered (and judged).
        w.tick()
        (real / "keep3.jpg").write_bytes(b"3")
        wait_for(lambda: str(tmp_path / "link" / "keep3.jpg") in w._touched, timeout=15)
        settle(w, clock)
        w.scan()
        settle(w, clock)
    finally:
        w.stop()
    assert set(queued(store)) == {"keep1.jpg", "keep2.jpg", "keep3.jpg", "arch"}


class _FullObserver(InotifyObserver):
    """A native observer on a machine out of inotify watches."""

    made = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).made += 1

    def start(self) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")


def test_inotify_limit_falls_back_to_polling_once(
    tmp_path: Path, store: Store, clock: FakeClock
) -> None:
    """When the native observer cannot start for lack of inotify watches, the watch is polled:
    one warning with the reason, no new native attempt every tick, and new files still found."""
    _FullObserver.made = 0
    w = make_watcher(tmp_path, store, clock, observer_factory=_FullObserver)
    try:
        with capture_logs() as logs:
            for _ in range(5):
                w.tick()
                clock.advance(60)
            (tmp_path / "in" / "p.jpg").write_bytes(b"p")
            wait_for(lambda: w.pending(), timeout=15, what="a polling event")
            settle(w, clock)
    finally:
        w.stop()
    assert list(queued(store)) == ["p.jpg"]
    assert _FullObserver.made == 1
    events = [e["event"] for e in logs]
    assert events.count("watch.polling_fallback") == 1 and "watch.observer_failed" not in events
    (fallback,) = [e for e in logs if e["event"] == "watch.polling_fallback"]
    assert "inotify watch limit reached" in fallback["reason"]
    assert {"event": "watch.started", "polling": True}.items() <= next(
        e for e in logs if e["event"] == "watch.started"
    ).items()


def test_reading_a_file_in_the_watch_sends_no_events(
    watcher: FolderWatcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """blurd reads its inputs several times (hash, upload, metadata): those opens are not in
    the inotify mask, so they never reach Python. A file created after the reads is the mark:
    inotify keeps order, so anything the reads caused would have come before it."""
    from blurd.events import EventHandler

    seen: list[tuple[str, str]] = []
    original = EventHandler.on_any_event

    def spy(self: EventHandler, event: FileSystemEvent) -> None:
        seen.append((event.event_type, os.path.basename(os.fsdecode(event.src_path))))
        original(self, event)

    monkeypatch.setattr(EventHandler, "on_any_event", spy)
    photo = tmp_path / "in" / "a.jpg"
    photo.write_bytes(b"x" * 1000)
    wait_for(lambda: ("closed", "a.jpg") in seen, what="the write's close")
    for _ in range(5):
        with open(photo, "rb") as fh:
            fh.read()
    (tmp_path / "in" / "mark.jpg").write_bytes(b"m")
    wait_for(lambda: ("created", "mark.jpg") in seen, what="the mark")
    after_write = seen[seen.index(("closed", "a.jpg")) + 1 : seen.index(("created", "mark.jpg"))]
    assert [e for e in after_write if e[1] == "a.jpg"] == []  # the folder's own is the mark's
    assert not {kind for kind, _ in seen} & {"opened", "closed_no_write"}

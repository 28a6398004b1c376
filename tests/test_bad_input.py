"""Bad input from a media server: odd names, links, vanishing and changing files, huge files."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from blurd.engines.blurit import upload_name
from blurd.models import JobState
from tests.conftest import wait_for
from tests.fakeblurit import FakeBlurIt
from tests.harness import Daemon, anonymized

S = JobState


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt(token_lifetime_s=60, job_seconds=0.2) as f:
        yield f


NAMES = ["with space.jpg", "ünïcødé 写真.jpg", 'quote\'s "double".jpg', "new\nline.jpg"]


def test_odd_names_are_processed_and_mirrored(tmp_path: Path, fake: FakeBlurIt) -> None:
    """Spaces, unicode, quotes and newlines in names: each file comes out under its own name."""
    data = {name: os.urandom(1000) for name in NAMES}
    with Daemon(tmp_path, fake) as d:
        for name, content in data.items():
            (d.inbox / name).write_bytes(content)
        wait_for(lambda: d.counts()[S.DONE] == len(NAMES), timeout=30, what="all done")
    for name, content in data.items():
        assert (d.outbox / name).read_bytes() == anonymized(content)
        assert (d.outbox / (name + ".json")).is_file()
    assert {u.filename for u in fake.uploads} == {"media.jpg"}


def test_upload_names_carry_only_a_clean_extension() -> None:
    """The name sent to the API never holds the user's file name or header characters."""
    assert upload_name(Path("Jane Doe at home.JPG")) == "media.jpg"
    assert upload_name(Path('x.j"p\ng')) == "media"
    assert upload_name(Path("noext")) == "media"


def test_symlinks_are_never_uploaded_nor_traversed(tmp_path: Path, fake: FakeBlurIt) -> None:
    """A link to a file fails as a link; a link to a folder outside is not walked into."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.jpg").write_bytes(b"private")
    with Daemon(tmp_path, fake) as d:
        os.symlink(outside / "private.jpg", d.inbox / "link.jpg")
        os.symlink(outside, d.inbox / "linkdir")
        (d.inbox / "real.jpg").write_bytes(b"real")
        wait_for(lambda: d.counts()[S.DONE] == 1 and d.counts()[S.FAILED] >= 1, what="settled")
        jobs = d.jobs()
    assert "symbolic link" in (jobs["link.jpg"].error or "")
    assert not any(p.startswith("linkdir/") for p in jobs)
    assert fake.upload_count(hashlib.sha256(b"private").hexdigest()) == 0
    assert len(fake.uploads) == 1


def _hold_uploads(fake: FakeBlurIt, d: Daemon) -> None:
    """Every upload answers 503 and waits 2 s to retry: jobs sit in the queue meanwhile."""
    fake.fail_next("submit", 503, count=1000)
    d.timing = dataclasses.replace(d.timing, backoff_base_s=2.0, backoff_cap_s=2.0)


def _held(d: Daemon, rel: str) -> bool:
    jobs = d.jobs()
    return rel in jobs and jobs[rel].state is S.QUEUED and jobs[rel].attempts >= 1


def _release_uploads(fake: FakeBlurIt) -> None:
    with fake._lock:
        fake._faults["submit"].clear()


def test_a_file_deleted_while_queued_fails_without_upload(tmp_path: Path, fake: FakeBlurIt) -> None:
    """A queued file that disappears is failed with a reason, never uploaded."""
    d = Daemon(tmp_path, fake)
    _hold_uploads(fake, d)
    with d:
        (d.inbox / "gone.jpg").write_bytes(b"soon gone")
        wait_for(lambda: _held(d, "gone.jpg"), what="a held upload")
        (d.inbox / "gone.jpg").unlink()
        _release_uploads(fake)
        wait_for(lambda: d.counts()[S.FAILED] == 1, what="failed")
        assert "disappeared" in (d.job("gone.jpg").error or "")
    assert fake.uploads == []


def test_a_file_replaced_while_queued_is_processed_in_its_new_version(
    tmp_path: Path, fake: FakeBlurIt
) -> None:
    """The old version fails as changed; the new one is queued on its own and comes out."""
    d = Daemon(tmp_path, fake)
    _hold_uploads(fake, d)
    with d:
        (d.inbox / "a.jpg").write_bytes(b"version one")
        wait_for(lambda: _held(d, "a.jpg"), what="a held upload")
        (d.inbox / "a.jpg").write_bytes(b"version two, longer")
        wait_for(lambda: len(d.all_jobs()) >= 2, what="the second version queued")
        _release_uploads(fake)
        wait_for(lambda: d.counts()[S.DONE] == 1 and d.counts()[S.FAILED] == 1, what="settled")
    assert (d.outbox / "a.jpg").read_bytes() == anonymized(b"version two, longer")
    assert [u.size for u in fake.uploads] == [len(b"version two, longer")]


def _open_in_this_process(path: Path) -> bool:
    """True once some thread of this process (the daemon's upload) holds ``path`` open."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                return True
        except OSError:
            continue
    return False


def test_a_file_deleted_while_uploading_still_comes_out(tmp_path: Path, fake: FakeBlurIt) -> None:
    """Deleting the source mid-upload loses nothing: the bytes being sent are the output."""
    fake.delay_next("submit", 1.0)
    with Daemon(tmp_path, fake) as d:
        data = os.urandom(50_000)
        (d.inbox / "a.jpg").write_bytes(data)
        wait_for(
            lambda: d.counts()[S.UPLOADING] == 1 and _open_in_this_process(d.inbox / "a.jpg"),
            what="the upload reading the file",
        )
        (d.inbox / "a.jpg").unlink()
        wait_for(lambda: d.counts()[S.DONE] == 1, what="done")
    assert (d.outbox / "a.jpg").read_bytes() == anonymized(data)


def test_files_over_8_gib_are_refused_before_upload(tmp_path: Path, fake: FakeBlurIt) -> None:
    """A sparse 8 GiB + 1 byte file fails with a clear reason and no API call."""
    with Daemon(tmp_path, fake) as d:
        with open(d.inbox / "huge.mp4", "wb") as fh:
            fh.truncate(8 * 1024**3 + 1)
        wait_for(lambda: d.counts()[S.FAILED] == 1, what="failed")
        assert "8 GiB" in (d.job("huge.mp4").error or "")
    assert fake.uploads == []


def test_unreadable_files_fail_with_a_reason(tmp_path: Path, fake: FakeBlurIt) -> None:
    """A file blurd may not read is failed as unreadable, not retried forever."""
    if os.geteuid() == 0:
        pytest.skip("root reads every file; permissions cannot make one unreadable")
    with Daemon(tmp_path, fake) as d:
        f = d.inbox / "locked.jpg"
        f.write_bytes(b"x")
        f.chmod(0)
        wait_for(lambda: d.counts()[S.FAILED] == 1, what="failed")
        assert "cannot be read" in (d.job("locked.jpg").error or "")
    assert fake.uploads == []

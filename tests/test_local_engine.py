"""LocalEngine through the Engine interface: submit, poll, fetch, release, as the worker uses it."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
cv2 = pytest.importorskip("cv2")
av = pytest.importorskip("av")
pytest.importorskip("onnxruntime")

from blurd.engines.base import Phase, RemoteStatus  # noqa: E402
from blurd.engines.local import LocalEngine  # noqa: E402
from blurd.engines.local.jobs import _Reporter  # noqa: E402
from blurd.engines.local.testing import gradient_image, make_clip  # noqa: E402
from blurd.errors import (  # noqa: E402
    ConfigError,
    PermanentApiError,
    TransientApiError,
    UnknownJob,
)
from blurd.options import Options  # noqa: E402
from tests.conftest import EGOBLUR, needs_samples, wait_for  # noqa: E402

JOB_TIMEOUT_S = 90.0  # a first job also starts a pool process and loads the model


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEngine]:
    engine = LocalEngine(workers=1, work_dir=tmp_path_factory.mktemp("work"))
    yield engine
    engine.close()


def finished(engine: LocalEngine, remote_id: str) -> RemoteStatus:
    def done() -> RemoteStatus | None:
        status = engine.poll(remote_id)
        return None if status.phase is Phase.PENDING else status

    return wait_for(done, timeout=JOB_TIMEOUT_S, interval=0.1, what=f"job {remote_id}")


def fetch(engine: LocalEngine, remote_id: str, status: RemoteStatus, part: str) -> bytes:
    out = io.BytesIO()
    count = engine.fetch(remote_id, status, part, out)  # type: ignore[arg-type]
    assert count == len(out.getvalue())
    return out.getvalue()


@needs_samples
def test_a_photo_goes_through_submit_poll_fetch(engine: LocalEngine, tmp_path: Path) -> None:
    """A JPEG of a person comes back as a JPEG with the face hidden and one face in the JSON."""
    image = cv2.imread(str(EGOBLUR / "gen1-test_image.jpg"))
    src = tmp_path / "person.jpg"
    cv2.imwrite(str(src), cv2.resize(image, (540, 960)))
    remote_id = engine.submit(src, Options())
    assert remote_id.startswith("local-")
    status = finished(engine, remote_id)
    assert status.phase is Phase.SUCCEEDED, status.error
    assert status.media_name == "result.jpg" and status.detections_name == "result.json"
    media = fetch(engine, remote_id, status, "media")
    assert media[:2] == b"\xff\xd8"
    found = json.loads(fetch(engine, remote_id, status, "detections"))
    assert found["engine"] == "local" and found["width"] == 540
    assert [d["class"] for d in found["frames"][0]["detections"]] == ["face"]
    engine.release(remote_id)
    assert engine.poll(remote_id).phase is Phase.UNKNOWN


def test_a_video_with_sound_goes_through_the_engine(engine: LocalEngine, tmp_path: Path) -> None:
    """An MP4 with AAC comes back as an MP4 with the same frames and audio packets."""
    src = tmp_path / "clip.mp4"
    make_clip(
        src, background=gradient_image(300, 200), faces=[], width=256, height=144, seconds=1.0
    )
    remote_id = engine.submit(src, Options(plates=False))
    status = finished(engine, remote_id)
    assert status.phase is Phase.SUCCEEDED, status.error
    assert status.media_name == "result.mp4"
    out = tmp_path / "out.mp4"
    out.write_bytes(fetch(engine, remote_id, status, "media"))
    with av.open(str(src)) as a, av.open(str(out)) as b:
        assert len(list(a.decode(video=0))) == len(list(b.decode(video=0))) == 30
    with av.open(str(src)) as a, av.open(str(out)) as b:
        assert [bytes(p) for p in a.demux(audio=0) if p.size] == [
            bytes(p) for p in b.demux(audio=0) if p.size
        ]
    engine.release(remote_id)


def test_a_corrupt_file_fails_with_one_sentence(engine: LocalEngine, tmp_path: Path) -> None:
    """A broken image is FAILED with a one-line reason, not a traceback."""
    src = tmp_path / "broken.png"
    src.write_bytes(b"\x89PNG\r\n\x1a\n but no image")
    remote_id = engine.submit(src, Options())
    status = finished(engine, remote_id)
    assert status.phase is Phase.FAILED
    assert status.error == "the image cannot be decoded (corrupt or not an image)"
    engine.release(remote_id)


def test_a_foreign_id_is_unknown(engine: LocalEngine) -> None:
    """An id the engine never issued (say, from before a restart) polls as UNKNOWN."""
    assert engine.poll("local-0123456789abcdef").phase is Phase.UNKNOWN
    with pytest.raises(UnknownJob):
        engine.fetch("local-0123", RemoteStatus(Phase.SUCCEEDED), "media", io.BytesIO())


def test_unsupported_files_are_refused_at_submit(engine: LocalEngine, tmp_path: Path) -> None:
    """A .zip (or anything else unknown) is refused for good before any work."""
    src = tmp_path / "bundle.zip"
    src.write_bytes(b"PK\x03\x04")
    with pytest.raises(PermanentApiError):
        engine.submit(src, Options())
    assert ".tiff" in engine.supported_extensions and ".mkv" in engine.supported_extensions


def test_plates_are_reported_as_unsupported_never_silently_ignored(engine: LocalEngine) -> None:
    """plates = true gives one warning sentence; describe() says why plates are unsupported."""
    (warning,) = engine.limitations(Options(plates=True))
    assert "licence plates" in warning and warning.endswith(".")
    assert engine.limitations(Options(plates=False)) == []
    described = engine.describe()
    assert described["engine"] == "local" and described["workers"] == 1
    assert str(described["plates"]).startswith("unsupported: ")


def test_a_plate_model_path_is_refused_clearly(tmp_path: Path) -> None:
    """A user-supplied plate model is not supported yet: a config error names the key."""
    with pytest.raises(ConfigError, match=r"local\.plate_model"):
        LocalEngine(plate_model=str(tmp_path / "plates.onnx"), work_dir=tmp_path)


def test_check_loads_the_model(tmp_path: Path) -> None:
    """check() proves the packaged model loads, without starting the pool."""
    engine = LocalEngine(workers=1, work_dir=tmp_path)
    engine.check()
    engine.close()


def test_close_removes_the_work_folder(tmp_path: Path) -> None:
    """close() leaves nothing behind in the work folder it was given, and refuses new jobs."""
    engine = LocalEngine(workers=1, work_dir=tmp_path / "work")
    src = tmp_path / "flat.png"
    cv2.imwrite(str(src), gradient_image(32, 32))
    remote_id = engine.submit(src, Options())
    assert finished(engine, remote_id).phase is Phase.SUCCEEDED
    engine.close()
    assert list((tmp_path / "work").iterdir()) == []
    with pytest.raises(TransientApiError):
        engine.submit(src, Options())


def test_progress_and_cancel_travel_through_the_job_folder(tmp_path: Path) -> None:
    """A running video reports "n/total frames" and stops once a cancel file appears."""
    reporter = _Reporter(tmp_path)
    reporter.progress(120, 300)
    assert (tmp_path / "progress").read_text() == "120/300 frames"
    assert not reporter.stopped()
    (tmp_path / "cancel").touch()
    reporter._next_check = 0.0
    assert reporter.stopped()


def test_jobs_held_by_the_local_engine_before_a_restart_are_redone(tmp_path: Path) -> None:
    """After a restart the local engine knows none of its jobs: the daemon queues them again at
    start-up, without using up their requeue budget, and they come out."""
    from blurd import config, daemon
    from blurd.models import JobState
    from blurd.signals import Signals
    from blurd.store import Store

    inbox, outbox = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    photo = inbox / "a.png"
    cv2.imwrite(str(photo), gradient_image(64, 48))
    db = f"sqlite:///{tmp_path}/blurd.db"
    store = Store(db)
    st = photo.stat()
    job = store.enqueue(str(inbox), "a.png", st.st_size, st.st_mtime_ns)
    assert job is not None
    store.transition(job, JobState.QUEUED, JobState.UPLOADING)
    store.transition(job, JobState.UPLOADING, JobState.PROCESSING, remote_id="local-gone")
    store.close()
    raw = {"daemon": {"database": db, "engine": "local"},
           "watch": [{"path": str(inbox), "output": str(outbox), "settle_seconds": 0.1,
                      "plates": False}]}  # fmt: skip
    cfg = config.parse(raw, {})
    # Signals() not installed: the test must not take over pytest's own signal handlers.
    assert daemon.run(cfg, once=True, signals=Signals()) == 0
    store = Store(db)
    row = store.get(job)
    store.close()
    assert row is not None and row.state is JobState.DONE and row.requeues == 0
    assert (outbox / "a.png").is_file()


@pytest.mark.parametrize("policy", ["delete", "move"])
def test_the_local_engine_leaves_originals_movable_and_results_reusable(
    tmp_path: Path, policy: str
) -> None:
    """The local engine hard-links its input (which changes the file's ctime): the original
    is still recognised as the version processed, so `delete` and `move` act on it, and the
    job keeps its hash, so an identical file later reuses the result without a second run."""
    import shutil

    from blurd import config, daemon
    from blurd.models import JobState
    from blurd.signals import Signals
    from blurd.store import Store

    inbox, outbox, archive = tmp_path / "in", tmp_path / "out", tmp_path / "archive"
    inbox.mkdir()
    photo = inbox / "a.png"
    cv2.imwrite(str(photo), gradient_image(64, 48))
    data = photo.read_bytes()
    db = f"sqlite:///{tmp_path}/blurd.db"
    watch = {"path": str(inbox), "output": str(outbox), "settle_seconds": 0.1, "plates": False,
             "originals": policy, **({"archive": str(archive)} if policy == "move" else {})}
    cfg = config.parse({"daemon": {"database": db, "engine": "local"}, "watch": [watch]}, {})
    assert daemon.run(cfg, once=True, signals=Signals()) == 0
    assert not photo.exists() and (outbox / "a.png").is_file()
    if policy == "move":
        assert (archive / "a.png").read_bytes() == data
    (inbox / "b.png").write_bytes(data)
    shutil.copystat(outbox / "a.png", inbox / "b.png")
    assert daemon.run(cfg, once=True, signals=Signals()) == 0
    store = Store(db)
    jobs = {j.rel_path: j for j in store.list_jobs()}
    store.close()
    assert jobs["a.png"].state is JobState.DONE and jobs["a.png"].sha256 is not None
    assert jobs["b.png"].state is JobState.DONE and jobs["b.png"].remote_id is None

"""End to end: what of a photo's metadata reaches its published copy, with either engine.

The test server can answer with the upload itself (``echo_media``), EXIF and GPS included, as
the real API does; Pillow reads the outputs, independently of blurd's own parser.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from blurd import config, daemon
from blurd.errors import ConfigError
from blurd.models import JobState
from blurd.signals import Signals
from tests.conftest import wait_for
from tests.fakeblurit import FakeBlurIt
from tests.harness import Daemon

GPS_IFD, EXIF_IFD = 0x8825, 0x8769
DATE_ORIGINAL, MAKE, ARTIST, ORIENTATION = 0x9003, 0x010F, 0x013B, 0x0112


@pytest.fixture
def fake() -> Iterator[FakeBlurIt]:
    with FakeBlurIt(job_seconds=0.2) as f:
        f.echo_media = True
        yield f


def photo(
    *, lat: float = 48.8577, size: tuple[int, int] = (64, 48), orientation: int = 1
) -> bytes:
    """A JPEG with a GPS position, a capture time, a camera and an artist."""
    exif = Image.Exif()
    exif[MAKE] = "Canon"
    exif[ARTIST] = "Jane Doe"
    exif[ORIENTATION] = orientation
    exif.get_ifd(EXIF_IFD)[DATE_ORIGINAL] = "2024:05:01 10:11:12"
    gps = exif.get_ifd(GPS_IFD)
    gps[1], gps[2] = "N", (int(lat), 51, 27.7)
    gps[3], gps[4] = "E", (2, 17, 40.2)
    out = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(out, "JPEG", exif=exif.tobytes(), quality=90)
    return out.getvalue()


def local_once(tmp_path: Path, name: str, data: bytes, policy: str) -> Path:
    """``blurd run --once`` with the local engine on one file, in this process (leaving the
    tests' logging and signals alone); returns its output."""
    pytest.importorskip("onnxruntime")
    inbox, outbox = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    (inbox / name).write_bytes(data)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[daemon]\ndatabase = "{tmp_path}/blurd.db"\nengine = "local"\n'
        f'[[watch]]\npath = "{inbox}"\noutput = "{outbox}"\nsettle_seconds = 0.1\n'
        f'metadata = "{policy}"\nplates = false\n'
    )
    assert daemon.run(config.load(cfg, {}), once=True, signals=Signals()) == 0
    return outbox / name


def scan(data: bytes) -> bytes:
    """The entropy-coded data of a JPEG: from its first SOS to EOI."""
    return data[data.index(b"\xff\xda") :]


def read_exif(path: Path) -> tuple[dict[int, object], dict[int, object], dict[int, object]]:
    with Image.open(path) as im:
        exif = im.getexif()
        return dict(exif), dict(exif.get_ifd(EXIF_IFD)), dict(exif.get_ifd(GPS_IFD))


@pytest.mark.parametrize("policy", ["strip", "safe", "keep"])
def test_a_blurit_result_never_publishes_more_than_the_policy_allows(
    tmp_path: Path, fake: FakeBlurIt, policy: str
) -> None:
    """The API sends the photo back with its GPS position; the published copy carries what
    the watch's ``metadata`` allows of the input, and the engine's pixels unchanged."""
    data = photo()
    with Daemon(tmp_path, fake, metadata=policy) as d:
        (d.inbox / "a.jpg").write_bytes(data)
        wait_for(lambda: d.counts()[JobState.DONE] == 1, timeout=30, what="a.jpg done")
    out = d.outbox / "a.jpg"
    ifd0, exif, gps = read_exif(out)
    assert scan(out.read_bytes()) == scan(data)
    assert bool(gps) == (policy == "keep")
    assert (ARTIST in ifd0) == (policy == "keep")
    assert (MAKE in ifd0) == (policy != "strip")
    assert (exif.get(DATE_ORIGINAL) == "2024:05:01 10:11:12") == (policy != "strip")
    assert json.loads((d.outbox / "a.jpg.json").read_text())["detections"]


def test_only_the_version_processed_gives_its_metadata(tmp_path: Path, fake: FakeBlurIt) -> None:
    """A new photo saved under the same name while the old one is at the engine: its
    metadata (another place) is not carried into the old one's output, even with ``keep``."""
    fake.job_seconds = 1.5
    first = photo(lat=10.0)
    with Daemon(tmp_path, fake, metadata="keep") as d:
        (d.inbox / "a.jpg").write_bytes(first)
        wait_for(lambda: len(fake.uploads) == 1, timeout=30, what="the upload")
        replaced = d.inbox / "a.jpg.new"
        replaced.write_bytes(photo(lat=60.0, size=(64, 49)))
        os.replace(replaced, d.inbox / "a.jpg")
        wait_for(lambda: d.counts()[JobState.DONE] == 2, timeout=30, what="both versions done")
    outputs = sorted(d.outbox.glob("a*.jpg"))
    by_scan = {scan(p.read_bytes()): p for p in outputs}
    first_out = by_scan[scan(first)]
    assert read_exif(first_out)[2] == {}  # the first version's position is gone with it


def test_a_result_that_is_no_jpeg_inside_is_never_published(
    tmp_path: Path, fake: FakeBlurIt
) -> None:
    """A body with JPEG magic bytes but no JPEG structure fails its check: retried, then the
    job fails, and nothing is placed."""
    data = b"\xff\xd8\xff\xe0 not really a JPEG " * 20
    with Daemon(tmp_path, fake) as d:
        (d.inbox / "a.jpg").write_bytes(data)
        wait_for(lambda: d.counts()[JobState.FAILED] == 1, timeout=60, what="a.jpg failed")
        error = d.job("a.jpg").error or ""
    assert "not a JPEG" in error or "JPEG" in error
    assert not (d.outbox / "a.jpg").exists()
    assert not [p for p in d.outbox.rglob("*") if p.is_file() and p.suffix != ".json"]


def test_an_unknown_policy_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[daemon]\ndatabase = "{tmp_path}/db"\nengine = "local"\n'
        f'[[watch]]\npath = "{tmp_path}/in"\noutput = "{tmp_path}/out"\nmetadata = "all"\n'
    )
    with pytest.raises(ConfigError, match=r"watch\[0\]\.metadata"):
        config.load(cfg, {})


def test_the_local_engine_keeps_the_capture_time_and_turns_the_photo_upright(
    tmp_path: Path,
) -> None:
    """``safe`` with the built-in engine: capture time and camera carried, no position, no
    artist, and orientation 1 since the engine wrote the pixels upright."""
    out = local_once(tmp_path, "p.jpg", photo(orientation=6), "safe")
    ifd0, exif, gps = read_exif(out)
    assert gps == {} and ARTIST not in ifd0
    assert ifd0.get(MAKE) == "Canon" and exif.get(DATE_ORIGINAL) == "2024:05:01 10:11:12"
    assert ifd0.get(ORIENTATION, 1) == 1
    with Image.open(out) as im:
        assert im.size == (48, 64)  # turned by the engine, as orientation 6 asked


def clip(path: Path) -> Path:
    """A short MP4 with a place, a capture time and a title in its container tags."""
    av = pytest.importorskip("av")
    np = pytest.importorskip("numpy")
    with av.open(str(path), "w", format="mp4") as out:
        out.metadata.update({"location": "+48.8577+002.2950/", "title": "Jane's street",
                             "creation_time": "2024-05-01T10:11:12.000000Z"})  # fmt: skip
        stream = out.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(12):
            pixels = np.full((48, 64, 3), i * 20, "uint8")
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def tags(path: Path) -> dict[str, str]:
    av = pytest.importorskip("av")
    with av.open(str(path)) as f:
        return {k.lower(): v for k, v in f.metadata.items()}


@pytest.mark.parametrize("policy", ["strip", "safe", "keep"])
def test_a_blurit_video_keeps_no_place_unless_asked(
    tmp_path: Path, fake: FakeBlurIt, policy: str
) -> None:
    """The API sends the video back with its container tags, a place among them; the published
    copy carries what the policy allows of the input's tags."""
    data = clip(tmp_path / "src.mp4").read_bytes()
    with Daemon(tmp_path, fake, metadata=policy) as d:
        (d.inbox / "v.mp4").write_bytes(data)
        wait_for(lambda: d.counts()[JobState.DONE] == 1, timeout=30, what="v.mp4 done")
    found = tags(d.outbox / "v.mp4")
    assert ("location" in found) == (policy == "keep")
    assert ("title" in found) == (policy == "keep")
    assert ("creation_time" in found) == (policy != "strip")


def test_the_local_engine_carries_a_videos_capture_time_but_not_its_place(
    tmp_path: Path,
) -> None:
    """``safe`` with the built-in engine: the re-encoded video gets the input's creation time
    and nothing else of its tags."""
    data = clip(tmp_path / "v.mp4").read_bytes()
    found = tags(local_once(tmp_path, "v.mp4", data, "safe"))
    assert found.get("creation_time", "").startswith("2024-05-01T10:11:12")
    assert "location" not in found and "title" not in found


@pytest.mark.parametrize("policy", ["strip", "keep"])
def test_photos_inside_a_zip_result_are_rewritten_too(
    tmp_path: Path, fake: FakeBlurIt, policy: str
) -> None:
    """An archive of photos comes back with each photo's EXIF: every photo in it is rewritten
    (its position kept only with ``keep``), other entries copied as they are."""
    import zipfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("trip/a.jpg", photo())
        zf.writestr("notes.txt", "hello")
    with Daemon(tmp_path, fake, metadata=policy) as d:
        (d.inbox / "photos.zip").write_bytes(archive.getvalue())
        wait_for(lambda: d.counts()[JobState.DONE] == 1, timeout=30, what="photos.zip done")
    with zipfile.ZipFile(d.outbox / "photos.zip") as zf:
        assert sorted(zf.namelist()) == ["notes.txt", "trip/a.jpg"]
        assert zf.read("notes.txt") == b"hello"
        (tmp_path / "a.jpg").write_bytes(zf.read("trip/a.jpg"))
    _ifd0, _exif, gps = read_exif(tmp_path / "a.jpg")
    assert bool(gps) == (policy == "keep")
    assert scan((tmp_path / "a.jpg").read_bytes()) == scan(photo())

"""Shared test helpers: waiting for a condition with a timeout instead of sleeping."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blurd import logs


class _CurrentStderr:
    """Writes to whatever sys.stderr is now, so pytest's capture sees daemon logs, and command
    output on stdout stays clean for the tests that parse it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False


logs.configure(_CurrentStderr(), json=True)  # type: ignore[arg-type]

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# The EgoBlur demo photos and videos (real faces and plates), in ../shared beside the checkout.
EGOBLUR = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "egoblur"
needs_samples = pytest.mark.skipif(not EGOBLUR.is_dir(), reason=f"{EGOBLUR} is missing")


@pytest.fixture(scope="session")
def detector() -> Any:
    """The packaged face model, loaded once for the whole run (local extra only)."""
    pytest.importorskip("onnxruntime")
    from blurd.engines.local.detect import FaceDetector

    return FaceDetector(threads=2)


@pytest.fixture(scope="session")
def postgres() -> Any:
    """A PostgreSQL server on 127.0.0.1 for the whole run (see tests/pgserver.py)."""
    from tests.pgserver import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database of each kind blurd supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/blurd.db"
    server = request.getfixturevalue("postgres")
    return str(server.new_database())

"""Prometheus metrics served over real HTTP, with job gauges read from a real jobs table."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from blurd.errors import ConfigError
from blurd.metrics import Metrics, MetricsServer, parse_address
from blurd.models import JobState
from blurd.store import Store
from tests.conftest import FakeClock

HTTP_TIMEOUT_S = 5.0


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/b.db", clock=clock)
    yield s
    s.close()


@pytest.fixture
def served(store: Store) -> Iterator[tuple[Metrics, MetricsServer]]:
    metrics = Metrics(store)
    server = metrics.serve("127.0.0.1:0")
    assert server is not None
    yield metrics, server
    server.stop()


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and return {(sample name, sorted labels): value}."""
    reply = requests.get(server.url, timeout=HTTP_TIMEOUT_S)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def jobs_gauge(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {
        dict(labels)["state"]: value
        for (name, labels), value in samples.items()
        if name == "blurd_jobs"
    }


def test_counters_appear_after_the_worker_calls(served: tuple[Metrics, MetricsServer]) -> None:
    """uploaded/downloaded/api_error/token_refreshed show up as *_total counters with labels."""
    metrics, server = served
    metrics.uploaded(1000)
    metrics.uploaded(234)
    metrics.downloaded(5000)
    metrics.api_error(429)
    metrics.api_error(429)
    metrics.api_error(503)
    metrics.api_error(None)
    metrics.token_refreshed()
    samples = scrape(server)
    assert samples[("blurd_uploaded_bytes_total", ())] == 1234
    assert samples[("blurd_downloaded_bytes_total", ())] == 5000
    assert samples[("blurd_api_errors_total", (("code", "429"),))] == 2
    assert samples[("blurd_api_errors_total", (("code", "503"),))] == 1
    assert samples[("blurd_api_errors_total", (("code", "none"),))] == 1
    assert samples[("blurd_token_refreshes_total", ())] == 1


def test_job_gauges_are_read_from_the_store_at_each_scrape(
    served: tuple[Metrics, MetricsServer], store: Store, clock: FakeClock
) -> None:
    """blurd_jobs{state} has every state and follows the table; the oldest waiting job ages."""
    _, server = served
    samples = scrape(server)
    assert jobs_gauge(samples) == {s.value: 0 for s in JobState}
    assert samples[("blurd_oldest_waiting_job_age_seconds", ())] == 0

    first = store.enqueue("/in", "a.jpg", 10, 1)
    clock.advance(30)
    second = store.enqueue("/in", "b.jpg", 10, 1)
    store.enqueue("/in", "c.jpg", 10, 1)
    assert first is not None and second is not None
    assert store.transition(second, JobState.QUEUED, JobState.UPLOADING)
    clock.advance(60)
    samples = scrape(server)
    assert jobs_gauge(samples) == {
        "queued": 2, "uploading": 1, "processing": 0, "downloading": 0, "done": 0, "failed": 0,
    }  # fmt: skip
    assert samples[("blurd_oldest_waiting_job_age_seconds", ())] == 90

    assert store.transition(first, JobState.QUEUED, JobState.FAILED, error="empty file")
    samples = scrape(server)
    assert jobs_gauge(samples)["failed"] == 1
    assert samples[("blurd_oldest_waiting_job_age_seconds", ())] == 60


def test_a_broken_store_does_not_break_the_scrape(
    served: tuple[Metrics, MetricsServer], store: Store
) -> None:
    """When the jobs table cannot be read the counters are still served; the failure is logged."""
    metrics, server = served
    metrics.uploaded(7)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE jobs")
    with capture_logs() as logs:
        samples = scrape(server)
        scrape(server)
    assert samples[("blurd_uploaded_bytes_total", ())] == 7
    assert jobs_gauge(samples) == {}
    assert [e["event"] for e in logs] == ["metrics.store_failed"]


def test_each_metrics_object_has_its_own_registry(store: Store) -> None:
    """Two Metrics never share counters (no process-wide registry)."""
    a, b = Metrics(store), Metrics()
    a.uploaded(5)
    assert b"blurd_uploaded_bytes_total 5.0" in a.render()
    assert b"blurd_uploaded_bytes_total 0.0" in b.render()
    assert b"blurd_jobs" not in b.render()


def test_stop_closes_the_port(store: Store) -> None:
    """After stop() nothing answers on the port any more."""
    server = Metrics(store).serve("127.0.0.1:0")
    assert server is not None
    requests.get(server.url, timeout=HTTP_TIMEOUT_S).raise_for_status()
    server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url, timeout=HTTP_TIMEOUT_S)


def test_empty_address_means_off() -> None:
    """metrics = "" (the default) serves nothing."""
    assert Metrics().serve("") is None
    assert Metrics().serve("  ") is None


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_addresses_are_host_and_port(address: str, expected: tuple[str, int]) -> None:
    """HOST:PORT, with IPv6 hosts in brackets."""
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["9464", ":9464", "localhost", "host:port", "1.2.3.4:70000"])
def test_bad_addresses_name_the_config_key(address: str) -> None:
    """A malformed address is a ConfigError naming daemon.metrics."""
    with pytest.raises(ConfigError) as err:
        parse_address(address)
    assert err.value.key == "daemon.metrics"


def test_a_busy_port_is_a_config_error() -> None:
    """A port already taken is reported against daemon.metrics instead of an OSError."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            Metrics().serve(f"127.0.0.1:{port}")
    assert err.value.key == "daemon.metrics"
    assert "cannot listen" in str(err.value)

"""Prometheus metrics: what the worker counts, and what the jobs table says at scrape time.

:class:`Metrics` owns its own ``CollectorRegistry`` (never the process-wide one), so tests and
several daemons in one process do not share counters. The worker and the engine call its
methods whether or not anything serves them; ``[daemon] metrics = "127.0.0.1:9464"`` makes
the daemon call :meth:`Metrics.serve`, which answers on a daemon thread.

Exposed (all prefixed ``blurd_``):

- ``jobs{state}``: jobs per state, read from the jobs table at every scrape;
- ``oldest_waiting_job_age_seconds``: age of the oldest job not yet done or failed (0 if none);
- ``uploaded_bytes_total``, ``downloaded_bytes_total``;
- ``api_errors_total{code}``: engine errors by HTTP status (``none`` when there was no reply);
- ``token_refreshes_total``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from types import TracebackType
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from blurd.config import parse_address
from blurd.errors import ConfigError, StoreError
from blurd.models import JobState
from blurd.store import Store

log = structlog.get_logger("blurd.metrics")

CONFIG_KEY = "daemon.metrics"
_STOP_JOIN_S = 5.0


class _JobsCollector:
    """Reads the jobs table when Prometheus scrapes; nothing is cached."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._failing = False

    def describe(self) -> Iterable[Metric]:
        # Lets the registry know the names without a database query at registration.
        return [self._jobs_family(), self._age_family()]

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.store.counts()
            oldest = self.store.oldest_waiting()
            now = self.store.clock()
        except StoreError as exc:
            if not self._failing:
                log.warning("metrics.store_failed", error=str(exc))
            self._failing = True
            return
        self._failing = False
        jobs = self._jobs_family()
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state, 0))
        yield jobs
        age = self._age_family()
        age.add_metric([], max(0.0, now - oldest.created_at) if oldest is not None else 0.0)
        yield age

    @staticmethod
    def _jobs_family() -> GaugeMetricFamily:
        return GaugeMetricFamily("blurd_jobs", "Jobs in the jobs table by state.", labels=["state"])

    @staticmethod
    def _age_family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "blurd_oldest_waiting_job_age_seconds",
            "Age of the oldest job not yet done or failed (queued or in flight); 0 when none.",
        )


class MetricsServer:
    """The HTTP endpoint serving one registry; :meth:`stop` closes it."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host = str(httpd.server_address[0])
        self.port = int(httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=_STOP_JOIN_S)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.stop()


class Metrics:
    """The daemon's counters and the jobs table's gauges, in a registry of their own."""

    def __init__(self, store: Store | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._uploaded = Counter(
            "blurd_uploaded_bytes",
            "Bytes of media uploaded to the engine.",
            registry=self.registry,
        )
        self._downloaded = Counter(
            "blurd_downloaded_bytes",
            "Bytes of results downloaded from the engine.",
            registry=self.registry,
        )
        self._api_errors = Counter(
            "blurd_api_errors",
            "Errors from the engine's API by HTTP status code ('none' when there was no reply).",
            ["code"],
            registry=self.registry,
        )
        self._token_refreshes = Counter(
            "blurd_token_refreshes",
            "Access tokens refreshed or obtained again by logging in.",
            registry=self.registry,
        )
        self._originals_failed = Counter(
            "blurd_originals_failed",
            "Times the originals policy (move or delete) could not be applied; retried.",
            registry=self.registry,
        )
        if store is not None:
            self.registry.register(_JobsCollector(store))

    # ------------------------------------------------------------ what the worker calls

    def uploaded(self, n_bytes: int) -> None:
        if n_bytes > 0:
            self._uploaded.inc(n_bytes)

    def downloaded(self, n_bytes: int) -> None:
        if n_bytes > 0:
            self._downloaded.inc(n_bytes)

    def api_error(self, code: int | str | None) -> None:
        """One failed API call; ``code`` is the HTTP status, None for no reply (timeouts...)."""
        self._api_errors.labels(code="none" if code is None else str(code)).inc()

    def originals_failed(self) -> None:
        self._originals_failed.inc()

    def token_refreshed(self) -> None:
        self._token_refreshes.inc()

    # ------------------------------------------------------------ exposing

    def render(self) -> bytes:
        """The Prometheus text exposition of everything, as a scrape would see it."""
        return generate_latest(self.registry)

    def serve(self, address: str) -> MetricsServer | None:
        """Serve ``/metrics`` on ``address`` ("HOST:PORT") from a daemon thread; "" is off.

        Port 0 picks a free port (see :attr:`MetricsServer.port`). A malformed address or a
        port that cannot be bound raises :class:`ConfigError` naming ``daemon.metrics``.
        """
        if not address.strip():
            return None
        host, port = parse_address(address)
        try:
            httpd, thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {address}: {exc.strerror or exc}", key=CONFIG_KEY
            ) from exc
        server = MetricsServer(httpd, thread)
        log.info("metrics.serving", url=server.url)
        return server

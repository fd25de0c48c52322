"""Metrics through the OpenTelemetry API, scraped by Prometheus on METRICS_PORT.

Instruments are created once, here, from the process-wide meter: until `serve` installs
the SDK (METRICS_PORT set) they are no-ops. Names follow the OTel conventions where one
exists (`rpc.server.duration`, `db.client.connection.count`) and the `payments.` namespace
otherwise; the README lists each with its Prometheus name.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)
_meter = metrics.get_meter("payment_grpc")

RPC_DURATION = _meter.create_histogram(
    "rpc.server.duration",
    unit="ms",
    description="Duration of inbound RPCs (streams: until they end), by method and status code",
)
WATCHERS = _meter.create_up_down_counter(
    "payments.watchers.active",
    unit="{stream}",
    description="Open server streams (WatchPaymentStatus and other watches), by method",
)
GATEWAY_DURATION = _meter.create_histogram(
    "payments.gateway.duration",
    unit="ms",
    description="Duration of payment gateway calls, by operation and outcome",
)
STATUS_CHANGES = _meter.create_counter(
    "payments.status_changes",
    unit="{change}",
    description="Committed payment status changes, by new status, method type and currency",
)
REFUNDS = _meter.create_counter(
    "payments.refunds",
    unit="{change}",
    description="Committed refund records and their status changes, by status and currency",
)
IDEMPOTENCY_REPLAYS = _meter.create_counter(
    "payments.idempotency.replays",
    unit="{call}",
    description="Calls answered from a stored response (idempotent-replayed: true)",
)
IDEMPOTENCY_CONFLICTS = _meter.create_counter(
    "payments.idempotency.conflicts",
    unit="{call}",
    description="Keys reused with another request or still in flight, by reason",
)
OUTBOX_LAG = _meter.create_gauge(
    "payments.outbox.lag",
    unit="s",
    description="Age of the oldest undelivered outbox message, by sink",
)
OUTBOX_PARKED = _meter.create_gauge(
    "payments.outbox.parked",
    unit="{message}",
    description="Outbox messages parked after their last attempt, by sink",
)


def record_outbox(sink: str, *, lag_seconds: float, parked: int) -> None:
    """For the outbox relay, after each pass over its table."""
    OUTBOX_LAG.set(lag_seconds, {"payments.outbox.sink": sink})
    OUTBOX_PARKED.set(parked, {"payments.outbox.sink": sink})


# ------------------------------------------------------------------ database pool

_engines: weakref.WeakValueDictionary[str, AsyncEngine] = weakref.WeakValueDictionary()


def watch_pool(name: str, engine: AsyncEngine) -> None:
    """Report `engine`'s connection pool as db.client.connection.count (idle/used)."""
    _engines[name] = engine


def _pool_usage(options: CallbackOptions) -> Iterable[Observation]:
    for name, engine in list(_engines.items()):
        pool = engine.sync_engine.pool
        checked_out = getattr(pool, "checkedout", None)
        checked_in = getattr(pool, "checkedin", None)
        if checked_out is None or checked_in is None:
            continue  # a pool without counts (NullPool/StaticPool)
        pool_name = {"db.client.connection.pool.name": name}
        yield Observation(checked_out(), {**pool_name, "db.client.connection.state": "used"})
        yield Observation(checked_in(), {**pool_name, "db.client.connection.state": "idle"})


_meter.create_observable_up_down_counter(
    "db.client.connection.count",
    callbacks=[_pool_usage],
    unit="{connection}",
    description="Connections of the database pool, by state (idle, used)",
)


# ------------------------------------------------------------------ the exporter


class MetricsPortUnavailable(Exception):
    """The scrape endpoint cannot listen (port in use, no permission)."""


@dataclass
class MetricsEndpoint:
    """The Prometheus scrape endpoint (a daemon thread that only runs on a scrape)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def install_metrics(host: str, port: int | None, instance_id: str) -> MetricsEndpoint | None:
    """The process-wide meter provider with a Prometheus reader, served on host:port
    (`/metrics`); None when METRICS_PORT is unset. Call once per process (`serve`)."""
    if port is None:
        return None
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    from payment_grpc.telemetry.tracing import resource

    provider = MeterProvider(
        resource=resource(instance_id), metric_readers=[PrometheusMetricReader()]
    )
    metrics.set_meter_provider(provider)
    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise MetricsPortUnavailable(f"METRICS_PORT={port}: {exc.strerror or exc}") from exc
    endpoint = MetricsEndpoint(server, thread)
    log.info("metrics listening", extra={"metrics_port": endpoint.port})
    return endpoint

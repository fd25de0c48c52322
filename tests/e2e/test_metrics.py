"""Metrics leave the process on METRICS_PORT: a real server process, real calls, and
the Prometheus endpoint scraped the way Prometheus does."""

from __future__ import annotations

import asyncio
import pathlib
import re
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server_process import ServerProcess, server_env
from tests.helpers.builders import charge_request, keyed, usd
from tests.helpers.calls import rpc_error
from tests.helpers.credentials import client_metadata

pytestmark = pytest.mark.slow

METRICS_LINE = re.compile(r"metrics listening.*metrics_port=(\d+)")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            return str(reply.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


@pytest.fixture
async def metered_server(
    database_url: str, tmp_path: pathlib.Path
) -> AsyncIterator[tuple[ServerProcess, int]]:
    server = ServerProcess(server_env(database_url, tmp_path, METRICS_PORT="0"), cwd=tmp_path)
    await server.start()
    metrics_port = next(
        int(m.group(1)) for line in server.lines if (m := METRICS_LINE.search(line))
    )
    server.follow()
    try:
        yield server, metrics_port
    finally:
        server.sigterm()
        await server.wait()


async def test_rpc_gateway_payment_idempotency_and_watch_metrics(metered_server) -> None:  # type: ignore[no-untyped-def]
    server, metrics_port = metered_server
    async with aio.insecure_channel(
        f"127.0.0.1:{server.port}", interceptors=client_metadata(keys=False)
    ) as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        request = charge_request(5_000, manual=True)
        charged = await stub.Charge(request, metadata=keyed("charge-1"), timeout=30)
        payment_id = charged.payment.payment_id
        await stub.Charge(request, metadata=keyed("charge-1"), timeout=30)  # replayed
        reused = stub.Charge(charge_request(), metadata=keyed("charge-1"), timeout=30)
        assert (await rpc_error(reused)).code == grpc.StatusCode.FAILED_PRECONDITION
        missing = stub.GetPayment(api.GetPaymentRequest(payment_id="pay_" + "0" * 32))
        assert (await rpc_error(missing)).code == grpc.StatusCode.NOT_FOUND

        watch = stub.WatchPaymentStatus(api.WatchPaymentStatusRequest(payment_id=payment_id))
        await watch.read()  # the snapshot: the stream is open
        open_streams = await scrape(metrics_port)
        await stub.CapturePayment(
            api.CapturePaymentRequest(payment_id=payment_id), metadata=keyed("cap-1"), timeout=30
        )
        async for _ in watch:  # CAPTURED, then the stream ends
            pass
        await stub.Refund(
            api.RefundRequest(payment_id=payment_id, amount=usd(1_000)),
            metadata=keyed("refund-1"),
            timeout=30,
        )

    assert value(open_streams, "payments_watchers_active", rpc_method="WatchPaymentStatus") == 1
    samples = await scrape(metrics_port)
    assert value(samples, "payments_watchers_active", rpc_method="WatchPaymentStatus") == 0

    rpc = "rpc_server_duration_milliseconds_count"
    assert value(samples, rpc, rpc_method="Charge", rpc_grpc_status_code="0") == 2
    assert value(samples, rpc, rpc_method="Charge", rpc_grpc_status_code="9") == 1
    assert value(samples, rpc, rpc_method="GetPayment", rpc_grpc_status_code="5") == 1
    assert value(samples, rpc, rpc_method="Refund", rpc_system="grpc") == 1

    gateway = "payments_gateway_duration_milliseconds_count"
    op = "payments_gateway_operation"
    outcome = "payments_gateway_outcome"
    assert value(samples, gateway, **{op: "authorize", outcome: "authorized"}) == 1
    assert value(samples, gateway, **{op: "capture", outcome: "succeeded"}) == 1
    assert value(samples, gateway, **{op: "refund", outcome: "succeeded"}) == 1

    changes = "payments_status_changes_total"
    usd_card = {"payments_method": "CARD", "payments_currency": "USD"}
    for status in ("PENDING", "PROCESSING", "AUTHORIZED", "CAPTURED", "PARTIALLY_REFUNDED"):
        assert value(samples, changes, payments_status=status, **usd_card) == 1, status
    assert value(samples, "payments_refunds_total", payments_refund_status="SUCCEEDED") == 1

    assert value(samples, "payments_idempotency_replays_total", rpc_method="Charge") == 1
    assert (
        value(
            samples,
            "payments_idempotency_conflicts_total",
            rpc_method="Charge",
            reason="IDEMPOTENCY_KEY_REUSED",
        )
        == 1
    )
    pool = {"db_client_connection_pool_name": "payments"}
    assert (
        "db_client_connection_count",
        frozenset({**pool, "db_client_connection_state": "idle"}.items()),
    ) in {(n, frozenset((k, v) for k, v in labels if k.startswith("db_"))) for n, labels in samples}

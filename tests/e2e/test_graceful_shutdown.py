"""SIGTERM: health goes NOT_SERVING, the in-flight call finishes, the process exits 0."""

from __future__ import annotations

import asyncio
import pathlib
import re
import sqlite3

import grpc
from grpc import aio
from payments.v1 import payment_service_pb2_grpc

from tests.e2e.server_process import ServerProcess
from tests.helpers.builders import S, charge_request
from tests.helpers.calls import rpc_error
from tests.helpers.credentials import TEST_JWT_SECRET, client_metadata

REPO = pathlib.Path(__file__).resolve().parents[2]


async def test_in_flight_charge_finishes_after_sigterm(tmp_path: pathlib.Path) -> None:
    server = ServerProcess(
        {
            "PORT": "0",
            "HOST": "127.0.0.1",
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'payments.db'}",
            "DATA_DIR": str(tmp_path / "data"),
            "GATEWAY_LATENCY_MS_MIN": "1500",  # keeps the call in flight across the signal
            "GATEWAY_LATENCY_MS_MAX": "1500",
            "SHUTDOWN_GRACE_SECONDS": "10",
            "LOG_LEVEL": "DEBUG",
            "JWT_SECRET_KEY": TEST_JWT_SECRET,
        },
        cwd=tmp_path,
    )
    await server.start()
    try:
        async with aio.insecure_channel(
            f"127.0.0.1:{server.port}", interceptors=client_metadata()
        ) as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            charge = asyncio.ensure_future(stub.Charge(charge_request()))
            await server.wait_for_line(re.compile(r"rpc started.*Charge"))
            server.sigterm()
            await server.wait_for_line(re.compile(r"no longer accepting calls"))
            late_request = charge_request()
            late = await rpc_error(stub.Charge(late_request, timeout=5))
            # Refused: UNAVAILABLE, or CANCELLED when grpc core cancels a stream that
            # reached it after shutdown began (seen once in CI). Never run: checked below.
            assert late.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            assert (await charge).payment.status == S.PAYMENT_STATUS_CAPTURED
        assert await server.wait() == 0, "".join(server.lines[-20:])
        with sqlite3.connect(tmp_path / "payments.db") as db:
            orders = [row[0] for row in db.execute("SELECT order_id FROM payments")]
        assert late_request.order_id not in orders, orders
        assert len(orders) == 1, orders
        log = "".join(server.lines)
        assert "shutting down" in log
        assert "Traceback" not in log
    finally:
        server.kill()

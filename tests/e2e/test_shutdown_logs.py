"""The shutdown grace runs out with calls still in flight: the log says so in one line.

No CancelledError tracebacks, no "non-checked-in connection" warnings from the pool, exit
code 0; the interrupted calls are not lost (their keys are released for the retry).
"""

from __future__ import annotations

import asyncio
import pathlib
import re

import pytest
from grpc import aio
from payments.v1 import payment_service_pb2_grpc

from tests.e2e.server_process import ServerProcess, server_env
from tests.helpers.builders import charge_request
from tests.helpers.credentials import client_metadata

IN_FLIGHT = 4


@pytest.mark.timeout(300)  # a loaded machine starts and stops the server slowly
async def test_grace_running_out_logs_one_line(database_url: str, tmp_path: pathlib.Path) -> None:
    server = ServerProcess(
        server_env(
            database_url,
            tmp_path,
            GATEWAY_LATENCY_MS_MIN="60000",  # every Charge is still at the gateway...
            GATEWAY_LATENCY_MS_MAX="60000",
            SHUTDOWN_GRACE_SECONDS="0.2",  # ...when the grace runs out
            LOG_LEVEL="DEBUG",
        ),
        cwd=tmp_path,
    )
    await server.start()
    try:
        async with aio.insecure_channel(
            f"127.0.0.1:{server.port}", interceptors=client_metadata()
        ) as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            calls = [
                asyncio.ensure_future(stub.Charge(charge_request(), timeout=30))
                for _ in range(IN_FLIGHT)
            ]
            for _ in range(IN_FLIGHT):
                await server.wait_for_line(re.compile(r"rpc started.*Charge"))
            server.sigterm()
            assert await server.wait() == 0, server.log[-3000:]
            await asyncio.gather(*calls, return_exceptions=True)
    finally:
        server.kill()
    log = server.log
    assert "Traceback" not in log, log[-3000:]
    assert "non-checked-in" not in log, log[-3000:]
    assert "CancelledError" not in log, log[-3000:]
    grace = [line for line in server.lines if "grace" in line and "ran out" in line]
    assert len(grace) == 1, log[-3000:]

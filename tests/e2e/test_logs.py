"""Logs as a container's collector sees them: stderr is a pipe, so JSON by default; one
line per RPC with the ids that join it to traces and payment events; health at DEBUG."""

from __future__ import annotations

import json
import pathlib
import re
import uuid

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from tests.e2e.server_process import ServerProcess, server_env
from tests.helpers.builders import charge_request, keyed
from tests.helpers.calls import rpc_error
from tests.helpers.credentials import client_metadata

pytestmark = pytest.mark.slow


def rpc_lines(log: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [line for line in lines if line["message"] == "rpc finished"]


async def test_json_by_default_with_trace_span_subject_code_duration_replayed(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    server = ServerProcess(server_env(database_url, tmp_path, LOG_FORMAT="auto"), cwd=tmp_path)
    await server.start()
    server.follow()
    trace_id = uuid.uuid4().hex
    traceparent = ("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01")
    try:
        async with aio.insecure_channel(
            f"127.0.0.1:{server.port}", interceptors=client_metadata(keys=False)
        ) as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            request = charge_request()
            for _ in range(2):  # the second is replayed
                charged = await stub.Charge(
                    request,
                    metadata=(*keyed("log-1"), traceparent, ("x-request-id", "req-7")),
                    timeout=30,
                )
            missing = stub.GetPayment(
                api.GetPaymentRequest(payment_id="pay_" + "0" * 32), metadata=(traceparent,)
            )
            assert (await rpc_error(missing)).code == grpc.StatusCode.NOT_FOUND
            health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            await health.Check(health_pb2.HealthCheckRequest(service=""))
    finally:
        server.sigterm()
        await server.wait()

    assert all(line.startswith("{") for line in server.log.splitlines() if line.strip())
    lines = [line for line in rpc_lines(server.log) if line["trace_id"] == trace_id]
    charges = [line for line in lines if line["rpc_method"] == "/payments.v1.PaymentService/Charge"]
    assert [c["idempotent_replayed"] for c in charges] == [False, True]
    for line in charges:
        assert line["level"] == "INFO"
        assert line["grpc_code"] == "OK"
        assert line["subject"] == "svc-tests"
        assert line["request_id"] == "req-7"
        assert re.fullmatch(r"[0-9a-f]{16}", str(line["span_id"]))
        assert isinstance(line["duration_ms"], float)
    assert charges[0]["payment_id"] == charged.payment.payment_id  # from the answer
    (not_found,) = [line for line in lines if line["grpc_code"] == "NOT_FOUND"]
    assert not_found["rpc_method"] == "/payments.v1.PaymentService/GetPayment"
    assert not_found["payment_id"] == "pay_" + "0" * 32  # from the request
    # Health checks (probes every few seconds) only at DEBUG.
    assert not [line for line in rpc_lines(server.log) if "grpc.health" in str(line["rpc_method"])]

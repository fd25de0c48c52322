"""Every answer carries the call's trace id (`x-trace-id`) and echoes `x-request-id`:
successes, replays, errors and streams, through the generated stub."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from tests.helpers.builders import charge_request, keyed
from tests.helpers.calls import replayed, rpc_error

Stub = payment_service_pb2_grpc.PaymentServiceStub


def traced(trace_id: str, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
    metadata: tuple[tuple[str, str], ...] = (
        ("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"),
    )
    if request_id is not None:
        metadata += (("x-request-id", request_id),)
    return metadata


async def headers(call: Any) -> dict[str, str]:
    return dict(await call.initial_metadata() or ())


async def test_success_and_replay_carry_trace_and_request_ids(stub: Stub) -> None:
    trace_id = uuid.uuid4().hex
    request = charge_request()
    first = stub.Charge(request, metadata=keyed("h-1") + traced(trace_id, "req-1"))
    await first
    assert await headers(first) == {"x-trace-id": trace_id, "x-request-id": "req-1"}

    again = stub.Charge(request, metadata=keyed("h-1") + traced(uuid.uuid4().hex, "req-2"))
    await again
    assert await replayed(again)
    sent = await headers(again)
    assert sent["x-request-id"] == "req-2"
    assert len(sent["x-trace-id"]) == 32
    assert sent["x-trace-id"] != trace_id  # each call is its own trace


async def test_a_call_without_trace_context_gets_a_fresh_trace_id(stub: Stub) -> None:
    call = stub.Charge(charge_request())
    await call
    sent = await headers(call)
    assert set(sent) >= {"x-trace-id"}
    assert "x-request-id" not in sent
    assert len(sent["x-trace-id"]) == 32
    int(sent["x-trace-id"], 16)


async def test_errors_carry_the_trace_id(stub: Stub) -> None:
    trace_id = uuid.uuid4().hex
    missing = stub.GetPayment(
        api.GetPaymentRequest(payment_id="pay_" + "0" * 32), metadata=traced(trace_id, "r-404")
    )
    assert (await rpc_error(missing)).code == grpc.StatusCode.NOT_FOUND
    assert await headers(missing) == {"x-trace-id": trace_id, "x-request-id": "r-404"}

    invalid = stub.Charge(api.ChargeRequest(), metadata=traced(trace_id))
    assert (await rpc_error(invalid)).code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await headers(invalid))["x-trace-id"] == trace_id


async def test_a_hostile_request_id_is_not_echoed(stub: Stub) -> None:
    call = stub.Charge(charge_request(), metadata=traced(uuid.uuid4().hex, "x" * 500))
    await call
    assert "x-request-id" not in await headers(call)


async def test_streams_and_health_carry_the_trace_id(stub: Stub, channel: grpc.aio.Channel) -> None:
    charged = await stub.Charge(charge_request())
    trace_id = uuid.uuid4().hex
    watch = stub.WatchPaymentStatus(
        api.WatchPaymentStatusRequest(payment_id=charged.payment.payment_id),
        metadata=traced(trace_id),
    )
    async for _ in watch:
        pass
    assert (await headers(watch))["x-trace-id"] == trace_id

    health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
    check = health.Check(health_pb2.HealthCheckRequest(service=""), metadata=traced(trace_id))
    await check
    assert (await headers(check))["x-trace-id"] == trace_id

"""A replica exits while it holds an idempotency key; a replacement with ANOTHER
INSTANCE_ID (a new pod) resumes the key at once (clean shutdown whose grace ran out) or
once the key's lease ran out (SIGKILL), never after a fixed minute (issue 13).

Real server processes on SQLite and PostgreSQL, the generated stub, the simulated
gateway's ledger read from its own SQLite file: the money moves exactly once.
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from tests.e2e.server_process import ServerProcess, ledger_authorizations, server_env
from tests.helpers.builders import S, charge_request
from tests.helpers.calls import call_like_a_client, rpc_error
from tests.helpers.credentials import client_metadata

pytestmark = pytest.mark.slow

LEASE_S = 2  # IDEMPOTENCY_LEASE_SECONDS of both replicas
OLD_FIXED_TIMEOUT_S = 60  # the lock timeout this replaced
CALL_TIMEOUT_S = 30


def replica(
    database_url: str, tmp_path: pathlib.Path, instance_id: str, **extra: str
) -> ServerProcess:
    env = server_env(
        database_url,
        tmp_path,
        INSTANCE_ID=instance_id,
        IDEMPOTENCY_LEASE_SECONDS=str(LEASE_S),
        RECOVERY_INTERVAL_SECONDS="3600",  # only the client's retry finishes the key
        RECOVERY_STALE_SECONDS="3600",
        **extra,
    )
    return ServerProcess(env, cwd=tmp_path)


@contextlib.asynccontextmanager
async def connected(
    server: ServerProcess,
) -> AsyncIterator[payment_service_pb2_grpc.PaymentServiceStub]:
    async with aio.insecure_channel(
        f"127.0.0.1:{server.port}", interceptors=client_metadata(keys=False)
    ) as channel:
        yield payment_service_pb2_grpc.PaymentServiceStub(channel)


async def charge_in_flight(
    stub: payment_service_pb2_grpc.PaymentServiceStub, request: api.ChargeRequest, key: str
) -> grpc.aio.UnaryUnaryCall:  # type: ignore[type-arg]
    """Send the Charge and return once its payment exists (the key is claimed and at
    PAYMENT_CREATED; the gateway call is under way)."""
    feed = stub.WatchPayments(api.WatchPaymentsRequest(order_id=request.order_id))
    call = stub.Charge(request, metadata=(("idempotency-key", key),), timeout=CALL_TIMEOUT_S)
    async for change in feed:
        if change.event.payment.order_id == request.order_id:
            break
    feed.cancel()
    return call


async def resumed_by_replacement(
    database_url: str, tmp_path: pathlib.Path, request: api.ChargeRequest, key: str
) -> tuple[api.ChargeResponse, float]:
    """The retry on a new replica (another INSTANCE_ID), retried like the order service
    does after IDEMPOTENCY_KEY_IN_USE; (its answer, seconds until it came)."""
    server = replica(database_url, tmp_path, "replacement-pod")
    await server.start()
    try:
        async with connected(server) as stub:
            began = time.monotonic()
            answer, was_replayed = await call_like_a_client(
                lambda: stub.Charge(
                    request, metadata=(("idempotency-key", key),), timeout=CALL_TIMEOUT_S
                )
            )
            waited = time.monotonic() - began
        assert not was_replayed  # resumed and finished now, not a stored answer
        server.sigterm()
        assert await server.wait() == 0, server.log[-3000:]
    finally:
        server.kill()
    return answer, waited


def charged_once(tmp_path: pathlib.Path, answer: api.ChargeResponse) -> None:
    assert answer.payment.status == S.PAYMENT_STATUS_CAPTURED, answer
    ledger = ledger_authorizations(tmp_path / "gateway.db")
    assert ledger == {answer.payment.payment_id: 1}, ledger


async def test_keys_of_a_replica_whose_grace_ran_out_are_free_at_once(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    request, key = charge_request(), f"gone-{uuid.uuid4().hex}"
    server = replica(
        database_url,
        tmp_path,
        "old-pod",
        SHUTDOWN_GRACE_SECONDS="0",
        GATEWAY_LATENCY_MS_MIN="60000",  # the gateway call outlasts the grace
        GATEWAY_LATENCY_MS_MAX="60000",
    )
    await server.start()
    try:
        async with connected(server) as stub:
            call = await charge_in_flight(stub, request, key)
            server.sigterm()
            cut = await rpc_error(call)
        assert cut.code == grpc.StatusCode.UNAVAILABLE, (cut.code, cut.message)
        assert await server.wait() == 0, server.log[-3000:]
    finally:
        server.kill()
    assert "Traceback" not in server.log, server.log

    answer, waited = await resumed_by_replacement(database_url, tmp_path, request, key)
    assert waited < LEASE_S, f"the key waited {waited:.1f}s for its lease: not released"
    charged_once(tmp_path, answer)


async def test_keys_of_a_killed_replica_are_free_once_their_lease_ran_out(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    request, key = charge_request(), f"killed-{uuid.uuid4().hex}"
    server = replica(database_url, tmp_path, "old-pod", FAULT_POINT="charge.after_gateway")
    await server.start()
    try:
        async with connected(server) as stub:
            lost = await rpc_error(
                stub.Charge(request, metadata=(("idempotency-key", key),), timeout=CALL_TIMEOUT_S)
            )
        assert lost.code == grpc.StatusCode.UNAVAILABLE, (lost.code, lost.message)
        assert await server.wait() == -signal.SIGKILL, server.log[-3000:]
    finally:
        server.kill()

    answer, waited = await resumed_by_replacement(database_url, tmp_path, request, key)
    assert waited < OLD_FIXED_TIMEOUT_S / 4, f"the key stayed held {waited:.1f}s"
    charged_once(tmp_path, answer)

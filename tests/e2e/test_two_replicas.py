"""Two replicas (real processes, different INSTANCE_IDs) on one PostgreSQL database and
one gateway ledger: a key sent to both at once runs once, and both recovery workers
finishing the same lost gateway answers never settle a payment twice."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import pathlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from tests.e2e.server_process import (
    ServerProcess,
    ledger_authorizations,
    server_env,
    stored_payments,
)
from tests.helpers.builders import S, card, charge_request, keyed
from tests.helpers.calls import RichError, call_like_a_client
from tests.helpers.credentials import client_metadata

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

Stub = payment_service_pb2_grpc.PaymentServiceStub
CALL_TIMEOUT_S = 30
LOST_ANSWERS = {
    "GATEWAY_SUCCESS_RATE": "0",
    "GATEWAY_FAILURE_MIX": "declined=0,insufficient_funds=0,network_error=1,invalid_method=0",
    "RECOVERY_INTERVAL_SECONDS": "0.2",
    "RECOVERY_STALE_SECONDS": "0",
}


def authorized() -> list[Any]:
    """A bearer token on every call; the test sets idempotency-key itself."""
    return client_metadata(keys=False)


@contextlib.asynccontextmanager
async def two_replicas(
    database_url: str, tmp_path: pathlib.Path, **extra: str
) -> AsyncIterator[tuple[list[ServerProcess], list[Stub]]]:
    """Replicas "replica-a" and "replica-b" sharing the database, tmp_path/gateway.db and
    the column encryption key; each has its own DATA_DIR."""
    names = ("replica-a", "replica-b")
    shared_key = f"test:{base64.b64encode(os.urandom(32)).decode()}"  # as from one k8s Secret
    servers = [
        ServerProcess(
            server_env(
                database_url,
                tmp_path,
                INSTANCE_ID=name,
                DATA_DIR=str(tmp_path / name),
                ENCRYPTION_KEYS=shared_key,
                **extra,
            ),
            cwd=tmp_path,
        )
        for name in names
    ]
    try:
        await asyncio.gather(*(server.start() for server in servers))
        for server in servers:
            server.follow()
        async with (
            aio.insecure_channel(f"127.0.0.1:{servers[0].port}", interceptors=authorized()) as a,
            aio.insecure_channel(f"127.0.0.1:{servers[1].port}", interceptors=authorized()) as b,
        ):
            yield servers, [Stub(a), Stub(b)]
    except BaseException:
        for name, server in zip(names, servers, strict=True):  # shown by pytest on failure
            server.kill()
            if server.process is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait(), 10)
            print(f"----- {name} log -----\n{server.log[-20_000:]}")
        raise
    finally:
        for server in servers:
            server.kill()


async def stop_cleanly(servers: list[ServerProcess]) -> None:
    for server in servers:
        server.sigterm()
    codes = await asyncio.gather(*(server.wait() for server in servers))
    for server, code in zip(servers, codes, strict=True):
        assert code == 0, server.log[-3000:]
        assert "Traceback" not in server.log, server.log


async def charge_once(
    stub: Stub, request: api.ChargeRequest, key: str
) -> api.ChargeResponse | RichError:
    try:
        response: api.ChargeResponse = await stub.Charge(
            request, metadata=keyed(key), timeout=CALL_TIMEOUT_S
        )
    except aio.AioRpcError as error:
        return RichError(error)
    return response


async def watch_to_end(stub: Stub, payment_id: str) -> list[Any]:
    """Every event until the server ends the stream (the deadline only bounds a hang)."""
    call = stub.WatchPaymentStatus(
        api.WatchPaymentStatusRequest(payment_id=payment_id), timeout=CALL_TIMEOUT_S
    )
    return [message.event async for message in call]


async def test_same_key_on_both_replicas_at_once_runs_once(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    keys = [f"twin-{i}-{uuid.uuid4().hex}" for i in range(10)]
    requests = {key: charge_request(method=card("tok_visa")) for key in keys}
    async with two_replicas(database_url, tmp_path) as (servers, stubs):
        answers = await asyncio.gather(
            *(charge_once(stub, requests[key], key) for key in keys for stub in stubs)
        )
        by_key = {key: answers[2 * i : 2 * i + 2] for i, key in enumerate(keys)}

        payment_ids: dict[str, str] = {}
        for key, pair in by_key.items():
            payments = [a.payment for a in pair if isinstance(a, api.ChargeResponse)]
            errors = [a for a in pair if isinstance(a, RichError)]
            for error in errors:  # the only other answer: the key is held by the other call
                assert (error.code, error.info.reason) == (
                    grpc.StatusCode.ABORTED,
                    "IDEMPOTENCY_KEY_IN_USE",
                ), (key, error.code, error.message)
                assert error.has_retry, (key, error.message)
            assert payments, (key, "both calls were refused")
            assert {p.payment_id for p in payments} == {payments[0].payment_id}, (key, payments)
            assert all(p.status == S.PAYMENT_STATUS_CAPTURED for p in payments), payments
            payment_ids[key] = payments[0].payment_id

        for key in keys:
            for stub in stubs:
                again, was_replayed = await call_like_a_client(
                    functools.partial(
                        stub.Charge, requests[key], metadata=keyed(key), timeout=CALL_TIMEOUT_S
                    )
                )
                assert was_replayed, (key, again)
                assert again.payment.payment_id == payment_ids[key]
                assert again.payment.status == S.PAYMENT_STATUS_CAPTURED

        await stop_cleanly(servers)

    stored = await stored_payments(database_url)
    for key in keys:
        for_order = [pid for pid, row in stored.items() if row.order_id == requests[key].order_id]
        assert for_order == [payment_ids[key]], (key, for_order)
    assert len(stored) == len(keys), stored
    ledger = ledger_authorizations(tmp_path / "gateway.db")
    assert ledger == dict.fromkeys(payment_ids.values(), 1), ledger


async def test_recovery_on_both_replicas_settles_each_lost_answer_once(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    keys = [f"lost-{i}-{uuid.uuid4().hex}" for i in range(1, 11)]
    requests = {
        key: charge_request(method=card(f"tok_unknown_{i}")) for i, key in enumerate(keys, 1)
    }
    async with two_replicas(database_url, tmp_path, **LOST_ANSWERS) as (servers, stubs):
        answers = await asyncio.gather(
            *(
                stubs[i % 2].Charge(requests[key], metadata=keyed(key), timeout=CALL_TIMEOUT_S)
                for i, key in enumerate(keys)
            )
        )
        # The gateway recorded each charge but its answer was lost: PROCESSING. (CAPTURED
        # only if the other replica's recovery reached the gateway first with the same key.)
        assert all(
            a.payment.status in (S.PAYMENT_STATUS_PROCESSING, S.PAYMENT_STATUS_CAPTURED)
            for a in answers
        ), answers
        payment_ids = [a.payment.payment_id for a in answers]

        # Watch every payment on both replicas: each stream ends once it is CAPTURED,
        # whichever replica's recovery recorded it.
        streams = await asyncio.gather(
            *(watch_to_end(stub, pid) for pid in payment_ids for stub in stubs)
        )
        for index, events in enumerate(streams):
            assert events, payment_ids[index // 2]
            assert events[-1].status == S.PAYMENT_STATUS_CAPTURED, events
            sequences = [e.sequence for e in events]
            assert sequences == sorted(set(sequences)), events

        for key, payment_id in zip(keys, payment_ids, strict=True):
            answer, _ = await call_like_a_client(
                functools.partial(
                    stubs[1].Charge, requests[key], metadata=keyed(key), timeout=CALL_TIMEOUT_S
                )
            )
            assert answer.payment.payment_id == payment_id
            assert answer.payment.status == S.PAYMENT_STATUS_CAPTURED

        await stop_cleanly(servers)

    stored = await stored_payments(database_url)
    assert sorted(stored) == sorted(payment_ids), stored
    for payment_id in payment_ids:
        row = stored[payment_id]
        assert row.status == "CAPTURED", (payment_id, row)
        assert [status for _, status in row.events].count("CAPTURED") == 1, (payment_id, row)
        assert [s for s, _ in row.events] == list(range(1, row.sequence + 1)), (payment_id, row)
    ledger = ledger_authorizations(tmp_path / "gateway.db")
    assert ledger == dict.fromkeys(payment_ids, 1), ledger

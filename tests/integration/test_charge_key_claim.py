"""A Charge claims its idempotency key in the transaction that creates its payment (issue
12: two transactions per Charge), and exactly-once holds as with a claim of its own: a
concurrent Charge with the key is ABORTED while the first runs, a key already there
decides (replay, conflict), and a Charge refused before it claimed its key falls back
to the usual claim, so the refusal is stored or not exactly as before."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import uuid

import grpc
from payments.v1 import payment_service_pb2 as api

from payment_grpc.adapters.gateways.guarded import GuardedGateway
from payment_grpc.bootstrap import Application
from payment_grpc.service.ports import RecoveryPoint
from tests.conftest import make_settings
from tests.helpers.builders import S, charge_request, keyed
from tests.helpers.calls import RichError, replayed, rpc_error
from tests.helpers.db import committed_transactions, row_counts, stored_key
from tests.helpers.servers import serving
from tests.stripe_sim import payment_stub, running_simulator, stripe_service


def authorizations(app: Application) -> int:
    with sqlite3.connect(app.settings.ledger_path()) as ledger:
        return int(
            ledger.execute("SELECT COUNT(*) FROM ledger WHERE kind='authorize'").fetchone()[0]
        )


def _writes(statements: list[str], table: str) -> bool:
    return any(s.startswith(f"INSERT INTO {table.upper()} ") for s in statements)


async def test_a_new_charge_claims_its_key_in_the_transaction_creating_the_payment(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        with committed_transactions(app) as committed:
            reply = await stub.Charge(charge_request(), metadata=keyed(uuid.uuid4().hex))
        assert reply.payment.status == S.PAYMENT_STATUS_CAPTURED
        claims = [t for t in committed if _writes(t, "idempotency_keys")]
        assert len(claims) == 1, committed  # no transaction of its own for the claim
        (creating,) = claims
        assert _writes(creating, "payments")
        # First in its transaction: a concurrent Charge with the key waits there, before
        # it wrote anything (no wait on the order's unique index, no deadlock).
        first = next(s for s in creating if not s.startswith("BEGIN"))
        assert first.startswith("INSERT INTO IDEMPOTENCY_KEYS "), creating
        touching_the_key = [t for t in committed if any("IDEMPOTENCY_KEYS" in s for s in t)]
        assert len(touching_the_key) == 2  # claim + create, then outcome + answer


async def test_while_a_charge_runs_every_other_with_its_key_is_in_use(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """Same replica: the claim made in the create transaction is known as held by a
    running execution of this process (not taken for one whose release failed)."""
    settings = make_settings(
        database_url, tmp_path, gateway_latency_ms_min=1_000, gateway_latency_ms_max=1_000
    )
    async with serving(settings) as (app, stub):
        request, key = charge_request(), uuid.uuid4().hex
        answers = await asyncio.gather(
            *(stub.Charge(request, metadata=keyed(key)) for _ in range(12)),
            return_exceptions=True,
        )
        wins = [a for a in answers if isinstance(a, api.ChargeResponse)]
        assert len(wins) == 1, answers  # the others came while the first was at the gateway
        for answer in answers:
            if answer is not wins[0]:
                assert isinstance(answer, grpc.aio.AioRpcError), answer
                rich = RichError(answer)
                assert rich.code == grpc.StatusCode.ABORTED
                assert rich.info.reason == "IDEMPOTENCY_KEY_IN_USE"
        assert authorizations(app) == 1
        assert (await row_counts(app))["payments"] == 1
        retry = stub.Charge(request, metadata=keyed(key))
        assert (await retry).payment.payment_id == wins[0].payment.payment_id
        assert await replayed(retry)


async def test_a_charge_refused_by_its_first_write_stores_the_refusal_under_its_key(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """The order has an active payment: the create transaction (with the key's claim in
    it) fails, then the key is claimed the usual way and the refusal stored as before."""
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        first = charge_request()
        await stub.Charge(first, metadata=keyed(uuid.uuid4().hex))
        second, key = charge_request(order_id=first.order_id), uuid.uuid4().hex
        refused = await rpc_error(stub.Charge(second, metadata=keyed(key)))
        assert refused.code == grpc.StatusCode.ALREADY_EXISTS
        record = await stored_key(app, "Charge", key)
        assert record is not None
        assert record.recovery_point is RecoveryPoint.FINISHED
        again = stub.Charge(second, metadata=keyed(key))
        replay = await rpc_error(again)
        assert (replay.code, replay.info) == (refused.code, refused.info)
        assert ("idempotent-replayed", "true") in list(await again.trailing_metadata())
        assert (await row_counts(app))["payments"] == 1


async def test_a_charge_refused_before_its_claim_still_replays_a_stored_answer(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """The gateway's breaker is open: a new Charge is refused before anything is written
    (no key stored), but the retry of a finished one still gets its stored answer."""
    async with (
        running_simulator(tmp_path) as sim,
        stripe_service(
            database_url,
            tmp_path,
            sim,
            gateway_retry_attempts=1,
            gateway_breaker_failures=2,
            gateway_breaker_open_seconds=600,
        ) as app,
        payment_stub(app) as stub,
    ):
        request, key = charge_request(1_000), uuid.uuid4().hex
        done = await stub.Charge(request, metadata=keyed(key))
        sim.simulator.faults.add(["server_error", "server_error"])
        for _ in range(2):
            await stub.Charge(charge_request(1_000), metadata=keyed(uuid.uuid4().hex))
        assert isinstance(app.gateway, GuardedGateway)
        assert not app.gateway.available()

        new_key = uuid.uuid4().hex
        error = await rpc_error(stub.Charge(charge_request(1_000), metadata=keyed(new_key)))
        assert error.info.reason == "GATEWAY_UNAVAILABLE"
        assert await stored_key(app, "Charge", new_key) is None  # not stored: runs again

        retry = stub.Charge(request, metadata=keyed(key))
        assert await retry == done
        assert await replayed(retry)

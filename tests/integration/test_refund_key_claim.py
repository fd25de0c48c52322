"""A Refund claims its idempotency key in the transaction that locks the payment and
inserts the PENDING refund (issue 12: two transactions per call, as a Charge), and
exactly-once holds as with a claim of its own: concurrent Refunds with one key make one
refund and one gateway refund, a key already there decides (replay, conflict, in use),
concurrent Refunds of one payment never exceed what was captured, and a Refund refused
in its first transaction falls back to the usual claim, so its refusal is stored."""

from __future__ import annotations

import asyncio
import pathlib
import uuid

import grpc
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

from payment_grpc.service.ports import RecoveryPoint
from tests.conftest import make_settings
from tests.helpers.builders import S, charge_request, keyed, usd
from tests.helpers.calls import RichError, replayed, replayed_error, rpc_error
from tests.helpers.db import (
    committed_transactions,
    inserts_into,
    ledger_entries,
    row_counts,
    stored_key,
)
from tests.helpers.servers import serving

Stub = payment_service_pb2_grpc.PaymentServiceStub


async def _captured(stub: Stub, amount_minor: int) -> str:
    reply = await stub.Charge(charge_request(amount_minor), metadata=keyed(uuid.uuid4().hex))
    assert reply.payment.status == S.PAYMENT_STATUS_CAPTURED
    return reply.payment.payment_id


def _in_use(answer: object) -> bool:
    if not isinstance(answer, grpc.aio.AioRpcError):
        return False
    rich = RichError(answer)
    return (rich.code, rich.info.reason) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_IN_USE")


async def test_a_new_refund_claims_its_key_in_the_transaction_inserting_the_refund(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        payment_id = await _captured(stub, 1_000)
        request = api.RefundRequest(payment_id=payment_id, amount=usd(300))
        with committed_transactions(app) as committed:
            reply = await stub.Refund(request, metadata=keyed(uuid.uuid4().hex))
        assert reply.refund.status == pb.REFUND_STATUS_SUCCEEDED
        claims = [t for t in committed if inserts_into(t, "idempotency_keys")]
        assert len(claims) == 1, committed  # no transaction of its own for the claim
        (creating,) = claims
        assert inserts_into(creating, "refunds")
        # First in its transaction: a concurrent Refund with the key waits there, before
        # it locked the payment or wrote anything.
        first = next(s for s in creating if not s.startswith("BEGIN"))
        assert first.startswith("INSERT INTO IDEMPOTENCY_KEYS "), creating
        touching = [t for t in committed if any("IDEMPOTENCY_KEYS" in s for s in t)]
        assert len(touching) == 2, committed  # claim + refund, then outcome + answer


async def test_while_a_refund_runs_every_other_with_its_key_is_in_use(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """Same replica, the first Refund at the gateway: its claim, made in its first
    transaction, is known as held by a running execution (not resumed by another call)."""
    settings = make_settings(
        database_url, tmp_path, gateway_latency_ms_min=1_000, gateway_latency_ms_max=1_000
    )
    async with serving(settings) as (app, stub):
        payment_id = await _captured(stub, 1_000)
        request, key = api.RefundRequest(payment_id=payment_id, amount=usd(100)), "k-busy"
        calls = [stub.Refund(request, metadata=keyed(key)) for _ in range(12)]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        answered = [c for c, a in zip(calls, answers, strict=True) if not _in_use(a)]
        executed = [c for c in answered if not await replayed(c)]
        assert len(executed) == 1, answers  # the rest (if any) came after: replays
        assert len({(await c).refund.refund_id for c in answered}) == 1
        assert ledger_entries(app, "refund") == 1
        assert (await row_counts(app))["refunds"] == 1
        retry = stub.Refund(request, metadata=keyed(key))
        assert await retry == await executed[0]
        assert await replayed(retry)


async def test_many_refunds_with_one_key_make_one_refund_and_one_gateway_refund(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        payment_id = await _captured(stub, 100_000)
        for round_ in range(1, 4):
            request = api.RefundRequest(payment_id=payment_id, amount=usd(100))
            key = f"k-race-{round_}"
            answers = await asyncio.gather(
                *(stub.Refund(request, metadata=keyed(key)) for _ in range(16)),
                return_exceptions=True,
            )
            answered = [a for a in answers if isinstance(a, api.RefundResponse)]
            assert answered, answers
            assert all(isinstance(a, api.RefundResponse) or _in_use(a) for a in answers)
            assert len({a.refund.refund_id for a in answered}) == 1, answered
            assert ledger_entries(app, "refund") == round_
            assert (await row_counts(app))["refunds"] == round_
            after = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
            assert after.payment.refunded_amount.amount_minor == 100 * round_


async def test_a_key_used_for_another_refund_is_reused_and_changes_nothing(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        payment_id = await _captured(stub, 1_000)
        first = api.RefundRequest(payment_id=payment_id, amount=usd(100))
        await stub.Refund(first, metadata=keyed("k-reused"))
        app.keys.answers.clear()  # decided by the claim in the database, not from memory
        other = api.RefundRequest(payment_id=payment_id, amount=usd(200))
        error = await rpc_error(stub.Refund(other, metadata=keyed("k-reused")))
        assert (error.code, error.info.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "IDEMPOTENCY_KEY_REUSED",
        )
        assert (await row_counts(app))["refunds"] == 1
        assert ledger_entries(app, "refund") == 1


async def test_concurrent_keyed_refunds_of_one_payment_never_exceed_the_captured_amount(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """Twelve Refunds of 20 on a payment of 100, each with its own key: five win; each
    of the others is refused in its first transaction, falls back to the usual claim,
    is refused again and has the refusal stored under its key (a retry replays it)."""
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        payment_id = await _captured(stub, 100)
        request = api.RefundRequest(payment_id=payment_id, amount=usd(20))
        keys = [f"k-share-{i}" for i in range(12)]
        answers = await asyncio.gather(
            *(stub.Refund(request, metadata=keyed(k)) for k in keys), return_exceptions=True
        )
        refused = {
            k: RichError(a).info.reason
            for k, a in zip(keys, answers, strict=True)
            if isinstance(a, grpc.aio.AioRpcError)
        }
        assert len(refused) == 7, answers
        assert set(refused.values()) <= {"REFUND_EXCEEDS_AVAILABLE", "PAYMENT_UNEXPECTED_STATE"}
        assert ledger_entries(app, "refund") == 5
        after = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
        assert after.payment.refunded_amount.amount_minor == 100
        assert after.payment.status == S.PAYMENT_STATUS_REFUNDED
        for key in refused:
            record = await stored_key(app, "Refund", key)
            assert record is not None
            assert record.recovery_point is RecoveryPoint.FINISHED
        app.keys.answers.clear()  # replayed from the database, not from memory
        key, reason = next(iter(refused.items()))
        again = stub.Refund(request, metadata=keyed(key))
        assert (await rpc_error(again)).info.reason == reason
        assert await replayed_error(again)
        assert ledger_entries(app, "refund") == 5

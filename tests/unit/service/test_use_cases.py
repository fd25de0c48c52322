"""The use cases against in-memory implementations of their ports (tests/unit/service/
fakes.py): no gRPC, no database, milliseconds per test. Beside the integration tests
over the wire, these pin the service layer's own promises: exactly one gateway call per
operation, the key's answer stored with the final change (and encoded before the write
lock is taken), events announced after the commit, recovery finishing what a crash or a
lost answer left."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta

import pytest

from payment_grpc.domain.errors import (
    ActivePaymentExists,
    GatewayRejected,
    IllegalTransition,
    RefundExceedsAvailable,
    ReportableError,
)
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import CaptureMethod, Payment, PaymentMethod, PaymentMethodType
from payment_grpc.domain.payment import PaymentStatus as S
from payment_grpc.domain.refund import RefundReason, RefundStatus
from payment_grpc.service.charging import ChargeCommand, Charging
from payment_grpc.service.context import RequestContext
from payment_grpc.service.deps import Deps, Records
from payment_grpc.service.errors import (
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    OutcomePending,
    StorageUnavailable,
)
from payment_grpc.service.idempotency import (
    Checkpoint,
    IdempotencyKeys,
    IdempotencyPolicy,
    KeyDecided,
)
from payment_grpc.service.operations import Operations
from payment_grpc.service.ports import (
    Authorization,
    AuthorizationOutcome,
    KeyRecord,
    Operation,
    RecoveryPoint,
    Settlement,
    StoredAnswer,
)
from payment_grpc.service.recovery import Recovery
from payment_grpc.service.settlements import Settlements
from tests.unit.service.fakes import (
    APPROVED,
    DECLINE,
    DECLINED,
    DOWN,
    LOST,
    Crash,
    CrashAt,
    FakeGateway,
    ManualClock,
    MemoryDatabase,
    RecordingBus,
)

CALLER = RequestContext(subject="svc-orders", trace_id="t1")
LOCK_TIMEOUT = timedelta(seconds=60)
USD = "USD"


@dataclass
class World:
    clock: ManualClock
    bus: RecordingBus
    db: MemoryDatabase
    gateway: FakeGateway
    faults: CrashAt
    keys: IdempotencyKeys
    settlements: Settlements
    charging: Charging
    operations: Operations
    recovery: Recovery

    def encode(self, result: object) -> bytes:
        # The stored answer is computed before the transaction that stores it, so the
        # database's single writer is never held while an answer is being encoded.
        assert not self.db.writing, "an answer was encoded under the write lock"
        return repr(result).encode()

    def refuse(self, error: ReportableError) -> StoredAnswer:
        assert not self.db.writing, "a refusal was encoded under the write lock"
        return StoredAnswer(9, error.reason.encode())

    async def checkpoint(self, operation: Operation, key: str = "", fp: str = "f") -> Checkpoint:
        claimed = await self.keys.begin(CALLER.subject, operation, key or uuid.uuid4().hex, fp)
        assert isinstance(claimed, KeyRecord)
        return Checkpoint(claimed, self.encode, self.refuse)

    async def stored(self, operation: Operation, key: str) -> KeyRecord:
        async with self.db(read_only=True) as tx:
            record = await tx.idempotency.get_for_update(CALLER.subject, operation, key)
        assert record is not None
        return record

    async def payment(self, payment_id: str) -> Payment:
        async with self.db(read_only=True) as tx:
            return await tx.payments.get(payment_id)

    async def restart(self) -> None:
        """The replica comes back: it takes back the keys it held when it died."""
        await self.keys.release_own_locks()


def world(fault: str = "") -> World:
    clock, bus, gateway, faults = ManualClock(), RecordingBus(), FakeGateway(), CrashAt(fault)
    db = MemoryDatabase(bus)
    records = Records(uow=db, bus=bus, clock=clock, faults=faults)
    settlements = Settlements(records)
    deps = Deps(uow=db, bus=bus, clock=clock, faults=faults, gateway=gateway)
    keys = IdempotencyKeys(db, clock, IdempotencyPolicy("replica-1", lock_timeout=LOCK_TIMEOUT))
    charging, operations = Charging(deps, settlements), Operations(deps)
    w = World(clock, bus, db, gateway, faults, keys, settlements, charging, operations, None)  # type: ignore[arg-type]
    w.recovery = Recovery(
        deps,
        charging,
        settlements,
        operations,
        keys,
        timedelta(0),
        lambda _operation, result: w.encode(result),
        w.refuse,
    )
    return w


def charge(token: str = APPROVED, *, manual: bool = False, amount: int = 1000) -> ChargeCommand:
    return ChargeCommand(
        order_id=f"ord_{uuid.uuid4().hex}",
        amount=Money(USD, amount),
        method=PaymentMethod(PaymentMethodType.CARD, token=token),
        capture_method=CaptureMethod.MANUAL if manual else CaptureMethod.AUTOMATIC,
    )


async def _charged(w: World, **kwargs: object) -> Payment:
    return await w.charging.charge(charge(**kwargs), CALLER)  # type: ignore[arg-type]


# ------------------------------------------------------------------ charge


async def test_a_charge_is_captured_in_two_transactions_with_its_answer_and_events() -> None:
    w = world()
    checkpoint = await w.checkpoint(Operation.CHARGE, "k1")
    before = w.db.transactions
    payment = await w.charging.charge(charge(), CALLER, checkpoint)
    assert payment.status is S.CAPTURED
    assert payment.captured_minor == 1000
    assert w.db.transactions - before == 2  # create, then record the gateway's answer
    assert checkpoint.answer == StoredAnswer(0, w.encode(payment))
    stored = await w.stored(Operation.CHARGE, "k1")
    assert stored.recovery_point is RecoveryPoint.FINISHED
    assert stored.response_body == checkpoint.answer.body
    assert w.bus.published == [(payment.payment_id, n) for n in (1, 2, 3)]


async def test_a_decline_is_an_answer_not_an_error() -> None:
    w = world()
    checkpoint = await w.checkpoint(Operation.CHARGE)
    payment = await w.charging.charge(charge(DECLINED), CALLER, checkpoint)
    assert (payment.status, payment.failure) == (S.FAILED, DECLINE)
    assert checkpoint.answer == StoredAnswer(0, w.encode(payment))


@pytest.mark.parametrize("token", [LOST, DOWN])
async def test_no_answer_from_the_gateway_leaves_the_payment_processing_and_the_key_open(
    token: str,
) -> None:
    w = world()
    checkpoint = await w.checkpoint(Operation.CHARGE, "k1")
    payment = await w.charging.charge(charge(token), CALLER, checkpoint)
    assert payment.status is S.PROCESSING
    assert checkpoint.answer is None
    assert (await w.stored(Operation.CHARGE, "k1")).recovery_point is RecoveryPoint.PAYMENT_CREATED


async def test_recovery_settles_a_lost_answer_and_answers_the_abandoned_key() -> None:
    w = world()
    checkpoint = await w.checkpoint(Operation.CHARGE, "k1")
    payment = await w.charging.charge(charge(LOST), CALLER, checkpoint)
    w.clock.advance(LOCK_TIMEOUT * 2)  # the caller gave up; nobody holds the key any more
    report = await w.recovery.run_once()
    assert (report.settled, report.keys) == (1, 1)
    settled = await w.payment(payment.payment_id)
    assert settled.status is S.CAPTURED
    replay = await w.keys.begin(CALLER.subject, Operation.CHARGE, "k1", "f")
    assert replay == StoredAnswer(0, w.encode(settled))
    assert len(w.gateway.authorizations) == 1


async def test_a_crash_after_the_gateway_answered_resumes_with_one_authorization() -> None:
    w = world("charge.after_gateway")
    with pytest.raises(Crash):
        await w.charging.charge(charge(), CALLER, await w.checkpoint(Operation.CHARGE, "k1"))
    await w.restart()
    retry = await w.checkpoint(Operation.CHARGE, "k1")
    assert retry.payment_id is not None
    payment = await w.charging.charge(charge(), CALLER, retry)
    assert payment.status is S.CAPTURED
    assert len(w.gateway.authorizations) == 1
    assert [seq for _, seq in w.bus.published] == [1, 2, 3]


async def test_a_crash_after_the_commit_announces_nothing_more_and_the_retry_replays() -> None:
    w = world("charge.after_commit")
    with pytest.raises(Crash):
        await w.charging.charge(charge(), CALLER, await w.checkpoint(Operation.CHARGE, "k1"))
    assert [seq for _, seq in w.bus.published] == [1, 2]  # the outcome never announced
    await w.restart()
    replay = await w.keys.begin(CALLER.subject, Operation.CHARGE, "k1", "f")
    assert isinstance(replay, StoredAnswer)
    assert replay.code == 0


async def test_a_second_live_payment_for_an_order_changes_and_announces_nothing() -> None:
    w = world()
    first = charge(manual=True)
    await w.charging.charge(first, CALLER)
    published, rows = list(w.bus.published), dict(w.db.tables.payments)
    with pytest.raises(ActivePaymentExists):
        await w.charging.charge(first, CALLER)
    assert (w.bus.published, w.db.tables.payments) == (published, rows)


async def test_gateway_news_first_then_our_own_answer_decides_again_on_the_recorded_state() -> None:
    w = world()
    checkpoint = await w.checkpoint(Operation.CHARGE)
    processing = await w.charging.create(charge(), CALLER, checkpoint)
    captured = Authorization(AuthorizationOutcome.CAPTURED, "ch_news")
    await w.settlements.settled(Settlement(processing.payment_id, captured))
    declined = Authorization(AuthorizationOutcome.DECLINED, "ch_late", failure=DECLINE)
    answered = await w.settlements.record(
        processing.payment_id, declined, CALLER, checkpoint, known=processing
    )
    assert (answered.status, answered.gateway_reference) == (S.CAPTURED, "ch_news")
    assert checkpoint.answer == StoredAnswer(0, w.encode(answered))


# ------------------------------------------------------------------ capture, cancel


async def test_capture_and_cancel_each_reach_the_gateway_once() -> None:
    w = world()
    authorized = await _charged(w, manual=True)
    assert authorized.status is S.AUTHORIZED
    checkpoint = await w.checkpoint(Operation.CAPTURE)
    captured = await w.operations.capture(
        authorized.payment_id, Money(USD, 600), CALLER, checkpoint
    )
    assert (captured.status, captured.captured_minor, captured.in_flight) == (S.CAPTURED, 600, "")
    assert checkpoint.answer == StoredAnswer(0, w.encode(captured))
    other = await _charged(w, manual=True)
    canceled = await w.operations.cancel(other.payment_id, CALLER)
    assert canceled.status is S.CANCELED
    with pytest.raises(IllegalTransition):
        await w.operations.cancel(other.payment_id, CALLER)
    assert (w.gateway.calls("capture"), w.gateway.calls("void")) == (1, 1)


async def test_a_refused_capture_is_stored_with_the_released_claim() -> None:
    w = world()
    authorized = await _charged(w, manual=True)
    w.gateway.refuse_next.add("capture")
    checkpoint = await w.checkpoint(Operation.CAPTURE)
    with pytest.raises(GatewayRejected):
        await w.operations.capture(authorized.payment_id, None, CALLER, checkpoint)
    assert checkpoint.answer == StoredAnswer(9, b"GATEWAY_REJECTED")
    after = await w.payment(authorized.payment_id)
    assert (after.status, after.in_flight, after.sequence) == (S.AUTHORIZED, "", 3)


async def test_an_unreachable_capture_is_pending_and_recovery_completes_the_claim() -> None:
    w = world()
    authorized = await _charged(w, manual=True)
    w.gateway.unreachable = True
    with pytest.raises(OutcomePending):
        await w.operations.capture(authorized.payment_id, None, CALLER)
    assert (await w.payment(authorized.payment_id)).in_flight == "capture:1000"
    w.gateway.unreachable = False
    w.clock.advance(timedelta(seconds=1))
    assert (await w.recovery.run_once()).settled == 1
    assert (await w.payment(authorized.payment_id)).status is S.CAPTURED
    assert w.gateway.calls("capture") == 1


# ------------------------------------------------------------------ refund


async def test_partial_refunds_never_exceed_what_was_captured() -> None:
    w = world()
    payment = await _charged(w)
    first, after_first = await w.operations.refund(
        payment.payment_id, Money(USD, 600), RefundReason.REQUESTED_BY_CUSTOMER, CALLER
    )
    assert (first.status, after_first.status) == (RefundStatus.SUCCEEDED, S.PARTIALLY_REFUNDED)
    with pytest.raises(RefundExceedsAvailable):
        await w.operations.refund(
            payment.payment_id, Money(USD, 600), RefundReason.UNSPECIFIED, CALLER
        )
    rest, after = await w.operations.refund(
        payment.payment_id, None, RefundReason.UNSPECIFIED, CALLER
    )
    assert (rest.amount.amount_minor, after.status, after.refunded_minor) == (400, S.REFUNDED, 1000)


async def test_a_refund_the_gateway_did_not_answer_stays_pending_until_recovery() -> None:
    w = world()
    payment = await _charged(w)
    w.gateway.unreachable = True
    checkpoint = await w.checkpoint(Operation.REFUND, "r1")
    pending, _ = await w.operations.refund(
        payment.payment_id, None, RefundReason.UNSPECIFIED, CALLER, checkpoint
    )
    assert pending.status is RefundStatus.PENDING
    assert checkpoint.answer is None
    w.gateway.unreachable = False
    w.clock.advance(LOCK_TIMEOUT * 2)
    report = await w.recovery.run_once()
    assert (report.settled, report.keys) == (1, 1)
    refund = w.db.tables.refunds[pending.refund_id]
    assert refund.status is RefundStatus.SUCCEEDED
    assert (await w.payment(payment.payment_id)).status is S.REFUNDED
    assert w.gateway.calls("refund") == 1


async def test_a_refund_outcome_is_not_written_over_a_refund_recorded_meanwhile() -> None:
    """The gateway's answer is recorded without reading the refund first: its UPDATE
    holds only on the status decided on. Recorded FAILED meanwhile (the payment
    unchanged): the success is not written over it, nor the payment refunded."""
    w = world()
    payment = await _charged(w)
    w.gateway.unreachable = True
    pending, known = await w.operations.refund(
        payment.payment_id, Money(USD, 300), RefundReason.UNSPECIFIED, CALLER
    )
    w.gateway.unreachable = False
    async with w.db() as tx:
        await tx.refunds.save(pending.failed("declined", w.clock.now()))
        await tx.commit()
    refund, after = await w.operations.finish_refund(pending, CALLER, known=known)
    assert refund.status is RefundStatus.FAILED
    assert w.db.tables.refunds[pending.refund_id].status is RefundStatus.FAILED
    assert (after.status, after.refunded_minor) == (S.CAPTURED, 0)
    assert (await w.payment(payment.payment_id)).refunded_minor == 0


# ------------------------------------------------------------------ idempotency keys


async def test_a_key_is_claimed_once_refused_for_another_request_and_replayed_when_done() -> None:
    w = world()
    checkpoint = await w.checkpoint(Operation.CHARGE, "k1", fp="first")
    with pytest.raises(IdempotencyKeyInUse):
        await w.keys.begin(CALLER.subject, Operation.CHARGE, "k1", "first")
    with pytest.raises(IdempotencyKeyReused):
        await w.keys.begin(CALLER.subject, Operation.CHARGE, "k1", "other")
    other_operation = await w.keys.begin(CALLER.subject, Operation.REFUND, "k1", "other")
    assert isinstance(other_operation, KeyRecord)  # keys are scoped by operation
    payment = await w.charging.charge(charge(), CALLER, checkpoint)
    replay = await w.keys.begin(CALLER.subject, Operation.CHARGE, "k1", "first")
    assert replay == StoredAnswer(0, w.encode(payment))


async def test_a_retry_waits_for_the_release_of_the_call_it_follows_instead_of_in_use() -> None:
    w = world()
    cut = await w.keys.begin(CALLER.subject, Operation.CHARGE, "k1", "f")
    assert isinstance(cut, KeyRecord)
    w.db.busy = True  # the cut call's release meets a busy database and tries again
    releasing = asyncio.ensure_future(w.keys.release(cut))
    await w.db.refused.wait()
    w.db.busy = False
    retry = await w.keys.begin(CALLER.subject, Operation.CHARGE, "k1", "f")
    assert isinstance(retry, KeyRecord)  # runs: the released key was dropped (STARTED)
    await releasing


async def test_a_key_its_replica_could_not_release_is_resumed_there_at_once() -> None:
    w = world()
    short_lease = IdempotencyPolicy("replica-1", lock_timeout=timedelta(milliseconds=200))
    keys = IdempotencyKeys(w.db, w.clock, short_lease)
    cut = await keys.begin(CALLER.subject, Operation.CHARGE, "k1", "f")
    assert isinstance(cut, KeyRecord)
    w.db.busy = True  # busy for the whole lease: the release gives up
    with pytest.raises(StorageUnavailable):
        await keys.release(cut)
    w.db.busy = False
    other_replica = IdempotencyKeys(w.db, w.clock, replace(short_lease, owner="replica-2"))
    with pytest.raises(IdempotencyKeyInUse):  # its lease has not run out (the clock stood)
        await other_replica.begin(CALLER.subject, Operation.CHARGE, "k1", "f")
    resumed = await keys.begin(CALLER.subject, Operation.CHARGE, "k1", "f")
    assert isinstance(resumed, KeyRecord)
    assert resumed.record_id == cut.record_id  # resumed, not run as a new request
    with pytest.raises(IdempotencyKeyInUse):  # and now held by that execution
        await keys.begin(CALLER.subject, Operation.CHARGE, "k1", "f")


# ------------------------------------------- a Charge's key claimed in its first write


async def _unclaimed(w: World, key: str, fp: str = "f") -> Checkpoint:
    record = await w.keys.unclaimed(CALLER.subject, Operation.CHARGE, key, fp)
    return Checkpoint(record, w.encode, w.refuse, claim_with=w.keys)


async def test_a_charge_claiming_its_key_in_its_create_runs_two_transactions_in_all() -> None:
    w = world()
    checkpoint = await _unclaimed(w, "k1")
    assert not checkpoint.claimed
    before = w.db.transactions
    payment = await w.charging.charge(charge(), CALLER, checkpoint)
    assert w.db.transactions - before == 2  # claim + create, then outcome + answer
    assert checkpoint.claimed
    assert checkpoint.answer == StoredAnswer(0, w.encode(payment))
    stored = await w.stored(Operation.CHARGE, "k1")
    assert stored.recovery_point is RecoveryPoint.FINISHED
    assert stored.payment_id == payment.payment_id


async def test_a_claim_in_the_create_that_meets_the_key_writes_nothing() -> None:
    w = world()
    running = await w.checkpoint(Operation.CHARGE, "k1", fp="first")
    for fp, found in (("first", IdempotencyKeyInUse), ("other", IdempotencyKeyReused)):
        with pytest.raises(KeyDecided) as decided:
            await w.charging.charge(charge(), CALLER, await _unclaimed(w, "k1", fp))
        assert isinstance(decided.value.found, found)
    assert w.db.tables.payments == {}
    payment = await w.charging.charge(charge(), CALLER, running)
    with pytest.raises(KeyDecided) as decided:
        await w.charging.charge(charge(), CALLER, await _unclaimed(w, "k1", "first"))
    assert decided.value.found == StoredAnswer(0, w.encode(payment))
    assert len(w.db.tables.payments) == 1


async def test_a_key_held_by_a_claim_in_a_create_is_in_use_before_its_commit() -> None:
    w = world()
    checkpoint = await _unclaimed(w, "k1")
    async with w.db() as tx:
        await checkpoint.claiming(RecoveryPoint.PAYMENT_CREATED, payment_id="pay_1")(tx)
        assert w.keys.holding == 1  # held before the claim is visible
        await tx.commit()
    assert checkpoint.claimed
    with pytest.raises(KeyDecided) as decided:  # not taken for a key nobody works on
        await w.charging.charge(charge(), CALLER, await _unclaimed(w, "k1"))
    assert isinstance(decided.value.found, IdempotencyKeyInUse)


async def test_a_refund_claiming_its_key_in_its_first_transaction_runs_two_in_all() -> None:
    w = world()
    payment = await _charged(w)
    record = await w.keys.unclaimed(CALLER.subject, Operation.REFUND, "r1", "f")
    checkpoint = Checkpoint(record, w.encode, w.refuse, claim_with=w.keys)
    before = w.db.transactions
    refund, _ = await w.operations.refund(
        payment.payment_id, Money(USD, 300), RefundReason.UNSPECIFIED, CALLER, checkpoint
    )
    assert w.db.transactions - before == 2  # claim + refund, then outcome + answer
    assert checkpoint.claimed
    stored = await w.stored(Operation.REFUND, "r1")
    assert stored.recovery_point is RecoveryPoint.FINISHED
    assert (stored.payment_id, stored.refund_id) == (payment.payment_id, refund.refund_id)
    assert w.gateway.calls("refund") == 1


async def test_a_claim_in_a_refund_that_meets_the_key_writes_nothing() -> None:
    w = world()
    payment = await _charged(w)
    running = await w.checkpoint(Operation.REFUND, "r1", fp="first")
    for fp, found in (("first", IdempotencyKeyInUse), ("other", IdempotencyKeyReused)):
        record = await w.keys.unclaimed(CALLER.subject, Operation.REFUND, "r1", fp)
        with pytest.raises(KeyDecided) as decided:
            await w.operations.refund(
                payment.payment_id,
                Money(USD, 300),
                RefundReason.UNSPECIFIED,
                CALLER,
                Checkpoint(record, w.encode, w.refuse, claim_with=w.keys),
            )
        assert isinstance(decided.value.found, found)
    assert w.db.tables.refunds == {}
    assert w.gateway.calls("refund") == 0
    await w.operations.refund(
        payment.payment_id, Money(USD, 300), RefundReason.UNSPECIFIED, CALLER, running
    )
    assert len(w.db.tables.refunds) == 1


async def test_a_release_gives_back_only_the_row_of_its_own_claim() -> None:
    """A cut Charge whose create never committed releases its record: the key's row is
    another call's claim (same replica), which must stay held."""
    w = world()
    cut = await w.keys.unclaimed(CALLER.subject, Operation.CHARGE, "k1", "f")
    other = await w.keys.begin(CALLER.subject, Operation.CHARGE, "k1", "f")
    assert isinstance(other, KeyRecord)
    await w.keys.release(cut)
    stored = await w.stored(Operation.CHARGE, "k1")
    assert stored.record_id == other.record_id
    with pytest.raises(IdempotencyKeyInUse):
        await w.keys.begin(CALLER.subject, Operation.CHARGE, "k1", "f")

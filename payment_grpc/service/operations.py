"""Capture, cancel and refund of an existing payment.

Each runs as claim (transaction 1, under the row lock) -> gateway call with a derived
key -> record (transaction 2, under the row lock). The claim serializes racing
operations without holding a lock across the gateway call; the recovery worker finishes
claims left by a crash by repeating the gateway call with the same key. With an
idempotency key, each transaction also records the key's recovery point, and the final
one stores the answer. A refund's first transaction claims its key too (when the
transport left that to it), before it locks the payment.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

from payment_grpc.domain.errors import GatewayRejected, OperationInProgress
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import (
    CAPTURED_STATUSES,
    CancellationReason,
    Failure,
    Payment,
    PaymentStatus,
)
from payment_grpc.domain.refund import Refund, RefundReason, RefundStatus
from payment_grpc.service.changes import (
    NO_CHANGE,
    Change,
    Changes,
    Decision,
    Snapshot,
    moved,
    payment_reader,
    refund_reader,
)
from payment_grpc.service.context import RequestContext
from payment_grpc.service.deps import Deps, capture_key, new_id, void_key
from payment_grpc.service.errors import OutcomePending
from payment_grpc.service.idempotency import Checkpoint, no_checkpoint
from payment_grpc.service.ports import (
    NO_ANSWER,
    GatewayResult,
    RecoveryPoint,
)

CAPTURE = "capture"
CANCEL = "cancel"
# Where the payment is once the operation happened (refunds may follow a capture).
DONE_STATUSES = {CAPTURE: CAPTURED_STATUSES, CANCEL: frozenset({PaymentStatus.CANCELED})}


def outcome_of_released_claim(operation: str, payment: Payment) -> Payment | GatewayRejected:
    """What a claim of `operation` came to once it is no longer on the payment: the payment
    if the operation happened; else the gateway refused it (a claim is only ever released
    with the change or because of a refusal). The refusal's code is not kept on the
    payment, so this answer does not repeat it."""
    if payment.status in DONE_STATUSES[operation]:
        return payment
    return GatewayRejected(operation, "")


def capture_claim(amount_minor: int) -> str:
    return f"{CAPTURE}:{amount_minor}"


def claimed_capture_amount(claim: str) -> int:
    return int(claim.removeprefix(f"{CAPTURE}:"))


def claimed_operation(claim: str) -> str:
    return claim.split(":")[0]


# The recovery worker's void of an expired authorization claims "cancel:expired", so a
# crash between its claim and its record still ends with the reason EXPIRED.
EXPIRY_CLAIM = f"{CANCEL}:expired"
# Kept in `failure` too (clients older than Payment.cancellation_reason read it there).
EXPIRED = Failure("EXPIRED", "the authorization hold expired before capture")


def cancel_changes(claim: str) -> dict[str, object]:
    """What a successful void under `claim` records beside the status."""
    if claim == EXPIRY_CLAIM:
        return {"cancellation_reason": CancellationReason.EXPIRED, "failure": EXPIRED}
    return {"cancellation_reason": CancellationReason.REQUESTED}


class Operations:
    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._changes = Changes(deps.uow, deps.faults)

    # ------------------------------------------------------------ capture

    async def capture(
        self,
        payment_id: str,
        amount: Money | None,
        ctx: RequestContext,
        checkpoint: Checkpoint | None = None,
    ) -> Payment:
        checkpoint = checkpoint or no_checkpoint()
        if checkpoint.resumes_at(RecoveryPoint.OPERATION_CLAIMED):
            return await self._resume_claim(payment_id, CAPTURE, ctx, checkpoint)

        def claim(payment: Payment) -> str:
            captured = amount or payment.amount
            payment.check_capture(captured)
            return capture_claim(captured.amount_minor)

        claimed = await self._claim(payment_id, claim, checkpoint)
        self._deps.faults.hit("capture.before_gateway")
        return await self.finish_capture(claimed, ctx, checkpoint)

    async def finish_capture(
        self, claimed: Payment, ctx: RequestContext, checkpoint: Checkpoint | None = None
    ) -> Payment:
        amount = Money(claimed.amount.currency, claimed_capture_amount(claimed.in_flight))
        call = self._deps.gateway.capture(
            claimed.gateway_reference, amount, capture_key(claimed.payment_id)
        )
        return await self._settle_claim(
            claimed,
            call,
            PaymentStatus.CAPTURED,
            ctx,
            checkpoint,
            captured_minor=amount.amount_minor,
        )

    # ------------------------------------------------------------ cancel

    async def cancel(
        self, payment_id: str, ctx: RequestContext, checkpoint: Checkpoint | None = None
    ) -> Payment:
        checkpoint = checkpoint or no_checkpoint()
        if checkpoint.resumes_at(RecoveryPoint.OPERATION_CLAIMED):
            return await self._resume_claim(payment_id, CANCEL, ctx, checkpoint)

        def claim(payment: Payment) -> str | None:
            payment.require(CANCEL, PaymentStatus.PENDING, PaymentStatus.AUTHORIZED)
            return None if payment.status is PaymentStatus.PENDING else CANCEL

        claimed = await self._claim(payment_id, claim, checkpoint)
        if claimed.status is PaymentStatus.PENDING:  # not claimed: nothing reached the gateway
            return await self._cancel_unsent(claimed, ctx, checkpoint)
        self._deps.faults.hit("cancel.before_gateway")
        return await self.finish_cancel(claimed, ctx, checkpoint)

    async def _cancel_unsent(
        self, payment: Payment, ctx: RequestContext, checkpoint: Checkpoint
    ) -> Payment:
        """Nothing reached the gateway yet: cancel at once (its answer encoded first)."""
        now = self._deps.clock.now()

        def decide(snapshot: Snapshot) -> Decision[Payment]:
            current = snapshot.payment
            current.require(CANCEL, PaymentStatus.PENDING, PaymentStatus.AUTHORIZED)
            if current.status is not PaymentStatus.PENDING:
                raise OperationInProgress(current.payment_id, CANCEL)  # moved on meanwhile
            return moved(
                current,
                PaymentStatus.CANCELED,
                action=CANCEL,
                ctx=ctx,
                at=now,
                cancellation_reason=CancellationReason.REQUESTED,
            )

        return await self._changes.decide(
            payment_reader(payment.payment_id), Snapshot(payment), decide, checkpoint, fault=""
        )

    async def finish_cancel(
        self, claimed: Payment, ctx: RequestContext, checkpoint: Checkpoint | None = None
    ) -> Payment:
        """Void under the claim (a caller's cancel, or an expiry) and record the outcome."""
        call = self._deps.gateway.void(claimed.gateway_reference, void_key(claimed.payment_id))
        return await self._settle_claim(
            claimed,
            call,
            PaymentStatus.CANCELED,
            ctx,
            checkpoint,
            **cancel_changes(claimed.in_flight),
        )

    async def expire(self, payment_id: str, ctx: RequestContext) -> Payment:
        """Void an authorization held too long: CANCELED, reason EXPIRED."""
        async with self._deps.uow() as tx:
            payment = await tx.payments.get(payment_id, for_update=True)
            if payment.status is not PaymentStatus.AUTHORIZED or payment.in_flight:
                return payment  # captured, canceled or claimed meanwhile
            claimed = payment.claim(EXPIRY_CLAIM)
            await tx.payments.save(payment, claimed, [])
            await tx.commit()
        return await self.finish_cancel(claimed, ctx)

    # ------------------------------------------------------------ shared

    async def _claim(
        self,
        payment_id: str,
        claim: Callable[[Payment], str | None],
        checkpoint: Checkpoint,
    ) -> Payment:
        """Under the row lock, `claim` checks the payment and names the claim to put on it;
        the claimed payment is committed with the key's recovery point and returned. If
        `claim` names none, the payment as read is returned, unchanged."""
        async with self._deps.uow() as tx:
            payment = await tx.payments.get(payment_id, for_update=True)
            name = claim(payment)
            if name is None:
                return payment
            claimed = payment.claim(name)
            reached = checkpoint.reaching(RecoveryPoint.OPERATION_CLAIMED, payment_id=payment_id)
            await self._changes.commit(tx, Change(claimed, payment), reached)
        return claimed

    async def _resume_claim(
        self, payment_id: str, operation: str, ctx: RequestContext, checkpoint: Checkpoint
    ) -> Payment:
        """A retry after a crash: finish our claimed operation, or report its outcome."""
        async with self._deps.uow(read_only=True) as tx:
            payment = await tx.payments.get(payment_id)
        if payment.in_flight and claimed_operation(payment.in_flight) == operation:
            if operation == CAPTURE:
                return await self.finish_capture(payment, ctx, checkpoint)
            return await self.finish_cancel(payment, ctx, checkpoint)
        outcome = outcome_of_released_claim(operation, payment)
        await self._changes.finish(checkpoint, outcome)
        if isinstance(outcome, GatewayRejected):
            raise outcome
        return outcome

    async def _settle_claim(
        self,
        claimed: Payment,
        call: Awaitable[GatewayResult],
        to: PaymentStatus,
        ctx: RequestContext,
        checkpoint: Checkpoint | None,
        **changes: object,
    ) -> Payment:
        """The gateway's answer to the claimed capture or void, recorded (no answer:
        OutcomePending, the claim stays for recovery)."""
        operation = claimed_operation(claimed.in_flight)
        try:
            result = await call
        except NO_ANSWER as exc:
            raise OutcomePending(operation, claimed.payment_id) from exc
        self._deps.faults.hit(f"{operation}.after_gateway")
        now = self._deps.clock.now()

        def decide(snapshot: Snapshot) -> Decision[Payment]:
            current = snapshot.payment
            if current.in_flight != claimed.in_flight:
                return Decision(NO_CHANGE, current)  # recovery or a retry recorded it
            if not result.succeeded:
                code = result.failure.code if result.failure else ""
                released = replace(current, in_flight="")
                return Decision(Change(released, current), GatewayRejected(operation, code))
            return moved(current, to, action=operation, ctx=ctx, at=now, in_flight="", **changes)

        return await self._changes.decide(
            payment_reader(claimed.payment_id),
            Snapshot(claimed),
            decide,
            checkpoint or no_checkpoint(),
            fault=f"{operation}.after_commit",
        )

    # ------------------------------------------------------------ refund

    async def refund(
        self,
        payment_id: str,
        amount: Money | None,
        reason: RefundReason,
        ctx: RequestContext,
        checkpoint: Checkpoint | None = None,
    ) -> tuple[Refund, Payment]:
        checkpoint = checkpoint or no_checkpoint()
        if checkpoint.refund_id:
            return await self._resume_refund(checkpoint.refund_id, ctx, checkpoint)
        now = self._deps.clock.now()
        refund_id = new_id("re")
        claim = checkpoint.claiming(
            RecoveryPoint.REFUND_CREATED, payment_id=payment_id, refund_id=refund_id
        )
        async with self._deps.uow() as tx:
            # First: a Refund whose key is not claimed yet claims it here (as a Charge does
            # in its create), so a concurrent one with the key waits at its claim before it
            # locked the payment or wrote anything of its own.
            await claim(tx)
            payment = await tx.payments.get(payment_id, for_update=True)
            payment.require("refund", PaymentStatus.CAPTURED, PaymentStatus.PARTIALLY_REFUNDED)
            reserved = await tx.refunds.reserved_minor(payment_id)
            remainder = Money(payment.amount.currency, payment.refundable_minor - reserved)
            amount = amount or remainder
            payment.check_refund(amount, reserved)
            refund = Refund(
                refund_id=refund_id,
                payment_id=payment_id,
                amount=amount,
                reason=reason,
                created_at=now,
                updated_at=now,
            )
            await self._changes.commit(tx, Change(refund=refund, new_refund=True))
        self._deps.faults.hit("refund.before_gateway")
        return await self.finish_refund(refund, ctx, checkpoint, known=payment)

    async def _resume_refund(
        self, refund_id: str, ctx: RequestContext, checkpoint: Checkpoint
    ) -> tuple[Refund, Payment]:
        async with self._deps.uow(read_only=True) as tx:
            refund = await tx.refunds.get(refund_id)
            payment = await tx.payments.get(refund.payment_id)
        if refund.status is RefundStatus.PENDING:
            return await self.finish_refund(refund, ctx, checkpoint)
        await self._changes.finish(checkpoint, (refund, payment))
        return refund, payment

    async def finish_refund(
        self,
        refund: Refund,
        ctx: RequestContext,
        checkpoint: Checkpoint | None = None,
        known: Payment | None = None,
    ) -> tuple[Refund, Payment]:
        """`known`: the payment as the caller last saw it (read when not given); if it
        moved meanwhile, recording the outcome reads it again and decides anew."""
        payment = known
        if payment is None:
            async with self._deps.uow(read_only=True) as tx:
                payment = await tx.payments.get(refund.payment_id)
        try:
            result = await self._deps.gateway.refund(
                payment.gateway_reference, refund.amount, refund.refund_id
            )
        except NO_ANSWER:
            return refund, payment  # stays PENDING; a retry or the recovery worker finishes it
        self._deps.faults.hit("refund.after_gateway")
        snapshot = Snapshot(payment, refund)
        return await self._record_refund(snapshot, result, ctx, checkpoint or no_checkpoint())

    async def _record_refund(
        self, known: Snapshot, result: GatewayResult, ctx: RequestContext, checkpoint: Checkpoint
    ) -> tuple[Refund, Payment]:
        now = self._deps.clock.now()

        def decide(snapshot: Snapshot) -> Decision[tuple[Refund, Payment]]:
            payment, current = snapshot.payment, snapshot.refund
            assert current is not None
            if current.status is not RefundStatus.PENDING:
                return Decision(NO_CHANGE, (current, payment))  # recorded already
            if not result.succeeded:
                failed = current.failed(result.failure.code if result.failure else "unknown", now)
                return Decision(Change(refund=failed), (failed, payment))
            done = current.succeeded(result.reference, now)
            after, event = payment.after_refund(
                current.amount.amount_minor, ctx.subject, ctx.trace_id, now
            )
            change = Change(after, payment, [event], refund=done, refund_before=current)
            return Decision(change, (done, after))

        assert known.refund is not None
        return await self._changes.decide(
            refund_reader(known.payment.payment_id, known.refund.refund_id),
            known,
            decide,
            checkpoint,
            fault="refund.after_commit",
        )

"""Capture, cancel and refund of an existing payment.

Each runs as claim (transaction 1, under the row lock) -> gateway call with a derived
key -> record (transaction 2, under the row lock). The claim serializes racing
operations without holding a lock across the gateway call; the recovery worker finishes
claims left by a crash by repeating the gateway call with the same key.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import replace

from payment_grpc.domain.errors import GatewayRejected, OutcomePending
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import Payment, PaymentStatus
from payment_grpc.domain.refund import Refund, RefundReason, RefundStatus
from payment_grpc.service.context import RequestContext
from payment_grpc.service.deps import Deps, capture_key, new_id, void_key
from payment_grpc.service.ports import GatewayDown, GatewayResult, GatewayTimeout, UnitOfWork

CAPTURE = "capture"
CANCEL = "cancel"


def capture_claim(amount_minor: int) -> str:
    return f"{CAPTURE}:{amount_minor}"


def claimed_capture_amount(claim: str) -> int:
    return int(claim.removeprefix(f"{CAPTURE}:"))


class Operations:
    def __init__(self, deps: Deps) -> None:
        self._deps = deps

    # ------------------------------------------------------------ capture

    async def capture(self, payment_id: str, amount: Money | None, ctx: RequestContext) -> Payment:
        async with self._deps.uow() as tx:
            payment = await tx.payments.get(payment_id, for_update=True)
            amount = amount or payment.amount
            payment.check_capture(amount)
            claimed = payment.claim(capture_claim(amount.amount_minor))
            await tx.payments.save(payment, claimed, [])
            await tx.commit()
        return await self.finish_capture(claimed, ctx)

    async def finish_capture(self, claimed: Payment, ctx: RequestContext) -> Payment:
        amount = Money(claimed.amount.currency, claimed_capture_amount(claimed.in_flight))
        result = await self._call(
            CAPTURE,
            claimed,
            self._deps.gateway.capture(
                claimed.gateway_reference, amount, capture_key(claimed.payment_id)
            ),
        )
        return await self._settle_claim(
            claimed, result, PaymentStatus.CAPTURED, ctx, captured_minor=amount.amount_minor
        )

    # ------------------------------------------------------------ cancel

    async def cancel(self, payment_id: str, ctx: RequestContext) -> Payment:
        async with self._deps.uow() as tx:
            payment = await tx.payments.get(payment_id, for_update=True)
            payment.require(CANCEL, PaymentStatus.PENDING, PaymentStatus.AUTHORIZED)
            if payment.status is PaymentStatus.PENDING:
                return await self._cancel_unsent(tx, payment, ctx)
            claimed = payment.claim(CANCEL)
            await tx.payments.save(payment, claimed, [])
            await tx.commit()
        return await self.finish_cancel(claimed, ctx)

    async def _cancel_unsent(
        self, tx: UnitOfWork, payment: Payment, ctx: RequestContext
    ) -> Payment:
        canceled, event = payment.transition(
            PaymentStatus.CANCELED,
            action=CANCEL,
            actor=ctx.subject,
            trace_id=ctx.trace_id,
            at=self._deps.clock.now(),
        )
        await tx.payments.save(payment, canceled, [event])
        await tx.commit()
        await self._deps.announce([event])
        return canceled

    async def finish_cancel(self, claimed: Payment, ctx: RequestContext) -> Payment:
        result = await self._call(
            CANCEL,
            claimed,
            self._deps.gateway.void(claimed.gateway_reference, void_key(claimed.payment_id)),
        )
        return await self._settle_claim(claimed, result, PaymentStatus.CANCELED, ctx)

    # ------------------------------------------------------------ shared

    async def _call(
        self, operation: str, payment: Payment, call: Awaitable[GatewayResult]
    ) -> GatewayResult:
        try:
            return await call
        except (GatewayTimeout, GatewayDown) as exc:
            raise OutcomePending(operation, payment.payment_id) from exc

    async def _settle_claim(
        self,
        claimed: Payment,
        result: GatewayResult,
        to: PaymentStatus,
        ctx: RequestContext,
        **changes: object,
    ) -> Payment:
        async with self._deps.uow() as tx:
            current = await tx.payments.get(claimed.payment_id, for_update=True)
            if current.in_flight != claimed.in_flight:
                return current  # somebody (recovery, a retry) already recorded it
            released = replace(current, in_flight="")
            if not result.succeeded:
                await tx.payments.save(current, released, [])
                await tx.commit()
                code = result.failure.code if result.failure else "unknown"
                raise GatewayRejected(claimed.in_flight.split(":")[0], code)
            after, event = released.transition(
                to,
                action=claimed.in_flight.split(":")[0],
                actor=ctx.subject,
                trace_id=ctx.trace_id,
                at=self._deps.clock.now(),
                **changes,
            )
            await tx.payments.save(current, after, [event])
            await tx.commit()
        await self._deps.announce([event])
        return after

    # ------------------------------------------------------------ refund

    async def refund(
        self,
        payment_id: str,
        amount: Money | None,
        reason: RefundReason,
        ctx: RequestContext,
    ) -> tuple[Refund, Payment]:
        now = self._deps.clock.now()
        async with self._deps.uow() as tx:
            payment = await tx.payments.get(payment_id, for_update=True)
            payment.require("refund", PaymentStatus.CAPTURED, PaymentStatus.PARTIALLY_REFUNDED)
            reserved = await tx.refunds.reserved_minor(payment_id)
            remainder = Money(payment.amount.currency, payment.refundable_minor - reserved)
            amount = amount or remainder
            payment.check_refund(amount, reserved)
            refund = Refund(
                refund_id=new_id("re"),
                payment_id=payment_id,
                amount=amount,
                reason=reason,
                created_at=now,
                updated_at=now,
            )
            await tx.refunds.add(refund)
            await tx.commit()
        return await self.finish_refund(refund, ctx)

    async def finish_refund(self, refund: Refund, ctx: RequestContext) -> tuple[Refund, Payment]:
        async with self._deps.uow(read_only=True) as tx:
            payment = await tx.payments.get(refund.payment_id)
        try:
            result = await self._deps.gateway.refund(
                payment.gateway_reference, refund.amount, refund.refund_id
            )
        except (GatewayTimeout, GatewayDown):
            return refund, payment  # stays PENDING; the recovery worker finishes it
        return await self._record_refund(refund, result, ctx)

    async def _record_refund(
        self, refund: Refund, result: GatewayResult, ctx: RequestContext
    ) -> tuple[Refund, Payment]:
        now = self._deps.clock.now()
        async with self._deps.uow() as tx:
            payment = await tx.payments.get(refund.payment_id, for_update=True)
            current = await tx.refunds.get(refund.refund_id)
            if current.status is not RefundStatus.PENDING:
                return current, payment
            if not result.succeeded:
                failed = current.failed(result.failure.code if result.failure else "unknown", now)
                await tx.refunds.save(failed)
                await tx.commit()
                return failed, payment
            done = current.succeeded(result.reference, now)
            after, event = payment.after_refund(
                current.amount.amount_minor, ctx.subject, ctx.trace_id, now
            )
            await tx.refunds.save(done)
            await tx.payments.save(payment, after, [event])
            await tx.commit()
        await self._deps.announce([event])
        return done, after

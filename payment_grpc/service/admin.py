"""Operator use cases (AdminService): settle a stuck payment by hand, read a payment's
audit trail, payment statistics. Every call is audited: one `admin audit` log line with
the actor, the action, its target, the reason and the outcome."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from payment_grpc.domain.errors import ReportableError
from payment_grpc.domain.payment import Payment, PaymentEvent, PaymentStatus
from payment_grpc.service.changes import Change, Changes
from payment_grpc.service.context import RequestContext
from payment_grpc.service.deps import Deps
from payment_grpc.service.errors import InvalidPageToken
from payment_grpc.service.paging import decode_token, encode_token, page_size
from payment_grpc.service.ports import PageCursor, StatsGroup
from payment_grpc.service.queries import Page

audit = logging.getLogger("payment_grpc.audit")
T = TypeVar("T")
BASIS_POINTS = 10_000


@dataclass(frozen=True, slots=True)
class PaymentStats:
    groups: list[StatsGroup]

    def _count(self, *statuses: PaymentStatus) -> int:
        return sum(g.payment_count for g in self.groups if g.status in statuses)

    @property
    def succeeded(self) -> int:
        """Payments the gateway approved (whatever happened to them afterwards)."""
        return self._count(
            PaymentStatus.AUTHORIZED,
            PaymentStatus.CAPTURED,
            PaymentStatus.PARTIALLY_REFUNDED,
            PaymentStatus.REFUNDED,
        )

    @property
    def failed(self) -> int:
        return self._count(PaymentStatus.FAILED)

    @property
    def success_rate_bps(self) -> int:
        """succeeded / decided in basis points, rounded down (integers: no float)."""
        decided = self.succeeded + self.failed
        return self.succeeded * BASIS_POINTS // decided if decided else 0


class Admin:
    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._changes = Changes(deps.uow, deps.faults)

    async def resolve(
        self, payment_id: str, to: PaymentStatus, reason: str, ctx: RequestContext
    ) -> Payment:
        """Settle a stuck payment by hand along the transition table; asking again for
        the status it already has answers it unchanged (a retry is harmless)."""

        async def resolved() -> Payment:
            async with self._deps.uow() as tx:
                payment = await tx.payments.get(payment_id, for_update=True)
                if payment.status is to:
                    return payment
                moved, event = payment.resolve(
                    to, actor=ctx.subject, trace_id=ctx.trace_id, at=self._deps.clock.now(),
                    reason=reason,
                )  # fmt: skip
                # The one way to record a change: watchers (and the outbox) hear of it.
                await self._changes.commit(tx, Change(moved, payment, [event]))
            return moved

        target = f"{payment_id} -> {to.value}"
        return await _audited("ResolvePayment", target, reason, ctx, resolved)

    async def events(
        self, payment_id: str, requested_size: int, token: str, reason: str, ctx: RequestContext
    ) -> Page[PaymentEvent]:
        async def listed() -> Page[PaymentEvent]:
            size = page_size(requested_size)
            after = _sequence(decode_token(token, payment_id))
            async with self._deps.uow(read_only=True) as tx:
                await tx.payments.get(payment_id)  # NOT_FOUND for an unknown payment
                rows = await tx.payments.events_after(payment_id, after, size + 1)
            if len(rows) <= size:
                return Page(rows, "")
            last = rows[size - 1]
            cursor = PageCursor(last.occurred_at, str(last.sequence))
            return Page(rows[:size], encode_token(cursor, payment_id))

        return await _audited("ListPaymentEvents", payment_id, reason, ctx, listed)

    async def stats(
        self, start: datetime, end: datetime, reason: str, ctx: RequestContext
    ) -> PaymentStats:
        async def counted() -> PaymentStats:
            async with self._deps.uow(read_only=True) as tx:
                return PaymentStats(await tx.payments.stats(start, end))

        window = f"[{start.isoformat()}, {end.isoformat()})"
        return await _audited("GetPaymentStats", window, reason, ctx, counted)


def _sequence(cursor: PageCursor | None) -> int:
    if cursor is None:
        return 0
    if not cursor.last_id.isdigit():
        raise InvalidPageToken()
    return int(cursor.last_id)


async def _audited(
    action: str, target: str, reason: str, ctx: RequestContext, run: Callable[[], Awaitable[T]]
) -> T:
    outcome = "error"
    try:
        result = await run()
        outcome = "ok"
        return result
    except ReportableError as error:
        outcome = error.reason
        raise
    finally:
        audit.info(
            "admin audit",
            extra={
                "actor": ctx.subject,
                "action": action,
                "target": target,
                "reason": reason,
                "outcome": outcome,
                "trace_id": ctx.trace_id,
            },
        )

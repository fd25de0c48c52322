"""Reads: one payment or refund, pages of them, and the status stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from payment_grpc.domain.errors import PaymentNotFound, RefundNotFound
from payment_grpc.domain.payment import (
    FINAL_STATUSES,
    SETTLED_STATUSES,
    Payment,
    PaymentEvent,
    PaymentStatus,
)
from payment_grpc.domain.refund import Refund
from payment_grpc.service.context import RequestContext
from payment_grpc.service.deps import Deps
from payment_grpc.service.event_reads import SharedEventReads
from payment_grpc.service.paging import decode_token, encode_token, page_size
from payment_grpc.service.ports import PageCursor, PaymentFilter

EVENT_BATCH = 100
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class SizeLimit(Generic[T]):
    """How large a page may get on the wire: the transport weighs each item, and a page
    stops early (with a next_page_token) before it would pass `max_bytes`."""

    weigh: Callable[[T], int]
    max_bytes: int


class Queries:
    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._events = SharedEventReads(deps.uow)

    async def get_payment(self, payment_id: str, ctx: RequestContext) -> Payment:
        async with self._deps.uow(read_only=True) as tx:
            return _visible(await tx.payments.get(payment_id), ctx)

    async def list_payments(
        self,
        where: PaymentFilter,
        requested_size: int,
        token: str,
        ctx: RequestContext,
        limit: SizeLimit[Payment] | None = None,
    ) -> Page[Payment]:
        if ctx.customer_id is not None:
            if not ctx.customer_id or where.customer_id not in ("", ctx.customer_id):
                return Page([], "")  # a customer's filter can only narrow, never widen
            where = replace(where, customer_id=ctx.customer_id)
        size = page_size(requested_size)
        cursor = decode_token(token, where)
        async with self._deps.uow(read_only=True) as tx:
            rows = await tx.payments.page(where, cursor, size + 1)
        return _page(rows, size, where, lambda p: PageCursor(p.created_at, p.payment_id), limit)

    async def get_refund(self, refund_id: str, ctx: RequestContext) -> Refund:
        async with self._deps.uow(read_only=True) as tx:
            refund = await tx.refunds.get(refund_id)
            try:
                _visible(await tx.payments.get(refund.payment_id), ctx)
            except PaymentNotFound as hidden:
                raise RefundNotFound(refund_id) from hidden
            return refund

    async def list_refunds(
        self,
        payment_id: str,
        requested_size: int,
        token: str,
        ctx: RequestContext,
        limit: SizeLimit[Refund] | None = None,
    ) -> Page[Refund]:
        size = page_size(requested_size)
        cursor = decode_token(token, payment_id)
        async with self._deps.uow(read_only=True) as tx:
            _visible(await tx.payments.get(payment_id), ctx)
            rows = await tx.refunds.page_for_payment(payment_id, cursor, size + 1)
        return _page(rows, size, payment_id, lambda r: PageCursor(r.created_at, r.refund_id), limit)

    async def watch(
        self,
        payment_id: str,
        from_sequence: int,
        follow_refunds: bool,
        ctx: RequestContext,
        quiet_s: float = 0.0,
    ) -> AsyncIterator[PaymentEvent | None]:
        """Snapshot (unless resuming), then every event in order; ends after a final status.
        With `quiet_s` > 0, None whenever that long passed without a change (a stream
        kept open through proxies sends a heartbeat then).

        Subscribes before reading, so a change committed between the read and the wait
        still wakes us; events always come from the table, so none is skipped or repeated.
        The snapshot (with its access check) is this stream's own; after a wake-up the
        read is shared with the other watchers of the payment at the same sequence.
        Between events a watcher keeps only a few numbers: with 10,000 watchers open,
        each one's snapshot transaction and payment were objects the GC walked.
        """
        timeout_s = quiet_s if quiet_s > 0 else None
        async with self._deps.bus.subscribe(payment_id) as subscription:
            last, known, status, pending = await self._snapshot(payment_id, from_sequence, ctx)
            while True:
                for event in pending:
                    yield event
                    last, status = event.sequence, event.status
                if _stream_ends(status, follow_refunds) and last >= known:
                    return
                if not pending:
                    while not await subscription.wait(timeout_s):
                        yield None
                # Shared with the other watchers of this payment woken with us.
                pending = await self._events.after(payment_id, last, EVENT_BATCH)

    async def _snapshot(
        self, payment_id: str, from_sequence: int, ctx: RequestContext
    ) -> tuple[int, int, PaymentStatus, list[PaymentEvent]]:
        """(sequence the stream starts after, the payment's sequence and status, the
        first events)."""
        async with self._deps.uow(read_only=True) as tx:
            payment = _visible(await tx.payments.get(payment_id), ctx)
            start = from_sequence or payment.sequence - 1
            pending = await tx.payments.events_after(payment_id, start, EVENT_BATCH)
        return start, payment.sequence, payment.status, pending


def _visible(payment: Payment, ctx: RequestContext) -> Payment:
    """A customer sees only their own payments; anything else does not exist for them."""
    customer = ctx.customer_id
    if customer is not None and (not customer or payment.customer_id != customer):
        raise PaymentNotFound(payment.payment_id)
    return payment


def _stream_ends(status: PaymentStatus, follow_refunds: bool) -> bool:
    return status in (FINAL_STATUSES if follow_refunds else SETTLED_STATUSES)


def _page(
    rows: list[T],
    size: int,
    filters: object,
    cursor_of: Callable[[T], PageCursor],
    limit: SizeLimit[T] | None,
) -> Page[T]:
    items = _within(rows[:size], limit)
    if len(items) == len(rows):
        return Page(items, "")
    return Page(items, encode_token(cursor_of(items[-1]), filters))


def _within(items: list[T], limit: SizeLimit[T] | None) -> list[T]:
    """The longest prefix that fits the limit; never empty while there are items, so a
    caller always makes progress."""
    if limit is None:
        return items
    total = 0
    for count, item in enumerate(items):
        total += limit.weigh(item)
        if total > limit.max_bytes and count > 0:
            return items[:count]
    return items

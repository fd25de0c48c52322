"""One way to record a change: every state change of a payment or a refund goes through
`Changes`, in this order:

    decide      the new state and the answer, from a snapshot, outside any transaction;
                the idempotency key's answer is encoded here (never under a write lock)
    write       in ONE transaction: check the snapshot still holds (else decide again),
                the rows and the payment's events, the key's checkpoint, COMMIT
    fault point crash tests may stop the process right after the commit
    announce    the unit of work announces the transaction's events once it is over

The unit of work collects the events a transaction writes and announces them after the
commit; the transactional outbox (issue 9) hooks in at that one place too (see the unit
of work's `commit`, adapters/db/engine.py): its rows are written for the same events, in
the same transaction, right before COMMIT.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from payment_grpc.domain.errors import ReportableError
from payment_grpc.domain.payment import Payment, PaymentEvent, PaymentStatus
from payment_grpc.domain.refund import Refund
from payment_grpc.service.context import RequestContext
from payment_grpc.service.errors import ConcurrentModification
from payment_grpc.service.idempotency import Checkpoint, Mark, untouched
from payment_grpc.service.ports import Faults, UnitOfWork, UnitOfWorkFactory

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Change:
    """The rows one transaction writes."""

    payment: Payment | None = None  # the payment's new state
    before: Payment | None = None  # its state as read; None with `payment`: a new payment
    events: Sequence[PaymentEvent] = field(default_factory=tuple)
    refund: Refund | None = None  # the refund's new state
    new_refund: bool = False
    # The refund as read: its UPDATE then holds only on that status (as the payment's on
    # `before`'s version), so the change can be written without reading it first.
    refund_before: Refund | None = None

    @property
    def writes(self) -> bool:
        return self.payment is not None or self.refund is not None


NO_CHANGE = Change()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a decision was taken on: a payment, and the refund for refund decisions."""

    payment: Payment
    refund: Refund | None = None

    def holds_in(self, current: Snapshot) -> bool:
        """The decision still stands on `current`: nothing it depends on has moved (every
        status change bumps the sequence; claims and references move without one)."""
        return _version(self) == _version(current)


def _version(snapshot: Snapshot) -> tuple[object, ...]:
    p = snapshot.payment
    refund = snapshot.refund.status if snapshot.refund else None
    return p.sequence, p.status, p.in_flight, p.gateway_reference, refund


@dataclass(frozen=True, slots=True)
class Decision(Generic[R]):
    """What to write, and what the execution answers: its result, or a refusal (raised
    once the transaction that made it final has committed)."""

    change: Change
    outcome: R | ReportableError


Read = Callable[[UnitOfWork], Awaitable[Snapshot]]


def moved(
    current: Payment,
    to: PaymentStatus,
    *,
    action: str,
    ctx: RequestContext,
    at: datetime,
    **changes: object,
) -> Decision[Payment]:
    """The decision to move the payment to `to` for the caller: the new state with its
    event, answered with that state."""
    after, event = current.transition(
        to, action=action, actor=ctx.subject, trace_id=ctx.trace_id, at=at, **changes
    )
    return Decision(Change(after, current, [event]), after)


class Changes:
    def __init__(self, uow: UnitOfWorkFactory, faults: Faults) -> None:
        self._uow = uow
        self._faults = faults

    async def commit(
        self, tx: UnitOfWork, change: Change, mark: Mark = untouched, *, fault: str = ""
    ) -> None:
        """Write `change` and the checkpoint's `mark`, commit, then pass the fault point
        (only when rows changed). The events are announced when the transaction is over."""
        await _write(tx, change)
        await mark(tx)
        await tx.commit()
        if fault and change.writes:
            self._faults.hit(fault)

    async def decide(
        self,
        read: Read,
        known: Snapshot | None,
        decide: Callable[[Snapshot], Decision[R]],
        checkpoint: Checkpoint,
        *,
        fault: str,
    ) -> R:
        """Decide on `known` (or on what `read` finds), encode the answer, then write it
        in one transaction if the snapshot still holds there; else decide again on the
        state found, so nothing is ever encoded under the write lock."""
        snapshot = known if known is not None else await self._read(read)
        unread = known is not None  # decided on what the caller knows, not read yet
        while True:
            decision = decide(snapshot)
            answer = checkpoint.answer_for(decision.outcome)
            if unread and _checked_by_its_write(decision.change, snapshot):
                # The payment's UPDATE holds only on the version decided on, so it is the
                # check itself: no read first. Moved meanwhile: read, and decide again.
                unread = False
                try:
                    async with self._uow() as tx:
                        await self.commit(
                            tx, decision.change, checkpoint.finishing(answer), fault=fault
                        )
                    break
                except ConcurrentModification:
                    snapshot = await self._read(read)
                    continue
            async with self._uow() as tx:
                current = await read(tx)
                if snapshot.holds_in(current):
                    await self.commit(
                        tx, decision.change, checkpoint.finishing(answer), fault=fault
                    )
                    break
            snapshot = current
        if isinstance(decision.outcome, ReportableError):
            raise decision.outcome
        return decision.outcome

    async def finish(self, checkpoint: Checkpoint, outcome: object) -> None:
        """Store the answer of an execution whose change was already committed."""
        answer = checkpoint.answer_for(outcome)
        async with self._uow() as tx:
            await self.commit(tx, NO_CHANGE, checkpoint.finishing(answer))

    async def _read(self, read: Read) -> Snapshot:
        async with self._uow(read_only=True) as tx:
            return await read(tx)


def _checked_by_its_write(change: Change, snapshot: Snapshot) -> bool:
    """The change updates the snapshot's payment, and its refund if the decision read
    one, and nothing else: the payment's UPDATE checks the payment's version (sequence,
    status, claim, reference), the refund's its status (`refund_before`)."""
    if change.payment is None or change.before is not snapshot.payment:
        return False
    if snapshot.refund is None:
        return change.refund is None
    return change.refund is not None and change.refund_before is snapshot.refund


def payment_reader(payment_id: str) -> Read:
    async def read(tx: UnitOfWork) -> Snapshot:
        return Snapshot(await tx.payments.get(payment_id, for_update=True))

    return read


def refund_reader(payment_id: str, refund_id: str) -> Read:
    async def read(tx: UnitOfWork) -> Snapshot:
        payment = await tx.payments.get(payment_id, for_update=True)
        return Snapshot(payment, await tx.refunds.get(refund_id))

    return read


async def _write(tx: UnitOfWork, change: Change) -> None:
    if change.refund is not None and change.refund_before is None:
        if change.new_refund:
            await tx.refunds.add(change.refund)
        else:
            await tx.refunds.save(change.refund)
    if change.payment is not None:
        if change.before is None:
            await tx.payments.add(change.payment, change.events)
        else:
            await tx.payments.save(change.before, change.payment, change.events)
    if change.refund is not None and change.refund_before is not None:
        # After the payment's UPDATE, which takes the payment's row lock first: every
        # change of a refund is made under its payment's lock, so the refund's status
        # is checked once no other change of it can be under way.
        await tx.refunds.save(change.refund, change.refund_before)

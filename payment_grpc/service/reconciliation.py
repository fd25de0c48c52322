"""Reconciliation: our payments and refunds against the gateway's records.

Four kinds of mismatch: a charge the gateway has and we do not (`missing_here`), a charge
or refund we recorded that the gateway does not have (`missing_there`), different amounts
(`amount`: authorized, captured or refunded) and different states (`status`). Both sides
are compared over the same window of creation times; a record found on one side only is
looked up on the other by its id before it is called missing (a charge made at 23:59:59.9
may be stamped 00:00:00.1 by the gateway).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from payment_grpc.domain.payment import PaymentStatus


class GatewayState(enum.StrEnum):
    PENDING = "PENDING"
    AUTHORIZED = "AUTHORIZED"
    CAPTURED = "CAPTURED"
    CANCELED = "CANCELED"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class ChargeRecord:
    """One charge as a side knows it. Refunds: gateway refund reference -> amount."""

    payment_id: str
    reference: str
    currency: str
    amount_minor: int
    captured_minor: int
    refunded_minor: int
    state: GatewayState
    refunds: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Mismatch:
    kind: str  # missing_here | missing_there | amount | status
    payment_id: str
    reference: str
    ours: str
    theirs: str


class ChargeSource(Protocol):
    async def between(self, since: datetime, until: datetime) -> list[ChargeRecord]: ...

    async def by_reference(self, reference: str) -> ChargeRecord | None:
        """For the gateway: by its reference; for us: by the gateway reference we hold."""
        ...

    def tracks(self, reference: str) -> bool:
        """False for references this side never holds (cash on delivery at Stripe)."""
        ...


# What the gateway should hold for each of our statuses (None: no gateway record needed).
EXPECTED_STATE: dict[PaymentStatus, GatewayState | None] = {
    PaymentStatus.PENDING: None,
    PaymentStatus.PROCESSING: None,  # in flight: not judged until it settles
    PaymentStatus.AUTHORIZED: GatewayState.AUTHORIZED,
    PaymentStatus.CAPTURED: GatewayState.CAPTURED,
    PaymentStatus.PARTIALLY_REFUNDED: GatewayState.CAPTURED,
    PaymentStatus.REFUNDED: GatewayState.CAPTURED,
    PaymentStatus.FAILED: GatewayState.FAILED,
    PaymentStatus.CANCELED: GatewayState.CANCELED,
}


def our_state(status: PaymentStatus) -> GatewayState | None:
    return EXPECTED_STATE[status]


async def reconcile(
    ours: ChargeSource, theirs: ChargeSource, since: datetime, until: datetime
) -> list[Mismatch]:
    our_records = {r.payment_id: r for r in await ours.between(since, until)}
    their_records = {r.reference: r for r in await theirs.between(since, until)}
    found: list[Mismatch] = []
    for record in our_records.values():
        if not record.reference or record.state is GatewayState.PENDING:
            continue  # never reached the gateway, or still in flight
        if not theirs.tracks(record.reference):
            continue
        other = their_records.pop(record.reference, None) or await theirs.by_reference(
            record.reference
        )
        found.extend(_compare(record, other))
    for other in their_records.values():
        if other.payment_id in our_records:
            continue  # matched above under another reference: reported there
        if await ours.by_reference(other.reference) is None:
            found.append(
                Mismatch("missing_here", other.payment_id, other.reference, "-", _show(other))
            )
    return found


def _compare(ours: ChargeRecord, theirs: ChargeRecord | None) -> Sequence[Mismatch]:
    if theirs is None:
        if ours.state is GatewayState.FAILED:
            return []  # refused before the gateway kept anything
        return [Mismatch("missing_there", ours.payment_id, ours.reference, _show(ours), "-")]
    found: list[Mismatch] = []
    if ours.state is not theirs.state:
        found.append(Mismatch("status", ours.payment_id, ours.reference, ours.state, theirs.state))
    for what in ("amount_minor", "captured_minor", "refunded_minor"):
        mine, other = getattr(ours, what), getattr(theirs, what)
        if ours.currency != theirs.currency or mine != other:
            found.append(
                Mismatch(
                    "amount",
                    ours.payment_id,
                    ours.reference,
                    f"{what}={mine} {ours.currency}",
                    f"{what}={other} {theirs.currency}",
                )
            )
    for reference in sorted(set(ours.refunds) - set(theirs.refunds)):
        found.append(
            Mismatch("missing_there", ours.payment_id, reference, f"refund {reference}", "-")
        )
    for reference in sorted(set(theirs.refunds) - set(ours.refunds)):
        found.append(
            Mismatch("missing_here", ours.payment_id, reference, "-", f"refund {reference}")
        )
    return found


def _show(record: ChargeRecord) -> str:
    return (
        f"{record.state} {record.amount_minor} {record.currency}"
        f" captured={record.captured_minor} refunded={record.refunded_minor}"
    )

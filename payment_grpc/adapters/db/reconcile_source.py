"""Our side of reconciliation: payments and their succeeded refunds, read with SQL."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from payment_grpc.adapters.db.tables import payments, refunds
from payment_grpc.domain.payment import PaymentStatus
from payment_grpc.service.reconciliation import ChargeRecord, GatewayState, our_state

_COLUMNS = (
    payments.c.id,
    payments.c.gateway_reference,
    payments.c.currency,
    payments.c.amount_minor,
    payments.c.captured_minor,
    payments.c.refunded_minor,
    payments.c.status,
)


class SqlChargeSource:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def between(self, since: datetime, until: datetime) -> list[ChargeRecord]:
        query = sa.select(*_COLUMNS).where(
            payments.c.created_at >= since, payments.c.created_at < until
        )
        return await self._records(query)

    async def by_reference(self, reference: str) -> ChargeRecord | None:
        found = await self._records(
            sa.select(*_COLUMNS).where(payments.c.gateway_reference == reference)
        )
        return found[0] if found else None

    def tracks(self, reference: str) -> bool:
        return True

    async def _records(self, query: sa.Select[tuple[object, ...]]) -> list[ChargeRecord]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
            ids = [row["id"] for row in rows]
            refunded = (
                (
                    await conn.execute(
                        sa.select(
                            refunds.c.payment_id,
                            refunds.c.gateway_reference,
                            refunds.c.amount_minor,
                        ).where(refunds.c.payment_id.in_(ids), refunds.c.status == "SUCCEEDED")
                    )
                ).all()
                if ids
                else []
            )
        by_payment: dict[str, dict[str, int]] = {}
        for payment_id, reference, amount in refunded:
            by_payment.setdefault(payment_id, {})[reference] = amount
        return [_record(row, by_payment.get(row["id"], {})) for row in rows]


def _succeeded_refunds(ids: list[str]) -> sa.Select[tuple[str, str, int]]:
    return sa.select(
        refunds.c.payment_id, refunds.c.gateway_reference, refunds.c.amount_minor
    ).where(refunds.c.payment_id.in_(ids), refunds.c.status == "SUCCEEDED")


def _record(row: RowMapping, refunds_of: dict[str, int]) -> ChargeRecord:
    status = PaymentStatus(row["status"])
    state = our_state(status) or GatewayState.PENDING
    authorized = row["amount_minor"]
    return ChargeRecord(
        payment_id=row["id"],
        reference=row["gateway_reference"],
        currency=row["currency"],
        amount_minor=authorized,
        captured_minor=row["captured_minor"],
        refunded_minor=row["refunded_minor"],
        state=state,
        refunds=refunds_of,
    )

"""The PostgreSQL status bus's NOTIFYs as another replica receives them: what queued behind
one send goes out together, one notification per payment with its latest sequence, and
every payment published is announced (PostgreSQL only: the bus is LISTEN/NOTIFY)."""

from __future__ import annotations

import psycopg

from payment_grpc.adapters.bus.postgres import CHANNEL, PostgresStatusBus, libpq_dsn


async def _received(conn: psycopg.AsyncConnection[object], count: int) -> list[str]:
    payloads: list[str] = []
    async for notice in conn.notifies(timeout=10, stop_after=count):
        payloads.append(notice.payload)
    return payloads


async def test_changes_queued_together_go_out_once_per_payment_with_the_latest_sequence(
    postgres_url: str,
) -> None:
    bus = PostgresStatusBus(postgres_url)
    async with await psycopg.AsyncConnection.connect(
        libpq_dsn(postgres_url), autocommit=True
    ) as other_replica:
        await other_replica.execute(f"LISTEN {CHANNEL}")
        await bus.start()
        try:
            # No await between them: all queue before the sender's first send.
            for payment_id, sequence in [("pay_a", 2), ("pay_b", 1), ("pay_a", 3), ("pay_b", 2)]:
                await bus.publish(payment_id, sequence)
            first = await _received(other_replica, 2)
            await bus.publish("pay_a", 4)  # alone: sent at once, not held for company
            second = await _received(other_replica, 1)
        finally:
            await bus.close()
    assert sorted(first) == ["pay_a:3", "pay_b:2"]
    assert second == ["pay_a:4"]

"""Migration 0010_cancellation_reason fills in the reason of payments canceled before it, on
SQLite and PostgreSQL: failure_code EXPIRED -> EXPIRED, a CANCELED event with an operator's
reason -> RESOLVED_MANUALLY, any other cancel -> REQUESTED; other payments get none. Their
CANCELED events get the same reason; downgrade drops the columns."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import command

from payment_grpc.adapters.db.migrate import alembic_config
from tests.integration.test_key_operation_migration import _sync_engine, fresh_url

REVISION = "0010_cancellation_reason"
__all__ = ["fresh_url"]  # the fixture

# payment id -> (status, failure_code, reason on its last event)
PLANTED = {
    "pay_expired": ("CANCELED", "EXPIRED", None),
    "pay_resolved": ("CANCELED", None, "customer called"),
    "pay_requested": ("CANCELED", None, None),
    "pay_captured": ("CAPTURED", None, None),
}


def _plant(conn: sa.Connection) -> None:
    now = datetime.now(UTC)
    for payment_id, (status, failure_code, reason) in PLANTED.items():
        captured = 1_000 if status == "CAPTURED" else 0
        conn.execute(
            sa.text(
                "INSERT INTO payments (id, order_id, customer_id, currency, amount_minor,"
                " captured_minor, refunded_minor, status, capture_method, method_type,"
                " method_token, wallet_provider, bank_code, failure_code, gateway_reference,"
                " sequence, in_flight, description, metadata_json, created_at, updated_at)"
                " VALUES (:id, :id, 'c', 'USD', 1000, :captured, 0, :status, 'MANUAL', 'CARD',"
                " 'tok_visa', '', '', :failure_code, '', 2, '', '', '{}', :now, :now)"
            ),
            {
                "id": payment_id,
                "captured": captured,
                "status": status,
                "failure_code": failure_code,
                "now": now,
            },
        )
        for sequence, event_status in ((1, "AUTHORIZED"), (2, status)):
            conn.execute(
                sa.text(
                    "INSERT INTO payment_events (payment_id, sequence, status, currency,"
                    " amount_minor, captured_minor, refunded_minor, actor, trace_id,"
                    " occurred_at, reason) VALUES (:id, :sequence, :status, 'USD', 1000,"
                    " :captured, 0, 'svc', '', :now, :reason)"
                ),
                {
                    "id": payment_id,
                    "sequence": sequence,
                    "status": event_status,
                    "captured": captured if sequence == 2 else 0,
                    "now": now,
                    "reason": reason if sequence == 2 else None,
                },
            )


def test_payments_canceled_before_get_their_reason(fresh_url: str) -> None:
    config = alembic_config(fresh_url)
    command.upgrade(config, f"{REVISION}-1")
    engine = _sync_engine(fresh_url)
    try:
        with engine.begin() as conn:
            _plant(conn)
        command.upgrade(config, REVISION)
        with engine.connect() as conn:
            on_payments = dict(
                conn.execute(sa.text("SELECT id, cancellation_reason FROM payments")).all()
            )
            on_events = dict(
                conn.execute(
                    sa.text(
                        "SELECT payment_id || ':' || CAST(sequence AS VARCHAR(20)),"
                        " cancellation_reason FROM payment_events"
                    )
                ).all()
            )
        command.downgrade(config, f"{REVISION}-1")
        with engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("payments")}
    finally:
        engine.dispose()
    assert on_payments == {
        "pay_expired": "EXPIRED",
        "pay_resolved": "RESOLVED_MANUALLY",
        "pay_requested": "REQUESTED",
        "pay_captured": None,
    }
    assert on_events == {
        **{f"{payment_id}:1": None for payment_id in PLANTED},
        "pay_expired:2": "EXPIRED",
        "pay_resolved:2": "RESOLVED_MANUALLY",
        "pay_requested:2": "REQUESTED",
        "pay_captured:2": None,
    }
    assert "cancellation_reason" not in columns

"""payments.cancellation_reason and payment_events.cancellation_reason: why a payment was
CANCELED (REQUESTED, EXPIRED, RESOLVED_MANUALLY); rows canceled before are filled in

Revision ID: 0010_cancellation_reason
Revises: 0009_payment_feed
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_cancellation_reason"
down_revision = "0009_payment_feed"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD/DROP COLUMN (SQLite >= 3.35 has both): a batch copy of `payments` would
    # have to drop a table that payment_events' foreign key points at.
    op.add_column("payments", sa.Column("cancellation_reason", sa.String(32)))
    op.add_column("payment_events", sa.Column("cancellation_reason", sa.String(32)))
    # Before this revision an expiry was told by failure_code EXPIRED, an operator's cancel
    # by the reason on its CANCELED event; every other cancel was a caller's.
    op.execute(
        "UPDATE payments SET cancellation_reason = CASE"
        " WHEN failure_code = 'EXPIRED' THEN 'EXPIRED'"
        " WHEN EXISTS (SELECT 1 FROM payment_events AS e WHERE e.payment_id = payments.id"
        " AND e.status = 'CANCELED' AND e.reason IS NOT NULL) THEN 'RESOLVED_MANUALLY'"
        " ELSE 'REQUESTED' END"
        " WHERE status = 'CANCELED'"
    )
    op.execute(
        "UPDATE payment_events SET cancellation_reason = (SELECT p.cancellation_reason"
        " FROM payments AS p WHERE p.id = payment_events.payment_id)"
        " WHERE status = 'CANCELED'"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE payment_events DROP COLUMN cancellation_reason")
    op.execute("ALTER TABLE payments DROP COLUMN cancellation_reason")

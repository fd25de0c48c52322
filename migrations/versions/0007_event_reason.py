"""payment_events.reason: why a change was made by hand (AdminService.ResolvePayment)

Revision ID: 0007_event_reason
Revises: 0006_gateway_events
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_event_reason"
down_revision = "0006_gateway_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("payment_events") as batch:
        batch.add_column(sa.Column("reason", sa.String(500)))


def downgrade() -> None:
    with op.batch_alter_table("payment_events") as batch:
        batch.drop_column("reason")

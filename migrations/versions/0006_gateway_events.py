"""processed gateway events (webhooks): each event id is applied once

Revision ID: 0006_gateway_events
Revises: 0005_key_operation
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_gateway_events"
down_revision = "0005_key_operation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_events",
        sa.Column("event_id", sa.String(255), primary_key=True),
        sa.Column("event_type", sa.String(100), nullable=False),
        sa.Column("payment_id", sa.String(64)),
        sa.Column("detail", sa.String(500), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("gateway_events")

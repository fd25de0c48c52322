"""change feed: payment_feed and its position counter

Revision ID: 0009_payment_feed
Revises: 0008_outbox
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_payment_feed"
down_revision = "0008_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "payment_feed",
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("payment_id", sa.String(length=64), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("order_id", sa.String(length=128), nullable=False),
        sa.Column("customer_id", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_payment_feed")),
    )
    op.create_index("ix_payment_feed_order_position", "payment_feed", ["order_id", "position"])
    op.create_index(
        "ix_payment_feed_customer_position", "payment_feed", ["customer_id", "position"]
    )
    counter = op.create_table(
        "feed_counter",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_position", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feed_counter")),
    )
    op.bulk_insert(counter, [{"id": 1, "last_position": 0}])


def downgrade() -> None:
    op.drop_table("feed_counter")
    op.drop_index("ix_payment_feed_customer_position", table_name="payment_feed")
    op.drop_index("ix_payment_feed_order_position", table_name="payment_feed")
    op.drop_table("payment_feed")

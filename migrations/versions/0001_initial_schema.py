"""initial schema

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "payments",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("order_id", sa.String(length=128), nullable=False),
        sa.Column("customer_id", sa.String(length=128), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("captured_minor", sa.BigInteger(), nullable=False),
        sa.Column("refunded_minor", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("capture_method", sa.String(length=16), nullable=False),
        sa.Column("method_type", sa.String(length=16), nullable=False),
        sa.Column("method_token", sa.String(length=512), nullable=False),
        sa.Column("wallet_provider", sa.String(length=64), nullable=False),
        sa.Column("bank_code", sa.String(length=16), nullable=False),
        sa.Column("card_brand", sa.String(length=32), nullable=True),
        sa.Column("card_last4", sa.String(length=4), nullable=True),
        sa.Column("card_exp_month", sa.SmallInteger(), nullable=True),
        sa.Column("card_exp_year", sa.SmallInteger(), nullable=True),
        sa.Column("failure_code", sa.String(length=64), nullable=True),
        sa.Column("failure_decline_code", sa.String(length=64), nullable=True),
        sa.Column("failure_message", sa.String(length=500), nullable=True),
        sa.Column("gateway_reference", sa.String(length=128), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("in_flight", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("metadata_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "0 <= refunded_minor AND refunded_minor <= captured_minor AND captured_minor <= amount_minor",
            name=op.f("ck_payments_amounts"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payments")),
    )
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.create_index("ix_payments_created", ["created_at", "id"], unique=False)
        batch_op.create_index(
            "ix_payments_customer_created", ["customer_id", "created_at"], unique=False
        )
        batch_op.create_index("ix_payments_order", ["order_id"], unique=False)
        batch_op.create_index(
            "ix_payments_unfinished",
            ["updated_at"],
            unique=False,
            sqlite_where=sa.text("status = 'PROCESSING' OR in_flight != ''"),
            postgresql_where=sa.text("status = 'PROCESSING' OR in_flight != ''"),
        )
        batch_op.create_index(
            "uq_payments_live_order",
            ["order_id"],
            unique=True,
            sqlite_where=sa.text("status NOT IN ('FAILED', 'CANCELED')"),
            postgresql_where=sa.text("status NOT IN ('FAILED', 'CANCELED')"),
        )

    op.create_table(
        "payment_events",
        sa.Column("payment_id", sa.String(length=64), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("previous_status", sa.String(length=24), nullable=True),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("captured_minor", sa.BigInteger(), nullable=False),
        sa.Column("refunded_minor", sa.BigInteger(), nullable=False),
        sa.Column("failure_code", sa.String(length=64), nullable=True),
        sa.Column("failure_decline_code", sa.String(length=64), nullable=True),
        sa.Column("failure_message", sa.String(length=500), nullable=True),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("trace_id", sa.String(length=32), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["payment_id"], ["payments.id"], name=op.f("fk_payment_events_payment_id_payments")
        ),
        sa.PrimaryKeyConstraint("payment_id", "sequence", name=op.f("pk_payment_events")),
    )
    op.create_table(
        "refunds",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("payment_id", sa.String(length=64), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("gateway_reference", sa.String(length=128), nullable=False),
        sa.Column("failure_code", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_refunds_positive")),
        sa.ForeignKeyConstraint(
            ["payment_id"], ["payments.id"], name=op.f("fk_refunds_payment_id_payments")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refunds")),
    )
    with op.batch_alter_table("refunds", schema=None) as batch_op:
        batch_op.create_index(
            "ix_refunds_payment_created", ["payment_id", "created_at", "id"], unique=False
        )
        batch_op.create_index(
            "ix_refunds_pending",
            ["updated_at"],
            unique=False,
            sqlite_where=sa.text("status = 'PENDING'"),
            postgresql_where=sa.text("status = 'PENDING'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("refunds", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_refunds_pending",
            sqlite_where=sa.text("status = 'PENDING'"),
            postgresql_where=sa.text("status = 'PENDING'"),
        )
        batch_op.drop_index("ix_refunds_payment_created")

    op.drop_table("refunds")
    op.drop_table("payment_events")
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_payments_live_order",
            sqlite_where=sa.text("status NOT IN ('FAILED', 'CANCELED')"),
            postgresql_where=sa.text("status NOT IN ('FAILED', 'CANCELED')"),
        )
        batch_op.drop_index(
            "ix_payments_unfinished",
            sqlite_where=sa.text("status = 'PROCESSING' OR in_flight != ''"),
            postgresql_where=sa.text("status = 'PROCESSING' OR in_flight != ''"),
        )
        batch_op.drop_index("ix_payments_order")
        batch_op.drop_index("ix_payments_customer_created")
        batch_op.drop_index("ix_payments_created")

    op.drop_table("payments")

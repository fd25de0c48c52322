"""partial index for the recovery worker's scan of unfinished idempotency keys

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UNFINISHED = sa.text("recovery_point <> 'FINISHED'")


def upgrade() -> None:
    op.create_index(
        "ix_idempotency_keys_unfinished",
        "idempotency_keys",
        ["created_at"],
        postgresql_where=UNFINISHED,
        sqlite_where=UNFINISHED,
    )


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_unfinished", table_name="idempotency_keys")

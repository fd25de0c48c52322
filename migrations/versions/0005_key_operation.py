"""idempotency keys name their operation (CHARGE/CAPTURE/CANCEL/REFUND), not an RPC path

The key's scope becomes (scope, operation, key). Existing rows are converted from the
RPC path they were stored under; the four keyed RPCs are the only paths ever stored.

Revision ID: 0005_key_operation
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_key_operation"
down_revision = "0004"
branch_labels = None
depends_on = None

SERVICE = "/payments.v1.PaymentService/"
OPERATION_OF_RPC = {
    f"{SERVICE}Charge": "CHARGE",
    f"{SERVICE}CapturePayment": "CAPTURE",
    f"{SERVICE}CancelPayment": "CANCEL",
    f"{SERVICE}Refund": "REFUND",
}
keys = sa.table(
    "idempotency_keys", sa.column("method", sa.String), sa.column("operation", sa.String)
)


def _switch(old: str, new: str, length: int, mapping: dict[str, str]) -> None:
    """Replace column `old` by `new`, filled from it through `mapping`, and make the
    key's uniqueness (scope, new, key)."""
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column(new, sa.String(length=length)))
    case = sa.case(*((keys.c[old] == before, after) for before, after in mapping.items()))
    op.execute(keys.update().values({new: case}))
    # A row under a path that is not a keyed RPC was never reachable by any call.
    op.execute(keys.delete().where(keys.c[new].is_(None)))
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.alter_column(new, existing_type=sa.String(length=length), nullable=False)
        batch.drop_constraint(f"uq_idempotency_keys_scope_{old}_key", type_="unique")
        batch.create_unique_constraint(
            f"uq_idempotency_keys_scope_{new}_key", ["scope", new, "key"]
        )
        batch.drop_column(old)


def upgrade() -> None:
    _switch("method", "operation", 16, OPERATION_OF_RPC)


def downgrade() -> None:
    rpc_of_operation = {operation: rpc for rpc, operation in OPERATION_OF_RPC.items()}
    _switch("operation", "method", 128, rpc_of_operation)

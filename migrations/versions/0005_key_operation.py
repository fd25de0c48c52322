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


def _convert(source: str, target: str, mapping: dict[str, str]) -> None:
    case = sa.case(*((keys.c[source] == old, new) for old, new in mapping.items()))
    op.execute(keys.update().values({target: case}))
    # A row under a path that is not a keyed RPC was never reachable by any call.
    op.execute(keys.delete().where(keys.c[target].is_(None)))


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("operation", sa.String(length=16), nullable=True))
    _convert("method", "operation", OPERATION_OF_RPC)
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.alter_column("operation", existing_type=sa.String(length=16), nullable=False)
        batch.drop_constraint("uq_idempotency_keys_scope_method_key", type_="unique")
        batch.create_unique_constraint(
            "uq_idempotency_keys_scope_operation_key", ["scope", "operation", "key"]
        )
        batch.drop_column("method")


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("method", sa.String(length=128), nullable=True))
    _convert("operation", "method", {new: old for old, new in OPERATION_OF_RPC.items()})
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.alter_column("method", existing_type=sa.String(length=128), nullable=False)
        batch.drop_constraint("uq_idempotency_keys_scope_operation_key", type_="unique")
        batch.create_unique_constraint(
            "uq_idempotency_keys_scope_method_key", ["scope", "method", "key"]
        )
        batch.drop_column("operation")

"""Table definitions (SQLAlchemy Core). Alembic revisions in migrations/ create them;
a test checks the migrated schema matches this metadata on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both databases (SQLite keeps no zone of its own)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)


def partial_index(name: str, *columns: str, where: str, unique: bool = False) -> sa.Index:
    """An index over the rows that match `where`, the same on SQLite and PostgreSQL."""
    condition = sa.text(where)
    return sa.Index(
        name, *columns, unique=unique, sqlite_where=condition, postgresql_where=condition
    )


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

payments = sa.Table(
    "payments",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("order_id", sa.String(128), nullable=False),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("amount_minor", sa.BigInteger, nullable=False),
    sa.Column("captured_minor", sa.BigInteger, nullable=False),
    sa.Column("refunded_minor", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("capture_method", sa.String(16), nullable=False),
    sa.Column("method_type", sa.String(16), nullable=False),
    sa.Column("method_token", sa.String(512), nullable=False),
    sa.Column("wallet_provider", sa.String(64), nullable=False),
    sa.Column("bank_code", sa.String(16), nullable=False),
    sa.Column("card_brand", sa.String(32)),
    sa.Column("card_last4", sa.String(4)),
    sa.Column("card_exp_month", sa.SmallInteger),
    sa.Column("card_exp_year", sa.SmallInteger),
    sa.Column("card_fingerprint", sa.String(255)),  # encrypted (rows.py)
    sa.Column("failure_code", sa.String(64)),
    sa.Column("failure_decline_code", sa.String(64)),
    sa.Column("failure_message", sa.String(500)),
    sa.Column("cancellation_reason", sa.String(32)),  # set exactly when CANCELED
    sa.Column("gateway_reference", sa.String(128), nullable=False),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("in_flight", sa.String(64), nullable=False),
    sa.Column("description", sa.String(500), nullable=False),
    sa.Column("metadata_json", sa.Text, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.CheckConstraint(
        "0 <= refunded_minor AND refunded_minor <= captured_minor"
        " AND captured_minor <= amount_minor",
        name="amounts",
    ),
    sa.Index("ix_payments_customer_created", "customer_id", "created_at"),
    sa.Index("ix_payments_created", "created_at", "id"),
    sa.Index("ix_payments_order", "order_id"),
    # At most one live payment per order: FAILED and CANCELED free the order again.
    partial_index(
        "uq_payments_live_order",
        "order_id",
        where="status NOT IN ('FAILED', 'CANCELED')",
        unique=True,
    ),
    partial_index(
        "ix_payments_unfinished",
        "updated_at",
        where="status = 'PROCESSING' OR in_flight != ''",
    ),
)

payment_events = sa.Table(
    "payment_events",
    metadata,
    sa.Column("payment_id", sa.String(64), sa.ForeignKey("payments.id"), primary_key=True),
    sa.Column("sequence", sa.BigInteger, primary_key=True),
    sa.Column("previous_status", sa.String(24)),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("amount_minor", sa.BigInteger, nullable=False),
    sa.Column("captured_minor", sa.BigInteger, nullable=False),
    sa.Column("refunded_minor", sa.BigInteger, nullable=False),
    sa.Column("failure_code", sa.String(64)),
    sa.Column("failure_decline_code", sa.String(64)),
    sa.Column("failure_message", sa.String(500)),
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("trace_id", sa.String(32), nullable=False),
    sa.Column("occurred_at", UtcDateTime, nullable=False),
    sa.Column("reason", sa.String(500)),  # changes made by hand (ResolvePayment)
    sa.Column("cancellation_reason", sa.String(32)),  # on changes that left it CANCELED
)

refunds = sa.Table(
    "refunds",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("payment_id", sa.String(64), sa.ForeignKey("payments.id"), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("amount_minor", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("gateway_reference", sa.String(128), nullable=False),
    sa.Column("failure_code", sa.String(64), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.CheckConstraint("amount_minor > 0", name="positive"),
    sa.Index("ix_refunds_payment_created", "payment_id", "created_at", "id"),
    partial_index("ix_refunds_pending", "updated_at", where="status = 'PENDING'"),
)

# Idempotency keys, scoped to (caller, RPC method, key). `recovery_point` advances in the
# same transaction as each phase of the use case; `response_*` holds the stored answer.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("scope", sa.String(255), nullable=False),
    sa.Column("operation", sa.String(16), nullable=False),  # service.ports.Operation
    sa.Column("key", sa.String(255), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("recovery_point", sa.String(32), nullable=False),
    sa.Column("payment_id", sa.String(64)),
    sa.Column("refund_id", sa.String(64)),
    sa.Column("locked_by", sa.String(128)),
    sa.Column("locked_at", UtcDateTime),
    sa.Column("response_code", sa.Integer),
    sa.Column("response_body", sa.LargeBinary),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("scope", "operation", "key"),
    sa.Index("ix_idempotency_keys_expires", "expires_at"),
    # The recovery worker's scan for abandoned keys: only the few unfinished ones.
    partial_index(
        "ix_idempotency_keys_unfinished",
        "created_at",
        where="recovery_point <> 'FINISHED'",
    ),
)


# Inbound gateway events (webhooks) already processed: each event id is applied once.
gateway_events = sa.Table(
    "gateway_events",
    metadata,
    sa.Column("event_id", sa.String(255), primary_key=True),
    sa.Column("event_type", sa.String(100), nullable=False),
    sa.Column("payment_id", sa.String(64)),  # no foreign key: unknown payments are recorded too
    sa.Column("detail", sa.String(500), nullable=False),
    sa.Column("received_at", UtcDateTime, nullable=False),
)

# Transactional outbox: one row per (payment event, sink), written in the transaction that
# records the event; the relay delivers it (DESIGN.md "Changes, outbox, events").
# `state`: pending -> delivered, or parked after too many attempts (with `last_error`).
OUTBOX_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: rowid alias
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", OUTBOX_ID, primary_key=True, autoincrement=True),
    sa.Column("sink", sa.String(32), nullable=False),
    sa.Column("dedupe_id", sa.String(96), nullable=False),  # <payment_id>:<sequence>
    sa.Column("payment_id", sa.String(64), nullable=False),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),  # payments.v1.PaymentEvent
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", UtcDateTime, nullable=False),
    sa.Column("claimed_by", sa.String(128)),
    sa.Column("claimed_until", UtcDateTime),
    sa.Column("last_error", sa.String(512)),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("delivered_at", UtcDateTime),
    sa.UniqueConstraint("sink", "dedupe_id"),
    # The relay's scan: only rows still to deliver.
    partial_index("ix_outbox_due", "next_attempt_at", where="state = 'pending'"),
    # Per-payment order: is an earlier event of this payment still undelivered to the sink?
    sa.Index("ix_outbox_sink_payment_sequence", "sink", "payment_id", "sequence"),
)

# The change feed (WatchPayments): every payment event, ordered by (tx, position); no lock
# and no counter (adapters/db/feed.py explains why readers still miss nothing).
# `position`: the row id (identity; SQLite: an AUTOINCREMENT rowid, never reused).
# `tx`: set by the database default (revision 0011), not by the writer. PostgreSQL:
#   GREATEST(pg_current_xact_id(), pg_snapshot_xmax(pg_current_snapshot()) - 1) as bigint,
#   at least the writing transaction's own id and at least that of every transaction that
#   had committed when the row was written; SQLite: 0 (one writer at a time, so the
#   position alone is in commit order). Rows from before revision 0011 have tx 0.
FEED_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: rowid alias
payment_feed = sa.Table(
    "payment_feed",
    metadata,
    sa.Column("position", FEED_ID, sa.Identity(), primary_key=True),
    sa.Column("tx", sa.BigInteger, nullable=False),
    sa.Column("payment_id", sa.String(64), nullable=False),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("order_id", sa.String(128), nullable=False),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),  # payments.v1.PaymentEvent
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Index("ix_payment_feed_tx_position", "tx", "position"),
    sa.Index("ix_payment_feed_order_tx_position", "order_id", "tx", "position"),
    sa.Index("ix_payment_feed_customer_tx_position", "customer_id", "tx", "position"),
    sqlite_autoincrement=True,
)

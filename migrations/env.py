"""Alembic environment: async engines, one history for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from payment_grpc.adapters.db.engine import make_engine
from payment_grpc.adapters.db.tables import metadata

config = context.config
URL: str = config.attributes.get("url") or config.get_main_option("sqlalchemy.url") or ""


# Every replica may migrate at start-up (MIGRATE_ON_START): on PostgreSQL they queue on
# this transaction-level advisory lock, so exactly one runs the history and the others
# find the schema at head once it commits (released with the transaction). SQLite:
# adapters/db/migrate.py holds a file lock around the whole upgrade.
MIGRATION_LOCK_ID = 0x7061796D656E7473  # "payments"


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = make_engine(URL, pool_size=1)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=URL, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())

"""Before serving: the configured keys open what is stored, or the process says why not.

A key id given new key material (a typo, a secret store that regenerated it, the embedded
default's key file deleted) or a key dropped while rows are still under it does not fail
at start-up by itself: the server would serve, and every read of an old row would answer
INTERNAL. So `serve` opens the newest and the oldest payment (by `created_at`, an index
walk, not a scan) before it serves; one that does not decrypt refuses to start with one
line naming the setting and the key id, never key material.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from payment_grpc.adapters.db.crypto import DecryptionError, FieldCipher, KeyConfigError
from payment_grpc.adapters.db.engine import make_engine
from payment_grpc.adapters.db.reading import without_writer_lock
from payment_grpc.adapters.db.rows import ENCRYPTED_PAYMENT_COLUMNS
from payment_grpc.adapters.db.tables import payments


class StoredDataUnreadable(KeyConfigError):
    """The configured keys do not decrypt a stored value. Names key ids, never keys."""


async def check_stored_keys(engine: AsyncEngine, cipher: FieldCipher, source: str) -> None:
    """Raises StoredDataUnreadable when the newest or the oldest payment does not decrypt."""
    for row in await _probe_rows(engine):
        for name, column in ENCRYPTED_PAYMENT_COLUMNS.items():
            if row[name] is None:
                continue
            try:
                cipher.decrypt(row[name], column=column, row_id=row["id"])
            except DecryptionError as exc:
                raise StoredDataUnreadable(
                    f"{source} does not open the stored data: {exc}"
                    " (was a key id given new key material, or a key removed too early?)"
                ) from None


async def check_database_keys(url: str, cipher: FieldCipher, source: str) -> None:
    """`check_stored_keys` with its own small engine (the CLI, before the workers start)."""
    engine = make_engine(url, pool_size=1)
    try:
        await check_stored_keys(engine, cipher, source)
    finally:
        await engine.dispose()


async def _probe_rows(engine: AsyncEngine) -> list[sa.RowMapping]:
    columns = [payments.c.id, *(payments.c[name] for name in ENCRYPTED_PAYMENT_COLUMNS)]
    newest = payments.c.created_at.desc(), payments.c.id.desc()
    oldest = payments.c.created_at.asc(), payments.c.id.asc()
    rows: list[sa.RowMapping] = []
    async with engine.connect() as conn:
        conn = await without_writer_lock(conn)
        async with conn.begin():
            if not await conn.run_sync(lambda sync: sa.inspect(sync).has_table("payments")):
                return rows  # not migrated yet: nothing stored to open
            for order in (newest, oldest):
                query = sa.select(*columns).order_by(*order).limit(1)
                rows.extend((await conn.execute(query)).mappings().all())
    return rows

"""`payment-grpc rotate-keys`: re-encrypt every value not under the newest key.

Safe while the service serves. Each batch is read in one short transaction and written in
another; an UPDATE only lands when the row still holds exactly what was read (same
`sequence` and the same stored ciphertext), so a concurrent change is never overwritten:
that row is skipped and picked up again by the next pass. No row lock is held while
decrypting, and `updated_at`/`sequence` do not move (nothing changed for the business).
Running it again when nothing is left does nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from payment_grpc.adapters.db.crypto import DecryptionError, FieldCipher
from payment_grpc.adapters.db.engine import make_engine
from payment_grpc.adapters.db.idempotency import RESPONSE_BODY
from payment_grpc.adapters.db.reading import without_writer_lock
from payment_grpc.adapters.db.rows import ENCRYPTED_PAYMENT_COLUMNS
from payment_grpc.adapters.db.tables import idempotency_keys, payments

DEFAULT_BATCH_SIZE = 500
MAX_PASSES = 5


@dataclass
class TableRotation:
    table: str
    rotated: int = 0  # rows re-encrypted under the newest key
    skipped: int = 0  # rows that changed between read and write (retried by the next pass)
    unreadable: set[str] = field(default_factory=set)  # row ids that did not decrypt
    left: int = 0  # rows still under an older key (or plaintext) at the end

    def summary(self, kid: str) -> str:
        return (
            f"{self.table}: {self.rotated} re-encrypted under key {kid!r},"
            f" {self.skipped} changed concurrently (retried), {len(self.unreadable)} unreadable,"
            f" {self.left} left under an older key"
        )


class KeyRotation:
    """Re-encrypts `payments.method_token`/`metadata_json`/`card_fingerprint` and the
    stored idempotent answers (`idempotency_keys.response_body`) in batches of `batch_size`."""

    def __init__(
        self, engine: AsyncEngine, cipher: FieldCipher, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self._engine = engine
        self._cipher = cipher
        self._batch_size = batch_size
        prefix = cipher.current_prefix
        n = len(prefix)
        # A NULL column (no card fingerprint) compares as unknown: never stale.
        self._stale_payment = sa.or_(
            *(
                sa.func.substr(payments.c[name], 1, n) != prefix
                for name in ENCRYPTED_PAYMENT_COLUMNS
            )
        )
        self._stale_answer = sa.and_(
            idempotency_keys.c.response_body.is_not(None),
            sa.func.substr(idempotency_keys.c.response_body, 1, n, type_=sa.LargeBinary)
            != sa.literal(prefix.encode("ascii"), sa.LargeBinary),
        )

    async def run(self, max_passes: int = MAX_PASSES) -> list[TableRotation]:
        reports = [TableRotation("payments"), TableRotation("idempotency_keys")]
        for _ in range(max_passes):
            skipped_before = sum(r.skipped for r in reports)
            await self._pass(reports[0], self.payments_batch, self.rotate_payments)
            await self._pass(reports[1], self.answers_batch, self.rotate_answers)
            if sum(r.skipped for r in reports) == skipped_before:
                break
        reports[0].left = await self._count(payments, self._stale_payment)
        reports[1].left = await self._count(idempotency_keys, self._stale_answer)
        return reports

    async def _pass(
        self,
        report: TableRotation,
        read: Callable[[str], Awaitable[list[sa.RowMapping]]],
        write: Callable[[Sequence[sa.RowMapping]], Awaitable[tuple[int, int, set[str]]]],
    ) -> None:
        after = ""
        while True:
            batch = await read(after)
            if not batch:
                return
            rotated, skipped, unreadable = await write(batch)
            report.rotated += rotated
            report.skipped += skipped
            report.unreadable |= unreadable
            after = batch[-1]["id"]

    # --- payments -----------------------------------------------------------------------

    async def payments_batch(self, after_id: str = "") -> list[sa.RowMapping]:
        """The next rows (by id) with a value not under the newest key."""
        query = (
            sa.select(
                payments.c.id,
                payments.c.sequence,
                *(payments.c[name] for name in ENCRYPTED_PAYMENT_COLUMNS),
            )
            .where(self._stale_payment, payments.c.id > after_id)
            .order_by(payments.c.id)
            .limit(self._batch_size)
        )
        return await self._read(query)

    async def rotate_payments(self, batch: Sequence[sa.RowMapping]) -> tuple[int, int, set[str]]:
        """(rotated, skipped because changed meanwhile, unreadable ids), one transaction."""
        updates: list[tuple[sa.RowMapping, dict[str, str | None]]] = []
        unreadable: set[str] = set()
        for row in batch:
            try:
                updates.append((row, self._reencrypted_payment(row)))
            except DecryptionError:
                unreadable.add(row["id"])
        rotated = 0
        async with self._write() as conn:
            for row, values in updates:
                result = await conn.execute(
                    payments.update()
                    .where(
                        payments.c.id == row["id"],
                        payments.c.sequence == row["sequence"],
                        *(payments.c[name].is_not_distinct_from(row[name]) for name in values),
                    )
                    .values(values)
                )
                rotated += result.rowcount
        return rotated, len(updates) - rotated, unreadable

    def _reencrypted_payment(self, row: sa.RowMapping) -> dict[str, str | None]:
        return {
            name: None
            if row[name] is None
            else self._cipher.reencrypt(row[name], column=aad, row_id=row["id"])
            for name, aad in ENCRYPTED_PAYMENT_COLUMNS.items()
        }

    # --- stored idempotent answers ------------------------------------------------------

    async def answers_batch(self, after_id: str = "") -> list[sa.RowMapping]:
        query = (
            sa.select(idempotency_keys.c.id, idempotency_keys.c.response_body)
            .where(self._stale_answer, idempotency_keys.c.id > after_id)
            .order_by(idempotency_keys.c.id)
            .limit(self._batch_size)
        )
        return await self._read(query)

    async def rotate_answers(self, batch: Sequence[sa.RowMapping]) -> tuple[int, int, set[str]]:
        updates: list[tuple[str, bytes, bytes]] = []
        unreadable: set[str] = set()
        for row in batch:
            old = bytes(row["response_body"])
            try:
                new = self._cipher.reencrypt_bytes(old, column=RESPONSE_BODY, row_id=row["id"])
            except DecryptionError:
                unreadable.add(row["id"])
                continue
            updates.append((row["id"], old, new))
        rotated = 0
        async with self._write() as conn:
            for record_id, old, new in updates:
                result = await conn.execute(
                    idempotency_keys.update()
                    .where(
                        idempotency_keys.c.id == record_id,
                        idempotency_keys.c.response_body == old,
                    )
                    .values(response_body=new)
                )
                rotated += result.rowcount
        return rotated, len(updates) - rotated, unreadable

    # --- plumbing -----------------------------------------------------------------------

    async def _read(self, query: sa.Select[Any]) -> list[sa.RowMapping]:
        async with self._engine.connect() as conn:
            conn = await without_writer_lock(conn)
            async with conn.begin():
                return list((await conn.execute(query)).mappings().all())

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """One short writing transaction (BEGIN IMMEDIATE on SQLite, see engine.py)."""
        async with self._engine.connect() as conn, conn.begin():
            yield conn

    async def _count(self, table: sa.Table, where: sa.ColumnElement[bool]) -> int:
        query = sa.select(sa.func.count()).select_from(table).where(where)
        async with self._engine.connect() as conn:
            conn = await without_writer_lock(conn)
            async with conn.begin():
                return int((await conn.execute(query)).scalar_one())


async def rotate_keys(
    engine: AsyncEngine, cipher: FieldCipher, batch_size: int = DEFAULT_BATCH_SIZE
) -> list[TableRotation]:
    return await KeyRotation(engine, cipher, batch_size).run()


async def rotate_database(
    url: str, cipher: FieldCipher, batch_size: int = DEFAULT_BATCH_SIZE
) -> list[TableRotation]:
    """`rotate_keys` with its own small engine (the CLI)."""
    engine = make_engine(url, pool_size=1)
    try:
        return await rotate_keys(engine, cipher, batch_size)
    finally:
        await engine.dispose()

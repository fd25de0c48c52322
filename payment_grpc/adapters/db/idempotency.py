"""Idempotency keys in SQL. insert_if_absent is INSERT ... ON CONFLICT DO NOTHING, so two
racing first requests (in one process or in two replicas) produce exactly one row.

The stored answer (`response_body`) is encrypted at rest: it repeats the payment's caller
metadata."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from payment_grpc.adapters.db.crypto import FieldCipher
from payment_grpc.adapters.db.pipelining import write_behind
from payment_grpc.adapters.db.tables import idempotency_keys as keys
from payment_grpc.adapters.db.writing import DirectConnection, DirectWrite
from payment_grpc.service.ports import KeyRecord, Operation, RecoveryPoint

RESPONSE_BODY = "idempotency_keys.response_body"  # AAD: column name + record id


def _to_row(record: KeyRecord, cipher: FieldCipher) -> dict[str, Any]:
    body = record.response_body
    return {
        "id": record.record_id,
        "scope": record.scope,
        "operation": record.operation.value,
        "key": record.key,
        "fingerprint": record.fingerprint,
        "recovery_point": record.recovery_point.value,
        "payment_id": record.payment_id,
        "refund_id": record.refund_id,
        "locked_by": record.locked_by,
        "locked_at": record.locked_at,
        "response_code": record.response_code,
        "response_body": (
            None
            if body is None
            else cipher.encrypt_bytes(body, column=RESPONSE_BODY, row_id=record.record_id)
        ),
        "created_at": record.created_at,
        "expires_at": record.expires_at,
    }


def _from_row(row: RowMapping, cipher: FieldCipher) -> KeyRecord:
    body = row["response_body"]
    return KeyRecord(
        record_id=row["id"],
        scope=row["scope"],
        operation=Operation(row["operation"]),
        key=row["key"],
        fingerprint=row["fingerprint"],
        recovery_point=RecoveryPoint(row["recovery_point"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        payment_id=row["payment_id"],
        refund_id=row["refund_id"],
        locked_by=row["locked_by"],
        locked_at=row["locked_at"],
        response_code=row["response_code"],
        response_body=(
            None
            if body is None
            else cipher.decrypt_bytes(bytes(body), column=RESPONSE_BODY, row_id=row["id"])
        ),
    )


# Built once, executed with parameters (see repositories.py); the hot writes on
# PostgreSQL past SQLAlchemy's layers (writing.py).
_CLAIM = {
    name: DirectWrite(dialect.insert(keys).on_conflict_do_nothing().returning(keys.c.id))
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}
_BY_KEY = sa.select(keys).where(
    keys.c.scope == sa.bindparam("b_scope"),
    keys.c.operation == sa.bindparam("b_operation"),
    keys.c.key == sa.bindparam("b_key"),
)
_LOCK_BY_KEY = _BY_KEY.with_for_update()
_UPDATE = keys.update().where(keys.c.id == sa.bindparam("b_id"))
# A checkpoint's write (progress, the final answer, a resumed lease): nobody reads its
# result, so on PostgreSQL it goes out with the next statement that needs an answer, or
# with the COMMIT (pipelining.py).
_SAVE = DirectWrite(write_behind(_UPDATE))
_ADVANCE = DirectWrite(
    write_behind(
        _UPDATE.values(
            recovery_point=sa.bindparam("recovery_point"),
            payment_id=sa.bindparam("payment_id"),
            refund_id=sa.bindparam("refund_id"),
        )
    )
)


class SqlIdempotencyRepository:
    def __init__(
        self,
        conn: AsyncConnection,
        row_locks: bool,
        cipher: FieldCipher,
        direct: DirectConnection | None = None,
    ) -> None:
        """`direct`: the hot writes go through psycopg on it (writing.py)."""
        self._conn = conn
        self._direct = direct
        self._row_locks = row_locks
        self._cipher = cipher

    async def insert_if_absent(self, record: KeyRecord) -> bool:
        claim = _CLAIM["postgresql" if self._conn.dialect.name == "postgresql" else "sqlite"]
        row = _to_row(record, self._cipher)
        return await claim.first(self._conn, self._direct, row) is not None

    async def get_for_update(self, scope: str, operation: Operation, key: str) -> KeyRecord | None:
        query = _LOCK_BY_KEY if self._row_locks else _BY_KEY
        by_key = {"b_scope": scope, "b_operation": operation.value, "b_key": key}
        row = (await self._conn.execute(query, by_key)).mappings().first()
        return _from_row(row, self._cipher) if row else None

    async def save(self, record: KeyRecord) -> None:
        row = {**_to_row(record, self._cipher), "b_id": record.record_id}
        await _SAVE.write_behind(self._conn, self._direct, row)

    async def advance(self, record: KeyRecord) -> None:
        await _ADVANCE.write_behind(
            self._conn,
            self._direct,
            {
                "b_id": record.record_id,
                "recovery_point": record.recovery_point.value,
                "payment_id": record.payment_id,
                "refund_id": record.refund_id,
            },
        )

    async def renew(self, record_ids: Sequence[str], owner: str, now: datetime) -> int:
        if not record_ids:
            return 0
        result = await self._conn.execute(
            keys.update()
            .where(
                keys.c.id.in_(record_ids),
                keys.c.locked_by == owner,
                keys.c.recovery_point != RecoveryPoint.FINISHED.value,
            )
            .values(locked_at=now)
        )
        return result.rowcount

    async def delete(self, record_id: str) -> None:
        await self._conn.execute(keys.delete().where(keys.c.id == record_id))

    async def delete_expired(self, now: datetime, limit: int) -> int:
        expired = sa.select(keys.c.id).where(keys.c.expires_at <= now).limit(limit)
        result = await self._conn.execute(keys.delete().where(keys.c.id.in_(expired)))
        return result.rowcount

    async def release_locks_of(self, owner: str) -> int:
        result = await self._conn.execute(
            keys.update().where(keys.c.locked_by == owner).values(locked_by=None, locked_at=None)
        )
        return result.rowcount

    async def abandoned(
        self, locked_before: datetime, now: datetime, limit: int
    ) -> list[KeyRecord]:
        query = (
            sa.select(keys)
            .where(
                keys.c.recovery_point != RecoveryPoint.FINISHED.value,
                sa.or_(keys.c.locked_at.is_(None), keys.c.locked_at <= locked_before),
                keys.c.expires_at > now,
            )
            .order_by(keys.c.created_at)
            .limit(limit)
        )
        rows = (await self._conn.execute(query)).mappings().all()
        return [_from_row(row, self._cipher) for row in rows]

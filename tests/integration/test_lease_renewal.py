"""Idempotency lease renewals never wait behind calls for a pooled connection (issue 13,
one slow row must not take the service down).

With every connection of the request pool taken (calls waiting on a locked row, say),
renewals that went through that pool failed ("no database connection free in time", seen
in the slow-gateway bench); held longer than the lease, another replica could have taken
over keys whose calls were still running. They now have a connection of their own.
"""

from __future__ import annotations

import pathlib

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from payment_grpc.service.ports import KeyRecord, Operation
from tests.conftest import make_settings
from tests.helpers.servers import serving


async def test_leases_are_renewed_while_calls_hold_every_pooled_connection(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    settings = make_settings(database_url, tmp_path, db_pool_size=1, db_pool_timeout_seconds=0.2)
    async with serving(settings) as (app, _stub):
        running = await app.keys.begin("svc-orders", Operation.CHARGE, "k1", "f")
        assert isinstance(running, KeyRecord)
        taken: list[AsyncConnection] = []
        try:
            while True:  # every pooled connection, until the pool says none is free
                try:
                    taken.append(await app.engine.connect())
                except sa.exc.TimeoutError:
                    break
            assert await app.keys.renew_leases() == 1
        finally:
            for conn in taken:
                await conn.close()
            await app.keys.release(running)

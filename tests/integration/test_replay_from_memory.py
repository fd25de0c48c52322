"""Final answers kept in the process (issue 12, README "Replays from memory"): a replay of
a key this process stored or read makes no database statement, and answers exactly as the
database would (the same bytes and headers, IDEMPOTENCY_KEY_REUSED for another request, a
new execution once the key expired); the number kept is bounded."""

from __future__ import annotations

import contextlib
import pathlib
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import grpc
import sqlalchemy as sa
from payments.v1 import payment_service_pb2 as api

from payment_grpc.adapters.db.tables import metadata
from payment_grpc.bootstrap import Application
from tests.conftest import make_settings
from tests.helpers.builders import S, card, charge_request, keyed, usd
from tests.helpers.calls import replayed, replayed_error, rpc_error
from tests.helpers.clock import SettableClock
from tests.helpers.db import engine_events, row_counts
from tests.helpers.servers import serving


@contextlib.contextmanager
def database_work(app: Application) -> Iterator[list[str]]:
    """Everything that reaches the request pool's database while inside: connection
    checkouts, BEGINs, statements, COMMITs and ROLLBACKs."""
    seen: list[str] = []

    def statement(_conn: Any, _cursor: Any, text: str, *_args: Any) -> None:
        seen.append(" ".join(text.split()))

    listeners = [
        ("before_cursor_execute", statement),
        ("checkout", lambda *_args: seen.append("checkout")),
        ("begin", lambda _conn: seen.append("BEGIN")),
        ("commit", lambda _conn: seen.append("COMMIT")),
        ("rollback", lambda _conn: seen.append("ROLLBACK")),
    ]
    with engine_events(app, listeners):
        yield seen


async def test_a_charge_replayed_from_memory_touches_no_database(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        request, key = charge_request(), uuid.uuid4().hex
        first = await stub.Charge(request, metadata=keyed(key))
        with database_work(app) as seen:
            again = stub.Charge(request, metadata=keyed(key))
            replay = await again
        assert seen == []
        assert await replayed(again)
        assert replay.SerializeToString(deterministic=True) == first.SerializeToString(
            deterministic=True
        )
        assert (await row_counts(app))["payments"] == 1


async def test_a_replay_read_from_the_database_is_kept(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        charged = await stub.Charge(charge_request(), metadata=keyed(uuid.uuid4().hex))
        request = api.RefundRequest(payment_id=charged.payment.payment_id, amount=usd(100))
        key = uuid.uuid4().hex
        first = await stub.Refund(request, metadata=keyed(key))
        app.keys.answers.clear()  # as another replica, or this one after a restart
        with database_work(app) as from_database:
            assert await stub.Refund(request, metadata=keyed(key)) == first
        assert from_database
        with database_work(app) as seen:
            again = stub.Refund(request, metadata=keyed(key))
            assert await again == first
        assert seen == []
        assert await replayed(again)
        assert (await row_counts(app))["refunds"] == 1


async def test_a_stored_refusal_is_replayed_from_memory_with_its_trailers(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        charged = await stub.Charge(charge_request(1_000), metadata=keyed(uuid.uuid4().hex))
        over = api.RefundRequest(payment_id=charged.payment.payment_id, amount=usd(5_000))
        key = uuid.uuid4().hex
        first = await rpc_error(stub.Refund(over, metadata=keyed(key)))
        with database_work(app) as seen:
            again = stub.Refund(over, metadata=keyed(key))
            error = await rpc_error(again)
        assert seen == []
        assert (error.code, error.info, error.message) == (first.code, first.info, first.message)
        assert await replayed_error(again)


async def test_another_request_under_a_kept_key_is_still_reused(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        key = uuid.uuid4().hex
        await stub.Charge(charge_request(1_000, order_id="ord_kept"), metadata=keyed(key))
        other = charge_request(2_000, order_id="ord_kept")  # Charge: `unclaimed`
        with database_work(app) as seen:
            error = await rpc_error(stub.Charge(other, metadata=keyed(key)))
        assert seen == []
        assert (error.code, error.info.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "IDEMPOTENCY_KEY_REUSED",
        )
        charged = await stub.Charge(charge_request(), metadata=keyed(uuid.uuid4().hex))
        refund_key = uuid.uuid4().hex
        payment_id = charged.payment.payment_id
        await stub.Refund(
            api.RefundRequest(payment_id=payment_id, amount=usd(100)), metadata=keyed(refund_key)
        )
        with database_work(app) as seen:
            error = await rpc_error(  # Refund: the claim of its own (`begin`)
                stub.Refund(
                    api.RefundRequest(payment_id=payment_id, amount=usd(200)),
                    metadata=keyed(refund_key),
                )
            )
        assert seen == []
        assert error.info.reason == "IDEMPOTENCY_KEY_REUSED"
        assert (await row_counts(app))["refunds"] == 1


async def test_an_expired_key_kept_in_memory_runs_as_a_new_request(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    clock = SettableClock()
    settings = make_settings(database_url, tmp_path, idempotency_retention_hours=1)
    async with serving(settings, clock) as (app, stub):
        # A decline leaves the order chargeable: a new execution reaches the gateway again.
        request, key = charge_request(method=card("tok_chargeDeclined")), uuid.uuid4().hex
        first = await stub.Charge(request, metadata=keyed(key))
        with database_work(app) as seen:
            assert await replayed(stub.Charge(request, metadata=keyed(key)))
        assert seen == []
        clock.advance(timedelta(hours=1))  # at expires_at: expired
        again = stub.Charge(request, metadata=keyed(key))
        second = await again
        assert not await replayed(again)
        assert second.payment.payment_id != first.payment.payment_id
        assert second.payment.status == S.PAYMENT_STATUS_FAILED
        assert (await row_counts(app))["payments"] == 2


async def test_the_number_of_answers_kept_is_bounded(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    settings = make_settings(database_url, tmp_path, idempotency_cached_answers=2)
    async with serving(settings) as (app, stub):
        calls = [(charge_request(), uuid.uuid4().hex) for _ in range(4)]
        answers = [await stub.Charge(request, metadata=keyed(key)) for request, key in calls]
        assert len(app.keys.answers) == 2
        (oldest, oldest_key), (newest, newest_key) = calls[0], calls[-1]
        with database_work(app) as seen:
            assert await stub.Charge(newest, metadata=keyed(newest_key)) == answers[-1]
        assert seen == []
        with database_work(app) as seen:
            again = stub.Charge(oldest, metadata=keyed(oldest_key))
            assert await again == answers[0]  # dropped from memory: the database answers
        assert seen
        assert await replayed(again)
        assert len(app.keys.answers) == 2
        assert (await row_counts(app))["payments"] == 4


async def _every_row(app: Application) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of ours, in a stable order."""
    async with app.engine.connect() as conn:
        return {
            table.name: sorted(map(tuple, await conn.execute(sa.select(table))), key=repr)
            for table in metadata.sorted_tables
        }


async def test_a_replay_the_database_answers_writes_nothing(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """A Charge replay that misses the answers kept in memory (another replica, a restart)
    meets its key in the create transaction's claim: the stored answer, or
    IDEMPOTENCY_KEY_REUSED for another request, and that transaction is rolled back with
    nothing written. Not a COMMIT: the claim's SELECT ... FOR UPDATE gives the transaction
    a transaction id on PostgreSQL, so its COMMIT waits for a WAL flush (bench/README,
    16:43-18:10 UTC: 7-9 ms against 0.7-1.1 ms for the ROLLBACK here)."""
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        request, key = charge_request(1_000, order_id="ord_missed"), uuid.uuid4().hex
        first = await stub.Charge(request, metadata=keyed(key))
        before = await _every_row(app)
        app.keys.answers.clear()
        with database_work(app) as seen:
            again = stub.Charge(request, metadata=keyed(key))
            replay = await again
        assert await replayed(again)
        assert replay.SerializeToString(deterministic=True) == first.SerializeToString(
            deterministic=True
        )
        assert seen[-1] == "ROLLBACK"
        assert "COMMIT" not in seen
        app.keys.answers.clear()
        other = charge_request(2_000, order_id="ord_missed")
        with database_work(app) as seen:
            error = await rpc_error(stub.Charge(other, metadata=keyed(key)))
        assert (error.code, error.info.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "IDEMPOTENCY_KEY_REUSED",
        )
        assert seen[-1] == "ROLLBACK"
        assert "COMMIT" not in seen
        assert await _every_row(app) == before

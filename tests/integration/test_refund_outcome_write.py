"""A Refund's outcome is written without reading first (issue 12): the payment's UPDATE
holds only on the version the decision was taken on, the refund's only on its status, so
a refund recorded meanwhile is never written over."""

from __future__ import annotations

import pathlib
import uuid
from datetime import UTC, datetime

import pytest
from payments.v1 import payment_service_pb2 as api

from payment_grpc.adapters.db.engine import SqlUnitOfWorkFactory
from payment_grpc.bootstrap import build_cipher
from payment_grpc.domain.refund import RefundStatus
from payment_grpc.service.errors import ConcurrentModification
from tests.conftest import make_settings
from tests.helpers.builders import charge_request, keyed, usd
from tests.helpers.db import committed_transactions, insert_pending_refund, refund_status
from tests.helpers.servers import serving


async def test_a_refund_records_its_outcome_without_reading_first(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        charged = await stub.Charge(charge_request(1_000), metadata=keyed(uuid.uuid4().hex))
        request = api.RefundRequest(payment_id=charged.payment.payment_id, amount=usd(300))
        with committed_transactions(app) as committed:
            reply = await stub.Refund(request, metadata=keyed(uuid.uuid4().hex))
        assert reply.payment.refunded_amount.amount_minor == 300
        (recording,) = [t for t in committed if any(s.startswith("UPDATE REFUNDS ") for s in t)]
        assert not [s for s in recording if s.startswith("SELECT")], recording
        assert any(s.startswith("UPDATE PAYMENTS ") for s in recording), recording


async def test_a_refund_update_holds_only_on_the_status_decided_on(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        charged = await stub.Charge(charge_request(1_000), metadata=keyed(uuid.uuid4().hex))
        now = datetime.now(UTC)
        refund_id = await insert_pending_refund(
            app, charged.payment.payment_id, 300, updated_at=now
        )
        uow = SqlUnitOfWorkFactory(app.engine, build_cipher(app.settings))
        async with uow() as tx:
            pending = await tx.refunds.get(refund_id)
            await tx.refunds.save(pending.failed("declined", now), pending)
            await tx.commit()
        async with uow() as tx:
            with pytest.raises(ConcurrentModification):
                await tx.refunds.save(pending.succeeded("re_sim_1", now), pending)
        assert await refund_status(app, refund_id) == RefundStatus.FAILED.value

"""The relay of a replica is SIGKILLed while a batch of notifications is at the order
service; another replica (a new process on the same database) delivers everything: nothing
is lost, each payment's outcomes arrive in order (after dropping repeated dedupe ids).

Real server processes on SQLite and PostgreSQL, a fake order service that is a real
grpc.aio server in the test process."""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import pytest
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

from tests.e2e.server_process import ServerProcess, server_env, stored_payments
from tests.fake_order_service import FakeOrderService, order_service
from tests.helpers.builders import charge_request, order_id
from tests.helpers.credentials import client_metadata

pytestmark = pytest.mark.slow

OUTCOMES = {"AUTHORIZED", "CAPTURED", "FAILED", "CANCELED", "PARTIALLY_REFUNDED", "REFUNDED"}
WAIT_S = 60


def replica(database_url: str, tmp_path: pathlib.Path, port: int, name: str) -> ServerProcess:
    env = server_env(
        database_url,
        tmp_path,
        INSTANCE_ID=name,
        ORDER_SERVICE_ADDR=f"127.0.0.1:{port}",
        # A notification hangs until the relay gives it up at the end of its lease (then it
        # is claimed again and hangs again), until the crash.
        ORDER_SERVICE_TIMEOUT_SECONDS="60",
        ORDER_SERVICE_ATTEMPTS="1",
        ORDER_SERVICE_BREAKER_THRESHOLD="1000",
        OUTBOX_LEASE_SECONDS="1",  # the crashed replica's claims are taken over after 1 s
        OUTBOX_BACKOFF_INITIAL_SECONDS="0.01",
        OUTBOX_BACKOFF_MAX_SECONDS="0.05",
        RECOVERY_INTERVAL_SECONDS="3600",
    )
    return ServerProcess(env, cwd=tmp_path)


async def lifecycle(stub: Any, fake: FakeOrderService) -> None:
    order = fake.add(order_id(), 10_000)
    request = charge_request(10_000, order_id=order.order_id, manual=True)
    payment = (await stub.Charge(request)).payment
    await stub.CapturePayment(api.CapturePaymentRequest(payment_id=payment.payment_id))
    amount = pb.Money(currency="USD", amount_minor=4_000)
    await stub.Refund(api.RefundRequest(payment_id=payment.payment_id, amount=amount))


def first_arrivals(delivered: list[tuple[str, int]]) -> list[tuple[str, int]]:
    seen: set[tuple[str, int]] = set()
    return [d for d in delivered if not (d in seen or seen.add(d))]  # type: ignore[func-returns-value]


@pytest.mark.timeout(300)
async def test_a_relay_killed_mid_batch_loses_nothing(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with order_service() as (fake, port):
        fake.notifications_hanging = True
        first = replica(database_url, tmp_path, port, "replica-1")
        await first.start()
        first.follow()
        try:
            async with aio.insecure_channel(
                f"127.0.0.1:{first.port}", interceptors=client_metadata()
            ) as channel:
                stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
                await asyncio.gather(*(lifecycle(stub, fake) for _ in range(4)))
            # mid-batch: the first outcome of every payment is at the order service
            await asyncio.wait_for(
                fake.wait_until(lambda: len({p for p, _ in fake.hung}) >= 4), WAIT_S
            )
        finally:
            first.kill()
        await first.wait()
        fake.notifications_hanging = False
        fake.released.set()
        stored = await stored_payments(database_url)
        expected = {
            (payment_id, sequence)
            for payment_id, payment in stored.items()
            for sequence, status in payment.events
            if status in OUTCOMES
        }
        assert len(expected) == 12  # authorized, captured, partially refunded x 4
        second = replica(database_url, tmp_path, port, "replica-2")
        await second.start()
        second.follow()
        try:
            await asyncio.wait_for(
                fake.wait_until(lambda: set(fake.delivered()) >= expected), WAIT_S
            )
        finally:
            second.sigterm()
            assert await second.wait() == 0, second.log[-3000:]
    kept = first_arrivals(fake.delivered())
    assert set(kept) == expected
    for payment_id in stored:
        sequences = [s for p, s in kept if p == payment_id]
        assert sequences == sorted(sequences)
    assert "Traceback" not in second.log, second.log

"""On PostgreSQL a watcher on one replica sees changes made through another one."""

from __future__ import annotations

import pathlib

import grpc
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.bootstrap import build_application
from tests.conftest import make_settings
from tests.helpers.builders import S, charge_request
from tests.helpers.credentials import client_metadata


async def test_watch_on_one_replica_follows_changes_made_on_another(
    postgres_url: str, tmp_path: pathlib.Path
) -> None:
    replicas = [
        build_application(make_settings(postgres_url, tmp_path / name, instance_id=name))
        for name in ("replica-a", "replica-b")
    ]
    for replica in replicas:
        await replica.start()
    try:
        a, b = (
            grpc.aio.insecure_channel(f"127.0.0.1:{r.port}", interceptors=client_metadata())
            for r in replicas
        )
        watcher = payment_service_pb2_grpc.PaymentServiceStub(a)
        writer = payment_service_pb2_grpc.PaymentServiceStub(b)
        payment = (await writer.Charge(charge_request(manual=True))).payment
        stream = watcher.WatchPaymentStatus(
            api.WatchPaymentStatusRequest(payment_id=payment.payment_id)
        )
        assert (await stream.read()).event.status == S.PAYMENT_STATUS_AUTHORIZED
        await writer.CapturePayment(api.CapturePaymentRequest(payment_id=payment.payment_id))
        captured = (await stream.read()).event
        assert (captured.sequence, captured.status) == (4, S.PAYMENT_STATUS_CAPTURED)
        assert await stream.read() == grpc.aio.EOF
        await a.close()
        await b.close()
    finally:
        for replica in replicas:
            await replica.stop()

"""The yardstick: a bare grpc.aio + uvloop server answering the service's own RPCs with
canned answers, no interceptors, no database, no validation.

`python -m bench.ceiling --port P --workers N` runs N such processes on one port
(SO_REUSEPORT), like the service with WORKERS=N, so a scenario's rps divided by the
ceiling's rps (same client, same run) is the fraction of what gRPC alone could carry.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import uvloop
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

Context = aio.ServicerContext[Any, Any]
PAYMENT_ID = "pay_0123456789abcdefghijklmnopqrstuv"


def _canned_payment() -> pb.Payment:
    """A payment shaped like the service's answer to the bench's Charge (same fields set)."""
    now = Timestamp(seconds=1_780_000_000, nanos=123_456_000)
    return pb.Payment(
        payment_id=PAYMENT_ID,
        order_id="bench-12345-678",
        amount=pb.Money(currency="USD", amount_minor=1999),
        captured_amount=pb.Money(currency="USD", amount_minor=1999),
        refunded_amount=pb.Money(currency="USD", amount_minor=0),
        status=pb.PAYMENT_STATUS_CAPTURED,
        capture_method=pb.CAPTURE_METHOD_AUTOMATIC,
        payment_method=pb.PaymentMethodDetails(
            type=pb.PAYMENT_METHOD_TYPE_CARD,
            card=pb.CardDetails(brand="visa", last4="4242", exp_month=12, exp_year=2030),
        ),
        gateway_reference="sim_ch_0123456789abcdef0123",
        create_time=now,
        update_time=now,
    )


class CannedPayments(payment_service_pb2_grpc.PaymentServiceServicer):
    """Every answer built once; a call costs gRPC's own work and nothing else."""

    def __init__(self) -> None:
        payment = _canned_payment()
        self._charge = api.ChargeResponse(payment=payment)
        self._get = api.GetPaymentResponse(payment=payment)
        refund = pb.Refund(
            refund_id="re_0123456789abcdefghijklmnopqrstuv",
            payment_id=PAYMENT_ID,
            amount=pb.Money(currency="USD", amount_minor=1),
            status=pb.REFUND_STATUS_SUCCEEDED,
        )
        self._refund = api.RefundResponse(refund=refund, payment=payment)
        self._capture = api.CapturePaymentResponse(payment=payment)
        self._event = api.WatchPaymentStatusResponse(
            event=pb.PaymentStatusEvent(
                payment_id=PAYMENT_ID,
                sequence=1,
                status=pb.PAYMENT_STATUS_CAPTURED,
                amount=payment.amount,
                captured_amount=payment.captured_amount,
                refunded_amount=payment.refunded_amount,
                event_time=payment.update_time,
            )
        )

    async def Charge(self, request: api.ChargeRequest, context: Context) -> api.ChargeResponse:
        return self._charge

    async def GetPayment(
        self, request: api.GetPaymentRequest, context: Context
    ) -> api.GetPaymentResponse:
        return self._get

    async def Refund(self, request: api.RefundRequest, context: Context) -> api.RefundResponse:
        return self._refund

    async def CapturePayment(
        self, request: api.CapturePaymentRequest, context: Context
    ) -> api.CapturePaymentResponse:
        return self._capture

    async def CancelPayment(
        self, request: api.CancelPaymentRequest, context: Context
    ) -> api.CancelPaymentResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the ceiling")

    async def ListPayments(
        self, request: api.ListPaymentsRequest, context: Context
    ) -> api.ListPaymentsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the ceiling")

    async def GetRefund(
        self, request: api.GetRefundRequest, context: Context
    ) -> api.GetRefundResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the ceiling")

    async def ListRefunds(
        self, request: api.ListRefundsRequest, context: Context
    ) -> api.ListRefundsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the ceiling")

    async def WatchPaymentStatus(
        self, request: api.WatchPaymentStatusRequest, context: Context
    ) -> AsyncIterator[api.WatchPaymentStatusResponse]:
        yield self._event


async def _serve(port: int) -> None:
    server = aio.server(options=[("grpc.so_reuseport", 1)])
    payment_service_pb2_grpc.add_PaymentServiceServicer_to_server(CannedPayments(), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def serve_one(port: int) -> None:
    uvloop.run(_serve(port))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.workers == 1:
        serve_one(args.port)
        return 0
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=serve_one, args=(args.port,)) for _ in range(args.workers)]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                child.terminate()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())

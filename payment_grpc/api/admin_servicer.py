"""AdminService transport: convert the request, call one use case, convert the result."""

from __future__ import annotations

from typing import Any

from grpc import aio
from payments.v1 import admin_service_pb2 as admin
from payments.v1 import admin_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

from payment_grpc.api import convert
from payment_grpc.api.context import request_context
from payment_grpc.domain.payment import PaymentEvent
from payment_grpc.service.admin import Admin, PaymentStats
from payment_grpc.service.ports import StatsGroup

Context = aio.ServicerContext[Any, Any]


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, admin_cases: Admin) -> None:
        self._admin = admin_cases

    async def ResolvePayment(
        self, request: admin.ResolvePaymentRequest, context: Context
    ) -> admin.ResolvePaymentResponse:
        payment = await self._admin.resolve(
            request.payment_id,
            convert.STATUS_FROM_PB[request.status],
            request.reason,
            request_context(context),
        )
        return admin.ResolvePaymentResponse(payment=convert.payment_to_pb(payment))

    async def ListPaymentEvents(
        self, request: admin.ListPaymentEventsRequest, context: Context
    ) -> admin.ListPaymentEventsResponse:
        page = await self._admin.events(
            request.payment_id,
            request.page_size,
            request.page_token,
            request.reason,
            request_context(context),
        )
        return admin.ListPaymentEventsResponse(
            entries=[audit_entry(e) for e in page.items], next_page_token=page.next_page_token
        )

    async def GetPaymentStats(
        self, request: admin.GetPaymentStatsRequest, context: Context
    ) -> admin.GetPaymentStatsResponse:
        stats = await self._admin.stats(
            convert.datetime_of(request.start_time),
            convert.datetime_of(request.end_time),
            request.reason,
            request_context(context),
        )
        return stats_to_pb(stats)


def audit_entry(event: PaymentEvent) -> admin.PaymentAuditEntry:
    return admin.PaymentAuditEntry(
        event=convert.event_to_pb(event),
        actor=event.actor,
        trace_id=event.trace_id,
        reason=event.reason,
    )


def _group_to_pb(group: StatsGroup) -> admin.PaymentStatsGroup:
    def money(minor: int) -> pb.Money:
        # Not domain Money: a sum may pass the largest amount one payment may have.
        return pb.Money(currency=group.currency, amount_minor=minor)

    return admin.PaymentStatsGroup(
        status=convert.STATUS_TO_PB[group.status],
        method_type=convert.METHOD_TYPE_TO_PB[group.method_type],
        currency=group.currency,
        payment_count=group.payment_count,
        amount=money(group.amount_minor),
        captured_amount=money(group.captured_minor),
        refunded_amount=money(group.refunded_minor),
    )


def stats_to_pb(stats: PaymentStats) -> admin.GetPaymentStatsResponse:
    return admin.GetPaymentStatsResponse(
        groups=[_group_to_pb(g) for g in stats.groups],
        succeeded_count=stats.succeeded,
        failed_count=stats.failed,
        success_rate_bps=stats.success_rate_bps,
    )

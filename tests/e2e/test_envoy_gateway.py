"""HTTP/JSON through the real Envoy gateway (grpc_json_transcoder, k8s/envoy/envoy.local.yaml)
to a real server, on SQLite and PostgreSQL: what a browser sees behind the API gateway."""

from __future__ import annotations

import logging
import pathlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from payment_grpc.bootstrap import Application
from tests.e2e.envoy import Gateway, Response, envoy_gateway
from tests.helpers import order_id, token

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


@pytest.fixture
async def gateway(app: Application, tmp_path: pathlib.Path) -> AsyncIterator[Gateway]:
    async with envoy_gateway(app.port, tmp_path) as gw:
        yield gw


def browser_headers(trace_id: str | None = None) -> dict[str, str]:
    """What a browser app sends through the gateway; Envoy forwards them as metadata."""
    return {
        "authorization": f"Bearer {token()}",
        "idempotency-key": f"idem-{uuid.uuid4().hex}",
        "traceparent": f"00-{trace_id or uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
    }


def traced_methods(caplog: pytest.LogCaptureFixture, trace_id: str) -> list[str]:
    return [
        str(getattr(r, "rpc_method", "")).rsplit("/", 1)[-1]
        for r in caplog.records
        if r.getMessage() == "rpc finished" and getattr(r, "trace_id", None) == trace_id
    ]


def usd(amount_minor: str) -> dict[str, str]:
    return {"currency": "USD", "amount_minor": amount_minor}


def charge_body(order: str, amount_minor: str = "1999") -> dict[str, Any]:
    return {
        "order_id": order,
        "amount": usd(amount_minor),
        "payment_method": {"card": {"token": "tok_visa"}},
    }


def ok_json(response: Response) -> Any:
    assert response.status == 200, (response.status, response.body)
    assert response.headers["content-type"].startswith("application/json")
    assert "grpc-status" not in response.headers
    return response.json()


def error_json(response: Response, status: int, code: int) -> dict[str, Any]:
    """The google.rpc.Status body, with its details keyed by type URL."""
    assert response.status == status, (response.status, response.headers, response.body)
    assert response.headers["content-type"].startswith("application/json")
    assert "grpc-status" not in response.headers
    assert "grpc-message" not in response.headers
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert body["message"]
    body["by_type"] = {detail["@type"]: detail for detail in body.get("details", [])}
    return body


async def test_charge_get_refund_and_list(gateway: Gateway) -> None:
    order = order_id()
    charged = ok_json(
        await gateway.post("/v1/payments:charge", charge_body(order), browser_headers())
    )
    payment = charged["payment"]
    assert payment["status"] == "PAYMENT_STATUS_CAPTURED"
    assert payment["order_id"] == order
    assert payment["amount"] == usd("1999")  # int64 as a JSON string
    assert payment["captured_amount"] == usd("1999")
    assert payment["payment_method"]["card"]["last4"] == "4242"
    payment_id = payment["payment_id"]
    assert payment_id.startswith("pay_")

    fetched = ok_json(await gateway.get(f"/v1/payments/{payment_id}", browser_headers()))
    assert fetched["payment"] == payment

    refunded = ok_json(
        await gateway.post(
            f"/v1/payments/{payment_id}/refunds", {"amount": usd("500")}, browser_headers()
        )
    )
    assert refunded["refund"]["status"] == "REFUND_STATUS_SUCCEEDED"
    assert refunded["refund"]["payment_id"] == payment_id
    assert refunded["refund"]["amount"] == usd("500")
    assert refunded["payment"]["status"] == "PAYMENT_STATUS_PARTIALLY_REFUNDED"
    assert refunded["payment"]["refunded_amount"] == usd("500")

    listed = ok_json(await gateway.get(f"/v1/payments?order_id={order}", browser_headers()))
    assert [p["payment_id"] for p in listed["payments"]] == [payment_id]
    assert listed["payments"][0] == refunded["payment"]


async def test_unknown_payment_is_404_with_error_info(gateway: Gateway) -> None:
    missing = f"pay_{uuid.uuid4().hex}"
    body = error_json(await gateway.get(f"/v1/payments/{missing}", browser_headers()), 404, 5)
    info = body["by_type"][ERROR_INFO]
    assert info["reason"] == "PAYMENT_NOT_FOUND"
    assert info["domain"] == "payments.v1"
    assert info["metadata"] == {"paymentId": missing}


async def test_zero_amount_is_400_with_field_violation(gateway: Gateway) -> None:
    order = order_id()
    response = await gateway.post("/v1/payments:charge", charge_body(order, "0"), browser_headers())
    body = error_json(response, 400, 3)
    assert body["by_type"][ERROR_INFO]["reason"] == "INVALID_ARGUMENT"
    violations = body["by_type"][BAD_REQUEST]["field_violations"]
    assert [v["field"] for v in violations] == ["amount"]
    assert violations[0]["description"]
    # Nothing was charged for the order.
    listed = ok_json(await gateway.get(f"/v1/payments?order_id={order}", browser_headers()))
    assert listed.get("payments", []) == []


async def test_headers_reach_the_server_as_metadata(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="payment_grpc.rpc")
    trace_id = uuid.uuid4().hex
    headers = browser_headers(trace_id)
    charged = ok_json(await gateway.post("/v1/payments:charge", charge_body(order_id()), headers))
    assert charged["payment"]["status"] == "PAYMENT_STATUS_CAPTURED"
    # Same idempotency-key again on a read: still fine.
    ok_json(await gateway.get(f"/v1/payments/{charged['payment']['payment_id']}", headers))
    # The server saw the traceparent header as gRPC metadata on both calls.
    assert traced_methods(caplog, trace_id) == ["Charge", "GetPayment"]


async def test_missing_token_is_401_with_error_info(gateway: Gateway) -> None:
    headers = {k: v for k, v in browser_headers().items() if k != "authorization"}
    response = await gateway.post("/v1/payments:charge", charge_body(order_id()), headers)
    body = error_json(response, 401, 16)
    assert body["by_type"][ERROR_INFO]["reason"] == "UNAUTHENTICATED"

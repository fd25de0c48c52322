"""HTTP/JSON through the real Envoy gateway (grpc_json_transcoder, k8s/envoy/envoy.local.yaml)
to a real server, on SQLite and PostgreSQL: what a browser sees behind the API gateway."""

from __future__ import annotations

import base64
import json
import logging
import pathlib
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from payment_grpc.bootstrap import Application
from payment_grpc.config import Settings
from tests.conftest import make_settings
from tests.e2e.envoy import Gateway, Response, envoy_gateway
from tests.helpers.builders import order_id
from tests.helpers.credentials import token

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


HEARTBEAT_S = 0.2


@pytest.fixture
def settings(database_url: str, tmp_path: pathlib.Path) -> Settings:
    return make_settings(database_url, tmp_path, watch_heartbeat_seconds=HEARTBEAT_S)


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
    # Primitive fields are always printed: a zero amount is "0", an empty string "".
    assert payment["refunded_amount"] == usd("0")
    assert payment["customer_id"] == ""
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


async def charged(gateway: Gateway) -> str:
    reply = ok_json(
        await gateway.post("/v1/payments:charge", charge_body(order_id()), browser_headers())
    )
    payment_id: str = reply["payment"]["payment_id"]
    return payment_id


async def test_path_and_body_naming_different_payments_is_400_and_refunds_neither(
    gateway: Gateway,
) -> None:
    first, second = await charged(gateway), await charged(gateway)
    response = await gateway.post(
        f"/v1/payments/{first}/refunds",
        {"payment_id": second, "amount": usd("500")},
        browser_headers(),
    )
    assert response.status == 400, (response.status, response.body)
    assert b"conflicting" in response.body
    for payment_id in (first, second):
        payment = ok_json(await gateway.get(f"/v1/payments/{payment_id}", browser_headers()))
        assert payment["payment"]["refunded_amount"] == usd("0")
        assert payment["payment"]["status"] == "PAYMENT_STATUS_CAPTURED"


async def test_envoys_own_refusals_are_json_status_bodies(gateway: Gateway) -> None:
    """What Envoy refuses before the service sees it (the path/body collision, a body
    that is not JSON, a path no route knows) reads like the service's errors: a JSON
    google.rpc.Status with the matching code, never plain text."""
    first, second = await charged(gateway), await charged(gateway)
    collision = await gateway.post(
        f"/v1/payments/{first}/refunds",
        {"payment_id": second, "amount": usd("500")},
        browser_headers(),
    )
    assert "conflicting" in error_json(collision, 400, 3)["message"]
    malformed = await gateway.post("/v1/payments:charge", b'{"order_id": ', browser_headers())
    error_json(malformed, 400, 3)
    error_json(await gateway.get("/v1/nothing-here", browser_headers()), 404, 5)


async def test_a_json_typo_is_400_unknown_field_and_charges_nothing(gateway: Gateway) -> None:
    order = order_id()
    body = {**charge_body(order), "capture_metod": "CAPTURE_METHOD_MANUAL"}
    response = await gateway.post("/v1/payments:charge", body, browser_headers())
    error = error_json(response, 400, 3)
    assert error["by_type"][ERROR_INFO]["reason"] == "UNKNOWN_FIELD"
    violations = error["by_type"][BAD_REQUEST]["field_violations"]
    assert [v["field"] for v in violations] == ["capture_metod"]
    listed = ok_json(await gateway.get(f"/v1/payments?order_id={order}", browser_headers()))
    assert listed["payments"] == []


async def test_nested_typos_are_named_by_path_and_json_names_are_accepted(
    gateway: Gateway,
) -> None:
    body = {
        "orderId": order_id(),  # the JSON (lowerCamel) name is a known field too
        "amount": {"currency": "USD", "amountMinor": "100", "curency": "EUR"},
        "payment_method": {"card": {"token": "tok_visa", "cvc": "123"}},
    }
    response = await gateway.post("/v1/payments:charge", body, browser_headers())
    error = error_json(response, 400, 3)
    fields = [v["field"] for v in error["by_type"][BAD_REQUEST]["field_violations"]]
    assert fields == ["amount.curency", "payment_method.card.cvc"]


async def test_a_client_cannot_smuggle_its_own_body_copy(gateway: Gateway) -> None:
    """The gateway replaces x-http-json-body: a clean copy sent by the client next to a
    body with a typo does not get the typo through."""
    clean = charge_body(order_id())
    headers = {
        **browser_headers(),
        "x-http-json-body": base64.b64encode(json.dumps(clean).encode()).decode(),
    }
    body = {**clean, "capture_metod": "CAPTURE_METHOD_MANUAL"}
    response = await gateway.post("/v1/payments:charge", body, headers)
    assert error_json(response, 400, 3)["by_type"][ERROR_INFO]["reason"] == "UNKNOWN_FIELD"


async def test_the_watch_is_a_server_sent_event_stream_with_heartbeats(gateway: Gateway) -> None:
    payment_id = await charged(gateway)

    def snapshot_and_heartbeat(events: list[Any]) -> bool:
        return any("event" in e for e in events) and any("heartbeat_time" in e for e in events)

    head, events = await gateway.events(
        f"/v1/payments/{payment_id}:watch?follow_refunds=true",
        browser_headers(),
        snapshot_and_heartbeat,
    )
    assert head.status == 200
    assert head.headers["content-type"] == "text/event-stream"
    # On a loaded machine a heartbeat may even come before the snapshot: both are there.
    (snapshot,) = [e["event"] for e in events if "event" in e]
    assert snapshot["payment_id"] == payment_id
    assert snapshot["status"] == "PAYMENT_STATUS_CAPTURED"
    assert snapshot["refunded_amount"] == usd("0")
    heartbeats = [e for e in events if "event" not in e]
    assert heartbeats
    assert all(
        set(e) == {"heartbeat_time"} and e["heartbeat_time"].endswith("Z") for e in heartbeats
    )


async def test_a_settled_watch_ends_by_itself(gateway: Gateway) -> None:
    payment_id = await charged(gateway)
    head, events = await gateway.events(
        f"/v1/payments/{payment_id}:watch", browser_headers(), lambda _: False
    )
    assert head.status == 200
    assert [e["event"]["status"] for e in events if "event" in e] == ["PAYMENT_STATUS_CAPTURED"]


async def test_cors_preflight_for_a_configured_origin_only(gateway: Gateway) -> None:
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, idempotency-key",
    }
    allowed = await gateway.request(
        "OPTIONS", "/v1/payments:charge", headers={"origin": "http://localhost:8000", **preflight}
    )
    assert allowed.status == 200
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:8000"
    assert "idempotency-key" in allowed.headers["access-control-allow-headers"]
    assert "access-control-allow-credentials" not in allowed.headers
    other = await gateway.request(
        "OPTIONS", "/v1/payments:charge", headers={"origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers
    response = await gateway.get(
        f"/v1/payments/pay_{uuid.uuid4().hex}",
        {**browser_headers(), "origin": "http://localhost:8000"},
    )
    assert response.status == 404
    assert response.headers["access-control-allow-origin"] == "http://localhost:8000"


async def test_an_event_source_authenticates_with_an_access_token_parameter(
    gateway: Gateway,
) -> None:
    """What a browser's EventSource can send: a GET with the token in the query, an
    Origin, no authorization header."""
    payment_id = await charged(gateway)
    bearer = token(scopes=("payments.read",))
    head, events = await gateway.events(
        f"/v1/payments/{payment_id}:watch?access_token={bearer}",
        {"origin": "http://localhost:8000"},
        lambda _: False,
    )
    assert head.status == 200, head
    assert head.headers["access-control-allow-origin"] == "http://localhost:8000"
    assert [e["event"]["payment_id"] for e in events if "event" in e] == [payment_id]
    # Only the watch takes a token in the URL.
    response = await gateway.get(f"/v1/payments/{payment_id}?access_token={bearer}")
    assert response.status == 400


async def test_admin_api_is_transcoded_under_v1_admin(gateway: Gateway) -> None:
    charged = ok_json(
        await gateway.post("/v1/payments:charge", charge_body(order_id()), browser_headers())
    )
    payment_id = charged["payment"]["payment_id"]
    trail = ok_json(await gateway.get(f"/v1/admin/payments/{payment_id}/events", browser_headers()))
    assert [e["event"]["status"] for e in trail["entries"]] == [
        "PAYMENT_STATUS_PENDING",
        "PAYMENT_STATUS_PROCESSING",
        "PAYMENT_STATUS_CAPTURED",
    ]
    assert trail["entries"][0]["actor"] == "svc-tests"
    now = datetime.now(UTC)
    start, end = (now - timedelta(hours=1)).isoformat(), (now + timedelta(hours=1)).isoformat()
    query = urllib.parse.urlencode({"start_time": start, "end_time": end})
    stats = ok_json(await gateway.get(f"/v1/admin/payments:stats?{query}", browser_headers()))
    assert stats["groups"][0]["payment_count"] == "1"  # int64: a JSON string
    refused = await gateway.post(
        f"/v1/admin/payments/{payment_id}:resolve",
        {"status": "PAYMENT_STATUS_FAILED", "reason": "OPS-1: not allowed"},
        browser_headers(),
    )
    body = error_json(refused, 400, 9)
    assert body["by_type"]["type.googleapis.com/google.rpc.ErrorInfo"]["reason"] == (
        "PAYMENT_UNEXPECTED_STATE"
    )

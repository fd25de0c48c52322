"""The simulated gateway's own storage errors leave it only as GatewayErrors: a failed read
changed nothing (unreachable), a failed write may have landed (timeout)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from payment_grpc.adapters.gateways.simulated import SimulatedGateway, SimulatedGatewayConfig
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import PaymentMethod, PaymentMethodType
from payment_grpc.service.ports import AuthorizationRequest, GatewayTimeout, GatewayUnreachable


def _request() -> AuthorizationRequest:
    return AuthorizationRequest(
        idempotency_key="pay_1:authorize",
        payment_id="pay_1",
        amount=Money("USD", 1000),
        method=PaymentMethod(PaymentMethodType.CARD, token="tok_visa"),
        capture=True,
    )


def _ledger_with(tmp_path: Path, schema: str) -> str:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as db:
        db.execute(schema)
    return str(path)


async def test_a_ledger_that_cannot_be_opened_is_an_unreachable_gateway(tmp_path: Path) -> None:
    gateway = SimulatedGateway(SimulatedGatewayConfig(ledger_path=str(tmp_path)))  # a directory
    try:
        with pytest.raises(GatewayUnreachable) as raised:
            await gateway.lookup("pay_1:authorize")
        assert isinstance(raised.value.__cause__, sqlite3.Error)
    finally:
        await gateway.close()


async def test_a_failed_ledger_read_is_an_unreachable_gateway(tmp_path: Path) -> None:
    ledger = _ledger_with(tmp_path, "CREATE TABLE ledger (other TEXT)")  # no key column
    gateway = SimulatedGateway(SimulatedGatewayConfig(ledger_path=ledger))
    try:
        with pytest.raises(GatewayUnreachable):
            await gateway.authorize(_request())
    finally:
        await gateway.close()


async def test_a_failed_ledger_write_is_an_unknown_outcome(tmp_path: Path) -> None:
    ledger = _ledger_with(tmp_path, "CREATE TABLE ledger (key TEXT PRIMARY KEY)")
    gateway = SimulatedGateway(SimulatedGatewayConfig(ledger_path=ledger))
    try:
        with pytest.raises(GatewayTimeout) as raised:
            await gateway.authorize(_request())
        assert isinstance(raised.value.__cause__, sqlite3.Error)
    finally:
        await gateway.close()

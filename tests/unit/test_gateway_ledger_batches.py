"""The simulated gateway's ledger under concurrent calls: the calls that arrive while its
thread is busy are recorded together (one transaction), each keeps its own answer, every
answer is in the ledger file when it is given, and a batch never lets two refunds take more
than was captured, in one process or across two sharing the file."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from payment_grpc.adapters.gateways.simulated import SimulatedGateway, SimulatedGatewayConfig
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import PaymentMethod, PaymentMethodType
from payment_grpc.service.ports import (
    Authorization,
    AuthorizationOutcome,
    AuthorizationRequest,
    GatewayTimeout,
)


def _request(payment_id: str, key: str | None = None) -> AuthorizationRequest:
    return AuthorizationRequest(
        idempotency_key=key or f"{payment_id}:authorize",
        payment_id=payment_id,
        amount=Money("USD", 100),
        method=PaymentMethod(PaymentMethodType.CARD, token="tok_visa"),
        capture=True,
    )


def _recorded(ledger: Path) -> dict[str, tuple[str, str]]:
    """key -> (kind, reference), read from the file by a connection of its own."""
    with sqlite3.connect(ledger) as db:
        return {
            row[0]: (row[1], row[2])
            for row in db.execute("SELECT key, kind, reference FROM ledger")
        }


async def test_concurrent_authorizations_each_keep_their_answer_and_are_in_the_file(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.db"
    gateway = SimulatedGateway(SimulatedGatewayConfig(ledger_path=str(ledger)))
    try:
        ids = [f"pay_{n}" for n in range(30)]
        first, again = await asyncio.gather(
            asyncio.gather(*(gateway.authorize(_request(i)) for i in ids)),
            asyncio.gather(*(gateway.authorize(_request(i)) for i in ids)),  # same keys
        )
        recorded = _recorded(ledger)  # before close: written when answered
    finally:
        await gateway.close()
    assert [a.outcome for a in first] == [AuthorizationOutcome.CAPTURED] * len(ids)
    assert [a.reference for a in again] == [a.reference for a in first]
    assert len({a.reference for a in first}) == len(ids)
    assert recorded == {
        f"{i}:authorize": ("authorize", a.reference) for i, a in zip(ids, first, strict=True)
    }


@pytest.mark.parametrize("replicas", [1, 2])
async def test_concurrent_refunds_never_take_more_than_was_captured(
    tmp_path: Path, replicas: int
) -> None:
    config = SimulatedGatewayConfig(ledger_path=str(tmp_path / "ledger.db"))
    gateways = [SimulatedGateway(config) for _ in range(replicas)]
    try:
        charge = await gateways[0].authorize(_request("pay_1"))
        results = await asyncio.gather(
            *(
                gateways[n % replicas].refund(charge.reference, Money("USD", 60), f"re_{n}")
                for n in range(10)
            )
        )
        repeated = await gateways[-1].refund(charge.reference, Money("USD", 60), "re_0")
    finally:
        for gateway in gateways:
            await gateway.close()
    assert sum(result.succeeded for result in results) == 1
    assert repeated == results[0]


async def test_a_failed_write_fails_only_its_own_call(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    gateway = SimulatedGateway(SimulatedGatewayConfig(ledger_path=str(ledger)))
    try:
        await gateway.healthy()  # the ledger exists; now it refuses one payment's rows
        with sqlite3.connect(ledger) as db:
            db.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON ledger WHEN NEW.payment_id = 'pay_bad'"
                " BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        ids = ["pay_0", "pay_1", "pay_bad", "pay_2", "pay_3"]
        answers = await asyncio.gather(
            *(gateway.authorize(_request(i)) for i in ids), return_exceptions=True
        )
        recorded = _recorded(ledger)
    finally:
        await gateway.close()
    failed = answers[2]
    assert isinstance(failed, GatewayTimeout)  # a write that failed: outcome unknown
    assert isinstance(failed.__cause__, sqlite3.Error)
    others = [a for a in answers if isinstance(a, Authorization)]
    assert len(others) == 4
    assert set(recorded) == {f"{i}:authorize" for i in ids if i != "pay_bad"}

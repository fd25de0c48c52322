"""An open of the simulated gateway's ledger (on its own thread), or an aiosqlite open of the
service's database for a readiness check, that fails or is cancelled (a readiness check or a
first ledger read cut by shutdown) leaves no worker thread answering
into a loop the process has since closed
("Exception in thread ... RuntimeError: Event loop is closed" at exit).

Each case runs in a loop of its own, closed like the server's at exit; then it waits for
every aiosqlite worker thread the case started to end and checks none of them failed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from payment_grpc.adapters.db.health import DatabaseProbe
from payment_grpc.adapters.gateways.simulated import SimulatedGateway, SimulatedGatewayConfig

# aiosqlite's thread target, and the gateway ledger's thread, in the threads' names
WORKERS = ("_connection_worker_thread", "gateway-ledger")


def _workers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if any(name in t.name for name in WORKERS)}


def _run_then_close_loop(
    monkeypatch: pytest.MonkeyPatch, case: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    failures: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    before = _workers()
    asyncio.run(case())  # closes its loop, as the server's process does at exit
    for thread in _workers() - before:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert failures == []


async def _cancelled_while_it_starts(call: Awaitable[object]) -> None:
    task = asyncio.ensure_future(call)
    asyncio.get_running_loop().call_soon(task.cancel)  # after its first step: mid-open
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_ledger_that_cannot_be_opened_leaves_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def case() -> None:
        gateway = SimulatedGateway(SimulatedGatewayConfig(ledger_path=str(tmp_path)))  # a dir
        try:
            assert not await _answers(gateway.lookup("pay_1:authorize"))
        finally:
            await gateway.close()

    _run_then_close_loop(monkeypatch, case)


def test_a_ledger_read_cancelled_while_the_ledger_opens_leaves_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def case() -> None:
        gateway = SimulatedGateway(SimulatedGatewayConfig(ledger_path=str(tmp_path / "l.db")))
        try:
            await _cancelled_while_it_starts(gateway.healthy())
        finally:
            await gateway.close()

    _run_then_close_loop(monkeypatch, case)


def test_a_readiness_check_of_a_missing_database_leaves_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def case() -> None:
        probe = DatabaseProbe(f"sqlite+aiosqlite:///{tmp_path / 'missing.db'}")
        assert not await probe.reachable()
        assert not (tmp_path / "missing.db").exists()  # checked, never created

    _run_then_close_loop(monkeypatch, case)


def test_a_readiness_check_cut_short_leaves_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def case() -> None:
        probe = DatabaseProbe(f"sqlite+aiosqlite:///{tmp_path / 'payments.db'}")
        await _cancelled_while_it_starts(probe.reachable())

    _run_then_close_loop(monkeypatch, case)


async def _answers(call: Awaitable[object]) -> bool:
    try:
        await call
    except Exception:
        return False
    return True

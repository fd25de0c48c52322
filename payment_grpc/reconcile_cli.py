"""`payment-grpc reconcile --since T [--until T] [--format table|json]`: exit 1 on any
mismatch between our records and the gateway's (simulator ledger, or Stripe's lists)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TextIO

from payment_grpc.config import Settings
from payment_grpc.service.reconciliation import ChargeSource, Mismatch, reconcile

Closer = Callable[[], Awaitable[None]]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = commands.add_parser(
        "reconcile", help="compare payments and refunds with the gateway's records"
    )
    command.add_argument("--since", type=moment, required=True, help="ISO-8601 or unix time")
    command.add_argument("--until", type=moment, default=None, help="default: now")
    command.add_argument("--format", choices=("table", "json"), default="table")


def moment(value: str) -> datetime:
    """ISO-8601 (a missing zone means UTC) or unix seconds."""
    try:
        parsed = (
            datetime.fromtimestamp(float(value), UTC)
            if value.replace(".", "", 1).isdigit()
            else datetime.fromisoformat(value)
        )
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def run(settings: Settings, args: argparse.Namespace) -> int:
    until = args.until or datetime.now(UTC)
    return asyncio.run(report(settings, args.since, until, args.format, sys.stdout))


async def report(
    settings: Settings, since: datetime, until: datetime, fmt: str, out: TextIO
) -> int:
    from payment_grpc.adapters.db.engine import make_engine
    from payment_grpc.adapters.db.reconcile_source import SqlChargeSource

    engine = make_engine(settings.database.url)
    theirs, close = _gateway_source(settings)
    try:
        found = await reconcile(
            SqlChargeSource(engine), theirs, since.astimezone(UTC), until.astimezone(UTC)
        )
    finally:
        await close()
        await engine.dispose()
    _print(found, fmt, out)
    return 1 if found else 0


def _gateway_source(settings: Settings) -> tuple[ChargeSource, Closer]:
    from payment_grpc.adapters.gateways.reconcile_sources import (
        LedgerChargeSource,
        StripeChargeSource,
    )

    if settings.gateway.kind == "stripe":
        from payment_grpc.bootstrap import build_stripe_gateway

        gateway = build_stripe_gateway(settings)
        return StripeChargeSource(gateway), gateway.close
    from payment_grpc.adapters.gateways.engine import SimulatedGatewayConfig, SimulatorEngine

    ledger = SimulatorEngine(SimulatedGatewayConfig(str(settings.ledger_path())))
    return LedgerChargeSource(ledger), ledger.close


def _print(found: list[Mismatch], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        body = {"mismatches": [dataclasses.asdict(m) for m in found], "count": len(found)}
        out.write(json.dumps(body, indent=2) + "\n")
        return
    rows = [("KIND", "PAYMENT", "REFERENCE", "OURS", "GATEWAY")]
    rows += [(m.kind, m.payment_id, m.reference, m.ours, m.theirs) for m in found]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")
    out.write(f"{len(found)} mismatch(es)\n")

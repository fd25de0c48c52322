"""`payment-grpc serve | migrate | probe | token | rotate-keys | outbox`
(also `python -m payment_grpc`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from payment_grpc import gateway_sim, reconcile_cli
from payment_grpc.adapters.db.crypto import KeyConfigError
from payment_grpc.config import Settings
from payment_grpc.logging_setup import configure_logging
from payment_grpc.telemetry.metrics import MetricsPortUnavailable

log = logging.getLogger("payment_grpc")


async def _serve(settings: Settings, on_ready: Callable[[], None]) -> None:
    from payment_grpc.bootstrap import build_application
    from payment_grpc.telemetry.metrics import install_metrics
    from payment_grpc.telemetry.tracing import install_tracing

    instance_id = settings.server.instance_id
    tracer_provider = install_tracing(instance_id)
    metrics_endpoint = install_metrics(
        settings.server.host, settings.telemetry.metrics_port, instance_id
    )
    app = build_application(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before start: a SIGTERM right after
        loop.add_signal_handler(sig, stop.set)  # "listening" still stops gracefully
    await app.start()
    on_ready()
    await stop.wait()
    log.info("shutting down: health NOT_SERVING, draining in-flight calls")
    await app.stop()
    if tracer_provider is not None:
        await asyncio.to_thread(tracer_provider.shutdown)  # exports the spans still queued
    if metrics_endpoint is not None:
        metrics_endpoint.close()
    log.info("stopped")


def serve(settings: Settings) -> int:
    from payment_grpc.workers import Supervisor, WorkersConfigError, worker_count

    try:
        workers = worker_count(settings)
    except WorkersConfigError as exc:
        print(f"payment-grpc: {exc}", file=sys.stderr)
        return 2
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.database.migrate_on_start:
        migrate(settings)
    if workers == 1:
        run_server(settings.replace({"WORKERS": 1}))
        return 0
    return Supervisor(settings, workers).run()


def run_server(settings: Settings, on_ready: Callable[[], None] = lambda: None) -> None:
    """One server process until SIGTERM/SIGINT; `on_ready` once it serves."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(settings, on_ready))
    else:
        uvloop.run(_serve(settings, on_ready))


def migrate(settings: Settings) -> int:
    from payment_grpc.adapters.db.migrate import upgrade

    upgrade(settings.database.url)
    log.info("database migrated to head")
    return 0


def probe(settings: Settings) -> int:
    """Exit 0 when the local server reports SERVING (Docker HEALTHCHECK)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from payment_grpc.tls import probe_channel

    with probe_channel(settings) as channel:  # plaintext, or TLS like the server
        stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print("SERVING" if serving else "NOT_SERVING")
    return 0 if serving else 1


def token(settings: Settings, args: argparse.Namespace) -> int:
    """Print a token signed with this server's HS256 secret (embedded default)."""
    from payment_grpc.adapters.auth.tokens import mint_token
    from payment_grpc.bootstrap import jwt_secret

    secret = jwt_secret(settings)
    if secret is None:
        print("no HS256 secret configured (JWT_JWKS_FILE only)", file=sys.stderr)
        return 2
    print(
        mint_token(
            secret,
            subject=args.subject,
            scopes=args.scope or ["payments.read"],
            audience=settings.jwt.audience,
            issuer=settings.jwt.issuer,
            ttl_s=args.ttl,
            customer_id=args.customer,
        )
    )
    return 0


def rotate_keys(settings: Settings, args: argparse.Namespace) -> int:
    """Re-encrypt every value not under the newest key (first of ENCRYPTION_KEYS), in
    batches of --batch-size, each its own short transaction; safe while serving."""
    from payment_grpc.adapters.db.rotation import rotate_database
    from payment_grpc.bootstrap import build_cipher

    if args.batch_size < 1:
        print("--batch-size must be at least 1", file=sys.stderr)
        return 2
    cipher = build_cipher(settings)
    reports = asyncio.run(rotate_database(settings.database.url, cipher, args.batch_size))
    for report in reports:
        print(report.summary(cipher.current_kid))
        if report.unreadable:
            ids = ", ".join(sorted(report.unreadable)[:10])
            print(f"{report.table}: cannot decrypt (unknown key id?): {ids}", file=sys.stderr)
    return 0 if all(r.left == 0 and not r.unreadable for r in reports) else 1


def outbox(settings: Settings, args: argparse.Namespace) -> int:
    """`outbox list`: undelivered (or, with --all, every) outbox row, oldest first;
    `outbox retry [ID ...]`: give parked rows (these, or all) a fresh set of attempts."""
    return asyncio.run(_outbox(settings, args))


async def _outbox(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from payment_grpc.adapters.db.engine import make_engine
    from payment_grpc.adapters.db.outbox import DELIVERED, PARKED, PENDING, SqlOutboxStore

    engine = make_engine(settings.database.url, pool_size=1)
    store = SqlOutboxStore(engine)
    try:
        if args.outbox_command == "retry":
            count = await store.retry_parked(args.ids, datetime.now(UTC))
            print(f"{count} parked row(s) will be delivered again")
            return 0
        states = [PENDING, PARKED, DELIVERED] if args.all else [PENDING, PARKED]
        print("id\tsink\tdedupe_id\ttype\tstate\tattempts\tnext_attempt_at\tlast_error")
        for row in await store.list_rows(states, args.limit):
            print("\t".join("" if value is None else str(value) for value in row))
        return 0
    finally:
        await engine.dispose()


def _customer_id(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must name a customer (an empty id is refused)")
    return value


COMMANDS = {"serve": serve, "migrate": migrate, "probe": probe}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payment-grpc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        commands.add_parser(name)
    minting = commands.add_parser("token", help="mint a token with the local HS256 secret")
    minting.add_argument("--scope", action="append", help="repeatable, e.g. payments.charge")
    minting.add_argument(
        "--customer",
        type=_customer_id,
        help="make a customer token (read-only, own payments)",
    )
    minting.add_argument("--subject", default="cli")
    minting.add_argument("--ttl", type=int, default=3600, help="seconds")
    rotating = commands.add_parser(
        "rotate-keys", help="re-encrypt values written under an older ENCRYPTION_KEYS key"
    )
    rotating.add_argument("--batch-size", type=int, default=500, help="rows per transaction")
    gateway_sim.add_parser(commands)
    reconcile_cli.add_parser(commands)
    relay = commands.add_parser("outbox", help="events waiting for delivery, parked ones")
    relay_commands = relay.add_subparsers(dest="outbox_command", required=True)
    listing = relay_commands.add_parser("list", help="undelivered rows (pending and parked)")
    listing.add_argument("--all", action="store_true", help="delivered rows too")
    listing.add_argument("--limit", type=int, default=100)
    retrying = relay_commands.add_parser("retry", help="deliver parked rows again")
    retrying.add_argument("ids", type=int, nargs="*", help="row ids (none: every parked row)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings()
    configure_logging(settings.log.level, settings.log.format)
    if args.command == "token":
        return token(settings, args)
    if args.command == "gateway-sim":
        return gateway_sim.run(args)
    try:
        if args.command == "rotate-keys":
            return rotate_keys(settings, args)
        if args.command == "reconcile":
            return reconcile_cli.run(settings, args)
        if args.command == "outbox":
            return outbox(settings, args)
        return COMMANDS[args.command](settings)
    except KeyConfigError as exc:  # malformed ENCRYPTION_KEYS: refuse to start
        print(f"payment-grpc: invalid encryption keys: {exc}", file=sys.stderr)
        return 2
    except MetricsPortUnavailable as exc:
        print(f"payment-grpc: cannot serve metrics: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

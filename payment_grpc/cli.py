"""`payment-grpc serve | migrate | probe | token | rotate-keys | outbox`
(also `python -m payment_grpc`).

Settings come from environment variables (README "Settings"). Every error is one line on
stderr: exit 2 for a setting the process refuses (it names the variable), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import importlib.metadata
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from pydantic import ValidationError

from payment_grpc import gateway_sim, reconcile_cli
from payment_grpc.adapters.db.crypto import KeyConfigError
from payment_grpc.adapters.db.startup import DatabaseUnavailable, wait_for_database
from payment_grpc.config import Settings, UnsafeSetting, check_deployment, check_retired
from payment_grpc.logging_setup import configure_logging
from payment_grpc.telemetry.metrics import MetricsPortUnavailable
from payment_grpc.workers import WorkersConfigError

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
    freeze_startup_objects()
    on_ready()
    await stop.wait()
    log.info("shutting down: health NOT_SERVING, draining in-flight calls")
    await app.stop()
    if tracer_provider is not None:
        await asyncio.to_thread(tracer_provider.shutdown)  # exports the spans still queued
    if metrics_endpoint is not None:
        metrics_endpoint.close()
    log.info("stopped")


def serve(settings: Settings, args: argparse.Namespace) -> int:
    from payment_grpc.workers import Supervisor, worker_count

    workers = worker_count(settings)
    check_retired(os.environ)
    check_deployment(settings)
    _check_port_free(settings.server.host, settings.server.port)
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.database.migrate_on_start:
        migrate(settings, args)
    else:
        wait_for_database(settings.database.url, settings.database.wait_seconds)
    check_keys(settings)
    if workers == 1:
        run_server(settings.replace({"WORKERS": 1}))
        return 0
    return Supervisor(settings, workers).run()


def check_keys(settings: Settings) -> None:
    """Refuses to serve when the configured keys do not open the stored payments
    (adapters/db/key_check.py): every read would otherwise answer INTERNAL."""
    from payment_grpc.adapters.db.key_check import check_database_keys
    from payment_grpc.bootstrap import build_cipher, cipher_source

    cipher = build_cipher(settings)
    asyncio.run(check_database_keys(settings.database.url, cipher, cipher_source(settings)))


def tune_gc(settings: Settings) -> None:
    """Full (gen2) collections walk every tracked object and stop the event loop: with
    10,000 watch streams open, 0.5-13 s each, every few seconds while they opened. They
    now wait for GC_OLDEST_THRESHOLD middle-generation collections instead of 10."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, settings.server.gc_oldest_threshold)


def freeze_startup_objects() -> None:
    """Modules, settings and the application graph live as long as the process: out of
    every later collection (gc.freeze), after one collection so no startup garbage is
    kept for good."""
    gc.collect()
    gc.freeze()


def run_server(settings: Settings, on_ready: Callable[[], None] = lambda: None) -> None:
    """One server process until SIGTERM/SIGINT; `on_ready` once it serves."""
    tune_gc(settings)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(settings, on_ready))
    else:
        uvloop.run(_serve(settings, on_ready))


def _check_port_free(host: str, port: int) -> None:
    """Says "in use" in one line before grpc would log its own bind error."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UnsafeSetting(f"PORT: {host}:{port} is already in use") from None
            raise UnsafeSetting(f"HOST/PORT: cannot listen on {host}:{port}: {exc}") from None


def migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from payment_grpc.adapters.db.migrate import upgrade

    wait_for_database(settings.database.url, settings.database.wait_seconds)
    upgrade(settings.database.url)
    log.info("database migrated to head")
    return 0


def probe(settings: Settings, _args: argparse.Namespace | None = None) -> int:
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

    secret = _existing_jwt_secret(settings)
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


def _existing_jwt_secret(settings: Settings) -> str:
    """JWT_SECRET_KEY, or the secret the server generated into DATA_DIR. Never a new one:
    a token signed with a secret no server knows is useless (run from another directory,
    DATA_DIR would point elsewhere)."""
    if settings.jwt.secret_key is not None:
        return settings.jwt.secret_key.get_secret_value()
    if settings.jwt.jwks_file is not None:
        raise UnsafeSetting("JWT_SECRET_KEY: unset and JWT_JWKS_FILE is set: no HS256 secret")
    path = (settings.storage.data_dir / "jwt_secret").resolve()
    if not path.is_file():
        raise UnsafeSetting(
            f"DATA_DIR: no JWT secret at {path}: run where the server runs, or set DATA_DIR "
            "to the server's data directory, or JWT_SECRET_KEY"
        )
    return path.read_text().strip()


def _customer_id(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must name a customer (an empty id is refused)")
    return value


Command = Callable[[Settings, argparse.Namespace], int]
COMMANDS: dict[str, tuple[Command, str]] = {
    "serve": (serve, "run the gRPC server (migrates first unless MIGRATE_ON_START=false)"),
    "migrate": (migrate, "upgrade the database schema to the newest revision, then exit"),
    "probe": (probe, "exit 0 when the local server reports SERVING (Docker HEALTHCHECK)"),
    "token": (token, "print a token signed with the server's HS256 secret"),
    "rotate-keys": (rotate_keys, "re-encrypt values written under an older ENCRYPTION_KEYS key"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payment-grpc", description=__doc__)
    version = importlib.metadata.version("payment-grpc")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = {
        name: commands.add_parser(name, help=about, description=about)
        for name, (_, about) in COMMANDS.items()
    }
    minting = sub["token"]
    minting.add_argument("--scope", action="append", help="repeatable, e.g. payments.charge")
    minting.add_argument(
        "--customer",
        type=_customer_id,
        help="make a customer token (read-only, own payments)",
    )
    minting.add_argument("--subject", default="cli", help="the token's `sub` (default: cli)")
    minting.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (3600)")
    sub["rotate-keys"].add_argument(
        "--batch-size", type=int, default=500, help="rows per transaction"
    )
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


def _refuse(message: str, code: int = 2) -> int:
    print(f"payment-grpc: {message}", file=sys.stderr)
    return code


def _invalid_setting(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ": ".join(str(part) for part in first["loc"])
    return f"invalid setting {where}: {first['msg']}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        return _refuse(_invalid_setting(error))
    configure_logging(settings.log.level, settings.log.format)
    if args.command == "gateway-sim":
        return gateway_sim.run(args)
    try:
        if args.command == "reconcile":
            return reconcile_cli.run(settings, args)
        if args.command == "outbox":
            return outbox(settings, args)
        command, _ = COMMANDS[args.command]
        return command(settings, args)
    except KeyConfigError as exc:  # malformed ENCRYPTION_KEYS: refuse to start
        return _refuse(f"invalid encryption keys: {exc}")
    except MetricsPortUnavailable as exc:
        return _refuse(f"cannot serve metrics: {exc}")
    except (UnsafeSetting, DatabaseUnavailable, WorkersConfigError) as exc:
        return _refuse(str(exc))
    except Exception as exc:  # one line, never a traceback wall; LOG_LEVEL=DEBUG has it
        log.debug("%s failed", args.command, exc_info=True)
        first_line = (str(exc).splitlines() or [""])[0]
        return _refuse(f"{args.command} failed: {type(exc).__name__}: {first_line}", 1)


if __name__ == "__main__":
    sys.exit(main())

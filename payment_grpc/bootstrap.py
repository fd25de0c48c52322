"""The only composition root: Settings -> adapters -> use cases -> server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy.ext.asyncio import AsyncEngine

from payment_grpc.adapters.auth.jwt_verifier import JwtVerifier
from payment_grpc.adapters.auth.keys import JwksFileKeys, PublicKeys, RemoteKeys
from payment_grpc.adapters.auth.secrets import load_or_create_secret
from payment_grpc.adapters.auth.verified_cache import CachedVerifier
from payment_grpc.adapters.broker.nats_sink import NatsEventSink
from payment_grpc.adapters.broker.saga_consumer import SagaConsumer, SagaConsumerConfig
from payment_grpc.adapters.bus.memory import InProcessStatusBus
from payment_grpc.adapters.bus.postgres import PostgresStatusBus
from payment_grpc.adapters.clients.auth_client import AuthServiceClient, AuthServiceVerifier
from payment_grpc.adapters.clients.order_client import OrderNotificationSink, OrderServiceClient
from payment_grpc.adapters.clock import SystemClock
from payment_grpc.adapters.db.crypto import FieldCipher, generated_key
from payment_grpc.adapters.db.engine import SqlUnitOfWorkFactory, Timeouts, make_engine
from payment_grpc.adapters.db.event_log import EventLog
from payment_grpc.adapters.db.feed import SqlPaymentFeed
from payment_grpc.adapters.db.health import DatabaseProbe
from payment_grpc.adapters.db.outbox import OutboxWriter, SqlOutboxStore
from payment_grpc.adapters.faults import KillAtFaultPoint, NoFaults
from payment_grpc.adapters.gateways.guarded import GuardedGateway
from payment_grpc.adapters.gateways.instrumented import InstrumentedGateway
from payment_grpc.adapters.gateways.simulated import (
    SimulatedGateway,
    SimulatedGatewayConfig,
)
from payment_grpc.adapters.gateways.stripe.client import StripeConfig, StripeGateway
from payment_grpc.adapters.gateways.stripe.webhook import StripeWebhookListener
from payment_grpc.adapters.resilience import CallPolicy
from payment_grpc.api.admin_servicer import AdminServicer
from payment_grpc.api.events import encode_event, encode_refusal
from payment_grpc.api.interceptors.auth import AuthInterceptor
from payment_grpc.api.interceptors.guard import GuardInterceptor
from payment_grpc.api.interceptors.idempotency import IdempotencyInterceptor
from payment_grpc.api.interceptors.json_fields import JsonFieldsInterceptor
from payment_grpc.api.interceptors.observability import InFlight, ObservabilityInterceptor
from payment_grpc.api.interceptors.rate_limit import RateLimitInterceptor, TokenBuckets
from payment_grpc.api.interceptors.request_context import RequestContextInterceptor
from payment_grpc.api.interceptors.stream_limit import StreamLimitInterceptor
from payment_grpc.api.interceptors.wrapping import ServerInterceptor
from payment_grpc.api.responses import encode_answer, refusal_answer
from payment_grpc.api.saga import InventoryReservedHandler
from payment_grpc.api.saga import classify as classify_refusal
from payment_grpc.api.server import PaymentServer
from payment_grpc.api.servicer import PaymentServicer
from payment_grpc.api.streams import StreamDrain
from payment_grpc.config import Settings, UnsafeSetting
from payment_grpc.service.admin import Admin
from payment_grpc.service.charging import Charging
from payment_grpc.service.deps import Deps, Records
from payment_grpc.service.feed import ChangeFeed
from payment_grpc.service.final_answers import FinalAnswers
from payment_grpc.service.gateway_events import GatewayEvents
from payment_grpc.service.idempotency import IdempotencyKeys, IdempotencyPolicy
from payment_grpc.service.operations import Operations
from payment_grpc.service.outbox import Relay, RelayPolicy
from payment_grpc.service.ports import (
    Clock,
    EventSink,
    GatewayNews,
    Lifecycle,
    Operation,
    PaymentGateway,
    StatusBus,
    TokenVerifier,
)
from payment_grpc.service.queries import Queries
from payment_grpc.service.recovery import Recovery
from payment_grpc.service.saga import CheckoutSaga
from payment_grpc.service.settlements import Settlements
from payment_grpc.tasks import stop_task
from payment_grpc.telemetry.client import tracing_interceptors
from payment_grpc.telemetry.metrics import record_outbox, watch_pool
from payment_grpc.telemetry.tracing import trace_database
from payment_grpc.tls import client_channel, server_credentials

log = logging.getLogger(__name__)


class GatewayAdapter(PaymentGateway, Lifecycle, Protocol):
    """A gateway adapter as the composition root holds it: the port plus its lifecycle."""


class BusAdapter(StatusBus, Lifecycle, Protocol):
    """A status bus adapter as the composition root holds it."""


@dataclass
class Application:
    settings: Settings
    engine: AsyncEngine
    gateway: GatewayAdapter
    bus: BusAdapter
    keys: IdempotencyKeys
    server: PaymentServer
    recovery: Recovery
    auth_client: AuthServiceClient | None = None
    webhooks: StripeWebhookListener | None = None
    probe: DatabaseProbe | None = None
    order_client: OrderServiceClient | None = None
    relay: Relay | None = None
    saga: SagaConsumer | None = None
    servicer: PaymentServicer | None = None
    lease_engine: AsyncEngine | None = None  # idempotency lease renewals' own connection
    port: int = 0
    _recovery_task: asyncio.Task[None] | None = None
    _relay_task: asyncio.Task[None] | None = None
    _lease_task: asyncio.Task[None] | None = None

    def _adapters(self) -> list[Lifecycle]:
        """Started in this order before serving, closed in the reverse after."""
        return [self.bus, self.gateway]

    async def start(self) -> None:
        released = await self.keys.release_own_locks()
        if released:
            log.warning("released %d idempotency keys held by this replica before", released)
        for adapter in self._adapters():
            await adapter.start()
        self._lease_task = asyncio.create_task(self.keys.renew_forever())
        await self.server.start()
        if self.webhooks is not None:
            await self.webhooks.start(
                self.settings.server.host,
                self.settings.stripe.webhook_port,
                reuse_port=self.settings.server.workers != 1,  # as the gRPC port
            )
        self._recovery_task = asyncio.create_task(
            self.recovery.run_forever(self.settings.recovery.interval_seconds)
        )
        if self.relay is not None:
            await self.relay.start_sinks()
            self._relay_task = asyncio.create_task(self.relay.run_forever())
        if self.saga is not None:
            await self.saga.start()
        log.info(
            "payment-grpc listening",
            extra={"port": self.port, "instance_id": self.settings.server.instance_id},
        )

    async def stop(self) -> None:
        if self.saga is not None:
            await self.saga.close()  # unsettled messages are delivered again
        if self.webhooks is not None:
            await self.webhooks.stop()
        await self.server.stop(
            self.settings.server.shutdown_grace_seconds,
            self.settings.server.shutdown_drain_seconds,
        )
        await self._release_keys()
        await stop_task(self._recovery_task)
        await stop_task(self._relay_task)
        if self.relay is not None:
            await self.relay.close_sinks()
        for adapter in reversed(self._adapters()):
            await adapter.close()
        if self.auth_client is not None:
            await self.auth_client.close()
        if self.order_client is not None:
            await self.order_client.close()
        await self.engine.dispose()
        if self.lease_engine is not None:
            await self.lease_engine.dispose()
        if self.probe is not None:
            await self.probe.close()

    async def _release_keys(self) -> None:
        """No call runs any more: the keys the cut ones held are free for any replica at
        once (each resumes from its recovery point), instead of after their lease."""
        wait_s = self.settings.database.lock_timeout_seconds + 1  # a release's longest wait
        with contextlib.suppress(TimeoutError):  # cut calls run their clean-up first
            async with asyncio.timeout(wait_s):
                await self.server.metrics.idle()
        await self.keys.settle(wait_s)
        await stop_task(self._lease_task)
        try:
            released = await self.keys.release_own_locks()
        except Exception as error:  # their leases run out instead
            log.warning("could not release idempotency keys at shutdown: %s", error)
            return
        if released:
            log.info("released %d idempotency keys held by calls cut at shutdown", released)


def build_gateway(settings: Settings, news: GatewayNews) -> GatewayAdapter:
    if settings.gateway.kind == "stripe":
        policy = CallPolicy(
            timeout_s=None,  # the Stripe client's own (STRIPE_TIMEOUT_SECONDS)
            attempts=settings.gateway.retry_attempts,
            breaker_threshold=settings.gateway.breaker_failures,
            breaker_reset_s=settings.gateway.breaker_open_seconds,
        )
        return GuardedGateway(build_stripe_gateway(settings), policy)
    ledger = settings.ledger_path()
    ledger.parent.mkdir(parents=True, exist_ok=True)
    config = SimulatedGatewayConfig.from_knobs(str(ledger), settings.gateway)
    return SimulatedGateway(config, news)


def build_stripe_gateway(settings: Settings) -> StripeGateway:
    stripe = settings.stripe
    assert stripe.api_key is not None  # Settings refuses GATEWAY=stripe without it
    return StripeGateway(
        StripeConfig(
            api_key=stripe.api_key.get_secret_value(),
            api_base=stripe.api_base,
            timeout_s=stripe.timeout_seconds,
            connect_timeout_s=stripe.connect_timeout_seconds,
        )
    )


def build_webhooks(
    settings: Settings, gateway: GatewayAdapter, events: GatewayEvents
) -> StripeWebhookListener | None:
    if not isinstance(gateway, GuardedGateway) or settings.stripe.webhook_secret is None:
        return None
    secret = settings.stripe.webhook_secret.get_secret_value()
    return StripeWebhookListener(secret, events.receive, gateway.inner.payment_of_intent)


def jwt_secret(settings: Settings) -> str | None:
    """The HS256 secret: configured, or generated once into DATA_DIR (embedded default)."""
    if settings.jwt.secret_key is not None:
        return settings.jwt.secret_key.get_secret_value()
    if settings.jwt.jwks_file is not None:
        return None  # public keys only
    return load_or_create_secret(settings.storage.data_dir / "jwt_secret")


def build_auth_client(settings: Settings) -> AuthServiceClient | None:
    auth = settings.auth_service
    if not auth.addr:
        return None
    return AuthServiceClient(auth.addr, timeout_s=auth.timeout_seconds)


def build_order_client(settings: Settings) -> OrderServiceClient | None:
    orders = settings.orders
    if not orders.addr:
        return None
    channel = client_channel(
        orders.addr,
        ca_file=orders.tls_ca_file,
        cert_file=orders.tls_cert_file,
        key_file=orders.tls_key_file,
        server_name=orders.tls_server_name,
        interceptors=tracing_interceptors(),  # a client span, the traceparent sent
    )
    policy = CallPolicy(
        timeout_s=orders.timeout_seconds,
        attempts=orders.attempts,
        breaker_threshold=orders.breaker_threshold,
        breaker_reset_s=orders.breaker_reset_seconds,
    )
    return OrderServiceClient(channel, policy)


def build_sinks(settings: Settings, orders: OrderServiceClient | None) -> list[EventSink]:
    sinks: list[EventSink] = []
    if orders is not None:
        sinks.append(OrderNotificationSink(orders))
    events = settings.events
    if events.nats_url:
        sinks.append(
            NatsEventSink(
                events.nats_url, stream=events.nats_stream, prefix=events.nats_subject_prefix
            )
        )
    return sinks


def build_saga(
    settings: Settings, charging: Charging, keys: IdempotencyKeys, clock: Clock
) -> SagaConsumer | None:
    """SAGA_CONSUME=true: the checkout saga's consumer (Settings requires NATS_URL)."""
    events = settings.events
    if not events.saga_consume or not events.nats_url:
        return None
    saga = CheckoutSaga(
        charging,
        keys,
        lambda payment: encode_answer(Operation.CHARGE, payment),
        refusal_answer,
        classify_refusal,
        clock,
    )
    config = SagaConsumerConfig(
        url=events.nats_url,
        stream=events.saga_stream,
        subject=events.saga_subject,
        durable=events.saga_durable,
        ack_wait_s=events.saga_ack_wait_seconds,
        retry_delay_s=events.saga_retry_delay_seconds,
    )
    return SagaConsumer(config, InventoryReservedHandler(saga))


def observe_outbox(sink: str, lag_seconds: float, parked: int) -> None:
    record_outbox(sink, lag_seconds=lag_seconds, parked=parked)


def build_relay(
    settings: Settings, engine: AsyncEngine, sinks: list[EventSink]
) -> tuple[Relay, OutboxWriter] | None:
    """The outbox relay and the writer of its rows; None when no sink is configured."""
    if not sinks:
        return None
    events = settings.events
    policy = RelayPolicy(
        batch_size=events.outbox_batch_size,
        lease=timedelta(seconds=events.outbox_lease_seconds),
        poll=timedelta(seconds=events.outbox_poll_seconds),
        backoff_initial=timedelta(seconds=events.outbox_backoff_initial_seconds),
        backoff_max=timedelta(seconds=events.outbox_backoff_max_seconds),
        max_attempts=events.outbox_max_attempts,
    )
    relay = Relay(
        SqlOutboxStore(engine),
        sinks,
        SystemClock(),
        policy,
        settings.server.instance_id,
        observe=observe_outbox,  # payments.outbox.lag / .parked
    )
    writer = OutboxWriter([(s.name, s.wants) for s in sinks], relay.wake)
    return relay, writer


def build_verifier(settings: Settings, client: AuthServiceClient | None) -> TokenVerifier:
    local = CachedVerifier(
        JwtVerifier(
            algorithms=settings.jwt.algorithms,
            audience=settings.jwt.audience,
            issuer=settings.jwt.issuer,
            secret=jwt_secret(settings),
            public_keys=public_keys(settings, client),
            leeway_s=settings.jwt.leeway_seconds,
        ),
        SystemClock(),
    )
    if client is None:
        return local
    return AuthServiceVerifier(
        client,
        audience=settings.jwt.audience,
        local=local,
        cache_ttl=timedelta(seconds=settings.auth_service.cache_ttl_seconds),
        clock=SystemClock(),
    )


def public_keys(settings: Settings, auth: AuthServiceClient | None) -> PublicKeys | None:
    """RS256/ES256 keys: the JWKS file if configured, else the auth service's, else none."""
    if settings.jwt.jwks_file is not None:
        return JwksFileKeys(settings.jwt.jwks_file)
    if auth is None:
        return None
    return RemoteKeys(
        auth,
        clock=SystemClock(),
        refresh_interval=timedelta(seconds=settings.auth_service.keys_refresh_seconds),
        max_age=timedelta(seconds=settings.auth_service.keys_max_age_seconds),
    )


def rate_limit(settings: Settings) -> list[RateLimitInterceptor]:
    limit = settings.rate_limit
    if not limit.per_second:
        return []
    buckets = TokenBuckets(limit.per_second, limit.burst)
    return [RateLimitInterceptor(buckets)]


def interceptors(
    settings: Settings,
    verifier: TokenVerifier,
    keys: IdempotencyKeys,
    calls: InFlight,
    streams: StreamDrain,
) -> list[ServerInterceptor]:
    """Every call passes these in this order (the first sees it first) before the
    servicer. Health and reflection pass only observability and the request context."""
    return [
        ObservabilityInterceptor(calls),  # span, metrics, log line: every outcome below
        RequestContextInterceptor(),  # the use cases' RequestContext, the incoming deadline
        StreamLimitInterceptor(settings.server.max_streams),  # before any work
        streams,  # ends open streams at shutdown
        AuthInterceptor(verifier),  # names the caller (the context's subject, scopes)
        *rate_limit(settings),  # per caller, so after auth
        JsonFieldsInterceptor(),  # unknown JSON fields from the HTTP edge
        GuardInterceptor(),  # validation; every failure below -> its gRPC status
        IdempotencyInterceptor(keys),  # next to the handler: stores what it answers
    ]


def build_cipher(settings: Settings) -> FieldCipher:
    """Column encryption at rest: ENCRYPTION_KEYS (newest first), or one key generated once
    into DATA_DIR (embedded default, kid `local`). Raises KeyConfigError when malformed."""
    if settings.storage.encryption_keys is not None:
        return FieldCipher.from_spec(settings.storage.encryption_keys.get_secret_value())
    path = generated_key_file(settings)
    if not settings.database.is_sqlite:
        log.warning("ENCRYPTION_KEYS unset: every replica must share %s", path)
    return FieldCipher([generated_key(load_or_create_secret(path), source=str(path))])


def generated_key_file(settings: Settings) -> pathlib.Path:
    return settings.storage.data_dir / "encryption_key"


def cipher_source(settings: Settings) -> str:
    """Where the keys come from, for messages: the setting, or the generated key's file."""
    if settings.storage.encryption_keys is not None:
        return "ENCRYPTION_KEYS"
    return f"the generated key {generated_key_file(settings)}"


def build_bus(settings: Settings) -> BusAdapter:
    """LISTEN/NOTIFY reaches watchers on every replica; SQLite has only this process."""
    if settings.database.is_sqlite:
        return InProcessStatusBus()
    return PostgresStatusBus(settings.database.url)


def idempotency_policy(settings: Settings) -> IdempotencyPolicy:
    return IdempotencyPolicy(
        owner=settings.server.instance_id,
        retention=timedelta(hours=settings.idempotency.retention_hours),
        lock_timeout=timedelta(seconds=settings.idempotency.lease_seconds),
    )


def db_timeouts(settings: Settings) -> Timeouts:
    database = settings.database
    return Timeouts(
        lock=database.lock_timeout_seconds,
        statement=database.statement_timeout_seconds,
        pool=database.pool_timeout_seconds,
    )


def gateway_ready(gateway: GatewayAdapter) -> Callable[[], Awaitable[bool]]:
    """Readiness of payments.v1.PaymentService: NOT_SERVING while the gateway breaker is
    open (liveness is not affected: an outage at the PSP must not restart pods)."""

    async def ready() -> bool:
        return gateway.available()

    return ready


def sync_after(settings: Settings) -> float:
    """PROCESSING this long is looked up at the gateway (GATEWAY_SYNC_AFTER_SECONDS, else
    RECOVERY_STALE_SECONDS)."""
    recovery = settings.recovery
    return (
        recovery.stale_seconds
        if recovery.sync_after_seconds is None
        else recovery.sync_after_seconds
    )


def build_application(settings: Settings, clock: Clock | None = None) -> Application:
    """`clock`: the time every part of the application reads (a test's; else the system's)."""
    engine = make_engine(settings.database.url, settings.database.pool_size, db_timeouts(settings))
    watch_pool("payments", engine)
    tracer_provider = trace.get_tracer_provider()
    traced = False  # a span per SQL statement
    if isinstance(tracer_provider, TracerProvider):  # installed by `serve` when exporting
        trace_database(engine, tracer_provider)
        traced = True
    bus = build_bus(settings)
    order_client = build_order_client(settings)
    outbox = build_relay(settings, engine, build_sinks(settings, order_client))
    relay, writer = outbox if outbox is not None else (None, None)
    event_log = EventLog(encode_event, writer, encode_refusal)
    cipher = build_cipher(settings)
    uow = SqlUnitOfWorkFactory(engine, cipher, bus, event_log, statement_spans=traced)
    # Lease renewals on a connection of their own: never queued behind calls for the pool.
    lease_engine = make_engine(settings.database.url, 1, db_timeouts(settings))
    fault_point = settings.recovery.fault_point
    faults = KillAtFaultPoint(fault_point) if fault_point else NoFaults()
    clock = clock or SystemClock()
    records = Records(uow=uow, bus=bus, clock=clock, faults=faults)
    settlements = Settlements(records)  # the inbound port, given to the gateway adapter
    gateway = build_gateway(settings, settlements)
    deps = Deps(uow=uow, bus=bus, clock=clock, faults=faults, gateway=InstrumentedGateway(gateway))
    keys = IdempotencyKeys(
        uow,
        clock,
        idempotency_policy(settings),
        SqlUnitOfWorkFactory(lease_engine, cipher),
        FinalAnswers(settings.idempotency.cached_answers),
    )
    charging = Charging(deps, settlements, order_client)
    operations = Operations(deps)
    recovery = Recovery(
        deps,
        charging,
        settlements,
        operations,
        keys,
        timedelta(seconds=sync_after(settings)),
        encode_answer,
        refusal_answer,
        authorization_hold=timedelta(hours=settings.recovery.authorization_hold_hours),
    )

    probe = DatabaseProbe(settings.database.url)  # its own connection, never the pool's

    auth_client = build_auth_client(settings)
    limits = settings.server
    servicer = PaymentServicer(
        charging,
        operations,
        Queries(deps),
        max_message_bytes=limits.max_message_bytes,
        feed=ChangeFeed(SqlPaymentFeed(engine), bus),
        send_timeout_s=settings.events.watch_send_timeout_seconds,
        heartbeat_s=limits.watch_heartbeat_seconds,
    )
    calls, streams = InFlight(), StreamDrain()
    server = PaymentServer(
        servicer,
        admin_servicer=AdminServicer(Admin(deps)),
        dependencies_healthy=probe.reachable,
        health_interval_s=limits.health_check_interval_seconds,
        max_message_bytes=limits.max_message_bytes,
        max_metadata_bytes=limits.max_metadata_bytes,
        max_streams=limits.max_streams,
        interceptors=interceptors(
            settings, build_verifier(settings, auth_client), keys, calls, streams
        ),
        calls=calls,
        streams=streams,
        reuse_port=settings.server.workers
        != 1,  # a worker of a supervisor (payment_grpc/workers.py)
    )
    app = Application(
        settings,
        engine,
        gateway,
        bus,
        keys,
        server,
        recovery,
        auth_client,
        order_client=order_client,
        relay=relay,
        saga=build_saga(settings, charging, keys, clock),
        servicer=servicer,
        probe=probe,
        lease_engine=lease_engine,
    )
    server.add_readiness_check(gateway_ready(gateway))
    app.webhooks = build_webhooks(settings, gateway, GatewayEvents(records, settlements))
    address = f"{settings.server.host}:{settings.server.port}"
    try:
        app.port = server.bind(address, server_credentials(settings))
    except RuntimeError:  # grpc says only "Failed to bind"
        raise UnsafeSetting(f"PORT: cannot listen on {address} (in use?)") from None
    return app

"""Settings: every knob is an environment variable (documented in the README).

The settings are grouped by concern (`settings.database.url`, `settings.jwt.algorithms`,
...), but the environment stays flat: each field names its variable in `validation_alias`
(`DATABASE_URL`, `JWT_ALGORITHMS`), read case-insensitively. Every group is a
`BaseSettings` of its own that reads just its variables, so values are parsed and checked
when the settings load, and an error names the variable.

To add a setting: a field in the group it belongs to (or a new group, listed in
`Settings`), `validation_alias` = its environment variable, a docstring under it, and a
row in the README's settings table.
"""

from __future__ import annotations

import os
import pathlib
import socket
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from payment_grpc.adapters.gateways.failure_mix import FailureMix

# The drivers this service runs on, by the bare scheme an operator may write instead.
DATABASE_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
}
# Every JWT algorithm the verifier knows; `none` is never among them.
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})  # the others take public keys
JWT_ALGORITHMS = HMAC_ALGORITHMS | {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512"}


class _Group(BaseSettings):
    """One group of settings, read from its own flat environment variables."""

    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="forbid",
        frozen=True,
        validate_by_name=True,  # Group(url=...) as well as Group(DATABASE_URL=...)
        use_attribute_docstrings=True,
    )


class ServerSettings(_Group):
    host: str = Field("0.0.0.0", validation_alias="HOST")  # noqa: S104 - k8s probes the pod IP
    """Listen address; Kubernetes gRPC probes need the pod IP, so not 127.0.0.1 there."""
    port: int = Field(8009, ge=0, le=65535, validation_alias="PORT")
    """gRPC port; 0 picks a free one (logged)."""
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(1, validation_alias="WORKERS")
    """Server processes on PORT (SO_REUSEPORT), worker i with INSTANCE_ID "<INSTANCE_ID>-w<i>";
    "auto" (the production profiles): one per available core on PostgreSQL, 1 on SQLite."""
    max_message_bytes: int = Field(1024 * 1024, ge=1024, validation_alias="MAX_MESSAGE_BYTES")
    """Largest request and response; list pages stop short of it."""
    max_streams: int = Field(10_000, ge=1, validation_alias="MAX_STREAMS")
    """Open server streams (WatchPaymentStatus) per process; one more is answered
    RESOURCE_EXHAUSTED with RetryInfo. gRPC core's queue of calls not yet accepted is sized
    from it (api/server.py)."""
    max_metadata_bytes: int = Field(128 * 1024, ge=8 * 1024, validation_alias="MAX_METADATA_BYTES")
    """Largest request metadata. Large enough that a hostile 100 KB token reaches auth and
    gets UNAUTHENTICATED; anything larger is RESOURCE_EXHAUSTED before any handler runs."""
    shutdown_grace_seconds: float = Field(10.0, ge=0, validation_alias="SHUTDOWN_GRACE_SECONDS")
    """On SIGTERM, how long in-flight calls may finish."""
    shutdown_drain_seconds: float = Field(0.0, ge=0, validation_alias="SHUTDOWN_DRAIN_SECONDS")
    """On SIGTERM, how long readiness is NOT_SERVING while the port still accepts calls (so
    Kubernetes endpoints and Envoy's health checks move traffic away) before it stops."""
    watch_heartbeat_seconds: float = Field(15.0, ge=0, validation_alias="WATCH_HEARTBEAT_SECONDS")
    """A watch stream quiet this long gets a heartbeat message (no event); 0: none."""
    gc_oldest_threshold: int = Field(100, ge=1, le=100_000, validation_alias="GC_OLDEST_THRESHOLD")
    """Python's garbage collector: a full collection only after this many collections
    of the middle generation (Python's default: 10). A full collection walks every
    tracked object and stops the process meanwhile (0.5-2 s with 10,000 watch streams
    open); the young generations stay small and cheap (bench/README, issue 12)."""
    health_check_interval_seconds: float = Field(
        2.0, gt=0, validation_alias="HEALTH_CHECK_INTERVAL_SECONDS"
    )
    """How often the database is probed for the gRPC health service."""
    instance_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}",
        min_length=1,
        validation_alias="INSTANCE_ID",
    )
    """Identity of this replica for idempotency-key locks: unique per live process and stable
    across its restarts (the pod name in Kubernetes)."""


class LogSettings(_Group):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", validation_alias="LOG_LEVEL"
    )
    """Root log level; DEBUG also logs every RPC start and health checks."""
    format: Literal["auto", "json", "text"] = Field("auto", validation_alias="LOG_FORMAT")
    """`auto`: JSON when stderr is not a terminal (containers, pipes), text on a terminal;
    `json` (one JSON object per line) or `text` force one."""

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def _driver_url(value: object) -> object:
    """`postgres://` and `postgresql://` mean psycopg, `sqlite://` aiosqlite; a URL naming
    another driver is refused."""
    if not isinstance(value, str):
        return value
    try:
        url = make_url(value)
    except ArgumentError as exc:
        raise ValueError(f"not a database URL: {exc}") from None
    driver = DATABASE_DRIVERS.get(url.drivername, url.drivername)
    if driver not in DATABASE_DRIVERS.values():
        known = ", ".join(sorted(DATABASE_DRIVERS))
        raise ValueError(f"unsupported database {url.drivername!r} (use one of: {known})")
    return url.set(drivername=driver).render_as_string(hide_password=False)


class TelemetrySettings(_Group):
    metrics_port: int | None = Field(None, ge=0, le=65535, validation_alias="METRICS_PORT")
    """Prometheus `/metrics` on HOST:METRICS_PORT (with WORKERS > 1, worker i on
    METRICS_PORT + i); unset: no metrics are collected. Traces are configured by the
    standard OTEL_* variables (exported only when OTEL_EXPORTER_OTLP_ENDPOINT is set)."""


class DatabaseSettings(_Group):
    url: Annotated[str, BeforeValidator(_driver_url)] = Field(
        "sqlite+aiosqlite:///./payments.db", validation_alias="DATABASE_URL"
    )
    """SQLite (embedded) or PostgreSQL; `postgres://` and `postgresql://` mean psycopg."""
    pool_size: int = Field(10, ge=1, validation_alias="DB_POOL_SIZE")
    """PostgreSQL connection pool size (and as much overflow)."""
    migrate_on_start: bool = Field(True, validation_alias="MIGRATE_ON_START")
    """Run Alembic to head before serving."""
    lock_timeout_seconds: float = Field(2.0, gt=0, validation_alias="DB_LOCK_TIMEOUT_SECONDS")
    """Longest a transaction waits for a lock (PostgreSQL lock_timeout; the SQLite writer
    lock): past it the call answers UNAVAILABLE with RetryInfo and frees its connection,
    so one slow row cannot hold the whole pool."""
    statement_timeout_seconds: float = Field(
        30.0, gt=0, validation_alias="DB_STATEMENT_TIMEOUT_SECONDS"
    )
    """PostgreSQL statement_timeout, and idle_in_transaction_session_timeout (the change feed
    waits for open writing transactions: none of ours stays open idle longer)."""
    pool_timeout_seconds: float = Field(5.0, gt=0, validation_alias="DB_POOL_TIMEOUT_SECONDS")
    """Longest a call waits for a free pooled connection; past it UNAVAILABLE + RetryInfo."""
    wait_seconds: float = Field(30.0, ge=0, validation_alias="DATABASE_WAIT_SECONDS")
    """At start, how long to wait for an unreachable PostgreSQL (one log line per attempt)
    before giving up with one line; 0: try once."""

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


class StorageSettings(_Group):
    data_dir: pathlib.Path = Field(pathlib.Path(".data"), validation_alias="DATA_DIR")
    """Local state: generated JWT secret and encryption key, the simulated gateway ledger."""
    encryption_keys: SecretStr | None = Field(None, validation_alias="ENCRYPTION_KEYS")
    """Column encryption at rest: "kid:base64key,kid:base64key" (32-byte AES-256 keys), newest
    first: the first encrypts, all decrypt. Unset: one key generated into DATA_DIR."""


class IdempotencySettings(_Group):
    retention_hours: float = Field(72.0, gt=0, validation_alias="IDEMPOTENCY_RETENTION_HOURS")
    """How long a key and its stored answer are kept."""
    lease_seconds: float = Field(10.0, gt=0, validation_alias="IDEMPOTENCY_LEASE_SECONDS")
    """A replica renews the keys it works on every third of this; a key not renewed for
    this long (its replica died or stalled) may be taken over by another replica."""
    cached_answers: int = Field(10_000, ge=0, validation_alias="IDEMPOTENCY_CACHED_ANSWERS")
    """Final answers of keys kept in this process (least recently used out first): their
    replays make no database round trip."""


class RecoverySettings(_Group):
    interval_seconds: float = Field(5.0, gt=0, validation_alias="RECOVERY_INTERVAL_SECONDS")
    """Period of the recovery worker."""
    stale_seconds: float = Field(30.0, ge=0, validation_alias="RECOVERY_STALE_SECONDS")
    """Unfinished work older than this is finished by the recovery worker."""
    sync_after_seconds: float | None = Field(
        None, ge=0, validation_alias="GATEWAY_SYNC_AFTER_SECONDS"
    )
    """PROCESSING payments older than this are looked up at the gateway and finished (the
    sync that replaces waiting for a lost webhook); unset: RECOVERY_STALE_SECONDS."""
    authorization_hold_hours: float = Field(
        168.0, gt=0, validation_alias="AUTHORIZATION_HOLD_HOURS"
    )
    """AUTHORIZED longer than this is voided at the gateway and CANCELED (reason EXPIRED)."""
    fault_point: str = Field("", validation_alias="FAULT_POINT")
    """Crash tests only: SIGKILL at this phase boundary (e.g. `charge.after_gateway`)."""


class RateLimitSettings(_Group):
    per_second: float = Field(200.0, ge=0, validation_alias="RATE_LIMIT_PER_SECOND")
    """Calls per second per caller (JWT subject); 0 turns the limit off."""
    burst: int = Field(400, ge=1, validation_alias="RATE_LIMIT_BURST")
    """Calls a caller may make at once before the rate applies."""


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class JwtSettings(_Group):
    secret_key: SecretStr | None = Field(None, validation_alias="JWT_SECRET_KEY")
    """HS256 secret; unset: generated once into DATA_DIR/jwt_secret."""
    algorithms: Annotated[list[str], NoDecode, BeforeValidator(_comma_list)] = Field(
        ["HS256"], min_length=1, validation_alias="JWT_ALGORITHMS"
    )
    """Comma-separated allow-list, e.g. "RS256,ES256"; `none` is never accepted."""
    jwks_file: pathlib.Path | None = Field(None, validation_alias="JWT_JWKS_FILE")
    """Public keys (JWKS) for RS256/ES256, by kid."""
    audience: str = Field("payment-service", validation_alias="JWT_AUDIENCE")
    """Required `aud` claim."""
    issuer: str = Field("payment-grpc", validation_alias="JWT_ISSUER")
    """Required `iss` claim."""
    leeway_seconds: float = Field(30.0, ge=0, le=300, validation_alias="JWT_LEEWAY_SECONDS")
    """Clock skew allowed on `exp`, `nbf`, `iat`."""

    @field_validator("algorithms")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in JWT_ALGORITHMS]
        if unknown:
            known = ",".join(sorted(JWT_ALGORITHMS))
            raise ValueError(f"unsupported algorithm {unknown[0]!r} (known: {known})")
        return names


class AuthServiceSettings(_Group):
    addr: str | None = Field(None, validation_alias="AUTH_SERVICE_ADDR")
    """host:port of auth.v1.AuthService (introspection, and RS256/ES256 keys)."""
    cache_ttl_seconds: float = Field(60.0, ge=0, validation_alias="AUTH_CACHE_TTL_SECONDS")
    """An introspection answer is kept until min(token exp, this)."""
    timeout_seconds: float = Field(1.0, gt=0, validation_alias="AUTH_TIMEOUT_SECONDS")
    """Deadline of each auth-service call."""
    keys_max_age_seconds: float = Field(300.0, gt=0, validation_alias="AUTH_KEYS_MAX_AGE_SECONDS")
    """Keys from the auth service (when JWT_JWKS_FILE is unset) are kept at most this long."""
    keys_refresh_seconds: float = Field(10.0, ge=0, validation_alias="AUTH_KEYS_REFRESH_SECONDS")
    """An unknown kid refetches the keys at most once per this interval."""


class TlsSettings(_Group):
    """TLS (payment_grpc/tls.py): cert + key make the port TLS-only; a client CA makes it mTLS."""

    cert_file: pathlib.Path | None = Field(None, validation_alias="TLS_CERT_FILE")
    """PEM chain, server certificate first."""
    key_file: pathlib.Path | None = Field(None, validation_alias="TLS_KEY_FILE")
    """PEM private key of the server certificate."""
    client_ca_file: pathlib.Path | None = Field(None, validation_alias="TLS_CLIENT_CA_FILE")
    """Set: mutual TLS, clients need a certificate from this CA."""
    ca_file: pathlib.Path | None = Field(None, validation_alias="TLS_CA_FILE")
    """`payment-grpc probe` only: CA of the server certificate (unset: pin TLS_CERT_FILE)."""
    server_name: str = Field("localhost", validation_alias="TLS_SERVER_NAME")
    """`payment-grpc probe` only: the name checked in the server certificate."""


class OrderServiceSettings(_Group):
    """The order service (orders.v1): unset address = no order checks, no notifications."""

    addr: str | None = Field(None, validation_alias="ORDER_SERVICE_ADDR")
    """host:port of orders.v1.OrderService: Charge checks the order first (GetOrder)."""
    timeout_seconds: float = Field(1.0, gt=0, validation_alias="ORDER_SERVICE_TIMEOUT_SECONDS")
    """Deadline of each attempt, never past the incoming call's."""
    attempts: int = Field(3, ge=1, le=10, validation_alias="ORDER_SERVICE_ATTEMPTS")
    """Attempts on UNAVAILABLE / DEADLINE_EXCEEDED (backoff with jitter between them)."""
    breaker_threshold: int = Field(5, ge=1, validation_alias="ORDER_SERVICE_BREAKER_THRESHOLD")
    """Consecutive transient failures that open the order service's circuit breaker."""
    breaker_reset_seconds: float = Field(
        10.0, gt=0, validation_alias="ORDER_SERVICE_BREAKER_RESET_SECONDS"
    )
    """How long the breaker stays open before one probe is let through."""
    tls_ca_file: pathlib.Path | None = Field(None, validation_alias="ORDER_SERVICE_TLS_CA_FILE")
    """Set: TLS to the order service, trusting this CA."""
    tls_cert_file: pathlib.Path | None = Field(None, validation_alias="ORDER_SERVICE_TLS_CERT_FILE")
    """With the key: a client certificate (mutual TLS)."""
    tls_key_file: pathlib.Path | None = Field(None, validation_alias="ORDER_SERVICE_TLS_KEY_FILE")
    """Private key of the client certificate."""
    tls_server_name: str | None = Field(None, validation_alias="ORDER_SERVICE_TLS_SERVER_NAME")
    """Name checked in the order service's certificate (unset: the address's host)."""


# A JetStream stream or consumer name; a NATS subject (dot-separated tokens, no wildcards).
JetStreamName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
NatsSubject = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]


class EventSettings(_Group):
    """Payment events: NATS JetStream, the outbox relay, the WatchPayments feed."""

    nats_url: str | None = Field(None, validation_alias="NATS_URL")
    """NATS with JetStream, e.g. nats://127.0.0.1:4222; unset: no broker."""
    nats_stream: JetStreamName = Field("PAYMENTS", validation_alias="NATS_STREAM")
    """The JetStream stream, created when missing."""
    nats_subject_prefix: NatsSubject = Field("payments.v1", validation_alias="NATS_SUBJECT_PREFIX")
    """Subjects are <prefix>.<type>, e.g. payments.v1.payment.captured."""
    outbox_batch_size: int = Field(100, ge=1, le=10_000, validation_alias="OUTBOX_BATCH_SIZE")
    """Rows a relay claims at once."""
    outbox_lease_seconds: float = Field(30.0, gt=0, validation_alias="OUTBOX_LEASE_SECONDS")
    """A claimed row not marked delivered by then is delivered again by any replica."""
    outbox_poll_seconds: float = Field(5.0, gt=0, validation_alias="OUTBOX_POLL_SECONDS")
    """Safety-net poll of the relay; each commit wakes its replica's relay at once."""
    outbox_backoff_initial_seconds: float = Field(
        1.0, gt=0, validation_alias="OUTBOX_BACKOFF_INITIAL_SECONDS"
    )
    """First delay after a failed delivery (doubling, with jitter)."""
    outbox_backoff_max_seconds: float = Field(
        300.0, gt=0, validation_alias="OUTBOX_BACKOFF_MAX_SECONDS"
    )
    """Longest delay between two delivery attempts."""
    outbox_max_attempts: int = Field(12, ge=1, validation_alias="OUTBOX_MAX_ATTEMPTS")
    """Then the row is parked: `payment-grpc outbox list|retry`."""
    watch_send_timeout_seconds: float = Field(
        10.0, gt=0, validation_alias="WATCH_SEND_TIMEOUT_SECONDS"
    )
    """WatchPayments: a consumer that does not take a message this long is cut."""
    saga_consume: bool = Field(False, validation_alias="SAGA_CONSUME")
    """true: take part in the checkout saga: charge for each inventory.v1.reserved event
    (a durable JetStream consumer on NATS_URL), answer payment.completed / payment.failed."""
    saga_stream: JetStreamName = Field("INVENTORY", validation_alias="SAGA_STREAM")
    """The JetStream stream holding the inventory events (created when missing)."""
    saga_subject: NatsSubject = Field("inventory.v1.reserved", validation_alias="SAGA_SUBJECT")
    """The subject of the inventory.v1.InventoryReserved events."""
    saga_durable: JetStreamName = Field("payment-grpc-saga", validation_alias="SAGA_DURABLE")
    """Name of the durable consumer, shared by every replica."""
    saga_retry_delay_seconds: float = Field(2.0, gt=0, validation_alias="SAGA_RETRY_DELAY_SECONDS")
    """An event that cannot be charged now (storage, order service down) comes back after it."""
    saga_ack_wait_seconds: float = Field(60.0, gt=0, validation_alias="SAGA_ACK_WAIT_SECONDS")
    """An event not settled this long (its replica died) is delivered again."""

    @model_validator(mode="after")
    def _saga_needs_nats(self) -> Self:
        if self.saga_consume and not self.nats_url:
            raise ValueError("SAGA_CONSUME=true needs NATS_URL")
        return self


def _failure_mix(value: object) -> object:
    """GATEWAY_FAILURE_MIX is read by the same parser as gateway-sim's --failure-mix."""
    return FailureMix.parse(value) if isinstance(value, str) else value


class GatewaySettings(_Group):
    kind: Literal["simulated", "stripe"] = Field("simulated", validation_alias="GATEWAY")
    """The gateway adapter: `simulated` (in-process) or `stripe` (the official SDK)."""
    ledger_path: pathlib.Path | None = Field(None, validation_alias="GATEWAY_LEDGER_PATH")
    """The simulated gateway's own ledger (SQLite); unset: DATA_DIR/simulated_gateway.db."""
    success_rate: float = Field(0.95, ge=0, le=1, validation_alias="GATEWAY_SUCCESS_RATE")
    """Success probability for card tokens without a fixed outcome."""
    failure_mix: Annotated[FailureMix, NoDecode, BeforeValidator(_failure_mix)] = Field(
        default_factory=FailureMix, validation_alias="GATEWAY_FAILURE_MIX"
    )
    """Relative weights of the failures, "declined=60,insufficient_funds=10,..."."""
    latency_ms_min: int = Field(20, ge=0, validation_alias="GATEWAY_LATENCY_MS_MIN")
    """Shortest simulated gateway latency."""
    latency_ms_max: int = Field(120, ge=0, validation_alias="GATEWAY_LATENCY_MS_MAX")
    """Longest simulated gateway latency."""
    async_settle_ms: int = Field(2000, ge=0, validation_alias="GATEWAY_ASYNC_SETTLE_MS")
    """Delay before UPI / net banking / PayPal payments settle."""
    seed: int | None = Field(None, validation_alias="GATEWAY_SEED")
    """Seed of the simulated gateway's RNG (reproducible runs)."""
    retry_attempts: int = Field(3, ge=1, le=10, validation_alias="GATEWAY_RETRY_ATTEMPTS")
    """GATEWAY=stripe: attempts per call on transient errors (keyed calls only)."""
    breaker_failures: int = Field(5, ge=1, validation_alias="GATEWAY_BREAKER_FAILURES")
    """GATEWAY=stripe: consecutive transient failures that open the circuit breaker."""
    breaker_open_seconds: float = Field(30.0, gt=0, validation_alias="GATEWAY_BREAKER_OPEN_SECONDS")
    """GATEWAY=stripe: how long the open breaker refuses calls before a trial call."""

    @model_validator(mode="after")
    def _latency_range(self) -> Self:
        if self.latency_ms_min > self.latency_ms_max:
            raise ValueError("GATEWAY_LATENCY_MS_MIN is above GATEWAY_LATENCY_MS_MAX")
        return self


class StripeSettings(_Group):
    api_key: SecretStr | None = Field(None, validation_alias="STRIPE_API_KEY")
    """Stripe secret key; required with GATEWAY=stripe."""
    api_base: str = Field("https://api.stripe.com", validation_alias="STRIPE_API_BASE")
    """Stripe's API base (the simulator: http://127.0.0.1:PORT)."""
    webhook_secret: SecretStr | None = Field(None, validation_alias="STRIPE_WEBHOOK_SECRET")
    """`whsec_...` signing Stripe's webhooks; set: the webhook listener runs."""
    timeout_seconds: float = Field(10.0, gt=0, validation_alias="STRIPE_TIMEOUT_SECONDS")
    """Per-call timeout of a Stripe request."""
    connect_timeout_seconds: float = Field(
        3.0, gt=0, validation_alias="STRIPE_CONNECT_TIMEOUT_SECONDS"
    )
    """Connect timeout of a Stripe request."""
    webhook_port: int = Field(8010, ge=0, le=65535, validation_alias="WEBHOOK_PORT")
    """Port of the webhook listener (POST /v1/webhooks/stripe); 0 picks a free one."""


class Settings(BaseModel):
    """All settings, by group; each group reads its environment variables when built."""

    model_config = ConfigDict(frozen=True)

    server: ServerSettings = Field(default_factory=ServerSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    idempotency: IdempotencySettings = Field(default_factory=IdempotencySettings)
    recovery: RecoverySettings = Field(default_factory=RecoverySettings)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    jwt: JwtSettings = Field(default_factory=JwtSettings)
    auth_service: AuthServiceSettings = Field(default_factory=AuthServiceSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    stripe: StripeSettings = Field(default_factory=StripeSettings)

    @model_validator(mode="after")
    def _stripe_needs_a_key(self) -> Self:
        if self.gateway.kind == "stripe" and self.stripe.api_key is None:
            raise ValueError("GATEWAY=stripe needs STRIPE_API_KEY")
        return self

    orders: OrderServiceSettings = Field(default_factory=OrderServiceSettings)
    events: EventSettings = Field(default_factory=EventSettings)

    @classmethod
    def from_names(cls, values: Mapping[str, object]) -> Settings:
        """Settings with these values, keyed by environment variable name (any case), over
        the environment and the defaults. Tests build their settings this way."""
        return cls().replace(values)

    def replace(self, values: Mapping[str, object]) -> Settings:
        """A copy with these values (keyed by environment variable name, any case), each
        changed group validated again."""
        changes: dict[str, dict[str, object]] = {}
        for name, value in values.items():
            group, field = _locate(name)
            changes.setdefault(group, {})[field] = value
        groups: dict[str, Any] = {}
        for group, fields in changes.items():
            current: _Group = getattr(self, group)
            groups[group] = type(current)(**{**dict(current), **fields})
        return self.model_copy(update=groups)

    def ledger_path(self) -> pathlib.Path:
        """Where the simulated gateway keeps its ledger."""
        return self.gateway.ledger_path or self.storage.data_dir / "simulated_gateway.db"


def _locate(name: str) -> tuple[str, str]:
    """(group, field) of the setting read from environment variable `name`."""
    wanted = name.upper()
    for group, info in Settings.model_fields.items():
        model: type[BaseModel] = info.annotation  # type: ignore[assignment]
        for field, field_info in model.model_fields.items():
            if field_info.validation_alias == wanted:
                return group, field
    raise KeyError(f"no setting is read from {wanted}")


class UnsafeSetting(ValueError):
    """A setting this process must not serve with; the message is one line that starts
    with the environment variable's name."""


# Variables this service once read, and what replaced them: still set, they would be
# ignored in silence, so the process refuses to start instead.
RETIRED_SETTINGS = {
    "IDEMPOTENCY_LOCK_TIMEOUT_SECONDS": "IDEMPOTENCY_LEASE_SECONDS",
}


def check_retired(environ: Mapping[str, str]) -> None:
    """Refuse a retired environment variable (UnsafeSetting naming its replacement)."""
    for name, replacement in RETIRED_SETTINGS.items():
        if name in environ:
            raise UnsafeSetting(f"{name}: no longer read; set {replacement} instead")


def check_deployment(settings: Settings) -> None:
    """Refuse settings that would start but then serve wrongly: every JWT algorithm needs a
    key, and on PostgreSQL every replica must share the keys (nothing generated per
    replica into DATA_DIR). Raises UnsafeSetting."""
    shared = not settings.database.is_sqlite
    if shared and settings.storage.encryption_keys is None:
        raise UnsafeSetting(
            "ENCRYPTION_KEYS: required on PostgreSQL (a key generated into DATA_DIR is not "
            "shared by the other replicas)"
        )
    for algorithm in settings.jwt.algorithms:
        _check_jwt_key(settings, algorithm, shared=shared)


def _check_jwt_key(settings: Settings, algorithm: str, *, shared: bool) -> None:
    jwt, auth = settings.jwt, settings.auth_service
    if algorithm not in HMAC_ALGORITHMS:
        if jwt.jwks_file is None and auth.addr is None:
            raise UnsafeSetting(
                f"JWT_ALGORITHMS: {algorithm} has no keys: set JWT_JWKS_FILE or AUTH_SERVICE_ADDR"
            )
    elif jwt.secret_key is None and jwt.jwks_file is not None:
        raise UnsafeSetting(
            f"JWT_ALGORITHMS: {algorithm} has no key: set JWT_SECRET_KEY (none is generated "
            "when JWT_JWKS_FILE is set), or drop it from the list"
        )
    elif jwt.secret_key is None and shared:
        raise UnsafeSetting(
            f"JWT_SECRET_KEY: required on PostgreSQL for {algorithm} (a secret generated into "
            "DATA_DIR is not shared by the other replicas); or use RS256 with JWT_JWKS_FILE "
            "or AUTH_SERVICE_ADDR"
        )

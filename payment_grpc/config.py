"""Settings: every knob is an environment variable (documented in the README)."""

from __future__ import annotations

import os
import pathlib
import socket
from typing import Annotated, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from payment_grpc.adapters.gateways.simulated import FailureMix


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    host: str = "0.0.0.0"  # noqa: S104 - the pod IP must be reachable for k8s grpc probes
    port: int = Field(8009, ge=0, le=65535)
    # Server processes on PORT (SO_REUSEPORT), worker i with INSTANCE_ID "<INSTANCE_ID>-w<i>";
    # "auto" (the production profiles): one per available core on PostgreSQL, 1 on SQLite.
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    database_url: str = "sqlite+aiosqlite:///./payments.db"
    db_pool_size: int = Field(10, ge=1)
    migrate_on_start: bool = True
    data_dir: pathlib.Path = pathlib.Path(".data")
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "text"
    health_check_interval_seconds: float = Field(2.0, gt=0)
    recovery_interval_seconds: float = Field(5.0, gt=0)
    recovery_stale_seconds: float = Field(30.0, ge=0)
    max_message_bytes: int = Field(1024 * 1024, ge=1024)
    # Large enough that a hostile 100 KB token reaches auth and gets UNAUTHENTICATED;
    # anything larger is refused by gRPC with RESOURCE_EXHAUSTED before any handler runs.
    max_metadata_bytes: int = Field(128 * 1024, ge=8 * 1024)
    # Identity of this replica for idempotency-key locks; must be unique per live process
    # and stable across its restarts (the pod name in Kubernetes).
    instance_id: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    idempotency_retention_hours: float = Field(72.0, gt=0)
    idempotency_lock_timeout_seconds: float = Field(60.0, gt=0)
    fault_point: str = ""  # crash tests only: SIGKILL at this phase boundary
    # Column encryption at rest: "kid:base64key,kid:base64key" (32-byte AES-256 keys),
    # newest first: the first encrypts, all decrypt. Unset: one key generated into DATA_DIR.
    encryption_keys: SecretStr | None = None

    rate_limit_per_second: float = Field(200.0, ge=0)  # per caller (JWT subject); 0: off
    rate_limit_burst: int = Field(400, ge=1)

    jwt_secret_key: SecretStr | None = None  # HS256; unset: generated into DATA_DIR
    jwt_algorithms: str = "HS256"  # comma-separated allow-list, e.g. "RS256,ES256"
    jwt_jwks_file: pathlib.Path | None = None  # public keys for RS256/ES256, by kid
    jwt_audience: str = "payment-service"
    jwt_issuer: str = "payment-grpc"
    jwt_leeway_seconds: float = Field(30.0, ge=0, le=300)
    auth_service_addr: str | None = None  # host:port of auth.v1.AuthService
    auth_cache_ttl_seconds: float = Field(60.0, ge=0)
    auth_timeout_seconds: float = Field(1.0, gt=0)
    # RS256/ES256 keys from the auth service (when set and JWT_JWKS_FILE is not): kept at
    # most this long, and refetched for an unknown kid at most once per refresh interval.
    auth_keys_max_age_seconds: float = Field(300.0, gt=0)
    auth_keys_refresh_seconds: float = Field(10.0, ge=0)

    # TLS (payment_grpc/tls.py): cert + key make the port TLS-only; a client CA makes it mTLS.
    tls_cert_file: pathlib.Path | None = None  # PEM chain, server certificate first
    tls_key_file: pathlib.Path | None = None  # PEM private key
    tls_client_ca_file: pathlib.Path | None = None  # set: clients need a cert from this CA
    tls_ca_file: pathlib.Path | None = None  # `probe`: CA of the server cert (unset: pin cert)
    tls_server_name: str = "localhost"  # `probe`: name checked in the server certificate

    gateway: Literal["simulated"] = "simulated"
    gateway_ledger_path: pathlib.Path | None = None
    gateway_success_rate: float = Field(0.95, ge=0, le=1)
    gateway_failure_mix: str = (
        "declined=60,insufficient_funds=10,network_error=20,invalid_method=10"
    )
    gateway_latency_ms_min: int = Field(20, ge=0)
    gateway_latency_ms_max: int = Field(120, ge=0)
    gateway_async_settle_ms: int = Field(2000, ge=0)
    gateway_seed: int | None = None

    def algorithms(self) -> list[str]:
        return [name.strip() for name in self.jwt_algorithms.split(",") if name.strip()]

    def ledger_path(self) -> pathlib.Path:
        return self.gateway_ledger_path or self.data_dir / "simulated_gateway.db"

    def failure_mix(self) -> FailureMix:
        weights = dict(part.split("=") for part in self.gateway_failure_mix.split(",") if part)
        return FailureMix(**{name.strip(): int(value) for name, value in weights.items()})

"""TLS and mutual TLS on the gRPC port (TLS_CERT_FILE, TLS_KEY_FILE, TLS_CLIENT_CA_FILE),
with certificates made here: a CA, a server certificate for 127.0.0.1/localhost, client
certificates from that CA and from another one. `payment-grpc probe` follows the server."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc import cli
from payment_grpc.bootstrap import Application, build_application
from payment_grpc.config import Settings
from payment_grpc.tls import server_credentials
from tests.conftest import make_settings
from tests.helpers.builders import charge_request
from tests.helpers.credentials import client_metadata

PEM = serialization.Encoding.PEM


@dataclass
class Issued:
    key_pem: bytes
    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _issue(
    name: str,
    issuer: Issued | None = None,
    *,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    key_pem = key.private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Issued(key_pem, cert.public_bytes(PEM), key, cert)


@dataclass
class Pki:
    dir: pathlib.Path
    ca: Issued
    server: Issued
    client: Issued
    rogue_client: Issued

    def path(self, name: str) -> pathlib.Path:
        return self.dir / name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One CA signs the server certificate (server + client auth, so `probe` can reuse it
    under mutual TLS) and a client certificate; a rogue CA signs another client cert."""
    ca = _issue("payments test CA", ca=True)
    rogue_ca = _issue("rogue CA", ca=True)
    pki = Pki(
        tmp_path_factory.mktemp("pki"),
        ca,
        _issue("payment-grpc", ca, server=True, client=True),
        _issue("order-service", ca, client=True),
        _issue("order-service", rogue_ca, client=True),
    )
    files = {
        "ca.pem": ca.cert_pem,
        "server.pem": pki.server.cert_pem,
        "server.key": pki.server.key_pem,
        "client.pem": pki.client.cert_pem,
        "client.key": pki.client.key_pem,
        "rogue.pem": pki.rogue_client.cert_pem,
        "rogue.key": pki.rogue_client.key_pem,
    }
    for name, data in files.items():
        pki.path(name).write_bytes(data)
    return pki


def _tls_settings(database_url: str, tmp_path: pathlib.Path, pki: Pki, *, mutual: bool) -> Settings:
    return make_settings(
        database_url,
        tmp_path,
        tls_cert_file=pki.path("server.pem"),
        tls_key_file=pki.path("server.key"),
        tls_client_ca_file=pki.path("ca.pem") if mutual else None,
        tls_ca_file=pki.path("ca.pem"),
    )


async def _started(settings: Settings) -> AsyncIterator[Application]:
    application = build_application(settings)
    await application.start()
    try:
        yield application
    finally:
        await application.stop()


@pytest.fixture
async def tls_app(
    database_url: str, tmp_path: pathlib.Path, pki: Pki
) -> AsyncIterator[Application]:
    async for application in _started(_tls_settings(database_url, tmp_path, pki, mutual=False)):
        yield application


@pytest.fixture
async def mtls_app(
    database_url: str, tmp_path: pathlib.Path, pki: Pki
) -> AsyncIterator[Application]:
    async for application in _started(_tls_settings(database_url, tmp_path, pki, mutual=True)):
        yield application


def _credentials(pki: Pki, client: Issued | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )


async def _health(channel: aio.Channel) -> Any:
    stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
    return await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)


async def _refused(channel: aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health(channel)
    return caught.value.code()


async def test_tls_call_with_the_ca_works(tls_app: Application, pki: Pki) -> None:
    target = f"127.0.0.1:{tls_app.port}"
    async with aio.secure_channel(
        target, _credentials(pki), interceptors=client_metadata()
    ) as channel:
        assert (await _health(channel)).status == health_pb2.HealthCheckResponse.SERVING
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        charged = await stub.Charge(charge_request(1_000))
        got = await stub.GetPayment(api.GetPaymentRequest(payment_id=charged.payment.payment_id))
        assert got.payment == charged.payment
    # The same over "localhost" (SAN DNS name) and without a client certificate.
    async with aio.secure_channel(f"localhost:{tls_app.port}", _credentials(pki)) as channel:
        assert (await _health(channel)).status == health_pb2.HealthCheckResponse.SERVING


async def test_plaintext_client_is_refused(tls_app: Application) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{tls_app.port}") as channel:
        assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_client_that_does_not_trust_the_server_is_refused(
    tls_app: Application, pki: Pki
) -> None:
    other_roots = grpc.ssl_channel_credentials(root_certificates=pki.rogue_client.cert_pem)
    async with aio.secure_channel(f"127.0.0.1:{tls_app.port}", other_roots) as channel:
        assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_client_without_a_certificate(mtls_app: Application, pki: Pki) -> None:
    async with aio.secure_channel(f"127.0.0.1:{mtls_app.port}", _credentials(pki)) as channel:
        assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_certificate_from_another_ca(mtls_app: Application, pki: Pki) -> None:
    credentials = _credentials(pki, pki.rogue_client)
    async with aio.secure_channel(f"127.0.0.1:{mtls_app.port}", credentials) as channel:
        assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_accepts_a_ca_signed_client_certificate(mtls_app: Application, pki: Pki) -> None:
    target = f"127.0.0.1:{mtls_app.port}"
    credentials = _credentials(pki, pki.client)
    async with aio.secure_channel(target, credentials, interceptors=client_metadata()) as channel:
        assert (await _health(channel)).status == health_pb2.HealthCheckResponse.SERVING
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        charged = await stub.Charge(charge_request(1_000))
        assert charged.payment.payment_id.startswith("pay_")


async def test_probe_speaks_tls(tls_app: Application, capsys: pytest.CaptureFixture[str]) -> None:
    settings = tls_app.settings.replace({"port": tls_app.port})
    assert await asyncio.to_thread(cli.probe, settings) == 0
    # Without TLS_CA_FILE the probe pins the server's own certificate (TLS_CERT_FILE).
    pinned = settings.replace({"tls_ca_file": None})
    assert await asyncio.to_thread(cli.probe, pinned) == 0
    plaintext = settings.replace({"tls_cert_file": None, "tls_key_file": None, "tls_ca_file": None})
    assert await asyncio.to_thread(cli.probe, plaintext) == 1
    assert "SERVING" in capsys.readouterr().out


async def test_probe_speaks_mutual_tls(mtls_app: Application) -> None:
    settings = mtls_app.settings.replace({"port": mtls_app.port})
    assert await asyncio.to_thread(cli.probe, settings) == 0
    wrong_name = settings.replace({"tls_server_name": "payments.example"})
    assert await asyncio.to_thread(cli.probe, wrong_name) == 1


@pytest.mark.parametrize(
    "files",
    [
        {"tls_cert_file": "server.pem"},
        {"tls_key_file": "server.key"},
        {"tls_client_ca_file": "ca.pem"},
    ],
)
def test_half_a_tls_configuration_is_an_error(
    files: dict[str, str], pki: Pki, tmp_path: pathlib.Path
) -> None:
    settings = make_settings(
        "sqlite+aiosqlite://", tmp_path, **{k: pki.path(v) for k, v in files.items()}
    )
    with pytest.raises(ValueError, match="TLS_"):
        server_credentials(settings)

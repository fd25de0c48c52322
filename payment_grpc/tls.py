"""Optional TLS and mutual TLS for the gRPC port, and the matching client side for `probe`.

- TLS_CERT_FILE + TLS_KEY_FILE: the port speaks TLS only (no plaintext listener).
- + TLS_CLIENT_CA_FILE: mutual TLS; a client must present a certificate signed by that CA.
- `payment-grpc probe` trusts TLS_CA_FILE (unset: it pins the server's own certificate,
  TLS_CERT_FILE), checks the name TLS_SERVER_NAME in the server's certificate, and under
  mutual TLS presents TLS_CERT_FILE/TLS_KEY_FILE as its own client certificate (so that
  certificate must be signed by the client CA and allow client authentication).

Files are read once at startup; a rotated certificate takes effect on restart.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import grpc

from payment_grpc.config import Settings, UnsafeSetting


def _read(path: pathlib.Path) -> bytes:
    return pathlib.Path(path).read_bytes()


def _cert_and_key(settings: Settings) -> tuple[pathlib.Path, pathlib.Path] | None:
    """The server's cert and key when TLS is on; a half configuration is an error, never a
    silent plaintext port."""
    cert, key = settings.tls.cert_file, settings.tls.key_file
    if (cert is None) != (key is None):
        raise UnsafeSetting("TLS_CERT_FILE and TLS_KEY_FILE must be set together")
    if cert is None or key is None:
        if settings.tls.client_ca_file is not None:
            raise UnsafeSetting(
                "TLS_CLIENT_CA_FILE (mutual TLS) needs TLS_CERT_FILE and TLS_KEY_FILE"
            )
        return None
    return cert, key


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (mutual with a client CA) credentials for the server port; None: plaintext."""
    pair = _cert_and_key(settings)
    if pair is None:
        return None
    cert, key = pair
    client_ca = settings.tls.client_ca_file
    return grpc.ssl_server_credentials(
        [(_read(key), _read(cert))],
        root_certificates=_read(client_ca) if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


def probe_channel(settings: Settings) -> grpc.Channel:
    """A channel to this server on 127.0.0.1, speaking what the server speaks."""
    target = f"127.0.0.1:{settings.server.port}"
    pair = _cert_and_key(settings)
    if pair is None:
        return grpc.insecure_channel(target)
    cert, key = pair
    mutual = settings.tls.client_ca_file is not None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(settings.tls.ca_file or cert),
        private_key=_read(key) if mutual else None,
        certificate_chain=_read(cert) if mutual else None,
    )
    options = [("grpc.ssl_target_name_override", settings.tls.server_name)]
    return grpc.secure_channel(target, credentials, options=options)


def client_channel(
    target: str,
    *,
    ca_file: pathlib.Path | None,
    cert_file: pathlib.Path | None = None,
    key_file: pathlib.Path | None = None,
    server_name: str | None = None,
    interceptors: Sequence[Any] = (),
) -> grpc.aio.Channel:
    """A channel to a collaborator: TLS when a CA is given (mutual with cert + key),
    plaintext otherwise. A half client-certificate configuration is an error.
    `interceptors`: client interceptors of every call (tracing)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both its cert and key file")
    if ca_file is None:
        if cert_file is not None:
            raise ValueError("a client certificate needs the collaborator's CA file (TLS)")
        return grpc.aio.insecure_channel(target, interceptors=list(interceptors))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file) if key_file is not None else None,
        certificate_chain=_read(cert_file) if cert_file is not None else None,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.aio.secure_channel(
        target, credentials, options=options, interceptors=list(interceptors)
    )

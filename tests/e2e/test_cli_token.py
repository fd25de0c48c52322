"""Embedded default: the server makes its own HS256 secret; `payment-grpc token` mints with it."""

from __future__ import annotations

import asyncio
import os
import pathlib
import stat
import sys

import grpc
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.bootstrap import build_application, jwt_secret
from tests.conftest import make_settings
from tests.helpers.calls import rpc_error


async def _mint(data_dir: pathlib.Path, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "payment_grpc", "token", *args,
        env={**os.environ, "DATA_DIR": str(data_dir), "LOG_LEVEL": "WARNING"},
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    assert process.returncode == 0
    return out.decode().strip()


async def test_generated_secret_is_private_and_minted_tokens_work(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    settings = make_settings(database_url, tmp_path, jwt_secret_key=None)
    app = build_application(settings)
    await app.start()
    try:
        secret = settings.storage.data_dir / "jwt_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        reader = await _mint(settings.storage.data_dir, "--scope", "payments.read")
        customer = await _mint(settings.storage.data_dir, "--customer", "cus_9", "--ttl", "60")
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            auth = (("authorization", f"Bearer {reader}"),)
            assert (
                list((await stub.ListPayments(api.ListPaymentsRequest(), metadata=auth)).payments)
                == []
            )
            charge = api.ChargeRequest(order_id="o")
            denied = await rpc_error(
                stub.Charge(charge, metadata=(("authorization", f"Bearer {customer}"),))
            )
            assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await app.stop()
    assert jwt_secret(settings) == secret.read_text().strip()  # a restart reuses it

"""Sensitive columns are AES-GCM ciphertext at rest (PCI DSS 3.5-3.7), on SQLite and
PostgreSQL, through the real server: key lists, `rotate-keys` (the real CLI, as a
subprocess, while the server serves), moved values and unknown key ids."""

from __future__ import annotations

import asyncio
import base64
import os
import pathlib
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

from payment_grpc.adapters.db.crypto import DecryptionError
from payment_grpc.adapters.db.engine import SqlUnitOfWorkFactory
from payment_grpc.adapters.db.key_check import StoredDataUnreadable, check_stored_keys
from payment_grpc.adapters.db.rotation import KeyRotation
from payment_grpc.adapters.db.tables import idempotency_keys, payments
from payment_grpc.bootstrap import Application, build_application, build_cipher
from payment_grpc.config import Settings
from payment_grpc.domain.payment import Payment
from tests.conftest import TEST_JWT_SECRET, make_settings
from tests.helpers.builders import S, card, charge_request, usd
from tests.helpers.calls import rpc_error
from tests.helpers.credentials import client_metadata
from tests.helpers.db import events_of

Stub = payment_service_pb2_grpc.PaymentServiceStub
OLD = "old:" + base64.b64encode(os.urandom(32)).decode()
NEW = "new:" + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
VPA = "asha.sharma@okbank"
WALLET_TOKEN = "wtok_Secret4711"
METADATA = {"customer_email": "asha.sharma@example.com", "loyalty_id": "gold-7731"}
PLAINTEXTS = (VPA, WALLET_TOKEN, *METADATA.values())


def upi(vpa: str = VPA) -> pb.PaymentMethod:
    return pb.PaymentMethod(upi=pb.UpiMethod(vpa=vpa))


def wallet(token: str = WALLET_TOKEN) -> pb.PaymentMethod:
    return pb.PaymentMethod(wallet=pb.WalletMethod(provider="google_pay", token=token))


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[Application, Stub]]:
    app = build_application(settings)
    await app.start()
    try:
        async with aio.insecure_channel(
            f"127.0.0.1:{app.port}", interceptors=client_metadata()
        ) as channel:
            yield app, Stub(channel)
    finally:
        await app.stop()


async def raw_payments(app: Application) -> dict[str, Any]:
    """payment id -> the row as stored, straight from the table."""
    async with app.engine.connect() as conn:
        rows = (await conn.execute(sa.select(payments))).mappings().all()
    return {row["id"]: row for row in rows}


async def raw_answers(app: Application) -> list[bytes]:
    async with app.engine.connect() as conn:
        query = sa.select(idempotency_keys.c.response_body).where(
            idempotency_keys.c.response_body.is_not(None)
        )
        return [bytes(b) for b in (await conn.execute(query)).scalars()]


async def stored_payment(app: Application, payment_id: str) -> Payment:
    """Read through the real repository (the domain object the use cases get)."""
    factory = SqlUnitOfWorkFactory(app.engine, build_cipher(app.settings))
    async with factory(read_only=True) as uow:
        return await uow.payments.get(payment_id)


async def kids_at_rest(app: Application) -> set[str]:
    kids = set()
    for row in (await raw_payments(app)).values():
        for column in ("method_token", "metadata_json", "card_fingerprint"):
            if row[column] is not None:
                kids.add(row[column].split(":")[2])
    for body in await raw_answers(app):
        kids.add(body.split(b":")[2].decode())
    return kids


async def rotate_cli(settings: Settings, keys: str, *args: str) -> tuple[int, str, str]:
    """`python -m payment_grpc rotate-keys` in a subprocess; the test's event loop (and
    the server in it) keeps running meanwhile."""
    env = {
        **os.environ,
        "DATABASE_URL": settings.database.url,
        "ENCRYPTION_KEYS": keys,
        "DATA_DIR": str(settings.storage.data_dir),
        "LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "payment_grpc", "rotate-keys", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def settled(stub: Stub, payment_id: str) -> bool:
    """Waits on the status stream until the payment leaves PROCESSING."""
    watch = stub.WatchPaymentStatus(api.WatchPaymentStatusRequest(payment_id=payment_id))
    async for message in watch:
        if message.event.status != S.PAYMENT_STATUS_PROCESSING:
            watch.cancel()
            return True
    return False


async def test_sensitive_values_are_ciphertext_at_rest_and_read_back(app, stub) -> None:
    charged = [
        await stub.Charge(charge_request(150_000, upi(), currency="INR", metadata=METADATA)),
        await stub.Charge(charge_request(method=wallet(), metadata=METADATA)),
        await stub.Charge(charge_request(method=card("tok_visa"), metadata=METADATA)),
    ]
    ids = [reply.payment.payment_id for reply in charged]
    assert await settled(stub, ids[0])  # the UPI callback wrote the row again

    rows = await raw_payments(app)
    for payment_id in ids:
        row = rows[payment_id]
        assert row["method_token"].startswith("enc:v1:test:")
        assert row["metadata_json"].startswith("enc:v1:test:")
        stored = " ".join(str(value) for value in row.values())
        for secret in (*PLAINTEXTS, "tok_visa"):
            assert secret not in stored
    card_row = rows[ids[2]]
    fingerprint = (await stored_payment(app, ids[2])).card.fingerprint
    assert fingerprint
    assert card_row["card_fingerprint"].startswith("enc:v1:test:")
    assert fingerprint not in " ".join(str(value) for value in card_row.values())
    assert rows[ids[0]]["card_fingerprint"] is None  # no card, no fingerprint
    answers = await raw_answers(app)
    assert len(answers) == 3
    for body in answers:
        assert body.startswith(b"enc:v1:test:")
        assert not any(secret.encode() in body for secret in PLAINTEXTS)

    for payment_id in ids:
        reply = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
        assert dict(reply.payment.metadata) == METADATA
    assert [(await stored_payment(app, i)).method.token for i in ids] == [
        VPA, WALLET_TOKEN, "tok_visa",
    ]  # fmt: skip
    listed = await stub.ListPayments(api.ListPaymentsRequest())
    assert [dict(p.metadata) for p in listed.payments] == [METADATA] * 3


async def test_embedded_default_generates_its_key_once_into_data_dir(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    settings = make_settings(database_url, tmp_path, encryption_keys=None)
    async with serving(settings) as (app, stub):
        reply = await stub.Charge(charge_request(method=upi(), currency="INR", metadata=METADATA))
        row = (await raw_payments(app))[reply.payment.payment_id]
        assert row["method_token"].startswith("enc:v1:local:")
    key_file = settings.storage.data_dir / "encryption_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    async with serving(settings) as (app, stub):  # a restart reuses the same key
        again = await stub.GetPayment(api.GetPaymentRequest(payment_id=reply.payment.payment_id))
        assert dict(again.payment.metadata) == METADATA
        assert (await stored_payment(app, reply.payment.payment_id)).method.token == VPA


async def test_old_rows_read_under_a_key_list_and_rotate_keys_retires_the_old_key(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    keyed = (("idempotency-key", "k-old-upi"),)
    upi_request = charge_request(150_000, upi(), currency="INR", metadata=METADATA)
    async with serving(make_settings(database_url, tmp_path, encryption_keys=OLD)) as (app, stub):
        first = await stub.Charge(upi_request, metadata=keyed)
        old_ids = [
            first.payment.payment_id,
            (
                await stub.Charge(charge_request(method=wallet(), metadata=METADATA))
            ).payment.payment_id,
            (await stub.Charge(charge_request(manual=True, metadata=METADATA))).payment.payment_id,
        ]
        await settled(stub, old_ids[0])
        assert await kids_at_rest(app) == {"old"}

    both = make_settings(database_url, tmp_path, encryption_keys=f"{NEW},{OLD}")
    async with serving(both) as (app, stub):
        for payment_id in old_ids:  # old rows still read
            reply = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
            assert dict(reply.payment.metadata) == METADATA
        new_id = (await stub.Charge(charge_request(metadata=METADATA))).payment.payment_id
        assert (await raw_payments(app))[new_id]["method_token"].startswith("enc:v1:new:")
        await stub.CapturePayment(api.CapturePaymentRequest(payment_id=old_ids[2]))
        assert await kids_at_rest(app) == {"old", "new"}

        code, out, err = await rotate_cli(both, f"{NEW},{OLD}", "--batch-size", "2")
        assert code == 0, out + err
        assert "payments: 3 re-encrypted under key 'new'" in out
        assert "idempotency_keys: 3 re-encrypted under key 'new'" in out  # the 3 old answers
        assert out.count("0 left under an older key") == 2
        assert await kids_at_rest(app) == {"new"}
        for payment_id in (*old_ids, new_id):  # still readable by the running server
            reply = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
            assert dict(reply.payment.metadata) == METADATA

        code, out, _ = await rotate_cli(both, f"{NEW},{OLD}")  # idempotent
        assert code == 0
        assert "payments: 0 re-encrypted" in out
        assert "idempotency_keys: 0 re-encrypted" in out

    only_new = make_settings(database_url, tmp_path, encryption_keys=NEW)
    async with serving(only_new) as (app, stub):
        for payment_id in (*old_ids, new_id):
            reply = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
            assert dict(reply.payment.metadata) == METADATA
        assert (await stored_payment(app, old_ids[0])).method.token == VPA
        assert (await stored_payment(app, old_ids[1])).method.token == WALLET_TOKEN
        replay = stub.Charge(upi_request, metadata=keyed)  # the stored answer, rotated
        assert (await replay).payment.payment_id == first.payment.payment_id
        assert dict(await replay.initial_metadata()).get("idempotent-replayed") == "true"


async def test_unknown_key_id_fails_loudly(database_url: str, tmp_path: pathlib.Path) -> None:
    async with serving(make_settings(database_url, tmp_path, encryption_keys=OLD)) as (_, stub):
        payment_id = (
            await stub.Charge(charge_request(method=wallet(), metadata=METADATA))
        ).payment.payment_id

    only_new = make_settings(database_url, tmp_path, encryption_keys=NEW)
    async with serving(only_new) as (app, stub):
        error = await rpc_error(stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id)))
        assert error.code == grpc.StatusCode.INTERNAL
        error = await rpc_error(stub.ListPayments(api.ListPaymentsRequest()))
        assert error.code == grpc.StatusCode.INTERNAL
        with pytest.raises(DecryptionError, match="unknown key id 'old'"):
            await stored_payment(app, payment_id)

        before = (await raw_payments(app))[payment_id]
        code, out, err = await rotate_cli(only_new, NEW)
        assert code == 1
        assert f"cannot decrypt (unknown key id?): {payment_id}" in err
        assert "payments: 0 re-encrypted under key 'new', 0 changed concurrently (retried)," in out
        assert "1 unreadable, 1 left under an older key" in out
        assert (await raw_payments(app))[payment_id] == before  # nothing destroyed


async def test_a_value_moved_to_another_row_or_column_does_not_decrypt(app, stub) -> None:
    a = (await stub.Charge(charge_request(method=wallet(), metadata=METADATA))).payment.payment_id
    b = (await stub.Charge(charge_request(method=wallet("wtok_other")))).payment.payment_id
    rows = await raw_payments(app)
    async with app.engine.begin() as conn:
        await conn.execute(
            payments.update().where(payments.c.id == b).values(method_token=rows[a]["method_token"])
        )
        await conn.execute(
            payments.update()
            .where(payments.c.id == a)
            .values(metadata_json=rows[a]["method_token"])
        )
    for moved in (a, b):
        with pytest.raises(DecryptionError, match="authentication failed"):
            await stored_payment(app, moved)
        error = await rpc_error(stub.GetPayment(api.GetPaymentRequest(payment_id=moved)))
        assert error.code == grpc.StatusCode.INTERNAL


async def test_rotation_never_overwrites_a_concurrent_change(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path, encryption_keys=OLD)) as (_, stub):
        ids = [
            (await stub.Charge(charge_request(manual=True, metadata=METADATA))).payment.payment_id
            for _ in range(3)
        ]

    both = make_settings(database_url, tmp_path, encryption_keys=f"{NEW},{OLD}")
    async with serving(both) as (app, stub):
        rotation = KeyRotation(app.engine, build_cipher(both), batch_size=10)
        batch = await rotation.payments_batch()
        assert sorted(row["id"] for row in batch) == sorted(ids)
        # between the rotation's read and its write the service captures one payment
        await stub.CapturePayment(api.CapturePaymentRequest(payment_id=ids[0]))
        assert await rotation.rotate_payments(batch) == (2, 1, set())
        row = (await raw_payments(app))[ids[0]]
        assert (row["status"], row["sequence"]) == ("CAPTURED", 4)  # the capture survived
        assert row["method_token"].startswith("enc:v1:old:")  # skipped, retried later

        # a value re-encrypted meanwhile (another rotate-keys) is not written over either
        stale = await rotation.payments_batch()
        assert [r["id"] for r in stale] == [ids[0]]
        await rotation.run()
        assert await rotation.rotate_payments(stale) == (0, 1, set())

        reports = await rotation.run()
        assert [(r.table, r.rotated, r.left) for r in reports] == [
            ("payments", 0, 0), ("idempotency_keys", 0, 0),
        ]  # fmt: skip
        assert await kids_at_rest(app) == {"new"}
        assert [e[0] for e in await events_of(app, ids[0])] == [1, 2, 3, 4]
        reply = await stub.GetPayment(api.GetPaymentRequest(payment_id=ids[0]))
        assert reply.payment.status == S.PAYMENT_STATUS_CAPTURED
        assert dict(reply.payment.metadata) == METADATA


async def test_rotate_keys_while_the_service_changes_the_same_rows(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path, encryption_keys=OLD)) as (_, stub):
        ids = [
            (await stub.Charge(charge_request(manual=True, metadata=METADATA))).payment.payment_id
            for _ in range(12)
        ]

    both = make_settings(database_url, tmp_path, encryption_keys=f"{NEW},{OLD}")
    async with serving(both) as (app, stub):

        async def capture_and_refund(payment_id: str) -> None:
            await stub.CapturePayment(api.CapturePaymentRequest(payment_id=payment_id))
            await stub.Refund(api.RefundRequest(payment_id=payment_id, amount=usd(1_000)))

        rotation = KeyRotation(app.engine, build_cipher(both), batch_size=2)
        results = await asyncio.gather(rotation.run(), *(capture_and_refund(i) for i in ids))
        assert not any(r.unreadable for r in results[0])
        await rotation.run()  # whatever was skipped meanwhile
        assert await kids_at_rest(app) == {"new"}
        for payment_id in ids:
            reply = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
            assert reply.payment.status == S.PAYMENT_STATUS_PARTIALLY_REFUNDED
            assert reply.payment.refunded_amount.amount_minor == 1_000
            assert dict(reply.payment.metadata) == METADATA
            assert [e[0] for e in await events_of(app, payment_id)] == [1, 2, 3, 4, 5]


async def test_malformed_encryption_keys_refuse_to_start(tmp_path: pathlib.Path) -> None:
    bad = "k1:" + base64.b64encode(b"sixteen byte key").decode()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'payments.db'}",
        "MIGRATE_ON_START": "false",
        "DATA_DIR": str(tmp_path / "data"),
        "PORT": "0",
        "ENCRYPTION_KEYS": f"{NEW},{bad}",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "payment_grpc", "serve",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 2
    message = err.decode()
    assert (
        "invalid encryption keys: ENCRYPTION_KEYS entry 2 ('k1'): key 'k1' is 16 bytes" in message
    )
    assert "Traceback" not in message
    assert bad.split(":")[1] not in message


async def test_the_same_card_has_the_same_fingerprint_and_callers_never_see_it(app, stub) -> None:
    replies = [
        await stub.Charge(charge_request(method=card(token)))
        for token in ("tok_visa", "tok_visa", "tok_mastercard")
    ]
    ids = [reply.payment.payment_id for reply in replies]
    fingerprints = [(await stored_payment(app, i)).card.fingerprint for i in ids]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
    assert all(fingerprints)
    for reply in replies:
        assert fingerprints[0] not in str(reply)
        assert fingerprints[2] not in str(reply)


async def serve_cli(settings: Settings, keys: str) -> tuple[int | None, str]:
    """`python -m payment_grpc serve` on the given database and keys; its stderr once it
    ended (a server that starts serving would hit the timeout: the test fails)."""
    env = {
        **os.environ,
        "DATABASE_URL": settings.database.url,
        "ENCRYPTION_KEYS": keys,
        "DATA_DIR": str(settings.storage.data_dir),
        "JWT_SECRET_KEY": TEST_JWT_SECRET,
        "PORT": "0",
        "LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "payment_grpc", "serve",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    except TimeoutError:
        process.kill()  # it served instead of refusing
        await process.wait()
        raise
    return process.returncode, err.decode()


async def test_a_key_id_given_other_key_material_refuses_to_serve(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path, encryption_keys=OLD)) as (_, stub):
        await stub.Charge(charge_request(method=wallet(), metadata=METADATA))

    swapped = "old:" + base64.b64encode(os.urandom(32)).decode()
    code, message = await serve_cli(make_settings(database_url, tmp_path), swapped)
    assert code == 2
    assert message.startswith("payment-grpc: invalid encryption keys: ENCRYPTION_KEYS does not")
    assert "authentication failed under key 'old'" in message
    assert message.count("\n") == 1
    assert "Traceback" not in message
    assert swapped.split(":")[1] not in message
    assert OLD.split(":")[1] not in message


async def test_a_removed_key_still_in_use_refuses_to_serve(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path, encryption_keys=OLD)) as (_, stub):
        await stub.Charge(charge_request(method=wallet(), metadata=METADATA))

    code, message = await serve_cli(make_settings(database_url, tmp_path), NEW)
    assert code == 2
    assert "unknown key id 'old' (configured: new); add it to ENCRYPTION_KEYS" in message
    assert message.count("\n") == 1


async def test_the_start_up_check_passes_with_the_keys_that_wrote_the_data(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    settings = make_settings(database_url, tmp_path, encryption_keys=OLD)
    async with serving(settings) as (app, stub):
        await check_stored_keys(app.engine, build_cipher(settings), "ENCRYPTION_KEYS")  # empty
        for _ in range(2):
            await stub.Charge(charge_request(method=wallet(), metadata=METADATA))
    rotated = make_settings(database_url, tmp_path, encryption_keys=f"{NEW},{OLD}")
    async with serving(rotated) as (app, stub):
        await stub.Charge(charge_request(method=upi()))  # newest under NEW, oldest under OLD
        await check_stored_keys(app.engine, build_cipher(rotated), "ENCRYPTION_KEYS")
        only_old = build_cipher(make_settings(database_url, tmp_path, encryption_keys=OLD))
        with pytest.raises(StoredDataUnreadable, match="unknown key id 'new'"):
            await check_stored_keys(app.engine, only_old, "ENCRYPTION_KEYS")

"""The PCI grep test: real test card numbers, in several spellings, pushed through every
string field and the request metadata of every RPC; afterwards no full card number is in
any table (every column, stored idempotent answers included), in the database files
(SQLite, -wal, -shm; the gateway ledger), in the logs (caplog and the server's own
handler) or in any answer or error sent back. On SQLite and PostgreSQL.

The door refuses card numbers in free text too (description, metadata): INVALID_ARGUMENT
naming the field, the value never echoed (rule `string.no_card_number`, rules.proto)."""

from __future__ import annotations

import io
import logging
import pathlib
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from grpc_status import rpc_status
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from payment_grpc.bootstrap import Application
from payment_grpc.logging_setup import configure_logging
from tests.helpers.builders import charge_request, usd

TEST_PANS = ("4242424242424242", "378282246310005", "5555555555554444")


def spellings(pan: str) -> list[str]:
    """Plain, spaced and dashed, grouped as printed on the card (4-4-4-4, Amex 4-6-5)."""
    groups = [pan[:4], pan[4:10], pan[10:]] if len(pan) == 15 else re.findall("....", pan)
    return [pan, " ".join(groups), "-".join(groups)]


VALUES = [spelling for pan in TEST_PANS for spelling in spellings(pan)]
# Any spelling of any test PAN: its digits with at most one space or dash between them.
LEAKS = {pan: re.compile("[ -]?".join(pan)) for pan in TEST_PANS}
LEAKS_BYTES = {pan: re.compile("[ -]?".join(pan).encode()) for pan in TEST_PANS}


def leaks(where: str, haystack: str | bytes) -> list[str]:
    patterns: dict[str, Any] = LEAKS_BYTES if isinstance(haystack, bytes) else LEAKS
    return [f"{where}: {pan}" for pan, p in patterns.items() if p.search(haystack)]


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], str]]:
    """The service's own logging (configure_logging, JSON, DEBUG; its stderr stream swapped
    for a buffer), with caplog's handler after it: the root handler comes first."""
    root = logging.getLogger()
    quiet = ("sqlalchemy", "aiosqlite", "alembic")
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in quiet}
    configure_logging("DEBUG", "json")
    output = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(output)
    root.addHandler(caplog.handler)
    try:
        yield output.getvalue
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)


class Outcomes:
    """Every answer and error of the calls, searched for card numbers at the end."""

    def __init__(self) -> None:
        self.found: list[str] = []

    async def call(
        self, label: str, call: Callable[[], Awaitable[Any]]
    ) -> grpc.aio.AioRpcError | Any:
        try:
            reply = await call()
        except grpc.aio.AioRpcError as error:
            self._error(label, error)
            return error
        if isinstance(reply, list):
            for item in reply:
                self.found += leaks(f"{label} stream reply", item.SerializeToString())
        elif reply is not None:
            self.found += leaks(f"{label} reply", reply.SerializeToString())
        return reply

    def _error(self, label: str, error: grpc.aio.AioRpcError) -> None:
        self.found += leaks(f"{label} message", error.details() or "")
        self.found += leaks(f"{label} debug string", error.debug_error_string() or "")
        for key, value in error.trailing_metadata() or ():
            self.found += leaks(f"{label} trailer {key}", value)
        status = rpc_status.from_call(error)
        if status is not None:
            self.found += leaks(f"{label} status details", status.SerializeToString())


async def _collect(stream: Any) -> list[Any]:
    return [item async for item in stream]


def _method(**kind: Any) -> pb.PaymentMethod:
    return pb.PaymentMethod(**kind)


# Charge: (field expected in the BadRequest, request for a value).
CHARGE_FIELDS: dict[str, tuple[str, Callable[[str], api.ChargeRequest]]] = {
    "order_id": ("order_id", lambda v: charge_request(order_id=v)),
    "customer_id": ("customer_id", lambda v: charge_request(customer_id=v)),
    "description": ("description", lambda v: charge_request(description=v)),
    "description-text": (
        "description",
        lambda v: charge_request(description=f"Paid with card {v}, exp 12/29. Thanks!"),
    ),
    "metadata-key": ("metadata[", lambda v: charge_request(metadata={v: "x"})),
    "metadata-value": ("metadata[", lambda v: charge_request(metadata={"note": v})),
    "metadata-value-text": (
        "metadata[",
        lambda v: charge_request(metadata={"cart": "c_1", "note": f"card: {v} (customer)"}),
    ),
    "card-token": (
        "payment_method.card.token",
        lambda v: charge_request(method=_method(card=pb.CardMethod(token=v))),
    ),
    "upi-vpa": (
        "payment_method.upi.vpa",
        lambda v: charge_request(
            currency="INR", method=_method(upi=pb.UpiMethod(vpa=f"{v}@okbank"))
        ),
    ),
    "wallet-token": (
        "payment_method.wallet.token",
        lambda v: charge_request(
            method=_method(wallet=pb.WalletMethod(provider="apple_pay", token=v))
        ),
    ),
    "wallet-provider": (
        "payment_method.wallet.provider",
        lambda v: charge_request(method=_method(wallet=pb.WalletMethod(provider=v, token="w_1"))),
    ),
    "bank-code": (
        "payment_method.net_banking.bank_code",
        lambda v: charge_request(
            currency="INR", method=_method(net_banking=pb.NetBankingMethod(bank_code=v))
        ),
    ),
    "paypal-payer-token": (
        "payment_method.paypal.payer_token",
        lambda v: charge_request(method=_method(paypal=pb.PaypalMethod(payer_token=v))),
    ),
}


def other_rpcs(stub: Any, payment_id: str) -> dict[str, Callable[[str], Awaitable[Any]]]:
    """Every other RPC's string fields."""
    return {
        "CapturePayment.payment_id": lambda v: stub.CapturePayment(
            api.CapturePaymentRequest(payment_id=v, amount=usd(100))
        ),
        "CancelPayment.payment_id": lambda v: stub.CancelPayment(
            api.CancelPaymentRequest(payment_id=v)
        ),
        "Refund.payment_id": lambda v: stub.Refund(
            api.RefundRequest(payment_id=v, amount=usd(100))
        ),
        "GetPayment.payment_id": lambda v: stub.GetPayment(api.GetPaymentRequest(payment_id=v)),
        "GetRefund.refund_id": lambda v: stub.GetRefund(api.GetRefundRequest(refund_id=v)),
        "ListPayments.order_id": lambda v: stub.ListPayments(api.ListPaymentsRequest(order_id=v)),
        "ListPayments.customer_id": lambda v: stub.ListPayments(
            api.ListPaymentsRequest(customer_id=v)
        ),
        "ListPayments.page_token": lambda v: stub.ListPayments(
            api.ListPaymentsRequest(page_token=v)
        ),
        "ListRefunds.payment_id": lambda v: stub.ListRefunds(api.ListRefundsRequest(payment_id=v)),
        "ListRefunds.page_token": lambda v: stub.ListRefunds(
            api.ListRefundsRequest(payment_id=payment_id, page_token=v)
        ),
        "WatchPaymentStatus.payment_id": lambda v: _collect(
            stub.WatchPaymentStatus(api.WatchPaymentStatusRequest(payment_id=v))
        ),
    }


# Request metadata on an otherwise valid Charge: (header, value template, expected code).
HEADERS = [
    ("x-note", "{}", grpc.StatusCode.OK),  # never read: accepted, never kept
    ("traceparent", "00-{}-00f067aa0ba902b7-01", grpc.StatusCode.OK),  # not W3C: ignored
    ("idempotency-key", "{}", grpc.StatusCode.INVALID_ARGUMENT),  # stored: refused
    ("idempotency-key", "charge:{}", grpc.StatusCode.INVALID_ARGUMENT),
    ("authorization", "Bearer {}", grpc.StatusCode.UNAUTHENTICATED),
]


def _code(outcome: Any) -> grpc.StatusCode:
    return outcome.code() if isinstance(outcome, grpc.aio.AioRpcError) else grpc.StatusCode.OK


async def _grep_tables(app: Application) -> list[str]:
    found: list[str] = []
    async with app.engine.connect() as conn:
        names = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
        assert {"payments", "payment_events", "refunds", "idempotency_keys"} <= set(names)
        for name in names:
            table = sa.table(name)
            rows = (await conn.execute(sa.select(sa.text("*")).select_from(table))).all()
            for row in rows:
                for column, value in row._mapping.items():
                    haystack = value if isinstance(value, bytes) else str(value)
                    found += leaks(f"table {name}.{column}", haystack)
    return found


def _grep_files(root: pathlib.Path) -> tuple[list[str], list[str]]:
    found, names = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        names.append(path.name)
        found += leaks(f"file {path.relative_to(root)}", path.read_bytes())
    return found, names


async def test_no_card_number_is_kept_logged_or_echoed(
    app: Application,
    stub: Any,
    caplog: pytest.LogCaptureFixture,
    server_log: Callable[[], str],
    tmp_path: pathlib.Path,
    database_url: str,
) -> None:
    outcomes = Outcomes()
    payment = (await stub.Charge(charge_request(5_000, manual=True))).payment
    refundable = (await stub.Charge(charge_request(5_000))).payment
    await stub.Refund(api.RefundRequest(payment_id=refundable.payment_id, amount=usd(100)))

    for label, (field, build) in CHARGE_FIELDS.items():
        for value in VALUES:
            outcome = await outcomes.call(label, lambda b=build, v=value: stub.Charge(b(v)))
            assert _code(outcome) == grpc.StatusCode.INVALID_ARGUMENT, (label, value)
            fields = {v.field for v in _violations(outcome)}
            assert any(f.startswith(field) for f in fields), (label, value, fields)

    for label, call in other_rpcs(stub, refundable.payment_id).items():
        for value in VALUES:
            outcome = await outcomes.call(label, lambda c=call, v=value: c(v))
            assert _code(outcome) == grpc.StatusCode.INVALID_ARGUMENT, (label, value)

    for header, template, expected in HEADERS:
        for value in VALUES:
            metadata = ((header, template.format(value)),)
            outcome = await outcomes.call(
                header, lambda m=metadata: stub.Charge(charge_request(), metadata=m)
            )
            assert _code(outcome) == expected, (header, value)

    # The pipeline is live: a card number logged by anyone comes out masked.
    logging.getLogger("payment_grpc.anywhere").warning("careless %s", TEST_PANS[0])

    found = list(outcomes.found)
    found += await _grep_tables(app)
    # Some columns are encrypted at rest: grep what they decrypt to as well.
    every = await stub.ListPayments(api.ListPaymentsRequest(page_size=1000))
    assert len(every.payments) >= 2 + len(VALUES) * 2  # the ones accepted above
    found += leaks("payments as read back", every.SerializeToString())
    files, names = _grep_files(tmp_path)
    found += files
    if database_url.startswith("sqlite"):
        assert "payments.db" in names, names
        assert "gateway.db" in names, names
    stderr = server_log()
    found += leaks("server log (stderr)", stderr)
    found += leaks("caplog text", caplog.text)
    for record in caplog.records:
        found += leaks(f"caplog record {record.name}", repr(record.__dict__))
    assert not found, "\n".join(found)

    # What was accepted still works and the logs are there (not just empty).
    assert '"message": "rpc finished"' in stderr
    assert "careless 424242******4242" in stderr
    assert "careless 424242******4242" in caplog.text
    got = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment.payment_id))
    assert got.payment.status == pb.PAYMENT_STATUS_AUTHORIZED


def _violations(error: Any) -> list[Any]:
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(error)
    found: list[Any] = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += bad.field_violations
    return found


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (charge_request(description="Card 4242 4242 4242 4242"), "description"),
        (charge_request(metadata={"note": "pan=5555-5555-5555-4444"}), "metadata['note']"),
        (charge_request(metadata={"4242424242424242": "x"}), "metadata['424242******4242']"),
    ],
)
async def test_free_text_with_a_card_number_is_refused_naming_the_field(
    stub: Any, request_: api.ChargeRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Charge(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = [(v.field, v.description) for v in _violations(caught.value)]
    assert (field, "must not contain a card number") in violations
    assert field in (caught.value.details() or "")


async def test_free_text_with_other_numbers_is_kept_as_given(stub: Any) -> None:
    request = charge_request(
        description="Order 20241122-000123, 2 tickets, 12 x 4999 = 59988",
        metadata={"cart": "ord_1234567890123456", "phone": "+1 415 555 2671"},
    )
    reply = await stub.Charge(request)
    assert reply.payment.description == request.description
    assert dict(reply.payment.metadata) == dict(request.metadata)

"""The checks on outside values and the columns that store them agree.

Each limit is read from the schema (adapters/db/tables.py) and compared with the check
that guards the column: the limits in service/limits.py, the idempotency-key check, and
the protovalidate max_len of every request field that is stored. A column shortened or a
check widened without the other fails here, not as INTERNAL on PostgreSQL.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from buf.validate import validate_pb2
from google.protobuf.descriptor import Descriptor
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from payment_grpc.adapters.db.tables import idempotency_keys, payment_events, payments, refunds
from payment_grpc.api.interceptors.idempotency import valid_key
from payment_grpc.service import limits
from payment_grpc.service.errors import InvalidIdempotencyKey


def length(column: sa.Column[object]) -> int:
    kind = column.type
    assert isinstance(kind, sa.String), column
    assert kind.length is not None, column
    return kind.length


def max_len(message: Descriptor, field: str) -> int:
    options = message.fields_by_name[field].GetOptions()
    return int(options.Extensions[validate_pb2.field].string.max_len)


def test_subject_limit_is_what_its_columns_hold() -> None:
    assert (
        min(length(idempotency_keys.c.scope), length(payment_events.c.actor))
        == limits.MAX_SUBJECT_LENGTH
    )


def test_customer_id_limit_is_the_column() -> None:
    assert length(payments.c.customer_id) == limits.MAX_CUSTOMER_ID_LENGTH


def test_id_limit_is_the_id_columns() -> None:
    assert limits.MAX_ID_LENGTH == length(payments.c.id) == length(refunds.c.id)


def test_idempotency_key_check_is_the_column() -> None:
    longest = length(idempotency_keys.c.key)
    assert longest == limits.MAX_IDEMPOTENCY_KEY_LENGTH
    assert valid_key("k" * longest) == "k" * longest
    with pytest.raises(InvalidIdempotencyKey):
        valid_key("k" * (longest + 1))


@pytest.mark.parametrize(
    ("message", "field", "column"),
    [
        (api.ChargeRequest.DESCRIPTOR, "order_id", payments.c.order_id),
        (api.ChargeRequest.DESCRIPTOR, "customer_id", payments.c.customer_id),
        (api.ChargeRequest.DESCRIPTOR, "description", payments.c.description),
        (pb.CardMethod.DESCRIPTOR, "token", payments.c.method_token),
        (pb.UpiMethod.DESCRIPTOR, "vpa", payments.c.method_token),
        (pb.WalletMethod.DESCRIPTOR, "token", payments.c.method_token),
        (pb.WalletMethod.DESCRIPTOR, "provider", payments.c.wallet_provider),
        (pb.NetBankingMethod.DESCRIPTOR, "bank_code", payments.c.bank_code),
        (pb.PaypalMethod.DESCRIPTOR, "payer_token", payments.c.method_token),
        (api.GetPaymentRequest.DESCRIPTOR, "payment_id", payments.c.id),
        (api.GetRefundRequest.DESCRIPTOR, "refund_id", refunds.c.id),
    ],
)
def test_every_stored_request_field_fits_its_column(
    message: Descriptor, field: str, column: sa.Column[object]
) -> None:
    assert 0 < max_len(message, field) <= length(column)


@pytest.mark.parametrize(
    ("limit", "column"),
    [
        (limits.MAX_SUBJECT_LENGTH, idempotency_keys.c.scope),
        (limits.MAX_CUSTOMER_ID_LENGTH, payments.c.customer_id),
    ],
)
def test_storable_text_stops_at_the_column(limit: int, column: sa.Column[object]) -> None:
    assert limits.storable_text("s" * length(column), limit)
    assert not limits.storable_text("s" * (length(column) + 1), limit)


@pytest.mark.parametrize("value", ["", "  ", "a\x00b", "a\x1bb", "\ud800", "a\nb", 7, None, ["a"]])
def test_storable_text_refuses(value: object) -> None:
    assert not limits.storable_text(value, 255)


def test_ids_follow_the_proto_pattern() -> None:
    assert limits.valid_id("pay_0123abc")
    for odd in ("", "pay_\x00", "pay-1", "p" * 65, "pay_\U0001f4b8", 12):
        assert not limits.valid_id(odd)

"""The idempotency-key header rule and the request fingerprint."""

from __future__ import annotations

import pytest
from payments.v1 import payment_service_pb2 as api

from payment_grpc.api.interceptors.idempotency import fingerprint, valid_key
from payment_grpc.service.errors import InvalidIdempotencyKey


@pytest.mark.parametrize("key", ["a", "order-42:charge:1", "~" * 255, " spaced key "])
def test_printable_ascii_up_to_255_is_accepted(key: str) -> None:
    assert valid_key(key) == key


@pytest.mark.parametrize("key", [None, "", "x" * 256, "tab\there", "ключ", "nul\x00", b"bytes"])
def test_anything_else_is_refused(key: object) -> None:
    with pytest.raises(InvalidIdempotencyKey):
        valid_key(key)


def test_fingerprint_is_deterministic_and_covers_method_and_body() -> None:
    one = api.ChargeRequest(order_id="o", metadata={"a": "1", "b": "2"})
    same = api.ChargeRequest(order_id="o", metadata={"b": "2", "a": "1"})
    other = api.ChargeRequest(order_id="p")
    method = "/payments.v1.PaymentService/Charge"
    assert fingerprint(method, one) == fingerprint(method, same)
    assert fingerprint(method, one) != fingerprint(method, other)
    assert fingerprint(method, one) != fingerprint("/payments.v1.PaymentService/Refund", one)

"""Money: integer minor units, exponent-aware, never mixed across currencies."""

from __future__ import annotations

import pytest
from payments.v1 import resources_pb2

from payment_grpc.domain.errors import CurrencyMismatch, InvalidAmount
from payment_grpc.domain.money import CURRENCY_EXPONENTS, MAX_AMOUNT_MINOR, Money


def _proto_rules() -> tuple[list[str], int]:
    field = resources_pb2.Money.DESCRIPTOR.fields_by_name
    from buf.validate import validate_pb2

    currency = field["currency"].GetOptions().Extensions[validate_pb2.field].string
    amount = field["amount_minor"].GetOptions().Extensions[validate_pb2.field].int64
    return list(currency.__getattribute__("in")), amount.lte


def test_proto_and_domain_agree_on_currencies_and_maximum() -> None:
    currencies, maximum = _proto_rules()
    assert sorted(currencies) == sorted(CURRENCY_EXPONENTS)
    assert maximum == MAX_AMOUNT_MINOR


@pytest.mark.parametrize(
    ("money", "shown"),
    [
        (Money("USD", 1999), "19.99 USD"),
        (Money("USD", 5), "0.05 USD"),
        (Money("JPY", 500), "500 JPY"),
        (Money("KWD", 1250), "1.250 KWD"),
    ],
)
def test_display_is_exponent_aware(money: Money, shown: str) -> None:
    assert str(money) == shown


def test_arithmetic_stays_in_one_currency() -> None:
    assert Money("EUR", 700) + Money("EUR", 300) == Money("EUR", 1000)
    assert Money("EUR", 700) - Money("EUR", 300) == Money("EUR", 400)
    with pytest.raises(CurrencyMismatch):
        _ = Money("EUR", 1) + Money("USD", 1)


@pytest.mark.parametrize(
    ("currency", "amount"), [("XXX", 1), ("USD", -1), ("USD", MAX_AMOUNT_MINOR + 1)]
)
def test_invalid_money_is_refused(currency: str, amount: int) -> None:
    with pytest.raises(InvalidAmount):
        Money(currency, amount)

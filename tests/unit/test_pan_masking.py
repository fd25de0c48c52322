"""PAN masking in logs (PCI DSS 3.3/3.4) and the door rule shared with the protos."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from buf.validate import validate_pb2
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb
from payments.v1 import rules_pb2

from payment_grpc.api.interceptors.idempotency import valid_key
from payment_grpc.logging_setup import JsonFormatter, TextFormatter
from payment_grpc.pan_masking import (
    CARD_NUMBER_PATTERN,
    PanMaskingFilter,
    looks_like_card_number,
    luhn_valid,
    mask_pans,
)
from payment_grpc.service.errors import InvalidIdempotencyKey

VISA, AMEX, MASTERCARD = "4242424242424242", "378282246310005", "5555555555554444"
VISA_MASKED, AMEX_MASKED, MC_MASKED = "424242******4242", "378282*****0005", "555555******4444"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VISA, VISA_MASKED),
        ("4242 4242 4242 4242", VISA_MASKED),
        ("4242-4242-4242-4242", VISA_MASKED),
        (AMEX, AMEX_MASKED),
        ("3782 822463 10005", AMEX_MASKED),
        ("3782-822463-10005", AMEX_MASKED),
        (MASTERCARD, MC_MASKED),
        ("5555-5555-5555-4444", MC_MASKED),
        ("5555 5555 5555 4444", MC_MASKED),
        ("4222222222222", "422222***2222"),  # 13-digit Visa test number
        ("4222 2222 2222 2", "422222***2222"),
        ("6011 0009 9013 9424", "601100******9424"),  # Discover
    ],
)
def test_test_pans_are_masked_to_bin_and_last4(text: str, expected: str) -> None:
    assert mask_pans(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"charging card {VISA} for order 42", f"charging card {VISA_MASKED} for order 42"),
        ("pan=4242 4242 4242 4242, exp 12/29", f"pan={VISA_MASKED}, exp 12/29"),
        (f"{{'card': '{AMEX}'}}", f"{{'card': '{AMEX_MASKED}'}}"),
        (f"tok_{MASTERCARD}.", f"tok_{MC_MASKED}."),
        (f"two: {VISA} and 5555-5555-5555-4444", f"two: {VISA_MASKED} and {MC_MASKED}"),
        # A PAN followed by a CVV or preceded by another number is still found.
        ("card 4242 4242 4242 4242 123", f"card {VISA_MASKED} 123"),
        ("qty 2 4242 4242 4242 4242", f"qty 2 {VISA_MASKED}"),
        (f"line1\n{VISA}\nline3", f"line1\n{VISA_MASKED}\nline3"),
    ],
)
def test_pans_embedded_in_text_are_masked(text: str, expected: str) -> None:
    assert mask_pans(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "order 4242424242424241",  # fails Luhn
        "1732251633822264",  # a microsecond timestamp (fails Luhn)
        "2026-11-22 04:40:33,822",
        "ord-20241122-000123",
        "4242 4242 4242 4241",
        "123456789012",  # 12 digits: too short
        "42424242424242424242",  # 20 digits: too long to be a PAN
        "pay_8e69a41e189444eaacad37138de7ef54",
        "pay_4242424242424242abc",  # glued to letters: part of an identifier
        "amount 4999 USD",
        "42 42 42 42 42 42 42 42",  # not a card grouping
        "1-2-3-4-5-6-7-8-9-1-2-3-4-5-6-7",
        "",
    ],
)
def test_non_pans_are_left_alone(text: str) -> None:
    assert mask_pans(text) == text


def test_luhn() -> None:
    assert all(luhn_valid(pan) for pan in (VISA, AMEX, MASTERCARD))
    assert not luhn_valid("4242424242424241")


# --- the logging filter ---------------------------------------------------------------


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO, io.StringIO]]:
    """A logger with a text and a JSON handler, the filter on the first (as configured)."""
    text, as_json = io.StringIO(), io.StringIO()
    first = logging.StreamHandler(text)
    first.setFormatter(TextFormatter())
    first.addFilter(PanMaskingFilter())
    second = logging.StreamHandler(as_json)
    second.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.pan_masking")
    logger.handlers[:] = [first, second]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield logger, text, as_json
    finally:
        logger.handlers.clear()
        logger.propagate = True


def _no_pan(*outputs: io.StringIO) -> str:
    joined = "\n".join(out.getvalue() for out in outputs)
    for pan in (VISA, AMEX, MASTERCARD, "4242 4242 4242 4242", "5555-5555-5555-4444"):
        assert pan not in joined
    return joined


def test_message_and_args_are_masked(logged) -> None:
    logger, text, as_json = logged
    logger.info("card %s declined", VISA)
    logger.info(f"card {AMEX} declined")
    logger.info("card %(pan)s", {"pan": "5555-5555-5555-4444"})
    joined = _no_pan(text, as_json)
    assert f"card {VISA_MASKED} declined" in joined
    assert f"card {AMEX_MASKED} declined" in joined
    assert f"card {MC_MASKED}" in joined


def test_extra_fields_are_masked(logged) -> None:
    logger, text, as_json = logged
    logger.info(
        "charged",
        extra={"card": "4242 4242 4242 4242", "number": int(AMEX), "body": {"pan": MASTERCARD}},
    )
    _no_pan(text, as_json)
    record = json.loads(as_json.getvalue())
    assert record["card"] == VISA_MASKED
    assert record["number"] == AMEX_MASKED
    assert MC_MASKED in record["body"]


def test_exception_messages_and_tracebacks_are_masked(logged) -> None:
    logger, text, as_json = logged

    def charge(pan: str) -> None:
        raise ValueError(f"gateway refused card {pan}")

    try:
        try:
            charge(VISA)
        except ValueError as exc:
            raise RuntimeError("retry failed for 5555-5555-5555-4444") from exc
    except RuntimeError:
        logger.exception("charge failed")
    joined = _no_pan(text, as_json)
    assert f"ValueError: gateway refused card {VISA_MASKED}" in joined
    assert f"RuntimeError: retry failed for {MC_MASKED}" in joined
    assert "Traceback (most recent call last)" in text.getvalue()
    assert "Traceback" in json.loads(as_json.getvalue())["exception"]


def test_stack_info_is_masked() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None, sinfo=VISA)
    PanMaskingFilter().filter(record)
    assert record.stack_info == VISA_MASKED


def test_records_without_pans_are_untouched(logged) -> None:
    logger, text, _ = logged
    logger.info("rpc finished", extra={"trace_id": "0af7651916cd43dd8448eb211c80319c", "ms": 1.5})
    logger.info("order %s for %d", "ord-20241122-000123", 1732251633822264)
    out = text.getvalue()
    assert "trace_id=0af7651916cd43dd8448eb211c80319c ms=1.5" in out
    assert "order ord-20241122-000123 for 1732251633822264" in out


def test_a_broken_format_still_masks() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "card %s %s", (VISA,), None)
    PanMaskingFilter().filter(record)
    assert VISA not in str(record.msg) + repr(record.args)


def test_configure_logging_installs_the_filter() -> None:
    from tests.helpers.logs import service_logging

    with service_logging() as output:
        logging.getLogger("payment_grpc.anything").warning("card %s", VISA)
    err = output.getvalue()
    assert VISA_MASKED in err
    assert VISA not in err


# --- the door rule --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        VISA,
        "4242 4242 4242 4242",
        "4242-4242-4242-4242",
        "3782 822463 10005",
        "card 5555-5555-5555-4444 exp 12/29",
        "4242 4242 4242 4242 123",
        "4242424242424241",  # no Luhn at the door: any 13-19 digit number is refused
        "ord-4242424242424242",
    ],
)
def test_door_rule_refuses_card_shaped_numbers(text: str) -> None:
    assert looks_like_card_number(text)


@pytest.mark.parametrize(
    "text",
    [
        "ord_4242424242424242",  # `_` glues: hex ids like ord_<16 hex> must pass
        "pay_8e69a41e189444eaacad37138de7ef54",
        "8e69a41e-1894-44ea-acad-37138de7ef54",
        "ord-20241122-000123",
        "2026-11-22 04:40:33",
        "+1 415 555 2671",
        "123456789012",
        "42424242424242424242",
        "two tickets",
    ],
)
def test_door_rule_lets_identifiers_and_text_pass(text: str) -> None:
    assert not looks_like_card_number(text)


def _rule_expressions() -> list[str]:
    predefined = rules_pb2.no_card_number.GetOptions().Extensions[validate_pb2.predefined]
    card_token = pb.CardMethod.DESCRIPTOR.fields_by_name["token"].GetOptions()
    field_rules = card_token.Extensions[validate_pb2.field]
    return [rule.expression for rule in [*predefined.cel, *field_rules.cel]]


def test_the_protos_use_the_same_pattern() -> None:
    expressions = _rule_expressions()
    assert len(expressions) == 2
    for expression in expressions:
        assert f"!this.matches('{CARD_NUMBER_PATTERN}')" in expression


CARRY_THE_RULE = [
    (api.ChargeRequest, ("order_id", "customer_id", "description")),
    (pb.UpiMethod, ("vpa",)),
    (pb.WalletMethod, ("provider", "token")),
    (pb.NetBankingMethod, ("bank_code",)),
    (pb.PaypalMethod, ("payer_token",)),
    (api.CapturePaymentRequest, ("payment_id",)),
    (api.CancelPaymentRequest, ("payment_id",)),
    (api.RefundRequest, ("payment_id",)),
    (api.GetPaymentRequest, ("payment_id",)),
    (api.GetRefundRequest, ("refund_id",)),
    (api.ListPaymentsRequest, ("order_id", "customer_id")),
    (api.ListRefundsRequest, ("payment_id",)),
    (api.WatchPaymentStatusRequest, ("payment_id",)),
]


@pytest.mark.parametrize(("message", "names"), CARRY_THE_RULE)
def test_identifiers_and_free_text_carry_the_rule(message: Any, names: tuple[str, ...]) -> None:
    for name in names:
        field = message.DESCRIPTOR.fields_by_name[name]
        rules = field.GetOptions().Extensions[validate_pb2.field]
        assert rules.string.Extensions[rules_pb2.no_card_number], name


def test_metadata_keys_and_values_carry_the_rule() -> None:
    field = api.ChargeRequest.DESCRIPTOR.fields_by_name["metadata"]
    rules = field.GetOptions().Extensions[validate_pb2.field].map
    assert rules.keys.string.Extensions[rules_pb2.no_card_number]
    assert rules.values.string.Extensions[rules_pb2.no_card_number]


@pytest.mark.parametrize("key", [VISA, "3782 822463 10005", "charge:5555-5555-5555-4444"])
def test_an_idempotency_key_holding_a_card_number_is_refused(key: str) -> None:
    with pytest.raises(InvalidIdempotencyKey):
        valid_key(key)


def test_the_http_client_libraries_log_only_warnings() -> None:
    """The Stripe SDK and httpx would log three INFO lines per gateway call."""
    from payment_grpc.logging_setup import configure_logging

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json")
        quiet = [
            name
            for name in ("stripe", "httpx", "httpcore")
            if not logging.getLogger(name).isEnabledFor(logging.INFO)
        ]
        assert logging.getLogger("payment_grpc.anything").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    assert quiet == ["stripe", "httpx", "httpcore"]

"""Hostile input over the wire, to EVERY RPC of payments.v1.PaymentService on a real server.

Requests come from hypothesis strategies built from the proto descriptors (and their
protovalidate rules): random values per field type, huge and unicode strings, full int32 /
int64 ranges, unknown enum numbers, missing oneofs, unset nested messages, maps; plus valid
requests with a few fields mutated (so the use cases run too), hand-written edge cases, and
random bytes sent as the serialized message.

Every answer is OK or an expected code carrying a google.rpc ErrorInfo (domain payments.v1);
never UNKNOWN, never INTERNAL from our code; a rejected call writes no row; nothing is
logged at ERROR (no traceback); afterwards the server is healthy and a normal Charge works.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from buf.validate import validate_pb2
from google.protobuf import descriptor, message_factory, text_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from payment_grpc.bootstrap import Application
from payment_grpc.config import Settings
from tests.conftest import make_settings
from tests.helpers.builders import S, card, charge_request, usd
from tests.helpers.calls import RichError
from tests.helpers.db import row_counts

SERVICE = api.DESCRIPTOR.services_by_name["PaymentService"]
METHODS = {method.name: method for method in SERVICE.methods}
RPCS = tuple(METHODS)
DOMAIN = "payments.v1"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_EXAMPLES_PER_RPC = 45
MAX_RAW_EXAMPLES = 120
WATCH_IDLE_S = 0.25  # a watch that sends nothing more for this long is live: cancel it

# Codes our code may answer with for a bad or untimely request (DESIGN.md "API rules").
EXPECTED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


@pytest.fixture
def settings(database_url: str, tmp_path: pathlib.Path) -> Settings:
    return make_settings(
        database_url,
        tmp_path,
        # Every charge gets a decided answer (no simulated lost responses), and UPI/net
        # banking/PayPal stay PROCESSING for the whole test: no background settlement may
        # write a row while a rejected call is being checked.
        gateway_success_rate=1.0,
        gateway_async_settle_ms=3_600_000,
    )


# ------------------------------------------------------------------ hostile values

UNICODE = st.characters(exclude_categories=("Cs",))  # a lone surrogate has no UTF-8 form
HOSTILE_STRINGS = (
    "",
    " ",
    "\x00",
    "pay_\x00abc",
    "abc\x00",
    "\u202epay_gnp.exe",  # RTL override
    "\u200f\u200e\u202b\u202c",
    "\ufeff",
    "\u200b",
    "\U0001f4b3\U0001f4b8\U0001f525",  # emoji
    "\U0001f469\U0001f3fd\u200d\U0001f4bb",  # ZWJ sequence
    "\uff35\uff33\uff24",  # fullwidth USD
    "\U0010ffff",
    "\t\r\n",
    "%00%n%s",
    "' OR '1'='1",
    "${jndi:ldap://x}",
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "4242424242424242",
    "NaN",
    "-0",
    "pay_" + "f" * 32,
    "re_" + "0" * 32,
    "A" * 64,
    "A" * 65,
)
HUGE_STRINGS = tuple(c * 10_000 for c in ("A", "\u00e9", "\U0001f4b8", "\x00", "\u202e", "7"))
HOSTILE_TEXT = st.one_of(
    st.text(UNICODE, max_size=64),
    st.sampled_from(HOSTILE_STRINGS),
    st.sampled_from(HUGE_STRINGS),
    st.builds(
        lambda unit, n: (unit * n)[:10_000],
        st.text(UNICODE, min_size=1, max_size=4),
        st.integers(1, 10_000),
    ),
)
INT64_EDGES = (0, 1, -1, INT64_MIN, INT64_MAX, INT32_MIN, INT32_MAX, 2**32, 99_999_999_999)
INT32_EDGES = (0, 1, -1, INT32_MIN, INT32_MAX, 50, 1000, 1001)

F = descriptor.FieldDescriptor
INT_TYPES: dict[int, tuple[str, int, int, tuple[int, ...]]] = {
    F.TYPE_INT32: ("int32", INT32_MIN, INT32_MAX, INT32_EDGES),
    F.TYPE_SINT32: ("sint32", INT32_MIN, INT32_MAX, INT32_EDGES),
    F.TYPE_SFIXED32: ("sfixed32", INT32_MIN, INT32_MAX, INT32_EDGES),
    F.TYPE_INT64: ("int64", INT64_MIN, INT64_MAX, INT64_EDGES),
    F.TYPE_SINT64: ("sint64", INT64_MIN, INT64_MAX, INT64_EDGES),
    F.TYPE_SFIXED64: ("sfixed64", INT64_MIN, INT64_MAX, INT64_EDGES),
    F.TYPE_UINT32: ("uint32", 0, 2**32 - 1, (0, 1, 2**32 - 1)),
    F.TYPE_FIXED32: ("fixed32", 0, 2**32 - 1, (0, 1, 2**32 - 1)),
    F.TYPE_UINT64: ("uint64", 0, 2**64 - 1, (0, 1, 2**64 - 1)),
    F.TYPE_FIXED64: ("fixed64", 0, 2**64 - 1, (0, 1, 2**64 - 1)),
}
MAX_DEPTH = 4


def _rules(field: descriptor.FieldDescriptor) -> validate_pb2.FieldRules | None:
    options = field.GetOptions()
    if not options.HasExtension(validate_pb2.field):
        return None
    rules: validate_pb2.FieldRules = options.Extensions[validate_pb2.field]
    return rules


def _is_map(field: descriptor.FieldDescriptor) -> bool:
    return field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


class RequestStrategies:
    """Strategies for any message, read from its descriptor: each field drawn by type
    (and around its protovalidate limits), with domain hints by field name mixed in."""

    def __init__(self, hints: dict[str, st.SearchStrategy[Any]]) -> None:
        self._hints = hints
        self._cache: dict[tuple[str, int], st.SearchStrategy[Any]] = {}

    def message(self, message: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
        return _messages(self, message, depth)

    def field(self, field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        key = (field.full_name, depth)
        if key not in self._cache:
            self._cache[key] = self._build(field, depth)
        return self._cache[key]

    def _build(self, field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        rules = _rules(field)
        if _is_map(field):
            entry = field.message_type
            map_rules = rules.map if rules is not None and rules.HasField("map") else None
            keys = self._single(entry.fields_by_name["key"], map_rules and map_rules.keys, depth)
            values = self._single(
                entry.fields_by_name["value"], map_rules and map_rules.values, depth
            )
            many = st.integers(18, 24).map(lambda n: {f"k{i}": "v" for i in range(n)})
            return st.one_of(st.dictionaries(keys, values, max_size=4), many)
        if field.is_repeated:
            return st.lists(self._single(field, None, depth), max_size=4)
        return self._single(field, rules, depth)

    def _single(
        self,
        field: descriptor.FieldDescriptor,
        rules: validate_pb2.FieldRules | None,
        depth: int,
    ) -> st.SearchStrategy[Any]:
        options: list[st.SearchStrategy[Any]] = []
        if field.type == F.TYPE_MESSAGE:
            if depth >= MAX_DEPTH:
                return st.just(message_factory.GetMessageClass(field.message_type)())
            options.append(self.message(field.message_type, depth + 1))
        elif field.type == F.TYPE_ENUM:
            defined = [value.number for value in field.enum_type.values]
            options += [
                st.sampled_from(defined),
                st.sampled_from((-1, 99, INT32_MIN, INT32_MAX)),
                st.integers(INT32_MIN, INT32_MAX),  # open enum: any int32 goes on the wire
            ]
        elif field.type == F.TYPE_STRING:
            options += [HOSTILE_TEXT, *_string_rule_values(rules)]
        elif field.type in INT_TYPES:
            kind, low, high, edges = INT_TYPES[field.type]
            options += [st.integers(low, high), st.sampled_from(edges)]
            options += _int_rule_values(rules, kind, low, high)
        elif field.type == F.TYPE_BOOL:
            options.append(st.booleans())
        elif field.type == F.TYPE_BYTES:
            options.append(st.binary(max_size=64))
        elif field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            options.append(st.floats(width=64 if field.type == F.TYPE_DOUBLE else 32))
        else:  # pragma: no cover - groups do not exist in proto3
            raise NotImplementedError(field.full_name)
        if field.name in self._hints:
            options.append(self._hints[field.name])
        return st.one_of(options)


def _string_rule_values(rules: validate_pb2.FieldRules | None) -> list[st.SearchStrategy[str]]:
    if rules is None or not rules.HasField("string"):
        return []
    string = rules.string
    found: list[st.SearchStrategy[str]] = []
    if string.pattern:
        found.append(st.from_regex(string.pattern, fullmatch=True))
    allowed = list(getattr(string, "in"))
    if allowed:
        found.append(st.sampled_from(allowed))
    lengths = set()
    if string.HasField("min_len"):
        lengths |= {string.min_len, max(string.min_len - 1, 0)}
    if string.HasField("max_len"):
        lengths |= {string.max_len, string.max_len + 1}
    if lengths:
        found.append(
            st.builds(lambda c, n: c * n, st.sampled_from("A0a_"), st.sampled_from(sorted(lengths)))
        )
    return found


def _int_rule_values(
    rules: validate_pb2.FieldRules | None, kind: str, low: int, high: int
) -> list[st.SearchStrategy[int]]:
    if rules is None or not rules.HasField(kind):  # type: ignore[arg-type]
        return []
    limits = getattr(rules, kind)
    values = {
        v + delta
        for name in ("gte", "gt", "lte", "lt", "const")
        if limits.HasField(name)
        for v in [getattr(limits, name)]
        for delta in (-1, 0, 1)
    }
    return [st.sampled_from(sorted(v for v in values if low <= v <= high))] if values else []


def _assign(message: Message, field: descriptor.FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name) if field.type == F.TYPE_MESSAGE else None
    if _is_map(field):
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            if value_field.type == F.TYPE_MESSAGE:
                target[key].CopyFrom(item)  # type: ignore[index]
            else:
                target[key] = item  # type: ignore[index]
    elif field.is_repeated:
        container = getattr(message, field.name)
        for item in value:
            if field.type == F.TYPE_MESSAGE:
                container.add().CopyFrom(item)
            else:
                container.append(item)
    elif target is not None:
        target.CopyFrom(value)
        target.SetInParent()  # set, even when empty
    else:
        setattr(message, field.name, value)


@st.composite
def _messages(
    draw: st.DrawFn, strategies: RequestStrategies, message: descriptor.Descriptor, depth: int
) -> Message:
    built: Message = message_factory.GetMessageClass(message)()
    for oneof in message.oneofs:  # none (the oneof missing) or exactly one member
        member = draw(st.sampled_from([None, *oneof.fields]))
        if member is not None:
            _assign(built, member, draw(strategies.field(member, depth)))
    for field in message.fields:
        if field.containing_oneof is None and draw(st.booleans()):  # else: left unset
            _assign(built, field, draw(strategies.field(field, depth)))
    return built


def _mutate(draw: st.DrawFn, message: Message, strategies: RequestStrategies, depth: int) -> None:
    fields = list(message.DESCRIPTOR.fields)
    if not fields:
        return
    field = draw(st.sampled_from(fields))
    action = draw(st.sampled_from(("clear", "replace", "descend")))
    nested = field.type == F.TYPE_MESSAGE and not field.is_repeated
    if action == "descend" and nested and message.HasField(field.name) and depth < MAX_DEPTH:
        _mutate(draw, getattr(message, field.name), strategies, depth + 1)
        return
    message.ClearField(field.name)
    if action != "clear":
        _assign(message, field, draw(strategies.field(field, depth)))


@st.composite
def _mutated(
    draw: st.DrawFn, base: st.SearchStrategy[Message], strategies: RequestStrategies
) -> Message:
    """A valid request with 0-3 fields (at any depth) cleared or replaced by hostile values."""
    request: Message = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        _mutate(draw, request, strategies, 0)
    return request


# ------------------------------------------------------------------ known data


@dataclass(frozen=True)
class Known:
    payment_ids: tuple[str, ...]
    refund_ids: tuple[str, ...]
    order_ids: tuple[str, ...]
    page_tokens: tuple[str, ...]


CUSTOMER = "cus_hostile"
VALID_METHODS = (
    card("tok_visa"),
    card("tok_mastercard"),
    card("tok_chargeDeclined"),
    card("tok_unknown_1"),
    pb.PaymentMethod(upi=pb.UpiMethod(vpa="alice@okbank")),
    pb.PaymentMethod(wallet=pb.WalletMethod(provider="apple_pay", token="wtok_1")),
    pb.PaymentMethod(net_banking=pb.NetBankingMethod(bank_code="HDFC")),
    pb.PaymentMethod(paypal=pb.PaypalMethod(payer_token="payer_1")),
    pb.PaymentMethod(cod=pb.CodMethod()),
)


async def seed(stub: Any) -> Known:
    """Payments in several states (and a refund), so valid ids reach the use cases."""

    async def charge(request: api.ChargeRequest) -> pb.Payment:
        payment: pb.Payment = (await stub.Charge(request)).payment
        return payment

    captured = await charge(charge_request(10_000, customer_id=CUSTOMER))
    authorized = await charge(charge_request(5_000, manual=True))
    partly = await charge(charge_request(8_000))
    refund = await stub.Refund(
        api.RefundRequest(payment_id=partly.payment_id, amount=usd(1_000), reason=1)
    )
    declined = await charge(charge_request(3_000, card("tok_chargeDeclined")))
    canceled = await charge(charge_request(4_000, manual=True))
    await stub.CancelPayment(api.CancelPaymentRequest(payment_id=canceled.payment_id))
    yen = await charge(charge_request(500, currency="JPY"))
    cod = await charge(charge_request(700, pb.PaymentMethod(cod=pb.CodMethod())))
    upi = await charge(charge_request(900, pb.PaymentMethod(upi=pb.UpiMethod(vpa="a@ok"))))
    page = await stub.ListPayments(api.ListPaymentsRequest(page_size=1))
    assert declined.status == S.PAYMENT_STATUS_FAILED
    assert refund.refund.refund_id
    payments = (captured, authorized, partly, declined, canceled, yen, cod, upi)
    return Known(
        payment_ids=tuple(p.payment_id for p in payments),
        refund_ids=(refund.refund.refund_id,),
        order_ids=tuple(p.order_id for p in payments),
        page_tokens=(page.next_page_token,),
    )


def _hints(known: Known) -> dict[str, st.SearchStrategy[Any]]:
    fresh_hex = st.uuids().map(lambda u: u.hex)
    tokens = st.sampled_from(known.page_tokens)
    return {
        "payment_id": st.one_of(
            st.sampled_from(known.payment_ids), fresh_hex.map(lambda h: f"pay_{h}")
        ),
        "refund_id": st.one_of(
            st.sampled_from(known.refund_ids), fresh_hex.map(lambda h: f"re_{h}")
        ),
        "order_id": st.sampled_from(known.order_ids),
        "customer_id": st.just(CUSTOMER),
        "page_token": st.one_of(
            tokens, tokens.map(lambda t: t[:-3]), tokens.map(lambda t: t[::-1]), st.just("e30=")
        ),
        "amount_minor": st.integers(1, 20_000),
        "token": st.sampled_from(("tok_visa", "tok_chargeDeclined", "tok_amex")),
    }


def _bases(known: Known) -> dict[str, st.SearchStrategy[Message]]:
    """Valid requests per RPC (mutated afterwards)."""
    pay = st.sampled_from(known.payment_ids)
    money = st.builds(usd, st.integers(1, 20_000), st.sampled_from(("USD", "JPY", "EUR")))

    def with_amount(request: Message, amount: pb.Money | None) -> Message:
        if amount is not None:
            request.amount.CopyFrom(amount)  # type: ignore[attr-defined]
        return request

    return {
        "Charge": st.builds(
            lambda amount, method, manual, u: charge_request(
                amount, method, manual=manual, order_id=f"ord_{u.hex[:16]}"
            ),
            st.integers(1, 20_000),
            st.sampled_from(VALID_METHODS),
            st.booleans(),
            st.uuids(),
        ),
        "CapturePayment": st.builds(
            lambda p, m: with_amount(api.CapturePaymentRequest(payment_id=p), m),
            pay,
            st.none() | money,
        ),
        "CancelPayment": st.builds(lambda p: api.CancelPaymentRequest(payment_id=p), pay),
        "Refund": st.builds(
            lambda p, m, r: with_amount(api.RefundRequest(payment_id=p, reason=r), m),
            pay,
            st.none() | money,
            st.integers(0, 3),
        ),
        "GetPayment": st.builds(lambda p: api.GetPaymentRequest(payment_id=p), pay),
        "ListPayments": st.builds(
            lambda o, s, n: api.ListPaymentsRequest(order_id=o, status=s, page_size=n),
            st.just("") | st.sampled_from(known.order_ids),
            st.integers(0, 8),
            st.integers(0, 3),
        ),
        "GetRefund": st.builds(
            lambda r: api.GetRefundRequest(refund_id=r), st.sampled_from(known.refund_ids)
        ),
        "ListRefunds": st.builds(lambda p: api.ListRefundsRequest(payment_id=p), pay),
        "WatchPaymentStatus": st.builds(
            lambda p, f: api.WatchPaymentStatusRequest(payment_id=p, follow_refunds=f),
            pay,
            st.booleans(),
        ),
        "WatchPayments": st.builds(
            lambda o, s: api.WatchPaymentsRequest(order_id=o, statuses=s),
            st.just("") | st.sampled_from(known.order_ids),
            st.lists(st.integers(1, 8), max_size=3),
        ),
    }


def request_strategy(rpc: str, known: Known) -> st.SearchStrategy[Message]:
    strategies = RequestStrategies(_hints(known))
    return st.one_of(
        strategies.message(METHODS[rpc].input_type),
        _mutated(_bases(known)[rpc], strategies),
    )


# ------------------------------------------------------------------ calling and judging


class MismatchedDetails(RichError):
    """A status whose google.rpc.Status details disagree with its code: rpc_status refuses
    to read it (e.g. trailers over the client's metadata limit turned it into another code)."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:  # no super(): it would raise
        self.code = error.code()
        self.message = error.details() or ""
        self.info = error_details_pb2.ErrorInfo()
        self.bad_request = error_details_pb2.BadRequest()
        self.retry = error_details_pb2.RetryInfo()
        self.has_retry = False


def _rich(error: grpc.aio.AioRpcError) -> RichError:
    try:
        return RichError(error)
    except ValueError:
        return MismatchedDetails(error)


@dataclass
class Outcome:
    error: RichError | None
    replies: list[Any]
    ended: bool = True  # False: a live watch we cancelled after WATCH_IDLE_S of silence


async def _outcome(call: Any, streaming: bool) -> Outcome:
    if not streaming:
        try:
            return Outcome(None, [await call])
        except grpc.aio.AioRpcError as error:
            return Outcome(_rich(error), [])
    replies: list[Any] = []
    try:
        while True:
            reply = await asyncio.wait_for(call.read(), WATCH_IDLE_S)
            if reply is aio.EOF:
                return Outcome(None, replies)
            replies.append(reply)
    except grpc.aio.AioRpcError as error:
        return Outcome(_rich(error), replies)
    except TimeoutError:
        call.cancel()
        return Outcome(None, replies, ended=False)


def _show(request: Message | bytes) -> str:
    text = (
        repr(request)
        if isinstance(request, bytes)
        else text_format.MessageToString(request, as_one_line=True)
    )
    return text if len(text) <= 300 else f"{text[:300]}... ({len(text)} chars)"


def _describe(outcome: Outcome) -> str:
    if outcome.error is None:
        return "OK"
    error = outcome.error
    return (
        f"{error.code.name} {error.message[:200]!r} "
        f"ErrorInfo(reason={error.info.reason!r}, domain={error.info.domain!r})"
    )


def problems_with(
    outcome: Outcome, *, library_rejection: Callable[[RichError], bool] = lambda e: False
) -> list[str]:
    """What is wrong with this answer: an unexpected code, or no payments.v1 ErrorInfo.
    `library_rejection` says when a bare status from gRPC itself is acceptable."""
    error = outcome.error
    if error is None:
        return []
    if library_rejection(error):
        return []
    found = []
    if isinstance(error, MismatchedDetails):
        found.append("google.rpc.Status details disagree with the status code")
    if error.code not in EXPECTED_CODES:
        found.append(f"unexpected status {error.code.name}")
    if error.info.domain != DOMAIN or not error.info.reason:
        found.append("no google.rpc.ErrorInfo with domain payments.v1")
    if error.info.reason == "INVALID_ARGUMENT" and not all(
        v.field and v.description for v in error.bad_request.field_violations
    ):
        found.append("BadRequest violation without field or description")
    return found


class Probe:
    """Sends one hostile request and judges the whole effect: status, rows, logs."""

    def __init__(
        self, app: Application, stub: Any, channel: aio.Channel, caplog: Any, known: Known
    ) -> None:
        self.app = app
        self.stub = stub
        self.channel = channel
        self.caplog = caplog
        self.known = known

    def _path(self, rpc: str) -> str:
        return f"/{SERVICE.full_name}/{rpc}"

    async def typed(self, rpc: str, request: Message) -> list[str]:
        method = METHODS[rpc]
        too_big = request.ByteSize() > self.app.settings.server.max_message_bytes

        def library_rejection(error: RichError) -> bool:
            # Above grpc.max_receive_message_length gRPC core refuses the message before
            # any of our code runs: RESOURCE_EXHAUSTED without details is its answer.
            return too_big and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED

        found, outcome = await self._judge(
            lambda: _outcome(getattr(self.stub, rpc)(request), method.server_streaming),
            library_rejection,
        )
        if outcome.error is None:
            found += await self._check_ok(rpc, request, outcome)
        return [f"{rpc}({_show(request)}) -> {_describe(outcome)}: {p}" for p in found]

    async def raw(self, rpc: str, data: bytes) -> list[str]:
        method = METHODS[rpc]
        factory = (
            self.channel.unary_stream if method.server_streaming else self.channel.unary_unary
        )(self._path(rpc), request_serializer=None, response_deserializer=None)

        def library_rejection(error: RichError) -> bool:
            # Bytes that do not parse are answered by our guard (INVALID_ARGUMENT,
            # MALFORMED_REQUEST), never by gRPC's own UNKNOWN or INTERNAL.
            return False

        found, outcome = await self._judge(
            lambda: _outcome(factory(data), method.server_streaming), library_rejection
        )
        if outcome.error is not None and outcome.error.info.reason == "MALFORMED_REQUEST":
            found += await still_serving_problems(self.app)
        output = message_factory.GetMessageClass(method.output_type)
        for reply in outcome.replies:
            output.FromString(reply)  # our answer always parses
        return [f"{rpc}(raw {_show(data)}) -> {_describe(outcome)}: {p}" for p in found]

    async def _judge(
        self,
        call: Callable[[], Awaitable[Outcome]],
        library_rejection: Callable[[RichError], bool],
    ) -> tuple[list[str], Outcome]:
        before = await row_counts(self.app)
        logged = len(self.caplog.records)
        outcome = await call()
        after = await row_counts(self.app)
        found = problems_with(outcome, library_rejection=library_rejection)
        if outcome.error is not None and after != before:
            found.append(f"rejected call changed rows {before} -> {after}")
        by_library = outcome.error is not None and library_rejection(outcome.error)
        for record in self.caplog.records[logged:]:
            if by_library and record.name.startswith("grpc"):
                continue  # gRPC's own log of its own (accepted) rejection
            if record.levelno >= logging.ERROR:
                trace = " (with traceback)" if record.exc_info else ""
                found.append(f"logged {record.name}: {record.getMessage()[:200]!r}{trace}")
        return found, outcome

    async def _check_ok(self, rpc: str, request: Message, outcome: Outcome) -> list[str]:
        if rpc == "WatchPaymentStatus":
            payment_id = request.payment_id  # type: ignore[attr-defined]
            if (
                not outcome.ended
                and not outcome.replies
                and payment_id not in self.known.payment_ids
            ):
                return ["a watch of an unknown payment neither failed nor ended"]
            return []
        if rpc != "Charge":
            return []
        # Accepted input is stored and returned exactly, unicode included.
        charge: Any = request
        charged = outcome.replies[0].payment
        reread = await self.stub.GetPayment(api.GetPaymentRequest(payment_id=charged.payment_id))
        found = []
        for name, payment in (("returned", charged), ("stored", reread.payment)):
            if (
                payment.order_id != charge.order_id
                or payment.customer_id != charge.customer_id
                or payment.description != charge.description
                or dict(payment.metadata) != dict(charge.metadata)
            ):
                found.append(f"{name} payment differs from the request: {_show(payment)}")
        return found


async def still_serving_problems(app: Application) -> list[str]:
    async with aio.insecure_channel(f"127.0.0.1:{app.port}") as plain:
        health = health_pb2_grpc.HealthStub(plain)
        found = []
        for service in ("", SERVICE.full_name):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                found.append(f"health of {service!r} is {reply.status}")
        return found


async def assert_still_serving(app: Application, stub: Any) -> None:
    """After the run: gRPC health SERVING, and a normal Charge goes through."""
    assert await still_serving_problems(app) == []
    before = await row_counts(app)
    reply = await stub.Charge(charge_request(2_500), timeout=10)
    assert reply.payment.status == S.PAYMENT_STATUS_CAPTURED
    assert (await row_counts(app))["payments"] == before["payments"] + 1


HYPOTHESIS = hypothesis_settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


async def run_examples(
    strategy: st.SearchStrategy[Any],
    check: Callable[[Any], Awaitable[list[str]]],
    max_examples: int,
) -> None:
    """Hypothesis runs in a worker thread; each example is awaited on the server's loop,
    so the test can seed before and check the server after the whole run."""
    loop = asyncio.get_running_loop()

    @hypothesis_settings(HYPOTHESIS, max_examples=max_examples)
    @given(example=strategy)
    def one(example: Any) -> None:
        found = asyncio.run_coroutine_threadsafe(check(example), loop).result(timeout=60)
        assert not found, "\n".join(found)

    await asyncio.to_thread(one)


# ------------------------------------------------------------------ tests


def test_every_rpc_is_covered() -> None:
    assert set(RPCS) == {
        "Charge",
        "CapturePayment",
        "CancelPayment",
        "Refund",
        "GetPayment",
        "ListPayments",
        "GetRefund",
        "ListRefunds",
        "WatchPaymentStatus",
        "WatchPayments",
    }
    known = Known(("pay_1",), ("re_1",), ("ord_1",), ("t",))
    assert set(_bases(known)) == set(RPCS)


@pytest.mark.parametrize("rpc", RPCS)
async def test_generated_requests_get_a_clear_answer(rpc: str, app, channel, stub, caplog) -> None:
    caplog.set_level(logging.WARNING)
    known = await seed(stub)
    probe = Probe(app, stub, channel, caplog, known)
    await run_examples(
        request_strategy(rpc, known),
        lambda request: probe.typed(rpc, request),
        MAX_EXAMPLES_PER_RPC,
    )
    await assert_still_serving(app, stub)


CRAFTED_BYTES = (
    b"",
    b"\x00",  # field number 0
    b"\xff" * 16,
    b"\x0a\x02\xff\xfe",  # field 1 (a string everywhere) with invalid UTF-8
    b"\x0a\x05ab",  # length past the end
    b"\x0a\xff\xff\xff\xff\x0f",  # 4 GiB length
    b"\x08" + b"\xff" * 10 + b"\x7f",  # overlong varint
    b"\x0b" * 200,  # unterminated nested groups
    b"\x0c",  # end group without start
    b"\x12\x03\x0a\x01\xff",  # field 2 message whose string field is invalid UTF-8
    b"\x18\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # field 3 varint 2^63
    b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # field 2 varint -1
    b"\xf8\xff\xff\xff\x0f\x01",  # the largest field number, unknown
    b"\x0d\x00\x00\x00\x00",  # field 1 with the wrong wire type
)


@st.composite
def _raw_requests(draw: st.DrawFn, strategies: RequestStrategies) -> tuple[str, bytes]:
    rpc = draw(st.sampled_from(RPCS))
    kind = draw(st.sampled_from(("random", "crafted", "mangled")))
    if kind == "random":
        return rpc, draw(st.binary(max_size=512))
    if kind == "crafted":
        return rpc, draw(st.sampled_from(CRAFTED_BYTES))
    data = bytearray(draw(strategies.message(METHODS[rpc].input_type)).SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(("cut", "flip", "insert")))
        if edit == "cut":
            del data[at:]
        elif edit == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return rpc, bytes(data)


async def test_random_bytes_as_the_message_get_a_clear_answer(app, channel, stub, caplog) -> None:
    caplog.set_level(logging.WARNING)
    known = await seed(stub)
    probe = Probe(app, stub, channel, caplog, known)
    await run_examples(
        _raw_requests(RequestStrategies(_hints(known))),
        lambda drawn: probe.raw(*drawn),
        MAX_RAW_EXAMPLES,
    )
    await assert_still_serving(app, stub)


# Hand-written edge cases: id -> (rpc, request built from the known ids).
Builder = Callable[[Known], Message]
HOSTILE_IDS = {
    "empty": "",
    "nul": "pay_\x00",
    "rtl": "pay_\u202eabc",
    "emoji": "pay_\U0001f4b8",
    "10k": "p" * 10_000,
    "65": "p" * 65,
    "sql": "pay_1' OR '1'='1",
    "unknown": "pay_" + "0" * 32,
}
ID_FIELDS = {
    "CapturePayment": "payment_id",
    "CancelPayment": "payment_id",
    "Refund": "payment_id",
    "GetPayment": "payment_id",
    "ListRefunds": "payment_id",
    "WatchPaymentStatus": "payment_id",
    "GetRefund": "refund_id",
}
CAPTURED, AUTHORIZED, PARTLY = 0, 1, 2  # indexes into Known.payment_ids (see seed())


def _charge(amount: int = 1_000, currency: str = "USD", **fields: Any) -> tuple[str, Builder]:
    """A valid Charge with one thing changed."""

    def build(known: Known) -> Message:
        request = charge_request(amount)
        request.amount.currency = currency
        for name, value in fields.items():
            if name == "unset":
                request.ClearField(value)
            elif name == "method":
                request.payment_method.CopyFrom(value)
            elif name == "metadata":
                request.metadata.update(value)
            else:
                setattr(request, name, value)
        return request

    return "Charge", build


def _on(rpc: str, payment: int | None = None, **fields: Any) -> tuple[str, Builder]:
    """A request for `rpc` on a seeded payment (by index), with the given fields."""
    cls = message_factory.GetMessageClass(METHODS[rpc].input_type)

    def build(known: Known) -> Message:
        request = cls()
        if payment is not None:
            request.payment_id = known.payment_ids[payment]
        for name, value in fields.items():
            if isinstance(value, Message):
                getattr(request, name).CopyFrom(value)
            else:
                setattr(request, name, value)
        return request

    return rpc, build


def _escaped(text: str) -> str:
    return text.encode("unicode_escape").decode() or "empty"


EDGE_CASES: dict[str, tuple[str, Builder]] = {
    **{f"Charge-order_id-{k}": _charge(order_id=v) for k, v in HOSTILE_IDS.items()},
    "Charge-amount-int64-min": _charge(INT64_MIN),
    "Charge-amount-int64-max": _charge(INT64_MAX),
    "Charge-amount-negative": _charge(-1),
    "Charge-amount-zero": _charge(0),
    "Charge-amount-above-max": _charge(100_000_000_000),
    "Charge-amount-max-JPY": _charge(99_999_999_999, "JPY"),
    "Charge-amount-max-KWD": _charge(99_999_999_999, "KWD"),
    **{
        f"Charge-currency-{_escaped(c)}": _charge(currency=c)
        for c in ("usd", "XXX", "BTC", "US", "USDD", "", "\uff35\uff33\uff24", "U\x00D", "US\u202e")
    },
    "Charge-amount-unset": _charge(unset="amount"),
    "Charge-method-unset": _charge(unset="payment_method"),
    "Charge-method-no-oneof": _charge(method=pb.PaymentMethod()),
    "Charge-card-empty": _charge(method=pb.PaymentMethod(card=pb.CardMethod())),
    "Charge-card-pan": _charge(method=card("4242424242424242")),
    "Charge-card-nul": _charge(method=card("tok_visa\x00")),
    "Charge-card-10k": _charge(method=card("t" * 10_000)),
    "Charge-upi-emoji": _charge(method=pb.PaymentMethod(upi=pb.UpiMethod(vpa="\U0001f4b8@ok"))),
    **{
        f"Charge-capture_method-{n}": _charge(capture_method=n)
        for n in (3, -1, INT32_MAX, INT32_MIN)
    },
    "Charge-customer_id-nul": _charge(customer_id="cus\x00"),
    "Charge-description-10k": _charge(description="d" * 10_000),
    "Charge-description-nul": _charge(description="before\x00after"),
    "Charge-description-rtl-emoji": _charge(
        description="\u202e\U0001f4b8 \u05e9\u05dc\u05d5\u05dd"
    ),
    "Charge-description-2MiB": _charge(description="d" * 2 * 1024 * 1024),  # > max message
    "Charge-metadata-value-nul": _charge(metadata={"note": "a\x00b"}),
    "Charge-metadata-value-emoji": _charge(metadata={"note": "\U0001f4b8\u202e"}),
    "Charge-metadata-value-10k": _charge(metadata={"note": "v" * 10_000}),
    "Charge-metadata-key-nul": _charge(metadata={"k\x00": "v"}),
    "Charge-metadata-key-emoji": _charge(metadata={"\U0001f4b8": "v"}),
    "Charge-metadata-key-6k": _charge(metadata={"k" * 6_000: "v"}),
    "Charge-metadata-key-10k": _charge(metadata={"k" * 10_000: "v"}),
    "Charge-metadata-21-pairs": _charge(metadata={f"k{i}": "v" for i in range(21)}),
    **{
        f"{rpc}-{field}-{k}": _on(rpc, **{field: v})
        for rpc, field in ID_FIELDS.items()
        for k, v in HOSTILE_IDS.items()
    },
    "Capture-amount-int64-max": _on("CapturePayment", AUTHORIZED, amount=usd(INT64_MAX)),
    "Capture-amount-int64-min": _on("CapturePayment", AUTHORIZED, amount=usd(INT64_MIN)),
    "Capture-amount-zero": _on("CapturePayment", AUTHORIZED, amount=usd(0)),
    "Capture-amount-empty": _on("CapturePayment", AUTHORIZED, amount=pb.Money()),
    "Capture-currency-mismatch": _on("CapturePayment", AUTHORIZED, amount=usd(100, "JPY")),
    "Capture-currency-nul": _on("CapturePayment", AUTHORIZED, amount=usd(100, "\x00\x00\x00")),
    "Capture-above-authorized": _on("CapturePayment", AUTHORIZED, amount=usd(99_999_999_999)),
    "Capture-captured": _on("CapturePayment", CAPTURED),
    "Cancel-captured": _on("CancelPayment", CAPTURED),
    "Refund-amount-int64-max": _on("Refund", CAPTURED, amount=usd(INT64_MAX)),
    "Refund-amount-negative": _on("Refund", CAPTURED, amount=usd(-5)),
    "Refund-amount-above-captured": _on("Refund", PARTLY, amount=usd(99_999_999_999)),
    "Refund-currency-mismatch": _on("Refund", CAPTURED, amount=usd(100, "EUR")),
    "Refund-reason-unknown": _on("Refund", CAPTURED, amount=usd(1), reason=99),
    "Refund-reason-negative": _on("Refund", CAPTURED, amount=usd(1), reason=-1),
    "Refund-authorized": _on("Refund", AUTHORIZED, amount=usd(1)),
    **{
        f"ListPayments-page_size-{n}": _on("ListPayments", page_size=n)
        for n in (INT32_MIN, -1, INT32_MAX)
    },
    **{
        f"ListPayments-status-{n}": _on("ListPayments", status=n)
        for n in (9, -1, INT32_MAX, INT32_MIN)
    },
    **{
        f"ListPayments-page_token-{_escaped(v)[:20]}": _on("ListPayments", page_token=v)
        for v in ("not a token", "\x00", "\U0001f4b8", "eyJ0IjogIngifQ==", "A" * 512, "B" * 10_000)
    },
    "ListPayments-order_id-nul": _on("ListPayments", order_id="o\x00"),
    "ListPayments-customer_id-10k": _on("ListPayments", customer_id="c" * 10_000),
    "ListRefunds-page_size-int32-max": _on("ListRefunds", PARTLY, page_size=INT32_MAX),
    "ListRefunds-page_size-int32-min": _on("ListRefunds", PARTLY, page_size=INT32_MIN),
    "ListRefunds-page_token-rtl-nul": _on("ListRefunds", PARTLY, page_token="\u202e\x00"),
    **{
        f"Watch-from_sequence-{n}": _on("WatchPaymentStatus", CAPTURED, from_sequence=n)
        for n in (INT64_MIN, -1, INT64_MAX, 2**31)
    },
    "Watch-follow_refunds-live": _on("WatchPaymentStatus", PARTLY, follow_refunds=True),
}


async def test_hand_written_edge_cases_get_a_clear_answer(app, channel, stub, caplog) -> None:
    caplog.set_level(logging.WARNING)
    known = await seed(stub)
    probe = Probe(app, stub, channel, caplog, known)
    found: list[str] = []
    for case_id, (rpc, build) in EDGE_CASES.items():
        found += [f"[{case_id}] {p}" for p in await probe.typed(rpc, build(known))]
    assert not found, "\n".join(found)
    await assert_still_serving(app, stub)

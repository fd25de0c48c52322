"""Unknown JSON fields from the HTTP edge are refused, not silently dropped.

Envoy's transcoder (1.40) drops JSON body fields the request message does not have, so
`"capture_metod": "CAPTURE_METHOD_MANUAL"` would charge with automatic capture. The
gateway's Lua filter forwards the raw body, base64, in `x-http-json-body` (replacing any
value a client sent); here it is checked against the request message of the method:
every key must be a field (proto or JSON name) of the message it sits in.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pool
from grpc import aio

from payment_grpc.api.errors import invalid_argument
from payment_grpc.api.interceptors.wrapping import CheckFirst
from payment_grpc.api.methods import split_method

JSON_BODY_HEADER = "x-http-json-body"
_FieldMessage = descriptor.Descriptor
# Well-known types have their own JSON forms (strings, free objects): not walked.
_OPAQUE_PACKAGES = ("google.protobuf.",)


def unknown_fields(message: _FieldMessage, value: Any, path: str = "") -> Iterator[str]:
    """Dotted paths of the keys in `value` (parsed JSON) that `message` does not define."""
    if not isinstance(value, dict) or message.full_name.startswith(_OPAQUE_PACKAGES):
        return
    by_name = {f.name: f for f in message.fields} | {f.json_name: f for f in message.fields}
    for key, item in value.items():
        field = by_name.get(key)
        where = f"{path}{key}"
        if field is None:
            yield where
        elif field.message_type is not None:
            yield from _unknown_in_field(field.message_type, item, where)


def _unknown_in_field(message: _FieldMessage, item: Any, where: str) -> Iterator[str]:
    if message.GetOptions().map_entry:
        values = message.fields_by_name["value"].message_type
        if values is not None and isinstance(item, dict):
            for key, entry in item.items():
                yield from unknown_fields(values, entry, f"{where}[{key[:48]}].")
    elif isinstance(item, list):
        for index, entry in enumerate(item):
            yield from unknown_fields(message, entry, f"{where}[{index}].")
    else:
        yield from unknown_fields(message, item, f"{where}.")


def request_message(method: str) -> _FieldMessage | None:
    """`/payments.v1.PaymentService/Charge` -> the ChargeRequest descriptor."""
    service, name = split_method(method)
    try:
        found = descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
    except KeyError:
        return None
    input_type: _FieldMessage = found.input_type
    return input_type


def body_problems(method: str, encoded: str) -> list[tuple[str, str]]:
    message = request_message(method)
    if message is None:
        return []
    try:
        body = json.loads(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError):
        return [(JSON_BODY_HEADER, "is not a base64 JSON document")]
    return [
        (path, f"unknown field: {message.name} has no such field")
        for path in unknown_fields(message, body)
    ]


def _json_body(details: grpc.HandlerCallDetails) -> str | None:
    encoded = dict(details.invocation_metadata or ()).get(JSON_BODY_HEADER)
    return encoded if isinstance(encoded, str) else None


class JsonFieldsInterceptor(CheckFirst):
    """INVALID_ARGUMENT UNKNOWN_FIELD (one field violation per key) before any handler,
    for every call that came through the HTTP edge."""

    def applies(self, details: grpc.HandlerCallDetails) -> bool:
        return _json_body(details) is not None

    async def check(
        self, details: grpc.HandlerCallDetails, context: aio.ServicerContext[Any, Any]
    ) -> grpc.Status | None:
        problems = body_problems(details.method, _json_body(details) or "")
        return invalid_argument(problems, reason="UNKNOWN_FIELD") if problems else None

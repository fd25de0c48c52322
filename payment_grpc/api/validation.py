"""protovalidate rules from the protos, turned into google.rpc.BadRequest violations."""

from __future__ import annotations

from google.protobuf.message import Message
from protovalidate import Validator

from payment_grpc.pan_masking import mask_pans

_validator = Validator()
MAX_ECHOED_KEY_CHARS = 48  # map keys may be 40 long; a longer one is cut, not echoed whole


def _echoed_key(key: str) -> str:
    """A map key as the field path shows it: card numbers masked, and short enough that
    a hostile 10 KB key cannot push the error's trailers over the metadata limit."""
    masked = mask_pans(key)
    if len(masked) <= MAX_ECHOED_KEY_CHARS:
        return masked
    return masked[:MAX_ECHOED_KEY_CHARS] + "..."


def _field_path(violation: object) -> str:
    """The field's path; "" for a rule on the whole message (e.g. a time window)."""
    field = violation.proto.field  # type: ignore[attr-defined]
    if field is None:
        return ""
    parts: list[str] = []
    for element in field.elements:
        part = element.field_name
        subscript = element.subscript
        if subscript is not None and subscript.value is not None:
            part += (
                f"[{_echoed_key(subscript.value)!r}]"
                if isinstance(subscript.value, str)
                else f"[{subscript.value}]"
            )
        parts.append(part)
    return ".".join(parts)


def violations(request: Message) -> list[tuple[str, str]]:
    """(field path, description) per broken rule; never echoes the offending value."""
    return [
        (_field_path(v), v.proto.message or v.proto.rule_id)
        for v in _validator.collect_violations(request)
    ]

"""protovalidate rules from the protos, turned into google.rpc.BadRequest violations."""

from __future__ import annotations

from google.protobuf.message import Message
from protovalidate import Validator

from payment_grpc.pan_masking import mask_pans

_validator = Validator()


def _field_path(violation: object) -> str:
    parts: list[str] = []
    for element in violation.proto.field.elements:  # type: ignore[attr-defined]
        part = element.field_name
        subscript = element.subscript
        if subscript is not None and subscript.value is not None:
            part += (  # a map key is echoed, so a card number in it is masked
                f"[{mask_pans(subscript.value)!r}]"
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

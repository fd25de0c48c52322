"""AIP-158 page tokens: opaque, bound to the filters of the request that made them."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import UTC, datetime

from payment_grpc.service.errors import InvalidPageToken
from payment_grpc.service.limits import valid_id
from payment_grpc.service.ports import PageCursor

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def _bind(filters: object) -> str:
    return hashlib.sha256(repr(filters).encode()).hexdigest()[:16]


def encode_token(cursor: PageCursor, filters: object) -> str:
    body = {"t": cursor.created_at.isoformat(), "i": cursor.last_id, "f": _bind(filters)}
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


# An ISO-8601 time as isoformat() writes it, and nothing else.
_STAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{8,15}[+-][0-9]{2}:[0-9]{2}")


def _is_stamp(value: object) -> bool:
    return isinstance(value, str) and _STAMP.fullmatch(value) is not None


def decode_token(token: str, filters: object) -> PageCursor | None:
    """The cursor in a token this service made for these filters, else InvalidPageToken.

    A token comes back from the caller, who can forge any field: each is checked for type
    and characters before it reaches SQL (a NUL in the id broke PostgreSQL).
    """
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        stamp, last_id, bound = body["t"], body["i"], body["f"]
        if not (_is_stamp(stamp) and valid_id(last_id) and bound == _bind(filters)):
            raise InvalidPageToken()
        created_at = datetime.fromisoformat(stamp)
        if created_at.tzinfo is None:
            raise ValueError("page token time without zone")
        return PageCursor(created_at.astimezone(UTC), last_id)
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise InvalidPageToken() from exc

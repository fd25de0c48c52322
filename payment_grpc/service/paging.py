"""AIP-158 page tokens: opaque, bound to the filters of the request that made them."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime

from payment_grpc.service.errors import InvalidPageToken
from payment_grpc.service.ports import PageCursor

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_ID_LENGTH = 64


def page_size(requested: int) -> int:
    if requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def _bind(filters: object) -> str:
    return hashlib.sha256(repr(filters).encode()).hexdigest()[:16]


def encode_token(cursor: PageCursor, filters: object) -> str:
    body = {"t": cursor.created_at.isoformat(), "i": cursor.last_id, "f": _bind(filters)}
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


def decode_token(token: str, filters: object) -> PageCursor | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        created_at = datetime.fromisoformat(body["t"])
        if created_at.tzinfo is None:
            raise ValueError("page token time without zone")
        cursor = PageCursor(created_at.astimezone(UTC), str(body["i"]))
        bound = body["f"]
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise InvalidPageToken() from exc
    if bound != _bind(filters) or len(cursor.last_id) > MAX_ID_LENGTH:
        raise InvalidPageToken()
    return cursor

"""What values from outside may look like before they go anywhere near storage.

Callers' identities (JWT claims), page-token cursors and metadata end up in columns or in
WHERE clauses. PostgreSQL refuses NUL and strings longer than the column, UTF-8 cannot
encode a lone surrogate: such a value must be refused as bad input at the edge, never
reach SQL. The lengths here agree with adapters/db/tables.py (tests/unit/test_limits.py
derives one from the other).
"""

from __future__ import annotations

import re
import unicodedata

MAX_SUBJECT_LENGTH = 255  # idempotency_keys.scope, payment_events.actor
MAX_CUSTOMER_ID_LENGTH = 128  # payments.customer_id
MAX_ID_LENGTH = 64  # payments.id, refunds.id, the ids in page-token cursors
MAX_IDEMPOTENCY_KEY_LENGTH = 255  # idempotency_keys.key

# Ids we mint and accept (the same rule as the proto's id fields).
ID_PATTERN = re.compile(rf"[A-Za-z0-9_]{{1,{MAX_ID_LENGTH}}}")

# Control characters (NUL among them) and lone surrogates: no column holds them.
_UNSTORABLE_CATEGORIES = frozenset({"Cc", "Cs"})


def storable_text(value: object, max_length: int) -> bool:
    """A non-blank str of at most `max_length` characters that every database stores."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= max_length
        and not value.isspace()
        and not any(unicodedata.category(ch) in _UNSTORABLE_CATEGORIES for ch in value)
    )


def valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None

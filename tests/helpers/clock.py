"""A clock the test sets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class SettableClock:
    """A clock that moves only when the test says so (for caches bounded in time)."""

    def __init__(self, at: datetime | None = None) -> None:
        self.at = at or datetime.now(UTC)

    def now(self) -> datetime:
        return self.at

    def advance(self, delta: timedelta) -> None:
        self.at += delta

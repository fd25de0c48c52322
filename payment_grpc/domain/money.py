"""Money as integer minor units of an ISO-4217 currency. Never a float."""

from __future__ import annotations

from dataclasses import dataclass

from payment_grpc.domain.errors import CurrencyMismatch, InvalidAmount

# ISO-4217 minor-unit exponents of the currencies we accept. The proto's `in` rule on
# Money.currency lists the same codes (a unit test keeps them equal).
CURRENCY_EXPONENTS: dict[str, int] = {
    "AED": 2, "AUD": 2, "BHD": 3, "BRL": 2, "CAD": 2, "CHF": 2, "CNY": 2, "DKK": 2,
    "EUR": 2, "GBP": 2, "HKD": 2, "INR": 2, "JOD": 3, "JPY": 0, "KRW": 0, "KWD": 3,
    "MXN": 2, "NOK": 2, "NZD": 2, "OMR": 3, "PLN": 2, "SEK": 2, "SGD": 2, "USD": 2,
}  # fmt: skip

MAX_AMOUNT_MINOR = 99_999_999_999


@dataclass(frozen=True, slots=True)
class Money:
    currency: str
    amount_minor: int

    def __post_init__(self) -> None:
        if self.currency not in CURRENCY_EXPONENTS:
            raise InvalidAmount(f"unsupported currency {self.currency!r}")
        if not 0 <= self.amount_minor <= MAX_AMOUNT_MINOR:
            raise InvalidAmount("amount_minor out of range")

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(currency, 0)

    def _same_currency(self, other: Money) -> None:
        if other.currency != self.currency:
            raise CurrencyMismatch(expected=self.currency, actual=other.currency)

    def __add__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.currency, self.amount_minor + other.amount_minor)

    def __sub__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.currency, self.amount_minor - other.amount_minor)

    def __le__(self, other: Money) -> bool:
        self._same_currency(other)
        return self.amount_minor <= other.amount_minor

    def __lt__(self, other: Money) -> bool:
        self._same_currency(other)
        return self.amount_minor < other.amount_minor

    @property
    def exponent(self) -> int:
        return CURRENCY_EXPONENTS[self.currency]

    def __str__(self) -> str:
        """Exponent-aware display, e.g. "12.34 USD", "1234 JPY", "1.234 KWD"."""
        if self.exponent == 0:
            return f"{self.amount_minor} {self.currency}"
        major, minor = divmod(self.amount_minor, 10**self.exponent)
        return f"{major}.{minor:0{self.exponent}d} {self.currency}"

"""Card numbers (PANs) never leave the process in clear (PCI DSS 3.3/3.4).

Two notions, on purpose:

- `mask_pans` is precise: a run of 13-19 digits (optionally grouped by single spaces or
  dashes) that passes the Luhn check becomes BIN + last four, `424242******4242`. Digit
  runs that fail Luhn (order numbers, timestamps) are left alone. `PanMaskingFilter` applies
  it to every log record: message, args, exception text, stack and `extra` fields.
- `looks_like_card_number` is the API's door rule, the same regular expression as the
  protovalidate rule `string.no_card_number` (protos/payments/v1/rules.proto): 13-19 digits
  plain or in card groupings (4-4-4-4[-3], 4-6-5). No Luhn (CEL cannot compute it), so it is
  deterministic: a caller learns on its first call that such a value is refused.

Both only see digits that stand apart: a run glued to a letter or digit (`pay_8e69a41e...`,
`ord_123...`) is part of an identifier, not a card number. For masking, `_` separates;
for the door rule it glues, so hex ids such as `ord_<16 hex>` are never refused.
"""

from __future__ import annotations

import logging
import re

# The door rule. Keep in sync with protos/payments/v1/rules.proto and resources.proto
# (tests/unit/test_pan_masking.py checks that the generated descriptors carry it).
CARD_NUMBER_PATTERN = (
    "(^|[^0-9A-Za-z_])"
    "([0-9]{13,19}"
    "|[0-9]{4}[ -][0-9]{4}[ -][0-9]{4}[ -][0-9]{1,4}([ -][0-9]{1,3})?"
    "|[0-9]{4}[ -][0-9]{6}[ -][0-9]{4,5})"
    "($|[^0-9A-Za-z_])"
)
_CARD_NUMBER = re.compile(CARD_NUMBER_PATTERN)

# Cheap pre-check: at least 13 digits with at most one separator between them.
_MAYBE = re.compile(r"[0-9](?:[ -]?[0-9]){12}")
# A run of digit groups joined by single spaces or dashes, standing apart from letters/digits.
_RUN = re.compile(r"(?<![0-9A-Za-z])[0-9]+(?:[ -][0-9]+)*(?![0-9A-Za-z])")
_SEPARATOR = re.compile(r"([ -])")
_MIN_DIGITS, _MAX_DIGITS, _MIN_GROUP = 13, 19, 4


def looks_like_card_number(text: str) -> bool:
    """The door rule (no Luhn): true when `text` contains a card-number-shaped sequence."""
    return _CARD_NUMBER.search(text) is not None


# Luhn: every second digit from the right is doubled, and 10-18 count as 1-9.
_DOUBLED = str.maketrans("0123456789", "0246813579")


def luhn_valid(digits: str) -> bool:
    backwards = digits[::-1]
    return sum(map(int, backwards[0::2] + backwards[1::2].translate(_DOUBLED))) % 10 == 0


def mask_pan(digits: str) -> str:
    """BIN (first six) + last four, the rest starred: `4242424242424242` -> `424242******4242`."""
    return digits[:6] + "*" * (len(digits) - 10) + digits[-4:]


def _longest_pan(groups: list[str], start: int) -> int | None:
    """Index of the last group of the longest Luhn-valid PAN starting at `start`. Printed
    card numbers group by 4-6 digits, only the last group is shorter: a span does not go on
    past a short group (and lists of small numbers stay cheap to scan)."""
    found = None
    digits = ""
    for end in range(start, len(groups)):
        digits += groups[end]
        if len(digits) > _MAX_DIGITS:
            break
        if len(digits) >= _MIN_DIGITS and luhn_valid(digits):
            found = end
        if len(groups[end]) < _MIN_GROUP:
            break
    return found


def _mask_run(match: re.Match[str]) -> str:
    parts = _SEPARATOR.split(match.group())
    groups, separators = parts[0::2], parts[1::2]
    out: list[str] = []
    index = 0
    while index < len(groups):
        end = _longest_pan(groups, index)
        if end is None:
            out.append(groups[index])
            index += 1
        else:
            out.append(mask_pan("".join(groups[index : end + 1])))
            index = end + 1
        if index < len(groups):
            out.append(separators[index - 1])
    return "".join(out)


def mask_pans(text: str) -> str:
    """`text` with every Luhn-valid PAN (plain, spaced or dashed) masked."""
    if not _MAYBE.search(text):
        return text
    return _RUN.sub(_mask_run, text)


# Attributes every LogRecord has; any other attribute is an `extra` field.
STANDARD_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_EXCEPTION_FORMATTER = logging.Formatter()


def _masked_value(value: object) -> object:
    if isinstance(value, str):
        return mask_pans(value)
    if value is None or isinstance(value, (bool, float)):
        return value
    try:
        text = str(value)  # what the formatters print for ints, dicts, lists, objects
    except Exception:  # a broken __str__ must not break logging
        return value
    masked = mask_pans(text)
    return value if masked == text else masked


class PanMaskingFilter(logging.Filter):
    """Masks PANs in a record in place, so every handler after this one sees them masked.

    configure_logging installs it on the root handler. A record whose exception text held a
    PAN loses `exc_info` (the exception object carries the number) and keeps the masked
    traceback in `exc_text`, which the formatters print.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        self._mask_message(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = _EXCEPTION_FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            masked = mask_pans(record.exc_text)
            if masked != record.exc_text:
                record.exc_text, record.exc_info = masked, None
        if record.stack_info:
            record.stack_info = mask_pans(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in STANDARD_RECORD_ATTRS:
                record.__dict__[key] = _masked_value(value)
        return True

    @staticmethod
    def _mask_message(record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # bad format args: mask the pieces instead
            record.msg = mask_pans(str(record.msg))
            if isinstance(record.args, tuple):
                record.args = tuple(_masked_value(arg) for arg in record.args)
            return
        masked = mask_pans(message)
        if masked != message:
            record.msg, record.args = masked, None

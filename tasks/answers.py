"""Final-answer extraction and comparison shared by the tasks.

A completion's final answer is, in order of preference:

1. the number after the last "answer is" (the tasks' own answer statement,
   "The answer is N.", also "the final answer is: **N**");
2. the number inside the last ``\\boxed{…}``;
3. the last number anywhere in the text.

Numbers are read as exact decimals (``decimal.Decimal``), so huge values and
scientific notation ("1e309") compare exactly instead of overflowing, and
thousands separators ("1,234") are accepted. Nothing here raises on garbled
input: anything unreadable is simply no answer.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation
from typing import Optional

# Longest text we look at: model completions are short; this keeps a
# pathological input from costing more than a regex pass over 200 kB.
MAX_CHARS = 200_000
# Numbers with more digits than this are not answers (and would be slow to handle).
MAX_DIGITS = 2_000

_MINUS = "-\u2212\u2013\u2012\uFE63\uFF0D"  # hyphen, minus sign, en dash, figure dash, small/full-width hyphen
# A number: optional sign, digits with optional thousands groups, optional
# fraction, optional exponent. Thousands groups must be exactly three digits,
# so "3,4" is two numbers and "1,234" is one.
_NUMBER = re.compile(
    rf"(?<![\w.])([{_MINUS}])?"
    r"(\d{1,3}(?:,\d{3})+|\d+)"
    r"(\.\d+)?"
    r"(?:[eE]([+-]?\d{1,9}))?"
    r"(?![\w])"
)
_ANSWER_IS = re.compile(r"answer\s*(?:is|=|:)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
# How far after "answer is" the number may start (room for "$", "**", ": ", …).
_ANSWER_WINDOW = 40


def _clean(text) -> str:
    if text is None:
        return ""
    if not isinstance(text, str):
        try:
            text = str(text)
        except Exception:
            return ""
    text = text[:MAX_CHARS]
    try:
        # Full-width digits and similar become ASCII; ASCII-only digits below.
        text = unicodedata.normalize("NFKC", text)
    except Exception:
        return ""
    return text


def _to_decimal(match: re.Match) -> Optional[Decimal]:
    sign, digits, fraction, exponent = match.groups()
    if sign:
        # "8-3" and "8 - 3" are subtractions, not a negative 3: a minus is a
        # sign only where no operand stands before it.
        before = match.string[max(0, match.start() - 64) : match.start()].rstrip()
        if before and (before[-1].isdigit() or before[-1] in ")]}"):
            sign = None
    digits = digits.replace(",", "")
    if not digits.isascii() or len(digits) > MAX_DIGITS:
        return None
    literal = ("-" if sign else "") + digits + (fraction or "")
    if exponent is not None:
        literal += "e" + exponent
    try:
        value = Decimal(literal)
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


def numbers(text) -> list[Decimal]:
    """Every number in `text`, in order, as exact decimals."""
    text = _clean(text)
    found = []
    for match in _NUMBER.finditer(text):
        value = _to_decimal(match)
        if value is not None:
            found.append(value)
    return found


def _first_number(text: str, start: int = 0, window: Optional[int] = None) -> Optional[Decimal]:
    """The first readable number starting in text[start : start + window]."""
    for match in _NUMBER.finditer(text, start):
        if window is not None and match.start() > start + window:
            return None
        value = _to_decimal(match)
        if value is not None:
            return value
    return None


def extract_answer(text) -> Optional[Decimal]:
    """The final answer of a completion as an exact decimal, or None."""
    text = _clean(text)
    if not text:
        return None
    # 1. The last "answer is N" that is followed by a number.
    for match in reversed(list(_ANSWER_IS.finditer(text))):
        value = _first_number(text, match.end(), _ANSWER_WINDOW)
        if value is not None:
            return value
    # 2. The last \boxed{N}.
    for match in reversed(list(_BOXED.finditer(text))):
        value = _first_number(match.group(1))
        if value is not None:
            return value
    # 3. The last number anywhere.
    found = None
    for match in _NUMBER.finditer(text):
        value = _to_decimal(match)
        if value is not None:
            found = value
    return found


def parse_int(text) -> Optional[int]:
    """`text` as an integer when it is exactly one integer-valued number, else None."""
    text = _clean(text).strip()
    match = _NUMBER.fullmatch(text)
    if match is None:
        return None
    value = _to_decimal(match)
    if value is None or value != value.to_integral_value():
        return None
    if value.adjusted() > MAX_DIGITS:
        return None
    return int(value)


def integer_answer_matches(gold, completion) -> bool:
    """True when the completion's final answer equals the integer `gold`.

    `gold` is an int or its text. Integer-valued decimals ("8.0") count as the
    integer; anything else (no number, a fraction, garbage) is wrong."""
    try:
        gold_value = Decimal(int(gold)) if isinstance(gold, int) else parse_int(gold)
        if gold_value is None:
            return False
        predicted = extract_answer(completion)
        if predicted is None:
            return False
        return predicted == Decimal(gold_value)
    except Exception:  # a verifier never raises: garbage is simply wrong
        return False

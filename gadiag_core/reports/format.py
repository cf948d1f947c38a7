"""Number formatting shared by every table gadiag prints or writes."""

from __future__ import annotations

import math


def num(value, fmt: str = "{:+.3f}") -> str:
    """A table cell: the number formatted, or – when missing or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return fmt.format(value)

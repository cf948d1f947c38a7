"""Gradient-space names: parsing and checking, without torch (config validation).

    logits | hidden | params | params:last<N> | params:re:<regex>

gadiag_core.scoring.spaces computes cosines in them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gadiag_core.errors import UsageError

SPACES = ("logits", "hidden", "params")
SPACE_FORMS = "logits, hidden, params, params:last<N> (e.g. params:last2), params:re:<regex> (e.g. params:re:self_attn)"


@dataclass(frozen=True)
class SpaceSpec:
    """A parsed space: kind is logits | hidden | params; for params, at most one
    of last (N blocks) and regex is set."""

    kind: str
    last: int = 0
    regex: str = ""


def parse_space(space: str) -> SpaceSpec:
    """Syntax check only (no model needed); raises UsageError."""
    if not isinstance(space, str):
        raise UsageError(f"gradient space must be a string, got {space!r}: choose from {SPACE_FORMS}")
    if space in SPACES:
        return SpaceSpec(space)
    if space.startswith("params:"):
        selector = space[len("params:"):]
        if selector.startswith("re:"):
            pattern = selector[len("re:"):]
            if not pattern:
                raise UsageError(f"gradient space {space!r}: the regex is empty; e.g. params:re:self_attn")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"gradient space {space!r}: invalid regex {pattern!r} ({exc})") from None
            return SpaceSpec("params", regex=pattern)
        match = re.fullmatch(r"last(\d+)", selector)
        if match:
            n = int(match.group(1))
            if n < 1:
                raise UsageError(f"gradient space {space!r}: N in params:last<N> must be at least 1")
            return SpaceSpec("params", last=n)
        raise UsageError(
            f"unknown parameter selector {selector!r} in gradient space {space!r}: "
            f"use params:last<N> (the last N blocks) or params:re:<regex> (parameter names)"
        )
    raise UsageError(f"unknown gradient space {space!r}: choose from {SPACE_FORMS}")


def check_space(space: str) -> str:
    """Validate the syntax of a space name (config validation); return it."""
    parse_space(space)
    return space

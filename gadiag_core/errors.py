"""User-facing errors: the CLI prints their message on one line and exits 2."""

import difflib


class UsageError(Exception):
    """Bad input from the user (flag, config, model path, plugin name).

    The message must name the bad input and say how to fix it."""


def did_you_mean(name: str, known) -> str:
    """' Did you mean X?' for the closest known name, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_name(kind: str, name: str, known) -> UsageError:
    """An error for an unknown plugin name, with a suggestion and what exists."""
    known = sorted(known)
    return UsageError(
        f"unknown {kind} {name!r}.{did_you_mean(name, known)} "
        f"Available: {', '.join(known) if known else '(none)'}"
    )

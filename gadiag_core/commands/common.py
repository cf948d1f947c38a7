"""What every command shares: the argument parser that fails in one line, the
common flags.

Commands are the only part of gadiag_core that may import plugins; this
module imports neither plugins nor torch.
"""

from __future__ import annotations

import argparse

from gadiag_core.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_common(parser: argparse.ArgumentParser) -> None:
    """Flags every command that loads plugins takes."""
    parser.add_argument("--plugins-dir", action="append", default=[], metavar="DIR", help="load loose .py plugins from DIR (repeatable)")

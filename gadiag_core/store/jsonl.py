"""JSON Lines: one parser for every JSONL file gadiag reads (its own records
and users' data files); callers word the error for their reader."""

from __future__ import annotations

import json


class BadLine(ValueError):
    """Line `number` (1-based) of a JSONL text is not a JSON object.

    complete: False when the line is not JSON at all (e.g. cut short by a kill),
              True when it parses but is not an object
    """

    def __init__(self, number: int, reason: str, complete: bool) -> None:
        super().__init__(f"line {number}: {reason}")
        self.number, self.reason, self.complete = number, reason, complete


def parse_records(text: str) -> list[dict]:
    """The JSON objects of a JSONL text, one per non-blank line; BadLine at the
    first line that is not valid JSON or not an object."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise BadLine(number, f"{exc.msg}, column {exc.colno}", complete=False) from None
        if not isinstance(row, dict):
            raise BadLine(number, f"a JSON {type(row).__name__}, not an object", complete=True)
        rows.append(row)
    return rows

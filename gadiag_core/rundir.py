"""The run directory: everything needed to look deeper after a run.

    config.toml      the resolved configuration (repeat the run from it)
    rollouts.jsonl   one line per student rollout: text, tokens, reward
    questions.jsonl  one line per diagnosed rollout: per-question alignment, budget
    tokens.jsonl     one line per scored node: candidates, Q̂, V̂, cosine per row
    summary.json     aggregates per row, budget totals, task version

Lines are appended and flushed one unit of work at a time, so an interrupted
run loses at most the unit in progress.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from gadiag_core.config import to_toml
from gadiag_core.errors import UsageError


def _clean(value):
    """JSON cannot hold NaN: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, config: dict) -> "RunDir":
        run = config["run"]
        if run["run_dir"]:
            path = Path(run["run_dir"])
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path(run["output_dir"]) / f"{run['task']}-{stamp}"
            suffix = 1
            while path.exists():
                suffix += 1
                path = Path(run["output_dir"]) / f"{run['task']}-{stamp}-{suffix}"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create run directory {path}: {exc.strerror}") from None
        run_dir = cls(path)
        run_dir.write_text("config.toml", to_toml(config))
        return run_dir

    def write_text(self, name: str, text: str) -> None:
        """Write atomically: a temp file renamed over the target."""
        target = self.path / name
        temp = target.with_suffix(target.suffix + ".tmp")
        temp.write_text(text)
        os.replace(temp, target)

    def append(self, name: str, records: list[dict]) -> None:
        with (self.path / name).open("a") as handle:
            for record in records:
                handle.write(json.dumps(_clean(record)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read(self, name: str) -> list[dict]:
        path = self.path / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_json(self, name: str, value) -> None:
        self.write_text(name, json.dumps(_clean(value), indent=2) + "\n")

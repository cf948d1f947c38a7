"""The run directory: everything needed to look deeper after a run.

    config.toml      the resolved configuration (repeat the run from it)
    rollouts.jsonl   one line per student rollout: text, tokens, reward
    units/           one JSON file per diagnosed rollout (the resumable units)
    questions.jsonl  one line per diagnosed rollout: per-question alignment, budget
    tokens.jsonl     one line per scored node: candidates, Q̂, V̂, cosine per row
    summary.json     aggregates per row, budget totals, task version
    *.parquet        the same records as Parquet (gadiag_core.store.records)
    report/          index.html, question-<id>.html, *.png (gadiag_core.reports.html_report)

Every file is written atomically (a temporary file renamed over the target),
so an interrupted run leaves whole units or none. Rerunning the same command on
the same run directory resumes: finished units are skipped.
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

    # Keys that may differ between a run and its resumption.
    RESUMABLE_DIFFERENCES = {("run", "run_dir"), ("run", "output_dir"), ("run", "threads"), ("run", "in_flight")}

    @classmethod
    def open_or_create(cls, config: dict) -> "RunDir":
        """The run directory of `config`: an existing one (resumed, after checking
        that it was made by the same configuration) or a new one."""
        path = Path(config["run"]["run_dir"]) if config["run"]["run_dir"] else None
        if path is not None and (path / "config.toml").is_file():
            run_dir = cls(path)
            run_dir.check_same_config(config)
            return run_dir
        return cls.create(config)

    def check_same_config(self, config: dict) -> None:
        from gadiag_core.config import load_toml

        stored = load_toml(self.path / "config.toml")
        for table in sorted(set(stored) | set(config)):
            old, new = stored.get(table, {}), config.get(table, {})
            for key in sorted(set(old) | set(new)):
                if (table, key) in self.RESUMABLE_DIFFERENCES:
                    continue
                if old.get(key) != new.get(key):
                    raise UsageError(
                        f"run directory {self.path} was made with {table}.{key} = {old.get(key)!r}, "
                        f"not {new.get(key)!r}: resume with the same settings, or pick a new --run-dir"
                    )

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
        temp = target.with_name(target.name + ".tmp")
        with temp.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)

    def write_jsonl(self, name: str, records: list[dict]) -> None:
        self.write_text(name, "".join(json.dumps(_clean(record)) + "\n" for record in records))

    def write_unit(self, name: str, value: dict) -> None:
        (self.path / "units").mkdir(exist_ok=True)
        self.write_json(f"units/{name}.json", value)

    def read_unit(self, name: str) -> dict:
        return json.loads((self.path / "units" / f"{name}.json").read_text())

    def finished_units(self) -> set[str]:
        folder = self.path / "units"
        return {p.stem for p in folder.glob("*.json")} if folder.is_dir() else set()

    def read(self, name: str) -> list[dict]:
        path = self.path / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_json(self, name: str, value) -> None:
        self.write_text(name, json.dumps(_clean(value), indent=2) + "\n")

"""The run directory: everything needed to look deeper after a run.

    .gadiag-run      the marker: this folder is a gadiag run (written first)
    config.toml      the resolved configuration (repeat the run from it)
    rollouts.jsonl   one line per student rollout: text, tokens, reward
    units/           one JSON file per diagnosed rollout (the resumable units),
                     named by a digest of the question id (`unit_name`)
    questions.jsonl  one line per diagnosed rollout: per-question alignment, budget
    tokens.jsonl     one line per scored node: candidates, Q̂, V̂, cosine per row
    summary.json     aggregates per row, budget totals, task version
    *.parquet        the same records as Parquet (gadiag_core.store.records)
    report/          index.html, question-<id>.html, *.png (gadiag_core.reports.html_report)

Every file is written atomically (a temporary file renamed over the target),
so an interrupted run leaves whole units or none. Rerunning the same command on
the same run directory resumes: finished units are skipped.

Nothing is created before the run has checked all it can (`RunDir.prepare`
checks, `RunDir.start` creates): a run that fails on bad input leaves no
folder behind. A folder that holds files but no marker is not a run and is
never written into (a run written before the marker existed is recognised
by its config.toml and records, and marked on resume). A write that fails (disk full, read-only) raises an
EnvironmentFailure naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

from gadiag_core.config import to_toml
from gadiag_core.errors import EnvironmentFailure, UsageError, cannot_write
from gadiag_core.store.jsonl import BadLine, parse_records

MARKER = ".gadiag-run"
MARKER_TEXT = '{"gadiag_run": 1}\n'


def _clean(value):
    """JSON cannot hold NaN: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def unit_name(question: str, rollout: int) -> str:
    """File stem of a diagnosed rollout's unit: a digest of the question id
    (ids are user data: '/', '..', very long), so any id is a safe file name."""
    digest = hashlib.sha256(str(question).encode("utf-8")).hexdigest()[:20]
    return f"q{digest}.r{int(rollout)}"


class RunDir:
    def __init__(self, path: str | Path, exists: bool = True):
        self.path = Path(path)
        self.exists = exists  # False until `start` creates it

    # Keys that may differ between a run and its resumption.
    RESUMABLE_DIFFERENCES = {("run", "run_dir"), ("run", "output_dir"), ("run", "threads")}

    # -- opening --------------------------------------------------------------

    @classmethod
    def prepare(cls, config: dict) -> "RunDir":
        """The run directory `config` asks for, checked but not created.

        --run-dir naming a run: resumed, after checking it was made with the
        same settings and that its config is there. An existing folder with
        files but no marker: refused (it is not a run; nothing is written).
        Otherwise a new directory, created by `start`."""
        run = config["run"]
        if not run["run_dir"]:
            return cls(cls._new_path(run), exists=False)
        path = Path(run["run_dir"])
        if path.exists() and not path.is_dir():
            raise UsageError(f"--run-dir {path} is a file, not a folder: pick a new --run-dir")
        if (path / MARKER).is_file() or _legacy_run(path):
            run_dir = cls(path)
            run_dir.check_resumable(config)
            _check_writable(path)
            return run_dir
        if path.is_dir() and any(path.iterdir()):
            raise UsageError(
                f"--run-dir {path} is a folder that holds files but is not a gadiag run (no {MARKER} file): "
                "nothing was written; pick a new or empty folder"
            )
        _check_writable(path)
        return cls(path, exists=False)

    @staticmethod
    def _new_path(run: dict) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(run["output_dir"]) / f"{run['task']}-{stamp}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path(run["output_dir"]) / f"{run['task']}-{stamp}-{suffix}"
        _check_writable(path)
        return path

    def start(self, config: dict) -> "RunDir":
        """Create the directory (marker first, then config.toml); a no-op on a resumed run."""
        if self.exists:
            if not (self.path / MARKER).is_file():
                self.write_text(MARKER, MARKER_TEXT)  # a run made before the marker existed
            if not (self.path / "config.toml").is_file():
                self.write_text("config.toml", to_toml(config))
            return self
        if not config["run"]["run_dir"]:
            self.path = self._new_path(config["run"])
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cannot_write(self.path, exc) from None
        self.write_text(MARKER, MARKER_TEXT)
        self.write_text("config.toml", to_toml(config))
        self.exists = True
        return self

    def check_resumable(self, config: dict) -> None:
        """A marked run directory may be resumed by `config`: its config is
        there, readable and equal up to RESUMABLE_DIFFERENCES."""
        from gadiag_core.config import load_toml

        config_path = self.path / "config.toml"
        if not config_path.is_file():
            if (self.path / "rollouts.jsonl").exists() or (self.path / "units").is_dir():
                raise UsageError(
                    f"run directory {self.path} has records but no config.toml, so its settings cannot be checked: "
                    "restore config.toml, or pick a new --run-dir"
                )
            return  # the run stopped before writing anything: `start` writes the config
        try:
            stored = load_toml(config_path)
        except UsageError as exc:
            raise UsageError(f"cannot resume {self.path}: {exc}; pick a new --run-dir") from None
        for table in sorted(set(stored) | set(config)):
            old, new = stored.get(table, {}), config.get(table, {})
            if not isinstance(old, dict) or not isinstance(new, dict):
                old, new = {"": old}, {"": new}
            for key in sorted(set(old) | set(new)):
                if (table, key) in self.RESUMABLE_DIFFERENCES:
                    continue
                if old.get(key) != new.get(key):
                    raise UsageError(
                        f"run directory {self.path} was made with {table}.{key} = {old.get(key)!r}, "
                        f"not {new.get(key)!r}: resume with the same settings, or pick a new --run-dir"
                    )

    # -- writing --------------------------------------------------------------

    def write_text(self, name: str, text: str) -> None:
        """Write atomically: a temp file renamed over the target. A failed
        write (disk full, read-only) leaves the target as it was and raises
        an EnvironmentFailure naming it."""
        target = self.path / name
        temp = target.with_name(target.name + ".tmp")
        try:
            with temp.open("w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except OSError as exc:
            try:
                temp.unlink()
            except OSError:
                pass
            raise cannot_write(target, exc) from None

    def write_jsonl(self, name: str, records: list[dict]) -> None:
        self.write_text(name, "".join(json.dumps(_clean(record)) + "\n" for record in records))

    def write_json(self, name: str, value) -> None:
        self.write_text(name, json.dumps(_clean(value), indent=2) + "\n")

    def write_unit(self, name: str, value: dict) -> None:
        try:
            (self.path / "units").mkdir(exist_ok=True)
        except OSError as exc:
            raise cannot_write(self.path / "units", exc) from None
        self.write_json(f"units/{name}.json", value)

    # -- reading (resume) -----------------------------------------------------

    def read_unit(self, name: str) -> dict:
        path = self.path / "units" / f"{name}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EnvironmentFailure(f"cannot read {path}: {exc}") from None

    def finished_units(self, expected: dict[str, tuple[str, int]] | None = None, warn=None) -> set[str]:
        """Stems of the stored units that can be trusted.

        expected: unit stem -> (question id, rollout) of the run's rollouts.
        A unit that does not parse, or whose record names another rollout, is
        set aside as `NAME.json.bad` and done again (`warn` is told); units of
        no rollout of this run are ignored."""
        folder = self.path / "units"
        if not folder.is_dir():
            return set()
        good = set()
        for path in sorted(folder.glob("*.json")):
            stem = path.stem
            if expected is not None and stem not in expected:
                continue
            problem = None
            try:
                unit = json.loads(path.read_text(encoding="utf-8"))
                record = unit["rollout"]
                if not isinstance(unit.get("tokens"), list):
                    problem = "it has no token list"
                elif expected is not None and (record.get("question"), record.get("rollout")) != expected[stem]:
                    problem = f"it holds question {record.get('question')!r} rollout {record.get('rollout')!r}"
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                problem = f"it does not parse ({type(exc).__name__}: {str(exc)[:80]})"
            if problem is None:
                good.add(stem)
                continue
            bad = path.with_name(path.name + ".bad")
            try:
                os.replace(path, bad)
            except OSError as exc:
                raise cannot_write(bad, exc) from None
            if warn:
                warn(f"{path} is damaged ({problem}): moved to {bad.name}; that rollout is diagnosed again")
        return good

    def read_jsonl(self, name: str, what: str, recover: str) -> list[dict] | None:
        """The records of a JSONL file, None when absent. A line that does not
        parse is a UsageError naming the file, the line and `recover`."""
        path = self.path / name
        if not path.exists():
            return None
        try:
            return parse_records(path.read_text(encoding="utf-8", errors="replace"))
        except BadLine as bad:
            what = f"complete {what}" if not bad.complete else f"{what} record"
            raise UsageError(f"{path} line {bad.number} is not a {what} ({bad.reason}): {recover}") from None

    def read(self, name: str) -> list[dict]:
        return self.read_jsonl(name, "record", f"delete {self.path / name} to rebuild it") or []


def _legacy_run(path: Path) -> bool:
    """A run directory written before runs were marked: a config.toml with the
    [run] and [student] tables the harness writes, and records beside it."""
    from gadiag_core.config import load_toml

    if not (path / "config.toml").is_file() or not ((path / "rollouts.jsonl").is_file() or (path / "units").is_dir()):
        return False
    try:
        stored = load_toml(path / "config.toml")
    except UsageError:
        return False
    return isinstance(stored.get("run"), dict) and isinstance(stored.get("student"), dict)


def _check_writable(path: Path) -> None:
    """Fail before any model loads when `path` (or the folder it would be made in) cannot be written."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UsageError(f"cannot create run directory {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EnvironmentFailure(f"cannot write {path}: {existing} is not writable (read-only or permission denied)")

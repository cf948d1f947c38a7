"""Reading a run directory's records, and storing them as Parquet.

`load_run(path)` reads what `report`, `show` and the HTML report need from a
run directory (see `gadiag_core.store.rundir`), finished or not: without
summary.json (an interrupted run) the summary is rebuilt from the records,
and without tokens.jsonl / questions.jsonl the per-rollout units are read.
Nothing here imports torch, so these commands start quickly.

Parquet (`write_parquet(run_dir)`)
----------------------------------
Next to each JSONL file a Parquet file with one row per line:

    tokens.parquet     one row per scored node
    questions.parquet  one row per diagnosed rollout
    rollouts.parquet   one row per student rollout

Both pandas and `datasets` read them directly::

    pandas.read_parquet("RUN/tokens.parquet")
    datasets.load_dataset("parquet", data_files="RUN/tokens.parquet")["train"]

Flattening. A field whose value is a mapping becomes one column per key,
named ``FIELD.KEY``; the key keeps its own slashes. So the per-row cosines
``cos: {"solution/reverse_kl": 0.2, ...}`` become float columns
``cos.solution/reverse_kl``, ``cos.rl_outcome``, … (null where the cosine is
undefined), ``question_cos`` and ``budget`` likewise, ``cos_half.<row>`` a
list [cosine against half 0 of â*, against half 1] (the oracle's inputs), and the teachers' top
tokens ``teacher_top: {"solution": [[token, prob], ...]}`` become columns
``teacher_top.solution`` of type list<struct<token: string, prob: double>>.
Lists (candidates, q_hat, generated_ids, tokens, …) stay list columns. A key
missing from some lines is null there. Select such columns by their full name
(``df["cos.solution/reverse_kl"]``).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gadiag_core.scoring.alignment import REFERENCE_ROWS, aggregate
from gadiag_core.errors import UsageError, cannot_write
from gadiag_core.store.jsonl import BadLine, parse_records

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECORD_FILES = ("tokens", "questions", "rollouts")
# What every summary.json holds (the leaderboard reads them).
SUMMARY_KEYS = ("task", "student", "space", "estimator", "questions", "rollouts", "rollouts_correct", "accuracy", "budget", "rows")


# ----------------------------------------------------------------------------
# Reading a run


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file ([] when absent); UsageError naming the line that does not parse."""
    if not path.is_file():
        return []
    try:
        return parse_records(path.read_text(encoding="utf-8", errors="replace"))
    except BadLine as bad:
        what = "not valid JSON" if not bad.complete else "not a record"
        raise UsageError(f"{path} line {bad.number} is {what} ({bad.reason}): the file is damaged") from None


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}): {what}") from None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Run:
    """One run directory's records (see `load_run`)."""

    path: Path
    config: dict
    summary: dict
    rollouts: list[dict]
    questions: list[dict]
    tokens: list[dict]
    finished: bool = True
    _nodes: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def task_label(self) -> str:
        version = self.summary.get("task_version")
        return f"{self.summary.get('task', '?')}" + (f" v{version}" if version not in (None, "", "?") else "")

    @property
    def temperature(self) -> float:
        return float(self.config.get("student", {}).get("temperature", 1.0) or 1.0)

    def rows(self) -> list[str]:
        """Row names in leaderboard order: teacher rows best first, then the reference rows."""
        rows = self.summary.get("rows", {})

        def best_first(name):
            value = rows[name].get("mean_all")
            return -value if _finite(value) else math.inf

        teacher_rows = sorted((name for name in rows if name not in REFERENCE_ROWS), key=best_first)
        return teacher_rows + [name for name in REFERENCE_ROWS if name in rows]

    def default_row(self) -> str | None:
        """The row shown first: the leaderboard's top teacher row (or any row)."""
        rows = self.rows()
        return rows[0] if rows else None

    def question_ids(self) -> list[str]:
        """Question ids in run order (from the rollouts, else from the records)."""
        ids = [r["question"] for r in self.rollouts] or [r["question"] for r in self.questions]
        return list(dict.fromkeys(ids))

    def rollouts_of(self, question: str) -> list[dict]:
        """The question's rollouts (rollouts.jsonl lines, or the diagnosed-rollout
        records when rollouts.jsonl is missing)."""
        found = [r for r in self.rollouts if r["question"] == question]
        return found or [r for r in self.questions if r["question"] == question]

    def question_record(self, question: str, rollout: int) -> dict:
        for record in self.questions:
            if record["question"] == question and record["rollout"] == rollout:
                return record
        return {}

    def nodes(self, question: str, rollout: int) -> dict[int, dict]:
        """The scored nodes of one rollout: position -> token record."""
        if not self._nodes:
            for record in self.tokens:
                self._nodes.setdefault((record["question"], record["rollout"]), {})[record["node"]] = record
        return self._nodes.get((question, rollout), {})

    def resolve_question(self, spec: str) -> str:
        """A question id, or its 0-based index in the run."""
        ids = self.question_ids()
        if spec in ids:
            return spec
        try:
            index = int(spec)
        except ValueError:
            index = None
        if index is not None and 0 <= index < len(ids):
            return ids[index]
        shown = ", ".join(ids[:8]) + (", …" if len(ids) > 8 else "")
        raise UsageError(
            f"no question {spec!r} in {self.path}: give a question id or an index 0..{len(ids) - 1} ({shown})"
            if ids
            else f"no question {spec!r} in {self.path}: the run has no rollouts yet"
        )


def load_run(path: str | Path) -> Run:
    """Read a run directory. UsageError (one line) when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"run directory {path} not found")
    config_path, summary_path = path / "config.toml", path / "summary.json"
    if not config_path.is_file() and not summary_path.is_file():
        raise UsageError(f"{path} is not a run directory (no config.toml or summary.json)")
    try:
        try:
            config = tomllib.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{config_path} is not valid TOML ({exc})") from None
        rollouts = _read_jsonl(path / "rollouts.jsonl")
        questions = _read_jsonl(path / "questions.jsonl")
        tokens = _read_jsonl(path / "tokens.jsonl")
        if not questions and (path / "units").is_dir():
            # An unfinished run: the diagnosed rollouts are in units/ (damaged ones are left out).
            for unit_path in sorted((path / "units").glob("*.json")):
                try:
                    unit = json.loads(unit_path.read_text(encoding="utf-8"))
                    record, unit_tokens = unit["rollout"], list(unit["tokens"])
                except (ValueError, KeyError, TypeError):
                    continue
                questions.append(record)
                tokens.extend(unit_tokens)
        summary = None
        if summary_path.is_file():
            summary = _read_json(summary_path, "rerun the same command on this run directory to rebuild it, or delete it")
            if (
                not isinstance(summary, dict)
                or any(key not in summary for key in SUMMARY_KEYS)
                or not isinstance(summary["rows"], dict)
                or not all(isinstance(row, dict) for row in summary["rows"].values())
                or not isinstance(summary["budget"], dict)
            ):
                raise UsageError(f"{summary_path} is not a gadiag summary: rerun the same command on this run directory to rebuild it, or delete it")
    except OSError as exc:
        raise UsageError(f"cannot read run directory {path}: {exc}") from None
    finished = summary is not None
    if summary is None:
        summary = rebuild_summary(config, rollouts, questions, tokens)
    return Run(path, config, summary, rollouts, questions, tokens, finished)


def skipped_counts(questions: list[dict]) -> dict[str, int]:
    """Teacher -> diagnosed rollouts on which it was skipped (no context)."""
    counts: dict[str, int] = {}
    for record in questions:
        for name in record.get("skipped_teachers") or []:
            counts[name] = counts.get(name, 0) + 1
    return counts


def record_summary(rollouts: list[dict], questions: list[dict], tokens: list[dict]) -> dict:
    """The parts of summary.json that come from the records alone (the run's
    summary and the one `report` rebuilds for an unfinished run share them):
    counts, accuracy, budget totals, skipped teachers, the aggregates and the
    per-token oracle (gadiag_core.scoring.oracle).

    rollouts: rows of rollouts.jsonl (question, correct, cut); questions: rows of
    questions.jsonl; tokens: rows of tokens.jsonl."""
    budget: dict[str, float] = {}
    for record in questions:
        for key, value in record.get("budget", {}).items():
            budget[key] = budget.get(key, 0) + value
    masses = [r["covered_mass"] for r in tokens if _finite(r.get("covered_mass"))]
    budget["mean_covered_mass"] = sum(masses) / len(masses) if masses else None
    diagnosed = rollouts or questions
    correct = sum(bool(r.get("correct")) for r in diagnosed)
    return {
        "questions": len({r["question"] for r in diagnosed}),
        "rollouts": len(diagnosed),
        "accuracy": correct / len(diagnosed) if diagnosed else None,
        "rollouts_correct": correct,
        "rollouts_cut": sum(bool(r.get("cut")) for r in rollouts),
        "teachers_skipped": skipped_counts(questions),
        "budget": budget,
        "rows": aggregate(tokens, questions),
        # The per-token oracle (split-half selection), switch rate, winners.
        "oracle": _oracle(tokens),
    }


def _oracle(tokens: list[dict]):
    from gadiag_core.scoring.oracle import oracle_summary  # here: it needs torch, `report --help` must not

    return oracle_summary(tokens)


def rebuild_summary(config: dict, rollouts: list[dict], questions: list[dict], tokens: list[dict]) -> dict:
    """The summary of an unfinished run, from its config and the records so far."""
    run, student = config.get("run", {}), config.get("student", {})
    return {
        "task": run.get("task", "?"),
        "task_version": "?",
        "student": student.get("model", "?"),
        "space": run.get("space", "?"),
        "estimator": config.get("estimator", {}).get("name", "?"),
        "sampler": config.get("sampler", {}).get("name", "?"),
        "max_new_tokens": student.get("max_new_tokens"),
        **record_summary(rollouts, questions, tokens),
        "rollouts_diagnosed": len(questions),
        "partial": True,
    }


# ----------------------------------------------------------------------------
# Parquet


def _flatten(record: dict) -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            for sub, item in value.items():
                if key == "teacher_top":
                    item = [{"token": str(pair[0]), "prob": float(pair[1])} for pair in item]
                flat[f"{key}.{sub}"] = item
        else:
            flat[key] = value
    return flat


def records_table(records: list[dict]):
    """A pyarrow Table of JSON records, flattened as the module docstring says."""
    import pyarrow as pa

    rows = [_flatten(r) for r in records]
    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if name.startswith(("cos.", "question_cos.")):
            array = pa.array([float(v) if _finite(v) else None for v in values], type=pa.float64())
        elif name.startswith("cos_half."):  # [cos against half 0, against half 1]
            array = pa.array([None if v is None else [float(x) if _finite(x) else None for x in v] for v in values], type=pa.list_(pa.float64()))
        elif name.startswith("teacher_top."):
            array = pa.array(values, type=pa.list_(pa.struct([("token", pa.string()), ("prob", pa.float64())])))
        else:
            try:
                array = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep the JSON text
                array = pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())
            if pa.types.is_null(array.type):  # all null: a float column reads more usefully
                array = array.cast(pa.float64())
        columns[name] = array
    return pa.table(columns) if columns else pa.table({})


def write_parquet(run_dir: str | Path) -> list[Path]:
    """Write tokens/questions/rollouts.parquet from the run's JSONL records
    (or its units, for an unfinished run); returns the files written."""
    import pyarrow.parquet as pq

    run = load_run(run_dir)
    written = []
    for name, records in (("tokens", run.tokens), ("questions", run.questions), ("rollouts", run.rollouts)):
        target = run.path / f"{name}.parquet"
        temp = target.with_name(target.name + ".tmp")
        try:
            pq.write_table(records_table(records), temp)
            temp.replace(target)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise cannot_write(target, exc) from None
        written.append(target)
    return written


def finite(value) -> bool:
    """A real, finite number (not None, NaN, a bool or a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ideal_candidates(record: dict, tau: float) -> list[tuple[str, float | None, float | None, int | None, float | None]]:
    """(token, π, Q̂, count, a*) per candidate, the ideal's favourites first."""
    tokens = record.get("candidate_tokens") or [str(c) for c in record.get("candidates", [])]
    q_hat, counts, probs = record.get("q_hat", []), record.get("counts", []), record.get("candidate_pi")
    value = record.get("value")
    out = []
    for i, token in enumerate(tokens):
        pi = probs[i] if probs and i < len(probs) else None
        q = q_hat[i] if i < len(q_hat) else None
        ideal = pi * (q - value) / tau if finite(pi) and finite(q) and finite(value) else None
        out.append((token, pi, q, counts[i] if i < len(counts) else None, ideal))
    if any(c[4] is not None for c in out):
        out.sort(key=lambda c: -(c[4] if c[4] is not None else -math.inf))
    else:
        out.sort(key=lambda c: -(c[2] if finite(c[2]) else -math.inf))
    return out

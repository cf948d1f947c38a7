"""harness.toml: defaults, loading, CLI overrides and validation.

The resolved config is a plain dict of tables; it is written to the run
directory, so a run can be repeated from it alone.

Tables:
  [run]        what to diagnose and how much (task, teachers, objectives, counts, seed)
  [student]    the model under diagnosis (backend, model, temperature, limits)
  [task]       options passed to the task's factory (e.g. levels = [1, 2])
  [sampler]    name = the rollout sampler; other keys are its options
  [estimator]  name = the ideal-gradient estimator; other keys are its options
  [teachers.NAME]  an external model teacher: model = "...", context = "solution"
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from gadiag_core.errors import UsageError, did_you_mean
from gadiag_core.spaces import check_space

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


DEFAULTS: dict[str, dict[str, Any]] = {
    "run": {
        "task": "math",
        "teachers": "all",
        "objectives": ["reverse_kl", "sampled_token"],
        "questions": 8,
        "rollouts_per_question": 2,
        "seed": 0,
        "output_dir": "runs",
        "run_dir": "",
        "space": "logits",
        "plugins_dirs": [],
        "threads": 0,
    },
    "student": {
        "backend": "hf",
        "model": "smollm2-135m-instruct",
        "temperature": 1.0,
        "max_new_tokens": 64,
        "dtype": "float32",
    },
    "task": {},
    "sampler": {"name": "prefix"},
    "estimator": {"name": "targeted"},
    "teachers": {},
}

# Tables whose keys are free (passed on to a plugin, which validates them).
OPEN_TABLES = {"task", "sampler", "estimator", "teachers"}

# Keys with a range to check: (minimum, maximum or None).
RANGES = {
    ("run", "questions"): (1, None),
    ("run", "rollouts_per_question"): (1, None),
    ("run", "threads"): (0, None),
    ("student", "temperature"): (0.0, None),
    ("student", "max_new_tokens"): (1, None),
}

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__
    )


def _check_value(table: str, key: str, value, default) -> Any:
    """Type-check one key against its default; ints are accepted for floats."""
    where = f"{table}.{key}"
    if key == "teachers" and table == "run":
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise UsageError(f"{where} must be 'all', 'a,b' or a list of names, got {value!r}")
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list) or isinstance(value, str)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UsageError(f"{where} must be {_type_name(default)}, got {value!r}")
    low_high = RANGES.get((table, key))
    if low_high:
        low, high = low_high
        if value < low or (high is not None and value > high):
            raise UsageError(f"{where} = {value!r} is out of range (minimum {low})")
    return value


def validate(config: dict) -> dict:
    """Check tables, keys, types and ranges; returns the config with defaults filled."""
    resolved = copy.deepcopy(DEFAULTS)
    for table, values in config.items():
        if table not in DEFAULTS:
            raise UsageError(f"unknown table [{table}] in config.{did_you_mean(table, DEFAULTS)} Tables: {', '.join(DEFAULTS)}")
        if not isinstance(values, dict):
            raise UsageError(f"[{table}] must be a table, got {values!r}")
        if table in OPEN_TABLES:
            resolved[table].update(values)
            continue
        for key, value in values.items():
            if key not in DEFAULTS[table]:
                raise UsageError(
                    f"unknown key {table}.{key} in config.{did_you_mean(key, DEFAULTS[table])} "
                    f"Keys of [{table}]: {', '.join(DEFAULTS[table])}"
                )
            resolved[table][key] = _check_value(table, key, value, DEFAULTS[table][key])
    for table in ("sampler", "estimator"):
        if not isinstance(resolved[table].get("name"), str):
            raise UsageError(f"{table}.name must be a string naming a {table}")
    for name, teacher in resolved["teachers"].items():
        if not isinstance(teacher, dict) or "model" not in teacher:
            raise UsageError(f"[teachers.{name}] needs model = \"HF id, directory or .gguf\" (and optionally context)")
        unknown = set(teacher) - {"model", "context", "dtype"}
        if unknown:
            raise UsageError(f"unknown key teachers.{name}.{sorted(unknown)[0]}: allowed are model, context, dtype")
    check_space(resolved["run"]["space"])
    if resolved["student"]["dtype"] not in DTYPES:
        raise UsageError(f"student.dtype = {resolved['student']['dtype']!r}: choose from {', '.join(DTYPES)}")
    return resolved


def load_toml(path: str | Path) -> dict:
    """Parse a TOML file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} not found")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None


def set_dotted(config: dict, dotted: str, value) -> None:
    """config['a']['b'] = value for 'a.b' (CLI overrides)."""
    table, _, key = dotted.partition(".")
    if not key:
        raise UsageError(f"override {dotted!r} must look like table.key")
    config.setdefault(table, {})[key] = value


def resolve(path: str | Path | None, overrides: dict[str, Any]) -> dict:
    """Defaults <- config file (if any) <- CLI overrides, validated."""
    raw = load_toml(path) if path else {}
    for dotted, value in overrides.items():
        if value is not None:
            set_dotted(raw, dotted, value)
    return validate(raw)


def to_toml(config: dict) -> str:
    """A small TOML writer for the resolved config (tomllib cannot write)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if v is None:
            return '""'
        raise TypeError(f"cannot write {v!r} to TOML")

    lines = []
    for table, values in config.items():
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        if scalars or not nested:
            lines.append(f"[{table}]")
            lines += [f"{k} = {value(v)}" for k, v in scalars.items()]
            lines.append("")
        for sub, subvalues in nested.items():
            lines.append(f"[{table}.{sub}]")
            lines += [f"{k} = {value(v)}" for k, v in subvalues.items()]
            lines.append("")
    return "\n".join(lines)

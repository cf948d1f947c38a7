"""harness.toml → a checked, frozen `RunConfig`.

The raw configuration is built as: built-in defaults ← the TOML file (if any)
← command-line flags and ``--set table.key=value``. `validate` checks every
value in one place — the run's own keys here, every plugin's options against
the options dataclass it declared (gadiag_core.options) — and returns a frozen
`RunConfig`; nothing after it reads the raw dict. `RunConfig.to_dict()` is
what ``config.toml`` in the run directory holds (written with tomli-w, read
back with tomllib), and validating it again gives the same RunConfig (up to
the executor's keys, PLACEMENT_KEYS: where units run is not what the run is).

Tables:
  [run]                what to diagnose and how much (task, teachers, objectives, counts, seed)
  [student]            backend, temperature, max_new_tokens, and the back-end's options (model, dtype, …)
  [task]               the task's options (e.g. levels = ["L1", "L2"])
  [sampler]            name = the rollout sampler; other keys are its options
  [estimator]          name = the ideal-gradient estimator; other keys are its options
  [objectives.NAME]    options of objective NAME (e.g. [objectives.jsd] beta = 0.9)
  [teachers.NAME]      a teacher defined here: type = "model" (default) and the type's options

Temperature: the student's policy is softmax(z/τ) and every vector divides by
τ, so τ must be a finite number > 0 (greedy decoding, τ = 0, has no gradient
to diagnose). Samplers still accept 0 internally, for greedy checks in tests.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gadiag_core.errors import UsageError, did_you_mean
from gadiag_core.options import as_dict, build_options, option

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# ----------------------------------------------------------------------------
# The run's own keys, declared like plugin options


def _check_space(value: str) -> str:
    from gadiag_core.scoring.space_spec import check_space

    try:
        return check_space(value)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def _check_ray_address(value: str) -> str:
    """'' | auto | local | host:port | ray://host:port (a typo fails here, not after Ray's minutes of retries)."""
    text = value.strip()
    if text in ("", "auto", "local"):
        return text
    rest = text[len("ray://"):] if text.startswith("ray://") else text
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise ValueError(f"{value!r} is not a Ray address: use host:port (the head's GCS port, e.g. 10.0.0.5:6379), ray://host:10001 or auto")
    return text


@dataclass(frozen=True)
class RunOptions:
    task: str = option("math", "task name (see `gadiag-harness list task`)")
    teachers: list[str] = option(["all"], "\"all\", \"a,b\" or a list of teacher names")
    objectives: list[str] = option(["reverse_kl", "sampled_token"], "distillation objectives scored for every teacher")
    questions: int = option(8, "questions drawn from the task", min=1, max=1_000_000)
    rollouts_per_question: int = option(2, "student rollouts per question (siblings feed self_success and feedback)", min=1, max=100_000)
    seed: int = option(0, "every random draw derives from it and the unit of work", min=0, max=2**63 - 1)
    output_dir: str = option("runs", "parent of new run directories")
    run_dir: str = option("", "write exactly here instead (resumes a run made with the same settings)")
    space: str = option("logits", "gradient space: logits, hidden, params, params:last<N>, params:re:<regex>", check=_check_space)
    plugins_dirs: list[str] = option([], "folders of loose plugin files")
    threads: int = option(0, "torch CPU threads (0 = all cores)", min=0, max=1024)
    in_flight: int = option(16, "rollouts diagnosed together, a new one starting as each finishes (on Ray: the wave an actor takes); their continuation requests share sampler calls (1 = one after another)", min=1, max=4096)
    executor: str = option("local", "where waves are diagnosed: local (this process) or ray (actors on a Ray cluster; pip install 'gadiag[ray]')", choices=("local", "ray"))
    ray_address: str = option("", "Ray cluster to join: host:port, ray://host:port or auto (empty: $RAY_ADDRESS, else a local cluster started for the run)", check=_check_ray_address)
    workers: int = option(0, "Ray actors, each holding the student and teachers (0 = as many as the cluster's CPUs/GPUs hold)", min=0, max=4096)
    worker_cpus: float = option(1.0, "CPUs each Ray actor reserves (its torch threads too, unless run.threads is set)", min=0.0, max=1024.0)
    worker_gpus: float = option(0.0, "GPUs each Ray actor reserves", min=0.0, max=64.0)


# Where a run's units are computed, not what they hold: results do not depend
# on them (tests/test_executor_ray.py), so they are not part of a run's
# identity. `RunConfig.to_dict()` (config.toml, the resume check) leaves them
# out: a run started locally may resume on a cluster and the other way round,
# and a run's files are byte-identical whichever executor wrote them.
PLACEMENT_KEYS = ("executor", "ray_address", "workers", "worker_cpus", "worker_gpus")


@dataclass(frozen=True)
class StudentKeys:
    """The [student] keys the run itself uses; the table's other keys are the back-end's options."""

    backend: str = option("hf", "student back-end plugin")
    temperature: float = option(1.0, "sampling temperature τ > 0; the policy is softmax(z/τ)", min=0.0, min_exclusive=True, max=100.0)
    max_new_tokens: int = option(64, "generation limit of rollouts and of continuations from a node", min=1, max=65_536)


STUDENT_KEYS = [f.name for f in fields(StudentKeys)]
TABLES = ("run", "student", "task", "sampler", "estimator", "objectives", "teachers")

# The built-in defaults as a raw table (what `validate({})` fills in).
DEFAULTS: dict[str, dict[str, Any]] = {
    "run": as_dict(RunOptions()),
    "student": {**as_dict(StudentKeys()), "model": "smollm2-135m-instruct", "dtype": "float32"},
    "task": {},
    "sampler": {"name": "prefix"},
    "estimator": {"name": "targeted"},
    "objectives": {},
    "teachers": {},
}


# ----------------------------------------------------------------------------
# The checked configuration


@dataclass(frozen=True)
class Choice:
    """A plugin picked by name, with its checked options (a dataclass instance)."""

    name: str
    options: Any

    def option_dict(self) -> dict:
        return as_dict(self.options)


@dataclass(frozen=True)
class RunConfig:
    run: RunOptions
    student: StudentKeys
    student_options: Any  # the back-end's options dataclass
    task: Choice
    sampler: Choice
    estimator: Choice
    objectives: dict[str, Choice]  # the scored objectives, in order
    objective_tables: dict[str, dict] = field(default_factory=dict)  # raw [objectives.NAME] tables
    teachers: dict[str, Choice] = field(default_factory=dict)  # [teachers.NAME]: type and options

    @property
    def rollouts_total(self) -> int:
        return self.run.questions * self.run.rollouts_per_question

    def to_dict(self) -> dict:
        """The resolved configuration as TOML-ready tables (None values left out:
        TOML has no null, and an absent key reads back as the default None).
        The executor's keys (PLACEMENT_KEYS) are left out: they are not part
        of what the run is."""

        def clean(d: dict) -> dict:
            return {k: v for k, v in d.items() if v is not None}

        return {
            "run": clean({k: v for k, v in as_dict(self.run).items() if k not in PLACEMENT_KEYS}),
            "student": clean({**as_dict(self.student), **as_dict(self.student_options)}),
            "task": clean(self.task.option_dict()),
            "sampler": clean({"name": self.sampler.name, **self.sampler.option_dict()}),
            "estimator": clean({"name": self.estimator.name, **self.estimator.option_dict()}),
            "objectives": {name: clean(choice.option_dict()) for name, choice in self.objectives.items()},
            "teachers": {name: clean({"type": c.name, **c.option_dict()}) for name, c in self.teachers.items()},
        }


# ----------------------------------------------------------------------------
# Validation


def _table(raw: dict, name: str) -> dict:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise UsageError(f"[{name}] must be a table of key = value, got {value!r} (write it as [{name}] on its own line)")
    return dict(value)


def _split_name(table: dict, where: str, default: str) -> tuple[str, dict]:
    table = dict(table)
    name = table.pop("name", default)
    if not isinstance(name, str) or not name:
        raise UsageError(f"{where}.name must be a string naming a {where}, got {name!r}")
    return name, table


def validate(raw: dict, registry) -> RunConfig:
    """Check every table, key, type and range; unknown names and options get a
    suggestion. Returns the frozen RunConfig. Nothing is loaded."""
    if not isinstance(raw, dict):
        raise UsageError(f"the configuration must be a set of tables, got {raw!r}")
    for table in raw:
        if table not in TABLES:
            raise UsageError(f"unknown table [{table}] in config.{did_you_mean(str(table), TABLES)} Tables: {', '.join(TABLES)}")

    run_raw = _table(raw, "run")
    for key in ("teachers", "objectives"):
        if isinstance(run_raw.get(key), str):
            run_raw[key] = [part.strip() for part in run_raw[key].split(",") if part.strip()]
    run = build_options(RunOptions, run_raw, "[run]")

    student_raw = {**DEFAULTS["student"], **_table(raw, "student")}
    keys = build_options(StudentKeys, {k: v for k, v in student_raw.items() if k in STUDENT_KEYS}, "[student]")
    backend_raw = {k: v for k, v in student_raw.items() if k not in STUDENT_KEYS}
    backend_fields = [f.name for f in fields(registry.get("student", keys.backend).options)]
    for key in backend_raw:
        if key not in backend_fields:
            known = STUDENT_KEYS + backend_fields
            raise UsageError(f"unknown key student.{key} in config.{did_you_mean(str(key), known)} Keys of [student]: {', '.join(known)}")
    student_options = build_options(registry.get("student", keys.backend).options, backend_raw, "[student]")

    task = Choice(run.task, registry.options("task", run.task, _table(raw, "task")))
    sampler_name, sampler_raw = _split_name(_table(raw, "sampler"), "sampler", "prefix")
    sampler = Choice(sampler_name, registry.options("sampler", sampler_name, sampler_raw))
    estimator_name, estimator_raw = _split_name(_table(raw, "estimator"), "estimator", "targeted")
    estimator = Choice(estimator_name, registry.options("estimator", estimator_name, estimator_raw))

    objective_tables = _table(raw, "objectives")
    for name, table in objective_tables.items():
        registry.get("objective", name)
        if not isinstance(table, dict):
            raise UsageError(f"[objectives.{name}] must be a table of options, got {table!r}")
        registry.options("objective", name, table)  # checked even when not scored this run
    objective_names = registry.resolve("objective", run.objectives)
    objectives = {name: Choice(name, registry.options("objective", name, objective_tables.get(name, {}))) for name in objective_names}

    teachers = {}
    for name, table in _table(raw, "teachers").items():
        if not isinstance(table, dict):
            raise UsageError(f"[teachers.{name}] must be a table (type = \"model\", model = \"…\", context = \"…\"), got {table!r}")
        if name in registry.names("teacher"):
            raise UsageError(f"[teachers.{name}]: {name!r} is already a registered teacher; pick another name")
        if not name or "," in name or "/" in name or name.strip() != name:
            raise UsageError(f"[teachers.{name!r}]: a teacher name cannot be empty or contain ',', '/' or surrounding spaces")
        table = dict(table)
        kind = table.pop("type", "model")
        options = build_options(registry.get("teacher_type", kind).options, table, f"[teachers.{name}] (type {kind!r})")
        context = getattr(options, "context", None)
        if isinstance(context, str):
            registry.get("context", context)
        teachers[name] = Choice(kind, options)
    known_teachers = {*registry.names("teacher"), *teachers}
    resolved = _resolve_names("teacher", run.teachers, known_teachers)
    run = RunOptions(**{**as_dict(run), "teachers": resolved, "objectives": objective_names})

    return RunConfig(run, keys, student_options, task, sampler, estimator, objectives, objective_tables, teachers)


def _resolve_names(kind: str, spec: list[str], known) -> list[str]:
    from gadiag_core.errors import unknown_name

    known = sorted(known)
    if list(spec) == ["all"]:
        return known
    if not spec:
        raise UsageError(f"no {kind} given: name one or more, or 'all'. Available: {', '.join(known)}")
    for name in spec:
        if name not in known:
            raise unknown_name(kind, name, known)
    return list(dict.fromkeys(spec))


# ----------------------------------------------------------------------------
# Files and overrides


def load_toml(path: str | Path) -> dict:
    """Parse a TOML file; errors name the file and say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark (Windows editors): harmless
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UsageError(f"{path} is UTF-16 text: TOML files are UTF-8; save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UsageError(
            f"{path} is not UTF-8 text (line {line}, byte {exc.start}: a Latin-1 or Windows-1252 file?): save it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None


def parse_value(text: str):
    """A command-line value as TOML would read it (0.9, true, [1, 2], "x"), else the text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(config: dict, dotted: str, value) -> None:
    """config['a']['b'] = value for 'a.b', config['a']['b']['c'] for 'a.b.c'."""
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise UsageError(f"setting {dotted!r} must look like table.key (or objectives.NAME.key, teachers.NAME.key)")
    if parts[0] in ("objectives", "teachers") and len(parts) == 3:
        target = config.setdefault(parts[0], {}).setdefault(parts[1], {})
        if not isinstance(target, dict):
            raise UsageError(f"setting {dotted!r}: [{parts[0]}.{parts[1]}] is not a table")
        target[parts[2]] = value
        return
    if len(parts) != 2:
        raise UsageError(f"setting {dotted!r} must look like table.key (or objectives.NAME.key, teachers.NAME.key)")
    table = config.setdefault(parts[0], {})
    if not isinstance(table, dict):
        raise UsageError(f"setting {dotted!r}: [{parts[0]}] is not a table")
    table[parts[1]] = value


def parse_set(items: list[str]) -> dict:
    """--set table.key=value items → {dotted: value}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r} must look like table.key=value, e.g. objectives.jsd.beta=0.9")
        out[key.strip()] = parse_value(value.strip())
    return out


def raw_config(path: str | Path | None, overrides: dict[str, Any]) -> dict:
    """Defaults ← config file (if any) ← overrides ({dotted: value}, None = unset)."""
    raw = copy.deepcopy(load_toml(path)) if path else {}
    for name, value in raw.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            raise UsageError(f"{path}: [[{name}]] is an array of tables; write the table once as [{name}]")
        if not isinstance(value, dict):
            raise UsageError(f"{path}: {name} = {value!r} must be a table: write it as [{name}] on its own line, then key = value lines")
    for dotted, value in overrides.items():
        if value is not None:
            set_dotted(raw, dotted, value)
    return raw


def resolve(path: str | Path | None, overrides: dict[str, Any], registry) -> RunConfig:
    return validate(raw_config(path, overrides), registry)


def to_toml(config: dict) -> str:
    """TOML text of a resolved config dict (tomli-w: any string, newline or
    quote, and any table name survive the round trip)."""
    import tomli_w

    return tomli_w.dumps(config)

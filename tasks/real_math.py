"""Real math benchmarks: ``gsm8k``, ``math500`` and the generic ``jsonl`` task.

Data is loaded with ``datasets``: by default the usual hub copy
(``openai/gsm8k`` config ``main`` split ``test``; ``HuggingFaceH4/MATH-500``
split ``test``), or a local file or folder given as the ``data`` option of the
``[task]`` table (the ``--data PATH`` flag). A local path may be a ``.jsonl`` /
``.json`` / ``.parquet`` file or a folder holding such files (all of one kind).

Answers are judged with math-verify (the verifier TRL and NeMo-RL use): the
gold answer is parsed once per problem, the completion with boxed extraction
first and then the answer statement / last number, and the two are compared
with ``math_verify.verify``. Nothing here raises on a garbled completion.

math-verify's own timeouts use SIGALRM, which only works in the main thread:
there we keep its timeouts (``TIMEOUT_S``); in any other thread they are
switched off and the completion is cut to its last ``MAX_COMPLETION_CHARS``
characters instead, so one pathological string cannot stall a worker for long.

Problem choice: ``problems(count, seed)`` takes the first ``count`` rows of a
permutation of the data set seeded by ``seed`` (``shuffle = false`` takes the
first ``count`` rows in file order). Asking for more problems than the data set
has is an error naming the size. Problem ids are the row index in the data set
(``gsm8k-0042``), so they are stable across seeds and counts.

Options (the ``[task]`` table of harness.toml):
    data      path to a local copy (default: the hub data set; jsonl: required)
    shuffle   seeded shuffle before taking the first `count` rows (default true)
  jsonl only:
    question_field, answer_field   column names (default "question", "answer")
    solution_field                 optional column with a worked solution (without
                                   one the `solution` and `other_solution` teachers
                                   are skipped, not silently given the answer)
    id_field                       optional column with a problem id (ids must not
                                   repeat; rows without one are named jsonl-NNNN)
    prompt                         the user turn: "{question}" is the question
                                   field, "{NAME}" any field of the row, "{{ }}"
                                   literal braces (default: the MATH boxed instruction)

Data errors name the row (1-based, the line of a one-file JSONL source) and
the field; a malformed JSONL line is reported with its line number before any
model loads.
"""

from __future__ import annotations

import os
import random
import re
import threading
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

from gadiag_core import hookimpl
from gadiag_core.options import as_dict, option
from gadiag_core.errors import UsageError
from gadiag_core.interfaces import Problem, Task

# Seconds math-verify may spend parsing / comparing (main thread only, see above).
TIMEOUT_S = 5
# Longest completion tail handed to math-verify.
MAX_COMPLETION_CHARS = 20_000
# Longest gold answer we accept (longer ones are not answers).
MAX_ANSWER_CHARS = 2_000

_LOCAL_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
GSM8K_INSTRUCTION = (
    'Solve the problem step by step. End your response with "The answer is N." '
    "where N is the final number."
)


# ----------------------------------------------------------------------------
# Loading


def _hf_offline_hint(task: str) -> str:
    return f"pass --data PATH (or [task] data = ...) to a local JSONL/Parquet copy of the {task} data set"


def load_rows(task: str, data, hub: Optional[tuple[str, Optional[str], str]]):
    """The rows of a data set as a `datasets.Dataset`.

    `data` is a local path (file or folder) or None for the hub copy `hub` =
    (path, config name, split). Every failure is a one-line UsageError."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a dependency
        raise UsageError(f"task {task!r} needs the 'datasets' package: pip install datasets ({exc})") from None
    if data is None or str(data).strip() == "":
        if hub is None:
            raise UsageError(f"task {task!r} needs a data file: set [task] data = \"PATH\" or pass --data PATH")
        path, config, split = hub
        try:
            return datasets.load_dataset(path, config, split=split)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UsageError(
                f"task {task!r}: could not load {path!r} from the Hugging Face hub ({reason}); {_hf_offline_hint(task)}"
            ) from None
    if not isinstance(data, (str, os.PathLike)):
        raise UsageError(f"task {task!r}: option 'data' must be a path, got {data!r}")
    local = Path(os.path.expanduser(str(data)))
    if not local.exists():
        raise UsageError(f"task {task!r}: data path {str(local)!r} does not exist; {_hf_offline_hint(task)}")
    if local.is_dir():
        files = sorted(p for p in local.iterdir() if p.is_file() and p.suffix.lower() in _LOCAL_KINDS)
        if not files:
            raise UsageError(
                f"task {task!r}: data folder {str(local)!r} holds no .jsonl, .json or .parquet file"
            )
        kinds = {_LOCAL_KINDS[p.suffix.lower()] for p in files}
        if len(kinds) > 1:
            raise UsageError(f"task {task!r}: data folder {str(local)!r} mixes JSON and Parquet files; keep one kind")
    else:
        if local.suffix.lower() not in _LOCAL_KINDS:
            raise UsageError(
                f"task {task!r}: data file {str(local)!r} is not .jsonl, .json or .parquet"
            )
        files = [local]
        kinds = {_LOCAL_KINDS[local.suffix.lower()]}
    kind = kinds.pop()
    for p in files:
        if p.suffix.lower() == ".jsonl":
            _check_jsonl_lines(task, p)
    if all(_has_no_rows(p, kind) for p in files):
        raise UsageError(f"task {task!r}: the data set {str(local)!r} is empty (no rows)")
    try:
        return datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"task {task!r}: could not read {str(local)!r} ({reason})") from None


# JSONL files up to this size are checked line by line before `datasets` reads them.
MAX_CHECKED_BYTES = 512 * 1024 * 1024


def _check_jsonl_lines(task: str, path: Path) -> None:
    """Every non-blank line of a JSONL file is a JSON object: else a UsageError
    naming the file and the line (`datasets` reports neither)."""
    from gadiag_core.store.jsonl import BadLine, parse_records

    try:
        if path.stat().st_size > MAX_CHECKED_BYTES:
            return
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"task {task!r}: cannot read {str(path)!r} ({exc.strerror})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UsageError(f"task {task!r}: {str(path)!r} line {line} is not UTF-8 text: save the file as UTF-8") from None
    try:
        parse_records(text)
    except BadLine as bad:
        if not bad.complete:
            raise UsageError(f"task {task!r}: {str(path)!r} line {bad.number} is not valid JSON ({bad.reason})") from None
        raise UsageError(f"task {task!r}: {str(path)!r} line {bad.number} is not a JSON object {{\"field\": value, …}}") from None


def _has_no_rows(path: Path, kind: str) -> bool:
    """True when a local file certainly holds no rows (`datasets` fails on those)."""
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(str(path)).metadata.num_rows == 0
        if path.stat().st_size > 1_000_000:
            return False
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        return text in ("", "[]")
    except Exception:  # unreadable: let `datasets` report it
        return False


def _require_fields(task: str, rows, fields: list[str], where: str) -> None:
    columns = list(rows.column_names or [])
    missing = [f for f in fields if f not in columns]
    if missing:
        raise UsageError(
            f"task {task!r}: {where} lacks field(s) {', '.join(repr(f) for f in missing)}; "
            f"its fields are: {', '.join(columns) if columns else '(none)'}"
        )


# ----------------------------------------------------------------------------
# Verification


def _timeout() -> Optional[int]:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _as_text(value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        try:
            value = str(value)
        except Exception:
            return ""
    return value


def parse_gold(answer: str, latex: bool) -> list:
    """math-verify's parse of a gold final answer ([] when unreadable)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = _as_text(answer).strip()
    if not text or len(text) > MAX_ANSWER_CHARS:
        return []
    try:
        if latex:
            # The answer field is bare LaTeX ("\frac{1}{2}", "(3, \frac{\pi}{2})"):
            # boxing it makes the whole field the answer.
            return parse(f"\\boxed{{{text}}}", [LatexExtractionConfig()], parsing_timeout=_timeout())
        return parse(text, [ExprExtractionConfig(), LatexExtractionConfig()], parsing_timeout=_timeout())
    except Exception:
        return []


def parse_completion(completion) -> list:
    """math-verify's parse of a model completion: the last \\boxed{} first, then
    an answer statement / the last number ([] when nothing is found)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = _as_text(completion)[-MAX_COMPLETION_CHARS:]
    if not text.strip():
        return []
    try:
        return parse(
            text,
            [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
            parsing_timeout=_timeout(),
        )
    except Exception:
        return []


def answers_match(gold: list, completion) -> bool:
    """True when `completion` states the parsed gold answer. Never raises."""
    from math_verify import verify

    try:
        if not gold:
            return False
        predicted = parse_completion(completion)
        if not predicted:
            return False
        if _undefined(predicted) and not _undefined(gold):
            # math-verify 0.9 sometimes equates oo**(oo**oo) and the like with any
            # number: an infinite or undefined prediction never matches a finite gold.
            return False
        return bool(verify(gold, predicted, timeout_seconds=_timeout()))
    except Exception:  # a verifier never raises: garbage is simply wrong
        return False


def _undefined(parsed: list) -> bool:
    """True when a parsed answer involves infinity, complex infinity or NaN."""
    import sympy

    for item in parsed:
        if isinstance(item, sympy.Basic):
            try:
                if item.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
                    return True
            except Exception:
                return True
    return False


# ----------------------------------------------------------------------------
# Tasks


class _DataTask(Task):
    """A task backed by a data set: load once, convert rows, verify with math-verify."""

    hub: Optional[tuple[str, Optional[str], str]] = None
    latex_answers = True

    def __init__(self, data=None, shuffle: bool = True) -> None:
        if not isinstance(shuffle, bool):
            raise UsageError(f"task {self.name!r}: option 'shuffle' must be true or false, got {shuffle!r}")
        if data is not None and not isinstance(data, (str, os.PathLike)):
            raise UsageError(f"task {self.name!r}: option 'data' must be a path, got {data!r}")
        if data is not None and str(data).strip() and not Path(os.path.expanduser(str(data))).exists():
            raise UsageError(f"task {self.name!r}: data path {str(data)!r} does not exist; {_hf_offline_hint(self.name)}")
        self.data = str(data) if data is not None and str(data).strip() else None
        self.shuffle = shuffle
        self._problems: Optional[list[Problem]] = None
        self._gold: dict[str, list] = {}
        self._lock = threading.Lock()

    @property
    def source(self) -> str:
        """Where the problems come from (for records)."""
        if self.data is not None:
            return self.data
        return ":".join(p for p in (self.hub or ()) if p) or "(none)"

    # -- data -----------------------------------------------------------------

    def _convert(self, rows) -> list[Problem]:
        raise NotImplementedError

    def all_problems(self) -> list[Problem]:
        """Every problem of the data set, in row order (loaded once)."""
        if self._problems is None:
            rows = load_rows(self.name, self.data, self.hub)
            problems = self._convert(rows)
            if not problems:
                raise UsageError(f"task {self.name!r}: the data set {self.source!r} is empty")
            self._problems = problems
        return self._problems

    def problems(self, count: int, seed: int) -> list[Problem]:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise UsageError(f"task {self.name!r}: the number of problems must be a non-negative integer, got {count!r}")
        everything = self.all_problems()
        if count > len(everything):
            raise UsageError(
                f"task {self.name!r}: asked for {count} problems but {self.source!r} has only {len(everything)}"
            )
        order = list(range(len(everything)))
        if self.shuffle:
            random.Random(f"gadiag-{self.name}:{seed}").shuffle(order)
        return [everything[i] for i in order[:count]]

    # -- verifier -------------------------------------------------------------

    def _parsed_gold(self, problem: Problem) -> list:
        key = _as_text(problem.answer)
        with self._lock:
            if key in self._gold:
                return self._gold[key]
        parsed = parse_gold(key, self.latex_answers)
        with self._lock:
            self._gold[key] = parsed
        return parsed

    def verify(self, problem: Problem, completion: str) -> bool:
        try:
            return answers_match(self._parsed_gold(problem), completion)
        except Exception:  # never raise on garbage
            return False


_CALCULATOR = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"^\s*####\s*(.*?)\s*$", re.MULTILINE)


def gsm8k_answer(text: str) -> Optional[str]:
    """The final number after the last '####' of a GSM8K answer field (commas dropped)."""
    found = _GSM8K_FINAL.findall(_as_text(text))
    if not found:
        return None
    value = found[-1].replace(",", "").strip()
    return value or None


def gsm8k_solution(text: str, answer: str) -> str:
    """The worked solution without calculator annotations, ending 'The answer is N.'."""
    work = _GSM8K_FINAL.sub("", _CALCULATOR.sub("", _as_text(text))).strip()
    return f"{work}\nThe answer is {answer}."


class GSM8K(_DataTask):
    name = "gsm8k"
    # Bump when the prompt, the solution format, extraction or the verifier change.
    version = "1.0"
    description = "GSM8K grade-school word problems (test split); integer answers verified with math-verify."
    hub = ("openai/gsm8k", "main", "test")
    latex_answers = False

    def _convert(self, rows) -> list[Problem]:
        _require_fields(self.name, rows, ["question", "answer"], f"data set {self.source!r}")
        out = []
        for index, row in enumerate(rows):
            answer = gsm8k_answer(row["answer"])
            if answer is None:
                raise UsageError(
                    f"task 'gsm8k': row {index + 1} of {self.source!r} has no final '#### N' line in field 'answer'"
                )
            out.append(
                Problem(
                    id=f"gsm8k-{index:04d}",
                    question=_as_text(row["question"]).strip(),
                    answer=answer,
                    solution=gsm8k_solution(row["answer"], answer),
                    meta={"row": index},
                )
            )
        return out

    def student_messages(self, problem: Problem) -> list[dict]:
        return [{"role": "user", "content": f"{problem.question}\n{GSM8K_INSTRUCTION}"}]


class Math500(_DataTask):
    name = "math500"
    # Bump when the prompt, extraction or the verifier change.
    version = "1.0"
    description = "MATH-500 competition problems (PRM800K test subset); LaTeX answers verified with math-verify."
    hub = ("HuggingFaceH4/MATH-500", None, "test")

    def _convert(self, rows) -> list[Problem]:
        _require_fields(self.name, rows, ["problem", "solution", "answer"], f"data set {self.source!r}")
        columns = set(rows.column_names)
        out = []
        for index, row in enumerate(rows):
            meta = {"row": index}
            for key in ("subject", "level", "unique_id"):
                if key in columns and row[key] is not None:
                    meta[key] = row[key]
            out.append(
                Problem(
                    id=f"math500-{index:04d}",
                    question=_as_text(row["problem"]).strip(),
                    answer=_as_text(row["answer"]).strip(),
                    solution=_as_text(row["solution"]).strip(),
                    meta=meta,
                )
            )
        return out

    def student_messages(self, problem: Problem) -> list[dict]:
        return [{"role": "user", "content": f"{problem.question}\n{BOXED_INSTRUCTION}"}]

    def answer_statement(self, answer: str) -> str:
        return f"The answer is $\\boxed{{{answer}}}$."


def prompt_fields(prompt: str) -> list[str]:
    """The `{field}` placeholders of a prompt template, in order (each once).

    ValueError (the reason) when the template is malformed, uses attribute or
    index access, or has no placeholder at all: then the student would never
    see the question (``{{question}}`` is a literal "{question}")."""
    import string

    try:
        parsed = list(string.Formatter().parse(prompt))
    except ValueError as exc:
        raise ValueError(f"is not a valid template ({exc}); write literal braces as {{{{ }}}}") from None
    names = []
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError("has an empty or numbered placeholder {}: name a field, e.g. {question}")
        if any(c in name for c in ".[]") or spec:
            raise ValueError(f"has the placeholder {{{name}{':' + spec if spec else ''}}}: write plain {{field}} names")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(
            "has no {field} placeholder, so the student would never see the question: "
            "write {question} (doubled braces {{question}} are literal text)"
        )
    return names


class JsonlTask(_DataTask):
    name = "jsonl"
    # Bump when the default prompt, extraction or the verifier change.
    version = "1.1"
    description = "Any JSONL/Parquet file of question/answer rows (field names set in the task config); math-verify checks answers."

    def __init__(
        self,
        data=None,
        shuffle: bool = True,
        question_field: str = "question",
        answer_field: str = "answer",
        solution_field: Optional[str] = None,
        id_field: Optional[str] = None,
        prompt: str = "{question}\n" + BOXED_INSTRUCTION.replace("{}", "{{}}"),
    ) -> None:
        if data is None or not str(data).strip():
            raise UsageError("task 'jsonl' needs a data file: set [task] data = \"PATH\" or pass --data PATH")
        for key, value in (("question_field", question_field), ("answer_field", answer_field)):
            if not isinstance(value, str) or not value:
                raise UsageError(f"task 'jsonl': option {key!r} must be a field name, got {value!r}")
        for key, value in (("solution_field", solution_field), ("id_field", id_field)):
            if value is not None and (not isinstance(value, str) or not value):
                raise UsageError(f"task 'jsonl': option {key!r} must be a field name, got {value!r}")
        if not isinstance(prompt, str):
            raise UsageError(f"task 'jsonl': option 'prompt' must be a string, got {prompt!r}")
        try:
            self.prompt_fields = prompt_fields(prompt)
        except ValueError as exc:
            raise UsageError(f"task 'jsonl': option prompt = {prompt!r} {exc}") from None
        super().__init__(data=data, shuffle=shuffle)
        self.question_field = question_field
        self.answer_field = answer_field
        self.solution_field = solution_field
        self.id_field = id_field
        self.prompt = prompt

    def _column(self, placeholder: str) -> str:
        """The data column a placeholder reads: {question} is the question field."""
        return self.question_field if placeholder == "question" else placeholder

    def _convert(self, rows) -> list[Problem]:
        fields = [self.question_field, self.answer_field]
        fields += [f for f in (self.solution_field, self.id_field) if f]
        fields += [self._column(name) for name in self.prompt_fields]
        _require_fields(self.name, rows, list(dict.fromkeys(fields)), f"data set {self.source!r}")
        out = []
        rows_of: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            where = f"task 'jsonl': row {index + 1} of {self.source!r}"
            for field_name in (self.question_field, self.answer_field):
                if not _as_text(row[field_name]).strip():
                    raise UsageError(f"{where}: field {field_name!r} is empty or null")
            if len(_as_text(row[self.answer_field]).strip()) > MAX_ANSWER_CHARS:
                raise UsageError(f"{where}: field {self.answer_field!r} is longer than {MAX_ANSWER_CHARS} characters: not a final answer")
            answer = _as_text(row[self.answer_field]).strip()
            # No solution field (or an empty one): no solution, and the contexts
            # that need one (solution, other_solution) skip this question.
            solution = _as_text(row[self.solution_field]).strip() if self.solution_field else ""
            ident = f"jsonl-{index:04d}"
            if self.id_field and row[self.id_field] is not None and _as_text(row[self.id_field]).strip():
                ident = _as_text(row[self.id_field]).strip()
            rows_of.setdefault(ident, []).append(index + 1)
            values = {name: _as_text(row[self._column(name)]).strip() for name in self.prompt_fields}
            out.append(
                Problem(
                    id=ident,
                    question=_as_text(row[self.question_field]).strip(),
                    answer=answer,
                    solution=solution,
                    meta={"row": index, "prompt_values": values},
                )
            )
        repeated = {ident: where for ident, where in rows_of.items() if len(where) > 1}
        if repeated:
            shown = "; ".join(f"{ident!r} on rows {', '.join(map(str, where))}" for ident, where in list(repeated.items())[:5])
            raise UsageError(
                f"task 'jsonl': question ids repeat in {self.source!r} ({shown}); every row needs its own id"
                + (f" (field {self.id_field!r}; rows without one are named jsonl-NNNN by row)" if self.id_field else "")
            )
        return out

    def student_messages(self, problem: Problem) -> list[dict]:
        values = problem.meta.get("prompt_values") or {"question": problem.question}
        return [{"role": "user", "content": self.prompt.format_map(values)}]

    def answer_statement(self, answer: str) -> str:
        return f"The answer is $\\boxed{{{answer}}}$."


@dataclass(frozen=True)
class DataOptions:
    data: Optional[str] = option(None, "a .jsonl/.json/.parquet file or folder (none: the Hugging Face hub copy)")
    shuffle: bool = option(True, "draw questions in a seeded random order (false: file order)")


@dataclass(frozen=True)
class JsonlOptions(DataOptions):
    question_field: str = option("question", "column with the question")
    answer_field: str = option("answer", "column with the gold final answer")
    solution_field: Optional[str] = option(None, "column with a worked solution (none: the solution and other_solution teachers are skipped)")
    id_field: Optional[str] = option(None, "column with a problem id (none: jsonl-NNNN by row; ids must not repeat)")
    prompt: str = option(
        "{question}\n" + BOXED_INSTRUCTION.replace("{}", "{{}}"),
        "the user turn: {question} is the question field, {NAME} any field of the row, {{ }} literal braces",
    )


def _factory(cls):
    def factory(options, run):
        return cls(**as_dict(options))

    factory.__doc__ = f"Build the {cls.name!r} task from the [task] options of harness.toml."
    return factory


gsm8k_factory = _factory(GSM8K)
math500_factory = _factory(Math500)
jsonl_factory = _factory(JsonlTask)


@hookimpl
def register_tasks(register):
    register("gsm8k", gsm8k_factory, GSM8K.description, options=DataOptions)
    register("math500", math500_factory, Math500.description, options=DataOptions)
    register("jsonl", jsonl_factory, JsonlTask.description, options=JsonlOptions)

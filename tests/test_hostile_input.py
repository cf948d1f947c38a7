"""Issue 18: unseen data and hostile input. Nothing lost, nothing silent.

Each case carries the issue's id (D = data loss, S = silent wrong result, T =
traceback / exit code / hang / crash, F = friction). Every failure must be one
line on stderr, no traceback, exit 2 for bad input and 1 for an environment
failure (disk full, read-only) with the path named; a failed start leaves no
run directory. Most cases fail before any model loads; the rest run the toy
student (a few seconds each) or the tiny chat model.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from gadiag_core.commands.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = """
[run]
questions = 1
rollouts_per_question = 1
threads = 1
"""

TOY = """
[run]
task = "toy"
teachers = "solution,answer"
questions = 2
rollouts_per_question = 2
threads = 1

[student]
max_new_tokens = 4
"""


@pytest.fixture(autouse=True)
def away_from_harness_toml(tmp_path, monkeypatch):
    """Run every command from an empty folder: ./harness.toml would be read otherwise."""
    monkeypatch.chdir(tmp_path)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("gadiag-harness: error")]
    assert len(lines) == 1, err
    return lines[0]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def run_files(run_dir: Path) -> dict[str, bytes]:
    """The output files' bytes; summary.json without its "throughput" block
    (timings of the session that wrote it, which no two runs share)."""
    out = {name: (run_dir / name).read_bytes() for name in ("rollouts.jsonl", "tokens.jsonl", "questions.jsonl", "summary.json")}
    summary = json.loads(out["summary.json"])
    summary.pop("throughput", None)
    out["summary.json"] = json.dumps(summary, sort_keys=True).encode()
    return out


# ----------------------------------------------------------------------------
# Bad input found before any model loads: exit 2, one line, no folder left


def _raw(path: Path, data: bytes) -> None:
    path.write_bytes(data)


# (id, extra CLI args, config text or bytes (None: no --config), fragment of the message)
BEFORE_LOAD = [
    ("T-array-of-tables", [], "[[run]]\nseed = 1\n", "[[run]] is an array of tables; write the table once as [run]"),
    ("T-latin-1", [], "[run]\nseed = 1 # caf\xe9\n".encode("latin-1"), "is not UTF-8 text (line 2"),
    ("T-utf-16", [], "[run]\nseed = 1\n".encode("utf-16"), "is UTF-16 text: TOML files are UTF-8"),
    ("T-toml-date", [], BASE + "[student]\ntemperature = 2024-01-01\n", "student.temperature = datetime.date(2024, 1, 1) must be a number"),
    ("T-teacher-context-int", [], BASE + "[teachers.big]\nmodel = 'x'\ncontext = 5\n", "[teachers.big] (type 'model'): option context = 5 must be a string"),
    ("T-screen-epsilon-text", [], BASE + "[estimator]\nscreen_epsilon = 'abc'\n", "estimator 'targeted': option screen_epsilon = 'abc' must be a number"),
    ("T-batch-size-text", [], BASE + "[sampler]\nbatch_size = 'big'\n", "sampler 'prefix': option batch_size = 'big' must be an integer"),
    ("T-mass-threshold-5", [], BASE + "[estimator]\nmass_threshold = 5.0\n", "option mass_threshold = 5.0 must be ≤ 1"),
    ("T-mass-threshold-negative", [], BASE + "[estimator]\nmass_threshold = -1.0\n", "option mass_threshold = -1.0 must be ≥ 0"),
    ("T-mass-threshold-nan", [], BASE + "[estimator]\nmass_threshold = nan\n", "option mass_threshold = nan must be a finite number"),
    ("T-temperature-inf", ["--temperature", "inf"], BASE, "student.temperature = inf must be a finite number"),
    ("T-temperature-nan", ["--temperature", "nan"], BASE, "student.temperature = nan must be a finite number"),
    ("T-seed-huge", ["--seed", "99999999999999999999999"], BASE, "run.seed = 99999999999999999999999 is too large"),
    ("T-max-new-tokens-huge", ["--max-new-tokens", "1000000000"], BASE, "student.max_new_tokens = 1000000000 must be ≤ 65536"),
    ("T-threads-huge", ["--threads", "100000"], BASE, "run.threads = 100000 must be ≤ 1024"),
    ("T-toy-target-huge", ["--task", "toy"], BASE + f"[task]\ntargets = [{10**18}]\n", "target 1000000000000000000 is too large"),
    ("T-toy-range-huge", ["--task", "toy"], BASE + "[task]\ntargets = '0-100000000000'\n", "targets range '0-100000000000' is too wide"),
    ("F-option-typo", ["--task", "toy"], BASE + "[task]\nwidht = 3\n", "task 'toy' has no option 'widht'. Did you mean 'width'?"),
    ("T-teacher-typo", ["--teachers", "solutoin"], BASE, "unknown teacher 'solutoin'. Did you mean 'solution'?"),
    ("S2-doubled-braces", ["--task", "jsonl", "--data", "{data}"], BASE + "[task]\nprompt = 'Q: {{question}}'\n",
     "has no {field} placeholder, so the student would never see the question"),
    ("F-prompt-unknown-field", ["--task", "jsonl", "--data", "{data}"], BASE + "[task]\nprompt = '{Body} {question}'\n",
     "lacks field(s) 'Body'"),
    ("F-jsonl-bad-line", ["--task", "jsonl", "--data", "{bad_line}"], BASE, "line 2 is not valid JSON"),
    ("F-jsonl-empty-answer", ["--task", "jsonl", "--data", "{empty_answer}"], BASE, "row 2 of"),
    ("D3-colliding-ids", ["--task", "jsonl", "--data", "{colliding}"], BASE + "[task]\nid_field = 'id'\n",
     "question ids repeat in"),
]


@pytest.fixture
def data_files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    return {
        "data": write_jsonl(folder / "ok.jsonl", [{"question": "1+1?", "answer": "2"}]),
        "bad_line": write_jsonl(folder / "bad.jsonl", [{"question": "1+1?", "answer": "2"}, '{"question": "2+2?", "answer": '])
        ,
        "empty_answer": write_jsonl(folder / "empty.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": None}]),
        # A null id becomes jsonl-0001 by its row, which another row names explicitly.
        "colliding": write_jsonl(folder / "ids.jsonl", [{"question": "a?", "answer": "1", "id": "jsonl-0001"},
                                                        {"question": "b?", "answer": "2", "id": None}]),
    }


@pytest.mark.parametrize("argv, config, expected", [c[1:] for c in BEFORE_LOAD], ids=[c[0] for c in BEFORE_LOAD])
def test_bad_input_before_models_load(argv, config, expected, tmp_path, data_files, capsys):
    # --model names nothing: every case must fail before a model is looked for.
    args = ["--output-dir", tmp_path / "runs", "--model", "/nonexistent/model"]
    if config is not None:
        path = tmp_path / "harness.toml"
        path.write_bytes(config if isinstance(config, bytes) else config.encode("utf-8"))
        args += ["--config", path]
    args += [a.format(**data_files) for a in argv]
    code, _, err = cli(capsys, *args)
    line = one_line(err)
    assert code == 2, err
    assert expected in line, line
    assert not (tmp_path / "runs").exists(), "a failed start left a run directory"


def test_utf8_bom_is_read(tmp_path, capsys):
    """T: a UTF-8 byte-order mark used to give a misleading 'Invalid statement'."""
    path = tmp_path / "harness.toml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    code, _, err = cli(capsys, "--config", path, "--model", "/nonexistent/model", "--output-dir", tmp_path / "runs")
    assert code == 2 and "model '/nonexistent/model' does not exist" in one_line(err)


def test_list_kind_plural(capsys):
    """F: `list tasks` (the heading's plural) works like `list task`."""
    code, out, err = cli(capsys, "list", "tasks")
    assert code == 0, err
    assert "jsonl" in out and "toy" in out


# ----------------------------------------------------------------------------
# D2: a folder that is not a run is never written into


def test_existing_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "report").mkdir(parents=True)
    (folder / "summary.json").write_text('{"mine": true}')
    (folder / "report" / "notes.txt").write_text("keep me")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    code, _, err = cli(capsys, "--task", "toy", "--run-dir", folder, "--model", "/nonexistent/model")
    assert code == 2
    assert f"--run-dir {folder} is a folder that holds files but is not a gadiag run" in one_line(err)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_unwritable_parent_exits_1_before_loading(tmp_path, capsys, monkeypatch):
    """T: an existing read-only --run-dir: exit 1 naming it, before any model loads.
    (Tests run as root, which writes anywhere: the permission check is patched.)"""
    import gadiag_core.store.rundir as rundir

    folder = tmp_path / "readonly"
    folder.mkdir()
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    code, _, err = cli(capsys, "--task", "toy", "--run-dir", folder, "--model", "/nonexistent/model")
    assert code == 1
    assert f"cannot write {folder}" in one_line(err)


# ----------------------------------------------------------------------------
# Answers (S1) and contexts without their information


def test_wrong_answer_for_numeric_text_of_any_form(tmp_path):
    from gadiag_tasks.real_math import JsonlTask

    golds = ["43.0", "43", "-5", "3/4", "\\frac{3}{4}", "1,234", "0.5", "0", "x^2+1"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}?", "answer": g} for i, g in enumerate(golds)])
    task = JsonlTask(data=str(data), shuffle=False)
    for problem in task.problems(len(golds), seed=0):
        for seed in range(5):
            wrong = task.wrong_answer(problem, random.Random(seed))
            assert wrong != "0" or problem.answer == "x^2+1", (problem.answer, wrong)
            assert not task.verify(problem, task.answer_statement(wrong)), (problem.answer, wrong)
            assert task.verify(problem, task.answer_statement(problem.answer))
    # The form is kept: a float stays a float, a fraction a fraction.
    floats, fraction = task.problems(len(golds), 0)[0], task.problems(len(golds), 0)[3]
    assert task.wrong_answer(floats, random.Random(0)).endswith(".0")
    assert "/" in task.wrong_answer(fraction, random.Random(0))


def test_contexts_without_a_solution_are_skipped(tmp_path):
    from gadiag_core.interfaces import ContextInputs
    from gadiag_tasks.real_math import JsonlTask
    from gadiag_teachers.contexts import AnswerContext, OtherSolutionContext, SolutionContext

    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1?", "answer": 2.0}, {"question": "2+2?", "answer": 4.0}])
    task = JsonlTask(data=str(data), shuffle=False)
    problems = task.problems(2, seed=0)
    inputs = ContextInputs(task, problems[0], task.student_messages(problems[0]), problems, [], 0, random.Random(0))
    assert SolutionContext().build(inputs) is None
    assert OtherSolutionContext().build(inputs) is None
    assert "2.0" in AnswerContext().build(inputs)[-1]["content"]


def test_prompt_placeholders_read_any_field(tmp_path):
    """F: SVAMP needs Body + Question in the prompt."""
    from gadiag_tasks.real_math import JsonlTask

    data = write_jsonl(tmp_path / "svamp.jsonl", [{"Body": "Tom has 3 apples.", "Question": "How many has he?", "Answer": 3.0}])
    task = JsonlTask(data=str(data), question_field="Question", answer_field="Answer", prompt="{Body} {question}\nAnswer: {{n}}")
    (problem,) = task.problems(1, seed=0)
    assert task.student_messages(problem)[0]["content"] == "Tom has 3 apples. How many has he?\nAnswer: {n}"


# ----------------------------------------------------------------------------
# Runs on the toy student


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory, toy_model_dir):
    """An uninterrupted toy run: what resumed and damaged runs must reproduce."""
    root = tmp_path_factory.mktemp("hostile")
    config = root / "harness.toml"
    config.write_text(TOY)
    run_dir = root / "reference"
    assert main(["--config", str(config), "--model", str(toy_model_dir), "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "tokens.jsonl").read_text().strip(), "nothing scored: the comparisons would be vacuous"
    return config, run_dir


def toy_argv(toy_reference, toy_model_dir, run_dir, *extra):
    config, _ = toy_reference
    return ["--config", config, "--model", toy_model_dir, "--run-dir", run_dir, *extra]


def copy_run(reference: Path, target: Path) -> Path:
    shutil.copytree(reference, target)
    return target


def test_D4_disk_full_while_writing_units_then_resume(toy_reference, toy_model_dir, tmp_path, capsys, monkeypatch):
    """D4: the disk fills while the second unit is written: exit 1 naming the file;
    the resumed run is identical to an uninterrupted one."""
    import gadiag_core.store.rundir as rundir

    real = os.replace
    units = []

    def full_disk(src, dst):
        # The unit's bytes went to NAME.json.tmp; the disk fills before it is complete.
        if "units" in Path(dst).parts:
            units.append(Path(dst))
            if len(units) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(rundir.os, "replace", full_disk)
    code, _, err = cli(capsys, *toy_argv(toy_reference, toy_model_dir, run_dir))
    assert code == 1
    line = one_line(err)
    assert f"cannot write {units[1]}: the disk is full" in line and "rerun the same command to resume" in line
    assert not list(run_dir.rglob("*.tmp")) and not units[1].exists() and units[0].exists()
    monkeypatch.setattr(rundir.os, "replace", real)
    code, _, err = cli(capsys, *toy_argv(toy_reference, toy_model_dir, run_dir))
    assert code == 0, err
    assert run_files(run_dir) == run_files(toy_reference[1])


def test_D4_disk_full_while_writing_the_html_report(toy_reference, toy_model_dir, tmp_path, capsys, monkeypatch):
    real = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.suffix == ".html":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(Path, "write_text", full_disk)
    code, _, err = cli(capsys, *toy_argv(toy_reference, toy_model_dir, run_dir))
    assert code == 1
    assert f"cannot write {run_dir / 'report'}: the disk is full" in one_line(err)
    monkeypatch.setattr(Path, "write_text", real)
    assert cli(capsys, *toy_argv(toy_reference, toy_model_dir, run_dir))[0] == 0
    assert run_files(run_dir) == run_files(toy_reference[1])
    assert (run_dir / "report" / "index.html").is_file()


def test_report_html_on_a_read_only_run(toy_reference, tmp_path, capsys, monkeypatch):
    run_dir = copy_run(toy_reference[1], tmp_path / "run")
    real = Path.write_text

    def read_only(self, *args, **kwargs):
        if self.suffix == ".html":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    code, _, err = cli(capsys, "report", run_dir, "--html")
    assert code == 1
    assert f"cannot write {run_dir / 'report'}" in one_line(err) and "read-only" in one_line(err)


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("S3-last-line-missing", "holds 3 of the run's 4 rollouts"),
        ("T-cut-mid-line", "line 4 is not a complete rollout"),
        ("T-unknown-question", "names question 'toy-9999', which is not a question of this run"),
        ("S3-config-deleted", "has records but no config.toml"),
    ],
)
def test_resume_verifies_what_it_reads(damage, expected, toy_reference, toy_model_dir, tmp_path, capsys):
    run_dir = copy_run(toy_reference[1], tmp_path / "run")
    rollouts = run_dir / "rollouts.jsonl"
    lines = rollouts.read_text().splitlines(keepends=True)
    extra = []
    if damage == "S3-last-line-missing":
        rollouts.write_text("".join(lines[:-1]))
    elif damage == "T-cut-mid-line":
        rollouts.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    elif damage == "T-unknown-question":
        row = json.loads(lines[-1])
        row["question"] = "toy-9999"
        rollouts.write_text("".join(lines[:-1]) + json.dumps(row) + "\n")
    else:
        (run_dir / "config.toml").unlink()
        extra = ["--seed", "7"]
    code, _, err = cli(capsys, *toy_argv(toy_reference, toy_model_dir, run_dir, *extra))
    assert code == 2
    line = one_line(err)
    assert expected in line, line
    assert "pick a new --run-dir" in line


def test_corrupt_unit_is_diagnosed_again(toy_reference, toy_model_dir, tmp_path, capsys):
    run_dir = copy_run(toy_reference[1], tmp_path / "run")
    unit = sorted((run_dir / "units").glob("*.json"))[0]
    unit.write_text('{"tokens": [')
    code, _, err = cli(capsys, *toy_argv(toy_reference, toy_model_dir, run_dir))
    assert code == 0, err
    assert f"{unit} is damaged (it does not parse" in err and "diagnosed again" in err
    assert run_files(run_dir) == run_files(toy_reference[1])


def test_failed_start_leaves_nothing_then_the_corrected_command_runs(toy_reference, toy_model_dir, tmp_path, capsys):
    """T: a typo'd teacher, then the corrected command on the same --run-dir."""
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, *toy_argv(toy_reference, toy_model_dir, run_dir, "--teachers", "solutoin,answer"))
    assert code == 2 and "Did you mean 'solution'?" in one_line(err)
    assert not run_dir.exists()
    assert cli(capsys, *toy_argv(toy_reference, toy_model_dir, run_dir))[0] == 0
    assert run_files(run_dir) == run_files(toy_reference[1])
    assert (run_dir / ".gadiag-run").is_file()


def test_space_selecting_nothing_fails_before_sampling(toy_reference, toy_model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, *toy_argv(toy_reference, toy_model_dir, run_dir, "--space", "params:re:^nothing$"))
    assert code == 2
    assert "gradient space 'params:re:^nothing$' selects no parameter of this model" in one_line(err)
    assert not run_dir.exists()


def test_truncated_model_file(toy_model_dir, tmp_path, capsys):
    model = shutil.copytree(toy_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = cli(capsys, "--task", "toy", "--model", model, "--output-dir", tmp_path / "runs", "--questions", "1")
    assert code == 2
    assert "student 'hf'" in one_line(err)
    assert not (tmp_path / "runs").exists()


def test_report_on_a_malformed_summary(toy_reference, tmp_path, capsys):
    run_dir = copy_run(toy_reference[1], tmp_path / "run")
    for text in ("{not json", '{"rows": 3}'):
        (run_dir / "summary.json").write_text(text)
        code, _, err = cli(capsys, "report", run_dir)
        assert code == 2
        assert f"{run_dir / 'summary.json'} is not" in one_line(err)


# A teacher plugin that misbehaves in each of the ways the issue lists.
BAD_TEACHERS = '''
import torch
from gadiag_core import hookimpl
from gadiag_core.interfaces import Teacher


class Bad(Teacher):
    def __init__(self, kind):
        self.kind = kind

    def node_logprobs(self, inputs, generated_ids):
        T = len(generated_ids)
        if self.kind == "nan":
            return torch.full((T, 100000), float("nan"))
        if self.kind == "shape":
            return torch.zeros(T + 1, 3)
        raise RuntimeError("scoring exploded")


def raises(options, run):
    raise RuntimeError("cannot reach the teacher server")


@hookimpl
def register_teachers(register):
    register("bad_factory", raises, "factory raises")
    register("none_factory", lambda options, run: None, "factory returns None")
    register("nan_teacher", lambda options, run: Bad("nan"), "NaN log-probs")
    register("shape_teacher", lambda options, run: Bad("shape"), "wrong shape")
    register("crash_teacher", lambda options, run: Bad("crash"), "raises while scoring")
'''


@pytest.mark.parametrize(
    "teacher, expected",
    [
        ("bad_factory", "failed to build: RuntimeError: cannot reach the teacher server"),
        ("none_factory", "its factory returned None instead of a teacher"),
        ("nan_teacher", "teacher 'nan_teacher' returned NaN or +inf log-probabilities"),
        ("shape_teacher", "teacher 'shape_teacher' returned log-probabilities of shape ("),
        ("crash_teacher", "teacher 'crash_teacher' failed on question"),
    ],
)
def test_plugin_teacher_failures_are_one_line(teacher, expected, toy_reference, toy_model_dir, tmp_path, capsys):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "bad_teachers.py").write_text(BAD_TEACHERS)
    code, _, err = cli(capsys, *toy_argv(toy_reference, toy_model_dir, tmp_path / "run", "--teachers", teacher, "--plugins-dir", plugins))
    assert code == 2
    line = one_line(err)
    assert expected in line, line


def test_S4_nothing_scored_says_why(toy_model_dir, tmp_path, capsys):
    """S4: every rollout wrong (the target cannot be reached in 4 tokens of
    digits ≤ 7): the leaderboard says so with the counts, and `show` says why."""
    config = tmp_path / "harness.toml"
    config.write_text(TOY.replace("[student]", "[task]\ntargets = [40]\n\n[student]"))
    run_dir = tmp_path / "run"
    code, out, err = cli(capsys, "--config", config, "--model", toy_model_dir, "--run-dir", run_dir)
    assert code == 0, err
    assert "nothing was scored: all 4 rollouts are incorrect" in out
    assert "the ideal gradient is zero" in out
    code, out, _ = cli(capsys, "report", run_dir)
    assert code == 0 and "nothing was scored: all 4 rollouts are incorrect" in out
    code, out, _ = cli(capsys, "show", run_dir, "--question", "0")
    assert code == 0
    assert "the ideal gradient is zero there" in " ".join(out.split())


def test_html_leaderboard_has_headline_and_token_columns(toy_reference):
    page = (toy_reference[1] / "report" / "index.html").read_text()
    head = page[page.index('<table class="leaderboard">') : page.index("</thead>")]
    for column in ("align", "raw", "incorrect", "correct", "token", "token raw"):
        assert f">{column}</th>" in head


# ----------------------------------------------------------------------------
# D1: anything the user typed survives config.toml; every written file is read back


def test_D1_newlines_and_odd_teacher_names_round_trip(toy_model_dir, tmp_path, capsys):
    """A newline in a string option and teacher names with a space and a dot:
    the run finishes, config.toml reads back equal, `report` reads the run and
    the same command resumes it to identical files."""
    config = tmp_path / "harness.toml"
    config.write_text(
        TOY.replace('teachers = "solution,answer"', "teachers = [\"my teacher\", \"big.v2\"]")
        .replace("questions = 2", "questions = 1")
        + '\n[sampler]\nname = "prefix"\nstop_strings = ["\\n\\n", "a \\"quoted\\" stop"]\n'
        + f'\n[teachers."my teacher"]\nmodel = "{toy_model_dir}"\ncontext = "answer"\n'
        + f'\n[teachers."big.v2"]\nmodel = "{toy_model_dir}"\ncontext = "solution"\n'
    )
    run_dir = tmp_path / "run"
    argv = ["--config", config, "--model", toy_model_dir, "--run-dir", run_dir]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    import tomllib

    stored = tomllib.loads((run_dir / "config.toml").read_text())
    assert stored["sampler"]["stop_strings"] == ["\n\n", 'a "quoted" stop']
    assert set(stored["teachers"]) == {"my teacher", "big.v2"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert any(row.startswith("big.v2/") for row in summary["rows"]) and any(row.startswith("my teacher/") for row in summary["rows"])
    before = run_files(run_dir)
    code, report_out, err = cli(capsys, "report", run_dir)
    assert code == 0, err
    assert "big.v2" in report_out
    code, _, err = cli(capsys, *argv)  # resumes: same settings, nothing redone
    assert code == 0, err
    assert run_files(run_dir) == before


def test_every_file_the_run_writes_reads_back(toy_reference):
    import tomllib

    import pandas as pd

    from gadiag_core.store.records import load_run

    run_dir = toy_reference[1]
    tomllib.loads((run_dir / "config.toml").read_text())
    json.loads((run_dir / "summary.json").read_text())
    json.loads((run_dir / ".gadiag-run").read_text())
    for name in ("rollouts", "questions", "tokens"):
        rows = [json.loads(line) for line in (run_dir / f"{name}.jsonl").read_text().splitlines()]
        assert len(pd.read_parquet(run_dir / f"{name}.parquet")) == len(rows) > 0
    for unit in (run_dir / "units").glob("*.json"):
        json.loads(unit.read_text())
    run = load_run(run_dir)
    assert run.finished and len(run.rollouts) == 4
    assert (run_dir / "report" / "index.html").read_text().count("</html>") == 1


# ----------------------------------------------------------------------------
# D3 and the JSONL task on the tiny chat model


def test_D3_ids_with_slashes_stay_inside_the_run(tiny_model_dir, tmp_path, capsys):
    """MATH-style ids with '/', and an id that tries to climb out of the run
    directory: every unit is inside units/, named by a digest; nothing else is written."""
    data = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "What is 1+1?", "answer": "2", "unique_id": "test/algebra/1.json"},
        {"problem": "What is 2+2?", "answer": "4", "unique_id": "../../../escaped"},
    ])
    config = tmp_path / "harness.toml"
    config.write_text(
        BASE.replace("questions = 1", "questions = 2")
        + "[task]\nquestion_field = 'problem'\nid_field = 'unique_id'\n[student]\nmax_new_tokens = 3\n"
    )
    run_dir = tmp_path / "deep" / "run"
    before = set(tmp_path.rglob("*"))
    code, _, err = cli(capsys, "--config", config, "--task", "jsonl", "--data", data, "--teachers", "answer",
                       "--model", tiny_model_dir, "--run-dir", run_dir)
    assert code == 0, err
    new = set(tmp_path.rglob("*")) - before
    assert all(run_dir in p.parents or p == run_dir or p == run_dir.parent for p in new), sorted(map(str, new))
    units = sorted(p.name for p in (run_dir / "units").iterdir())
    assert len(units) == 2 and all(name.startswith("q") and "/" not in name and ".." not in name for name in units)
    questions = [json.loads(line)["question"] for line in (run_dir / "questions.jsonl").read_text().splitlines()]
    assert sorted(questions) == ["../../../escaped", "test/algebra/1.json"]
    assert not list(tmp_path.rglob("escaped*"))


def test_readme_jsonl_example_runs(tiny_model_dir, tmp_path, capsys):
    """F: the README's MAWPS-style example, read from the README itself, runs to
    a leaderboard (on the tiny model: the real student's numbers are in the README)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Your own data: the `jsonl` task") :]
    rows = re.search(r"```json\n(.*?)```", section, re.S).group(1)
    config = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    (tmp_path / "mawps.jsonl").write_text(rows)
    (tmp_path / "harness.toml").write_text(config)
    n_rows = len(rows.strip().splitlines())
    code, out, err = cli(capsys, "--config", "harness.toml", "--model", tiny_model_dir, "--run-dir", "run",
                         "--questions", n_rows, "--rollouts", 1, "--max-new-tokens", 3, "--threads", 1)
    assert code == 0, err
    assert f"teacher solution skipped on {n_rows} of {n_rows} rollouts" in " ".join(out.split())
    assert "rl_outcome" in out or "nothing was scored" in out
    stored = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert len(stored) == n_rows and all(r["answer"].endswith(".0") for r in stored)
    import tomllib  # D1: the prompt's newline survives config.toml

    assert tomllib.loads((tmp_path / "run" / "config.toml").read_text())["task"]["prompt"] == "{question}\nAnswer with just the number."
    assert all(r["question_text"].endswith("?") for r in stored)


def test_S4_screened_out_rollout_says_why(toy_model_dir, tmp_path, capsys):
    """S4: a rollout whose every node is screened out: the leaderboard and
    `show` name the screening, not a generic 'not scored'."""
    config = tmp_path / "harness.toml"
    config.write_text(TOY.replace("[student]", "[estimator]\nscreen_epsilon = 0.999\n\n[student]").replace("questions = 2", "questions = 1"))
    run_dir = tmp_path / "run"
    code, out, err = cli(capsys, "--config", config, "--model", toy_model_dir, "--run-dir", run_dir)
    assert code == 0, err
    assert "the student was nearly certain at every token" in " ".join(out.split())
    code, out, _ = cli(capsys, "show", run_dir, "--question", "0")
    assert code == 0
    assert "no token of this rollout was scored: the student was nearly certain at all" in " ".join(out.split())


def test_run_made_before_the_marker_still_resumes(toy_reference, toy_model_dir, tmp_path, capsys):
    """A run directory from before `.gadiag-run` existed (config.toml and records)
    is still a run: it resumes to the same files and is marked."""
    run_dir = copy_run(toy_reference[1], tmp_path / "run")
    (run_dir / ".gadiag-run").unlink()
    next(iter((run_dir / "units").glob("*.json"))).unlink()
    code, _, err = cli(capsys, *toy_argv(toy_reference, toy_model_dir, run_dir))
    assert code == 0, err
    assert (run_dir / ".gadiag-run").is_file()
    assert run_files(run_dir) == run_files(toy_reference[1])


def test_show_counts_why_plain_tokens_were_not_scored(toy_reference, capsys):
    code, out, err = cli(capsys, "show", toy_reference[1], "--question", "0")
    assert code == 0, err
    text = " ".join(out.split())
    assert "tokens scored;" in text and "screened out (the student was nearly certain" in text


def test_D4_real_full_disk_then_resume_elsewhere(toy_reference, toy_model_dir, tmp_path, capsys):
    """D4 on a real 200 KiB file system (tmpfs; skipped where mounting is not
    allowed): exit 1 naming the file that did not fit; the stored run, moved to
    a disk with room, resumes to the files of an uninterrupted run."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()[:100]}")
    try:
        code, _, err = cli(capsys, *toy_argv(toy_reference, toy_model_dir, small / "run"))
        assert code == 1
        line = one_line(err)
        assert f"cannot write {small / 'run'}" in line and "the disk is full" in line
        moved = shutil.copytree(small / "run", tmp_path / "moved")
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
    code, _, err = cli(capsys, *toy_argv(toy_reference, toy_model_dir, moved))
    assert code == 0, err
    assert run_files(moved) == run_files(toy_reference[1])

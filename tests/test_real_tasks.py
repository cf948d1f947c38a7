"""The real math tasks (gsm8k, math500, jsonl) on the benchmark files of
../shared/data: gold answers verify against their own problems, moved answers
do not, garbage never raises, and loading errors are clear one-liners."""

import json
import random
import threading
import time
from pathlib import Path

import pytest

from gadiag_core.errors import UsageError
from gadiag_core.registry import load_registry
from gadiag_tasks.real_math import GSM8K, JsonlTask, Math500, gsm8k_answer, gsm8k_solution

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K_FILE = DATA / "gsm8k_test.jsonl"
MATH500_FILE = DATA / "math500_test.jsonl"

needs_data = pytest.mark.skipif(
    not (GSM8K_FILE.is_file() and MATH500_FILE.is_file()),
    reason=f"benchmark files not found in {DATA} (the shared/ folder beside the checkout)",
)

# MATH-500 gold answers that math-verify cannot confirm against the problem's own
# solution, with the reason. Empty: all 500 verify with math-verify 0.9.
MATH500_KNOWN_MISSES: dict[str, str] = {}

GARBAGE = [
    "",
    " ",
    None,
    12,
    "\\boxed{",
    "\\boxed{}}}}{{{",
    "\\frac{\\frac{\\frac{",
    "$$$$$$",
    "The answer is .",
    "The answer is \\boxed{\\sqrt{-}}",
    "}" * 5000 + "{" * 5000,
    "\\boxed{" * 2000,
    "9" * 5000,
    "1e999999999",
    "\x00\x01\x02\ufffd\U0001F600",
    "\\begin{pmatrix} 1 & \\\\ \\end{pmatrix",
    "((((((((((((((((((((((((((((((((((((((((",
    "x" * 300_000,
    "The answer is 1/0.",
    "\\boxed{\\infty^{\\infty^{\\infty}}}",
]


@pytest.fixture(scope="module")
def gsm8k():
    return GSM8K(data=str(GSM8K_FILE))


@pytest.fixture(scope="module")
def math500():
    return Math500(data=str(MATH500_FILE))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------
# Registration


def test_tasks_register_through_entry_points():
    registry = load_registry()
    for name in ("gsm8k", "math500", "jsonl"):
        assert name in registry.names("task")
        assert registry.get("task", name).source.startswith("built-in")
    task = registry.create("task", "gsm8k", data=str(GSM8K_FILE) if GSM8K_FILE.is_file() else None)
    assert task.name == "gsm8k" and task.version


def test_unknown_option_is_named():
    registry = load_registry()
    with pytest.raises(UsageError, match="task 'gsm8k' has no option 'levels'"):
        registry.create("task", "gsm8k", levels=[1])
    with pytest.raises(UsageError, match="'question_feild'. Did you mean 'question_field'"):
        registry.create("task", "jsonl", data="x.jsonl", question_feild="q")


# ----------------------------------------------------------------------------
# Gold answers on the benchmark files


@needs_data
def test_gsm8k_every_gold_answer_verifies(gsm8k):
    start = time.perf_counter()
    problems = gsm8k.all_problems()
    assert len(problems) == 1319
    misses = [p.id for p in problems if not gsm8k.verify(p, p.solution)]
    misses += [p.id for p in problems if not gsm8k.verify(p, gsm8k.answer_statement(p.answer))]
    assert misses == []
    assert time.perf_counter() - start < 60


@needs_data
def test_math500_gold_answers_verify(math500):
    start = time.perf_counter()
    problems = math500.all_problems()
    assert len(problems) == 500
    misses = {p.id for p in problems if not math500.verify(p, p.solution)}
    misses |= {p.id for p in problems if not math500.verify(p, math500.answer_statement(p.answer))}
    assert len(misses) <= 5  # target ≥ 99 %
    assert misses <= set(MATH500_KNOWN_MISSES), f"unexplained misses: {sorted(misses - set(MATH500_KNOWN_MISSES))}"
    assert time.perf_counter() - start < 60


@needs_data
@pytest.mark.parametrize("which", ["gsm8k", "math500"])
def test_moved_answers_are_rejected(which, request):
    task = request.getfixturevalue(which)
    problems = task.all_problems()
    rng = random.Random(0)
    checked = 0
    for problem in rng.sample(problems, 150):
        other = rng.choice(problems)
        # Only pairs whose gold answers really differ (as math-verify sees them).
        if task.verify(problem, other.solution if which == "math500" else task.answer_statement(other.answer)):
            assert task.verify(other, problem.solution), (problem.id, other.id)
            continue
        assert not task.verify(problem, other.solution), (problem.id, other.id)
        assert not task.verify(problem, task.answer_statement(other.answer)), (problem.id, other.id)
        checked += 1
    assert checked > 100


@needs_data
@pytest.mark.parametrize("which", ["gsm8k", "math500"])
def test_garbage_is_wrong_and_never_raises(which, request):
    task = request.getfixturevalue(which)
    problems = task.all_problems()[:3]
    for problem in problems:
        for text in GARBAGE:
            assert task.verify(problem, text) is False, (problem.id, str(text)[:40])
    rng = random.Random(1)
    alphabet = "\\{}$^_()[]0123456789abcxyz+-*/=.,boxedfrac "
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert isinstance(task.verify(problems[0], text), bool)


@needs_data
def test_verify_works_outside_the_main_thread(gsm8k, math500):
    """math-verify's SIGALRM timeouts only work in the main thread: workers must still verify."""
    results = {}

    def work():
        g = gsm8k.all_problems()[5]
        m = math500.all_problems()[7]
        results["gsm8k"] = gsm8k.verify(g, g.solution), gsm8k.verify(g, "\\boxed{")
        results["math500"] = math500.verify(m, m.solution), math500.verify(m, "}}{{\\frac")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert results == {"gsm8k": (True, False), "math500": (True, False)}


# ----------------------------------------------------------------------------
# Problems, prompts, solutions


@needs_data
def test_problems_are_deterministic_with_stable_ids(gsm8k):
    first = gsm8k.problems(5, seed=3)
    assert [p.id for p in first] == [p.id for p in GSM8K(data=str(GSM8K_FILE)).problems(5, seed=3)]
    assert [p.id for p in gsm8k.problems(8, seed=3)][:5] == [p.id for p in first]  # a prefix
    assert [p.id for p in gsm8k.problems(5, seed=4)] != [p.id for p in first]
    assert gsm8k.problems(0, seed=3) == []
    by_id = {p.id: p for p in gsm8k.all_problems()}
    assert by_id["gsm8k-0000"].question.startswith("Janet")
    in_order = GSM8K(data=str(GSM8K_FILE), shuffle=False).problems(3, seed=9)
    assert [p.id for p in in_order] == ["gsm8k-0000", "gsm8k-0001", "gsm8k-0002"]
    with pytest.raises(UsageError, match="asked for 5000 problems but .* has only 1319"):
        gsm8k.problems(5000, seed=0)


@needs_data
def test_gsm8k_solution_and_prompt(gsm8k):
    problem = gsm8k.all_problems()[0]
    assert problem.answer == "18"
    assert "<<" not in problem.solution and "####" not in problem.solution
    assert problem.solution.endswith("The answer is 18.")
    messages = gsm8k.student_messages(problem)
    assert messages[-1]["role"] == "user" and problem.question in messages[-1]["content"]
    assert "The answer is N." in messages[-1]["content"]
    assert all("<<" not in p.solution for p in gsm8k.all_problems())
    assert all("," not in p.answer for p in gsm8k.all_problems())


@needs_data
def test_math500_prompt_and_meta(math500):
    problem = math500.all_problems()[0]
    assert problem.id == "math500-0000" and problem.meta["unique_id"].endswith(".json")
    assert "\\boxed{}" in math500.student_messages(problem)[-1]["content"]
    assert "\\boxed" in problem.solution
    assert math500.verify(problem, "so r = 3 and theta = pi/2: \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}")
    assert not math500.verify(problem, "\\boxed{(3, \\pi)}")


def test_gsm8k_helpers():
    text = "She has 3+4 = <<3+4=7>>7 eggs.\n#### 1,234"
    assert gsm8k_answer(text) == "1234"
    assert gsm8k_answer("no final line") is None
    assert gsm8k_solution(text, "1234") == "She has 3+4 = 7 eggs.\nThe answer is 1234."


def test_gsm8k_verify_forms(tmp_path):
    task = GSM8K(data=str(write_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "x\n#### 1,234"}])))
    (problem,) = task.problems(1, seed=0)
    for good in ("The answer is 1234.", "The answer is 1,234.", "\\boxed{1234}", "so 1233 + 1 = 1234", "The answer is $1234$."):
        assert task.verify(problem, good), good
    for bad in ("The answer is 1233.", "\\boxed{12}", "1234 - 1 = 1233", "nothing"):
        assert not task.verify(problem, bad), bad


# ----------------------------------------------------------------------------
# The generic jsonl task


def test_jsonl_task_with_named_fields(tmp_path):
    rows = [
        {"q": "What is 1/2 + 1/4?", "a": "\\frac{3}{4}", "s": "Add: \\boxed{\\frac34}", "key": "p1"},
        {"q": "What is 2 + 2?", "a": "4", "s": "\\boxed{4}", "key": "p2"},
    ]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    task = load_registry().create(
        "task", "jsonl", data=str(path), question_field="q", answer_field="a", solution_field="s", id_field="key",
        prompt="Q: {question}\nAnswer in \\boxed{{}}.", shuffle=False,
    )
    problems = task.problems(2, seed=0)
    assert [p.id for p in problems] == ["p1", "p2"]
    assert task.student_messages(problems[0]) == [{"role": "user", "content": "Q: What is 1/2 + 1/4?\nAnswer in \\boxed{}."}]
    assert task.verify(problems[0], problems[0].solution)
    assert task.verify(problems[0], "That is 0.75, so \\boxed{0.75}")
    assert not task.verify(problems[0], problems[1].solution)
    assert task.verify(problems[1], task.answer_statement("4"))


def test_jsonl_without_solution_field_has_no_solution(tmp_path):
    """No solution field: no solution (the solution contexts skip the question,
    issue 18 S1), not the answer dressed up as one."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "2+3?", "answer": 5}])
    task = JsonlTask(data=str(path))
    (problem,) = task.problems(1, seed=0)
    assert problem.answer == "5" and problem.id == "jsonl-0000"
    assert problem.solution == ""
    assert task.verify(problem, task.answer_statement(problem.answer))
    assert "\\boxed{}" in task.student_messages(problem)[0]["content"]


def test_parquet_file_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"question": ["A?"], "answer": ["x\n#### 7"]}), folder / "a.parquet")
    pq.write_table(pa.table({"question": ["B?"], "answer": ["y\n#### 8"]}), folder / "b.parquet")
    task = GSM8K(data=str(folder), shuffle=False)
    assert [p.answer for p in task.problems(2, seed=0)] == ["7", "8"]
    assert [p.answer for p in GSM8K(data=str(folder / "b.parquet")).problems(1, seed=0)] == ["8"]


# ----------------------------------------------------------------------------
# Errors


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        GSM8K(data=str(tmp_path / "nope.jsonl"))
    with pytest.raises(UsageError, match="needs a data file"):
        JsonlTask()
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(UsageError, match="holds no .jsonl"):
        GSM8K(data=str(empty_folder)).problems(1, seed=0)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UsageError, match="is not .jsonl, .json or .parquet"):
        GSM8K(data=str(tmp_path / "notes.txt")).problems(1, seed=0)


def test_missing_fields_are_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q", "solution": "S"}])
    with pytest.raises(UsageError) as info:
        GSM8K(data=str(path)).problems(1, seed=0)
    assert "'answer'" in str(info.value) and "question, solution" in str(info.value)
    with pytest.raises(UsageError, match="'problem', 'answer'"):
        Math500(data=str(path)).problems(1, seed=0)
    with pytest.raises(UsageError, match="'reasoning'"):
        JsonlTask(data=str(path), answer_field="solution", solution_field="reasoning").problems(1, seed=0)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q", "answer": "no final line"}])
    with pytest.raises(UsageError, match="row 1 .* no final '#### N' line"):
        GSM8K(data=str(bad)).problems(1, seed=0)


def test_empty_data_set_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
    with pytest.raises(UsageError, match="is empty"):
        GSM8K(data=str(path)).problems(1, seed=0)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("")
    with pytest.raises(UsageError, match="is empty"):
        GSM8K(data=str(blank)).problems(1, seed=0)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="is empty"):
        JsonlTask(data=str(folder)).problems(1, seed=0)


def test_hub_failure_says_to_pass_data(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for task in (GSM8K(), Math500()):
        with pytest.raises(UsageError) as info:
            task.problems(1, seed=0)
        message = str(info.value)
        assert "--data PATH" in message and "\n" not in message


# ----------------------------------------------------------------------------
# End to end on the tiny student


def test_cli_runs_gsm8k_from_a_local_file(tmp_path, tiny_model_dir, capsys):
    from gadiag_core.commands.main import main

    rows = [{"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
            {"question": "What is 4+4?", "answer": "4+4=<<4+4=8>>8\n#### 8"}]
    data = write_jsonl(tmp_path / "gsm.jsonl", rows)
    config = tmp_path / "harness.toml"
    config.write_text(
        "[run]\ntask = \"gsm8k\"\nteachers = \"solution,answer\"\nquestions = 2\nrollouts_per_question = 2\nthreads = 1\n"
        "[student]\nmax_new_tokens = 4\n"
        "[estimator]\nname = \"targeted\"\nmax_nodes = 1\ncontinuations = 2\nscreen_epsilon = 0.0\n"
    )
    run_dir = tmp_path / "run"
    code = main(["--config", str(config), "--model", str(tiny_model_dir), "--data", str(data), "--run-dir", str(run_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "gsm8k" and summary["task_version"] == GSM8K.version
    assert summary["rollouts"] == 4
    assert f"v{GSM8K.version}" in out

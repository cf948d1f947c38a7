"""The synthetic `math` task and the shared answer extraction (no model needed)."""

import random

import pytest

from gadiag_core.errors import UsageError
from gadiag_core.interfaces import Problem, Task
from gadiag_tasks import synthetic_math
from gadiag_tasks.answers import extract_answer, integer_answer_matches, parse_int
from gadiag_core.registry import load_registry
from gadiag_tasks.synthetic_math import DEFAULT_LEVELS, LEVELS

REGISTRY = load_registry()


def factory(**options):
    """The task as harness.toml's [task] table builds it (options checked by the registry)."""
    return REGISTRY.create("task", "math", **options)

ALL = list(LEVELS)


@pytest.fixture(scope="module")
def task():
    return factory(levels=ALL)


def _problem(answer: str) -> Problem:
    return Problem(id="T-0000", question="?", answer=answer, solution=f"The answer is {answer}.", meta={"level": "L1"})


# -- registration and options -------------------------------------------------


def test_registers_math_task():
    seen = {}
    synthetic_math.register_tasks(register=lambda name, fac, desc="", options=None: seen.update({name: (fac, desc, options)}))
    assert set(seen) == {"math"}
    built = seen["math"][0](seen["math"][2](), None)
    assert isinstance(built, Task)
    assert built.name == "math" and built.version and seen["math"][1]
    assert built.levels == tuple(DEFAULT_LEVELS)


def test_at_least_three_levels_and_defaults_valid():
    assert len(LEVELS) >= 3
    assert set(DEFAULT_LEVELS) <= set(LEVELS)


def test_unknown_option_names_it():
    with pytest.raises(UsageError, match="temperatur"):
        factory(temperatur=1.0)


@pytest.mark.parametrize("bad", ["L99", [1, 42], "hard", [], [None]])
def test_bad_level_lists_valid_levels(bad):
    with pytest.raises(UsageError) as info:
        factory(levels=bad)
    for name in LEVELS:
        assert name in str(info.value)


@pytest.mark.parametrize("spec", [[1, 2], ["L1", "L2"], ["l1", "2"], "1,2", ("L1", "L2", "L1")])
def test_level_spellings(spec):
    assert factory(levels=spec).levels == ("L1", "L2")


def test_worked_example_option_type_checked():
    with pytest.raises(UsageError, match="worked_example"):
        factory(worked_example="yes")


# -- problems -----------------------------------------------------------------


def test_deterministic_and_seed_dependent(task):
    a = task.problems(30, seed=1)
    assert a == factory(levels=ALL).problems(30, seed=1)
    b = task.problems(30, seed=2)
    assert [p.question for p in a] != [p.question for p in b]


def test_prefix_stable(task):
    assert task.problems(7, seed=3) == task.problems(20, seed=3)[:7]


def test_cycles_levels_with_ids(task):
    problems = task.problems(2 * len(ALL), seed=0)
    assert [p.meta["level"] for p in problems] == ALL * 2
    ids = [p.id for p in problems]
    assert len(set(ids)) == len(ids)
    assert ids[0] == f"{ALL[0]}-0000" and ids[3] == f"{ALL[3]}-0003"
    assert task.problems(0, seed=0) == []


def test_no_repeats_within_level_when_avoidable():
    problems = factory(levels=[1]).problems(40, seed=0)
    assert len({p.question for p in problems}) == 40


def test_problem_fields(task):
    for p in task.problems(50, seed=5):
        assert p.question.strip() and p.question.endswith("?")
        assert str(int(p.answer)) == p.answer and int(p.answer) >= 0
        assert p.solution.endswith(task.answer_statement(p.answer))
        assert "\n" not in p.solution  # one-line solutions keep rollouts short


# -- gold solutions and the verifier -----------------------------------------


@pytest.mark.parametrize("level", ALL)
def test_gold_solutions_verify_and_moved_ones_mostly_do_not(level):
    task = factory(levels=[level])
    problems = task.problems(40, seed=11)
    assert all(task.verify(p, p.solution) for p in problems)
    moved = [task.verify(p, problems[(i + 1) % len(problems)].solution) for i, p in enumerate(problems)]
    assert sum(moved) <= len(problems) // 4


def test_worked_example_solutions_verify(task):
    for level in ALL:
        example = task.example(level)
        assert task.verify(example, example.solution)


@pytest.mark.parametrize(
    "completion, correct",
    [
        ("7 + 5 = 12. The answer is 12.", True),
        ("The answer is 12", True),
        ("the final answer is: **12**", True),
        ("The answer is 12.0.", True),
        ("7 + 5 = 12", True),  # no statement: the last number
        ("\\boxed{12}", True),
        ("The answer is 12. Let me check: 7 + 5 = 12, not 13.", True),  # the statement wins
        ("The answer is 13.", False),
        ("7 + 5 = 13. The answer is 13.", False),
        ("12 apples, then 3 more", False),  # last number is 3
        ("The answer is 12.5.", False),
        ("The answer is 1e309", False),
        ("The answer is 1e999999999", False),
        ("The answer is " + "9" * 5000, False),
        ("", False),
        ("   \n\t", False),
        ("no numbers here at all", False),
        ("答案是十二 🎉 ∑∫ \x00\ud7ff", False),
        ("The answer is twelve.", False),
        ("１２", True),  # full-width digits
        (None, False),
        (12, True),  # not even text
    ],
)
def test_verify_completions(task, completion, correct):
    assert task.verify(_problem("12"), completion) is correct


@pytest.mark.parametrize(
    "gold, completion, correct",
    [
        ("-5", "The answer is -5.", True),
        ("-5", "The answer is \u22125.", True),  # unicode minus sign
        ("-5", "The answer is 5.", False),
        ("5", "The answer is -5.", False),
        ("5", "8 - 3 = 5", True),  # a subtraction, not a negative 3 ... 5
        ("3", "8 - 3", True),  # no negative number is read after an operand
        ("1234", "The answer is 1,234.", True),
        ("1234", "1,234", True),
        ("1234", "The answer is 1234.", True),
        ("1234", "The answer is 1,23,4.", False),
        ("1000", "The answer is 1e3.", True),
        ("0", "The answer is 0.", True),
        ("0", "The answer is -0.", True),
    ],
)
def test_verify_signs_and_separators(task, gold, completion, correct):
    assert task.verify(_problem(gold), completion) is correct


def test_verify_never_raises_on_odd_inputs(task):
    odd_problem = Problem(id="x", question="?", answer="not a number", solution="", meta={})
    for completion in ["The answer is 3", "", None, "∞", "NaN", "inf", "-", "1e", "e5", "1,", ",000", "9" * 100_000]:
        assert task.verify(odd_problem, completion) is False
    rng = random.Random(0)
    for _ in range(200):
        garbage = "".join(chr(rng.randint(0, 0x2FFFF)) for _ in range(rng.randint(0, 50)))
        task.verify(_problem("12"), garbage)


def test_extraction_helpers():
    assert extract_answer("so 3 + 4 = 7") == 7
    assert extract_answer("answer is -2, or 5") == -2
    assert extract_answer("nothing") is None
    assert parse_int(" 42 ") == 42 and parse_int("4.5") is None and parse_int("L1") is None
    assert integer_answer_matches(7, "The answer is 7.")
    assert not integer_answer_matches("seven", "The answer is 7.")


def test_wrong_answer_is_wrong_and_plausible(task):
    rng = random.Random(0)
    for p in task.problems(60, seed=4):
        wrong = task.wrong_answer(p, rng)
        assert not task.verify(p, task.answer_statement(wrong))
        assert int(wrong) >= 0 and abs(int(wrong) - int(p.answer)) <= 10


# -- the prompt ---------------------------------------------------------------


def test_student_messages_one_shot(task):
    for p in task.problems(len(ALL), seed=0):
        messages = task.student_messages(p)
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert all(isinstance(m["content"], str) and m["content"] for m in messages)
        assert messages[-1]["content"] == p.question
        # the worked example is of the same level and in the solutions' format
        example = task.example(p.meta["level"])
        assert messages[0]["content"] == example.question
        assert messages[1]["content"] == example.solution
        assert messages[1]["content"].endswith(task.answer_statement(example.answer))



def test_worked_example_never_asked(task):
    examples = {task.example(level).question for level in ALL}
    assert not examples & {p.question for p in task.problems(500, seed=0)}


def test_student_messages_zero_shot():
    task = factory(levels=[1], worked_example=False)
    p = task.problems(1, seed=0)[0]
    assert task.student_messages(p) == [{"role": "user", "content": p.question}]


def test_plain_prompt_defaults_sit_in_the_base_models_informative_range():
    """The levels a plain-text (base-model) student gets by default: at least two
    inside Gemma-3-270M's measured 0.2-0.8 pass-rate range."""
    measured = synthetic_math.MEASURED_PLAIN_GEMMA3_270M
    assert set(synthetic_math.PLAIN_DEFAULT_LEVELS) <= set(measured) <= set(LEVELS)
    informative = [level for level in synthetic_math.PLAIN_DEFAULT_LEVELS if 0.2 <= measured[level][0] <= 0.8]
    assert len(informative) >= 2

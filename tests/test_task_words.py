"""The synthetic `wordplay` task: a second task family (letters, words,
comparisons), seeded, verifiable, with graded levels (no model needed)."""

from __future__ import annotations

import random

import pytest

from gadiag_core.errors import UsageError
from gadiag_core.registry import load_registry
from gadiag_tasks.synthetic_words import DEFAULT_LEVELS, LEVELS, MEASURED, SyntheticWords, extract_word

ALL = list(LEVELS)


@pytest.fixture(scope="module")
def registry():
    return load_registry([])


def test_registered_with_typed_options(registry):
    task = registry.create("task", "wordplay", levels=["w1", 3])
    assert task.name == "wordplay" and task.levels == ("W1", "W3")
    assert registry.create("task", "wordplay").levels == DEFAULT_LEVELS
    with pytest.raises(UsageError, match="W11"):  # the message lists the valid levels
        registry.create("task", "wordplay", levels=["W99"])
    with pytest.raises(UsageError, match="worked_exampel|worked_example"):
        registry.create("task", "wordplay", worked_exampel=False)


def test_every_level_is_measured_and_defaults_are_in_the_informative_range():
    from gadiag_tasks.synthetic_words import MEASURED_PLAIN_GEMMA3_270M, PLAIN_DEFAULT_LEVELS

    for measured, defaults in ((MEASURED, DEFAULT_LEVELS), (MEASURED_PLAIN_GEMMA3_270M, PLAIN_DEFAULT_LEVELS)):
        assert set(measured) == set(LEVELS)
        informative = [level for level in defaults if 0.2 <= measured[level][0] <= 0.8]
        assert len(informative) >= 2


def test_problems_are_seeded_prefix_stable_and_verified_by_their_own_solution():
    task = SyntheticWords(levels=ALL)
    first = task.problems(44, seed=3)
    assert [p.question for p in task.problems(44, seed=3)] == [p.question for p in first]
    assert [p.question for p in task.problems(11, seed=3)] == [p.question for p in first[:11]]
    assert [p.question for p in task.problems(44, seed=4)] != [p.question for p in first]
    assert [p.meta["level"] for p in first[:11]] == ALL
    for problem in first:
        assert task.verify(problem, problem.solution), problem
        wrong = task.wrong_answer(problem, random.Random(0))
        assert wrong != problem.answer
        assert not task.verify(problem, task.answer_statement(wrong)), (problem, wrong)
        assert problem.question != task.example(problem.meta["level"]).question


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is **Yes**.", "yes"),
        ('"kettle" starts with k. The answer is "k".', "k"),
        ("The answer is 71. I think the answer: 54", "54"),  # the last "answer is"
        ("banana comes first", "first"),  # no statement: the last word
        ("", None),
        (None, None),
    ],
)
def test_extract_word(text, expected):
    assert extract_word(text) == expected


def test_verify_answers_by_kind():
    task = SyntheticWords(levels=ALL)
    by_level = {p.meta["level"]: p for p in task.problems(11, seed=0)}
    yes_no = by_level["W1"]
    assert task.verify(yes_no, f"The answer is {yes_no.answer.upper()}.")
    assert not task.verify(yes_no, "The answer is maybe.")
    assert not task.verify(yes_no, "garbage \x00 ∞")
    assert task.wrong_answer(yes_no, random.Random(0)) in ("yes", "no")
    # the other choice of a two-way question, of the same kind
    assert task.wrong_answer(by_level["W2"], random.Random(0)) in by_level["W2"].question
    assert len(task.wrong_answer(by_level["W4"], random.Random(0))) == 1


def test_plain_prompts_get_more_worked_examples_none_of_them_asked():
    """Both graded families take `examples`; a plain-text student gets PLAIN_EXAMPLES
    distinct worked examples by default, and no question repeats one of them."""
    from types import SimpleNamespace

    from gadiag_tasks import graded, synthetic_words

    options = synthetic_words.WordsOptions()
    plain = graded.build(SyntheticWords, options, SimpleNamespace(student=SimpleNamespace(prompt_format="plain")), DEFAULT_LEVELS, ("W2",), 3)
    chat = graded.build(SyntheticWords, options, SimpleNamespace(student=SimpleNamespace(prompt_format="chat")), DEFAULT_LEVELS, ("W2",), 3)
    assert plain.levels == ("W2",) and plain.examples == 3 and not plain.depends_on_student
    assert chat.levels == DEFAULT_LEVELS and chat.examples == 1
    unknown = graded.build(SyntheticWords, options, SimpleNamespace(student=None), DEFAULT_LEVELS, ("W2",), 3)
    assert unknown.depends_on_student  # rebuilt once the student is known
    problem = plain.problems(1, seed=0)[0]
    messages = plain.student_messages(problem)
    shown = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    assert len(shown) == 3 and len(set(shown)) == 3 and messages[-1]["content"] == problem.question
    assert all(p.question not in shown for p in plain.problems(60, seed=1))
    with pytest.raises(UsageError, match="examples"):
        SyntheticWords(examples=0)

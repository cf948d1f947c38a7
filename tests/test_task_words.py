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
    assert set(MEASURED) == set(LEVELS)
    informative = [level for level in DEFAULT_LEVELS if 0.2 <= MEASURED[level][0] <= 0.8]
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

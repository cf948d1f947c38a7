"""Built-in context builders for self-distillation teachers.

Each takes the student's own prompt and appends privileged information to the
final user turn, so the teacher differs from the student by that information
alone. Two are controls: `other_solution` (a real solution, of another problem)
and `wrong_answer` (a confident but wrong final answer); they are framed
exactly like `solution` and `answer`, so a gap between them measures the
information, not the framing.
"""

from __future__ import annotations

from typing import Optional

from gadiag_core import hookimpl
from gadiag_core.interfaces import ContextBuilder, ContextInputs


def with_note(inputs: ContextInputs, note: str) -> list[dict]:
    """The student's messages with `note` appended to the last user turn."""
    messages = [dict(m) for m in inputs.student_messages]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = f"{messages[last_user]['content']}\n\n{note}"
    return messages


def solution_note(text: str) -> str:
    return f"Here is a reference solution to this problem:\n{text}\nUse it to answer."


def answer_note(answer: str) -> str:
    return f"The correct final answer is {answer}. Use it to answer."


def has_solution(problem) -> bool:
    """True when the task gave this problem a worked solution (a JSONL file
    without a solution field gives none: the contexts that need one skip it)."""
    return bool(str(problem.solution or "").strip())


class SolutionContext(ContextBuilder):
    name = "solution"
    description = "the reference solution (skipped when the task has none)"

    def build(self, inputs) -> Optional[list[dict]]:
        if not has_solution(inputs.problem):
            return None
        return with_note(inputs, solution_note(inputs.problem.solution))


class AnswerContext(ContextBuilder):
    name = "answer"
    description = "the final answer only"

    def build(self, inputs):
        return with_note(inputs, answer_note(inputs.problem.answer))


class OtherSolutionContext(ContextBuilder):
    name = "other_solution"
    description = "control: another problem's reference solution (skipped when none has one)"

    def build(self, inputs) -> Optional[list[dict]]:
        others = [p for p in inputs.other_problems if p.id != inputs.problem.id and has_solution(p)]
        if not others:
            return None
        return with_note(inputs, solution_note(inputs.rng.choice(others).solution))


class WrongAnswerContext(ContextBuilder):
    name = "wrong_answer"
    description = "control: a wrong final answer, framed as correct"

    def build(self, inputs):
        return with_note(inputs, answer_note(inputs.task.wrong_answer(inputs.problem, inputs.rng)))


class SelfSuccessContext(ContextBuilder):
    name = "self_success"
    description = "another of the student's own correct rollouts (skipped if none)"

    def build(self, inputs) -> Optional[list[dict]]:
        correct = [r for r in inputs.rollouts if r.correct and r.index != inputs.rollout_index]
        if not correct:
            return None
        chosen = inputs.rng.choice(correct)
        return with_note(inputs, f"Here is a correct solution to this problem:\n{chosen.text}\nUse it to answer.")


class FeedbackContext(ContextBuilder):
    name = "feedback"
    description = "told that a previous attempt (shown when one exists) was wrong"

    def build(self, inputs):
        wrong = [r for r in inputs.rollouts if not r.correct and r.index != inputs.rollout_index]
        if wrong:
            attempt = inputs.rng.choice(wrong).text
            note = f"A previous attempt at this problem was:\n{attempt}\nThat attempt was wrong. Answer correctly."
        else:
            note = "A previous attempt at this problem was wrong. Answer correctly."
        return with_note(inputs, note)


BUILT_IN = [SolutionContext, AnswerContext, OtherSolutionContext, WrongAnswerContext, SelfSuccessContext, FeedbackContext]


def _context_factory(cls):
    def factory(options, run):
        return cls()

    return factory


@hookimpl
def register_contexts(register):
    for cls in BUILT_IN:
        register(cls.name, _context_factory(cls), cls.description)

"""The task ``toy``: a digit-sum task small enough to enumerate (the exact environment).

Problem: a target number T, shown as its digits (the question text is just
"T", e.g. "9"). The student must answer with digits whose sum lies in the
window [T, T + width] (default width 6), and nothing else: the completion text,
stripped of whitespace, must be a non-empty string of digits. Special tokens
are dropped by decoding, so an EOS ends the answer and costs nothing.

Why this task: with a tiny random model (gadiag_tasks.toy_env) and a horizon of
4 tokens the success probabilities are intermediate (about 0.3–0.55 at the
root), and Q(u, k) depends on k in a structured, non-monotone way (a digit too
small leaves the window out of reach, one too large overshoots it; an early
EOS fails), so the ideal vectors are far from trivial.

Options (the ``[task]`` table):
    targets   which targets T, a list or "lo-hi" (default 3–12); problem i has
              target targets[i % len(targets)] (the order is shuffled by seed)
    width     the window width (default 6)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from gadiag_core import hookimpl
from gadiag_core.options import option
from gadiag_core.errors import UsageError
from gadiag_core.interfaces import Problem, Task

DEFAULT_TARGETS = tuple(range(3, 13))
# A digit sum above this needs more than 1,400 tokens of 7s: no toy run gets there
# (and `digits_summing_to` builds the answer digit by digit).
MAX_TARGET = 10_000


def parse_targets(targets) -> tuple[int, ...]:
    """Targets from a list of ints, "3-12" or "3,5,7"."""
    try:
        if isinstance(targets, str):
            if "-" in targets:
                lo, hi = (int(p) for p in targets.split("-", 1))
                if hi - lo > MAX_TARGET:
                    raise UsageError(f"task 'toy': targets range {targets!r} is too wide (at most {MAX_TARGET} targets)")
                items = list(range(lo, hi + 1))
            else:
                items = [int(p) for p in targets.split(",") if p.strip()]
        elif isinstance(targets, int):
            items = [targets]
        else:
            items = [int(p) for p in targets]
    except (TypeError, ValueError):
        raise UsageError(f"task 'toy': targets must be integers, a list or 'lo-hi', got {targets!r}") from None
    if not items or any(t < 0 for t in items):
        raise UsageError(f"task 'toy': targets must be a non-empty list of non-negative integers, got {targets!r}")
    if any(t > MAX_TARGET for t in items):
        raise UsageError(f"task 'toy': target {max(items)} is too large (at most {MAX_TARGET}: a toy answer is a few digits 0–7)")
    return tuple(items)


def digits_summing_to(total: int) -> str:
    """A short digit string with the given sum, largest digits first (7s; the
    toy tokenizer knows the digits 0–7)."""
    out = []
    while total > 7:
        out.append("7")
        total -= 7
    out.append(str(total))
    return "".join(out)


class ToyTask(Task):
    name = "toy"
    version = "1"
    description = "digit sum in a window [T, T+width] (tiny enough to enumerate every continuation)"

    def __init__(self, targets=DEFAULT_TARGETS, width: int = 6):
        self.targets = parse_targets(targets)
        if not isinstance(width, int) or width < 0:
            raise UsageError(f"task 'toy': width must be a non-negative integer, got {width!r}")
        self.width = width

    def problems(self, count: int, seed: int) -> list[Problem]:
        order = list(self.targets)
        random.Random(f"toy-{seed}").shuffle(order)
        problems = []
        for i in range(count):
            target = order[i % len(order)]
            answer = digits_summing_to(target)
            problems.append(
                Problem(
                    id=f"toy-{i:04d}",
                    question=str(target),
                    answer=answer,
                    solution=answer,
                    meta={"target": target, "width": self.width},
                )
            )
        return problems

    def student_messages(self, problem: Problem) -> list[dict]:
        return [{"role": "user", "content": problem.question}]

    def verify(self, problem: Problem, completion: str) -> bool:
        text = str(completion).strip()
        if not text or not text.isascii() or not text.isdigit():
            return False
        target = int(problem.meta.get("target", problem.question))
        width = int(problem.meta.get("width", self.width))
        return target <= sum(int(c) for c in text) <= target + width

    def wrong_answer(self, problem: Problem, rng: random.Random) -> str:
        target = int(problem.meta.get("target", problem.question))
        width = int(problem.meta.get("width", self.width))
        return digits_summing_to(target + width + rng.randint(1, 3))

    def answer_statement(self, answer: str) -> str:
        return answer


@dataclass(frozen=True)
class ToyOptions:
    targets: Any = option(list(DEFAULT_TARGETS), "targets T: a list of integers, \"lo-hi\" or \"a,b,c\"", check=lambda v: list(parse_targets(v)))
    width: int = option(6, "the window width: digit sums in [T, T + width] are correct", min=0, max=1000)


def toy_factory(options: ToyOptions, run) -> ToyTask:
    return ToyTask(targets=options.targets, width=options.width)


@hookimpl
def register_tasks(register):
    register("toy", toy_factory, ToyTask.description, options=ToyOptions)


def toy_environment_factory(options, run):
    """The builder of the toy exact environment (gadiag_tasks.toy_env, imported
    when selfcheck builds one: `list` stays light)."""
    from gadiag_tasks.toy_env import build_environment

    return build_environment


@hookimpl
def register_environments(register):
    register("toy", toy_environment_factory, "The toy task's tiny random student with Q enumerated exactly (selfcheck's ground truth).")

"""What the synthetic task families share: seeded problems at graded levels.

A family (``math``, ``wordplay``) is a table of levels, each a generator that
draws (question, answer, worked solution) from an rng, and a `GradedTask`
subclass that names the table. Problems cycle through the configured levels
(problem i has level ``levels[i % len(levels)]``) and are generated from
(seed, i, the level's key) alone, so the first n problems of a seed are the
same whatever count is asked for; the random stream of a level is keyed by
its generator (``Level.key``), not by its name, so renumbering a ladder does
not change any problem. Each question is shown after one fixed worked example
of its level, as a previous user/assistant exchange.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from gadiag_core.errors import UsageError
from gadiag_core.interfaces import Problem, Task

# (question, answer, solution without the answer statement)
Draw = tuple[str, Any, str]


@dataclass(frozen=True)
class Level:
    name: str  # what users type: L1, W2, ...
    key: str  # seeds the level's random stream and its worked example
    description: str
    draw: Callable[[random.Random], Draw]


def parse_levels(levels, known: dict[str, Level], task: str, prefix: str) -> tuple[str, ...]:
    """Level names of `known` from 1, "1", "L1", "l1", a list of those, or "1,2,3"
    (`prefix`: the letter of the family's level names)."""
    valid = ", ".join(known)
    if isinstance(levels, (str, int)) and not isinstance(levels, bool):
        levels = [levels] if isinstance(levels, int) else [p for p in levels.split(",") if p.strip()]
    try:
        items = list(levels)
    except TypeError:
        raise UsageError(f"task '{task}': option 'levels' must be a list of levels ({valid}), got {levels!r}") from None
    if not items:
        raise UsageError(f"task '{task}': option 'levels' is empty; choose from {valid}")
    names = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise UsageError(f"task '{task}': unknown level {item!r}; valid levels: {valid}")
        key = str(item).strip().upper()
        if not key.startswith(prefix):
            key = prefix + key
        if key not in known:
            raise UsageError(f"task '{task}': unknown level {item!r}; valid levels: {valid}")
        if key not in names:
            names.append(key)
    return tuple(names)


class GradedTask(Task):
    """A task of seeded problems at graded levels; subclasses set LEVELS,
    LEVEL_PREFIX and SEED_PREFIX, and the verifier."""

    LEVELS: dict[str, Level] = {}
    LEVEL_PREFIX = "L"
    SEED_PREFIX = ""  # e.g. "gadiag-math": part of every rng seed string
    # Tries to avoid repeating a question inside one level before accepting a repeat.
    _DEDUP_TRIES = 30

    def __init__(self, levels, worked_example: bool = True) -> None:
        self.levels = parse_levels(levels, self.LEVELS, self.name, self.LEVEL_PREFIX)
        if not isinstance(worked_example, bool):
            raise UsageError(f"task '{self.name}': option 'worked_example' must be true or false, got {worked_example!r}")
        self.worked_example = worked_example

    # -- problems -------------------------------------------------------------

    def _make(self, level: str, rng: random.Random, index: int) -> Problem:
        question, answer, work = self.LEVELS[level].draw(rng)
        return Problem(
            id=f"{level}-{index:04d}",
            question=question,
            answer=str(answer),
            solution=f"{work} {self.answer_statement(str(answer))}",
            meta={"level": level},
        )

    def problems(self, count: int, seed: int) -> list[Problem]:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise UsageError(f"task '{self.name}': the number of problems must be a non-negative integer, got {count!r}")
        out: list[Problem] = []
        examples = {level: self.example(level).question for level in self.levels}
        seen: dict[str, set[str]] = {level: set() for level in self.levels}
        for index in range(count):
            level = self.levels[index % len(self.levels)]
            # Seeded from (seed, index, level) and the earlier problems only: a
            # prefix does not depend on count.
            rng = random.Random(f"{self.SEED_PREFIX}:{seed}:{index}:{self.LEVELS[level].key}")
            tries = 0
            while True:
                problem = self._make(level, rng, index)
                # Never ask the worked example itself; avoid repeats inside a
                # level while the level has unused questions left.
                if problem.question == examples[level]:
                    continue
                tries += 1
                if problem.question not in seen[level] or tries >= self._DEDUP_TRIES:
                    break
            seen[level].add(problem.question)
            out.append(problem)
        return out

    def example(self, level: str) -> Problem:
        """The fixed worked example shown before questions of `level`."""
        return self._make(level, random.Random(f"{self.SEED_PREFIX}:worked-example:{self.LEVELS[level].key}"), 0)

    # -- prompt ---------------------------------------------------------------

    def student_messages(self, problem: Problem) -> list[dict]:
        messages = []
        if self.worked_example:
            level = problem.meta.get("level") if isinstance(problem.meta, dict) else None
            example = self.example(level if level in self.LEVELS else self.levels[0])
            messages += [
                {"role": "user", "content": example.question},
                {"role": "assistant", "content": example.solution},
            ]
        messages.append({"role": "user", "content": problem.question})
        return messages

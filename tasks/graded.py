"""What the synthetic task families share: seeded problems at graded levels.

A family (``math``, ``wordplay``) is a table of levels, each a generator that
draws (question, answer, worked solution) from an rng, and a `GradedTask`
subclass that names the table. Problems cycle through the configured levels
(problem i has level ``levels[i % len(levels)]``) and are generated from
(seed, i, the level's key) alone, so the first n problems of a seed are the
same whatever count is asked for; the random stream of a level is keyed by
its generator (``Level.key``), not by its name, so renumbering a ladder does
not change any problem. Each question is shown after `examples` fixed worked
examples of its level, as previous user/assistant exchanges (one for chat
prompts; more for base models prompted in plain text, see `build`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, make_dataclass
from typing import Any, Callable, Optional

from gadiag_core.errors import UsageError
from gadiag_core.interfaces import Problem, Task
from gadiag_core.options import option

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

    def __init__(self, levels, worked_example: bool = True, examples: int = 1) -> None:
        self.levels = parse_levels(levels, self.LEVELS, self.name, self.LEVEL_PREFIX)
        if not isinstance(worked_example, bool):
            raise UsageError(f"task '{self.name}': option 'worked_example' must be true or false, got {worked_example!r}")
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise UsageError(f"task '{self.name}': option 'examples' must be a positive integer, got {examples!r}")
        self.worked_example = worked_example
        self.examples = examples

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
        examples = {level: {e.question for e in self.worked_examples(level)} for level in self.levels}
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
                if problem.question in examples[level]:
                    continue
                tries += 1
                if problem.question not in seen[level] or tries >= self._DEDUP_TRIES:
                    break
            seen[level].add(problem.question)
            out.append(problem)
        return out

    def example(self, level: str, index: int = 0) -> Problem:
        """The fixed worked example number `index` of `level` (0: the one chat prompts show)."""
        suffix = "" if index == 0 else f":{index}"
        return self._make(level, random.Random(f"{self.SEED_PREFIX}:worked-example:{self.LEVELS[level].key}{suffix}"), 0)

    def worked_examples(self, level: str) -> list[Problem]:
        """The `examples` worked examples shown before a question of `level` (distinct questions)."""
        out: list[Problem] = []
        index = 0
        while len(out) < self.examples and index < 100:
            candidate = self.example(level, index)
            if all(candidate.question != e.question for e in out):
                out.append(candidate)
            index += 1
        return out

    # -- prompt ---------------------------------------------------------------

    def student_messages(self, problem: Problem) -> list[dict]:
        messages = []
        if self.worked_example:
            level = problem.meta.get("level") if isinstance(problem.meta, dict) else None
            for example in self.worked_examples(level if level in self.LEVELS else self.levels[0]):
                messages += [
                    {"role": "user", "content": example.question},
                    {"role": "assistant", "content": example.solution},
                ]
        messages.append({"role": "user", "content": problem.question})
        return messages


def build(task_class, options, run, chat_levels, plain_levels, plain_examples: int):
    """Build a graded task from its ``[task]`` options (``levels``, ``worked_example``,
    ``examples``). Levels and examples left unset follow the student's prompt
    format: a base model prompted in plain text gets `plain_examples` worked
    examples and `plain_levels` (where it sometimes succeeds), a chat model one
    example and `chat_levels`."""
    student = getattr(run, "student", None)
    plain = getattr(student, "prompt_format", "chat") == "plain"
    levels = options.levels if options.levels is not None else (plain_levels if plain else chat_levels)
    examples = options.examples if options.examples is not None else (plain_examples if plain else 1)
    task = task_class(levels=levels, worked_example=options.worked_example, examples=examples)
    # Built before the student loads (to check the problems early), with defaults
    # left open: the run builds it again once it knows the student.
    task.depends_on_student = student is None and (options.levels is None or options.examples is None)
    return task


def options_class(class_name: str, parse: Callable, example: str, chat_levels, plain_levels, plain_examples: int):
    """The typed ``[task]`` options of a graded family: ``levels`` (checked by
    `parse`; unset: the student's defaults, as `build` picks them),
    ``worked_example``, ``examples``."""
    return make_dataclass(
        class_name,
        [
            ("levels", Any, option(
                None, f"which levels, e.g. {example} (unset: {','.join(chat_levels)} for chat prompts, {','.join(plain_levels)} for plain-text ones)",
                check=lambda v: None if v is None else list(parse(v)),
            )),
            ("worked_example", bool, option(True, "show worked examples of the level before the question")),
            ("examples", Optional[int], option(None, f"how many worked examples (unset: 1 for chat prompts, {plain_examples} for plain-text ones)", min=1, max=8)),
        ],
        frozen=True,
    )

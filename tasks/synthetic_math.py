"""The offline synthetic task ``math``: seeded arithmetic at graded difficulty.

Levels (each shown to the student after one worked example of the same level,
as a previous user/assistant exchange; every solution is one line ending in
"The answer is N."), roughly easiest first:

    L1  one-digit addition                     What is 3 + 5?
    L2  one-digit subtraction                  What is 8 - 3?
    L3  two-digit plus one-digit, no carry     What is 23 + 4?
    L4  one-digit a + b - c                    What is 7 + 5 - 3?
    L5  one-step word problem                  Sam has 7 apples. He buys 5 more. How many ...?
    L6  two-digit plus one-digit, with carry   What is 47 + 8?
    L7  two-step word problem                  Sam has 7 apples. He buys 5 more. Then he ...
    L8  three-step word problem                ... then ... then ...

Pass rates of the default student are in MEASURED (re-measure with
``python -m gadiag_tasks.measure_pass_rates --samples 40``).

Problems cycle through the configured levels (problem i has level
``levels[i % len(levels)]``) and are generated from (seed, i) alone, so the
first n problems of a seed are the same whatever count is asked for. The
random stream of a level is keyed by its generator (``Level.key``), not by its
L-number, so renumbering the ladder does not change any problem.

Options (the ``[task]`` table of harness.toml):
    levels          which levels, e.g. [1, 2, 3] or ["L1", "L4"]; default DEFAULT_LEVELS,
                    or PLAIN_DEFAULT_LEVELS for a student prompted in plain text (a base model)
    worked_example  show worked examples before the question (default true)
    examples        how many (default 1; PLAIN_EXAMPLES for plain-text prompts)
"""

from __future__ import annotations

import random

from gadiag_core import hookimpl
from gadiag_core.interfaces import Problem
from gadiag_tasks import graded
from gadiag_tasks.answers import integer_answer_matches, parse_int
from gadiag_tasks.graded import Draw, Level



# ----------------------------------------------------------------------------
# Generators: each draws one problem from an rng.


def _one_digit_addition(rng: random.Random) -> Draw:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} + {b}?", a + b, f"{a} + {b} = {a + b}."


def _add_subtract(rng: random.Random) -> Draw:
    while True:
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        if a + b - c >= 0:
            break
    s = a + b
    return f"What is {a} + {b} - {c}?", s - c, f"{a} + {b} = {s}. {s} - {c} = {s - c}."


def _one_digit_subtraction(rng: random.Random) -> Draw:
    a = rng.randint(2, 9)
    b = rng.randint(1, a - 1)
    return f"What is {a} - {b}?", a - b, f"{a} - {b} = {a - b}."


def _two_digit_no_carry(rng: random.Random) -> Draw:
    while True:
        a, b = rng.randint(11, 88), rng.randint(1, 8)
        if a % 10 + b <= 9:
            break
    return f"What is {a} + {b}?", a + b, f"{a} + {b} = {a + b}."


def _two_digit_carry(rng: random.Random) -> Draw:
    while True:
        a, b = rng.randint(11, 89), rng.randint(2, 9)
        if a % 10 + b >= 10:  # always a carry: the tens digit is the pivotal token
            break
    return f"What is {a} + {b}?", a + b, f"{a} + {b} = {a + b}."


_NAMES = [
    ("Sam", "he"), ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Ben", "he"),
    ("Zoe", "she"), ("Max", "he"), ("Lily", "she"), ("Tom", "he"), ("Emma", "she"),
]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells"]
_GAINS = ["buys {n} more", "finds {n} more", "gets {n} more from a friend", "wins {n} more"]
_LOSSES = ["gives {n} to a friend", "loses {n}", "gives away {n}", "sells {n}"]


def _word_problem(rng: random.Random, steps: int) -> Draw:
    """A story: a start amount, then `steps` gains or losses; how many now?"""
    name, pronoun = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    total = rng.randint(3, 9)
    sentences = [f"{name} has {total} {item}."]
    work = []
    for step in range(steps):
        gain = total < 2 or rng.random() < 0.5
        n = rng.randint(1, 9) if gain else rng.randint(1, min(9, total))
        phrase = rng.choice(_GAINS if gain else _LOSSES).format(n=n)
        lead = pronoun.capitalize() if step == 0 else f"Then {pronoun}"
        sentences.append(f"{lead} {phrase}.")
        new = total + n if gain else total - n
        work.append(f"{total} {'+' if gain else '-'} {n} = {new}.")
        total = new
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), total, " ".join(work)


LEVELS: dict[str, Level] = {
    level.name: level
    for level in [
        Level("L1", "add1", "one-digit addition (3 + 5)", _one_digit_addition),
        Level("L2", "sub1", "one-digit subtraction (8 - 3)", _one_digit_subtraction),
        Level("L3", "add2", "two-digit plus one-digit, no carry (23 + 4)", _two_digit_no_carry),
        Level("L4", "addsub1", "one-digit a + b - c (7 + 5 - 3)", _add_subtract),
        Level("L5", "word1", "one-step word problem (add or subtract)", lambda rng: _word_problem(rng, 1)),
        Level("L6", "carry2", "two-digit plus one-digit, with a carry (47 + 8)", _two_digit_carry),
        Level("L7", "word2", "two-step word problem (add/subtract)", lambda rng: _word_problem(rng, 2)),
        Level("L8", "word3", "three-step word problem (add/subtract)", lambda rng: _word_problem(rng, 3)),
    ]
}

# Pass rates of SmolLM2-135M-Instruct (the default student, Q4_1 GGUF) at
# temperature 1, plain sampling, one worked example, 40 problems per level
# (seed 0), task version 1.0: level -> (pass rate, mean completion tokens incl.
# EOS). 95% intervals are about +-0.15 at n = 40, and the choice of worked
# example alone moved L3 between 0.17 and 0.35 and L6 between 0.00 and 0.12
# in earlier drafts: read these as a ladder, not as exact values.
MEASURED: dict[str, tuple[float, float]] = {
    "L1": (0.57, 21.0),
    "L2": (0.60, 17.8),
    "L3": (0.17, 23.3),
    "L4": (0.28, 28.3),
    "L5": (0.12, 41.8),
    "L6": (0.00, 30.5),
    "L7": (0.10, 49.0),
    "L8": (0.12, 53.6),
}

# Re-measured with the current script (gadiag's loader and prompt; 24 problems
# per level, seed 0, 1 thread): L1 0.75, L2 0.54, L3 0.12, L4 0.25, L5 0.21,
# L6 0.04, inside the intervals of the table above.
#   python -m gadiag_tasks.measure_pass_rates --samples 24 --threads 1 --levels L1,L2,L3,L4,L5,L6

# Three levels in the default student's 0.2-0.8 range (questions it sometimes
# solves carry the most signal) and one just below it.
DEFAULT_LEVELS = ("L1", "L2", "L3", "L4")

# Gemma-3-270M (base, `gemma3-270m`, Q4_K_M GGUF) prompted in plain text
# ("Q: …\nA: …", the answer ends at a line break) with PLAIN_EXAMPLES worked
# examples, temperature 1, 24 problems per level (seed 0), max 40 new tokens:
# level -> (pass rate, mean completion tokens incl. the end token). 95%
# intervals are about ±0.18 at n = 24. Measured with
#   python -m gadiag_tasks.measure_pass_rates --model gemma3-270m --examples 3 --samples 24 --threads 1 --max-new-tokens 40
MEASURED_PLAIN_GEMMA3_270M: dict[str, tuple[float, float]] = {
    "L1": (0.29, 16.8),
    "L2": (0.17, 17.0),
    "L3": (0.08, 19.2),
    "L4": (0.12, 27.2),
    "L5": (0.33, 16.0),
    "L6": (0.00, 17.1),
}

# Defaults for a student prompted in plain text (a base model): the two levels
# in Gemma-3-270M's 0.2-0.8 range and the one just below it, three worked examples.
PLAIN_DEFAULT_LEVELS = ("L1", "L2", "L5")
PLAIN_EXAMPLES = 3


def parse_levels(levels) -> tuple[str, ...]:
    """Level names from 1, "1", "L1", "l1", a list of those, or "1,2,3"."""
    return graded.parse_levels(levels, LEVELS, "math", "L")


# ----------------------------------------------------------------------------
# The task


class SyntheticMath(graded.GradedTask):
    name = "math"
    # Bump when questions, solutions, worked examples or the prompt change.
    version = "1.0"
    description = "Synthetic arithmetic at graded levels (offline, seeded); integer answers."
    LEVELS = LEVELS
    LEVEL_PREFIX = "L"
    SEED_PREFIX = "gadiag-math"

    def __init__(self, levels=DEFAULT_LEVELS, worked_example: bool = True, examples: int = 1) -> None:
        super().__init__(levels, worked_example, examples)

    # -- verifier -------------------------------------------------------------

    def verify(self, problem: Problem, completion: str) -> bool:
        try:
            return integer_answer_matches(problem.answer, completion)
        except Exception:  # never raise on garbage
            return False

    def wrong_answer(self, problem: Problem, rng: random.Random) -> str:
        """A near miss (off by 1 to 3, or by 10 on two-digit answers), never negative
        when the gold answer is not."""
        gold = parse_int(problem.answer)
        if gold is None:
            return super().wrong_answer(problem, rng)
        offsets = [-3, -2, -1, 1, 2, 3] + ([-10, 10] if abs(gold) >= 10 else [])
        choices = [gold + d for d in offsets if gold < 0 or gold + d >= 0]
        return str(rng.choice(choices))


MathOptions = graded.options_class("MathOptions", parse_levels, '[1, 2] or ["L1", "L4"]', DEFAULT_LEVELS, PLAIN_DEFAULT_LEVELS, PLAIN_EXAMPLES)


def factory(options: MathOptions, run) -> SyntheticMath:
    """Build the task from the ``[task]`` options of harness.toml (unset levels and
    examples follow the student's prompt format, `graded.build`)."""
    return graded.build(SyntheticMath, options, run, DEFAULT_LEVELS, PLAIN_DEFAULT_LEVELS, PLAIN_EXAMPLES)


@hookimpl
def register_tasks(register):
    register("math", factory, f"Synthetic arithmetic at graded levels {list(LEVELS)[0]}-{list(LEVELS)[-1]} (offline, seeded).", options=MathOptions)

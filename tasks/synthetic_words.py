"""The offline synthetic task ``wordplay``: seeded letter, word and comparison
questions at graded difficulty — a second task family that is not arithmetic.

Levels (each shown after one worked example of the same level, as a previous
user/assistant exchange; every solution is one line ending in "The answer is X."):

    W1   yes/no comparison               Is 47 larger than 74? Answer yes or no.
    W2   the larger of two numbers       Which number is larger, 47 or 74?
    W3   the earlier of two letters      Which letter comes first in the alphabet, "q" or "d"?
    W4   first letter of a word          What is the first letter of the word "garden"?
    W5   alphabetical order of two words Which word comes first in alphabetical order, "river" or "candle"?
    W6   length of a word                How many letters are in the word "garden"?
    W7   the longer of two words         Which word is longer, "cat" or "garden"?
    W8   next letter of the alphabet     Which letter comes right after "k" in the alphabet?
    W9   count a letter in a word        How many times does the letter "e" appear in the word "between"?
    W10  last letter of a word           What is the last letter of the word "garden"?
    W11  a three-letter word backwards   Write the word "cat" backwards.

Easiest first for the default student (MEASURED: W1 0.50, W2 0.46, W3 0.33,
W4 0.21, the rest below 0.2); the two-way choices W1-W3 sit in the 0.2-0.8
range where rollouts of one question are sometimes right and sometimes wrong.

Answers are a letter, a word or a number; the verifier reads the word after the
last "answer is" (else the last word of the completion) and compares it without
case, quotes or punctuation. Pass rates of the default student are in MEASURED
(re-measure with ``python -m gadiag_tasks.measure_pass_rates --task wordplay --samples 24``).

Problems are drawn as in every graded family (gadiag_tasks.graded): cycling
through the configured levels, seeded by (seed, i, the level's key).

Options (the ``[task]`` table of harness.toml, with ``run.task = "wordplay"``):
    levels          which levels, e.g. ["W1", "W3"] or [1, 3]; default DEFAULT_LEVELS
    worked_example  show the one worked example before the question (default true)
"""

from __future__ import annotations

import random
import re
import string
import unicodedata

from gadiag_core import hookimpl
from gadiag_core.interfaces import Problem
from gadiag_tasks import graded
from gadiag_tasks.graded import Draw, Level


# Common lower-case words of 4-7 letters (no proper nouns), the material of
# every word level.
WORDS = (
    "apple bread chair dance eagle flame garden honey island jacket kettle lemon "
    "market needle orange pencil rabbit silver table uncle violet window yellow zebra "
    "basket candle doctor engine forest guitar hammer insect jungle kitten ladder "
    "mirror number office planet river rocket saddle tomato velvet wallet butter "
    "cotton letter pepper summer bottle carrot puzzle coffee between teeth sheep "
    "banana paper tunnel pillow cherry meadow button"
).split()
THREE_LETTER = "cat dog sun pen cup box hat map bed car bus fox jam key net owl pig rat toy van web arm egg ink".split()
ALPHABET = string.ascii_lowercase


def _first_letter(rng: random.Random) -> Draw:
    word = rng.choice(WORDS)
    return f'What is the first letter of the word "{word}"?', word[0], f'"{word}" starts with {word[0]}.'


def _last_letter(rng: random.Random) -> Draw:
    word = rng.choice(WORDS)
    return f'What is the last letter of the word "{word}"?', word[-1], f'"{word}" ends with {word[-1]}.'


def _next_letter(rng: random.Random) -> Draw:
    i = rng.randrange(len(ALPHABET) - 1)
    a, b = ALPHABET[i], ALPHABET[i + 1]
    return f'Which letter comes right after "{a}" in the alphabet?', b, f"The alphabet goes {a}, {b}."


def _larger_number(rng: random.Random) -> Draw:
    a, b = rng.sample(range(10, 100), 2)
    big = max(a, b)
    return f"Which number is larger, {a} or {b}?", str(big), f"{big} is more than {min(a, b)}."


def _alphabetical(rng: random.Random) -> Draw:
    while True:
        a, b = rng.sample(WORDS, 2)
        if a[0] != b[0]:  # decided by the first letter
            break
    first = min(a, b)
    return (
        f'Which word comes first in alphabetical order, "{a}" or "{b}"?',
        first,
        f'"{first}" starts with {first[0]}, which comes before {max(a, b)[0]}.',
    )


def _length(rng: random.Random) -> Draw:
    word = rng.choice(WORDS)
    return f'How many letters are in the word "{word}"?', str(len(word)), f'"{word}" is spelled {"-".join(word)}.'


def _count_letter(rng: random.Random) -> Draw:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    return (
        f'How many times does the letter "{letter}" appear in the word "{word}"?',
        str(n),
        f'"{word}" is spelled {"-".join(word)}; {letter} appears {n} time{"s" if n > 1 else ""}.',
    )


def _reverse(rng: random.Random) -> Draw:
    word = rng.choice(THREE_LETTER)
    return f'Write the word "{word}" backwards.', word[::-1], f'"{word}" is spelled {"-".join(word)}; backwards it is {"-".join(word[::-1])}.'


def _is_larger(rng: random.Random) -> Draw:
    a, b = rng.sample(range(10, 100), 2)
    answer = "yes" if a > b else "no"
    return f"Is {a} larger than {b}? Answer yes or no.", answer, f"{a} is {'more' if a > b else 'less'} than {b}."


def _longer_word(rng: random.Random) -> Draw:
    while True:
        a, b = rng.sample(WORDS + THREE_LETTER, 2)
        if abs(len(a) - len(b)) >= 2:
            break
    longer = a if len(a) > len(b) else b
    return (
        f'Which word is longer, "{a}" or "{b}"?',
        longer,
        f'"{a}" has {len(a)} letters and "{b}" has {len(b)}.',
    )


def _earlier_letter(rng: random.Random) -> Draw:
    a, b = rng.sample(ALPHABET, 2)
    first = min(a, b)
    return f'Which letter comes first in the alphabet, "{a}" or "{b}"?', first, f"{first} comes before {max(a, b)}."


LEVELS: dict[str, Level] = {
    level.name: level
    for level in [
        Level("W1", "isbigger", "is one two-digit number larger than another (yes/no)", _is_larger),
        Level("W2", "larger", "the larger of two two-digit numbers", _larger_number),
        Level("W3", "earlier", "which of two letters comes first in the alphabet", _earlier_letter),
        Level("W4", "first", "first letter of a word", _first_letter),
        Level("W5", "alpha", "which of two words comes first alphabetically", _alphabetical),
        Level("W6", "length", "how many letters a word has", _length),
        Level("W7", "longer", "the longer of two words", _longer_word),
        Level("W8", "next", "the letter after a letter in the alphabet", _next_letter),
        Level("W9", "count", "how many times a letter appears in a word", _count_letter),
        Level("W10", "last", "last letter of a word", _last_letter),
        Level("W11", "reverse", "a three-letter word written backwards", _reverse),
    ]
}

# Pass rates of SmolLM2-135M-Instruct (the default student, Q4_1 GGUF) at
# temperature 1, plain sampling, one worked example, max_new_tokens 64, seed 0,
# 24 problems per level, task version 1.0: level -> (pass rate, mean completion
# tokens incl. EOS). Measured on 2026-11-30 with
#   python -m gadiag_tasks.measure_pass_rates --task wordplay --samples 24 --threads 1 --batch-size 24 \
#       --model ~/.cache/gadiag/models/gguf-b179c9523d0e6a0f98a330c7562b6827
# (the converted default student). At n = 24 a 95% interval is about ±0.2
# (W1: [0.31, 0.69]; W4: [0.09, 0.40]): read these as a ladder, not exact values.
MEASURED: dict[str, tuple[float, float]] = {
    "W1": (0.50, 17.9),
    "W2": (0.46, 22.9),
    "W3": (0.33, 11.1),
    "W4": (0.21, 20.0),
    "W5": (0.17, 20.4),
    "W6": (0.17, 36.8),
    "W7": (0.12, 32.5),
    "W8": (0.12, 15.5),
    "W9": (0.08, 36.0),
    "W10": (0.04, 27.6),
    "W11": (0.00, 28.1),
}

# Three levels in the default student's 0.2-0.8 range and one at its edge.
DEFAULT_LEVELS = ("W1", "W2", "W3", "W4")

# Gemma-3-270M (base, `gemma3-270m`, Q4_K_M GGUF) prompted in plain text with
# PLAIN_EXAMPLES worked examples, temperature 1, 24 problems per level (seed 0),
# max 40 new tokens: level -> (pass rate, mean completion tokens). 95% intervals
# are about ±0.18 at n = 24. Measured (931 s at a load of 8-12) with
#   python -m gadiag_tasks.measure_pass_rates --task wordplay --model gemma3-270m --examples 3 --samples 24 --threads 1 --max-new-tokens 40
MEASURED_PLAIN_GEMMA3_270M: dict[str, tuple[float, float]] = {
    "W1": (0.58, 15.4),
    "W2": (0.54, 15.5),
    "W3": (0.29, 12.0),
    "W4": (0.71, 13.0),
    "W5": (0.29, 18.3),
    "W6": (0.71, 22.8),
    "W7": (0.29, 22.3),
    "W8": (0.17, 13.2),
    "W9": (0.62, 28.4),
    "W10": (0.04, 12.8),
    "W11": (0.00, 28.0),
}

# A student prompted in plain text (a base model): PLAIN_EXAMPLES worked
# examples; W1-W4 are all inside Gemma-3-270M's 0.2-0.8 range too.
PLAIN_DEFAULT_LEVELS = ("W1", "W2", "W3", "W4")
PLAIN_EXAMPLES = 3


def parse_levels(levels) -> tuple[str, ...]:
    """Level names from 1, "1", "W1", "w1", a list of those, or "1,2,3"."""
    return graded.parse_levels(levels, LEVELS, "wordplay", "W")


# ----------------------------------------------------------------------------
# The verifier

_ANSWER_IS = re.compile(r"answer\s*(?:is|=|:)", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z0-9]+")
MAX_CHARS = 200_000


def extract_word(completion) -> str | None:
    """The final answer of a completion, lower-cased: the first word after the
    last "answer is" (within 40 characters), else the last word of the text."""
    if not isinstance(completion, str):
        return None
    text = unicodedata.normalize("NFKC", completion[:MAX_CHARS])
    for match in reversed(list(_ANSWER_IS.finditer(text))):
        word = _WORD.search(text, match.end())
        if word is not None and word.start() - match.end() <= 40:
            return word.group(0).lower()
    words = _WORD.findall(text)
    return words[-1].lower() if words else None


# ----------------------------------------------------------------------------
# The task


class SyntheticWords(graded.GradedTask):
    name = "wordplay"
    # Bump when questions, solutions, worked examples or the prompt change.
    version = "1.0"
    description = "Synthetic letter, word and comparison questions at graded levels (offline, seeded)."
    LEVELS = LEVELS
    LEVEL_PREFIX = "W"
    SEED_PREFIX = "gadiag-words"

    def __init__(self, levels=DEFAULT_LEVELS, worked_example: bool = True, examples: int = 1) -> None:
        super().__init__(levels, worked_example, examples)

    def verify(self, problem: Problem, completion: str) -> bool:
        try:
            return extract_word(completion) == str(problem.answer).lower()
        except Exception:  # never raise on garbage
            return False

    def wrong_answer(self, problem: Problem, rng: random.Random) -> str:
        """A near miss of the same kind: the other choice of a two-way question
        (yes/no, the other number, word or letter), else a neighbouring count,
        another letter, or the word unreversed."""
        gold = str(problem.answer)
        if gold in ("yes", "no"):
            return "no" if gold == "yes" else "yes"
        choices = re.findall(r'"([a-z]+)"', problem.question) + re.findall(r"\b(\d+)\b", problem.question)
        # The other choice of the same kind (a number, a letter, a word).
        others = [c for c in choices if c != gold and c.isdigit() == gold.isdigit() and (len(c) == 1) == (len(gold) == 1)]
        if others and (len(choices) == 2 or not gold.isdigit()):
            return others[0]
        if gold.isdigit():
            value = int(gold)
            return str(rng.choice([v for v in (value - 2, value - 1, value + 1, value + 2) if v >= 0]))
        if len(gold) == 1:
            return rng.choice([c for c in ALPHABET if c != gold])
        return gold[::-1] + "s"


WordsOptions = graded.options_class("WordsOptions", parse_levels, '[1, 3] or ["W1", "W4"]', DEFAULT_LEVELS, PLAIN_DEFAULT_LEVELS, PLAIN_EXAMPLES)


def factory(options: WordsOptions, run) -> SyntheticWords:
    """Build the task from the ``[task]`` options of harness.toml (unset levels and
    examples follow the student's prompt format, `graded.build`)."""
    return graded.build(SyntheticWords, options, run, DEFAULT_LEVELS, PLAIN_DEFAULT_LEVELS, PLAIN_EXAMPLES)


@hookimpl
def register_tasks(register):
    register("wordplay", factory, f"Synthetic letter, word and comparison questions at levels {list(LEVELS)[0]}-{list(LEVELS)[-1]} (offline, seeded).", options=WordsOptions)

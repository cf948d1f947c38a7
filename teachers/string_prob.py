"""String probabilities under a teacher with its own tokenizer (DESIGN §5).

The teacher is a next-token distribution over its vocabulary at any state
(a sequence of teacher tokens after its context). What the byte path needs is

    M(s, x, E) = P(the text generated from state s starts with x·e for some e in E)

with E a prefix-free set of non-empty byte strings, or E = None meaning just
"starts with x". Summing over the first teacher token v (bytes w):

    w a proper prefix of x          p(v) · M(s+v, x[|w|:], E)            (a branch)
    w starts with x, rest r = w[|x|:]:
        E is None                   p(v)
        r starts with some e ∈ E    p(v)
        r a proper prefix of an e   p(v) · M(s+v, "", {e[|r|:]})          (a branch)
    otherwise                       0

Non-branch terms are sums over contiguous ranges of the sorted vocabulary
(TokenBytes.prefix_range): a difference of prefix sums. Branches need the
teacher's distribution at a new state: free when the state is on the
canonical tokenization already computed, else one teacher forward. Branches
are capped (depth, forwards, a minimum path mass); the path mass of every
branch not followed is added to `left_out`, an upper bound on how much M
misses (M is a lower bound on the true value).

Two uses per scored node with candidate student token k (bytes b_k), after
healing (the teacher state s backs off to a boundary before the node; h is the
healed bytes between it and the node):

    string probability   P(b_k | s, h) = M(s, h·b_k) / M(s, h)                   sampled-token objectives
    partition            P(k)          = (M(s, h·b_k) − M(s, h·b_k, E_k)) / M(s, h)
                         E_k = the student's minimal extensions of b_k: the mass
                         of continuations greedy longest match gives to k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Optional, Protocol

import torch

from gadiag_plugins.students.token_bytes import TokenBytes


@dataclass(frozen=True)
class Caps:
    """Limits on the prefix marginal's branches, per scored node.

    max_depth:     branch levels followed (free canonical ones included)
    max_forwards:  teacher forwards at states off the canonical tokenization
    min_mass:      a branch needing a forward is followed only if its path mass is at least this
    """

    max_depth: int = 6
    max_forwards: int = 8
    min_mass: float = 1e-4


class TeacherStates(Protocol):
    """The teacher's next-token distribution at states (teacher token sequences after its context)."""

    def probs(self, state: Hashable) -> torch.Tensor:
        """[Vt] float64 next-token probabilities at `state` (runs a forward if not cached)."""

    def cached(self, state: Hashable) -> bool:
        """True when `probs(state)` costs no forward."""

    def child(self, state: Hashable, token: int) -> Hashable:
        """The state after appending teacher token `token`."""


@dataclass
class Budget:
    """What one node's computation spent and left out."""

    forwards_left: int
    forwards: int = 0
    left_out: float = 0.0


class StringScorer:
    """M(s, x, E) of the module docstring over one teacher's states."""

    def __init__(self, vocab: TokenBytes, states: TeacherStates, caps: Caps = Caps()):
        self.vocab = vocab
        self.states = states
        self.caps = caps
        self._order = torch.tensor(vocab.order, dtype=torch.long)
        self._cum: dict = {}

    def _dist(self, state):
        """(probs [Vt], cum [n+1]): cum[i] = mass of the first i tokens in sorted-bytes order."""
        hit = self._cum.get(state)
        if hit is None:
            probs = self.states.probs(state).double()
            cum = torch.zeros(len(self.vocab.order) + 1, dtype=torch.float64)
            cum[1:] = torch.cumsum(probs[self._order], 0)
            hit = (probs, cum)
            self._cum[state] = hit
        return hit

    def _range_mass(self, cum, prefix: bytes) -> float:
        lo, hi = self.vocab.prefix_range(prefix)
        return float(cum[hi] - cum[lo])

    def _branches(self, x: bytes, ext: Optional[tuple]) -> list:
        """(token, rest of x, rest of E) for every first token that needs a branch."""
        vocab, out = self.vocab, []
        for m in range(1, min(len(x), vocab.max_len + 1)):  # w a proper prefix of x
            for v in vocab.ids_of.get(x[:m], ()):
                out.append((v, x[m:], ext))
        if ext is not None:  # w = x·r with r a proper prefix of some e ∈ E
            seen = set()
            for e in ext:
                for m in range(len(e)):
                    r = e[:m]
                    w = x + r
                    if not w or w in seen or len(w) > vocab.max_len:
                        continue
                    seen.add(w)
                    rest = tuple(f[m:] for f in ext if len(f) > m and f[:m] == r)
                    for v in vocab.ids_of.get(w, ()):
                        out.append((v, b"", rest))
        return out

    def mass(self, state, x: bytes, ext: Optional[tuple] = None, budget: Optional[Budget] = None, min_mass: Optional[float] = None) -> float:
        """M(state, x, E): a lower bound, short of the truth by at most budget.left_out.
        `min_mass` overrides caps.min_mass (the least path mass worth a forward)."""
        budget = budget if budget is not None else Budget(self.caps.max_forwards)
        floor = self.caps.min_mass if min_mass is None else min_mass
        return self._mass(state, x, ext, 1.0, 0, budget, floor)

    def _mass(self, state, x, ext, weight, depth, budget, floor) -> float:
        if not x and ext is None:
            return 1.0
        probs, cum = self._dist(state)
        if ext is None:
            total = self._range_mass(cum, x)
        else:
            total = sum(self._range_mass(cum, x + e) for e in ext)
        branches = [(float(probs[v]), v, nx, ne) for v, nx, ne in self._branches(x, ext)]
        branches.sort(key=lambda b: -b[0])
        for p, v, nx, ne in branches:
            if p <= 0.0:
                continue
            path = weight * p
            child = self.states.child(state, v)
            free = self.states.cached(child)
            if depth >= self.caps.max_depth or (not free and (path < floor or budget.forwards_left <= 0)):
                budget.left_out += path
                continue
            if not free:
                budget.forwards_left -= 1
                budget.forwards += 1
            total += p * self._mass(child, nx, ne, path, depth + 1, budget, floor)
        return total


@dataclass
class CandidateScores:
    """The teacher at one node, on the student's candidate tokens.

    string_logprob:  [C] log P(b_k | teacher context, prefix): the sampled-token objectives' p
    partition:       [C] P(k) under the greedy-longest-match partition (full-distribution objectives)
    prefix_mass:     M(s, h): the healed bytes' probability (the denominator)
    left_out:        L / (M(s, h) + L), L the path mass of the branches not followed:
                     the share of the (possible) mass of the node's prefix left
                     unexplored (0: exact up to float error; near 1: unreliable)
    forwards:        teacher forwards spent off the canonical tokenization
    """

    string_logprob: torch.Tensor
    partition: torch.Tensor
    prefix_mass: float
    left_out: float
    forwards: int


def score_candidates(scorer: StringScorer, state, healed: bytes, candidate_bytes: list, extensions: list) -> CandidateScores:
    """Both teacher quantities for every candidate k (bytes candidate_bytes[k],
    None for a token without text; student extensions extensions[k])."""
    budget = Budget(scorer.caps.max_forwards)
    denominator = scorer.mass(state, healed, None, budget)
    # Branches of the numerators matter relative to the prefix's own mass.
    floor = scorer.caps.min_mass * denominator
    strings, parts = [], []
    for b, ext in zip(candidate_bytes, extensions):
        if not b or denominator <= 0.0:
            strings.append(0.0)
            parts.append(0.0)
            continue
        starts = scorer.mass(state, healed + b, None, budget, floor)
        longer = scorer.mass(state, healed + b, ext, budget, floor) if ext else 0.0
        strings.append(starts / denominator)
        parts.append(max(starts - longer, 0.0) / denominator)
    strings_t = torch.tensor(strings, dtype=torch.float64)
    return CandidateScores(
        string_logprob=torch.where(strings_t > 0, strings_t.clamp_min(1e-300).log(), torch.full_like(strings_t, -math.inf)),
        partition=torch.tensor(parts, dtype=torch.float64),
        prefix_mass=denominator,
        left_out=budget.left_out / (denominator + budget.left_out) if denominator + budget.left_out > 0 else 1.0,
        forwards=budget.forwards,
    )

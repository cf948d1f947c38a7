"""The byte path's math (gadiag_teachers.string_prob, DESIGN §5) against
brute-force enumeration of teacher token sequences, on a made-up teacher whose
next-token distribution is a seeded function of the state."""

from __future__ import annotations

import math

import pytest
import torch

from gadiag_teachers.string_prob import Caps, StringScorer, score_candidates
from gadiag_plugins.students.token_bytes import EOS_BYTES, TokenBytes

# A teacher vocabulary with merges, a special token (None) and an end token.
TEACHER = [b"a", b"b", b"ab", b"ba", b"abb", b"bab", b"c", EOS_BYTES, None]
# A student vocabulary that splits differently: "ab" is one token, "b" and "bb" too.
STUDENT = [b"a", b"b", b"c", b"bb", b"ab", b"abc", EOS_BYTES]


class FakeStates:
    """Deterministic peaked distributions: probs(state) depends on the state only."""

    def __init__(self, width: int, dead=()):
        self.width = width
        self.forwards = 0
        self.dead = set(dead)  # tokens given probability 0

    def probs(self, state):
        self.forwards += 1
        g = torch.Generator().manual_seed(hash(state) % (2**31))
        logits = 1.5 * torch.randn(self.width, generator=g, dtype=torch.float64)
        for v in self.dead:
            logits[v] = -math.inf
        return torch.softmax(logits, 0)

    def cached(self, state):
        return False

    def child(self, state, token):
        return state + (token,)


def brute_force(states, vocab, state, targets, depth=8):
    """P(the text from `state` starts with one of `targets`), by enumerating
    teacher token sequences until their bytes decide the question."""
    probs = states.probs(state)
    total = 0.0
    for v, w in enumerate(vocab):
        if not w or probs[v] == 0:
            continue
        p = float(probs[v])
        if any(w.startswith(t) for t in targets):
            total += p
            continue
        rests = [t[len(w):] for t in targets if t.startswith(w) and len(t) > len(w)]
        if rests and depth > 0:
            total += p * brute_force(states, vocab, state + (v,), rests, depth - 1)
    return total


UNCAPPED = Caps(max_depth=50, max_forwards=10_000, min_mass=0.0)


@pytest.mark.parametrize("x", [b"a", b"ab", b"abba", b"babab", b"cab", EOS_BYTES, b"ab" + EOS_BYTES])
def test_prefix_marginal_matches_enumeration(x):
    states = FakeStates(len(TEACHER))
    scorer = StringScorer(TokenBytes(TEACHER), states, UNCAPPED)
    assert scorer.mass((), x) == pytest.approx(brute_force(states, TEACHER, (), [x]), rel=1e-12, abs=1e-15)


def test_extension_event_matches_enumeration():
    """M(s, x, E): starts with x followed by any of E (a prefix-free set)."""
    states = FakeStates(len(TEACHER))
    scorer = StringScorer(TokenBytes(TEACHER), states, UNCAPPED)
    for x, ext in [(b"a", (b"b", b"c")), (b"", (b"ab", b"ba")), (b"b", (b"ab", b"c")), (b"ab", (b"bab",))]:
        expected = brute_force(states, TEACHER, (), [x + e for e in ext])
        assert scorer.mass((), x, ext) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_student_token_spanning_several_teacher_tokens():
    """Student token "abc" is never one teacher token: its probability is all branches."""
    states = FakeStates(len(TEACHER))
    scorer = StringScorer(TokenBytes(TEACHER), states, UNCAPPED)
    student = TokenBytes(STUDENT)
    scores = score_candidates(scorer, (), b"", [b"abc"], [student.minimal_extensions(b"abc")])
    expected = brute_force(states, TEACHER, (), [b"abc"])
    assert expected > 0
    assert math.exp(float(scores.string_logprob[0])) == pytest.approx(expected, rel=1e-12)


def test_teacher_token_covering_several_student_tokens_partition():
    """Teacher token "abb" covers student tokens "ab"+"b" (or "a"+"bb"). The
    greedy-longest-match partition over the whole student vocabulary sums to
    the teacher's text mass, and each part matches enumeration."""
    states = FakeStates(len(TEACHER))
    scorer = StringScorer(TokenBytes(TEACHER), states, UNCAPPED)
    student = TokenBytes(STUDENT)
    cands = [b for b in STUDENT]
    scores = score_candidates(scorer, (), b"", cands, [student.minimal_extensions(b) for b in cands])
    for k, b in enumerate(cands):
        longer = [c for c in STUDENT if c != b and c.startswith(b)]
        # P(greedy longest match = k) = P(starts with b) − P(starts with a longer student token)
        expected = brute_force(states, TEACHER, (), [b]) - (brute_force(states, TEACHER, (), longer) if longer else 0.0)
        assert float(scores.partition[k]) == pytest.approx(expected, rel=1e-10, abs=1e-14)
    # Every text starts with some student token (a, b, c or the end): the parts are a partition.
    special = float(states.probs(())[TEACHER.index(None)])
    assert float(scores.partition.sum()) == pytest.approx(1.0 - special, rel=1e-10)


def test_healing_boundary_inside_a_teacher_token():
    """The node's prefix ends inside teacher token "abb" (student wrote "a", "b"
    and may continue "b"): conditioning on the healed bytes h = "ab" from the
    state before them gives P(b | starts with ab) = M(ab·b) / M(ab)."""
    states = FakeStates(len(TEACHER))
    scorer = StringScorer(TokenBytes(TEACHER), states, UNCAPPED)
    student = TokenBytes(STUDENT)
    scores = score_candidates(scorer, (), b"ab", [b"b", b"c", b"a"], [student.minimal_extensions(b) for b in (b"b", b"c", b"a")])
    for k, b in enumerate([b"b", b"c", b"a"]):
        expected = brute_force(states, TEACHER, (), [b"ab" + b]) / brute_force(states, TEACHER, (), [b"ab"])
        assert math.exp(float(scores.string_logprob[k])) == pytest.approx(expected, rel=1e-12)
    assert scores.left_out == 0.0


def test_caps_report_the_left_out_mass_as_a_bound():
    states = FakeStates(len(TEACHER))
    exact = StringScorer(TokenBytes(TEACHER), states, UNCAPPED).mass((), b"babab")
    capped = StringScorer(TokenBytes(TEACHER), FakeStates(len(TEACHER)), Caps(max_depth=1, max_forwards=1, min_mass=0.0))
    from gadiag_teachers.string_prob import Budget

    budget = Budget(1)
    value = capped.mass((), b"babab", None, budget)
    assert budget.left_out > 0
    assert value <= exact + 1e-15
    assert exact - value <= budget.left_out + 1e-15


def test_minimal_extensions():
    vocab = TokenBytes([b" 4", b" 47", b" 470", b" 48", b" 4.", b"x"])
    assert vocab.minimal_extensions(b" 4") == (b".", b"7", b"8")
    assert vocab.longest_prefix_token(b" 479") == 1

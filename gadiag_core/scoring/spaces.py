"""Gradient spaces: where the cosine between two update directions is taken.

Every vector is given in logit space, one row per scored node: v [N, V], the
derivative of the objective with respect to the logits z at that node (already
including 1/τ). The parameter-space update is Jᵀv with J = ∂z(u_t)/∂θ
(DESIGN §1). Spaces:

    logits              cos(a, b). Free: no model call. For an untied output
                        head this equals the head-weight cosine exactly (the
                        head's gradient is v hᵀ, so ‖h‖ cancels).
    hidden              cos(Wᵀa, Wᵀb): the gradient arriving at the final hidden
                        state (the input of the output head W [V, H]). One
                        forward pass, no backward through the network.
    params              the full parameter gradient Jᵀv (every parameter; a tied
                        input/output embedding is one parameter, its gradient
                        sums both uses).
    params:last<N>      the parameters of the last N transformer blocks only
                        (e.g. params:last2). The final norm, the output head and
                        the embeddings are NOT included; add them with a regex.
    params:re:<regex>   the parameters whose name matches <regex> (re.search)
                        among model.named_parameters(), aliases of tied weights
                        included (lm_head.weight selects the tied embedding).
                        Examples: params:re:self_attn (attention only),
                        params:re:(q_proj|v_proj)\\.weight$ (LoRA-like targets),
                        params:re:layers\\.(28|29)\\.|^model\\.norm\\. (last blocks
                        of a 30-block model and the final norm).

Aggregation. Per token: the cosine at each node. Per question: for logits and
hidden, the cosine of the vectors concatenated over nodes (the per-node
vectors live at different positions); for params*, cos(Σ_t Jᵀa_t, Σ_t Jᵀb_t),
the gradient of Σ_t ⟨z_t, v_t⟩ over the whole rollout.

How params* is computed, and the memory guard: gadiag_core.scoring.param_grads.

`alignment_scores` is the one entry point the pipeline uses, whatever the space.
"""

from __future__ import annotations

import math

import torch

from gadiag_core.scoring.param_grads import gram_cosine, hidden_gradients, model_of, parameter_grams
from gadiag_core.scoring.param_select import select_parameters, unique_params
from gadiag_core.scoring.space_spec import parse_space


# ----------------------------------------------------------------------------
# Describing a space


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def space_description(space: str, model=None) -> str:
    """One line for the leaderboard saying what the cosine is taken over.

    `model` (a torch module, or a Student with `.model`) adds parameter counts
    and validates the selector against it."""
    spec = parse_space(space)
    model = getattr(model, "model", model)
    if spec.kind == "logits":
        return "logits (cosine of the logit-space vectors)"
    if spec.kind == "hidden":
        return "hidden (cosine of the gradients at the final hidden state, Wᵀv)"
    if spec.last:
        what = f"the last {spec.last} transformer blocks (no final norm, head or embeddings)"
    elif spec.regex:
        what = f"parameters matching /{spec.regex}/"
    else:
        what = "all parameters"
    if model is None:
        return f"{space} (parameter gradients: {what})"
    chosen = select_parameters(model, space)
    total = sum(p.numel() for p in unique_params(model))
    selected = sum(p.numel() for _, p in chosen)
    return f"{space} (parameter gradients: {what}; {_count(selected)} of {_count(total)} parameters, {len(chosen)} tensors)"


# ----------------------------------------------------------------------------
# Cosines


def _cosines(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-row cosine [N] and the concatenated cosine of two [N, D] tensors
    (NaN where a norm is zero)."""
    a, b = a.double(), b.double()
    dots = (a * b).sum(-1)
    a_sq, b_sq = (a * a).sum(-1), (b * b).sum(-1)
    denominator = (a_sq * b_sq).sqrt()
    per_node = torch.where(denominator > 0, dots / denominator, torch.full_like(dots, float("nan")))
    total = math.sqrt(float(a_sq.sum())) * math.sqrt(float(b_sq.sum()))
    per_question = float(dots.sum()) / total if total > 0 else float("nan")
    return per_node, per_question


# ----------------------------------------------------------------------------
# The entry point


def _needed(vectors: dict, pairs: dict) -> list[str]:
    names = []
    for a, b in pairs.values():
        for name in (a, b):
            if name not in vectors:
                raise KeyError(f"pair names vector {name!r}, which is not among the vectors")
            if name not in names:
                names.append(name)
    return names


def alignment_scores(
    space: str,
    student,
    prompt_ids: list[int],
    generated_ids: list[int],
    nodes: torch.Tensor,
    vectors: dict[str, torch.Tensor],
    pairs: dict[str, tuple[str, str]],
    *,
    memory_limit=None,
    reduce_rank: bool = True,
    stats: dict | None = None,
) -> dict[str, tuple[torch.Tensor, float]]:
    """Cosines in `space` for each named pair of logit-space vectors.

    nodes:        [N] node indices t of the rows of every vector
    vectors:      name -> [N, V] logit-space vectors at those nodes
    pairs:        row name -> (name of a, name of b)
    memory_limit: bytes for a chunk of parameter gradients (params* spaces);
                  default: $GADIAG_GRAD_MEMORY or 2 GiB
    reduce_rank:  skip back-propagating vectors that depend linearly on others
    stats:        if a dict, filled (params* spaces) with timings in s, wall
                  and process CPU (forward_s, node_s, question_s, *_cpu_s) and
                  counts: node_rows, question_rows (vectors back-propagated),
                  backward_calls, backward_rows, capacity (rows per batched
                  backward), row_bytes (gradient bytes per row), vectors
    returns:      row name -> (per-node cosine [N] float64, per-question cosine)
    Long on purpose: the one entry point dispatches the three spaces and their memory checks."""
    spec = parse_space(space)
    if spec.kind == "logits":
        return {row: _cosines(vectors[a], vectors[b]) for row, (a, b) in pairs.items()}

    model = model_of(student, space)
    nodes = torch.as_tensor(nodes).long().cpu()
    names = _needed(vectors, pairs)
    N = len(nodes)
    if N == 0 or not names:
        return {row: (torch.zeros(0, dtype=torch.float64), float("nan")) for row in pairs}
    stacked = torch.stack([vectors[name].float().cpu() for name in names])  # [K, N, V]
    index = {name: k for k, name in enumerate(names)}

    if spec.kind == "hidden":
        g = hidden_gradients(model, space, prompt_ids, generated_ids, nodes, stacked)  # [K, N, H]
        return {row: _cosines(g[index[a]], g[index[b]]) for row, (a, b) in pairs.items()}

    grams = parameter_grams(model, space, prompt_ids, generated_ids, nodes, stacked, memory_limit, reduce_rank, stats)
    out = {}
    for row, (a, b) in pairs.items():
        i, j = index[a], index[b]
        per_node = torch.tensor([gram_cosine(grams[n], i, j) for n in range(N)], dtype=torch.float64)
        out[row] = (per_node, gram_cosine(grams[-1], i, j))
    return out

"""Gradient spaces: where the cosine between two update directions is taken.

Every vector is given in logit space, one row per scored node: v [N, V], the
update direction is Jᵀv with J = ∂z/∂θ at that node (DESIGN §1).

    logits   cos(a, b) per node; per question the concatenation over nodes.
             For an untied output head this equals the head-weight cosine.

`alignment_scores` is the one entry point the pipeline uses, whatever the space.
"""

from __future__ import annotations

import math

import torch

from gadiag_core.errors import UsageError

SPACES = ("logits",)


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


def check_space(space: str) -> str:
    if space not in SPACES:
        raise UsageError(f"unknown gradient space {space!r}: choose from {', '.join(SPACES)}")
    return space


def alignment_scores(
    space: str,
    student,
    prompt_ids: list[int],
    generated_ids: list[int],
    nodes: torch.Tensor,
    vectors: dict[str, torch.Tensor],
    pairs: dict[str, tuple[str, str]],
) -> dict[str, tuple[torch.Tensor, float]]:
    """Cosines in `space` for each named pair of logit-space vectors.

    nodes:    [N] node indices t of the rows of every vector
    vectors:  name -> [N, V] logit-space vectors at those nodes
    pairs:    row name -> (name of a, name of b)
    returns:  row name -> (per-node cosine [N], per-question cosine)
    """
    check_space(space)
    return {row: _cosines(vectors[a], vectors[b]) for row, (a, b) in pairs.items()}

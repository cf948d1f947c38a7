"""Logit-space vectors: the ideal vector a* and the distillation vectors b.

Everything here is a pure function on tensors (DESIGN §1). A parameter-space
gradient is J(u)ᵀ v for a logit-space vector v, so these vectors are all the
alignment code needs from the math.

Conventions
-----------
* The last dimension is the vocabulary (width V); any leading dimensions
  ("nodes", usually [N]) are batch dimensions.
* The student policy is π = softmax(z / τ) with the sampling temperature τ.
* p is the teacher distribution, given as log-probabilities (log p).
* Every distillation vector is a DESCENT direction: b = −∂L/∂z for its loss L,
  so that g_distill = Jᵀ b moves the parameters the way training would.
* Work happens in the dtype of the inputs. Every formula is written in a
  numerically stable form (log_softmax, never log(softmax); centred sums with
  zero-probability tokens contributing exactly 0), so float32 is accurate to
  float32 precision; the tests check the math in float64. `cosine` and
  `sparse_dense_cosine` accumulate in float64.
* Tokens with π_k = 0 (for example logits of −inf) contribute exactly 0, never
  NaN. A teacher log-probability of −inf where π_k > 0 makes the reverse KL
  infinite: the vector is then non-finite, deliberately.

Most reverse-KL-like vectors share one shape, the "centred reward" form

    v_k = π_k (r_k − Σ_j π_j r_j) / τ            (1)

which is exactly ∂/∂z_k of Σ_j π_j r_j with r held fixed (∂π_j/∂z_k =
π_j (δ_jk − π_k) / τ). `_centred` computes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "policy",
    "ideal_vector",
    "ideal_vector_on_candidates",
    "screen_bound",
    "reverse_kl_vector",
    "sampled_token_vector",
    "forward_kl_vector",
    "jsd_vector",
    "topk_reverse_kl_vector",
    "rl_outcome_vector",
    "cosine",
    "sparse_dense_cosine",
]


# ----------------------------------------------------------------------------
# helpers


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def _centred(probs: torch.Tensor, reward: torch.Tensor, temperature: float) -> torch.Tensor:
    """Equation (1): π_k (r_k − Σ_j π_j r_j) / τ along the last dim.

    Entries with π_k == 0 are treated as r_k = 0 so that 0 · (±inf) never
    produces NaN (such tokens carry no weight in Σ π r anyway)."""
    reward = torch.where(probs > 0, reward, torch.zeros((), dtype=reward.dtype, device=reward.device))
    baseline = (probs * reward).sum(dim=-1, keepdim=True)  # Σ_j π_j r_j
    return probs * (reward - baseline) / temperature


def _one_hot(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """e_y with the shape and dtype of `like` ([..., V]) for token ids `index` [...]."""
    out = torch.zeros_like(like)
    return out.scatter_(-1, index.long().unsqueeze(-1), 1.0)


def _student_logprobs(student_logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(π, log π) for π = softmax(z / τ), via log_softmax."""
    temperature = _check_temperature(temperature)
    logp = F.log_softmax(_shift(student_logits) / temperature, dim=-1)
    return logp.exp(), logp


def _shift(logits: torch.Tensor) -> torch.Tensor:
    """z − max z along the last dim (softmax-invariant).

    Subtracting before dividing by τ keeps float32 accurate: z_k − z_max is
    exact for the tokens near the top, so the rounding of the division is
    relative to a small number instead of to |z| (~10–30 for real LMs)."""
    top = logits.max(dim=-1, keepdim=True).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return logits - top


# ----------------------------------------------------------------------------
# the policy and the ideal vector


def policy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The student's sampling distribution.

    logits [..., V] -> probs [..., V]

        π = softmax(z / τ)
    """
    temperature = _check_temperature(temperature)
    return torch.softmax(_shift(logits) / temperature, dim=-1)


def ideal_vector(probs: torch.Tensor, q: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The ideal logit-space vector a* over the full vocabulary.

    probs [..., V] (π), q [..., V] (Q(u, k), success probability after token k)
    -> a [..., V]

        V    = Σ_k π_k Q_k
        a*_k = π_k (Q_k − V) / τ  =  ∂/∂z_k Σ_j π_j Q_j   (Q held fixed)

    Σ_k a*_k = 0, and ‖a*‖₁ ≤ screen_bound(probs, τ) for any Q in [0, 1].
    """
    temperature = _check_temperature(temperature)
    return _centred(probs, q.to(probs.dtype), temperature)


def ideal_vector_on_candidates(
    cand_probs: torch.Tensor, cand_q: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ideal vector when Q is only known on a candidate set C.

    cand_probs [..., C] (π_k of the candidates, NOT renormalised), cand_q [..., C]
    -> (a [..., C], value [...])

    Value-neutral rule: every token outside C is given Q_k = V. Then
    V = Σ_C π_k Q_k + (1 − m) V with the covered mass m = Σ_C π_k, so

        V    = Σ_C π_k Q_k / m
        a*_k = π_k (Q_k − V) / τ   on C,   0 outside C

    which is exactly `ideal_vector` with Q_k := V off the candidates, and
    Σ_C a*_k = 0. Candidates with π_k = 0 (for example padding) contribute
    nothing, whatever their Q (even NaN).

    Covered mass 0: the vector is all zeros and the value is NaN (V is
    undefined: no candidate carries any probability).
    """
    temperature = _check_temperature(temperature)
    cand_q = cand_q.to(cand_probs.dtype)
    zero = torch.zeros((), dtype=cand_probs.dtype, device=cand_probs.device)
    weighted = torch.where(cand_probs > 0, cand_probs * cand_q, zero)
    mass = cand_probs.sum(dim=-1)
    safe_mass = torch.where(mass > 0, mass, torch.ones_like(mass))
    value = weighted.sum(dim=-1) / safe_mass
    q_rel = torch.where(cand_probs > 0, cand_q - value.unsqueeze(-1), zero)  # Q_k − V
    a = cand_probs * q_rel / temperature
    value = torch.where(mass > 0, value, torch.full_like(value, float("nan")))
    return a, value


def screen_bound(probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Upper bound on ‖a*‖₁ over every Q in [0, 1]^V.

    probs [..., V] -> [...]

        ‖a*‖₁ ≤ 2 (1 − max_k π_k) / τ

    Why: Σ_k π_k |Q_k − V| = 2 Σ_{Q_k > V} π_k (Q_k − V) = 2 Σ_{Q_k < V} π_k (V − Q_k);
    the most likely token sits on one side (or at V), so the other side has
    mass ≤ 1 − π_max and each term is at most 1. The exact maximum is
    (2/τ) max_S P_S (1 − P_S) over token subsets S (P_S = Σ_S π), so the bound
    is within a factor π_max of tight when π_max ≥ 1/2 — nearly tight exactly
    where screening skips nodes (π_max → 1).
    """
    temperature = _check_temperature(temperature)
    return 2.0 * (1.0 - probs.max(dim=-1).values) / temperature


# ----------------------------------------------------------------------------
# distillation vectors (b = −∂L/∂z)


def reverse_kl_vector(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary reverse KL, KL(π‖p) = Σ_k π_k (log π_k − log p_k).

    student_logits [..., V], teacher_logprobs [..., V] (log p) -> b [..., V]

        r_k = log p_k − log π_k
        b_k = −∂KL(π‖p)/∂z_k = π_k (r_k − Σ_j π_j r_j) / τ

    (the "+1" from differentiating π log π is removed by the centring). Same
    form as a* with the "reward" r in place of Q.
    """
    probs, logprobs = _student_logprobs(student_logits, temperature)
    r = teacher_logprobs.to(logprobs.dtype) - logprobs
    return _centred(probs, r, temperature)


def sampled_token_vector(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, sampled: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Sampled-token reverse KL, the OPD "advantage" form.

    student_logits [..., V], teacher_logprobs [..., V], sampled [...] long -> b [..., V]

        A = log p_y − log π_y          (a constant per node: no gradient through it)
        b = ∂/∂z [A · log π_y] = A (e_y − π) / τ

    E_{y~π}[b] = Σ_y π_y A_y (e_y − π) / τ is the full reverse-KL vector.
    """
    probs, logprobs = _student_logprobs(student_logits, temperature)
    sampled = sampled.long().unsqueeze(-1)
    advantage = teacher_logprobs.to(logprobs.dtype).gather(-1, sampled) - logprobs.gather(-1, sampled)  # [..., 1]
    return advantage * (_one_hot(sampled.squeeze(-1), probs) - probs) / temperature


def forward_kl_vector(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL, KL(p‖π) = Σ_k p_k (log p_k − log π_k).

    student_logits [..., V], teacher_logprobs [..., V] -> b [..., V]

        b = −∂KL(p‖π)/∂z = (p − π) / τ

    (assumes Σ_k p_k = 1; only −Σ p log π depends on z).
    """
    probs, _ = _student_logprobs(student_logits, temperature)
    return (teacher_logprobs.to(probs.dtype).exp() - probs) / temperature


def jsd_vector(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float = 1.0, beta: float = 0.5
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence, as in GKD (Agarwal et al.; TRL's GKD loss).

    student_logits [..., V], teacher_logprobs [..., V], 0 ≤ beta ≤ 1 -> b [..., V]

        m         = β p + (1 − β) π
        JSD_β(p‖π) = β KL(p‖m) + (1 − β) KL(π‖m)

    Derivation. Treat π as free: ∂JSD/∂π_j = −β(1−β) p_j/m_j
    + (1−β)[log(π_j/m_j) + 1 − (1−β) π_j/m_j] = (1−β) log(π_j/m_j), because
    (β p_j + (1−β) π_j)/m_j = 1. Chaining through π = softmax(z/τ) gives the
    centred form (1) with the reward r̃ = (1 − β) log(m / π):

        b_k = −∂JSD_β/∂z_k = π_k (r̃_k − Σ_j π_j r̃_j) / τ

    Limits. JSD_β = β KL(p‖π) + O(β²) as β → 0 and (1 − β) KL(π‖p) + O((1−β)²)
    as β → 1, so b/β → forward_kl_vector and b/(1 − β) → reverse_kl_vector,
    while b itself vanishes at both ends. Following GKD/TRL, beta == 0 exactly
    returns forward_kl_vector and beta == 1 returns reverse_kl_vector (the
    limiting directions; only the scale differs from the interior formula).
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl_vector(student_logits, teacher_logprobs, temperature)
    if beta == 1.0:
        return reverse_kl_vector(student_logits, teacher_logprobs, temperature)
    probs, logprobs = _student_logprobs(student_logits, temperature)
    teacher_logprobs = teacher_logprobs.to(logprobs.dtype)
    # log(m / π) = log(1 − β) + log(1 + β/(1 − β) · p/π)
    #             = log(1 − β) + softplus(log p − log π + log(β/(1 − β))).
    # The constant log(1 − β) cancels in the centring, so drop it: the rest is
    # computed to full relative precision even where p ≪ π (there the JSD
    # gradient saturates and b is tiny next to π, so an O(1) constant would
    # swamp it in float32).
    log_ratio = F.softplus(teacher_logprobs - logprobs + (math.log(beta) - math.log1p(-beta)))
    return _centred(probs, (1.0 - beta) * log_ratio, temperature)


def topk_reverse_kl_vector(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float = 1.0, k: int = 20
) -> torch.Tensor:
    """Reverse KL restricted to the student's top-k tokens, renormalised there.

    student_logits [..., V], teacher_logprobs [..., V], k ≥ 1 -> b [..., V]

    S = the k tokens with the largest student logits at each node (ties broken
    by torch.topk; k ≥ V means the full vocabulary). Both distributions are
    restricted to S and renormalised:

        π^S_k = π_k / Σ_{j∈S} π_j,     p^S_k = p_k / Σ_{j∈S} p_j     (k ∈ S)
        L     = KL(π^S ‖ p^S) = Σ_{k∈S} π^S_k (log π^S_k − log p^S_k)

    π^S = softmax over S of z/τ, so with S held fixed (it is piecewise constant
    in z)

        r^S_k = log p^S_k − log π^S_k
        b_k   = −∂L/∂z_k = π^S_k (r^S_k − Σ_{j∈S} π^S_j r^S_j) / τ   on S,   0 outside S.

    (The two normalisers only shift r^S by a constant, which the centring
    removes.) With k ≥ V this is reverse_kl_vector.
    """
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    temperature = _check_temperature(temperature)
    width = student_logits.shape[-1]
    if k >= width:
        return reverse_kl_vector(student_logits, teacher_logprobs, temperature)
    top = student_logits.topk(k, dim=-1).indices  # [..., k]
    z_s = _shift(student_logits.gather(-1, top)) / temperature
    logp_s = teacher_logprobs.to(z_s.dtype).gather(-1, top)
    logpi_s = F.log_softmax(z_s, dim=-1)  # log π^S
    r_s = F.log_softmax(logp_s, dim=-1) - logpi_s  # log p^S − log π^S
    b_s = _centred(logpi_s.exp(), r_s, temperature)
    return torch.zeros_like(student_logits, dtype=b_s.dtype).scatter_(-1, top, b_s)


def rl_outcome_vector(
    probs: torch.Tensor, sampled: torch.Tensor, advantage: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Outcome-reward policy gradient at the node (the plain-RL reference signal).

    probs [..., V] (π), sampled [...] long (y_t), advantage [...] (R(y) − V̂) -> [..., V]

        b = (R − V̂) (e_y − π) / τ  =  (R − V̂) ∂ log π_y / ∂z
    """
    temperature = _check_temperature(temperature)
    advantage = torch.as_tensor(advantage, dtype=probs.dtype, device=probs.device)
    return advantage.unsqueeze(-1) * (_one_hot(sampled, probs) - probs) / temperature


# ----------------------------------------------------------------------------
# cosines


def cosine(a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = 0.0) -> torch.Tensor:
    """Cosine similarity along `dim`, accumulated in float64.

    a, b broadcastable -> cos with `dim` removed (float64)

        cos(a, b) = ⟨a, b⟩ / (‖a‖ ‖b‖)

    NaN where either norm is ≤ eps (default: exactly zero): a zero vector has no
    direction, and silently returning 0 would bias every mean toward "no
    alignment". Callers filter or count NaNs explicitly.
    """
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    dot = (a * b).sum(dim=dim)
    norm_a = a.norm(dim=dim)
    norm_b = b.norm(dim=dim)
    norm_a, norm_b = torch.broadcast_tensors(norm_a, norm_b)
    ok = (norm_a > eps) & (norm_b > eps)
    denom = torch.where(ok, norm_a * norm_b, torch.ones_like(norm_a))
    out = (dot / denom).clamp(-1.0, 1.0)
    return torch.where(ok, out, torch.full_like(out, float("nan")))


def sparse_dense_cosine(idx: torch.Tensor, a_vals: torch.Tensor, b: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Cosine of a sparse vector against dense rows, accumulated in float64.

    idx [N, C] long (token ids; -1 = padding), a_vals [N, C], b [N, V] -> [N]

    The sparse vector is a_n = Σ_c a_vals[n, c] e_{idx[n, c]} (padding counts as
    0; ids are assumed distinct within a row). Then

        ⟨a_n, b_n⟩ = Σ_c a_vals[n, c] b[n, idx[n, c]],   ‖a_n‖² = Σ_c a_vals[n, c]²

    NaN where either norm is ≤ eps, as in `cosine`.
    """
    pad = idx < 0
    safe_idx = torch.where(pad, torch.zeros_like(idx), idx).long()
    a64 = a_vals.to(torch.float64).masked_fill(pad, 0.0)
    b64 = b.to(torch.float64)
    dot = (a64 * b64.gather(-1, safe_idx)).sum(dim=-1)
    norm_a = a64.norm(dim=-1)
    norm_b = b64.norm(dim=-1)
    ok = (norm_a > eps) & (norm_b > eps)
    denom = torch.where(ok, norm_a * norm_b, torch.ones_like(norm_a))
    out = (dot / denom).clamp(-1.0, 1.0)
    return torch.where(ok, out, torch.full_like(out, float("nan")))

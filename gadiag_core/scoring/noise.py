"""Monte-Carlo noise in the ideal vector: its covariance, standard errors of
cosines, and noise-corrected cosines (DESIGN §1, "Noise").

Setting, at one node. The estimator knows Q only on a candidate set C; each
Q̂_k is a mean of n_k independent 0/1 rewards (continuations forced to start
with k), independent across candidates. With π_k the candidates' probabilities
(not renormalised), m = Σ_C π_k and w_k = π_k / m, the value-neutral rule
(vectors.ideal_vector_on_candidates) gives

    V̂ = Σ_C w_k Q̂_k,      â_k = π_k (Q̂_k − V̂) / τ,   i.e.   â = M Q̂,
    M = diag(π) (I − 1 wᵀ) / τ                                    [C, C]

â is linear in Q̂, hence unbiased for a*_C (the exact vector on C). Its noise:

    Cov(â) = M D Mᵀ,   D = diag(σ_k²),  σ_k² = Var Q̂_k = Q_k (1 − Q_k) / n_k

and the noise energy that inflates the squared norm, E‖â‖² = ‖a*_C‖² + N, is

    N = tr(M D Mᵀ) = Σ_j σ_j² ‖M e_j‖²
      = (1/τ²) Σ_j σ_j² [ π_j² (1 − 2 w_j) + w_j² Σ_k π_k² ].

The second term is where Var(V̂) enters: (Q̂_k − V̂) has variance
σ_k² (1 − 2 w_k) + Σ_j w_j² σ_j², not σ_k² alone. Since
E[Q̂ (1 − Q̂)] = Q (1 − Q) (1 − 1/n), the estimate σ̂_k² = Q̂_k (1 − Q̂_k) / (n_k − 1)
is unbiased, and so is N̂ (a linear function of the σ̂²). Hence two unbiased
estimates of ‖a*_C‖²:

    binomial:    ‖â‖² − N̂
    split-half:  ⟨â₁, â₂⟩ = ‖â‖² − ‖â₁ − â₂‖² / 4    (â = (â₁ + â₂)/2 for equal halves)

Both are functions of the same rewards; the binomial one depends on them only
through the per-candidate success counts (it is the Rao-Blackwellised one:
it does not depend on how the continuations were split), so its variance is
smaller. The split-half one needs no model of the noise (any estimator with two
independent halves). Both can be ≤ 0 at small budgets, where a corrected
cosine is undefined.

Cosines here are against a dense objective vector b that is known exactly; only
its candidate entries b_C and its full norm ‖b‖ enter:

    raw        ⟨â, b⟩ / (‖â‖ ‖b‖)                 biased toward 0 (‖â‖ is inflated)
    corrected  ⟨â, b⟩ / (sqrt(Ê‖a‖²) ‖b‖)          Ê‖a‖² one of the two estimates above

The numerator ⟨â, b⟩ is unbiased in both.

Measured on the exact environment (benchmarks/estimator_accuracy.py, 12 seeds,
73 nodes, 15 teacher × objective rows; errors against the exact cosine on the
same candidates; "toward 0" = mean error × sign of the truth):

  per token        raw: shrunk toward 0 by 0.10–0.22, RMSE 0.37–0.52 (2–8
                   continuations); corrected (either): shrinkage halved but RMSE
                   0.41–0.74 and undefined (energy ≤ 0) for 9–40% of tokens.
                   -> headline: the raw cosine, with cosine_interval.
  aggregates       mean of raw token cosines: toward 0 by 0.02–0.05.
                   mean_cosine_global_correction (binomial or split-half energy,
                   nearly identical): |toward 0| ≤ 0.006 for `uniform` at equal or
                   smaller spread; pooled_cosine with binomial_energy (per-question
                   cosine): |toward 0| ≤ 0.014 where raw is 0.03–0.07, lower RMSE at
                   every budget. -> report these corrected values beside the raw
                   ones and make them the aggregate headline. The global factor
                   needs many nodes per row (~70 here): on 35 nodes at 2
                   continuations it over-corrected by +0.1 once.
  binomial vs split-half  same bias; binomial has the smaller spread on pooled
                   cosines and needs no halves; split-half is the fallback for
                   estimators without per-candidate counts.

Leaderboard means (issue 14; benchmarks/leaderboard_accuracy.py, pipeline runs
of the `toy` task, 20 questions × 10 rollouts, --teachers all, 5 seeds, against
`--estimator exact` over the same nodes): the global factor removes little of
the shrinkage of token means (it is dominated by nodes with large ‖a*‖, while
the mean of cosines weighs every node alike). Per node, the second-order
(delta-method) correction removes ~20% and SIMEX (simex_cosine, quadratic
extrapolant) ~45% of it (mean |Δ| of the token mean 0.048 -> 0.032; degree 1:
0.041, degree 3: same mean |Δ| but over-corrects incorrect rollouts): SIMEX
was the headline. Neither can recover nodes where the noise energy exceeds
‖a*‖² (no extrapolation from more noise can), which is what remains at the
default budget; at 2× the continuations the SIMEX mean is within 0.02.
The headline is now a mean of per-rollout pooled cosines with the binomial
energy summed over the rollout's nodes (gadiag_core.scoring.alignment): mean
|Δ| 0.013 / 0.016 / 0.025 (all / incorrect / correct) where the SIMEX token
mean has 0.032 / 0.026 / 0.048. Tried at the rollout level as well (same
benchmark, correct rollouts, mean |Δ| / bias): Laplace variances in N̂
0.025 / +0.009, split-half energy 0.022 / +0.010, capping the correction
factor 0.025 / +0.011…+0.015, SIMEX of the raw or of the corrected pooled
cosine 0.024 / +0.019 and 0.026 / +0.018, the delta-method correction of
N/√D with plug-in moments worse (it over-corrects where D̂ is small); none
is clearly better than the plain binomial energy (0.025 / +0.014), and with
the exact ‖a*_C‖² in the denominator the numerator's noise alone leaves
0.023. What did fix it is on the estimator's side: N̂ is unbiased only when
the counts n_k do not depend on the rewards, and `targeted`'s former
allocation gave fewer samples to candidates whose first rewards agreed
(σ̂² = 0), so their extreme Q̂ stayed and ‖â‖² − N̂ overestimated ‖a*_C‖².
Estimator variants on the same benchmark, 10 seeds (mean |Δ| / bias; all,
correct, incorrect; sampled tokens against the former default):
  energy allocation, 4 continuations (former default, 1.00×)
      0.012 / +0.005   0.021 / +0.008   0.017 / +0.003
  no early stop (target_error 0)  identical: the stop never fired here
  blind allocation (σ² = 1/4 for every candidate), 4 (1.00×)
      0.015 / +0.005   0.021 / +0.001   0.021 / +0.007
  energy, 5 continuations (1.28×)
      0.013 / +0.006   0.017 / +0.009   0.020 / +0.003
  blind, 5 continuations (1.27×; the default until the candidate change below)
      0.012 / +0.003   0.016 / +0.001   0.018 / +0.004
      (seeds 0–4: 0.010 / +0.002   0.019 / +0.004   0.014 / +0.000)
  blind, 4, mass_threshold 0.95 and max_candidates 6 (1.29×)
      0.010 / +0.003   0.017 / −0.002   0.017 / +0.008
  blind, 10 continuations (2×)
      0.011 / −0.003   0.015 / +0.005   0.017 / −0.010
At 2× the budget the errors hardly shrink: what remains is mostly candidate
truncation, which no correction of the noise can remove. (Those were
measured with the samplers' inverse-CDF draws; the current defaults and
their figures: plugins/estimation/targeted.py, "Rollout floor and
candidates".)

Everything is a pure function on tensors with leading batch dimensions
[..., C]; results are float64.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ideal_map",
    "q_variance",
    "ideal_covariance",
    "noise_energy",
    "cosine_parts",
    "raw_cosine",
    "split_half_energy",
    "binomial_energy",
    "corrected_cosine",
    "cosine_standard_error",
    "pooled_cosine",
    "mean_cosine_global_correction",
    "cosine_interval",
    "candidate_cosine",
    "second_order_cosine",
    "simex_weights",
    "simex_cosine",
    "SIMEX_LEVELS",
    "SIMEX_DEGREE",
]


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def ideal_map(cand_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The linear map M with â = M Q̂ under the value-neutral rule.

    cand_probs [..., C] -> M [..., C, C],  M = diag(π) (I − 1 wᵀ) / τ,  w = π / Σπ
    """
    p = _f64(cand_probs)
    w = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    eye = torch.eye(p.shape[-1], dtype=torch.float64)
    return p.unsqueeze(-1) * (eye - w.unsqueeze(-2)) / float(temperature)


def q_variance(q_hat: torch.Tensor, counts: torch.Tensor, method: str = "unbiased") -> torch.Tensor:
    """Estimated Var(Q̂_k) from the sample mean Q̂_k of counts n_k 0/1 rewards.

    q_hat [..., C], counts [..., C] -> [..., C]

    method:
      "unbiased"  Q̂ (1 − Q̂) / (n − 1): unbiased for Q (1 − Q) / n; use it to
                  correct norms (its errors average out over nodes). It is 0 when
                  all n rewards agree, so it understates the uncertainty of one node.
      "laplace"   Q̃ (1 − Q̃) / n with Q̃ = (s + 1) / (n + 2) (s successes): never 0;
                  use it for standard errors and confidence intervals.
      "plugin"    Q̂ (1 − Q̂) / n.
    n = 0 means "exact, no sampling" (the convention of the `exact` estimator and
    of `targeted`'s verifier-computed candidates): variance 0. With "unbiased",
    n = 1 gets the worst case 1/4.
    """
    q = _f64(q_hat)
    n = _f64(counts)
    safe = n.clamp_min(1.0)
    zero = torch.zeros_like(q)
    if method == "unbiased":
        var = torch.where(n > 1, q * (1 - q) / (n - 1).clamp_min(1.0), 0.25 / safe)
    elif method == "laplace":
        qt = (q * n + 1) / (n + 2)
        var = qt * (1 - qt) / safe
    elif method == "plugin":
        var = q * (1 - q) / safe
    else:
        raise ValueError(f"unknown variance method {method!r}: unbiased, laplace or plugin")
    return torch.where(n > 0, var, zero)


def ideal_covariance(cand_probs: torch.Tensor, q_var: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cov(â) = M diag(Var Q̂) Mᵀ.  cand_probs, q_var [..., C] -> [..., C, C]"""
    m = ideal_map(cand_probs, temperature)
    return (m * _f64(q_var).unsqueeze(-2)) @ m.transpose(-1, -2)


def noise_energy(cand_probs: torch.Tensor, q_var: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """N = tr Cov(â) = E‖â‖² − ‖a*_C‖² (closed form; see the module docstring).

    cand_probs, q_var [..., C] -> [...]
    """
    p = _f64(cand_probs)
    var = _f64(q_var)
    w = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    s2 = (p * p).sum(-1, keepdim=True)
    return (var * (p * p * (1 - 2 * w) + w * w * s2)).sum(-1) / float(temperature) ** 2


def cosine_parts(a: torch.Tensor, b_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(⟨a, b⟩, ‖a‖²) for a sparse a on the candidates and b's candidate entries b_c."""
    a, b_c = _f64(a), _f64(b_c)
    return (a * b_c).sum(-1), (a * a).sum(-1)


def raw_cosine(a: torch.Tensor, b_c: torch.Tensor, b_norm: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ / (‖a‖ ‖b‖), NaN where a norm is 0.  a, b_c [..., C], b_norm [...] (full ‖b‖)."""
    dot, a_sq = cosine_parts(a, b_c)
    den = a_sq.sqrt() * _f64(b_norm)
    return torch.where(den > 0, (dot / den.where(den > 0, torch.ones_like(den))).clamp(-1, 1), torch.full_like(dot, math.nan))


def split_half_energy(half0: torch.Tensor, half1: torch.Tensor) -> torch.Tensor:
    """⟨â₁, â₂⟩: unbiased for ‖a*_C‖² when the halves are independent. [..., C] -> [...]"""
    return (_f64(half0) * _f64(half1)).sum(-1)


def binomial_energy(a: torch.Tensor, cand_probs: torch.Tensor, q_hat: torch.Tensor, counts: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """‖â‖² − N̂ with N̂ from the unbiased binomial variances: unbiased for ‖a*_C‖². [...]"""
    a = _f64(a)
    return (a * a).sum(-1) - noise_energy(cand_probs, q_variance(q_hat, counts, "unbiased"), temperature)


def corrected_cosine(a: torch.Tensor, b_c: torch.Tensor, b_norm: torch.Tensor, energy: torch.Tensor, undefined: str = "clamp") -> torch.Tensor:
    """⟨â, b⟩ / (sqrt(energy) ‖b‖), the noise-corrected cosine.

    energy: an estimate of ‖a*‖² (split_half_energy or binomial_energy) [...]
    undefined: what to return where energy ≤ 0 (the correction is undefined there)
        "clamp" — treat energy as tiny: ±1 with the sign of ⟨â, b⟩ (the brief's
                  sqrt(max(energy, tiny)) followed by clipping to [−1, 1]);
        "raw"   — fall back to the raw cosine;
        "nan"   — NaN (count them).
    The result is clipped to [−1, 1] everywhere.
    """
    dot, a_sq = cosine_parts(a, b_c)
    energy = _f64(energy)
    b_norm = _f64(b_norm)
    ok = energy > 0
    den = energy.clamp_min(1e-300).sqrt() * b_norm
    out = torch.where(den > 0, dot / den.where(den > 0, torch.ones_like(den)), torch.full_like(dot, math.nan)).clamp(-1, 1)
    if undefined == "clamp":
        fallback = torch.sign(dot)
    elif undefined == "raw":
        fallback = raw_cosine(a, b_c, b_norm)
    elif undefined == "nan":
        fallback = torch.full_like(dot, math.nan)
    else:
        raise ValueError(f"undefined must be clamp, raw or nan, got {undefined!r}")
    return torch.where(ok, out, fallback)


def cosine_standard_error(a: torch.Tensor, b_c: torch.Tensor, b_norm: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Delta-method standard error of the raw cosine c(â) = ⟨â, b⟩ / (‖â‖ ‖b‖).

    a, b_c [..., C], b_norm [...], cov [..., C, C] (Cov(â), e.g. ideal_covariance
    with q_variance(..., "laplace")) -> SE [...]

        ∇_a c = (b / ‖b‖ − c a / ‖a‖) / ‖a‖,   SE² = ∇cᵀ Cov(â) ∇c

    (the gradient is taken on the candidate coordinates, where â lives). Where
    ‖â‖ is small against its noise the linearisation is poor. Measured on the
    exact environment, raw ± 1.96 SE covers the exact cosine only 55–80% of
    the time at 2–32 continuations (the cosine of a noise-dominated â is far
    from normal): for intervals use `cosine_interval`; keep this for a quick
    error bar. Inf where ‖â‖ = 0.
    """
    a, b_c, b_norm, cov = _f64(a), _f64(b_c), _f64(b_norm), _f64(cov)
    a_norm = a.norm(dim=-1)
    safe_a = a_norm.clamp_min(1e-300)
    safe_b = b_norm.clamp_min(1e-300)
    c = (a * b_c).sum(-1) / (safe_a * safe_b)
    grad = (b_c / safe_b.unsqueeze(-1) - c.unsqueeze(-1) * a / safe_a.unsqueeze(-1)) / safe_a.unsqueeze(-1)
    var = (grad.unsqueeze(-2) @ cov @ grad.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return torch.where(a_norm > 0, var.clamp_min(0).sqrt(), torch.full_like(var, math.inf))


def pooled_cosine(dots: torch.Tensor, a_energy: torch.Tensor, b_sq: torch.Tensor) -> float:
    """The cosine of vectors concatenated over nodes (the per-question cosine in
    logit space): Σ⟨a_n, b_n⟩ / sqrt(Σ E_n · Σ‖b_n‖²).

    dots, a_energy, b_sq [N]. Pass a_energy = ‖â_n‖² for the raw pooled cosine,
    or a per-node estimate of ‖a*_n‖² (split_half_energy, binomial_energy) for the
    corrected one: summed over nodes its relative noise shrinks like 1/sqrt(N),
    which is where the correction is stable. NaN if the summed energy is ≤ 0.
    """
    energy = float(_f64(a_energy).sum())
    bb = float(_f64(b_sq).sum())
    if not (energy > 0 and bb > 0):
        return math.nan
    return max(-1.0, min(1.0, float(_f64(dots).sum()) / math.sqrt(energy * bb)))


def mean_cosine_global_correction(raw_cos: torch.Tensor, a_sq: torch.Tensor, energy: torch.Tensor) -> float:
    """Mean token cosine corrected by one shrinkage factor for the whole set of nodes:

        mean(raw) · sqrt(Σ‖â_n‖² / Σ Ê‖a_n‖²)

    Stable (sums over nodes) but exact only if the shrinkage does not vary with
    the cosine across nodes. NaN when Σ Ê ≤ 0. raw_cos, a_sq, energy [N]
    (NaN raw cosines, i.e. â = 0, are left out of all three sums).
    """
    raw_cos, a_sq, energy = _f64(raw_cos), _f64(a_sq), _f64(energy)
    ok = ~raw_cos.isnan()
    if not bool(ok.any()):
        return math.nan
    total = float(energy[ok].sum())
    if total <= 0:
        return math.nan
    return float(raw_cos[ok].mean()) * math.sqrt(float(a_sq[ok].sum()) / total)


def cosine_interval(
    cand_probs: torch.Tensor,
    q_hat: torch.Tensor,
    counts: torch.Tensor,
    b_c: torch.Tensor,
    b_norm: torch.Tensor,
    out_pb: torch.Tensor,
    out_pp: torch.Tensor,
    temperature: float = 1.0,
    level: float = 0.95,
    draws: int = 400,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A credible interval for the per-token cosine cos(a*, b) over the FULL vocabulary.

    Inputs at one node (C candidates; several objective rows P may share it):
        cand_probs [C]   π_k of the candidates
        q_hat, counts [C]  Q̂_k and the number n_k of 0/1 rewards behind it
        b_c [P, C]       the objective vectors on the candidates
        b_norm [P]       their full norms ‖b‖
        out_pb [P]       Σ_{k∉C} π_k b_k   (the only way b's other entries enter)
        out_pp           Σ_{k∉C} π_k²      (scalar)
    Returns (lower [P], upper [P], sd [P]): the central `level` interval and
    the standard deviation of the cosine under the posterior below.

    Posterior. Each Q_k on C is Beta(s_k + 1, n_k − s_k + 1) (uniform prior, s_k
    successes), independently. Off the candidates the estimator assumed Q = V;
    the truth is unknown, so all of them get ONE shared Q_out ~ Uniform(0, 1)
    (the value-neutral error is mostly a common shift of the uncovered mass;
    independent draws per token would average out and understate it). Then
    V = Σ_C π_k Q_k + (1 − m) Q_out and a*_k = π_k (Q_k − V)/τ on C,
    π_k (Q_out − V)/τ off C, so

        ⟨a*, b⟩ = Σ_C a*_k b_k + (Q_out − V) out_pb / τ
        ‖a*‖²  = Σ_C a*_k² + (Q_out − V)² out_pp / τ²

    and the cosine of each posterior draw needs no dense vector. Measured on
    the exact environment (selfcheck, benchmarks/estimator_accuracy.py), the
    95% interval covers the exact full-vocabulary cosine ~91–93% of the time at
    4–16 continuations per candidate, where the delta-method interval around
    the raw cosine covers only ~78% (it fails where noise dominates ‖â‖).
    Candidates with n_k = 0 are treated as exact (their Q̂ is used as is).
    """
    p = _f64(cand_probs)
    q = _f64(q_hat)
    n = _f64(counts)
    b_c = _f64(b_c)
    if b_c.dim() == 1:
        b_c = b_c.unsqueeze(0)
    b_norm = _f64(b_norm).reshape(-1)
    out_pb = _f64(out_pb).reshape(-1)
    out_pp = float(out_pp)
    tau = float(temperature)
    s = q * n
    alpha = (s + 1).clamp_min(1e-6)
    beta = (n - s + 1).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):  # seeded draws that leave the global RNG alone
        torch.manual_seed(int(seed) % (2**63))
        sample = torch.distributions.Beta(alpha, beta).sample((draws,))  # [D, C]
        q_out = torch.rand(draws, 1, dtype=torch.float64)
    sample = torch.where(n > 0, sample, q.expand_as(sample))  # [D, C]
    mass = p.sum()
    uncovered = (1.0 - mass).clamp_min(0.0)
    value = (sample * p).sum(-1, keepdim=True) + uncovered * q_out  # [D, 1]
    a = p * (sample - value) / tau  # [D, C]
    shift = (q_out - value) / tau  # [D, 1]
    dot = a @ b_c.T + shift * out_pb  # [D, P]
    a_sq = (a * a).sum(-1, keepdim=True) + shift * shift * out_pp  # [D, 1]
    den = a_sq.sqrt() * b_norm
    cos = torch.where(den > 0, dot / den.where(den > 0, torch.ones_like(den)), torch.zeros_like(dot)).clamp(-1, 1)
    tail = (1.0 - level) / 2
    lower = torch.quantile(cos, tail, dim=0)
    upper = torch.quantile(cos, 1 - tail, dim=0)
    return lower, upper, cos.std(dim=0)


# ----------------------------------------------------------------------------
# Consistent aggregates of cosines (issue 14): SIMEX and the second-order correction


SIMEX_LEVELS = (0.0, 0.5, 1.0, 2.0)  # extra noise, in multiples of the estimated Var(Q̂)
SIMEX_DEGREE = 2  # the extrapolant: a least-squares polynomial of this degree in λ


def candidate_cosine(q: torch.Tensor, cand_probs: torch.Tensor, b_unit: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """cos(a(q), b) for ideal vectors a(q) = M q on the candidates (value-neutral rule).

    q [..., C] (any Q values, e.g. noisy draws), cand_probs [C], b_unit [P, C]
    (b on the candidates divided by its FULL norm ‖b‖) -> [..., P]

        cos = ⟨M q, b_C⟩ / (‖M q‖ ‖b‖)

    0 where M q = 0 (a direction-less draw counts as no alignment).
    """
    a = _f64(q) @ ideal_map(cand_probs, temperature).transpose(-1, -2)  # [..., C]
    dot = a @ _f64(b_unit).transpose(-1, -2)  # [..., P]
    norm = a.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, dot / norm.clamp_min(1e-300), torch.zeros_like(dot)).clamp(-1, 1)


def second_order_cosine(cand_probs, q_hat, counts, b_unit, temperature: float = 1.0) -> torch.Tensor:
    """The raw cosine minus its second-order (delta-method) bias.

    cand_probs, q_hat, counts [C], b_unit [P, C] -> [P]

    With c(a) = ⟨a, β⟩ / ‖a‖ (β = b_C / ‖b‖), u = a / ‖a‖ and Σ = Cov(â)
    (ideal_covariance with the unbiased q_variance):

        E c(â) ≈ c(a) + ½ tr(H Σ),
        ½ tr(H Σ) = (−2 uᵀΣβ − c tr Σ + 3 c uᵀΣu) / (2 ‖a‖²)

    Valid while the noise energy tr Σ is small against ‖a‖²; clipped to [−1, 1].
    Measured against SIMEX on the exact environment (benchmarks/leaderboard_accuracy.py):
    it removes only a small part of the shrinkage where noise is comparable to ‖a‖².
    """
    p, q, n, beta = _f64(cand_probs), _f64(q_hat), _f64(counts), _f64(b_unit)
    m = ideal_map(p, temperature)
    a = m @ q
    sigma = (m * q_variance(q, n, "unbiased").unsqueeze(-2)) @ m.T
    norm = a.norm()
    raw = candidate_cosine(q, p, beta, temperature)
    if not float(norm) > 0:
        return raw
    u = a / norm
    su = sigma @ u
    half_trace = (-2 * (beta @ su) - raw * torch.trace(sigma) + 3 * raw * (u @ su)) / (2 * norm * norm)
    return (raw - half_trace).clamp(-1, 1)


def simex_weights(levels=SIMEX_LEVELS, degree: int = SIMEX_DEGREE) -> torch.Tensor:
    """Weights w [L] with F(−1) ≈ Σ_l w_l F(λ_l): the least-squares polynomial of
    `degree` through the points (λ_l, F_l), evaluated at λ = −1 (zero total noise).

    Linear in F, so the extrapolated mean over nodes is the mean of per-node
    extrapolated values, and intervals can resample nodes or questions. Σ w = 1
    (a noise-free node, F constant, is returned unchanged).
    """
    lam = torch.as_tensor(levels, dtype=torch.float64)
    if degree >= len(lam):
        raise ValueError(f"SIMEX degree {degree} needs more than {len(lam)} noise levels")
    design = torch.stack([lam**d for d in range(degree + 1)], dim=1)  # [L, d+1]
    at = torch.tensor([(-1.0) ** d for d in range(degree + 1)], dtype=torch.float64)  # [d+1]
    return at @ torch.linalg.pinv(design)  # [L]


def simex_cosine(
    cand_probs: torch.Tensor,
    q_hat: torch.Tensor,
    counts: torch.Tensor,
    b_unit: torch.Tensor,
    temperature: float = 1.0,
    levels=SIMEX_LEVELS,
    degree: int = SIMEX_DEGREE,
    draws: int = 64,
    seed: int = 0,
    variance: str = "unbiased",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SIMEX (simulation-extrapolation) cosine at one node: a per-node value whose
    mean over many nodes estimates the mean cosine without Monte-Carlo noise.

    cand_probs, q_hat, counts [C], b_unit [P, C] (b on the candidates / ‖b‖)
    -> (value [P], noise_var [P])

    Simulation: F(λ) = E_ε cos(M (Q̂ + sqrt(λ) ε), b) with ε ~ N(0, diag(σ̂²)),
    σ̂² = q_variance(…, "unbiased"), F(0) the raw cosine. Q̂ has variance σ² and
    â = M Q̂ is linear, so F(λ) is the cosine at total noise (1 + λ) σ²; the noise
    shrinks it toward 0 more at each level. Extrapolation: value = Σ_l w_l F(λ_l)
    (simex_weights), the fitted curve at 1 + λ = 0. Not clipped (a single node's
    value may leave [−1, 1]; clip means).

    noise_var: the variance of the cosine over the λ = 1 draws, a parametric
    bootstrap estimate of the raw cosine's Monte-Carlo variance (bounded by 1).
    Draws are seeded by `seed`; exact candidates (counts 0) get no noise, so a
    node without sampled Q̂ returns its raw cosine.
    """
    p, q, n = _f64(cand_probs), _f64(q_hat), _f64(counts)
    beta = _f64(b_unit)
    sd = q_variance(q, n, variance).sqrt()  # [C]
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    eps = torch.randn(draws, len(q), generator=gen, dtype=torch.float64) * sd  # [D, C]
    curve = []
    noise_var = torch.zeros(beta.shape[0], dtype=torch.float64)
    for level in levels:
        if level == 0:
            curve.append(candidate_cosine(q, p, beta, temperature))
            continue
        cos = candidate_cosine(q + math.sqrt(level) * eps, p, beta, temperature)  # [D, P]
        curve.append(cos.mean(0))
        if level == 1.0:
            noise_var = cos.var(0)
    weights = simex_weights(levels, degree)
    return weights @ torch.stack(curve), noise_var

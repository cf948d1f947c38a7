"""`gadiag-harness selfcheck`: certify estimators and objectives on the exact environment.

    gadiag-harness selfcheck [--estimators targeted,…|all] [--objectives …|all]
                             [--budgets 4,16] [--budget-option continuations]
                             [--option KEY=VALUE …] [--seeds 6] [--problems 10] [--rollouts 2]
                             [--max-median 0.25] [--min-coverage 0.90] [--max-bias-sd 0.35]
                             [--plugins-dir DIR]

What it does. The exact environment (gadiag_tasks.toy_env: a tiny seeded
student, the `toy` task, fixed rollouts, three teachers) gives the exact ideal
vector a*(u_t) at every node (plugins/exact.py). Each estimator is run on every
rollout `--seeds` times (independent replicates) at each budget (values of
`--budget-option`; the first is the default budget); at every node it scores
and for every teacher × objective row

    Δcos = cos(â, b) − cos(a*, b)

with a* the exact vector over the whole vocabulary (what the tool claims to
estimate: candidate truncation, screening and noise all count) and b the
objective's vector for that teacher. Rows where a* = 0 (every token has the
same Q: the node is decided) have no direction and are left out.

Columns of the estimator table:
    pairs        scored (node, row) pairs over all seeds
    tok/node     sampled tokens per scored node (the cost)
    med, p90     of |Δcos| per token
    row bias     the largest |mean Δcos| over rows: the systematic error of a
                 leaderboard mean (noise shrinkage + candidate truncation)
    mean |Δ|     the error of what a leaderboard prints: per seed and row, the
                 noise-corrected token mean (global binomial correction, as in
                 gadiag_core.scoring.alignment) against the exact mean over the same
                 nodes; the median over seeds × rows (reported, not gated: it
                 shrinks with the number of nodes averaged, 73 here)
    cov a*_C     share of 95% intervals (noise.cosine_interval, a posterior over
                 the Q̂s) that contain the exact cosine on the estimator's own
                 candidates, i.e. with exact Q there (gated: the reported
                 uncertainty must be honest)
    cov a*       the same for the full-vocabulary cosine (reported: candidate
                 truncation is a deterministic design error, not noise)
    bias/σ       unbiasedness of â for a*_C, pooled over seeds, in noise SDs of
                 one estimate (`unbiasedness`, `Summary.bias_sd`)

Pass (exit 0) when, at every budget, cov a*_C ≥ --min-coverage and the 4-sigma
lower bound of bias/σ ≤ --max-bias-sd; at the default budget median |Δcos| ≤
--max-median; and every objective with a known loss matches autograd. The
defaults are set from measurements on the built-ins: `targeted` and `uniform`
pass with margin (cov a*_C 92–95%, bias/σ ≤ 0.31), an estimator that shrinks
Q̂ of the sampled token by 40% fails (coverage 83%, bias ≥ 1.2 SD). Per-token
|Δcos| at small budgets is dominated by noise on nodes whose ‖a*‖ is small
(median ≈ 0.1 at 4 continuations), so --max-median is a sanity bound only.

Objective table: each objective's closed-form b against −∂L/∂z by autograd on
the toy model's logits, and Jᵀb against −∇θL through the model's parameters.
L is the objective's `loss(student_logits, teacher_logprobs, sampled,
temperature) -> [N]` method if it has one, else a reference loss for the
built-in names (REFERENCE_LOSSES); objectives with neither are reported as
unchecked (not a failure).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from gadiag_core.errors import UsageError
from gadiag_core.seeding import derive_seed

DEFAULT_BUDGETS = "4,16"
DEFAULT_SEEDS = 6
DEFAULT_MAX_MEDIAN = 0.25
DEFAULT_MIN_COVERAGE = 0.90
DEFAULT_MAX_BIAS_SD = 0.35
AUTOGRAD_TOL = 1e-4
Z95 = 1.959963984540054
ZERO_NORM = 1e-9  # ‖a*‖ below this is zero up to rounding
COVER_TOL = 1e-5  # float32 estimates of an exact value still "cover" it


# ----------------------------------------------------------------------------
# Reference losses: −∂L/∂z must equal the objective's vector b.


def _logpi(z: torch.Tensor, tau: float) -> torch.Tensor:
    return F.log_softmax(z / tau, dim=-1)


def _reverse_kl_loss(z, logp, sampled, tau, objective=None):
    lpi = _logpi(z, tau)
    return (lpi.exp() * (lpi - logp)).sum(-1)


def _forward_kl_loss(z, logp, sampled, tau, objective=None):
    return (logp.exp() * (logp - _logpi(z, tau))).sum(-1)


def _sampled_token_loss(z, logp, sampled, tau, objective=None):
    lpi = _logpi(z, tau)
    y = sampled.long().unsqueeze(-1)
    advantage = (logp.gather(-1, y) - lpi.gather(-1, y)).detach()
    return -(advantage * lpi.gather(-1, y)).squeeze(-1)


def _jsd_loss(z, logp, sampled, tau, objective=None):
    beta = float(getattr(objective, "beta", 0.5))
    if beta == 0.0:
        return _forward_kl_loss(z, logp, sampled, tau)
    if beta == 1.0:
        return _reverse_kl_loss(z, logp, sampled, tau)
    lpi = _logpi(z, tau)
    logm = torch.logsumexp(torch.stack([logp + math.log(beta), lpi + math.log1p(-beta)]), dim=0)
    kl_p_m = (logp.exp() * (logp - logm)).sum(-1)
    kl_pi_m = (lpi.exp() * (lpi - logm)).sum(-1)
    return beta * kl_p_m + (1 - beta) * kl_pi_m


def _topk_reverse_kl_loss(z, logp, sampled, tau, objective=None):
    k = int(getattr(objective, "k", 20))
    if k >= z.shape[-1]:
        return _reverse_kl_loss(z, logp, sampled, tau)
    top = z.detach().topk(k, dim=-1).indices
    lpi_s = F.log_softmax(z.gather(-1, top) / tau, dim=-1)
    lp_s = F.log_softmax(logp.gather(-1, top), dim=-1)
    return (lpi_s.exp() * (lpi_s - lp_s)).sum(-1)


REFERENCE_LOSSES: dict[str, Callable] = {
    "reverse_kl": _reverse_kl_loss,
    "forward_kl": _forward_kl_loss,
    "sampled_token": _sampled_token_loss,
    "jsd": _jsd_loss,
    "topk_reverse_kl": _topk_reverse_kl_loss,
}


def loss_of(name: str, objective) -> Optional[Callable]:
    """loss(z, logp, sampled, tau) -> [N] for an objective, or None if unknown."""
    method = getattr(objective, "loss", None)
    if callable(method):
        return lambda z, logp, sampled, tau: method(z, logp, sampled, tau)
    reference = REFERENCE_LOSSES.get(name)
    if reference is None:
        return None
    return lambda z, logp, sampled, tau: reference(z, logp, sampled, tau, objective)


@dataclass
class ObjectiveCheck:
    name: str
    logit_error: float  # max |b − (−∂L/∂z)| / max |b|
    param_error: float  # ‖Jᵀb − (−∇θL)‖ / ‖∇θL‖
    checked: bool
    ok: bool
    message: str = ""


def check_objective(env, name: str, objective, tol: float = AUTOGRAD_TOL) -> ObjectiveCheck:
    """The objective's b against autograd of its loss on the toy model (float64
    logits; parameters in float32, so the parameter check is to ~1e-5)."""
    loss = loss_of(name, objective)
    if loss is None:
        return ObjectiveCheck(name, math.nan, math.nan, False, True, "no loss() and no reference loss: unchecked")
    tau = env.student.temperature
    worst_logit, worst_param = 0.0, 0.0
    model = env.student.model
    params = [p for p in model.parameters()]
    for rollout in env.rollouts[:4]:
        sampled = torch.tensor(rollout.generated_ids)
        for teacher in env.teachers:
            logp = rollout.teacher_logprobs[teacher].double()
            z = rollout.student_logits.double().clone().requires_grad_(True)
            b = objective.vector(z.detach(), logp, sampled, tau).double()
            (grad,) = torch.autograd.grad(loss(z, logp, sampled, tau).sum(), z)
            scale = float(b.abs().max()) or 1.0
            worst_logit = max(worst_logit, float((b + grad).abs().max()) / scale)
        # Parameter space, through the model: Jᵀb versus −∇θ L (first teacher).
        logp = rollout.teacher_logprobs[env.teachers[0]]
        ids = torch.tensor([rollout.prompt_ids + rollout.generated_ids[:-1]])
        with torch.enable_grad():
            z = model(input_ids=ids, use_cache=False).logits[0, -len(rollout.generated_ids):].float()
            b = objective.vector(z.detach(), logp, sampled, tau).float()
            jtb = torch.autograd.grad(z, params, grad_outputs=b, retain_graph=True, allow_unused=True)
            neg_grad = torch.autograd.grad(-loss(z, logp, sampled, tau).sum(), params, allow_unused=True)
        num = sum(float(((x if x is not None else 0) - (y if y is not None else 0)).pow(2).sum()) for x, y in zip(jtb, neg_grad) if x is not None or y is not None)
        den = sum(float(y.pow(2).sum()) for y in neg_grad if y is not None)
        if den > 0:
            worst_param = max(worst_param, math.sqrt(num / den))
    ok = worst_logit <= tol and worst_param <= max(tol, 1e-3)
    message = "" if ok else f"b differs from −∂L/∂z (logits {worst_logit:.1e}, params {worst_param:.1e})"
    return ObjectiveCheck(name, worst_logit, worst_param, True, ok, message)


# ----------------------------------------------------------------------------
# Estimators against the exact vectors


@dataclass
class Comparison:
    """Everything measured for one estimator at one budget, flat over
    (seed, rollout, node) and, per node, over the P teacher × objective rows.

    Per (node, row) — tensors [K] float64:
        cos_hat      raw cosine cos(â, b)
        cos_exact    cos(a*, b), a* over the full vocabulary
        cos_exact_c  cos(a*_C, b), a*_C exact Q on the estimator's candidates (value-neutral rule)
        se           delta-method SE of cos_hat
        cos_split    split-half corrected cosine (clamped where undefined)
        cos_binom    binomial corrected cosine (clamped where undefined)
        dot, a_sq, e_split, e_binom, b_sq, a_sq_exact_c   parts for aggregate corrections
        row          index into `rows` (teacher/objective name)
        group        (seed, rollout) index, for per-question pooling
        seed         replicate index
    Per node (list): (seed, rollout index, t, candidates, â, a*_C, Var â diagonal)
    """

    estimator: str
    budget: str
    rows: list[str]
    data: dict[str, torch.Tensor]
    nodes: list[tuple] = field(default_factory=list)
    continuations: int = 0
    sampled_tokens: int = 0
    seconds: float = 0.0


def objective_vectors(env, objectives: dict) -> dict[tuple[int, str], torch.Tensor]:
    """(rollout index, 'teacher/objective') -> b [T, V] float64, for every rollout."""
    tau = env.student.temperature
    out = {}
    for i, rollout in enumerate(env.rollouts):
        sampled = torch.tensor(rollout.generated_ids)
        for teacher in env.teachers:
            for oname, objective in objectives.items():
                b = objective.vector(rollout.student_logits.double(), rollout.teacher_logprobs[teacher].double(), sampled, tau)
                out[(i, f"{teacher}/{oname}")] = b.double()
    return out


def compare(env, estimator, vectors: dict, seeds: int, name: str = "", budget: str = "") -> Comparison:
    """Run `estimator` on every rollout for seeds 0 … seeds−1 and compare with the exact vectors."""
    from gadiag_core.scoring import noise
    from gadiag_core.scoring.vectors import cosine, ideal_vector_on_candidates

    tau = env.student.temperature
    rows = sorted({row for (_, row) in vectors})
    cols: dict[str, list] = {k: [] for k in (
        "cos_hat", "cos_exact", "cos_exact_c", "se", "cos_split", "cos_binom",
        "dot", "a_sq", "e_split", "e_binom", "b_sq", "a_sq_exact_c", "row", "group", "seed",
        "ci_lo", "ci_hi", "ci_sd",
    )}
    nodes = []
    continuations = 0
    sampled_tokens = 0
    started = time.time()
    group = 0
    for seed in range(seeds):
        for ri, rollout in enumerate(env.rollouts):
            estimate = estimator.estimate(env.job(rollout, seed))
            continuations += int(estimate.budget.get("continuations", 0))
            sampled_tokens += int(estimate.budget.get("sampled_tokens", 0))
            for node in estimate.nodes:
                t = node.node
                cand = node.candidates.long()
                probs_c = node.probs.double()
                a = node.ideal.double()
                counts = node.counts.double()
                exact_q_c = rollout.exact_q[t, cand]
                a_exact_c, _ = ideal_vector_on_candidates(probs_c, exact_q_c, tau)
                a_exact = rollout.exact_ideal[t]
                var_q = noise.q_variance(node.q_hat, counts, "laplace")  # 0 where counts = 0 (exact)
                cov = noise.ideal_covariance(probs_c, var_q, tau)
                # The true covariance of â, from the exact Q (for the unbiasedness test).
                sampled = counts > 0  # counts 0: computed exactly, no noise
                true_var_q = torch.where(sampled, exact_q_c * (1 - exact_q_c) / counts.clamp_min(1), torch.zeros_like(exact_q_c))
                true_var = noise.ideal_covariance(probs_c, true_var_q, tau).diagonal()
                nodes.append((seed, ri, t, cand, a, a_exact_c, true_var))
                b = torch.stack([vectors[(ri, row)][t] for row in rows])  # [P, V]
                b_c = b[:, cand]
                b_norm = b.norm(dim=-1)
                outside = torch.ones(b.shape[-1], dtype=torch.bool)
                outside[cand] = False
                p_full = rollout.exact_probs[t]
                lo, hi, sd = noise.cosine_interval(
                    probs_c, node.q_hat, counts, b_c, b_norm, (b[:, outside] * p_full[outside]).sum(-1),
                    float((p_full[outside] ** 2).sum()), tau, seed=derive_seed("selfcheck-interval", seed, ri, t),
                )
                cols["ci_lo"].append(lo)
                cols["ci_hi"].append(hi)
                cols["ci_sd"].append(sd)
                a_rep = a.expand(len(rows), -1)
                e_split = noise.split_half_energy(node.ideal_halves[0], node.ideal_halves[1]).expand(len(rows))
                e_binom = noise.binomial_energy(a, probs_c, node.q_hat, counts, tau).expand(len(rows))
                cos_hat = noise.raw_cosine(a_rep, b_c, b_norm)
                cols["cos_hat"].append(cos_hat)
                # a* that is zero up to rounding (every token has the same Q: a dead or
                # decided node) has no direction: its cosine is undefined, not random.
                nan = torch.full((len(rows),), math.nan, dtype=torch.float64)
                if float(a_exact.norm()) > ZERO_NORM:
                    cols["cos_exact"].append(cosine(a_exact.expand(len(rows), -1), b))
                else:
                    cols["cos_exact"].append(nan)
                if float(a_exact_c.norm()) > ZERO_NORM:
                    cols["cos_exact_c"].append(noise.raw_cosine(a_exact_c.expand(len(rows), -1), b_c, b_norm))
                else:
                    cols["cos_exact_c"].append(nan)
                cols["se"].append(noise.cosine_standard_error(a_rep, b_c, b_norm, cov.expand(len(rows), -1, -1)))
                cols["cos_split"].append(noise.corrected_cosine(a_rep, b_c, b_norm, e_split))
                cols["cos_binom"].append(noise.corrected_cosine(a_rep, b_c, b_norm, e_binom))
                dot, a_sq = noise.cosine_parts(a_rep, b_c)
                cols["dot"].append(dot)
                cols["a_sq"].append(a_sq)
                cols["e_split"].append(e_split.double())
                cols["e_binom"].append(e_binom.double())
                cols["b_sq"].append(b_norm.double() ** 2)
                cols["a_sq_exact_c"].append((a_exact_c * a_exact_c).sum().expand(len(rows)))
                cols["row"].append(torch.arange(len(rows)))
                cols["group"].append(torch.full((len(rows),), group))
                cols["seed"].append(torch.full((len(rows),), seed))
            group += 1
    data = {k: (torch.cat(v) if v else torch.zeros(0)) for k, v in cols.items()}
    return Comparison(name, budget, rows, data, nodes, continuations, sampled_tokens, time.time() - started)


@dataclass
class Summary:
    estimator: str
    budget: str
    seeds: int
    pairs: int
    undefined: float
    median: float
    p90: float
    bias: float
    row_bias: float
    mean_error: float
    coverage: float
    coverage_full: float
    coverage_delta: float
    chi2: float
    chi2_df: int
    cont_per_node: float
    tokens_per_node: float
    seconds: float

    @property
    def chi2_limit(self) -> float:
        """χ²/df beyond which â is significantly biased: 1 + 4 nominal standard
        deviations of χ²/df under unbiasedness."""
        return 1.0 + 4.0 * math.sqrt(2.0 / max(1, self.chi2_df))

    @property
    def bias_sd(self) -> float:
        """The bias of â in units of the noise of one estimate: under a bias δ
        per coordinate, E[χ²/df] ≈ 1 + seeds · (δ/σ)², so δ/σ ≈
        sqrt(max(0, χ²/df − 1) / seeds) (RMS over coordinates)."""
        if self.chi2 != self.chi2:
            return math.nan
        return math.sqrt(max(0.0, self.chi2 - 1.0) / max(1, self.seeds))

    @property
    def bias_sd_lower(self) -> float:
        """A conservative lower bound on bias_sd: the excess of χ²/df over
        chi2_limit instead of over 1, so that sampling noise in χ² (large with
        few seeds) cannot fail an unbiased estimator."""
        if self.chi2 != self.chi2:
            return math.nan
        return math.sqrt(max(0.0, self.chi2 - self.chi2_limit) / max(1, self.seeds))


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x, q)) if len(x) else math.nan


def unbiasedness(c: Comparison) -> tuple[float, int]:
    """χ²/df of the estimator's â against a*_C, pooled over seeds.

    For every (rollout, node, candidate token) the seeds' â_k are summed and
    compared with the sum of their exact expectations a*_C,k (each seed's
    candidate set may differ), scaled by the exact variance (binomial, from the
    exact Q and the counts): z = Σ(â_k − a*_C,k) / sqrt(Σ Var â_k). An unbiased
    estimator gives z ~ N(0, 1) (approximately: a sum of binomial means), so
    mean z² ≈ 1; a biased one grows with the number of seeds. Coordinates with
    zero variance (exact estimators, Q ∈ {0, 1}) are skipped.
    (Coordinates of one node are correlated, so χ²/df scatters somewhat more
    than a true χ² would; the limit allows 4 nominal standard deviations.)"""
    sums: dict[tuple, list[float]] = {}
    for seed, ri, t, cand, a, a_exact_c, var in c.nodes:
        for k, ah, ae, v in zip(cand.tolist(), a.tolist(), a_exact_c.tolist(), var.tolist()):
            entry = sums.setdefault((ri, t, k), [0.0, 0.0])
            entry[0] += ah - ae
            entry[1] += v
    z2 = [d * d / v for d, v in sums.values() if v > 1e-12]
    return (sum(z2) / len(z2) if z2 else math.nan), len(z2)


def summarize(c: Comparison) -> Summary:
    d = c.data
    defined_exact = ~d["cos_exact"].isnan()
    hat_ok = ~d["cos_hat"].isnan()
    keep = defined_exact & hat_ok
    delta = (d["cos_hat"] - d["cos_exact"])[keep]

    def covers(target: str) -> float:
        ok = ~d[target].isnan()
        hit = (d[target] >= d["ci_lo"] - COVER_TOL) & (d[target] <= d["ci_hi"] + COVER_TOL)
        return float(hit[ok].double().mean()) if bool(ok.any()) else math.nan

    covered_delta = ((d["cos_hat"] - d["cos_exact"]).abs() <= Z95 * d["se"] + COVER_TOL)[keep]
    # The systematic error of a leaderboard mean: per row, the mean over every
    # seed and node of Δcos; the largest over rows.
    row_bias = 0.0
    for r in range(len(c.rows)):
        m = keep & (d["row"] == r)
        if bool(m.any()):
            row_bias = max(row_bias, abs(float((d["cos_hat"][m] - d["cos_exact"][m]).mean())))
    # The error of what a leaderboard prints: per seed (one run) and row, the
    # noise-corrected token mean (as gadiag_core.scoring.alignment computes it: global
    # correction with the binomial energy, clipped to ±1) against the exact
    # mean over the same nodes (whole vocabulary); the median over runs × rows.
    from gadiag_core.scoring.noise import mean_cosine_global_correction

    mean_errors = []
    for seed in d["seed"].unique().tolist():
        for r in range(len(c.rows)):
            m = keep & (d["seed"] == seed) & (d["row"] == r)
            if bool(m.any()):
                corrected = mean_cosine_global_correction(d["cos_hat"][m], d["a_sq"][m], d["e_binom"][m])
                if corrected == corrected:
                    corrected = max(-1.0, min(1.0, corrected))
                    mean_errors.append(abs(corrected - float(d["cos_exact"][m].mean())))
    mean_error = _quantile(torch.tensor(mean_errors, dtype=torch.float64), 0.5) if mean_errors else math.nan
    chi2, df = unbiasedness(c)
    scored_nodes = len(c.nodes)
    seeds = int(d["seed"].max()) + 1 if len(d["seed"]) else 0
    return Summary(
        estimator=c.estimator,
        budget=c.budget,
        seeds=seeds,
        pairs=int(keep.sum()),
        undefined=float((defined_exact & ~hat_ok).sum()) / max(1, int(defined_exact.sum())),
        median=_quantile(delta.abs(), 0.5),
        p90=_quantile(delta.abs(), 0.9),
        bias=float(delta.mean()) if len(delta) else math.nan,
        row_bias=row_bias,
        mean_error=mean_error,
        coverage=covers("cos_exact_c"),
        coverage_full=covers("cos_exact"),
        coverage_delta=float(covered_delta.double().mean()) if len(covered_delta) else math.nan,
        chi2=chi2,
        chi2_df=df,
        cont_per_node=c.continuations / scored_nodes if scored_nodes else math.nan,
        tokens_per_node=c.sampled_tokens / scored_nodes if scored_nodes else math.nan,
        seconds=c.seconds,
    )


# ----------------------------------------------------------------------------
# Noise correction (DESIGN §1, "Noise"): raw against corrected cosines


PER_TOKEN_METHODS = {"raw": "cos_hat", "split-half": "cos_split", "binomial": "cos_binom"}


def _stats(errors: list[float], signs: list[float]) -> dict:
    e = torch.tensor(errors, dtype=torch.float64)
    sg = torch.tensor(signs, dtype=torch.float64)
    ok = ~e.isnan()
    e, sg = e[ok], sg[ok]
    if not len(e):
        return {"bias": math.nan, "toward0": math.nan, "sd": math.nan, "rmse": math.nan, "n": 0}
    return {
        "bias": float(e.mean()),
        "toward0": float((e * sg).mean()),  # < 0: the estimate sits closer to 0 than the truth
        "sd": float(e.std()) if len(e) > 1 else 0.0,
        "rmse": float(e.pow(2).mean().sqrt()),
        "n": int(len(e)),
    }


def noise_correction_report(c: Comparison, target: str = "cos_exact_c") -> dict:
    """Bias and spread of raw and noise-corrected cosines against the exact ones.

    target: "cos_exact_c" (a*_C: exact Q on the estimator's own candidates — isolates
            the Monte-Carlo noise, which is what the corrections address) or
            "cos_exact" (full a*: truncation error included).

    Returns {"per_token": {method: stats}, "aggregate": {method: stats},
    "undefined": {method: share}}, where stats = bias (mean error), toward0
    (mean error × sign of the truth: negative = shrunk toward 0), sd, rmse, n.

    Per token the methods are raw, split-half and binomial corrected (clamped
    to ±1 where the corrected norm is ≤ 0). Aggregates are per teacher ×
    objective row and per seed (one "leaderboard" entry of one run):
        mean raw                the mean token cosine
        mean split-half/binomial the mean of per-token corrected cosines
        global split-half/binomial  mean raw × sqrt(Σ‖â‖² / Σ Ê‖a‖²)
                                 (noise.mean_cosine_global_correction)
        question raw/split-half/binomial  the per-question (concatenated over one
                                 rollout's nodes) cosine, averaged over questions
                                 (noise.pooled_cosine; undefined ones left out)
    """
    from gadiag_core.scoring import noise

    d = c.data
    keep = ~d[target].isnan() & ~d["cos_hat"].isnan()
    out: dict = {"per_token": {}, "aggregate": {}, "undefined": {}}
    truth = d[target][keep]
    for label, key in PER_TOKEN_METHODS.items():
        out["per_token"][label] = _stats((d[key][keep] - truth).tolist(), torch.sign(truth).tolist())
    out["undefined"] = {
        "raw": float(d["cos_hat"].isnan().double().mean()) if len(d["cos_hat"]) else math.nan,
        "split-half": float((d["e_split"][keep] <= 0).double().mean()) if bool(keep.any()) else math.nan,
        "binomial": float((d["e_binom"][keep] <= 0).double().mean()) if bool(keep.any()) else math.nan,
    }
    # Exact parts for pooled cosines: ⟨a*, b⟩ and ‖a*‖² for the target.
    if target == "cos_exact_c":
        exact_sq = d["a_sq_exact_c"]
    else:
        exact_sq = None
    agg: dict[str, tuple[list, list]] = {}

    def add(label, estimate, exact):
        errors, signs = agg.setdefault(label, ([], []))
        errors.append(estimate - exact)
        signs.append(math.copysign(1.0, exact) if exact == exact else math.nan)

    for seed in d["seed"].unique().tolist():
        for r in range(len(c.rows)):
            m = keep & (d["seed"] == seed) & (d["row"] == r)
            if not bool(m.any()):
                continue
            exact_mean = float(d[target][m].mean())
            add("mean raw", float(d["cos_hat"][m].mean()), exact_mean)
            add("mean split-half", float(d["cos_split"][m].mean()), exact_mean)
            add("mean binomial", float(d["cos_binom"][m].mean()), exact_mean)
            add("global split-half", noise.mean_cosine_global_correction(d["cos_hat"][m], d["a_sq"][m], d["e_split"][m]), exact_mean)
            add("global binomial", noise.mean_cosine_global_correction(d["cos_hat"][m], d["a_sq"][m], d["e_binom"][m]), exact_mean)
            if exact_sq is None:
                continue
            per_q = {"question raw": [], "question split-half": [], "question binomial": [], "exact": []}
            for g in d["group"][m].unique().tolist():
                mg = m & (d["group"] == g)
                exact_dot = (d[target][mg] * (exact_sq[mg] * d["b_sq"][mg]).sqrt()).nan_to_num(0.0)
                ex = noise.pooled_cosine(exact_dot, exact_sq[mg], d["b_sq"][mg])
                if ex != ex:
                    continue
                values = {
                    "question raw": noise.pooled_cosine(d["dot"][mg], d["a_sq"][mg], d["b_sq"][mg]),
                    "question split-half": noise.pooled_cosine(d["dot"][mg], d["e_split"][mg], d["b_sq"][mg]),
                    "question binomial": noise.pooled_cosine(d["dot"][mg], d["e_binom"][mg], d["b_sq"][mg]),
                }
                # A method is compared on the questions where it is defined.
                for label, value in values.items():
                    if value == value:
                        per_q[label].append((value, ex))
            for label in ("question raw", "question split-half", "question binomial"):
                if per_q[label]:
                    est = sum(v for v, _ in per_q[label]) / len(per_q[label])
                    ex = sum(e for _, e in per_q[label]) / len(per_q[label])
                    add(label, est, ex)
    out["aggregate"] = {label: _stats(errors, signs) for label, (errors, signs) in agg.items()}
    return out


# ----------------------------------------------------------------------------
# The command


def parser():
    from gadiag_core.commands.common import ArgumentParser, add_common

    p = ArgumentParser(
        prog="gadiag-harness selfcheck",
        description="Certify gradient estimators and objectives against exact ideal vectors on a tiny enumerable model.",
    )
    p.add_argument("--estimators", default="all", help="comma-separated estimator names, or 'all' (every one but 'exact')")
    p.add_argument("--objectives", default="all", help="comma-separated objective names, or 'all'")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"comma-separated values of --budget-option; the first is the default budget (default {DEFAULT_BUDGETS})")
    p.add_argument("--budget-option", default="continuations", help="the estimator option the budgets set (default continuations)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="extra estimator option for every estimator (repeatable)")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"independent estimator replicates per rollout (default {DEFAULT_SEEDS})")
    p.add_argument("--problems", type=int, default=10, help="toy problems (default 10)")
    p.add_argument("--rollouts", type=int, default=2, help="student rollouts per problem (default 2)")
    p.add_argument("--env-seed", type=int, default=0, help="seed of the environment's rollouts (default 0)")
    p.add_argument("--max-median", type=float, default=DEFAULT_MAX_MEDIAN, help=f"largest median |Δcos| at the default budget (default {DEFAULT_MAX_MEDIAN})")
    p.add_argument("--min-coverage", type=float, default=DEFAULT_MIN_COVERAGE, help=f"smallest 95%%-interval coverage at every budget (default {DEFAULT_MIN_COVERAGE})")
    p.add_argument("--max-bias-sd", type=float, default=DEFAULT_MAX_BIAS_SD, help=f"largest bias of â, in noise SDs of one estimate, at every budget (default {DEFAULT_MAX_BIAS_SD})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    add_common(p)
    return p


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("none", "null"):
        return None
    return text


def _parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {item!r}: expected KEY=VALUE")
        options[key.strip()] = _parse_value(value.strip())
    return options


def _parse_budgets(text: str) -> list:
    values = [_parse_value(p.strip()) for p in text.split(",") if p.strip()]
    if not values:
        raise UsageError("--budgets: give at least one value, e.g. --budgets 4,16")
    return values


def _build_estimator(registry, name: str, options: dict):
    try:
        return registry.create("estimator", name, **options)
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:
        raise UsageError(f"estimator {name!r} rejected options {options}: {exc}") from None


def check_summary(s: Summary, is_default: bool, args) -> list[str]:
    """The failed gates of one estimator × budget row, as messages."""
    problems = []
    if s.pairs == 0:
        return ["no node was scored"]
    if not (s.coverage >= args.min_coverage):
        problems.append(
            f"95% intervals cover the exact cosine (on its candidates) only {s.coverage:.1%} of the time "
            f"(< {args.min_coverage:.0%}): the reported uncertainty is too small"
        )
    if s.bias_sd_lower > args.max_bias_sd:
        problems.append(
            f"â is biased: its mean over seeds differs from the exact a* on its candidates by at least "
            f"{s.bias_sd_lower:.2f} noise SDs of one estimate (estimate {s.bias_sd:.2f}; χ²/df {s.chi2:.2f} over "
            f"{s.chi2_df} coordinates; tolerance {args.max_bias_sd})"
        )
    if is_default and not (s.median <= args.max_median):
        problems.append(f"median |Δcos| {s.median:.3f} > {args.max_median} at the default budget")
    return problems


def run_selfcheck(args, registry, console) -> int:
    from rich.table import Table

    from gadiag_tasks.toy_env import build_environment

    if args.seeds < 2 or args.problems < 1 or args.rollouts < 1:
        raise UsageError("--seeds must be at least 2, --problems and --rollouts at least 1")
    if args.estimators.strip() == "all":
        estimators = [n for n in registry.names("estimator") if n != "exact"]
    else:
        estimators = registry.resolve("estimator", args.estimators)
    objective_names = registry.resolve("objective", args.objectives)
    budgets = _parse_budgets(args.budgets)
    extra = _parse_options(args.option)
    torch.set_num_threads(max(1, args.threads))

    objectives = {name: registry.create("objective", name) for name in objective_names}
    # Build every estimator first: a bad option fails before any work.
    plans = []
    for name in estimators:
        for value in budgets if name != "exact" else [None]:
            options = dict(extra)
            if value is not None:
                options[args.budget_option] = value
            label = "-" if value is None else f"{args.budget_option}={value}"
            plans.append((name, label, value is None or value == budgets[0], _build_estimator(registry, name, options)))

    started = time.time()
    task = registry.create("task", "toy") if "toy" in registry.names("task") else None
    with console.status("building the exact environment…"):
        env = build_environment(problems=args.problems, rollouts_per_problem=args.rollouts, seed=args.env_seed, task=task)
    vectors = objective_vectors(env, objectives)
    console.print(
        f"exact environment: {len(env.rollouts)} rollouts, {env.nodes} nodes, vocabulary {env.student.vocab_size}, "
        f"horizon {env.max_new_tokens}; teachers {', '.join(env.teachers)}; {len(objectives)} objectives; "
        f"{args.seeds} seeds per estimator"
    )

    failures: list[str] = []
    table = Table(
        title=f"estimators vs exact ideal vectors; budget = {args.budget_option}; Δcos = cos(â,b) − cos(a*,b)",
        title_justify="left",
    )
    columns = ("estimator", "budget", "pairs", "tok/node", "med |Δcos|", "p90 |Δcos|", "row bias", "mean |Δ|",
               "cov a*_C", "cov a*", "bias/σ", "status")
    for column in columns:
        table.add_column(column, justify="left" if column in ("estimator", "budget", "status") else "right")
    summaries = []
    for name, label, is_default, estimator in plans:
        with console.status(f"{name} at {label}…"):
            s = summarize(compare(env, estimator, vectors, args.seeds, name, label))
        summaries.append(s)
        problems = check_summary(s, is_default, args)
        failures += [f"{name} ({label}): {p}" for p in problems]
        shown = label.split("=", 1)[-1] + (" *" if is_default and label != "-" else "")
        table.add_row(
            name, shown, str(s.pairs), f"{s.tokens_per_node:.0f}",
            f"{s.median:.3f}", f"{s.p90:.3f}", f"{s.row_bias:.3f}", f"{s.mean_error:.3f}", f"{s.coverage:.1%}",
            f"{s.coverage_full:.1%}", f"{s.bias_sd:.2f}", "[green]ok[/]" if not problems else "[red]FAIL[/]",
        )
    console.print(table)

    otable = Table(title="objectives: closed-form b against autograd on the toy model", title_justify="left")
    for column in ("objective", "logits: max|b + ∂L/∂z|/max|b|", "params: ‖Jᵀb + ∇θL‖/‖∇θL‖", "status"):
        otable.add_column(column)
    for name, objective in objectives.items():
        check = check_objective(env, name, objective)
        if not check.ok:
            failures.append(f"objective {name}: {check.message}")
        status = "[green]ok[/]" if check.checked and check.ok else ("[yellow]unchecked (no loss)[/]" if check.ok else "[red]FAIL[/]")
        otable.add_row(
            name,
            f"{check.logit_error:.1e}" if check.checked else "-",
            f"{check.param_error:.1e}" if check.checked else "-",
            status,
        )
    console.print(otable)
    console.print(
        "* default budget.  row bias: largest |mean Δcos| over rows (systematic error of a leaderboard mean: noise "
        "shrinkage and candidate truncation).  mean |Δ|: median error of the noise-corrected token mean a leaderboard "
        "prints, one per seed × row (each over all the environment's nodes).  CI cov.: share of 95% posterior intervals (noise.cosine_interval) "
        "containing the exact cosine on the estimator's candidates (a*_C, gated) and over the whole vocabulary (a*).  "
        "bias/σ: unbiasedness of â for a*_C, in noise SDs of one estimate."
    )
    console.print(
        f"tolerances: median |Δcos| ≤ {args.max_median} at the default budget; at every budget CI coverage of a*_C ≥ "
        f"{args.min_coverage:.0%} and bias/σ ≤ {args.max_bias_sd} (its 4-sigma lower bound); objectives within "
        f"{AUTOGRAD_TOL:g} of autograd.  ({time.time() - started:.0f} s)"
    )
    if failures:
        for failure in failures:
            console.print(f"[red]FAIL[/] {failure}", soft_wrap=True)
        console.print(f"selfcheck failed: {len(failures)} check(s) out of tolerance")
        return 1
    console.print("[green]selfcheck passed[/]")
    return 0


def main(argv: list[str]) -> int:
    from rich.console import Console

    from gadiag_core.registry import load_registry

    args = parser().parse_args(argv)
    registry = load_registry(args.plugins_dir)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the tables into 80 columns
        console = Console(width=max(console.width, 132))
    return run_selfcheck(args, registry, console)

"""Estimators against the exact ideal vectors (DESIGN §2 "Ground truth").

`compare` runs an estimator on every rollout of the exact environment
(gadiag_tasks.toy_env, passed in: this package imports no plugin) for several
independent seeds and records, per scored (node, teacher × objective row),
the raw cosine, the exact cosines (whole vocabulary; exact Q on the
estimator's own candidates), standard errors, posterior intervals and the
parts of noise-corrected cosines. `summarize` turns that into the numbers the
selfcheck gates on; `unbiasedness` tests â against a*_C; and
`noise_correction_report` compares raw and corrected cosines (DESIGN §1 "Noise").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from gadiag_core.seeding import derive_seed

Z95 = 1.959963984540054
ZERO_NORM = 1e-9  # ‖a*‖ below this is zero up to rounding
COVER_TOL = 1e-5  # float32 estimates of an exact value still "cover" it


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

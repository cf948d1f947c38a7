"""Estimator cost benchmark: sampled tokens needed by `targeted` and `uniform`
to reach the same alignment error (issue #4).

Four sections, all in one process on one torch thread (ratios are comparable
even on a busy machine; the load average is printed):

A. exact toy environment (gadiag_tasks.toy_env: tiny random transformer, 12-token
   vocabulary, horizon 4): exact a* by enumeration.
B. exact chain environment, horizon 128 (gadiag_tasks.chain_env): a
   Markov "chain of thought" whose success probability is known exactly by
   dynamic programming at any length. Most tokens are near-certain filler
   (π_max 0.985), a quarter of the rest are stylistic choices between
   equivalent tokens (uncertain, so not screened out, but harmless: a* ≈ 0),
   and a fixed number of decisions change the odds. Two settings:
   "concentrated" (3 decisions, any mistake fatal) and "diffuse" (6 weaker
   decisions, one mistake tolerated: every jump of V is small).
C. length curve on the chain environment (concentrated), horizon 32 … 512:
   the cost of each estimator at fixed settings and the error it reaches. The
   number of decisions does not grow with the length (a longer chain of
   thought is more filler and more stylistic choice): that is the assumption
   under which sub-linear cost is possible at all.
D. the default student (SmolLM2-135M-Instruct, `math` task, `prefix` sampler)
   on a few rollouts, against a high-budget `uniform` reference computed here
   with independent seeds.

Error metrics (per estimator setting, over rollouts × seeds):
    rel_err   sqrt(Σ‖â_t − a*_t‖² / Σ‖a*_t‖²) over every node of every rollout
              (â_t = 0 at nodes the estimator does not score): the relative
              error of the rollouts' ideal vectors. Against a noisy reference
              (D) the reference's own noise energy (binomial, unbiased) is
              subtracted from numerator and denominator.
    q_cos     mean over rollouts × teacher/objective rows of |cos_q(â, b) −
              cos_q(a*, b)|, cos_q the per-question logit-space cosine over
              every node (DESIGN §1 aggregation; exact environments only)
"Equal error": the uniform tokens at each targeted point's rel_err, by
log-log interpolation of the uniform curve (extrapolated, and marked, beyond it).

    python benchmarks/estimator_cost.py            # ~6–7 min at load 4 on 2 cores (5 min idle, --threads 2)
    python benchmarks/estimator_cost.py --sections D --student-budgets 2,4,8,16,32 --threads 2   # uniform's curve further
    python benchmarks/estimator_cost.py --quick    # ~3 min
    python benchmarks/estimator_cost.py --sections A,B,C   # no model download needed
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from gadiag_core.interfaces import ContinuationRequest, EstimationJob
from gadiag_core.seeding import derive_seed
from gadiag_tasks.chain_env import ChainEnvironment


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ----------------------------------------------------------------------------
# Measuring an estimator against exact vectors


@dataclass
class Point:
    label: str
    tokens: float  # sampled tokens per rollout
    continuations: float
    rel_err: float
    q_cos: float = math.nan
    nodes: float = 0.0
    seconds: float = 0.0


def objective_rows(env):
    from gadiag_plugins.objectives.forms import ReverseKL, SampledToken

    objectives = {"reverse_kl": ReverseKL(), "sampled_token": SampledToken()}
    rows = []
    for r in env.rollouts:
        sampled = torch.tensor(r.generated_ids)
        b = {}
        for teacher, logp in r.teacher_logprobs.items():
            for oname, obj in objectives.items():
                b[f"{teacher}/{oname}"] = obj.vector(r.student_logits.double(), logp.double(), sampled, 1.0).double()
        rows.append(b)
    return rows


def pooled_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float((a * b).sum()) / (na * nb) if na > 0 and nb > 0 else math.nan


def measure_exact(env, estimator, seeds: int, label: str, rows=None) -> Point:
    rows = rows if rows is not None else objective_rows(env)
    num = den = 0.0
    tokens = conts = nodes = 0
    cos_errs = []
    started = time.time()
    for seed in range(seeds):
        for r, b_rows in zip(env.rollouts, rows):
            est = estimator.estimate(env.job(r, seed))
            tokens += est.budget.get("sampled_tokens", 0)
            conts += est.budget.get("continuations", 0)
            nodes += len(est.nodes)
            a_hat = torch.zeros_like(r.exact_ideal)
            for n in est.nodes:
                a_hat[n.node, n.candidates] = n.ideal.double()
            num += float((a_hat - r.exact_ideal).pow(2).sum())
            den += float(r.exact_ideal.pow(2).sum())
            for b in b_rows.values():
                exact = pooled_cos(r.exact_ideal, b)
                got = pooled_cos(a_hat, b)
                if not math.isnan(exact):
                    cos_errs.append(abs((0.0 if math.isnan(got) else got) - exact))
    n = seeds * len(env.rollouts)
    return Point(
        label,
        tokens / n,
        conts / n,
        math.sqrt(num / den),
        sum(cos_errs) / len(cos_errs) if cos_errs else math.nan,
        nodes / n,
        time.time() - started,
    )


def equal_error_tokens(curve: list[Point], err: float, metric: str = "rel_err") -> tuple[float, bool]:
    """Tokens the `curve` (more tokens, less error) needs for error `err`,
    by log-log interpolation; (value, extrapolated?). An error of 0 (below
    the resolution of a noisy reference, section D) gives (nan, True)."""
    if not err > 0:
        return math.nan, True
    pts = sorted(((p.tokens, getattr(p, metric)) for p in curve if getattr(p, metric) > 0 and p.tokens > 0), key=lambda x: x[0])
    if len(pts) < 2:
        return math.nan, True
    xs = [math.log(t) for t, _ in pts]
    ys = [math.log(e) for _, e in pts]
    y = math.log(err)
    for i in range(len(pts) - 1):
        lo, hi = sorted((ys[i], ys[i + 1]))
        if lo <= y <= hi and ys[i] != ys[i + 1]:
            f = (y - ys[i]) / (ys[i + 1] - ys[i])
            return math.exp(xs[i] + f * (xs[i + 1] - xs[i])), False
    # Beyond the curve: from its nearest end, with the Monte-Carlo rate
    # error ∝ tokens^(-1/2) (tokens ∝ error^-2) — the segment's own slope is
    # used only where it is steeper than that and well defined.
    below = y < min(ys)
    j = min(range(len(ys)), key=lambda i: ys[i]) if below else max(range(len(ys)), key=lambda i: ys[i])
    return math.exp(xs[j] - 2.0 * (y - ys[j])), True


def print_curves(title: str, uniform: list[Point], targeted: list[Point]) -> list[float]:
    print(f"\n{title}")
    print(f"{'estimator':<28}{'tokens/rollout':>15}{'cont/rollout':>13}{'nodes':>7}{'rel_err':>9}{'q_cos err':>10}{'s':>7}")
    for p in uniform + targeted:
        print(f"{p.label:<28}{p.tokens:>15.0f}{p.continuations:>13.1f}{p.nodes:>7.1f}{p.rel_err:>9.3f}{p.q_cos:>10.3f}{p.seconds:>7.1f}")
    with_cos = not all(math.isnan(p.q_cos) for p in uniform)
    header = f"{'equal error: targeted':<28}{'tokens':>10}{'uniform tokens':>16}{'ratio':>8}   (at equal rel_err)"
    if with_cos:
        header += f"{'uniform tokens':>18}{'ratio':>8}   (at equal q_cos err)"
    print(header)
    ratios = []
    for p in targeted:
        u, extrap = equal_error_tokens(uniform, p.rel_err)
        ratio = u / p.tokens if p.tokens else math.nan
        ratios.append(ratio)
        line = f"{p.label:<28}{p.tokens:>10.0f}{u:>16.0f}{ratio:>7.1f}x{'*' if extrap else ' '}"
        if with_cos:
            uc, extrap_c = equal_error_tokens(uniform, p.q_cos, "q_cos")
            line += f"{'':>16}{uc:>18.0f}{uc / p.tokens if p.tokens else math.nan:>7.1f}x{'*' if extrap_c else ' '}"
        print(line)
    print("   * extrapolated beyond the uniform curve (log-log, from its nearest segment)")
    return ratios


def allocation_bound(pairs: list[tuple[float, float]]) -> float:
    """The most any allocation of forced continuations over uniform's own
    (node, candidate) pairs can save against uniform at equal noise error.

    pairs: (w, c) per pair, w = ‖M e_k‖² Q(1 − Q) the noise energy one
    continuation leaves in â (M = diag(π)(I − 1wᵀ)/τ, as in the estimator's
    allocation) and c its expected sampled tokens. With n continuations per
    pair the noise energy is Σ w/n at cost Σ c·n. Uniform (n = M) has energy
    Σw/M at cost M·Σc; the best allocation for any cost C (n ∝ sqrt(w/c),
    Lagrange) has energy (Σ sqrt(w c))²/C. At equal energy the cost ratio is

        uniform / best = Σw · Σc / (Σ sqrt(w c))²     (Cauchy–Schwarz: ≥ 1)

    An upper bound for allocation alone: it knows the exact Q, and leaves out
    what reuse adds (every continuation also informs the nodes it passes)."""
    pairs = [(w, c) for w, c in pairs if c > 0]
    sw = sum(w for w, _ in pairs)
    sc = sum(c for _, c in pairs)
    cross = sum(math.sqrt(w * c) for w, c in pairs) ** 2
    return sw * sc / cross if cross > 0 else math.nan


def toy_allocation_bound(env, epsilon: float = 0.05, mass: float = 0.9, k: int = 4) -> tuple[float, int]:
    """allocation_bound over the exact environment's rollouts, with uniform's
    default screening and candidates (teachers' picks and the sampled token
    included) and the exact Q; c = the longest continuation from the node
    (toy rollouts rarely end before their limit). Returns (bound, pairs)."""
    from gadiag_plugins.estimation.common import _column_norms, candidate_tokens, select_nodes

    pairs = []
    for r in env.rollouts:
        job = env.job(r, 0)
        probs = torch.softmax(job.student_logits.double() / job.student.temperature, -1)
        for t in select_nodes(probs.float(), epsilon, None):
            extra = [int(p[t]) for p in job.teacher_preferred.values()] + [int(job.generated_ids[t])]
            cands = candidate_tokens(probs[t].float(), mass, k, extra)
            norms = _column_norms(probs[t, cands], job.student.temperature)
            for j, tok in enumerate(cands):
                q = float(r.exact_q[t, tok])
                tokens = job.max_new_tokens - t
                if tok in job.student.eos_token_ids or tokens <= 1:
                    continue  # Q known exactly from the verifier: nothing to sample
                pairs.append((float(norms[j]) * q * (1 - q), float(tokens)))
    return allocation_bound(pairs), len(pairs)


# ----------------------------------------------------------------------------
# Sections


def section_toy(args):
    from gadiag_tasks.toy_env import build_environment
    from gadiag_plugins.estimation.targeted import TargetedEstimator
    from gadiag_plugins.estimation.uniform import UniformEstimator

    env = build_environment()
    rows = objective_rows(env)
    seeds = 2 if args.quick else 4
    ms = (2, 4, 8, 16) if args.quick else (2, 4, 8, 16, 32)
    uniform = [measure_exact(env, UniformEstimator(continuations=m), seeds, f"uniform M={m}", rows) for m in ms]
    targeted = [
        measure_exact(env, TargetedEstimator(continuations=m, max_nodes=None, target_error=0), seeds, f"targeted M={m}", rows)
        for m in ms
    ]
    targeted.append(measure_exact(env, TargetedEstimator(), seeds, "targeted (defaults)", rows))
    print_curves(
        f"A. exact toy environment: {len(env.rollouts)} rollouts, {env.nodes} nodes, horizon {env.max_new_tokens}, {seeds} seeds",
        uniform,
        targeted,
    )
    bound, n_pairs = toy_allocation_bound(env)
    print(
        f"   allocation bound (allocation_bound, exact Q, uniform's {n_pairs} (node, candidate) pairs): no allocation of "
        f"continuations can reach uniform's noise error with fewer than 1/{bound:.2f} of its tokens"
    )


CONCENTRATED = dict(decisions=3, tolerance=0, good=(0.5, 0.9))  # 3 decisions, any mistake fatal
DIFFUSE = dict(decisions=6, tolerance=1, good=(0.55, 0.9))  # 6 decisions, one mistake tolerated


def section_chain(args):
    from gadiag_plugins.estimation.targeted import TargetedEstimator
    from gadiag_plugins.estimation.uniform import UniformEstimator

    ms_u = (8, 16, 32) if args.quick else (8, 16, 32, 64)
    ms_t = (4, 8, 16) if args.quick else (4, 8, 16, 32)
    seeds = 1 if args.quick else 2
    for name, cfg in (("concentrated: 3 decisions, a mistake is fatal", CONCENTRATED), ("diffuse: 6 decisions, one mistake tolerated", DIFFUSE)):
        env = ChainEnvironment(horizon=128, problems=4 if args.quick else 8, **cfg)
        rows = objective_rows(env)
        uniform = [measure_exact(env, UniformEstimator(continuations=m), 1, f"uniform M={m}", rows) for m in ms_u]
        targeted = [
            measure_exact(env, TargetedEstimator(continuations=m, max_nodes=None, target_error=0), seeds, f"targeted M={m}", rows)
            for m in ms_t
        ]
        targeted.append(measure_exact(env, TargetedEstimator(max_nodes=None), seeds, "targeted (defaults, all nodes)", rows))
        eligible = sum(int((1 - r.exact_probs.max(-1).values >= 0.05).sum()) for r in env.rollouts) / len(env.rollouts)
        print_curves(
            f"B. exact chain environment, {name}: horizon 128, {len(env.rollouts)} rollouts, "
            f"{eligible:.0f} eligible nodes per rollout, {seeds} seed(s) for targeted, 1 for uniform",
            uniform,
            targeted,
        )


def section_length(args):
    from gadiag_plugins.estimation.targeted import TargetedEstimator
    from gadiag_plugins.estimation.uniform import UniformEstimator

    horizons = (32, 64, 128, 256) if args.quick else (32, 64, 128, 256, 512)
    problems = 4 if args.quick else 8
    print(
        f"\nC. cost against rollout length (chain environment, concentrated: 3 decisions at any length; "
        f"{problems} rollouts per length; targeted at defaults with max_nodes=None, continuations=16; uniform M=16)"
    )
    print(f"{'T':>5} | {'targeted: tokens':>16}{'cont':>7}{'rel_err':>8}{'tok/T':>7} | {'uniform: tokens':>15}{'cont':>7}{'rel_err':>8}")
    table = []
    for h in horizons:
        env = ChainEnvironment(horizon=h, problems=problems, **CONCENTRATED)
        rows = objective_rows(env)
        t = measure_exact(env, TargetedEstimator(max_nodes=None, continuations=16), 1, "targeted", rows)
        u = measure_exact(env, UniformEstimator(continuations=16), 1, "uniform", rows)
        table.append((h, t, u))
        print(f"{h:>5} | {t.tokens:>16.0f}{t.continuations:>7.0f}{t.rel_err:>8.3f}{t.tokens / h:>7.1f} | {u.tokens:>15.0f}{u.continuations:>7.0f}{u.rel_err:>8.3f}")

    def slope(pairs):
        pairs = [(math.log(x), math.log(y)) for x, y in pairs if y > 0]
        n = len(pairs)
        mx = sum(x for x, _ in pairs) / n
        my = sum(y for _, y in pairs) / n
        return sum((x - mx) * (y - my) for x, y in pairs) / sum((x - mx) ** 2 for x, _ in pairs)

    print(
        "growth exponents (least squares, cost ∝ T^k): targeted continuations k={:.2f}, tokens k={:.2f};  "
        "uniform continuations k={:.2f}, tokens k={:.2f}".format(
            slope([(h, t.continuations) for h, t, _ in table]),
            slope([(h, t.tokens) for h, t, _ in table]),
            slope([(h, u.continuations) for h, _, u in table]),
            slope([(h, u.tokens) for h, _, u in table]),
        )
    )


def section_student(args):
    """Default student against a high-budget uniform reference."""
    from gadiag_plugins.students.hf import load_lm
    from gadiag_core.scoring import noise
    from gadiag_plugins.estimation.targeted import TargetedEstimator
    from gadiag_plugins.estimation.uniform import UniformEstimator
    from gadiag_plugins.sampling.prefix import PrefixSampler
    from gadiag_tasks.synthetic_math import factory

    started = time.time()
    lm = load_lm("smollm2-135m-instruct")
    task = factory()
    sampler = PrefixSampler(batch_size=256)
    max_new = 32
    n_rollouts = 2 if args.quick else 3
    problems = task.problems(8, 0)
    rollouts = []
    for p in problems:  # short, finished rollouts with a few eligible nodes
        prompt = lm.encode_messages(task.student_messages(p))
        gen = sampler.sample(lm, [ContinuationRequest(tuple(prompt), max_new, seed=derive_seed(0, "bench-rollout", p.id))], 1.0)[0]
        if not gen or gen[-1] not in lm.eos_token_ids:
            continue
        z = lm.node_logits(prompt, gen).float()
        rollouts.append((p, prompt, gen, z))
        if len(rollouts) == n_rollouts:
            break

    def job(p, prompt, gen, z, seed):
        return EstimationJob(
            student=lm, sampler=sampler, prompt_ids=prompt, generated_ids=gen, student_logits=z,
            teacher_preferred={}, verify=lambda text, _p=p: task.verify(_p, text), max_new_tokens=max_new,
            seed=derive_seed(0, "bench-estimator", p.id, seed),
        )

    m_ref = 64  # a noisier reference cannot resolve small errors (with M=16 the noise-corrected error of good estimates went to 0)
    ref_est = UniformEstimator(continuations=m_ref)
    from gadiag_plugins.estimation.common import _column_norms

    refs = []
    ref_tokens = 0
    bound_pairs = []  # (w, c) for allocation_bound, from the reference's Q̂
    for p, prompt, gen, z in rollouts:
        e = ref_est.estimate(job(p, prompt, gen, z, 10_000))
        ref_tokens += e.budget["sampled_tokens"]
        per_continuation = e.budget["sampled_tokens"] / max(e.budget["continuations"], 1)
        for n in e.nodes:
            norms = _column_norms(n.probs, lm.temperature)
            for j in range(len(n.candidates)):
                if not bool(n.exact[j]):
                    q = float(n.q_hat[j])
                    bound_pairs.append((float(norms[j]) * q * (1 - q), per_continuation))
        dense = torch.zeros(z.shape, dtype=torch.float64)
        noise_energy = 0.0
        for n in e.nodes:
            dense[n.node, n.candidates] = n.ideal.double()
            noise_energy += float(noise.noise_energy(n.probs, n.q_var))
        refs.append((dense, noise_energy))
    print(
        f"\nD. default student (smollm2-135m-instruct, math default levels, max_new_tokens {max_new}, prefix sampler): "
        f"{len(rollouts)} rollouts of {[len(r[2]) for r in rollouts]} tokens; reference uniform M={m_ref}: "
        f"{ref_tokens / len(rollouts):.0f} tokens/rollout"
    )

    def measure(estimator, label, seeds):
        num = den = 0.0
        tokens = conts = nodes = 0
        t0 = time.time()
        for seed in range(seeds):
            for (p, prompt, gen, z), (ref, ref_noise) in zip(rollouts, refs):
                e = estimator.estimate(job(p, prompt, gen, z, seed))
                tokens += e.budget["sampled_tokens"]
                conts += e.budget["continuations"]
                nodes += len(e.nodes)
                a = torch.zeros_like(ref)
                for n in e.nodes:
                    a[n.node, n.candidates] = n.ideal.double()
                num += float((a - ref).pow(2).sum()) - ref_noise
                den += float(ref.pow(2).sum()) - ref_noise
        n = seeds * len(rollouts)
        return Point(label, tokens / n, conts / n, math.sqrt(max(num, 0.0) / den) if den > 0 else math.nan, math.nan, nodes / n, time.time() - t0)

    ms = (2, 4) if args.quick else tuple(int(m) for m in args.student_budgets.split(","))
    seeds = 1 if args.quick else args.student_seeds
    uniform = [measure(UniformEstimator(continuations=m), f"uniform M={m}", seeds) for m in ms]
    targeted = [measure(TargetedEstimator(continuations=m, max_nodes=None, target_error=0), f"targeted M={m}", seeds) for m in ms if m <= 8]
    targeted.append(measure(TargetedEstimator(), "targeted (defaults)", seeds))
    print_curves(f"   ({seeds} seed(s); rel_err against the reference, its noise subtracted; q_cos needs exact Q: n/a)", uniform, targeted)
    print(
        f"   allocation bound (allocation_bound, the reference's Q̂, {len(bound_pairs)} (node, candidate) pairs, each continuation "
        f"costed at its rollout's mean length): at most {allocation_bound(bound_pairs):.2f}x fewer tokens than uniform by allocation alone"
    )
    print(f"   section D wall time {time.time() - started:.0f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer seeds, budgets and lengths (~3 min)")
    p.add_argument("--sections", default="A,B,C,D", help="which sections to run (A,B,C,D)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--student-budgets", default="2,4,8", help="section D: continuations per candidate of the curves (targeted: those <= 8)")
    p.add_argument("--student-seeds", type=int, default=2, help="section D: estimator seeds per rollout")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = {s.strip().upper() for s in args.sections.split(",")}
    print(f"estimator cost benchmark; torch threads {args.threads}; load average {load_average()} on {os.cpu_count()} cores")
    started = time.time()
    if "A" in sections:
        section_toy(args)
    if "B" in sections:
        section_chain(args)
    if "C" in sections:
        section_length(args)
    if "D" in sections:
        section_student(args)
    print(f"\ntotal wall time {time.time() - started:.0f} s; load average {load_average()}")


if __name__ == "__main__":
    sys.exit(main())

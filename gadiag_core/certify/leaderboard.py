"""What a leaderboard prints, against the exact values (issue 14).

Inputs are records as a run writes them (tokens.jsonl, questions.jsonl): one
set from the estimator under test and one from the exact estimator over the
same rollouts (pipeline runs with the same seed, or
`gadiag_core.certify.records.environment_records` on the exact environment).
For every teacher × objective row and every split (all / correct / incorrect)
it compares

    headline   the leaderboard's `align` / `correct` / `incorrect`
               (gadiag_core.scoring.alignment: the mean over rollouts of the
               per-rollout noise-corrected pooled cosine)
    raw        the same mean of raw per-rollout pooled cosines
with the exact mean over the same rollouts, and, as "before" (the headline
until issue 14's rollout-level change), the token means
    token      the SIMEX token mean (`token_*`)
    token_raw  the mean of raw token cosines
    global     the raw token mean times one energy factor (`token_*_global`)
with the exact token mean over the same nodes; and checks whether the
leaderboard's 95% interval contains the exact value.
Reference rows (rl_outcome, noise_ceiling) are left out: their b or their
truth depends on the estimator itself.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from gadiag_core.scoring.alignment import REFERENCE_ROWS, aggregate, bootstrap_ci

SPLITS = ("all", "correct", "incorrect")
METHODS = ("token_raw", "global", "token", "raw", "headline")  # before → after
ROLLOUT_METHODS = ("headline", "raw")  # compared with the exact mean of per-rollout cosines; the others with the exact token mean


@dataclass
class RowError:
    """One leaderboard entry (a row and split of one run) against the exact value."""

    row: str
    split: str
    exact: float
    values: dict  # method -> estimate
    intervals: dict  # method -> (low, high); the interval the leaderboard prints for it
    nodes: int

    @property
    def objective(self) -> str:
        return self.row.partition("/")[2]


def _key(record: dict) -> tuple:
    return record["question"], record["rollout"], record["node"]


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def _by_split(pairs: list[tuple[dict, dict]], field: str):
    """(exact values, estimated values by question) per row and split, from
    (record, exact cosines) pairs; `field` holds the record's cosines per row."""
    exact = defaultdict(lambda: defaultdict(list))
    groups = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for record, truth in pairs:
        split = "correct" if record["correct"] else "incorrect"
        for row, value in record[field].items():
            for s in ("all", split):
                exact[row][s].append(truth[row])
                groups[row][s][record["question"]].append(value)
    return exact, groups


def leaderboard_errors(tokens: list[dict], rollouts: list[dict], exact_tokens: list[dict], exact_rollouts: list[dict]) -> list[RowError]:
    """Every teacher × objective row and split of one run against the exact run:
    per (row, split) one RowError for the per-rollout means (methods headline,
    raw; when rollout records are given) and one for the token means (token,
    token_raw, global).

    Nodes are matched by (question, rollout, node) and rollouts by (question,
    rollout); a (node, row) or (rollout, row) pair counts where both cosines
    are finite (an exact a* = 0 has no direction).
    """
    exact_by_key = {_key(r): r for r in exact_tokens}
    matched = []
    for record in tokens:
        other = exact_by_key.get(_key(record))
        if other is None:
            continue
        keep = {row: v for row, v in record["cos"].items() if row not in REFERENCE_ROWS and _finite(v) and _finite(other["cos"].get(row))}
        if keep:
            matched.append((dict(record, cos=keep), other))
    exact_q = {(r["question"], r["rollout"]): r.get("question_cos", {}) for r in exact_rollouts}
    matched_rollouts = []
    for record in rollouts:
        truth = exact_q.get((record["question"], record["rollout"]))
        if truth is None:
            continue
        keep = {row: v for row, v in record.get("question_cos", {}).items() if row not in REFERENCE_ROWS and _finite(v) and _finite(truth.get(row))}
        if keep:
            matched_rollouts.append((dict(record, question_cos=keep), truth))
    summary = aggregate([r for r, _ in matched], [r for r, _ in matched_rollouts])
    exact_tok, raw_tok = _by_split([(r, other["cos"]) for r, other in matched], "cos")
    exact_rol, raw_rol = _by_split(matched_rollouts, "question_cos")
    out = []
    for row in sorted(set(exact_tok) | set(exact_rol)):
        entry = summary.get(row)
        if entry is None:
            continue
        for s in SPLITS:
            truth = exact_rol[row][s]
            if truth:
                out.append(
                    RowError(
                        row, s, sum(truth) / len(truth),
                        {"headline": entry[f"mean_{s}"], "raw": entry[f"mean_{s}_raw"]},
                        {"headline": tuple(entry[f"ci_{s}"]), "raw": bootstrap_ci(raw_rol[row][s])},
                        len(truth),
                    )
                )
            truth = exact_tok[row][s]
            if truth:
                out.append(
                    RowError(
                        row, s, sum(truth) / len(truth),
                        {"token": entry[f"token_{s}"], "token_raw": entry[f"token_{s}_raw"], "global": entry[f"token_{s}_global"]},
                        {"token": tuple(entry[f"ci_token_{s}"]), "token_raw": bootstrap_ci(raw_tok[row][s])},
                        len(truth),
                    )
                )
    return out


@dataclass
class SplitStats:
    """Errors of one method in one split over many leaderboard entries."""

    n: int
    mean_abs: float
    max_abs: float
    bias: float
    bias_se: float
    coverage: float  # share of entries whose printed interval contains the exact value (nan: none printed)
    by_objective: dict  # objective -> (bias, bias_se)


def _bias(errors: list[float]) -> tuple[float, float]:
    n = len(errors)
    if not n:
        return math.nan, math.nan
    mean = sum(errors) / n
    sd = math.sqrt(sum((e - mean) ** 2 for e in errors) / (n - 1)) if n > 1 else math.nan
    return mean, sd / math.sqrt(n)


def split_stats(errors: list[RowError], method: str, split: str, tol: float = 1e-9) -> SplitStats:
    chosen = [e for e in errors if e.split == split and _finite(e.values.get(method))]
    deltas = [e.values[method] - e.exact for e in chosen]
    hits = []
    for e in chosen:
        low, high = e.intervals.get(method, (math.nan, math.nan))
        if _finite(low) and _finite(high):
            hits.append(low - tol <= e.exact <= high + tol)
    by_objective = {}
    for objective in sorted({e.objective for e in chosen}):
        by_objective[objective] = _bias([e.values[method] - e.exact for e in chosen if e.objective == objective])
    bias, bias_se = _bias(deltas)
    return SplitStats(
        n=len(deltas),
        mean_abs=sum(abs(d) for d in deltas) / len(deltas) if deltas else math.nan,
        max_abs=max((abs(d) for d in deltas), default=math.nan),
        bias=bias,
        bias_se=bias_se,
        coverage=sum(hits) / len(hits) if hits else math.nan,
        by_objective=by_objective,
    )


@dataclass
class Agreement:
    """Budget invariance: the same runs at a larger budget against the default one."""

    n: int
    overlap: float  # share of entries whose two intervals overlap
    shift: float  # mean signed change of the headline (larger budget − default)
    shift_se: float
    mean_abs_shift: float


def budget_agreement(default: list[RowError], larger: list[RowError], method: str = "headline") -> Agreement:
    """Match entries by (run, row, split) among those that have `method`:
    `default` and `larger` are lists of (run id, RowError) pairs."""
    index = {(run, e.row, e.split): e for run, e in default if method in e.values}
    overlaps, shifts = [], []
    for run, e in larger:
        if method not in e.values:
            continue
        base = index.get((run, e.row, e.split))
        if base is None or not (_finite(base.values.get(method)) and _finite(e.values.get(method))):
            continue
        shifts.append(e.values[method] - base.values[method])
        (l0, h0), (l1, h1) = base.intervals.get(method, (math.nan,) * 2), e.intervals.get(method, (math.nan,) * 2)
        if all(_finite(v) for v in (l0, h0, l1, h1)):
            overlaps.append(max(l0, l1) <= min(h0, h1))
    shift, shift_se = _bias(shifts)
    return Agreement(
        n=len(shifts),
        overlap=sum(overlaps) / len(overlaps) if overlaps else math.nan,
        shift=shift,
        shift_se=shift_se,
        mean_abs_shift=sum(abs(s) for s in shifts) / len(shifts) if shifts else math.nan,
    )


# ----------------------------------------------------------------------------
# Where the remaining error comes from (needs the exact run's Q over the whole
# vocabulary: the exact estimator's token records hold every token as a candidate)


def _exact_on_candidates(record: dict, other: dict):
    """(π_C, Q_C exact, counts, rows, b_unit [P, C]) of one token record, with the
    exact run's Q at the record's candidates; None without them."""
    import torch

    units = record.get("b_cand")
    exact_q = dict(zip(other.get("candidates", []), other.get("q_hat", [])))
    if not units or any(k not in exact_q for k in record["candidates"]):
        return None
    rows = [row for row in units if row in record["cos"] and row not in REFERENCE_ROWS and _finite(record["cos"][row]) and _finite(other["cos"].get(row))]
    p = torch.tensor(record["candidate_pi"], dtype=torch.float64)
    q = torch.tensor([exact_q[k] for k in record["candidates"]], dtype=torch.float64)
    n = torch.tensor(record["counts"], dtype=torch.float64).clamp_min(0)
    b = torch.tensor([units[row] for row in rows], dtype=torch.float64).reshape(len(rows), len(p))
    return p, q, n, rows, b


@dataclass
class NodeNoise:
    """The true noise at the scored nodes of one split: with the exact Q_C and
    the counts n the estimator used, N = Σ_k ‖M e_k‖² Q_k (1 − Q_k) / n_k and
    E = ‖a*_C‖² (noise.noise_energy, noise.ideal_map)."""

    nodes: int  # nodes with at least one sampled candidate
    share: float  # mean of N / (E + N): the part of E‖â‖² that is noise
    dominated: float  # share of nodes with N ≥ E (no extrapolation recovers them)


def node_noise(tokens: list[dict], exact_tokens: list[dict]) -> dict[str, NodeNoise]:
    """Per split ("all", "correct", "incorrect"): NodeNoise over the sampled nodes."""
    import torch

    from gadiag_core.scoring.noise import ideal_map, noise_energy

    exact_by_key = {_key(r): r for r in exact_tokens}
    shares = defaultdict(list)
    for record in tokens:
        other = exact_by_key.get(_key(record))
        parts = _exact_on_candidates(record, other) if other else None
        if parts is None:
            continue
        p, q, n, _, _ = parts
        if not bool((n > 0).any()):
            continue
        var = torch.where(n > 0, q * (1 - q) / n.clamp_min(1), torch.zeros_like(q))
        energy = float((ideal_map(p, record.get("temperature", 1.0)) @ q).pow(2).sum())
        noise = float(noise_energy(p, var, record.get("temperature", 1.0)))
        if energy + noise > 0:
            for s in ("all", "correct" if record["correct"] else "incorrect"):
                shares[s].append((noise / (energy + noise), noise >= energy))
    return {
        s: NodeNoise(len(v), sum(x for x, _ in v) / len(v), sum(d for _, d in v) / len(v))
        for s, v in shares.items()
    }


def error_parts(tokens: list[dict], exact_tokens: list[dict]) -> dict[tuple, tuple[float, float, int]]:
    """The token mean's per-token error split into its two causes, averaged over
    (node, row) pairs per (split, objective):

        token − exact = (cos_C − exact) + (token − cos_C)
                           truncation        noise (what SIMEX leaves)

    cos_C = noise.candidate_cosine of the exact Q on the estimator's candidates
    (value-neutral rule), exact = the exact run's full-vocabulary cosine,
    token = the SIMEX value (alignment.corrected_token_cosines), what the
    token mean (`token_*`) averages.
    Returns {(split, objective): (truncation, noise, pairs)}.
    """
    from gadiag_core.scoring.alignment import corrected_token_cosines
    from gadiag_core.scoring.noise import candidate_cosine

    exact_by_key = {_key(r): r for r in exact_tokens}
    sums = defaultdict(lambda: [0.0, 0.0, 0])
    for record in tokens:
        other = exact_by_key.get(_key(record))
        parts = _exact_on_candidates(record, other) if other else None
        if parts is None or not parts[3]:
            continue
        p, q, _, rows, b = parts
        on_cands = candidate_cosine(q, p, b, record.get("temperature", 1.0)).tolist()
        simex, _ = corrected_token_cosines(record)
        for j, row in enumerate(rows):
            objective = row.partition("/")[2]
            for s in ("all", "correct" if record["correct"] else "incorrect"):
                acc = sums[(s, objective)]
                acc[0] += on_cands[j] - other["cos"][row]
                acc[1] += simex.get(row, record["cos"][row]) - on_cands[j]
                acc[2] += 1
    return {key: (t / n, e / n, n) for key, (t, e, n) in sums.items()}

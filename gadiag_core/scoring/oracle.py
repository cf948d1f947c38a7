"""The per-token oracle (DESIGN §6): does the best teacher × objective change
from one token to the next, and how much would picking it per token gain?

At each scored node every row r (a teacher × objective) has a cosine against
each independent half of the ideal estimate, c0[n, r] = cos(â*_half0, b_r) and
c1[n, r] = cos(â*_half1, b_r). Picking the best row per token on the same
estimate it is scored on is biased upward: the pick follows the noise. The
split-half (cross-fitted) oracle picks on one half and scores on the other,

    oracle[n] = ½ (c1[n, argmax_r c0[n, r]] + c0[n, argmax_r c1[n, r]]),

whose expectation is the true value of a per-token choice made from a noisy
estimate (the halves are independent given the rollout). The best single row
is chosen the same way over the whole run (on the mean of one half, scored on
the other), so headroom = mean oracle − best single row compares like with
like: both are cosines against a half estimate, both selected out of sample.
The same-half oracle ½(max_r c0 + max_r c1) is reported beside it to show the
bias the cross-fit removes.

Missing values (NaN: a teacher skipped on a rollout, or a zero vector) never
win a pick; a node whose halves are all NaN is left out; the single-row
candidates are the rows defined at every kept node.

Everything here is a pure function on tensors, except `oracle_summary`, which
turns token records (tokens.jsonl) into the tensors and the summary entry.
"""

from __future__ import annotations

import math
from collections import Counter

import torch


# ----------------------------------------------------------------------------
# Pure functions on cosine matrices


def pick(cos: torch.Tensor) -> torch.Tensor:
    """Per node, the index of the best row; NaN never wins.

    cos: [N, R] cosines (NaN = row undefined at that node)
    returns [N] long (an all-NaN node gets 0; drop it with `usable_nodes`)
    """
    return torch.nan_to_num(cos.double(), nan=-math.inf).argmax(dim=-1)


def usable_nodes(c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """[N] bool: nodes where both halves score at least one row."""
    return torch.isfinite(c0).any(dim=-1) & torch.isfinite(c1).any(dim=-1)


def _take(cos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cos[n, index[n]] for each n, as float64 ([N, R], [N] -> [N])."""
    return cos.double().gather(1, index[:, None]).squeeze(1)


def crossfit_oracle(c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """Split-half oracle value per node:
    ½ (c1[n, argmax c0[n]] + c0[n, argmax c1[n]]).  [N, R], [N, R] -> [N] float64.
    A pick whose other half is NaN scores 0 (the row pushes nothing measurable)."""
    left = torch.nan_to_num(_take(c1, pick(c0)), nan=0.0)
    right = torch.nan_to_num(_take(c0, pick(c1)), nan=0.0)
    return 0.5 * (left + right)


def same_half_oracle(c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """The biased oracle: pick and score on the same half, averaged over the halves:
    ½ (max_r c0[n, r] + max_r c1[n, r]).  [N, R], [N, R] -> [N] float64."""
    return 0.5 * (_take(c0, pick(c0)) + _take(c1, pick(c1)))


def single_candidates(c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """[R] bool: rows defined (finite) at every node in both halves."""
    return torch.isfinite(c0).all(dim=0) & torch.isfinite(c1).all(dim=0)


def crossfit_single(sum0: torch.Tensor, sum1: torch.Tensor, count: torch.Tensor, candidates: torch.Tensor):
    """The best single row chosen on one half's mean and scored on the other's.

    sum0, sum1: [..., R] per-row sums of c0 and c1 over nodes (a leading batch
                dimension for bootstrap draws is allowed)
    count:      [...] number of nodes summed
    candidates: [R] bool, the rows allowed
    returns     (value [...] = ½ (mean1[r0] + mean0[r1]), r0 [...], r1 [...])
                with r_h = argmax over candidates of mean_h
    """
    mask = torch.where(candidates, 0.0, -math.inf).to(sum0.dtype)
    r0 = (sum0 + mask).argmax(dim=-1)
    r1 = (sum1 + mask).argmax(dim=-1)
    value = 0.5 * (sum1.gather(-1, r0[..., None]).squeeze(-1) + sum0.gather(-1, r1[..., None]).squeeze(-1)) / count
    return value, r0, r1


def switch_rate(winners: torch.Tensor, sequence: torch.Tensor) -> tuple[int, int]:
    """(switches, consecutive pairs): how often the winning row changes between
    consecutive scored nodes of the same rollout.

    winners:  [N] row index per node, in node order within each rollout
    sequence: [N] rollout id per node (nodes of a rollout are contiguous)
    """
    if len(winners) < 2:
        return 0, 0
    same_rollout = sequence[1:] == sequence[:-1]
    changed = winners[1:] != winners[:-1]
    return int((changed & same_rollout).sum()), int(same_rollout.sum())


def bootstrap_headroom(
    group: torch.Tensor,
    oracle: torch.Tensor,
    same_half: torch.Tensor,
    c0: torch.Tensor,
    c1: torch.Tensor,
    candidates: torch.Tensor,
    draws: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the oracle, the best single row and the headroom
    (oracle − single, both split-half), resampling whole questions; the single
    row is re-chosen in every draw. (nan, nan) with fewer than 2 questions.

    group:     [N] question index per node (0 … Q−1)
    oracle, same_half: [N] per-node oracle values
    c0, c1:    [N, R] half cosines (NaN treated as 0 in sums; `candidates` rows have none)
    """
    nan = (float("nan"), float("nan"))
    Q = int(group.max()) + 1 if len(group) else 0
    if Q < 2:
        return {"oracle": nan, "single": nan, "headroom": nan, "same_half_headroom": nan}
    onehot = torch.zeros(Q, len(group), dtype=torch.float64)
    onehot[group, torch.arange(len(group))] = 1.0  # [Q, N]
    per_q = {
        "count": onehot.sum(1),
        "oracle": onehot @ oracle.double(),
        "same": onehot @ same_half.double(),
        "s0": onehot @ torch.nan_to_num(c0.double()),  # [Q, R]
        "s1": onehot @ torch.nan_to_num(c1.double()),
    }
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, Q, (draws, Q), generator=gen)
    weights = torch.zeros(draws, Q, dtype=torch.float64).scatter_add_(1, picks, torch.ones(draws, Q, dtype=torch.float64))
    count = weights @ per_q["count"]  # [D]
    oracle_mean = weights @ per_q["oracle"] / count
    same_mean = weights @ per_q["same"] / count
    single, _, _ = crossfit_single(weights @ per_q["s0"], weights @ per_q["s1"], count, candidates)
    # The same-half single row: best mean of a half, scored on that half.
    m0 = (weights @ per_q["s0"]) / count[:, None] + torch.where(candidates, 0.0, -math.inf)
    m1 = (weights @ per_q["s1"]) / count[:, None] + torch.where(candidates, 0.0, -math.inf)
    same_single = 0.5 * (m0.max(-1).values + m1.max(-1).values)

    def interval(values: torch.Tensor) -> tuple[float, float]:
        low = torch.quantile(values, (1 - level) / 2).item()
        high = torch.quantile(values, (1 + level) / 2).item()
        return low, high

    return {
        "oracle": interval(oracle_mean),
        "single": interval(single),
        "headroom": interval(oracle_mean - single),
        "same_half_headroom": interval(same_mean - same_single),
    }


# ----------------------------------------------------------------------------
# From token records to the summary entry


def half_matrices(token_records: list[dict]):
    """(rows, c0 [N, R], c1 [N, R], full [N, R], records kept) from token records
    that carry ``cos_half`` ({row: [c0, c1]}); rows in first-seen order, NaN
    where a record lacks a row."""
    rows: list[str] = []
    kept = [r for r in token_records if r.get("cos_half")]
    for record in kept:
        for row in record["cos_half"]:
            if row not in rows:
                rows.append(row)
    index = {row: i for i, row in enumerate(rows)}
    c0 = torch.full((len(kept), len(rows)), float("nan"), dtype=torch.float64)
    c1 = c0.clone()
    full = c0.clone()
    for n, record in enumerate(kept):
        for row, pair in record["cos_half"].items():
            a, b = pair
            c0[n, index[row]] = float("nan") if a is None else a
            c1[n, index[row]] = float("nan") if b is None else b
            value = record.get("cos", {}).get(row)
            full[n, index[row]] = float("nan") if value is None else value
    return rows, c0, c1, full, kept


def best_rows(token_records: list[dict], rows: list[str] | None = None) -> list[str | None]:
    """Per token record, the row with the highest cosine against the full ideal
    estimate among `rows` (default: every row of its ``cos_half``, i.e. the
    teacher × objective rows), or None when none is defined."""
    out = []
    for record in token_records:
        names = rows if rows is not None else list(record.get("cos_half", {}))
        values = [(record.get("cos", {}).get(name), name) for name in names]
        values = [(v, name) for v, name in values if v is not None and math.isfinite(v)]
        out.append(max(values)[1] if values else None)
    return out


def oracle_summary(token_records: list[dict], draws: int = 1000, seed: int = 0) -> dict | None:
    """The oracle entry of summary.json for the token records of a run (None
    when no record carries half-scored cosines: an older run).

    Per split (all / incorrect / correct nodes): the split-half oracle and the
    best single row (chosen and scored split-half) with bootstrap intervals over
    questions, their difference (headroom), the same-half oracle's headroom (the
    bias the split removes); for all nodes also the switch rate of the winning
    row between consecutive scored nodes (winner on the full estimate), how
    often each row wins, and the winner counts per question."""
    rows, c0, c1, full, kept = half_matrices(token_records)
    if not kept or not rows:
        return None
    keep = usable_nodes(c0, c1)
    records = [r for r, k in zip(kept, keep.tolist()) if k]
    c0, c1, full = c0[keep], c1[keep], full[keep]
    candidates = single_candidates(c0, c1)
    out = {"rows": rows, "single_candidates": [r for r, ok in zip(rows, candidates.tolist()) if ok]}
    if not records or not bool(candidates.any()):
        return {**out, "nodes": len(records)}

    for split, wanted in (("all", None), ("incorrect", False), ("correct", True)):
        mask = torch.tensor([wanted is None or bool(r["correct"]) == wanted for r in records])
        if not bool(mask.any()):
            out[split] = {"nodes": 0}
            continue
        s_records = [r for r, m in zip(records, mask.tolist()) if m]
        s0, s1 = c0[mask], c1[mask]
        questions = sorted({r["question"] for r in s_records})
        qindex = {q: i for i, q in enumerate(questions)}
        group = torch.tensor([qindex[r["question"]] for r in s_records])
        oracle = crossfit_oracle(s0, s1)
        same = same_half_oracle(s0, s1)
        n = torch.tensor(float(len(s_records)), dtype=torch.float64)
        single, r0, r1 = crossfit_single(torch.nan_to_num(s0).sum(0), torch.nan_to_num(s1).sum(0), n, candidates)
        # Row means of each half; rows that are not candidates never win.
        m0 = torch.where(candidates, torch.nan_to_num(s0).mean(0), -math.inf)
        m1 = torch.where(candidates, torch.nan_to_num(s1).mean(0), -math.inf)
        same_single = 0.5 * (m0.max() + m1.max())
        ci = bootstrap_headroom(group, oracle, same, s0, s1, candidates, draws=draws, seed=seed)
        # The row the whole split would pick: best mean over both halves.
        best = int((m0 + m1).argmax())
        out[split] = {
            "nodes": len(s_records),
            "questions": len(questions),
            "oracle": float(oracle.mean()),
            "oracle_ci": ci["oracle"],
            "best_single": rows[best],
            "best_single_halves": [rows[int(r0)], rows[int(r1)]],
            "single": float(single),
            "single_ci": ci["single"],
            "headroom": float(oracle.mean() - single),
            "headroom_ci": ci["headroom"],
            "same_half_oracle": float(same.mean()),
            "same_half_headroom": float(same.mean() - same_single),
            "same_half_headroom_ci": ci["same_half_headroom"],
        }

    winners = pick(full)
    sequence_keys = [(r["question"], r["rollout"]) for r in records]
    ids = {key: i for i, key in enumerate(dict.fromkeys(sequence_keys))}
    sequence = torch.tensor([ids[key] for key in sequence_keys])
    switches, pairs = switch_rate(winners, sequence)
    names = [rows[int(w)] for w in winners]
    per_question: dict[str, Counter] = {}
    for record, name in zip(records, names):
        per_question.setdefault(record["question"], Counter())[name] += 1
    out.update(
        {
            "nodes": len(records),
            "switches": switches,
            "pairs": pairs,
            "switch_rate": switches / pairs if pairs else float("nan"),
            "wins": dict(Counter(names).most_common()),
            "question_winners": {q: dict(c.most_common()) for q, c in per_question.items()},
            "question_top": dict(Counter(c.most_common(1)[0][0] for c in per_question.values()).most_common()),
        }
    )
    return out

"""Built-in ideal-gradient estimators: registration and options.

This module is what the ``gadiag`` entry point loads, at the start of every
command: it declares each estimator's options (gadiag_core.options) and
imports the estimator itself (and torch) only when one is built.

    targeted   value backbone + bisection, adaptive allocation, reuse (targeted.py)
    uniform    every screened node × candidate × M continuations (uniform.py)
    exact      enumeration, for tiny models (exact.py)

    common.py  what the sampling estimators share: candidates, screening,
               per-candidate statistics, the continuation pool, budgets
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gadiag_core import hookimpl
from gadiag_core.options import as_dict, option


@dataclass(frozen=True)
class ScreenedOptions:
    """Options every sampling estimator shares: screening, candidates, samples, budgets."""

    screen_epsilon: float = option(0.05, "skip nodes where 1 − π_max is below this (their ‖a*‖₁ ≤ 2(1 − π_max)/τ)", min=0.0, max=0.999)
    mass_threshold: float = option(0.9, "candidate tokens: the student's top tokens up to this mass …", min=0.0, max=1.0)
    max_candidates: int = option(4, "… at most this many (at least 2), plus each teacher's pick and the sampled token", min=2, max=4096)
    continuations: int = option(4, "continuations per candidate (two halves for the noise ceiling)", min=2, max=100_000)
    max_nodes: Optional[int] = option(None, "at most this many nodes scored per rollout (none: all eligible)", min=1)
    max_tokens: Optional[float] = option(None, "hard cap on sampled tokens per rollout (--budget-tokens)", min=0, min_exclusive=True)
    max_continuations: Optional[float] = option(None, "hard cap on continuations per rollout", min=0, min_exclusive=True)
    run_max_tokens: Optional[float] = option(None, "hard cap on sampled tokens in the run, shared evenly by its rollouts", min=0, min_exclusive=True)
    run_max_continuations: Optional[float] = option(None, "hard cap on continuations in the run, shared evenly", min=0, min_exclusive=True)


@dataclass(frozen=True)
class UniformOptions(ScreenedOptions):
    pass


@dataclass(frozen=True)
class TargetedOptions(ScreenedOptions):
    mass_threshold: float = option(0.95, "candidate tokens: the student's top tokens up to this mass …", min=0.0, max=1.0)
    max_candidates: int = option(5, "… at most this many (at least 2), plus each teacher's pick and the sampled token", min=2, max=4096)
    continuations: int = option(5, "free continuations per backbone point, and the mean samples per candidate the allocation may reach", min=2, max=100_000)
    max_nodes: Optional[int] = option(6, "at most this many nodes scored per rollout (none: all pivotal)", min=1)
    backbone_points: int = option(4, "value backbone: about this many intervals before bisection", min=1, max=10_000)
    delta: float = option(0.1, "bisect a segment whose end values differ by more than this …", min=0.0)
    z: float = option(1.5, "… and by more than z standard errors", min=0.0)
    target_error: float = option(0.25, "adaptive allocation stops at this relative error of the rollout's â", min=0.0)
    max_rounds: int = option(4, "at most this many allocation rounds", min=0, max=10_000)
    value_growth: float = option(2.0, "backbone points get at most this × continuations while undecided", min=1.0)
    reuse: bool = option(True, "reuse every continuation for every estimate it informs")
    reuse_selection: bool = option(False, "also reuse the backbone continuations that chose the targets (cheaper, biased)")
    allocation: str = option(
        "blind",
        "blind: spend where the noise of the rollout's â drops most, judged from π and costs only (never the rewards: Q̂ and its noise estimate stay unbiased); "
        "energy: the same with each candidate's observed variance; relative: energy with each node weighed by 1 / (its ‖a*‖² + noise)",
        choices=("blind", "energy", "relative"),
    )
    energy_floor: float = option(0.05, "allocation relative: added to a node's ‖a*‖² + noise, in units of its one-sample noise", min=0.0)
    direct_nodes: int = option(16, "rollouts with at most this many eligible nodes skip the backbone", min=0)
    free_candidates: int = option(
        16,
        "also take as candidates up to this many tokens whose Q is exact without sampling, the most probable first "
        "(EOS ids; every token at the length limit): a verifier call each, less truncation",
        min=0,
        max=100_000,
    )
    rollout_floor: int = option(
        12,
        "the allocation may reach continuations × max(the rollout's sampled candidates, this) samples (0: no floor): "
        "each rollout's cosine counts once in the leaderboard, and a rollout with few candidates (a short one) would get few samples",
        min=0,
        max=100_000,
    )


@dataclass(frozen=True)
class ExactOptions:
    screen_epsilon: float = option(0.0, "skip nodes where 1 − π_max is below this", min=0.0, max=0.999)
    max_nodes: Optional[int] = option(None, "at most this many nodes, the most uncertain (none: all)", min=1)
    max_vocab: int = option(16, "refuse models with a larger vocabulary", min=2)
    max_horizon: int = option(6, "refuse continuations longer than this", min=1)
    max_rows: int = option(3_000_000, "refuse enumerations with more rows than this", min=1)
    batch_rows: int = option(8192, "rows per forward chunk (memory only)", min=1)


def _targeted(options: TargetedOptions, run):
    from gadiag_plugins.estimation.targeted import TargetedEstimator

    # Run budgets are shared evenly over every rollout of the run (not the ones
    # left), so a resumed run spends exactly what an uninterrupted one does.
    return TargetedEstimator(**as_dict(options), rollouts_total=run.rollouts_total)


def _uniform(options: UniformOptions, run):
    from gadiag_plugins.estimation.uniform import UniformEstimator

    return UniformEstimator(**as_dict(options), rollouts_total=run.rollouts_total)


def _exact(options: ExactOptions, run):
    from gadiag_plugins.estimation.exact import ExactEstimator

    return ExactEstimator(**as_dict(options))


@hookimpl
def register_estimators(register):
    register("targeted", _targeted, "value backbone + bisection to pivotal nodes, adaptive π² Var allocation, continuation reuse, hard budgets", options=TargetedOptions)
    register("uniform", _uniform, "naive baseline: every screened node × every candidate × M forced-first continuations", options=UniformOptions)
    register("exact", _exact, "exact Q and a* by enumerating every continuation (tiny models only: ground truth)", options=ExactOptions)

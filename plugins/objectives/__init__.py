"""Built-in distillation objectives: registration and options.

Loaded at the start of every command; the objectives (forms.py, and torch)
are imported only when one is built. Options are set per objective in
harness.toml (``[objectives.jsd] beta = 0.9``) or on the command line
(``--set objectives.jsd.beta=0.9``).
"""

from __future__ import annotations

from dataclasses import dataclass

from gadiag_core import hookimpl
from gadiag_core.options import option


@dataclass(frozen=True)
class JSDOptions:
    beta: float = option(0.5, "weight of the teacher in the mixture m = βp + (1−β)π (0: forward KL, 1: reverse KL)", min=0.0, max=1.0)


@dataclass(frozen=True)
class TopKOptions:
    k: int = option(20, "the student's top-k tokens the KL is restricted to", min=1, max=10_000_000)


def _simple(class_name: str):
    def factory(options, run):
        from gadiag_plugins.objectives import forms

        return getattr(forms, class_name)()

    return factory


def _jsd(options: JSDOptions, run):
    from gadiag_plugins.objectives.forms import JSD

    return JSD(beta=options.beta)


def _topk(options: TopKOptions, run):
    from gadiag_plugins.objectives.forms import TopKReverseKL

    return TopKReverseKL(k=options.k)


def _uld(options, run):
    from gadiag_plugins.objectives.uld import ULD

    return ULD()


@hookimpl
def register_objectives(register):
    register("reverse_kl", _simple("ReverseKL"), "full-vocabulary reverse KL(π‖p): b = π(r − Σπr)/τ, r = log p − log π")
    register("sampled_token", _simple("SampledToken"), "sampled-token reverse KL, the OPD advantage form: b = A(e_y − π)/τ, A = log p_y − log π_y")
    register("forward_kl", _simple("ForwardKL"), "forward KL(p‖π): b = (p − π)/τ")
    register("jsd", _jsd, "generalized Jensen-Shannon divergence of GKD: β KL(p‖m) + (1−β) KL(π‖m)", options=JSDOptions)
    register("uld", _uld, "ULD sorted-probability distance Σ|sort(π) − sort(p)| (tokenizer-agnostic comparator, as TRL's GOLD uses)")
    register("topk_reverse_kl", _topk, "reverse KL on the student's top-k tokens, both renormalised there", options=TopKOptions)

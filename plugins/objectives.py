"""Built-in distillation objectives (DESIGN §1), as logit-space descent vectors.

Each class is a thin wrapper around a pure function of `gadiag_core.vectors`;
the math, its derivation and its shapes are documented there.
"""

from __future__ import annotations

import torch

from gadiag_core import hookimpl
from gadiag_core import vectors
from gadiag_core.interfaces import Objective


class ReverseKL(Objective):
    name = "reverse_kl"
    description = "full-vocabulary reverse KL(π‖p): b = π(r − Σπr)/τ, r = log p − log π"

    def vector(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        return vectors.reverse_kl_vector(student_logits, teacher_logprobs, temperature)


class SampledToken(Objective):
    name = "sampled_token"
    description = "sampled-token reverse KL, the OPD advantage form: b = A(e_y − π)/τ, A = log p_y − log π_y"

    def vector(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        return vectors.sampled_token_vector(student_logits, teacher_logprobs, sampled, temperature)


class ForwardKL(Objective):
    name = "forward_kl"
    description = "forward KL(p‖π): b = (p − π)/τ"

    def vector(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        return vectors.forward_kl_vector(student_logits, teacher_logprobs, temperature)


class JSD(Objective):
    name = "jsd"

    def __init__(self, beta: float = 0.5) -> None:
        beta = float(beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd: beta must lie in [0, 1], got {beta}")
        self.beta = beta
        self.description = f"generalized JSD (GKD), beta={beta}: β KL(p‖m) + (1−β) KL(π‖m), m = βp + (1−β)π"

    def vector(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        return vectors.jsd_vector(student_logits, teacher_logprobs, temperature, self.beta)


class TopKReverseKL(Objective):
    name = "topk_reverse_kl"

    def __init__(self, k: int = 20) -> None:
        k = int(k)
        if k < 1:
            raise ValueError(f"topk_reverse_kl: k must be at least 1, got {k}")
        self.k = k
        self.description = f"reverse KL on the student's top-{k} tokens, both renormalised there"

    def vector(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        return vectors.topk_reverse_kl_vector(student_logits, teacher_logprobs, temperature, self.k)


@hookimpl
def register_objectives(register):
    register("reverse_kl", ReverseKL, ReverseKL.description)
    register("sampled_token", SampledToken, SampledToken.description)
    register("forward_kl", ForwardKL, ForwardKL.description)
    register("jsd", JSD, "generalized Jensen-Shannon divergence of GKD (option beta, default 0.5)")
    register("topk_reverse_kl", TopKReverseKL, "reverse KL on the student's top-k tokens, renormalised (option k, default 20)")

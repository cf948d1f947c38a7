"""Built-in distillation objectives (DESIGN §1): each a descent vector b and its loss.

`vector` is the closed form (a pure function of gadiag_core.scoring.vectors,
where the math, its derivation and its shapes are documented); `loss` is the
loss L it is minus the gradient of, b = −∂L/∂z, written directly from the
objective's definition. `gadiag-harness selfcheck` checks one against the
other with autograd, so a new objective plugin that defines both is certified
the same way.

Shapes: student_logits z [N, V], teacher_logprobs log p [N, V], sampled [N]
(the student's tokens), temperature τ; `vector` returns [N, V], `loss` [N].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gadiag_core.interfaces import Objective
from gadiag_core.scoring import vectors


def _log_pi(z: torch.Tensor, tau: float) -> torch.Tensor:
    return F.log_softmax(z / tau, dim=-1)


def reverse_kl_loss(z, logp, tau):
    """KL(π‖p) = Σ π (log π − log p), per row."""
    lpi = _log_pi(z, tau)
    return (lpi.exp() * (lpi - logp)).sum(-1)


def forward_kl_loss(z, logp, tau):
    """KL(p‖π) = Σ p (log p − log π), per row."""
    return (logp.exp() * (logp - _log_pi(z, tau))).sum(-1)


class ReverseKL(Objective):
    name = "reverse_kl"
    description = "full-vocabulary reverse KL(π‖p): b = π(r − Σπr)/τ, r = log p − log π"

    def vector(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        return vectors.reverse_kl_vector(student_logits, teacher_logprobs, temperature)

    def loss(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        return reverse_kl_loss(student_logits, teacher_logprobs, temperature)


class SampledToken(Objective):
    name = "sampled_token"
    description = "sampled-token reverse KL, the OPD advantage form: b = A(e_y − π)/τ, A = log p_y − log π_y"
    reads = "sampled"  # only log p_y: a byte teacher gives its exact string probability

    def vector(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        return vectors.sampled_token_vector(student_logits, teacher_logprobs, sampled, temperature)

    def loss(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        """−A · log π_y with the advantage A held fixed (the policy-gradient surrogate)."""
        lpi = _log_pi(student_logits, temperature)
        y = sampled.long().unsqueeze(-1)
        advantage = (teacher_logprobs.gather(-1, y) - lpi.gather(-1, y)).detach()
        return -(advantage * lpi.gather(-1, y)).squeeze(-1)


class ForwardKL(Objective):
    name = "forward_kl"
    description = "forward KL(p‖π): b = (p − π)/τ"

    def vector(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        return vectors.forward_kl_vector(student_logits, teacher_logprobs, temperature)

    def loss(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        return forward_kl_loss(student_logits, teacher_logprobs, temperature)


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

    def loss(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        """β KL(p‖m) + (1−β) KL(π‖m), m = βp + (1−β)π; β = 0 is forward KL, 1 reverse KL."""
        z, logp, beta = student_logits, teacher_logprobs, self.beta
        if beta == 0.0:
            return forward_kl_loss(z, logp, temperature)
        if beta == 1.0:
            return reverse_kl_loss(z, logp, temperature)
        lpi = _log_pi(z, temperature)
        logm = torch.logsumexp(torch.stack([logp + math.log(beta), lpi + math.log1p(-beta)]), dim=0)
        kl_p_m = (logp.exp() * (logp - logm)).sum(-1)
        kl_pi_m = (lpi.exp() * (lpi - logm)).sum(-1)
        return beta * kl_p_m + (1 - beta) * kl_pi_m


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

    def loss(self, student_logits, teacher_logprobs, sampled, temperature) -> torch.Tensor:
        """KL(π_S‖p_S) on S = the student's top-k tokens (a fixed set), both renormalised on S."""
        z, logp = student_logits, teacher_logprobs
        if self.k >= z.shape[-1]:
            return reverse_kl_loss(z, logp, temperature)
        top = z.detach().topk(self.k, dim=-1).indices
        lpi_s = F.log_softmax(z.gather(-1, top) / temperature, dim=-1)
        lp_s = F.log_softmax(logp.gather(-1, top), dim=-1)
        return (lpi_s.exp() * (lpi_s - lp_s)).sum(-1)

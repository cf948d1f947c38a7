"""Objectives against autograd: each objective's closed-form logit vector b must
equal −∂L/∂z of its own `loss(student_logits, teacher_logprobs, sampled,
temperature) -> [N]`, and Jᵀb must equal −∇θL through the model's parameters
(DESIGN §1: "Each closed form must be checked against autograd").

An objective without a `loss()` method is reported as unchecked (not a failure).
The environment (gadiag_tasks.toy_env) is passed in: this package imports no plugin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

AUTOGRAD_TOL = 1e-4


def loss_of(objective) -> Optional[Callable]:
    """loss(z, logp, sampled, tau) -> [N] of an objective, or None if it has none."""
    method = getattr(objective, "loss", None)
    return method if callable(method) else None


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
    loss = loss_of(objective)
    if loss is None:
        return ObjectiveCheck(name, math.nan, math.nan, False, True, "no loss() method: unchecked")
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

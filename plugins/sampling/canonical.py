"""Draws that do not depend on batching: close draws redone batch-free.

A sampler's logits for one row come out of batched matmuls whose rounding
depends on the batch's shape and company (which rows, how many roots, which
prefixes were encoded together): on SmolLM2-135M a row's logits move by
4.5e-5 in the median and 1.1e-4 at most between the same 48 continuations
sampled together and one at a time (`python benchmarks/draw_stability.py`). A Gumbel-max draw
(draw.py) changes with that rounding only when its two best scores are
closer than the rounding of two logits. Before this module such flips made
6 of the default run's 24 rollouts differ between the sequential driver and
the scheduler: one flipped continuation changes the estimator's next
requests for its rollout, and then its records.

`CanonicalRedraw` closes the gap: a draw whose margin (best minus second best
score) is under `margin` is redone from logits computed for that row alone —
the model's own forward on the row's whole context (prefix and tokens so
far) at batch size 1 on one thread, a computation fixed by the row's tokens
— with the row's same noise. A draw the two computations could decide
differently has a gap far below `margin`, so it is decided by the batch-free
one: a row's tokens are a function of its request, whatever the batching,
the sampler (`prefix` or `batched`) or the driver. With margin 1e-3 about 4
draws in 10,000 are redone (a forward of one context each, 0.2-0.5 s for
SmolLM2 on one thread).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from gadiag_plugins.sampling.draw import draw
from gadiag_plugins.sampling.threads import torch_threads

# Nine times the largest logit rounding measured (1.1e-4), twenty times the
# median; 3.5 draws in 10,000 have a closer gap (draw_stability.py).
DEFAULT_MARGIN = 1e-3


def canonical_logits(model: torch.nn.Module, context: list[int]) -> torch.Tensor:
    """Next-token logits after `context` [V] float32: the model's forward at
    batch size 1, no cache, one thread (a fixed computation of the tokens)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(context)], dtype=torch.long, device=device)
    with torch_threads(1), torch.inference_mode():
        try:
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
        except TypeError:  # models without logits_to_keep
            out = model(input_ids=ids, use_cache=False)
    return out.logits[0, -1].float()


class CanonicalRedraw:
    """Redraws the draws of a batch that lie within `margin` of a CDF edge.

    count:   draws redone; changed: of them, how many the batched logits had
    drawn otherwise (each one a continuation that would have differed);
    seconds: time spent on the batch-free forwards."""

    def __init__(self, margin: float = DEFAULT_MARGIN):
        if margin < 0:
            raise ValueError("redraw margin must be >= 0")
        self.margin = float(margin)
        self.count = 0
        self.changed = 0
        self.seconds = 0.0

    def settle(
        self,
        model: torch.nn.Module,
        ids: torch.Tensor,
        margins: torch.Tensor,
        temperature: float,
        noise: torch.Tensor | None,
        context_of: Callable[[int], list[int]],
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids [B] drawn (`draw.draw`) from batched logits with `margins` [B]
        and Gumbel `noise` [B, V]; context_of(b) -> the row's prefix and
        tokens so far; skip [B] bool marks rows whose draw is not used (forced
        tokens, finished rows). Returns ids with every close draw replaced by
        the draw from the batch-free logits with the row's same noise."""
        if self.margin <= 0 or temperature == 0:
            return ids
        close = margins < self.margin
        if skip is not None:
            close &= ~skip.cpu()
        rows = close.nonzero().flatten().tolist()
        if not rows:
            return ids
        start = time.perf_counter()
        ids = ids.clone()
        for b in rows:
            logits = canonical_logits(model, context_of(b))
            token = int(draw(logits.unsqueeze(0), temperature, noise[b : b + 1])[0][0])
            self.changed += int(token != int(ids[b]))
            ids[b] = token
        self.count += len(rows)
        self.seconds += time.perf_counter() - start
        return ids

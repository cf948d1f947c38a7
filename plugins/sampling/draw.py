"""Drawing tokens: Gumbel-max with per-row noise streams (every local sampler uses it).

A row's token is argmax(logits / temperature + g), g a vector of standard
Gumbel noise, one value per vocabulary entry, taken from the row's own
generator (seeded with its request's seed, `width` uniforms per step). That
is an exact draw from softmax(logits / temperature) (the Gumbel-max trick),
plain temperature sampling with no top-k/top-p (DESIGN §1); temperature 0
means greedy (used by tests).

Why Gumbel-max and not the inverse CDF: a sampler's logits carry float
rounding that depends on the batch (which rows were decoded together),
4.5e-5 in the median row and 1.1e-4 at most on SmolLM2-135M
(`python benchmarks/draw_stability.py`, one thread). The inverse CDF compares
the row's uniform with a cumulative sum over the whole vocabulary, which that
rounding shifts by up to 1.8e-5: a draw that lands on a rare token (an
interval narrower than the shift) flips, and 2.1% of draws lie within 1e-4
of an edge. Gumbel-max decides between the two best scores only, so a draw
can flip only when their gap is under the rounding of two logits: 0 of
28,360 draws flipped, and 0.035% of gaps are under 1e-3 (the same script).
`draw` returns each draw's gap; the few close ones are redone batch-free
(canonical.py).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch


# Rows split over two Python threads from this many on. torch's uniform_
# draws one value at a time and releases the GIL, so two threads fill two
# rows at once; but right after a step's matmuls torch's own worker thread
# spins on the other core for several ms, and a helper thread waits it out.
# `python benchmarks/noise.py` (SmolLM2's 49,152 entries, 2 threads, two
# runs): 0.87-1.07x up to 32 rows, 48 either way (0.91x, 1.67x), 1.33-1.78x
# from 64 to 128.
SPLIT_NOISE_ROWS = 64
_noise_helper: Optional[tuple[int, ThreadPoolExecutor]] = None  # (process id, one-thread pool)


def gumbel_noise(generators: list[torch.Generator], width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Standard Gumbel noise [B, width] float32 on the CPU: row b is
    -log(-log(u)) of the next `width` uniforms of generators[b]. `out` (at
    least [B, width]) is filled instead of a new tensor.

    With torch on two threads or more and at least SPLIT_NOISE_ROWS rows, a
    helper thread fills the second half of the rows while this one fills the
    first: each generator is still read by one thread, in order (a generator
    listed twice keeps all its rows on this thread), so the values are the
    same either way (`python benchmarks/noise.py` times both)."""
    global _noise_helper
    noise = torch.empty((len(generators), width)) if out is None else out[: len(generators), :width]
    rows = len(generators)
    if rows >= SPLIT_NOISE_ROWS and torch.get_num_threads() >= 2 and len({id(g) for g in generators}) == rows:
        if _noise_helper is None or _noise_helper[0] != os.getpid():  # a forked child has no helper thread
            _noise_helper = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="gadiag-noise"))
        half, inference = rows // 2, torch.is_inference_mode_enabled()
        helper = _noise_helper[1].submit(_fill_uniform, noise, generators, half, rows, inference)
        try:
            _fill_uniform(noise, generators, 0, half, inference)
        finally:
            helper.result()  # never leave the helper writing after we return
    else:
        _fill_uniform(noise, generators, 0, rows, torch.is_inference_mode_enabled())
    # u = 0 gives -inf (never drawn); u < 1 always, so scores stay finite above.
    return noise.log_().neg_().log_().neg_()


def _fill_uniform(noise: torch.Tensor, generators: list[torch.Generator], start: int, stop: int, inference: bool) -> None:
    """noise[b] <- the next uniforms of generators[b], for b in start … stop − 1,
    in the caller's inference mode (`inference`: a helper thread has its own,
    and must match to write an inference tensor)."""
    with torch.inference_mode(inference):
        for b in range(start, stop):
            noise[b].uniform_(generator=generators[b])


def draw(logits: torch.Tensor, temperature: float, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its margin.

    logits [B, V] (any float dtype), noise [B, V] Gumbel (`gumbel_noise`;
    unused and may be None at temperature 0) -> ids [B] long, margins [B]
    float64: the best score minus the second best, in the units of
    logits / temperature (inf at temperature 0, or for a one-token vocabulary).

    score_i = logits_i / temperature + noise_i; id = argmax_i score_i."""
    if temperature == 0:
        ids = logits.argmax(-1)
        return ids, torch.full(ids.shape, float("inf"), dtype=torch.float64)
    z = logits.float()
    scores = (z if temperature == 1 else z / temperature) + noise.to(z.device)
    if scores.shape[-1] < 2:
        return scores.argmax(-1), torch.full(scores.shape[:1], float("inf"), dtype=torch.float64)
    top = scores.topk(2, dim=-1)
    return top.indices[:, 0], (top.values[:, 0] - top.values[:, 1]).double().cpu()

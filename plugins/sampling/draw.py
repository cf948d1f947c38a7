"""Drawing tokens: inverse-CDF sampling with per-row uniforms (every sampler uses it).

Each row draws from its own seeded generator, the same uniforms in the same
order whatever the batch, so a row's tokens depend on its request alone, not
on which rows share its batch or which sampler ran it (up to float rounding of
the batched matmuls, which moves a token only when its uniform falls within
~1e-7 of a CDF boundary). Plain temperature sampling, no top-k/top-p
(DESIGN §1); temperature 0 means greedy (used by tests).
"""

from __future__ import annotations

import torch


def _draw(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row. logits [B, V], uniforms [B] in [0, 1) -> ids [B].

    Inverse CDF of softmax(logits / temperature): the first index whose
    cumulative probability exceeds u."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    cdf = probs.cumsum(-1)
    cdf[:, -1] = 1.0  # guard against rounding leaving the last bin short of 1
    ids = torch.searchsorted(cdf, uniforms.double().unsqueeze(-1)).squeeze(-1)
    return ids.clamp(max=logits.shape[-1] - 1)


_BLOCK = 256


def _draw_fast(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> torch.Tensor:
    """`_draw` without a full-vocabulary float64 softmax and cumsum.

    The same inverse CDF, in two levels: a float32 softmax, its sums over
    blocks of 256 tokens, a float64 cumsum over the blocks to find the block
    where each row's u falls, then a float64 cumsum inside that block alone
    for the token. Probabilities carry float32 rounding (~1e-6 relative),
    far below any Monte-Carlo noise. Row by row: a row's token does not depend
    on the other rows."""
    if temperature == 0:
        return logits.argmax(-1)
    rows, width = logits.shape
    z = logits.float()
    probs = torch.softmax(z if temperature == 1 else z / temperature, dim=-1)
    blocks = -(-width // _BLOCK)
    if blocks * _BLOCK != width:
        probs = torch.nn.functional.pad(probs, (0, blocks * _BLOCK - width))
    probs = probs.view(rows, blocks, _BLOCK)
    mass = probs.sum(-1).double()  # [rows, blocks]
    block_cdf = mass.cumsum(-1)
    target = uniforms.to(torch.float64).unsqueeze(-1) * block_cdf[:, -1:]  # [rows, 1]
    block = torch.searchsorted(block_cdf, target).clamp_(max=blocks - 1)  # [rows, 1]
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    inside = probs.gather(1, block.unsqueeze(-1).expand(rows, 1, _BLOCK)).squeeze(1).double().cumsum_(-1)
    share = mass.gather(-1, block)
    # Where u falls inside the block, as a share of the block's own cumsum.
    within = torch.where(share > 0, (target - before) / share.clamp(min=1e-300), torch.zeros_like(target)) * inside[:, -1:]
    offset = torch.searchsorted(inside, within).clamp_(max=_BLOCK - 1)
    return (block * _BLOCK + offset).squeeze(-1).clamp_(max=width - 1)

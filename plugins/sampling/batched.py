"""The `batched` sampler: the simple reference.

Requests are grouped into batches, left-padded, encoded in one forward pass
and decoded one token per step for the whole batch through the model's own
`forward` with its KV cache. Tokens are drawn as in draw.py, so results equal
the `prefix` sampler's up to float rounding.
"""

from __future__ import annotations

import torch

from gadiag_core.interfaces import CausalLM, ContinuationRequest, RolloutSampler
from gadiag_plugins.sampling.draw import _draw
from gadiag_plugins.students.hf import cache_keyword, keeps_logits, returned_cache


class BatchedSampler(RolloutSampler):
    name = "batched"
    description = "batched KV-cache temperature sampling, per-request seeds"

    def __init__(self, batch_size: int = 32):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size
        # Counts every generated position, forced ones included (budget accounting).
        self.tokens_generated = 0

    @torch.no_grad()
    def sample(self, lm: CausalLM, requests: list[ContinuationRequest], temperature: float) -> list[list[int]]:
        results: list[list[int]] = [[] for _ in requests]
        # Similar prefix lengths together: less padding. Row results do not
        # depend on the grouping (per-row generators).
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prefix_ids))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            outs = self._sample_batch(lm, [requests[i] for i in chunk], temperature)
            for i, out in zip(chunk, outs):
                results[i] = out
        return results

    def _sample_batch(self, lm: CausalLM, requests: list[ContinuationRequest], temperature: float) -> list[list[int]]:
        model = lm.model
        device = next(model.parameters()).device
        eos = torch.tensor(sorted(set(lm.eos_token_ids)), device=device)
        pad_id = int(eos[0])
        batch = len(requests)
        width = max(len(r.prefix_ids) for r in requests)

        # Left-padded prompt block [B, width] and its attention mask.
        input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((batch, width), dtype=torch.long, device=device)
        for row, request in enumerate(requests):
            n = len(request.prefix_ids)
            input_ids[row, width - n :] = torch.tensor(request.prefix_ids, dtype=torch.long)
            mask[row, width - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        generators = [torch.Generator().manual_seed(r.seed) for r in requests]
        limits = torch.tensor([r.max_new_tokens for r in requests], device=device)
        forced = [r.forced_first for r in requests]
        done = limits <= 0
        outputs: list[list[int]] = [[] for _ in requests]

        # Only the last position's logits are sampled from: asking for them alone
        # spares the output head on every prefix position ([B, width, V] floats:
        # 40 GB for 128 prefixes of 300 tokens at a 262,144-token vocabulary).
        keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
        cache, logits = returned_cache(out), out.logits[:, -1, :].float()
        cache_kw = cache_keyword(model)
        next_pos = positions[:, -1] + 1
        step = 0
        while not bool(done.all()):
            uniforms = torch.stack([torch.rand((), generator=g) for g in generators])
            tokens = _draw(logits, temperature, uniforms)
            if step == 0:
                for row, token in enumerate(forced):
                    if token is not None:
                        tokens[row] = token
            tokens = torch.where(done, torch.full_like(tokens, pad_id), tokens)
            for row in (~done).nonzero().flatten().tolist():
                outputs[row].append(int(tokens[row]))
            self.tokens_generated += int((~done).sum())
            step += 1
            done = done | torch.isin(tokens, eos) | (step >= limits)
            if bool(done.all()):
                break
            mask = torch.cat([mask, (~done).long().unsqueeze(-1)], dim=-1)
            out = model(
                input_ids=tokens.unsqueeze(-1),
                attention_mask=mask,
                position_ids=next_pos.unsqueeze(-1),
                use_cache=True,
                **{cache_kw: cache},
            )
            cache, logits = returned_cache(out), out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        return outputs

"""The `batched` sampler: the simple reference, for any Hugging Face causal LM.

Requests are taken in batches (sorted, so that similar prefixes sit
together), encoded, then decoded one token per step for the whole batch
through the model's own `forward` with its KV cache. Tokens are drawn as in
draw.py, so results equal the `prefix` sampler's up to float rounding.

Shared prefixes are encoded once (`share_prefix`, on by default). The
requests of a rollout's nodes are continuations of prompt + generated[:t], so
many of a batch's prefixes start with the same long prompt. A batch sorted
by prefix is split into runs of neighbours sharing a start of at least
MIN_SHARED tokens, the split that encodes the fewest tokens (share_groups);
a run's shared part is its common start less the last token of its shortest
prefix (every row keeps at least one token of its own, whose logits it
samples first). Per run: one batch-1 forward of the shared part gives its
KV cache, repeated over the run's rows; one forward of each row's own tail
(left-padded: [shared | padding | tail]) with position ids continuing from
the shared length gives the first logits. Rows in no run are encoded
together the plain way (left-padded whole prefixes). The runs' caches are
then left-padded to one length and stacked, and the whole batch is decoded
together as before.

Padding in the middle moves later tokens' indices, and Hugging Face sliding
window layers (Gemma 3) mask by index, not position: a layout whose padded
length (prefix + new tokens) exceeds the model's sliding window could then
drop or keep keys the unshared encoding would not. Such a run shares only
among prefixes of equal length (no padding in the middle), and such batches
are decoded run by run. Under the window (Gemma 3 270M: 512 tokens) the
result equals the unshared encoding's up to float rounding.
"""

from __future__ import annotations

import torch

from gadiag_core.interfaces import CausalLM, ContinuationRequest, RolloutSampler
from gadiag_plugins.sampling.canonical import DEFAULT_MARGIN, CanonicalRedraw
from gadiag_plugins.sampling.draw import draw, gumbel_noise
from gadiag_plugins.students.hf import cache_keyword, keeps_logits, returned_cache

# Fewest tokens worth a group of their own: a shared part shorter than this
# saves less than the extra batch-1 forward pass (and the padding) costs.
MIN_SHARED = 16


def _common(a, b, limit: int) -> int:
    """Length of the common start of a and b, at most `limit`."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _sliding_window(model):
    """The model's sliding attention window in tokens, or None."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


def share_groups(prefixes: list, min_shared: int = MIN_SHARED) -> list[tuple[list[int], int]]:
    """Groups of `prefixes` (sequences of ids, sorted so that alike ones are
    neighbours) that share a start: (row indices, shared length) pairs, the
    shared length below every member's length and at least `min_shared`.
    Rows in no group come last, together, with shared length 0.

    The split into runs of neighbours is the one encoding the fewest tokens:
    a group costs its shared part once, each row its tail padded to the
    group's longest, plus `min_shared` for the extra forward pass; a row
    alone costs its whole prefix. So one instruction before several
    questions gives a group per question when the questions are long enough
    to be worth it, one group for all of them otherwise."""
    n = len(prefixes)
    lengths = [len(ids) for ids in prefixes]
    neighbours = [_common(prefixes[i], prefixes[i + 1], lengths[i]) for i in range(n - 1)]
    best = [0] + [None] * n  # best[j]: least cost of rows [0, j)
    choice = [None] * (n + 1)  # choice[j]: (start, shared) of the last run
    for j in range(1, n + 1):
        best[j], choice[j] = best[j - 1] + lengths[j - 1], (j - 1, 0)
        common, shortest, longest = lengths[j - 1], lengths[j - 1], lengths[j - 1]
        for i in range(j - 2, -1, -1):
            common = min(common, neighbours[i])
            shortest, longest = min(shortest, lengths[i]), max(longest, lengths[i])
            shared = min(common, shortest - 1)
            if shared < min_shared:
                break  # a longer run shares no more
            cost = best[i] + min_shared + shared + (j - i) * (longest - shared)
            if cost < best[j]:
                best[j], choice[j] = cost, (i, shared)
    groups, alone, j = [], [], n
    while j > 0:
        i, shared = choice[j]
        if shared:
            groups.append((list(range(i, j)), shared))
        else:
            alone.append(i)
        j = i
    groups.reverse()
    return groups + ([(sorted(alone), 0)] if alone else [])


class BatchedSampler(RolloutSampler):
    name = "batched"
    description = "batched KV-cache temperature sampling, per-request seeds"

    def __init__(self, batch_size: int = 32, share_prefix: bool = True, drop_done: bool = True, redraw_margin: float = DEFAULT_MARGIN):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size
        # Near-edge draws redone batch-free: tokens independent of batching (canonical.py).
        self.redraw = CanonicalRedraw(redraw_margin)
        self.share_prefix = bool(share_prefix)
        # Finished rows leave the decoding batch (off: they stay, masked, as
        # before; for tests and benchmarks/batched_sharing.py).
        self.drop_done = bool(drop_done)
        # Counts every generated position, forced ones included (budget accounting).
        self.tokens_generated = 0
        # Prefix tokens through the model (shared parts once, padding included).
        self.prefix_tokens_encoded = 0

    @torch.no_grad()
    def sample(self, lm: CausalLM, requests: list[ContinuationRequest], temperature: float) -> list[list[int]]:
        results: list[list[int]] = [[] for _ in requests]
        # Alike prefixes together (shared starts; without sharing, similar
        # lengths: less padding). Row results do not depend on the grouping
        # (per-row generators).
        if self.share_prefix:
            order = sorted(range(len(requests)), key=lambda i: tuple(requests[i].prefix_ids))
        else:
            order = sorted(range(len(requests)), key=lambda i: len(requests[i].prefix_ids))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            outs = self._sample_batch(lm, [requests[i] for i in chunk], temperature)
            for i, out in zip(chunk, outs):
                results[i] = out
        return results

    def _sample_batch(self, lm: CausalLM, requests: list[ContinuationRequest], temperature: float) -> list[list[int]]:
        outputs: list[list[int]] = [[] for _ in requests]
        for rows, cache, mask, logits in self._encode(lm, requests):
            outs = self._decode(lm, [requests[r] for r in rows], cache, mask, logits, temperature)
            for r, out in zip(rows, outs):
                outputs[r] = out
        return outputs

    # ------------------------------------------------------------------
    # Encoding

    def _encode(self, lm: CausalLM, requests: list[ContinuationRequest]):
        """The requests' prefixes through the model: a list of (row indices,
        KV cache, attention mask, last-position logits [rows, V]) parts, each
        decoded as one batch (one part when the groups could be stacked)."""
        if not self.share_prefix:
            return [(list(range(len(requests))), *self._encode_group(lm, requests, 0))]
        window = _sliding_window(lm.model)
        most_new = max(r.max_new_tokens for r in requests)
        groups = []
        for rows, shared in share_groups([r.prefix_ids for r in requests]):
            width = max(len(requests[r].prefix_ids) for r in rows)
            if shared and window is not None and width + most_new > window:
                # Padding in the middle could move the window: share only among
                # prefixes of one length.
                by_length: dict[int, list[int]] = {}
                for r in rows:
                    by_length.setdefault(len(requests[r].prefix_ids), []).append(r)
                for same in by_length.values():
                    for sub, s in share_groups([requests[r].prefix_ids for r in same]):
                        groups.append(([same[i] for i in sub], s))
            else:
                groups.append((rows, shared))
        try:
            parts = [(rows, *self._encode_group(lm, [requests[r] for r in rows], shared)) for rows, shared in groups]
        except _CannotShare:  # a cache that cannot be repeated over rows: every prefix whole
            return [(list(range(len(requests))), *self._encode_group(lm, requests, 0))]
        if len(parts) > 1:
            merged = _stack(parts, window, most_new)
            if merged is not None:
                return [merged]
        return parts

    def _encode_group(self, lm: CausalLM, requests: list[ContinuationRequest], shared: int):
        """(cache, mask, logits) of requests whose prefixes share their first
        `shared` tokens (0: none; each keeps at least one token of its own)."""
        model = lm.model
        device = next(model.parameters()).device
        pad_id = min(lm.eos_token_ids)
        batch = len(requests)
        keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
        cache_kw = cache_keyword(model)
        extra = {}
        if shared:
            ids = torch.tensor([requests[0].prefix_ids[:shared]], dtype=torch.long, device=device)
            cache = returned_cache(model(input_ids=ids, use_cache=True, **keep))
            if not hasattr(cache, "batch_repeat_interleave"):
                raise _CannotShare
            cache.batch_repeat_interleave(batch)
            extra = {cache_kw: cache}
            self.prefix_tokens_encoded += shared
        width = max(len(r.prefix_ids) for r in requests) - shared

        # Left-padded tails [B, width] and the mask over [shared | tails].
        input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
        tail_mask = torch.zeros((batch, width), dtype=torch.long, device=device)
        for row, request in enumerate(requests):
            n = len(request.prefix_ids) - shared
            input_ids[row, width - n :] = torch.tensor(request.prefix_ids[shared:], dtype=torch.long)
            tail_mask[row, width - n :] = 1
        positions = shared + (tail_mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones((batch, shared), dtype=torch.long, device=device), tail_mask], dim=-1)
        self.prefix_tokens_encoded += batch * width

        # Only the last position's logits are sampled from: asking for them alone
        # spares the output head on every prefix position ([B, width, V] floats:
        # 40 GB for 128 prefixes of 300 tokens at a 262,144-token vocabulary).
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep, **extra)
        return returned_cache(out), mask, out.logits[:, -1, :].float()

    # ------------------------------------------------------------------
    # Decoding

    def _decode(self, lm: CausalLM, requests, cache, mask, logits, temperature: float) -> list[list[int]]:
        """Draw each request's tokens, one step for the whole batch at a time.
        Rows that are done leave the batch (and its KV cache): decoding costs
        the live rows alone. A row's draws come from its own generator, so
        which rows share its batch does not change them."""
        model = lm.model
        device = logits.device
        eos = torch.tensor(sorted(set(lm.eos_token_ids)), device=device)
        pad_id = int(eos[0])
        generators = [torch.Generator().manual_seed(r.seed) for r in requests]
        limits = torch.tensor([r.max_new_tokens for r in requests], device=device)
        forced = [r.forced_first for r in requests]
        outputs: list[list[int]] = [[] for _ in requests]
        cache_kw = cache_keyword(model)
        # Caches that cannot drop rows keep them, masked, as padding.
        shrink = self.drop_done and hasattr(cache, "batch_select_indices")
        rows = torch.arange(len(requests), device=device)  # the request of each batch row
        done = limits <= 0
        # A row's next position: its own tokens so far (the mask's ones).
        next_pos = mask.sum(-1)
        tokens = None
        step = 0
        while True:
            if shrink and bool(done.any()):
                keep = (~done).nonzero().flatten()
                if len(keep) == 0:
                    break
                cache.batch_select_indices(keep)
                mask, next_pos, logits, rows, done = mask[keep], next_pos[keep], logits[keep], rows[keep], done[keep]
                if tokens is not None:
                    tokens = tokens[keep]
            if bool(done.all()):
                break
            if tokens is not None:
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
            ids = rows.tolist()
            noise = None
            if temperature > 0:  # rows already done draw nothing: their streams stay put
                live = (~done).tolist()
                noise = torch.zeros((len(ids), logits.shape[-1]))
                noise[torch.tensor(live, dtype=torch.bool)] = gumbel_noise([generators[i] for i, on in zip(ids, live) if on], logits.shape[-1])
            tokens, margins = draw(logits, temperature, noise)
            skip = done | torch.tensor([step == 0 and forced[i] is not None for i in ids], device=device)
            tokens = self.redraw.settle(model, tokens, margins, temperature, noise,
                                        lambda b: list(requests[ids[b]].prefix_ids) + outputs[ids[b]], skip=skip)
            if step == 0:
                for b, i in enumerate(ids):
                    if forced[i] is not None:
                        tokens[b] = forced[i]
            tokens = torch.where(done, torch.full_like(tokens, pad_id), tokens)
            for b in (~done).nonzero().flatten().tolist():
                outputs[ids[b]].append(int(tokens[b]))
            self.tokens_generated += int((~done).sum())
            step += 1
            done = done | torch.isin(tokens, eos) | (step >= limits[rows])
        return outputs


class _CannotShare(Exception):
    pass


def _stack(parts, window, most_new):
    """The parts' caches left-padded to one length and stacked into one batch
    (masked zeros in front, as left padding): (rows, cache, mask, logits), or
    None where the caches are not plain per-layer key/value tensors or padding
    could move a sliding window."""
    width = max(mask.shape[1] for _, _, mask, _ in parts)
    if window is not None and width + most_new > window:
        return None
    caches = [cache for _, cache, _, _ in parts]
    try:
        layers = [cache.layers for cache in caches]
        for cache_layers, (_, _, mask, _) in zip(layers, parts):
            for layer in cache_layers:
                if type(layer).__name__ not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
                    return None
                if layer.keys.shape[-2] != mask.shape[1] or getattr(layer, "cumulative_length", mask.shape[1]) != mask.shape[1]:
                    return None
        if len({len(cache_layers) for cache_layers in layers}) != 1:
            return None
    except AttributeError:
        return None

    def padded(t, n):  # [B, H, T, D] -> [B, H, n, D], zeros in front
        return torch.nn.functional.pad(t, (0, 0, n - t.shape[-2], 0))

    base = caches[0]
    for i, layer in enumerate(base.layers):
        layer.keys = torch.cat([padded(c.layers[i].keys, width) for c in caches])
        layer.values = torch.cat([padded(c.layers[i].values, width) for c in caches])
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = width
    mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for _, _, m, _ in parts])
    rows = [r for part_rows, _, _, _ in parts for r in part_rows]
    logits = torch.cat([lg for _, _, _, lg in parts])
    return rows, base, mask, logits

"""The `prefix` sampler (the default): each shared prefix encoded once, the
continuations decoded together in one running batch, rows stop independently.

Planning (which rows share which cached prefix: `_roots`, `_common_start`),
prefix encoding and the decoding step live here; the running batch (rows
joining and leaving, `_Layout`, the prefix stack, remembered prefixes) in
prefix_stream.py; the model's internals in llama_decoder.py, token drawing
in draw.py and canonical.py, the thread heuristic in threads.py. Models the
decoder does not know fall back to the `batched` sampler (batched.py), with
the same seeds and the same results.
"""

from __future__ import annotations

from typing import Optional

import torch

from gadiag_core.interfaces import CallSession, CausalLM, ContinuationRequest, RolloutSampler
from gadiag_plugins.sampling.batched import BatchedSampler
from gadiag_plugins.sampling.canonical import DEFAULT_MARGIN, CanonicalRedraw
from gadiag_plugins.sampling.draw import draw
from gadiag_plugins.sampling.llama_decoder import _Arch
from gadiag_plugins.sampling.prefix_stream import MIN_SHARED_START, PrefixStream, _Layout
from gadiag_plugins.sampling.threads import sampling_threads


def _after_start(start_kv: list, start_hidden: torch.Tensor, layers: list, hidden: torch.Tensor, row: int, n: int) -> tuple[list, torch.Tensor]:
    """A root encoded after a start: per-layer keys/values [KV, c + n, d] and
    hidden states [c + n, D], the start's c positions (start_kv [KV, c, d] a
    layer, start_hidden [c, D]) then row `row`'s first n of a pass's (layers
    [R, KV, L, d], hidden [R, L, D])."""
    kv = [(torch.cat((sk, k[row, :, :n]), dim=-2), torch.cat((sv, v[row, :, :n]), dim=-2)) for (sk, sv), (k, v) in zip(start_kv, layers)]
    return kv, torch.cat((start_hidden, hidden[row, :n]))


def _common_start(sequences: list) -> int:
    """Length of the longest start all the sequences share."""
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for other in sequences[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return n


def _slot_attention(q, own, layout: _Layout, prefix_kt, prefix_v, own_v) -> torch.Tensor:
    """One layer's attention in "slot space" [R, KV, slots * rep, ·]: the
    queries of each root's rows side by side, so the shared prefix is one
    matmul for every root at once (roots padded to `layout.slots` rows). The
    scores against each row's own generated keys are moved into the same space
    and one softmax covers both parts. A split layout's pieces take their
    places' keys and values first (`layout.places`: a big root's rows in
    several pieces, places without rows left out).

    q [B, KV, rep, d] queries, own [B, KV, rep, S] scores against the rows'
    own keys (masked), prefix_kt [places, KV, d, P] keys stored transposed (a
    plain matmul with the queries, the same values: 3.6 ms a step against
    6.2 for a transposed view, `python benchmarks/attention_layout.py`),
    prefix_v [places, KV, P, d], own_v [B, KV, S, d] -> [B, KV, rep, d]."""
    B, KV, rep, d = q.shape
    R, slots, P = layout.n_pieces, layout.slots, prefix_v.shape[-2]
    if layout.places is not None:  # [pieces, KV, d, P] and [pieces, KV, P, d]
        prefix_kt, prefix_v = prefix_kt.index_select(0, layout.places), prefix_v.index_select(0, layout.places)

    def to_slots(x):  # [B, KV, rep, n] -> [R, KV, slots * rep, n]
        if not layout.identity:
            x = x.index_select(0, layout.gather)
        return x.view(R, slots, KV, rep, x.shape[-1]).transpose(1, 2).reshape(R, KV, slots * rep, x.shape[-1])

    def to_rows(x):  # [R, KV, slots * rep, n] -> [B, KV, rep, n]
        x = x.reshape(R, KV, slots, rep, x.shape[-1]).transpose(1, 2).reshape(R * slots, KV, rep, x.shape[-1])
        return x if layout.identity else x.index_select(0, layout.scatter)

    pre = torch.matmul(to_slots(q), prefix_kt)  # [R, KV, slots*rep, P]
    if layout.mask is not None:
        pre = pre + layout.mask
    probs = torch.softmax(torch.cat((pre, to_slots(own)), dim=-1), dim=-1)
    out = to_rows(torch.matmul(probs[..., :P], prefix_v))  # [B, KV, rep, d]
    return out + torch.matmul(to_rows(probs[..., P:]), own_v)


class PrefixSampler(RolloutSampler):
    """Prefix-sharing batched sampler (the default).

    1. Requests are grouped by prefix. A prefix that is the start of a longer
       one (the nodes of one rollout) is served by the longer one's KV cache:
       each distinct *root* prefix is encoded once (several roots per forward
       pass, right-padded), with output-head logits only at the positions
       where some request starts sampling. Roots encoded together that begin
       alike (a chat template, one question's prompt) have that common start
       encoded once, and the rest of each root attends to it.
    2. Continuations are decoded together, up to `batch_size` rows, by a
       decoding loop driven here rather than through `forward`
       (`PrefixStream`: requests join between steps, each row at its own
       step, and encoded prefixes are remembered for later requests): attention is
       split into the shared prefix (one matmul per layer for all the rows
       of a root against the root's cache, which is never copied per row)
       and each row's own generated part (a preallocated cache, no per-step
       growth), under one softmax. q/k/v are one fused matmul, and on CPU in
       float32 the weights are prepacked for oneDNN.
    3. Rows with the same prefix and the same first token (the continuations
       of one forced candidate) compute their first generated position once.
       Only the last position goes through the output head. Rows stop on their
       own at EOS, at max_new_tokens, or at a stop string; finished rows leave
       the batch at once (live rows move into their places) so late steps get
       cheaper.
    4. Each request draws its Gumbel noise from its own generator seeded
       with its seed (the same stream as the `batched` sampler), and a draw
       whose two best scores lie within `redraw_margin` is redone on a
       batch-free forward (canonical.py): a row's tokens depend on its
       request alone, not on batching, not even through float rounding.

    Options:
      batch_size:    most rows decoded together
      threads:       torch threads while sampling. None (default): one thread
                     for models under 20M parameters, and whenever a quick
                     check finds torch's other threads do not pay (a machine
                     shared with other busy processes, where they make small
                     matmuls several times slower); otherwise torch's setting.
      stop_strings:  a row also stops once its generated text contains one of
                     these (the token that completes it is kept)
      max_cache_mb:  memory cap for one batch's KV caches (splits batches)
      prefill_tokens: most (padded) prefix tokens encoded in one forward pass
      pack_weights:  prepack the weights for oneDNN (CPU, float32); None: for
                     models up to 600M parameters (it doubles weight memory)
      redraw_margin: draws whose two best Gumbel scores differ by less
                     than this (in logits / temperature) are redone
                     batch-free; 0: never
      prefix_cache_mb: memory for encoded prefixes a stream keeps for later
                     requests (a rollout's next rounds); 0: none

    Models other than Llama/Qwen2/Qwen3-style decoders fall back to the
    `batched` sampler's code path (same seeds, same results)."""

    name = "prefix"
    description = "prefix-sharing batched sampler: each shared prefix encoded once, rows stop independently"

    def __init__(
        self,
        batch_size: int = 128,
        threads: Optional[int] = None,
        stop_strings: Optional[list[str]] = None,
        max_cache_mb: float = 2048,
        prefill_tokens: int = 4096,
        pack_weights: Optional[bool] = None,
        redraw_margin: float = DEFAULT_MARGIN,
        prefix_cache_mb: float = 256,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if threads is not None and threads < 1:
            raise ValueError("threads must be >= 1")
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        self.batch_size = int(batch_size)
        self.threads = threads
        self.stop_strings = [s for s in (stop_strings or []) if s]
        self.max_cache_mb = float(max_cache_mb)
        self.prefill_tokens = int(prefill_tokens)
        self.pack_weights = pack_weights
        self.redraw = CanonicalRedraw(redraw_margin)
        self.prefix_cache_mb = float(prefix_cache_mb)
        # Called before every draw with the live rows' request seeds and their
        # logits [B, V] (benchmarks/draw_stability.py records them); None: off.
        self.on_draw = None
        # Counts every generated position, forced ones included (budget accounting).
        self.tokens_generated = 0
        self.prefix_tokens_encoded = 0
        self.join_seconds = 0.0  # a stream's joins (prefill of new roots, placing them)
        # Decoding steps and the rows decoded over them (accounting), and per
        # batch size (rows in the step): [steps, seconds] (benchmarks/pipeline.py
        # compares the run's step mix with benchmarks/sampler.py's).
        self.decode_steps = 0
        self.decoded_rows = 0
        self.steps_at_rows: dict[int, list] = {}

    # -- entry points --------------------------------------------------------

    def sample(self, lm: CausalLM, requests: list[ContinuationRequest], temperature: float) -> list[list[int]]:
        session = self.open(lm, temperature)
        tickets = session.add(requests)
        results: dict[int, list[int]] = {}
        while session.pending:
            results.update(session.run())
        return [results[t] for t in tickets]

    def open(self, lm: CausalLM, temperature: float):
        """A stream (prefix_stream.py): requests join the running batch. Models
        the hand-written decoder does not know get the default session, whose
        runs are `sample` calls on the `batched` sampler's code path."""
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        arch = _Arch.of(lm.model)
        if arch is None:
            return CallSession(_Fallback(self), lm, float(temperature))
        arch.prepare(lm.model, self.pack_weights)
        return PrefixStream(self, lm, arch, float(temperature))

    # -- planning ------------------------------------------------------------

    @staticmethod
    def _roots(requests: list[ContinuationRequest]) -> tuple[list[tuple[int, ...]], list[int], dict[int, set[int]]]:
        """Distinct prefixes, then roots: a prefix that starts a longer one
        reuses the longer one's cache. Returns the roots, each request's root,
        and per root the positions whose logits a request draws its first
        token from. (In sorted order a prefix is the start of some other
        prefix exactly when it is the start of the next one.)"""
        keys = [tuple(int(t) for t in r.prefix_ids) for r in requests]
        prefixes = sorted(set(keys))
        roots: list[tuple[int, ...]] = []
        root_of_prefix: dict[tuple[int, ...], int] = {}
        for k in range(len(prefixes) - 1, -1, -1):
            p = prefixes[k]
            following = prefixes[k + 1] if k + 1 < len(prefixes) else None
            if following is not None and following[: len(p)] == p:
                root_of_prefix[p] = root_of_prefix[following]
            else:
                root_of_prefix[p] = len(roots)
                roots.append(p)
        root_of = [root_of_prefix[key] for key in keys]
        need: dict[int, set[int]] = {}
        for r, key in zip(root_of, keys):
            need.setdefault(r, set()).add(len(key) - 1)
        return roots, root_of, need

    # -- the shared prefix ---------------------------------------------------

    def _encode(self, lm: CausalLM, arch: _Arch, roots: dict[int, tuple[int, ...]], need: dict[int, set[int]]) -> dict[int, tuple]:
        """Encode root prefixes, several per forward pass (right-padded:
        causal attention keeps padding out of every real position). Returns
        root -> (per-layer (keys, values) [KV, P, d], {position: logits [V]},
        final-norm hidden states [P, D]) with logits only at the positions in
        need[root] (the hidden states give any other position's logits)."""
        out: dict[int, tuple] = {}
        for group in self._passes(list(roots), lambda r: len(roots[r])):
            out.update(self._encode_group(lm, arch, [(g, roots[g], sorted(need[g])) for g in group]))
        return out

    def _passes(self, items: list, length) -> list[list]:
        """`items` in prefill passes: shortest first, each pass as many as
        keep its padded tokens (rows x the longest `length`) within
        `prefill_tokens` (at least one)."""
        passes: list[list] = []
        for item in sorted(items, key=length):
            if passes and (len(passes[-1]) + 1) * length(item) <= self.prefill_tokens:
                passes[-1].append(item)
            else:
                passes.append([item])
        return passes

    def _encode_group(self, lm: CausalLM, arch: _Arch, items: list[tuple]) -> dict[int, tuple]:
        # The roots' common start (a chat template, a system prompt, one
        # question's prompt) is encoded once, as long as every position whose
        # logits are needed lies after it.
        common = _common_start([root for _, root, _ in items])
        common = min(common, min(pos[0] for _, _, pos in items))
        past = None
        if len(items) < 2 or common < MIN_SHARED_START:
            common = 0
        else:
            shared = torch.tensor([items[0][1][:common]], dtype=torch.long, device=arch.device)
            empty = torch.zeros(0, dtype=torch.long, device=arch.device)
            past, _, shared_hidden = arch.prefill(shared, empty, empty, hidden=True)
            self.prefix_tokens_encoded += common
        width = max(len(root) for _, root, _ in items) - common
        pad = int(items[0][1][0])  # any id: real positions never attend to the padding
        ids = torch.full((len(items), width), pad, dtype=torch.long, device=arch.device)
        for row, (_, root, _) in enumerate(items):
            ids[row, : len(root) - common] = torch.tensor(root[common:], dtype=torch.long)
        rows = torch.tensor([row for row, (_, _, pos) in enumerate(items) for _ in pos], device=arch.device)
        cols = torch.tensor([p - common for _, _, pos in items for p in pos], device=arch.device)
        layers, logits, hidden = arch.prefill(ids, rows, cols, past, hidden=True)
        out, j = {}, 0
        for row, (r, root, pos) in enumerate(items):
            n = len(root) - common
            if past is None:
                kv, states = [(k[row, :, :n], v[row, :, :n]) for k, v in layers], hidden[row, :n]
            else:
                kv, states = _after_start([(pk[0], pv[0]) for pk, pv in past], shared_hidden[0], layers, hidden, row, n)
            out[r] = (kv, {p: logits[j + i] for i, p in enumerate(pos)}, states)
            j += len(pos)
            self.prefix_tokens_encoded += n
        return out

    def _encode_after(self, arch: _Arch, items: list[tuple]) -> dict[int, tuple]:
        """Encode roots that start with part of a prefix encoded before: items
        (root index, root, c, that prefix's per-layer (keys, values) [KV, ≥c, d]
        and final-norm hidden states [≥c, D], positions whose logits are
        needed). Only each root's tokens from c on are read (after its start's
        keys/values, `prefill_rows`), several roots per pass. Returns what
        `_encode` does: root -> (keys/values [KV, P, d], {position: logits},
        hidden states [P, D])."""
        out: dict[int, tuple] = {}
        for group in self._passes(items, lambda item: len(item[1]) - item[2]):
            width = max(len(root) - c for _, root, c, _, _, _ in group)
            ids = torch.full((len(group), width), int(group[0][1][0]), dtype=torch.long, device=arch.device)
            pasts = []
            for row, (_, root, c, kv, _, _) in enumerate(group):
                ids[row, : len(root) - c] = torch.tensor(root[c:], dtype=torch.long)
                pasts.append([(k[:, :c].unsqueeze(0), v[:, :c].unsqueeze(0)) for k, v in kv])
            # needed positions before c come from the start's hidden states
            rows = torch.tensor([row for row, item in enumerate(group) for p in item[5] if p >= item[2]], dtype=torch.long, device=arch.device)
            cols = torch.tensor([p - item[2] for item in group for p in item[5] if p >= item[2]], dtype=torch.long, device=arch.device)
            layers, logits, hidden = arch.prefill_rows(ids, [len(root) - c for _, root, c, _, _, _ in group], pasts, rows, cols, hidden=True)
            j = 0
            for row, (r, root, c, kv, start_hidden, positions) in enumerate(group):
                n = len(root) - c
                joined, states = _after_start([(k[:, :c], v[:, :c]) for k, v in kv], start_hidden[:c], layers, hidden, row, n)
                at = {}
                for p in positions:
                    if p >= c:
                        at[p], j = logits[j], j + 1
                    else:
                        at[p] = arch.head_logits(start_hidden[p : p + 1])[0]
                out[r] = (joined, at, states)
                self.prefix_tokens_encoded += n
        return out

    # -- decoding steps (driven by PrefixStream) ------------------------------

    def _first_step(self, arch: _Arch, tokens, positions, keys: list[tuple], layout: _Layout, width: int, prefix_kt, prefix_v, own_kt, own_v, n_roots: Optional[int] = None) -> torch.Tensor:
        """`_step` at s = 0 for rows whose (root, prefix length, first token)
        keys repeat: one row per distinct key goes through the model, and its
        keys, values and logits are copied to the rows that share its key."""
        first_row: dict[tuple, int] = {}  # key -> its first row
        for b, key in enumerate(keys):
            first_row.setdefault(key, b)
        if len(first_row) == len(keys):
            return self._step(arch, tokens, positions, 0, layout, prefix_kt, prefix_v, own_kt, own_v)
        device = tokens.device
        place = {key: i for i, key in enumerate(first_row)}
        unique = torch.tensor(list(first_row.values()), dtype=torch.long, device=device)
        inverse = torch.tensor([place[key] for key in keys], dtype=torch.long, device=device)
        # Every root keeps at least one row, so the roots (and prefix caches) stay the same.
        sub_layout = _Layout([k[0] for k in first_row], [k[1] for k in first_row], width, arch.rep, arch.dtype, device, n_roots)
        n = len(first_row)
        unique_kt = [torch.empty((n, arch.kv_heads, arch.head_dim, 1), dtype=arch.dtype, device=device) for _ in arch.layers]
        unique_v = [torch.empty((n, arch.kv_heads, 1, arch.head_dim), dtype=arch.dtype, device=device) for _ in arch.layers]
        logits = self._step(arch, tokens[unique], positions[unique], 0, sub_layout, prefix_kt, prefix_v, unique_kt, unique_v)
        for cache, part in zip(own_kt, unique_kt):
            cache[..., 0] = part[inverse, ..., 0]
        for cache, part in zip(own_v, unique_v):
            cache[:, :, 0] = part[inverse, :, 0]
        return logits[inverse]

    def _step(self, arch: _Arch, tokens, positions, s, layout: _Layout, prefix_kt, prefix_v, own_kt, own_v) -> torch.Tensor:
        """One decoding step for the batch: feed token s of every row (at its
        own absolute position), return the next-token logits [B, V] float32.
        s: one step for all rows (int), or each row's own (LongTensor [B]: a
        stream's rows joined at different times; own keys past a row's step
        are masked).

        Attention is split into the shared prefix and each row's own generated
        keys, under one softmax, in slot space (`_slot_attention`: over the
        whole prefix stack or over split places, as the layout says). Keys are
        kept transposed: prefix_kt per layer [places, KV, d, P], own_kt
        [B, KV, d, steps] (values [.., P or steps, d]), so both score
        products are plain matmuls."""
        B = tokens.shape[0]
        H, KV, rep, d = arch.heads, arch.kv_heads, arch.rep, arch.head_dim
        own_mask, at = None, s
        if not isinstance(s, int):
            top = int(s.max())
            if int(s.min()) == top:
                at = s = top
            else:  # [B, 1, 1, S]: -inf past each row's own step
                at = (torch.arange(B, device=s.device), slice(None), s)  # own_kt: (rows, :, :, s)
                own_mask = torch.zeros((B, 1, 1, top + 1), dtype=arch.dtype, device=s.device)
                own_mask.masked_fill_(torch.arange(top + 1, device=s.device).view(1, 1, 1, -1) > s.view(B, 1, 1, 1), float("-inf"))
                s = top
        S = s + 1
        h = arch.embed(tokens)  # [B, D]
        cos, sin = arch.rope_factors(h.unsqueeze(1), positions.unsqueeze(1))  # [B, 1, 1, d]
        cos, sin = cos[:, 0].to(arch.dtype), sin[:, 0].to(arch.dtype)  # [B, 1, d]

        for l, (norm1, qkv_linear, attn, o_linear, residual_mlp) in enumerate(arch.blocks):
            qkv = qkv_linear(norm1(h)).view(B, H + 2 * KV, d)
            qk = arch.qk_rotary(attn, qkv, cos, sin)
            q = qk[:, :H].view(B, KV, rep, d)
            okt, ov = own_kt[l], own_v[l]
            if own_mask is None:
                okt[..., at] = qk[:, H:]
                ov[:, :, at] = qkv[:, H + KV :]
            else:
                okt[at[0], :, :, at[2]] = qk[:, H:]
                ov[at] = qkv[:, H + KV :]

            own = torch.matmul(q, okt[..., :S])  # [B, KV, rep, S]
            if own_mask is not None:
                own = own + own_mask
            out = _slot_attention(q, own, layout, prefix_kt[l], prefix_v[l], ov[:, :, :S])  # [B, KV, rep, d]
            h = o_linear.plus(out.reshape(B, H * d), h)
            h = residual_mlp(h)
        return arch.head_logits(arch.norm(h))

    # -- sampling and stopping -----------------------------------------------

    def _choose(self, logits: torch.Tensor, temperature: float, noise):
        """Next token of every row [B] (Gumbel-max: argmax logits/temperature
        + noise) and its margin over the second best score [B]."""
        return draw(logits, temperature, noise)

    def _hit_stop(self, lm, out: list[int]) -> bool:
        if not self.stop_strings:
            return False
        longest = max(len(s) for s in self.stop_strings)
        text = lm.decode(out[-(longest + 4) :])
        return any(s in text for s in self.stop_strings)

    def _cut_at_stop(self, lm, out: list[int]) -> list[int]:
        """For the fallback path: end `out` at the first token completing a stop string."""
        if not self.stop_strings:
            return out
        for n in range(1, len(out) + 1):
            if self._hit_stop(lm, out[:n]):
                return out[:n]
        return out



class _Fallback:
    """The `batched` sampler's code path for models the decoder does not know,
    with this sampler's batch size, redraw margin, counts and stop strings."""

    def __init__(self, owner: PrefixSampler):
        self.owner = owner

    def sample(self, lm: CausalLM, requests: list[ContinuationRequest], temperature: float) -> list[list[int]]:
        owner = self.owner
        if any(r.max_new_tokens > 0 and len(r.prefix_ids) == 0 for r in requests):
            raise ValueError("every request needs a non-empty prefix")
        fallback = BatchedSampler(batch_size=owner.batch_size)
        fallback.redraw = owner.redraw
        with sampling_threads(owner.threads, lm.model):
            outs = fallback.sample(lm, requests, temperature)
        owner.tokens_generated += fallback.tokens_generated
        return [owner._cut_at_stop(lm, out) for out in outs]

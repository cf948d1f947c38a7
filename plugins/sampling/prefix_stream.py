"""The `prefix` sampler's decoding as a stream: requests join a running batch.

A sampler call decodes its rows until the last one finishes, and the batch
shrinks as rows stop (most continuations end well before their limit), so
late steps pay a whole pass over the weights for a few rows. `PrefixStream`
keeps one batch going instead: requests are added at any time (the scheduler
adds a rollout's next requests as soon as its last ones finish), join the
batch between two steps, and leave it as they finish. Each row is at its own
step (`PrefixSampler._step` masks own keys past it); roots keep their places
in the prefix stack until it is compacted, so joining copies only the new
roots' keys and values. Encoded roots are remembered (`prefix_cache_mb`): a
rollout's next round asks about nodes of the same sequence, and a root that
starts a remembered one takes its keys/values and, from its hidden states,
the logits it needs, without another prefill pass. A root that shares only
a start with a remembered one (a node further on in the rollout, another
rollout of the same question: the prompt) takes that start's keys/values and
reads only its tokens after it (`PrefixSampler._encode_after`).

Rows do not depend on each other: a row's tokens are fixed by its request
(its own noise stream; close draws redone batch-free, canonical.py), so a
stream returns exactly what `PrefixSampler.sample` does for the same
requests, whatever joins when (tests/test_sampler.py pins it).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Optional

import torch

from gadiag_core.interfaces import ContinuationRequest, SamplerSession
from gadiag_plugins.sampling.draw import gumbel_noise
from gadiag_plugins.sampling.threads import sampling_threads


# Roots of one prefill pass that start with at least this many equal tokens
# have that start encoded once (below it the extra pass costs more than it
# saves); a joining root that shares at least this many with a remembered
# prefix reads only its tokens after them.
MIN_SHARED_START = 16

# A step's layout is the cheaper of two, by a cost in padded rows (one row of
# slot space = 1): slot space over the whole prefix stack (every place padded
# to the biggest root: places x slots) or over split places (the places with
# rows, cut into pieces of at most `per_place` rows, their keys and values
# gathered: pieces x per_place + SPLIT_PER_PLACE a piece).
# `python benchmarks/attention_layout.py --repeats 21` (SmolLM2-135M's
# shapes, 2 threads, ms per step, 12 layouts): 115 rows over 13 of 16
# places, 30 in the biggest: 126.2 over the stack, 27.9 split (pieces of 8);
# 100 rows spread evenly (at most 7 a place): 25.4 over the stack, 29.1
# split; the rule picked the faster way, or one within 10% of it, in 11 of
# 12 (the twelfth: 12 rows, 8.8 split against 7.0).
SPLIT_PER_PLACE = 2.5


class _Layout:
    """Where each decoding row finds its shared prefix.

    Each row belongs to a root (the longest prefix its own prefix is the start
    of); rows may come in any order. For the prefix part of attention the
    queries of one root's rows are packed into a [R, KV, slots * rep, d]
    block, so every root is one matmul against its cached keys [R, KV, P, d]
    (never replicated per row). `gather` packs rows into slots, `scatter`
    brings slot results back to rows, and `mask` hides key positions past a
    row's own prefix (nested prefixes of one root, and roots shorter than the
    longest).

    Slot space over the stack (`mode` "slots") pads every place to the rows
    of the biggest root (places without rows too). Where that costs more the
    layout is "split": slot space over pieces of the places with rows, at
    most `slots` rows a piece, `places` [pieces] the stack place of each
    piece, whose keys and values the step gathers (a big root takes several
    pieces, a root without rows none)."""

    def __init__(self, root_of_row: list[int], plen_of_row: list[int], width: int, rep: int, dtype, device, n_roots: Optional[int] = None,
                 mode: Optional[str] = None, per_place: Optional[int] = None):
        # n_roots: the roots are 0 … n_roots − 1, rows or not (a stream's
        # prefix caches keep their places; a root without rows costs empty slots).
        # mode: None picks the cheaper layout; "slots" or "split" forces one
        # (per_place: a split piece's rows; None picks).
        roots = sorted(set(root_of_row)) if n_roots is None else list(range(n_roots))
        self.roots = roots
        local = {r: i for i, r in enumerate(roots)}
        root_index = [local[r] for r in root_of_row]  # each row's root, 0 … R − 1
        counts = [0] * len(roots)
        for i in root_index:
            counts[i] += 1
        biggest = max(counts)
        pieces = lambda size: sum(-(-n // size) for n in counts)  # noqa: E731
        if per_place is None:  # the piece size with the fewest padded rows and gathers
            per_place = min(range(1, biggest + 1), key=lambda size: pieces(size) * (size + SPLIT_PER_PLACE))
        if mode is None:  # ties: slot space over the stack (nothing to gather)
            mode = "split" if pieces(per_place) * (per_place + SPLIT_PER_PLACE) < len(roots) * biggest else "slots"
        if mode not in ("slots", "split"):
            raise ValueError(f"unknown layout mode {mode!r}: slots or split")
        self.mode = mode
        self.places = None
        self._pack_slots(root_index, counts, plen_of_row, width, rep, dtype, device, per_place if mode == "split" else None)

    def _pack_slots(self, root_index: list[int], counts: list[int], plen_of_row: list[int], width: int, rep: int, dtype, device,
                    per_place: Optional[int]) -> None:
        """Slot space: `slots`, `gather`, `scatter`, `identity` and `mask`;
        with `per_place`, over split places (`places`)."""
        if per_place is None:  # every place of the stack, padded to the biggest root
            self.slots = max(counts)
            first_piece = list(range(len(counts)))
            n_pieces = len(counts)
        else:
            self.slots = per_place
            first_piece, places = [], []
            for i, n in enumerate(counts):
                first_piece.append(len(places))
                places += [self.roots[i]] * -(-n // per_place)
            self.places = torch.tensor(places, dtype=torch.long, device=device)
            n_pieces = len(places)
        slots = self.slots
        self.n_pieces = n_pieces
        n_slots = n_pieces * slots
        gather = [0] * n_slots
        lengths = [width] * n_slots  # empty slots see every key: no all-masked rows
        scatter = []
        taken = [0] * len(counts)
        for row, (i, plen) in enumerate(zip(root_index, plen_of_row)):
            flat = first_piece[i] * slots + taken[i]  # a root's pieces are next to each other
            taken[i] += 1
            gather[flat] = row
            lengths[flat] = plen
            scatter.append(flat)
        self.gather = torch.tensor(gather, dtype=torch.long, device=device)
        self.scatter = torch.tensor(scatter, dtype=torch.long, device=device)
        self.identity = n_pieces == 1 and len(scatter) == n_slots  # one piece, every slot a row: slot j is row j
        if all(n == width for n in lengths):
            self.mask = None
        else:
            length = torch.tensor(lengths, device=device).view(n_pieces, slots, 1, 1)
            hidden = torch.arange(width, device=device).view(1, 1, 1, width) >= length
            hidden = hidden.expand(n_pieces, slots, rep, width).reshape(n_pieces, 1, slots * rep, width)
            self.mask = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))


class _Row:
    """One live continuation: its request, where its prefix lives, what it drew."""

    __slots__ = ("ticket", "request", "root", "plen", "generator", "outputs")

    def __init__(self, ticket: int, request: ContinuationRequest, root: int, plen: int):
        self.ticket, self.request, self.root, self.plen = ticket, request, root, plen
        self.generator = torch.Generator().manual_seed(request.seed)
        self.outputs: list[int] = []


class PrefixStream(SamplerSession):
    """Continuous batching for the `prefix` sampler (see the module docstring).

    Up to `sampler.batch_size` rows decode together (fewer if their own keys
    and values would pass `max_cache_mb`). Queued requests join when there is
    room for all of them or for a quarter of the batch, so a join (a prefill
    pass for the new roots) is not paid row by row."""

    def __init__(self, sampler, lm, arch, temperature: float):
        self.sampler, self.lm, self.arch, self.temperature = sampler, lm, arch, temperature
        self.eos = set(int(i) for i in lm.eos_token_ids)
        self.queue: deque = deque()  # (ticket, request) not yet in the batch
        self.ready: list[tuple[int, list[int]]] = []  # finished without decoding
        self.tickets = 0
        self.rows: list[_Row] = []  # the batch, in order
        self.logits: Optional[torch.Tensor] = None  # [B, V]: each row's next draw
        # Prefix stack: per layer keys [R, KV, d, W] (transposed: the score
        # product is a plain matmul) and values [R, KV, W, d]; root r at place r.
        self.prefix_kt: list = []
        self.prefix_v: list = []
        self.root_rows: list[int] = []  # rows per place (0: free)
        self.root_length: list[int] = []
        self.free: list[int] = []
        # Each row's own generated keys/values: per layer keys [capacity, KV,
        # d, steps] (transposed, as above) and values [capacity, KV, steps, d].
        self.own_kt: list = []
        self.own_v: list = []
        self.noise: Optional[torch.Tensor] = None
        # Encoded roots kept for later joins: tokens -> (keys/values, hidden states).
        self.remembered: OrderedDict = OrderedDict()
        self.remembered_bytes = 0

    # -- the session ---------------------------------------------------------

    def add(self, requests: list[ContinuationRequest]) -> list[int]:
        tickets = []
        for request in requests:
            ticket, self.tickets = self.tickets, self.tickets + 1
            tickets.append(ticket)
            if request.max_new_tokens <= 0:
                self.ready.append((ticket, []))
            elif len(request.prefix_ids) == 0:
                raise ValueError("every request needs a non-empty prefix")
            else:
                self.queue.append((ticket, request))
        return tickets

    @property
    def pending(self) -> int:
        return len(self.queue) + len(self.rows) + len(self.ready)

    def run(self) -> list[tuple[int, list[int]]]:
        with sampling_threads(self.sampler.threads, self.lm.model), torch.inference_mode():
            finished, self.ready = self.ready, []
            while not finished:
                start = time.perf_counter()
                self._join()
                self.sampler.join_seconds += time.perf_counter() - start
                if not self.rows:
                    break
                rows, start = len(self.rows), time.perf_counter()
                finished = self._step()
                at = self.sampler.steps_at_rows.setdefault(rows, [0, 0.0])
                at[0] += 1
                at[1] += time.perf_counter() - start
            return finished

    # -- joining -------------------------------------------------------------

    def _capacity(self, steps: int) -> int:
        per_row = steps * self.arch.kv_bytes_per_token()
        return max(1, min(self.sampler.batch_size, int(self.sampler.max_cache_mb * 2**20 // max(per_row, 1))))

    def _join(self) -> None:
        if not self.queue:
            return
        steps = max(max(r.request.max_new_tokens for r in self.rows) if self.rows else 1,
                    max(request.max_new_tokens for _, request in self.queue))
        room = self._capacity(steps) - len(self.rows)
        if room <= 0 or (self.rows and room < min(len(self.queue), max(1, self.sampler.batch_size // 4))):
            return
        taken = [self.queue.popleft() for _ in range(min(room, len(self.queue)))]
        roots, root_of, need = self.sampler._roots([request for _, request in taken])
        # Roots that start a prefix encoded for earlier requests (a rollout's
        # next round asks about nodes of the same sequence) come from the
        # cache; roots that share only a start with one (a node further on,
        # another rollout of the question) read their tokens after it; the
        # others are encoded whole. Both kinds are remembered.
        hits = {r: hit for r, hit in ((r, self._recall(root)) for r, root in enumerate(roots)) if hit is not None}
        found = {r: entry for r, (c, entry) in hits.items() if c == len(roots[r])}
        started = {r: hit for r, hit in hits.items() if r not in found}
        encoded = self.sampler._encode(self.lm, self.arch, {r: root for r, root in enumerate(roots) if r not in hits}, need)
        if started:
            items = [(r, roots[r], c, kv, hidden, sorted(need[r])) for r, (c, (kv, hidden)) in started.items()]
            encoded.update(self.sampler._encode_after(self.arch, items))
        for r, (kv, _, hidden) in encoded.items():
            self._remember(roots[r], kv, hidden)
        for r, (kv, hidden) in found.items():
            positions = sorted(need[r])
            logits = self.arch.head_logits(hidden[positions])
            encoded[r] = (kv, dict(zip(positions, logits)), hidden)
        place = {r: self._place(encoded[r][0], len(roots[r])) for r in encoded}
        new_rows, first_logits = [], []
        for (ticket, request), r in zip(taken, root_of):
            plen = len(request.prefix_ids)
            new_rows.append(_Row(ticket, request, place[r], plen))
            first_logits.append(encoded[r][1][plen - 1])
            self.root_rows[place[r]] += 1
        self._grow_own(len(self.rows) + len(new_rows), max(r.request.max_new_tokens for r in self.rows + new_rows))
        self.rows += new_rows
        fresh = torch.stack(first_logits)
        self.logits = fresh if self.logits is None or not len(self.logits) else torch.cat((self.logits, fresh))

    def _recall(self, root: tuple) -> Optional[tuple]:
        """(c, (keys/values per layer [KV, n, d], hidden states [n, D])) of the
        remembered prefix that shares the longest start with `root`, c tokens
        of it: c = len(root) when the prefix starts with `root` (the most
        recent such), else at least MIN_SHARED_START; None otherwise."""
        best, entry = 0, None
        for key in reversed(self.remembered):
            lo, hi = 0, min(len(key), len(root))  # the shared start's length, by halving (tuple slices compare in C)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if key[:mid] == root[:mid]:
                    lo = mid
                else:
                    hi = mid - 1
            if lo > best:
                best, entry = lo, key
            if best == len(root):
                break
        if entry is None or best < min(MIN_SHARED_START, len(root)):
            return None
        self.remembered.move_to_end(entry)
        return best, self.remembered[entry]

    def _remember(self, root: tuple, kv: list, hidden: torch.Tensor) -> None:
        """Keep an encoded root for later joins (copies: the encoding pass's
        tensors are larger), within `prefix_cache_mb`; prefixes it extends go."""
        budget = self.sampler.prefix_cache_mb * 2**20
        if budget <= 0:
            return
        for key in [k for k in self.remembered if len(k) <= len(root) and root[: len(k)] == k]:
            self.remembered_bytes -= self._bytes(self.remembered.pop(key))
        entry = ([(k.clone(), v.clone()) for k, v in kv], hidden.clone())
        self.remembered[root] = entry
        self.remembered_bytes += self._bytes(entry)
        while self.remembered_bytes > budget and len(self.remembered) > 1:
            self.remembered_bytes -= self._bytes(self.remembered.popitem(last=False)[1])

    @staticmethod
    def _bytes(entry: tuple) -> int:
        kv, hidden = entry
        return sum(k.nbytes + v.nbytes for k, v in kv) + hidden.nbytes

    def _place(self, kv: list, length: int) -> int:
        """Put a root's keys/values ([KV, n, d] per layer) in a free place of
        the prefix stack (growing it when none is free or it is too narrow)."""
        width = self.prefix_v[0].shape[-2] if self.prefix_v else 0
        if not self.free or length > width:
            places = len(self.root_rows) + (0 if self.free else max(4, len(self.root_rows)))
            self._grow(self.prefix_kt, self.prefix_v, places, max(width, length))
            self.free += list(range(len(self.root_rows), places))
            self.root_rows += [0] * (places - len(self.root_rows))
            self.root_length += [0] * (places - len(self.root_length))
        place = self.free.pop(0)
        for l, (k, v) in enumerate(kv):
            self.prefix_kt[l][place, :, :, :length] = k[:, :length].transpose(-1, -2)
            self.prefix_v[l][place, :, :length] = v[:, :length]
        self.root_length[place] = length
        return place

    def _grow_own(self, rows: int, steps: int) -> None:
        """Own key/value caches for at least `rows` rows of `steps` steps
        (zeros: a masked position must not hold NaN)."""
        have_rows = self.own_v[0].shape[0] if self.own_v else 0
        have_steps = self.own_v[0].shape[2] if self.own_v else 0
        if rows <= have_rows and steps <= have_steps:
            return
        self._grow(self.own_kt, self.own_v, max(rows, have_rows, min(self.sampler.batch_size, 2 * have_rows)), max(steps, have_steps))

    def _grow(self, keys_t: list, values: list, count: int, positions: int) -> None:
        """Replace per-layer keys [n, KV, d, p] and values [n, KV, p, d] (or
        start them) by zeros of `count` x `positions` holding the old ones."""
        arch = self.arch
        for caches, shape in ((keys_t, (count, arch.kv_heads, arch.head_dim, positions)), (values, (count, arch.kv_heads, positions, arch.head_dim))):
            for l in range(len(arch.layers)):
                grown = torch.zeros(shape, dtype=arch.dtype, device=arch.device)
                if len(caches) > l:
                    old = caches[l]
                    grown[: old.shape[0], :, : old.shape[2], : old.shape[3]] = old
                    caches[l] = grown
                else:
                    caches.append(grown)

    # -- one step ------------------------------------------------------------

    def _step(self) -> list[tuple[int, list[int]]]:
        """Draw every row's next token, let finished rows go, feed the others."""
        sampler, rows = self.sampler, self.rows
        B, width = len(rows), self.logits.shape[-1]
        noise = None
        if self.temperature > 0:
            if self.noise is None or self.noise.shape[0] < B or self.noise.shape[1] != width:
                self.noise = torch.empty((max(B, sampler.batch_size), width))
            noise = gumbel_noise([row.generator for row in rows], width, self.noise)
        if sampler.on_draw is not None:
            sampler.on_draw([row.request.seed for row in rows], self.logits)
        tokens, margins = sampler._choose(self.logits, self.temperature, noise)
        forced = torch.tensor([row.request.forced_first if not row.outputs and row.request.forced_first is not None else -1 for row in rows])
        tokens = sampler.redraw.settle(self.lm.model, tokens, margins, self.temperature, noise,
                                       lambda b: list(rows[b].request.prefix_ids) + rows[b].outputs, skip=forced >= 0)
        tokens = torch.where(forced >= 0, forced, tokens.cpu())
        values = tokens.tolist()
        sampler.decode_steps += 1
        sampler.decoded_rows += B
        finished, keep = [], []
        for b, row in enumerate(rows):
            row.outputs.append(values[b])
            sampler.tokens_generated += 1
            if values[b] in self.eos or len(row.outputs) >= row.request.max_new_tokens or sampler._hit_stop(self.lm, row.outputs):
                finished.append((row.ticket, row.outputs))
                self.root_rows[row.root] -= 1
                if self.root_rows[row.root] == 0:
                    self.free.append(row.root)
            else:
                keep.append(b)
        if len(keep) < B:
            order = self._compact(keep)
            tokens = tokens[order]
        if not self.rows:
            self.logits = None
            return finished
        self.logits = self._forward(tokens)
        return finished

    def _compact(self, keep: list[int]) -> list[int]:
        """Keep rows `keep` in places 0 … n − 1 (n = len(keep)): rows kept
        from the back move into the places of finished rows in front (their
        own caches with them). Returns the old place of each new place."""
        n = len(keep)
        kept = set(keep)
        holes = [b for b in range(n) if b not in kept]
        movers = [b for b in keep if b >= n]
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if holes:
            dst = torch.tensor(holes, device=self.arch.device)
            src = torch.tensor(movers, device=self.arch.device)
            steps = max(len(self.rows[b].outputs) for b in movers)
            for cache in self.own_kt:
                cache[dst, ..., :steps] = cache[src, ..., :steps]
            for cache in self.own_v:
                cache[dst, :, :steps] = cache[src, :, :steps]
        self.rows = [self.rows[b] for b in order]
        if len(self.free) > 8 and len(self.free) > len(self.root_rows) - len(self.free):
            self._compact_roots()
        return order

    def _compact_roots(self) -> None:
        """Drop the free places of the prefix stack (rows follow their roots)."""
        used = [p for p, n in enumerate(self.root_rows) if n > 0]
        new_place = {p: i for i, p in enumerate(used)}
        pick = torch.tensor(used, dtype=torch.long, device=self.arch.device)
        width = max([self.root_length[p] for p in used] or [1])
        for l in range(len(self.prefix_v)):
            self.prefix_kt[l] = self.prefix_kt[l].index_select(0, pick)[..., :width].contiguous()
            self.prefix_v[l] = self.prefix_v[l].index_select(0, pick)[:, :, :width].contiguous()
        self.root_rows = [self.root_rows[p] for p in used]
        self.root_length = [self.root_length[p] for p in used]
        self.free = []
        for row in self.rows:
            row.root = new_place[row.root]

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its last token at its own step; the next logits [B, V]."""
        sampler, arch, rows = self.sampler, self.arch, self.rows
        device = arch.device
        B = len(rows)
        steps = torch.tensor([len(row.outputs) - 1 for row in rows], dtype=torch.long, device=device)
        positions = torch.tensor([row.plen + len(row.outputs) - 1 for row in rows], dtype=torch.long, device=device)
        width = self.prefix_v[0].shape[-2]
        layout = _Layout([row.root for row in rows], [row.plen for row in rows], width, arch.rep, arch.dtype, device, n_roots=len(self.root_rows))
        own_kt = [cache[:B] for cache in self.own_kt]
        own_v = [cache[:B] for cache in self.own_v]
        tokens = tokens.to(device)
        if all(len(row.outputs) == 1 for row in rows):
            # A fresh batch: rows with the same prefix and first token (the
            # continuations of one forced candidate) share their first position.
            firsts = tokens.tolist()
            keys = [(row.root, row.plen, first) for row, first in zip(rows, firsts)]
            return sampler._first_step(arch, tokens, positions, keys, layout, width, self.prefix_kt, self.prefix_v, own_kt, own_v, n_roots=len(self.root_rows))
        return sampler._step(arch, tokens, positions, steps, layout, self.prefix_kt, self.prefix_v, own_kt, own_v)

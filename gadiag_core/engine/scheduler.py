"""Many rollouts in flight, their continuation requests batched into few sampler calls.

An estimator that has a ``steps(job)`` request generator (the built-in
`targeted` and `uniform` do) does not call the sampler itself: it yields a
list of ContinuationRequests and receives their outputs. A diagnosis is then a
generator too (gadiag_core.engine.diagnose.diagnosis_steps). This scheduler
keeps up to `in_flight` of them running, gathers every pending request into
one sampler call (the sampler splits it into its preferred batch size), and
sends each generator its own outputs back.

Every request carries a seed derived from its identity (run, question,
rollout, node, token, sample index), never from the order of execution, so the
records do not depend on how requests were batched or how many rollouts were
in flight — not even through float rounding of the batched matmuls, since
draws near a CDF edge are redone batch-free (plugins/sampling/canonical.py);
tests/test_scheduler.py pins it.

`SamplerStats` is the run's accounting: sampler calls, requests, sampled
tokens, time inside the sampler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator


@dataclass
class SamplerStats:
    """What the sampler did for a run (summary.json "throughput")."""

    calls: int = 0
    requests: int = 0
    tokens: int = 0  # generated positions, forced first tokens included
    seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    redraws: int = 0  # near-edge draws redone batch-free (samplers with a `redraw`)

    def sample(self, sampler, lm, requests: list, temperature: float) -> list[list[int]]:
        """sampler.sample with the call counted and timed."""
        redraw = getattr(sampler, "redraw", None)
        before = getattr(redraw, "count", 0)
        start = time.perf_counter()
        outputs = sampler.sample(lm, requests, temperature)
        self.seconds += time.perf_counter() - start
        self.redraws += getattr(redraw, "count", 0) - before
        self.calls += 1
        self.requests += len(requests)
        self.tokens += sum(len(o) for o in outputs)
        self.batch_sizes.append(len(requests))
        return outputs

    def summary(self, wall_seconds: float) -> dict:
        return {
            "sampler_calls": self.calls,
            "sampler_requests": self.requests,
            "sampled_tokens": self.tokens,
            "sampler_seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds > 0 else None,
            "mean_batch_size": round(self.requests / self.calls, 1) if self.calls else None,
            "redrawn_draws": self.redraws,
            "wall_seconds": round(wall_seconds, 3),
            "share_outside_sampler": round(1 - self.seconds / wall_seconds, 3) if wall_seconds > 0 else None,
        }


def run_interleaved(
    starts: Iterable[tuple[object, Callable[[], Iterator]]],
    sample: Callable[[list], list],
    in_flight: int,
    on_done: Callable[[object, object], None],
) -> None:
    """Drive request generators together.

    starts:     (key, start) pairs; start() returns a generator that yields lists
                of requests and finally returns its result
    sample:     requests -> outputs, in order (one sampler call)
    in_flight:  at most this many generators started and not finished
    on_done:    called with (key, result) as each generator finishes (any order)
    """
    if in_flight < 1:
        raise ValueError("in_flight must be at least 1")
    pending_starts = iter(starts)
    # slot -> (key, generator, its pending requests); slots, not keys, index it
    # (keys need not be hashable), in start order.
    waiting: dict[int, tuple[object, Iterator, list]] = {}
    slots = iter(range(2**62))

    def advance(slot, key, generator, value=None, first=False) -> None:
        try:
            requests = next(generator) if first else generator.send(value)
        except StopIteration as stop:
            on_done(key, stop.value)
            return
        waiting[slot] = (key, generator, list(requests))

    def fill() -> None:
        while len(waiting) < in_flight:
            item = next(pending_starts, None)
            if item is None:
                return
            key, start = item
            advance(next(slots), key, start(), first=True)  # may finish at once (nothing to sample)

    fill()
    while waiting:
        order = list(waiting)
        batch = [request for slot in order for request in waiting[slot][2]]
        outputs = sample(batch) if batch else []
        offset = 0
        for slot in order:
            key, generator, requests = waiting.pop(slot)
            mine = outputs[offset : offset + len(requests)]
            offset += len(requests)
            advance(slot, key, generator, mine)
        fill()

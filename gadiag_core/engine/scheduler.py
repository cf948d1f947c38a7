"""Many rollouts in flight, their continuation requests sharing the sampler.

An estimator that has a ``steps(job)`` request generator (the built-in
`targeted` and `uniform` do) does not call the sampler itself: it yields a
list of ContinuationRequests and receives their outputs. A diagnosis is then a
generator too (gadiag_core.engine.diagnose.diagnosis_steps). This scheduler
keeps up to `in_flight` of them running and passes their requests to one
sampler session (gadiag_core.interfaces.SamplerSession): with the `prefix`
sampler a stream whose decoding batch requests join as they come and leave
as they finish (continuous batching, plugins/sampling/prefix_stream.py);
with other samplers one call per round holding every pending request. Each
generator gets its own outputs back as soon as they are all in.

Every request carries a seed derived from its identity (run, question,
rollout, node, token, sample index), never from the order of execution, so the
records do not depend on how requests were batched or how many rollouts were
in flight — not even through float rounding of the batched matmuls, since
close draws are redone batch-free (plugins/sampling/canonical.py);
tests/test_scheduler.py pins it.

`SamplerStats` is the run's accounting: sampler calls (session runs),
requests, sampled tokens, time inside the sampler, decoding steps and rows
per step (and steps and seconds at each batch size), redrawn draws.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
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
    redraws: int = 0  # close draws redone batch-free (samplers with a `redraw`), and their seconds
    redraw_seconds: float = 0.0
    steps: int = 0  # decoding steps, and rows decoded over them (samplers that count them)
    row_steps: int = 0
    # rows in a step -> [steps, seconds] (samplers with a `steps_at_rows`)
    steps_at_rows: dict = field(default_factory=dict)
    prefix_tokens: int = 0  # prefix tokens read by prefill passes (samplers that count them)
    join_seconds: float = 0.0  # a stream's joins: prefill of new prefixes, placing them (samplers that time them)

    def sample(self, sampler, lm, requests: list, temperature: float) -> list[list[int]]:
        """sampler.sample with the call counted and timed."""
        with self._counting(sampler):
            outputs = sampler.sample(lm, requests, temperature)
        self.requests += len(requests)
        self.tokens += sum(len(o) for o in outputs)
        self.batch_sizes.append(len(requests))
        return outputs

    def session(self, sampler, lm, temperature: float) -> "CountedSession":
        """sampler.open(...) with every run counted and timed."""
        return CountedSession(self, sampler, sampler.open(lm, temperature))

    @contextmanager
    def _counting(self, sampler):
        redraw = getattr(sampler, "redraw", None)
        before = (getattr(redraw, "count", 0), getattr(sampler, "decode_steps", 0), getattr(sampler, "decoded_rows", 0), getattr(redraw, "seconds", 0.0),
                  getattr(sampler, "prefix_tokens_encoded", 0), getattr(sampler, "join_seconds", 0.0))
        at_rows = {rows: list(at) for rows, at in getattr(sampler, "steps_at_rows", {}).items()}
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1
            self.redraws += getattr(redraw, "count", 0) - before[0]
            self.redraw_seconds += getattr(redraw, "seconds", 0.0) - before[3]
            self.steps += getattr(sampler, "decode_steps", 0) - before[1]
            self.row_steps += getattr(sampler, "decoded_rows", 0) - before[2]
            self.prefix_tokens += getattr(sampler, "prefix_tokens_encoded", 0) - before[4]
            self.join_seconds += getattr(sampler, "join_seconds", 0.0) - before[5]
            for rows, (steps, seconds) in getattr(sampler, "steps_at_rows", {}).items():
                was = at_rows.get(rows, (0, 0.0))
                if steps > was[0]:
                    self.add_steps_at_rows(rows, steps - was[0], seconds - was[1])

    def add_steps_at_rows(self, rows: int, steps: int, seconds: float) -> None:
        at = self.steps_at_rows.setdefault(int(rows), [0, 0.0])
        at[0] += steps
        at[1] += seconds

    def summary(self, wall_seconds: float) -> dict:
        return {
            "sampler_calls": self.calls,
            "sampler_requests": self.requests,
            "sampled_tokens": self.tokens,
            "sampler_seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds > 0 else None,
            "mean_batch_size": round(self.requests / self.calls, 1) if self.calls else None,
            "decode_steps": self.steps,
            "mean_rows_per_step": round(self.row_steps / self.steps, 1) if self.steps else None,
            # [rows in the step, steps, seconds], by rows: the batch sizes the run decoded at
            "decode_steps_by_rows": [[rows, steps, round(seconds, 4)] for rows, (steps, seconds) in sorted(self.steps_at_rows.items())],
            "redrawn_draws": self.redraws,
            "redraw_seconds": round(self.redraw_seconds, 3),
            "prefix_tokens_encoded": self.prefix_tokens,
            "join_seconds": round(self.join_seconds, 3),
            "wall_seconds": round(wall_seconds, 3),
            "share_outside_sampler": round(1 - self.seconds / wall_seconds, 3) if wall_seconds > 0 else None,
        }


class CountedSession:
    """A sampler session whose runs SamplerStats counts and times (a run is a
    "call"; its requests are counted as they are added)."""

    def __init__(self, stats: SamplerStats, sampler, session):
        self.stats, self.sampler, self.session = stats, sampler, session

    def add(self, requests: list) -> list[int]:
        self.stats.requests += len(requests)
        return self.session.add(requests)

    def run(self) -> list:
        with self.stats._counting(self.sampler):
            finished = self.session.run()
        self.stats.tokens += sum(len(out) for _, out in finished)
        return finished

    @property
    def pending(self) -> int:
        return self.session.pending


def run_interleaved(
    starts: Iterable[tuple[object, Callable[[], Iterator]]],
    session,
    in_flight: int,
    on_done: Callable[[object, object], None],
) -> None:
    """Drive request generators together through one sampler session.

    starts:     (key, start) pairs; start() returns a generator that yields lists
                of requests and finally returns its result
    session:    a gadiag_core.interfaces.SamplerSession
    in_flight:  at most this many generators started and not finished
    on_done:    called with (key, result) as each generator finishes (any order)

    A generator gets its outputs as soon as its own requests have all
    finished, and its next requests join the session at once: with the
    `prefix` sampler's stream they join the running decoding batch
    (continuous batching); with the default session every run is one sampler
    call holding everything pending. A new generator starts as soon as one
    finishes."""
    if in_flight < 1:
        raise ValueError("in_flight must be at least 1")
    pending_starts = iter(starts)
    # slot -> [key, generator, outputs so far, requests still out]
    waiting: dict[int, list] = {}
    owner: dict[int, tuple[int, int]] = {}  # ticket -> (slot, position)
    slots = iter(range(2**62))

    def advance(slot, key, generator, value=None, first=False) -> None:
        while True:
            try:
                requests = list(next(generator) if first else generator.send(value))
            except StopIteration as stop:
                on_done(key, stop.value)
                return
            if requests:
                break
            first, value = False, []  # nothing to sample: answer at once
        waiting[slot] = [key, generator, [None] * len(requests), len(requests)]
        for position, ticket in enumerate(session.add(requests)):
            owner[ticket] = (slot, position)

    def fill() -> None:
        while len(waiting) < in_flight:
            item = next(pending_starts, None)
            if item is None:
                return
            key, start = item
            advance(next(slots), key, start(), first=True)

    fill()
    while waiting:
        finished = session.run()
        if not finished:
            raise RuntimeError("the sampler session returned nothing with requests outstanding")
        for ticket, output in finished:
            slot, position = owner.pop(ticket)
            entry = waiting[slot]
            entry[2][position] = output
            entry[3] -= 1
            if entry[3] == 0:
                del waiting[slot]
                advance(slot, entry[0], entry[1], entry[2])
        fill()

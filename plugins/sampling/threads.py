"""How many torch threads the samplers use: a quick check that extra threads do not run slower than one."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional

import torch


SMALL_MODEL_PARAMETERS = 20_000_000
# One thread only when several run this much slower than one: other
# processes keep the cores busy (measured: 3.5 GFLOP/s on two threads against
# 87 on one). Not "when several are not at least 20% faster", the rule
# before: the probe below is too small for two threads to pay much on it (a
# median 1.19x at 128 rows on an idle 2-core machine) while the sampler's
# steps run about twice as fast on two, so that rule picked one thread in
# about one check of fifteen on an idle machine, and the sampler then ran 30 s
# at half speed (`python benchmarks/thread_choice.py`).
SLOWER_ON_MANY = 1.5
_THREAD_CHOICE: dict = {}  # (threads, width) -> (time checked, use one thread?)


def thread_probe(width: int, threads: int) -> tuple[float, float]:
    """Seconds of one decoding-sized matmul ([64, width] x [width, 4 width],
    best of three after a warm-up) on one thread and on `threads` threads;
    torch's setting is restored after."""
    a, b = torch.randn(64, width), torch.randn(width, 4 * width)
    saved = torch.get_num_threads()

    def best(n: int) -> float:
        torch.set_num_threads(n)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times[1:])

    try:
        return best(1), best(threads)
    finally:
        torch.set_num_threads(saved)


def prefer_one(one: float, many: float) -> bool:
    """Whether a probe's times say to use one thread: several threads ran
    SLOWER_ON_MANY times slower than one."""
    return many > SLOWER_ON_MANY * one


def _auto_threads(model) -> Optional[int]:
    """1 when extra torch threads would not pay, else None (torch's setting).

    Tiny models: their matmuls are too small to share. Otherwise a quick
    check (a few ms, redone at most every 30 s, `thread_probe`): one thread
    when the machine's other load makes several threads slower than one
    (`prefer_one`). Results do not depend on this (canonical.py)."""
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS:
        return 1
    n = torch.get_num_threads()
    try:
        device = next(model.parameters()).device
        width = int(model.config.hidden_size)
    except (StopIteration, AttributeError, TypeError, ValueError):
        return None
    if n <= 1 or device.type != "cpu":
        return None
    key = (n, width)
    checked = _THREAD_CHOICE.get(key)
    if checked is not None and time.monotonic() - checked[0] < 30:
        return 1 if checked[1] else None
    use_one = prefer_one(*thread_probe(width, n))
    _THREAD_CHOICE[key] = (time.monotonic(), use_one)
    return 1 if use_one else None


@contextmanager
def torch_threads(threads: Optional[int]):
    """The block runs with torch on `threads` threads (None: left as it is);
    the setting before is restored after."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(saved)


def sampling_threads(setting: Optional[int], model):
    """torch_threads for a sampler: its `threads` option, or (None) the quick
    check's choice for `model` (_auto_threads)."""
    return torch_threads(setting if setting is not None else _auto_threads(model))

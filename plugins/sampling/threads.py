"""How many torch threads the samplers use: a quick check that extra threads pay."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional

import torch


SMALL_MODEL_PARAMETERS = 20_000_000
_THREAD_CHOICE: dict = {}  # (threads, width) -> (time checked, use one thread?)


def _auto_threads(model) -> Optional[int]:
    """1 when extra torch threads would not pay, else None (torch's setting).

    Tiny models: their matmuls are too small to share. Otherwise a quick
    check (about 50 ms, redone at most every 30 s): one decoding-sized matmul
    on one thread and on all of torch's threads. When other processes keep
    the cores busy, several threads wait on each other and run slower than
    one (measured: 3.5 GFLOP/s on two threads against 87 on one), and the
    sampler then uses one. Results do not depend on this (canonical.py)."""
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
    a, b = torch.randn(64, width), torch.randn(width, 4 * width)

    def best(threads: int) -> float:
        torch.set_num_threads(threads)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times[1:])

    try:
        one, many = best(1), best(n)
    finally:
        torch.set_num_threads(n)
    use_one = many * 1.2 > one  # extra threads must buy at least 20%
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

"""Which parameters a params* space selects (gadiag_core.scoring.spaces):
every parameter, the last N transformer blocks, or a name regex."""

from __future__ import annotations

import re

import torch

from gadiag_core.errors import UsageError
from gadiag_core.scoring.space_spec import parse_space


# ----------------------------------------------------------------------------
# Selecting parameters


def unique_params(model) -> list[torch.nn.Parameter]:
    return list(dict.fromkeys(model.parameters()))


def _blocks(model) -> tuple[str, int]:
    """(name prefix of the ModuleList of transformer blocks, its length)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    expected = getattr(config, "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if expected is not None and len(module) != expected:
                continue
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[2]:
                best = (name, len(module), size)
    if best is None:
        raise UsageError(
            "params:last<N> cannot find the model's transformer blocks (a ModuleList of "
            f"config.num_hidden_layers = {expected} modules): select parameters with params:re:<regex>"
        )
    return best[0], best[1]


def _examples(model, k: int = 8) -> str:
    names = [n for n, _ in model.named_parameters()]
    if len(names) > k:
        names = names[: k // 2] + ["…"] + names[-(k // 2):]
    return ", ".join(names)


def select_parameters(model, space: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs a params* space selects, each parameter
    once, in model order. UsageError for a selector that matches nothing."""
    spec = parse_space(space)
    if spec.kind != "params":
        raise ValueError(f"space {space!r} selects no parameters")
    named = list(model.named_parameters(remove_duplicate=False))
    if spec.last:
        prefix, count = _blocks(model)
        if spec.last > count:
            raise UsageError(f"gradient space {space!r}: the model has only {count} transformer blocks ({prefix}.0 … {prefix}.{count - 1})")
        wanted = tuple(f"{prefix}.{i}." if prefix else f"{i}." for i in range(count - spec.last, count))
        keep = lambda name: name.startswith(wanted)  # noqa: E731
    elif spec.regex:
        pattern = re.compile(spec.regex)
        keep = lambda name: pattern.search(name) is not None  # noqa: E731
    else:
        keep = lambda name: True  # noqa: E731
    chosen: dict[int, tuple[str, torch.nn.Parameter]] = {}
    for name, param in named:
        if keep(name) and id(param) not in chosen:
            chosen[id(param)] = (name, param)
    if not chosen:
        raise UsageError(f"gradient space {space!r} selects no parameter of this model; parameter names look like: {_examples(model)}")
    order = {id(p): i for i, p in enumerate(unique_params(model))}
    return sorted(chosen.values(), key=lambda item: order[id(item[1])])

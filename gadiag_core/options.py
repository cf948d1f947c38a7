"""Typed plugin options: declared as data, checked in one place.

A plugin declares its options as a frozen dataclass whose fields are made with
`option(...)` (the way simonw/llm models declare ``Options`` and TRL declares
``GKDConfig``)::

    @dataclass(frozen=True)
    class JSDOptions:
        beta: float = option(0.5, "weight of the teacher in the mixture", min=0.0, max=1.0)

and passes it when it registers: ``register("jsd", factory, "…", options=JSDOptions)``.
The registry turns the user's raw table (``[objectives.jsd]``, ``--set
objectives.jsd.beta=0.9``) into an instance with `build_options`: unknown keys
get "did you mean" and the list of options, values are coerced (an int where a
float is declared), type-, range-, finiteness- and choice-checked, and every
message names the plugin and the option. `describe_options` gives the rows
`gadiag-harness list KIND NAME` prints.

This module imports no torch: `list` and `--help` stay light.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Optional

from gadiag_core.errors import UsageError, did_you_mean

# A value this large in an integer option is a typo, not a setting (and would
# overflow the C longs torch and the samplers use).
INT_LIMIT = 2**62


@dataclass(frozen=True)
class OptionInfo:
    """What `option()` records about one field (kept in the field's metadata)."""

    help: str = ""
    min: Optional[float] = None
    max: Optional[float] = None
    choices: Optional[tuple] = None
    min_exclusive: bool = False
    check: Optional[Callable[[Any], Any]] = None  # extra check: returns the value or raises ValueError


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    min: Optional[float] = None,
    max: Optional[float] = None,
    choices: Optional[typing.Iterable] = None,
    min_exclusive: bool = False,
    check: Optional[Callable[[Any], Any]] = None,
):
    """A dataclass field for a plugin option.

    default:        the value when the user sets nothing (lists are copied per instance)
    help:           one line for `list` and the README
    min, max:       inclusive bounds for numbers (``min_exclusive`` makes min strict)
    choices:        the allowed values
    check:          value -> value, raising ValueError with the reason (for anything else)
    """
    info = OptionInfo(help, min, max, tuple(choices) if choices is not None else None, min_exclusive, check)
    metadata = {"gadiag": info}
    if isinstance(default, (list, dict, set)):
        frozen = list(default) if isinstance(default, list) else default
        return dataclasses.field(default_factory=lambda: list(frozen) if isinstance(frozen, list) else frozen, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class NoOptions:
    """The options of a plugin that declares none."""


# ----------------------------------------------------------------------------
# Introspection


def fields_of(options_cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_cls)) if options_cls is not None else []


def _info(f: dataclasses.Field) -> OptionInfo:
    return f.metadata.get("gadiag", OptionInfo())


def default_of(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def _hints(options_cls) -> dict:
    try:
        return typing.get_type_hints(options_cls)
    except Exception:  # a forward reference we cannot resolve: fall back to the raw annotations
        return {f.name: f.type for f in dataclasses.fields(options_cls)}


def type_name(tp) -> str:
    """`float`, `int or none`, `list of str` … as users read them."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or none" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------
# Coercion and checks


class _Bad(ValueError):
    """A value of the wrong type (message: what was expected)."""


def _coerce_scalar(value, tp):
    """`value` as bool, int, float or str; numeric and boolean text (from the
    command line) is read; an int is accepted where a float is declared."""
    if isinstance(value, bool) and tp is not bool:
        raise _Bad({int: "an integer", float: "a number", str: "a string"}.get(tp, type_name(tp)))
    if tp is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, bool):
            return value
        raise _Bad("true or false")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        parse = int
    elif tp is float:
        if isinstance(value, int):
            return float(value)
        parse = float
    else:
        parse = None
    if isinstance(value, tp):
        return value
    if parse is not None and isinstance(value, str):
        try:
            return parse(value.strip())
        except ValueError:
            pass
    raise _Bad({int: "an integer", float: "a number", str: "a string"}.get(tp, type_name(tp)))


def _coerce(value, tp):
    """`value` as type `tp` (Any, a scalar, Optional/Union, list of …), or _Bad."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        text_none = isinstance(value, str) and value.strip().lower() in ("none", "null")
        if type(None) in args and (value is None or text_none):
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg)
                except _Bad:
                    pass
        raise _Bad(type_name(tp))
    if origin in (list, tuple) or tp in (list, tuple):
        item = args[0] if args else Any
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise _Bad("a " + type_name(tp))
        return [_coerce(v, item) for v in value]
    if tp in (bool, int, float, str) or isinstance(tp, type):
        return _coerce_scalar(value, tp)
    return value


def _check_number(value, info: OptionInfo) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if isinstance(value, int) and abs(value) > INT_LIMIT:
        raise ValueError(f"is too large (at most {INT_LIMIT:.3g})")
    if info.min is not None:
        if value < info.min or (info.min_exclusive and value == info.min):
            raise ValueError(f"must be {'>' if info.min_exclusive else '≥'} {info.min:g}")
    if info.max is not None and value > info.max:
        raise ValueError(f"must be ≤ {info.max:g}")


def check_value(value, tp, info: OptionInfo):
    """The coerced and checked value; ValueError says what is wrong."""
    try:
        value = _coerce(value, tp)
    except _Bad as exc:
        raise ValueError(f"must be {exc}") from None
    items = value if isinstance(value, list) else [value]
    for item in items:
        _check_number(item, info)
        if info.choices is not None and item is not None and item not in info.choices:
            raise ValueError(f"must be one of {', '.join(map(str, info.choices))}{did_you_mean(str(item), map(str, info.choices))}")
    if info.check is not None and value is not None:
        value = info.check(value)
    return value


def build_options(options_cls, raw: dict, owner: str):
    """An instance of `options_cls` from the user's `raw` table.

    owner: how messages name the plugin, e.g. "estimator 'targeted'".
    Raises UsageError naming the plugin, the option and the fix."""
    options_cls = options_cls or NoOptions
    # "[run]" names a table of harness.toml: messages say run.key = value.
    table = owner[1:-1] if owner.startswith("[") and owner.endswith("]") and " " not in owner else None
    if not isinstance(raw, dict):
        raise UsageError(f"{owner}: options must be a table of key = value, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = _hints(options_cls)
    for key in raw:
        if key not in fields:
            known = ", ".join(fields) if fields else "(it has none)"
            if table:
                raise UsageError(f"unknown key {table}.{key} in config.{did_you_mean(str(key), fields)} Keys of [{table}]: {known}")
            raise UsageError(f"{owner} has no option {key!r}.{did_you_mean(str(key), fields)} Options: {known}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            try:
                values[name] = check_value(raw[name], hints.get(name, Any), _info(f))
            except ValueError as exc:
                if table:
                    raise UsageError(f"{table}.{name} = {raw[name]!r} {exc}") from None
                raise UsageError(f"{owner}: option {name} = {raw[name]!r} {exc}") from None
        elif default_of(f) is MISSING:
            raise UsageError(f"{owner} needs option {name!r}: {_info(f).help or 'no default'}")
    try:
        return options_cls(**values)
    except (TypeError, ValueError) as exc:  # a __post_init__ cross-field check
        raise UsageError(f"{owner}: {exc}") from None


def as_dict(options) -> dict:
    """Plain dict of an options instance (for config.toml and messages)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def describe_options(options_cls) -> list[tuple[str, str, str, str, str]]:
    """(name, type, default, range, help) rows, in declaration order."""
    rows = []
    hints = _hints(options_cls) if options_cls is not None else {}
    for f in fields_of(options_cls):
        info = _info(f)
        default = default_of(f)
        bounds = []
        if info.min is not None:
            bounds.append(f"{'>' if info.min_exclusive else '≥'} {info.min:g}")
        if info.max is not None:
            bounds.append(f"≤ {info.max:g}")
        if info.choices is not None:
            bounds.append(" | ".join(map(str, info.choices)))
        shown = "required" if default is MISSING else ("off" if default is None else repr(default))
        rows.append((f.name, type_name(hints.get(f.name, Any)), shown, ", ".join(bounds), info.help))
    return rows

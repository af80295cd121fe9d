"""Dotted `key=value` overrides of any config dataclass (`TPOConfig`, `RunConfig`), the one parser behind
every `--set` of the command-line tools.

    cfg = apply_overrides(get_config("tiny"), ["llm.num_layers=4", "dtype=bfloat16"])

A value is read as the type of the field it replaces (int, float, bool, str, tuple, dict), or, for an optional
field that is None now, as its declared type (`optim.lr: float | None` reads `1e-3` as a float); a float must
be finite (`nan`, `inf` are errors); `none` sets an optional field to None; a key inside a dict field
(`loss_weights.region=2`) replaces that one entry. Every problem is one `ConfigError` naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import types
import typing
from typing import Any, Mapping, Sequence

from tpo_jax import config as C
from tpo_jax.config import ConfigError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_value(text: str, current: Any, key: str, declared: Any = None) -> Any:
    """`text` as the type of the field's current value (or, when that is None, as the `declared` type)."""
    def bad(expected):
        raise ConfigError(f"config field '{key}': cannot read {text!r} as {expected}")

    low = text.strip().lower()
    if low in ("none", "null") and current is None:
        return None
    if current is None and declared in (bool, int, float, str):
        current = declared()  # an optional scalar that is None now: read the value as its declared type
    if isinstance(current, bool):
        if low in _TRUE + _FALSE:
            return low in _TRUE
        bad("a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            bad("an integer")
    if isinstance(current, float):
        try:
            value = float(text)
        except ValueError:
            bad("a number")
        if not math.isfinite(value):
            bad("a finite number (a float field must be finite)")
        return value
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        value = _literal(text)
        if isinstance(value, (tuple, list)):
            return tuple(value)
        return tuple(_literal(p.strip()) for p in text.split(",") if p.strip())
    if isinstance(current, Mapping):
        value = _literal(text)
        if not isinstance(value, Mapping):
            bad("a dict, e.g. \"{'a': 1.0}\"")
        return dict(value)
    if current is None:
        return _literal(text)
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"config field '{key}' is a section; set one of its fields, e.g. "
                          f"'{key}.{dataclasses.fields(current)[0].name}=...'")
    return _literal(text)


def _lookup(cfg, key: str):
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if dataclasses.is_dataclass(obj):
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                raise ConfigError(f"unknown override key '{key}': {type(obj).__name__}"
                                  f"{' at ' + repr(where) if where else ''} has no field {part!r}; "
                                  f"fields: {', '.join(names)}")
            obj = getattr(obj, part)
        elif isinstance(obj, Mapping):
            if part not in obj:
                raise ConfigError(f"unknown override key '{key}': {where!r} has no entry {part!r}; "
                                  f"entries: {', '.join(map(str, obj))}")
            obj = obj[part]
        else:
            raise ConfigError(f"unknown override key '{key}': {where!r} is a value, not a section")
    return obj


def _declared(cfg, parts: list[str]) -> tuple[bool, Any]:
    """(whether the dataclass field at `parts` is declared as `... | None`, its one non-None type or None)."""
    parent = _lookup(cfg, ".".join(parts[:-1])) if len(parts) > 1 else cfg
    if not dataclasses.is_dataclass(parent):
        return False, None
    tp = typing.get_type_hints(type(parent)).get(parts[-1])
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return False, tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return type(None) in typing.get_args(tp), args[0] if len(args) == 1 else None


def apply_override(cfg: Any, item: str) -> Any:
    """Apply one `dotted.key=value`."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    key, text = (s.strip() for s in item.split("=", 1))
    current = _lookup(cfg, key)
    parts = key.split(".")
    optional, declared = _declared(cfg, parts)
    if text.lower() in ("none", "null") and optional:
        return C.replace(cfg, **{key: None})
    value = parse_value(text, current, key, declared)
    # a key inside a dict field (e.g. loss_weights.region): replace the whole dict
    for i in range(len(parts) - 1, 0, -1):
        parent = _lookup(cfg, ".".join(parts[:i]))
        if isinstance(parent, Mapping):
            inner = dict(parent)
            inner[parts[i]] = value
            value, parts = inner, parts[:i]
        else:
            break
    return C.replace(cfg, **{".".join(parts): value})


def apply_overrides(cfg: Any, items: Sequence[str]) -> Any:
    """`cfg` with every `dotted.key=value` of `items` applied in order, then validated (`cfg.validate()`)."""
    for item in items:
        cfg = apply_override(cfg, item)
    return cfg.validate() if hasattr(cfg, "validate") else cfg

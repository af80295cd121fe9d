"""Pytree leaves by path: the one set of helpers for "which parameter is this" across the project.

A path is a tuple of string keys from the root (`("llm", "layers", "0", "self_attn", "q_proj", "kernel")`);
an `nnx.Variable`'s `.value` attribute is not part of it, so the same parameter has the same path in an
`nnx.State`, its pure-dict form and a restored checkpoint.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax


def key_name(k) -> str | None:
    """One key of a JAX key path as a string (None for an `nnx.Variable`'s `value` attribute)."""
    if isinstance(k, jax.tree_util.GetAttrKey):
        return None if k.name == "value" else k.name
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def keypath_to_path(keypath) -> tuple[str, ...]:
    """A JAX key path (`tree_flatten_with_path`) as a path of string keys."""
    return tuple(n for n in (key_name(k) for k in keypath) if n is not None)


def leaf_paths(tree) -> list[tuple[tuple[str, ...], Any]]:
    """(path, leaf) of every leaf, in flattening order."""
    return [(keypath_to_path(kp), leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """{path: leaf} → a nested dict {key: {key: ... leaf}}."""
    out: dict = {}
    for path, leaf in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = leaf
    return out


def replace_by_path(tree, values: Mapping) -> Any:
    """`tree` with every leaf whose path is in the nested dict `values` replaced by that value."""
    flat = dict(leaf_paths(values))
    leaves = [flat.get(p, x) for p, x in leaf_paths(tree)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), leaves)

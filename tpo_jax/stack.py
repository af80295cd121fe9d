"""Layer stacks: built as a list of layers or stacked on a leading `layers` axis, run by one loop or `lax.scan`,
with a named rematerialisation policy around each layer.

Every repeated block of the model (the LLM's decoder layers, the ViT blocks, the Q-Former's groups of
`cross_attention_freq` layers) goes through the two functions here, driven by the stack's `StackConfig`:

* `build_stack(make, count, scan=...)`: `scan=False` gives an `nnx.List` of `count` layers (parameter paths
  `….{i}.…`); `scan=True` gives one layer whose parameters carry a leading axis of size `count` with logical
  name `layers` (paths without the index). Both draw their initial values from the same `rngs` stream, but
  not the same values: parity between the layouts is checked on the same weights (`stack_params`).
* `run_stack(body, groups, carry, xs, ...)`: applies `body(layers, carry, x) -> (carry, y)` once per step,
  threading `carry` and stacking the `y`s. In scanned mode the step is one `lax.scan` over the stacked
  parameters and `xs`; unrolled, a Python loop. The remat policy wraps the step (`jax.checkpoint`), the same
  function in both modes, so the two give the same numbers.

`StackLayout` says how a stacked parameter path relates to the unrolled ones (what checkpoint conversion reads
and writes): stacked `{stacked}{rest}` index `g` holds unrolled `{unrolled with i = start + g·step}{rest}`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tpo_jax.config import CHECKPOINT_NAMES, REMAT_POLICIES, StackConfig

LAYERS_AXIS = "layers"  # logical axis name of the stacked layer dim (replicated by every strategy)


# ------------------------------------------------------------------------------------------------ building

def build_stack(make: Callable[[nnx.Rngs], nnx.Module], count: int, *, scan: bool,
                rngs: nnx.Rngs | None) -> nnx.Module:
    """`count` layers made by `make(rngs)`: an `nnx.List`, or (scan) one module with stacked parameters."""
    if not scan:
        return nnx.List([make(rngs) for _ in range(count)])
    rngs = nnx.Rngs(0) if rngs is None else rngs  # shape-only builds pass None; vmap needs a key to split

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def stacked(r):
        return make(r)

    return stacked(rngs)


# ------------------------------------------------------------------------------------------------ remat

def remat_policy(name: str, save: Sequence[str] = ()):
    """The `jax.checkpoint` policy of remat policy `name` (None for "none": no remat at all)."""
    policies = jax.checkpoint_policies
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; known: {list(REMAT_POLICIES)}")
    unknown = sorted(set(save) - set(CHECKPOINT_NAMES))
    if unknown:
        raise ValueError(f"unknown activation name(s) {unknown} to save; known: {list(CHECKPOINT_NAMES)}")
    return {
        "none": None,
        "full": policies.nothing_saveable,
        "dots_saveable": policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable,
        "custom": policies.save_only_these_names(*save),
    }[name]


def name(x: jax.Array, tag: str) -> jax.Array:
    """Tag an activation so remat policy "custom" can save it by name (identity otherwise)."""
    return checkpoint_name(x, tag)


# ------------------------------------------------------------------------------------------------ running

def run_stack(body: Callable[..., tuple[Any, Any]], groups: Sequence[nnx.Module] | Sequence[Sequence[nnx.Module]],
              carry: Any, xs: Any, *, cfg: StackConfig, length: int) -> tuple[Any, Any]:
    """Apply `body(layers, carry, x) -> (carry, y)` `length` times; return (final carry, stacked ys).

    groups: scanned mode: a tuple of stacked modules (each with leading axis `length`); `layers` is the tuple
    of their per-step slices. Unrolled: a sequence of `length` tuples of modules, one tuple per step.
    xs: a pytree whose leaves have leading axis `length` (or None). ys: leaves with leading axis `length`
    (None if `body` returns None).
    """
    policy = remat_policy(cfg.remat_policy, cfg.remat_save)

    def pure(graphdefs, states, carry, x):
        layers = tuple(nnx.merge(g, s) for g, s in zip(graphdefs, states))
        return body(layers, carry, x)

    if cfg.scan_layers:
        graphdefs, states = zip(*(nnx.split(m) for m in groups))
        step = _remat(pure, policy, static=(0,), prevent_cse=False)
        return jax.lax.scan(lambda c, sx: step(graphdefs, sx[0], c, sx[1]), carry, (states, xs), length=length)

    step = _remat(pure, policy, static=(0,), prevent_cse=True)
    ys = []
    for i, layers in enumerate(groups):
        graphdefs, states = zip(*(nnx.split(m) for m in layers))
        x = None if xs is None else jax.tree.map(lambda a: a[i], xs)
        carry, y = step(graphdefs, states, carry, x)
        ys.append(y)
    if not ys or ys[0] is None:
        return carry, None
    return carry, jax.tree.map(lambda *a: jax.numpy.stack(a), *ys)


def _remat(fn, policy, *, static, prevent_cse):
    if policy is None:
        return fn
    return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse, static_argnums=static)


# ------------------------------------------------------------------------------------------------ layouts

@dataclasses.dataclass(frozen=True)
class StackLayout:
    """Stacked parameter paths `{stacked}{rest}` (leading axis `count`) ↔ unrolled `{unrolled}{rest}`.

    Index g of the stacked array is unrolled layer i = start + g·step (`unrolled` holds `{i}`).
    """

    stacked: str  # e.g. "llm.layers."
    unrolled: str  # e.g. "llm.layers.{i}."
    count: int
    start: int = 0
    step: int = 1

    def layer(self, g: int) -> int:
        return self.start + g * self.step

    def unrolled_path(self, rest: str, g: int) -> str:
        return self.unrolled.format(i=self.layer(g)) + rest


def stack_rest(layouts: Sequence[StackLayout], path: str) -> tuple[StackLayout, str] | None:
    """(layout, rest) when `path` is a stacked parameter of one of `layouts`, else None."""
    for layout in layouts:
        if path.startswith(layout.stacked):
            rest = path[len(layout.stacked):]
            if not rest.split(".", 1)[0].isdigit():  # `llm.layers.0.…` is an unrolled path, not a stacked one
                return layout, rest
    return None


def _parts(layout: StackLayout) -> re.Pattern:
    before, after = layout.unrolled.split("{i}", 1)
    return re.compile(re.escape(before) + r"(\d+)" + re.escape(after) + r"(.+)\Z")


def locate(layouts: Sequence[StackLayout], path: str) -> tuple[StackLayout, str, int] | None:
    """(layout, stacked path, index g) when `path` is layer i = start + g·step of one of `layouts`, else None."""
    for layout in layouts:
        m = _parts(layout).match(path)
        if m is None:
            continue
        off = int(m.group(1)) - layout.start
        if off >= 0 and off % layout.step == 0 and off // layout.step < layout.count:
            return layout, layout.stacked + m.group(2), off // layout.step
    return None


def unstack_shapes(shapes: dict[str, tuple[int, ...]], layouts: Sequence[StackLayout]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes with every stacked path replaced by its per-layer paths and shapes."""
    out = {}
    for path, shape in shapes.items():
        found = stack_rest(layouts, path)
        if found is None:
            out[path] = tuple(shape)
            continue
        layout, rest = found
        if not shape or shape[0] != layout.count:
            raise ValueError(f"stacked parameter {path} has shape {tuple(shape)}, expected a leading axis of "
                             f"{layout.count} layers")
        for g in range(layout.count):
            out[layout.unrolled_path(rest, g)] = tuple(shape[1:])
    return out


def stack_params(flat: dict[str, Any], layouts: Sequence[StackLayout]) -> dict[str, Any]:
    """Unrolled `{path: array}` → stacked: each group of per-layer arrays becomes one array (NumPy or JAX).
    Paths of no layout pass through. The inverse of `unstack_params`."""
    out, groups = {}, {}
    for path, value in flat.items():
        found = locate(layouts, path)
        if found is None:
            out[path] = value
        else:
            _, stacked, g = found
            groups.setdefault(stacked, {})[g] = value
    for path, parts in groups.items():
        values = [parts[g] for g in sorted(parts)]
        xp = np if all(isinstance(v, np.ndarray) for v in values) else jax.numpy
        out[path] = xp.stack(values)
    return out


def unstack_params(flat: dict[str, Any], layouts: Sequence[StackLayout]) -> dict[str, Any]:
    """Stacked `{path: array}` → one entry per layer (slices of the stacked arrays)."""
    out = {}
    for path, value in flat.items():
        found = stack_rest(layouts, path)
        if found is None:
            out[path] = value
            continue
        layout, rest = found
        for g in range(layout.count):
            out[layout.unrolled_path(rest, g)] = value[g]
    return out

"""Tests' helper: the scanned twin of an unrolled module, holding exactly its weights."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax.stack import stack_params


def scanned_copy(unrolled: nnx.Module, build_scanned, layouts) -> nnx.Module:
    """The module `build_scanned()` (a scanned config) with the unrolled module's weights stacked into it."""
    graphdef, state = nnx.split(nnx.eval_shape(build_scanned))
    values = {".".join(map(str, p)): np.asarray(v.get_value())
              for p, v in nnx.to_flat_state(nnx.state(unrolled, nnx.Param))}
    stacked = stack_params(values, layouts)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    params = {p for p, v in flat.items() if isinstance(v, nnx.Param)}
    assert params == set(stacked), sorted(params ^ set(stacked))[:5]
    for path in params:
        flat[path].set_value(jnp.asarray(stacked[path]))
    return nnx.merge(graphdef, state)

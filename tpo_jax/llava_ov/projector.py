"""LLaVA-OV multimodal projector: vision features → LLM width, `linear_2(GELU(linear_1(x)))`.

transformers `LlavaOnevisionMultiModalProjector` with `projector_hidden_act = "gelu"` (the exact, erf GELU)
and `multimodal_projector_bias = True`. One vision feature layer, so linear_1 takes `vision hidden` inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax import layers
from tpo_jax.layers import Linear
from tpo_jax.sharding import constrain


class MultiModalProjector(nnx.Module):
    """x (…, vision_hidden) → (…, llm_hidden): linear_1 → exact GELU → linear_2."""

    def __init__(self, vision_hidden: int, llm_hidden: int, *, bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Linear(vision_hidden, llm_hidden, axes=("embed", "mlp"), **kw)
        self.linear_2 = Linear(llm_hidden, llm_hidden, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.gelu(self.linear_1(x))
        if h.ndim == 3:
            h = constrain(h, "batch", "length", "act_mlp")
        return self.linear_2(h)

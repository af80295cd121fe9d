"""LoRA linear layers (PEFT semantics) and merging/unmerging them into the base kernels.

y = x @ W + s * dropout(x) @ A @ B with A: (in, r), B: (r, out), s = alpha / r.
A starts uniform in ±1/sqrt(in) (PEFT's kaiming-uniform with a = sqrt(5)), B starts at zero, so a
fresh adapter leaves the base model unchanged. `merge_lora` folds s·A·B into the kernels (for
inference or export) and `unmerge_lora` takes it back out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax.layers import Axes, Linear, default_kernel_init, dropout, param


def _lora_a_init(key, shape, dtype):
    bound = shape[0] ** -0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRALinear(Linear):
    """A `Linear` (no bias by default) with a low-rank adapter on top."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, dropout_rate: float = 0.0,
                 axes: Axes = ("embed", "mlp"), use_bias: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, kernel_init=default_kernel_init, rngs: nnx.Rngs):
        super().__init__(in_features, out_features, axes=axes, use_bias=use_bias, dtype=dtype,
                         param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.rank, self.alpha, self.dropout_rate = rank, alpha, dropout_rate
        self.lora_a = param(rngs, _lora_a_init, (in_features, rank), (axes[0], "lora_rank"), param_dtype)
        self.lora_b = param(rngs, nnx.initializers.zeros, (rank, out_features), ("lora_rank", axes[1]), param_dtype)
        self.merged = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> jax.Array:
        """s · A · B in float32, the change LoRA makes to the kernel."""
        return self.scaling * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        y = super().__call__(x)
        if self.merged:
            return y
        h = dropout(x.astype(self.dtype), self.dropout_rate, rng)
        h = jnp.dot(h, self.lora_a[...].astype(self.dtype))
        return y + self.scaling * jnp.dot(h, self.lora_b[...].astype(self.dtype))


def _lora_modules(model: nnx.Module):
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)]


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel in place (W ← W + s·A·B); the adapter path is then skipped."""
    for m in _lora_modules(model):
        if not m.merged:
            m.kernel[...] = (m.kernel[...].astype(jnp.float32) + m.delta()).astype(m.kernel[...].dtype)
            m.merged = True
    return model


def unmerge_lora(model: nnx.Module) -> nnx.Module:
    """Undo `merge_lora` in place (W ← W − s·A·B)."""
    for m in _lora_modules(model):
        if m.merged:
            m.kernel[...] = (m.kernel[...].astype(jnp.float32) - m.delta()).astype(m.kernel[...].dtype)
            m.merged = False
    return model


def is_lora_param(path: tuple, _value=None) -> bool:
    """nnx filter: True for adapter weights (`lora_a` / `lora_b`)."""
    return bool(path) and path[-1] in ("lora_a", "lora_b")

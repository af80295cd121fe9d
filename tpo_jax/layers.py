"""Shared building blocks: parameters with logical axis names, Linear, norms, dropout (attention: `tpo_jax.attention`).

Conventions used by every module in `tpo_jax`:
* Linear kernels are stored (in, out) (the transpose of a PyTorch weight); biases (out,).
* Every parameter carries logical axis names (`out_sharding` metadata, read back with
  `nnx.get_partition_spec`); `tpo_jax.sharding` maps them onto mesh axes.
* Modules take `rng: jax.Array | None` at call time for dropout; `None` means deterministic.
* Compute happens in `dtype`; norms and softmax are computed in float32.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]
Axes = tuple[str | None, ...]

# Fan-in scaled (LeCun normal): keeps activations O(1) at any width, so small models built from
# scratch (the tiny preset) pass signal from pixels to the heads; real runs load pretrained weights.
default_kernel_init = nnx.initializers.lecun_normal()
embedding_init = nnx.initializers.normal(stddev=0.02)


def param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int], axes: Axes,
          dtype=jnp.float32) -> nnx.Param:
    """A parameter created with `init` and annotated with the logical `axes` (one name per dim)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match parameter shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `rng` is None or `rate` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def split_rng(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    """`n` independent keys, or `n` Nones when running deterministically."""
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))


class Linear(nnx.Module):
    """y = x @ kernel + bias with kernel (in, out)."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes = ("embed", "mlp"),
                 use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init: Initializer = default_kernel_init, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
        self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), (axes[1],), param_dtype)
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table (num_embeddings, features)."""

    def __init__(self, num_embeddings: int, features: int, *, axes: Axes = ("vocab", "embed"),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, embedding_init, (num_embeddings, features), axes, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with learned scale and bias, computed in float32."""

    def __init__(self, features: int, *, eps: float, axis_name: str | None = "norm", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, nnx.initializers.ones, (features,), (axis_name,), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (features,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm as in Mistral/Llama: normalise in float32, cast back, then multiply by the weight."""

    def __init__(self, features: int, *, eps: float, axis_name: str | None = "norm", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, nnx.initializers.ones, (features,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's nn.GELU() default."""
    return jax.nn.gelu(x, approximate=False)


class MLP(nnx.Module):
    """Linear layers with ReLU between them (none after the last): dims = (in, hidden..., out)."""

    def __init__(self, dims: Sequence[int], *, axes: Sequence[Axes] | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if len(dims) < 2:
            raise ValueError(f"MLP needs at least (in, out) dims, got {tuple(dims)}")
        axes = axes or [("embed", "mlp")] * (len(dims) - 1)
        self.layers = nnx.List([
            Linear(d_in, d_out, axes=ax, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for d_in, d_out, ax in zip(dims[:-1], dims[1:], axes)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x

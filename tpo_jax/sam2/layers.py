"""Small channels-last building blocks of the SAM2 image path: 2-D convolutions, the 2×2 stride-2 transposed
convolution of the mask decoder, an MLP with a chosen activation, max-pooling and torch-exact bicubic resizing.

Layouts (PyTorch → ours, converted by `tpo_jax.checkpoints.tables.sam2`): Conv2d weight (O, I, kh, kw) → kernel
(kh, kw, I, O); ConvTranspose2d weight (I, O, kh, kw) → kernel (kh, kw, I, O); Linear weight (out, in) → (in, out).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax.layers import Linear, param


class Conv2d(nnx.Module):
    """NHWC convolution with a (kh, kw, I / groups, O) kernel, symmetric zero padding, stride, groups (depthwise
    with groups = I = O) and a bias; `in_axis` / `out_axis` are the kernel's logical channel axes."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
                 groups: int = 1, in_axis: str | None = "embed", out_axis: str | None = "mlp",
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None):
        self.stride, self.padding, self.groups, self.dtype = stride, padding, groups, dtype
        k = kernel_size
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = param(rngs, init, (k, k, in_features // groups, out_features), (None, None, in_axis, out_axis),
                            param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (out_features,), (out_axis,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        if kernel.shape[:2] == (1, 1) and self.stride == 1 and self.padding == 0 and self.groups == 1:
            y = jnp.einsum("bhwc,co->bhwo", x.astype(self.dtype), kernel[0, 0])
        else:
            p = self.padding
            y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel, (self.stride, self.stride),
                                             ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=self.groups)
        return y + self.bias[...].astype(self.dtype)


class ConvTranspose2x2(nnx.Module):
    """ConvTranspose2d(kernel 2, stride 2): every input pixel writes its own 2×2 output block (no overlap)."""

    def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None):
        self.dtype = dtype
        init = nnx.initializers.lecun_normal(in_axis=2, out_axis=3)
        self.kernel = param(rngs, init, (2, 2, in_features, out_features), (None, None, "embed", "mlp"), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (out_features,), ("mlp",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        y = jnp.einsum("bhwc,ijco->bhiwjo", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y.reshape(b, 2 * h, 2 * w, -1) + self.bias[...].astype(self.dtype)


class MLP(nnx.Module):
    """`num_layers` Linear layers in → hidden … → out with `act` between them (upstream `sam2_utils.MLP`);
    `sigmoid_output` applies a sigmoid at the end. Params: layers.{k}.{kernel,bias}."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, *,
                 act: Callable[[jax.Array], jax.Array] = jax.nn.relu, sigmoid_output: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None):
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.act, self.sigmoid_output = act, sigmoid_output
        self.layers = nnx.List([
            Linear(a, b, axes=("embed", "mlp") if k == 0 else ("mlp", "embed") if k == num_layers - 1
                   else ("mlp", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for k, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])

    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.layers)
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < n - 1:
                x = self.act(x)
        return jax.nn.sigmoid(x) if self.sigmoid_output else x


def max_pool(x: jax.Array, stride: Sequence[int]) -> jax.Array:
    """MaxPool2d(kernel = stride, ceil_mode=False) on NHWC: trailing rows/cols that do not fill a window drop."""
    b, h, w, c = x.shape
    sh, sw = stride
    ho, wo = h // sh, w // sw
    x = x[:, : ho * sh, : wo * sw]
    return x.reshape(b, ho, sh, wo, sw, c).max(axis=(2, 4))


@functools.lru_cache(maxsize=32)
def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's bicubic resize (align_corners=False, A = −0.75, edge-clamped taps)."""
    a = -0.75
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        x0 = int(np.floor(src))
        t = src - x0
        ws = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
              ((a + 2) * t - (a + 3)) * t * t + 1,
              ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
              ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
        for k, wk in enumerate(ws):
            m[i, min(max(x0 - 1 + k, 0), n_in - 1)] += wk
    return m.astype(np.float32)


def bicubic_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(..., H, W, C) → (..., h, w, C), PyTorch `F.interpolate(mode="bicubic", align_corners=False)`."""
    mh = jnp.asarray(_bicubic_matrix(x.shape[-3], size[0]))
    mw = jnp.asarray(_bicubic_matrix(x.shape[-2], size[1]))
    y = jnp.einsum("ih,...hwc->...iwc", mh, x.astype(jnp.float32), precision="highest")
    return jnp.einsum("jw,...iwc->...ijc", mw, y, precision="highest")

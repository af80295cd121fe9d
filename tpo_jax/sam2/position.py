"""Sine position encoding of a feature map (SAM2's `PositionEmbeddingSine`), channels-last.

Used by the FPN neck (`tpo_jax.sam2.neck`, d = 256 per level) and the memory encoder (d = 64).

For a map of height H and width W and an output of `dim` channels (dim even, n = dim / 2 per axis):

    y_i = i / (H + ε) · scale,  x_j = j / (W + ε) · scale          i = 1..H, j = 1..W (normalize=True, ε = 1e-6)
    ω_k = temperature ** (2·⌊k/2⌋ / n)                               k = 0..n−1
    P_y[i, k] = sin(y_i / ω_k) for even k, cos(y_i / ω_k) for odd k  (same for P_x with x_j)
    PE[i, j] = concat(P_y[i], P_x[j])                                (y first, then x)

With normalize=False the raw 1-based indices are used (scale ignored). The table depends only on static
(H, W, dim), so it is computed once on the host in float32 (as upstream does, in fp32) and enters a jitted
program as a constant. TPO's own copy computes this table in bf16 (MODEL-SPEC §7.4); we follow upstream fp32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def _table(height: int, width: int, dim: int, temperature: float, normalize: bool, scale: float) -> np.ndarray:
    n = dim // 2
    ys = np.arange(1, height + 1, dtype=np.float32)
    xs = np.arange(1, width + 1, dtype=np.float32)
    if normalize:
        eps = np.float32(1e-6)
        ys = ys / (ys[-1] + eps) * np.float32(scale)
        xs = xs / (xs[-1] + eps) * np.float32(scale)
    k = np.arange(n, dtype=np.float32)
    omega = np.power(np.float32(temperature), (2.0 * np.floor(k / 2.0) / n).astype(np.float32)).astype(np.float32)

    def axis_code(v):
        a = v[:, None] / omega  # (L, n)
        out = np.empty_like(a)
        out[:, 0::2] = np.sin(a[:, 0::2])
        out[:, 1::2] = np.cos(a[:, 1::2])
        return out

    py, px = axis_code(ys), axis_code(xs)  # (H, n), (W, n)
    pe = np.concatenate([np.broadcast_to(py[:, None, :], (height, width, n)),
                         np.broadcast_to(px[None, :, :], (height, width, n))], axis=-1)
    pe = np.ascontiguousarray(pe, dtype=np.float32)
    pe.setflags(write=False)
    return pe


def sine_position_encoding(height: int, width: int, dim: int, *, temperature: float = 10000.0,
                           normalize: bool = True, scale: float | None = None, dtype=jnp.float32) -> jax.Array:
    """(height, width, dim) sine position encoding of an H×W map (see module docstring), cast to `dtype`.

    `scale` defaults to 2π; passing it with normalize=False is an error (as upstream).
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"sine position encoding: dim must be a positive even number, got {dim}")
    if height <= 0 or width <= 0:
        raise ValueError(f"sine position encoding: height and width must be positive, got {height}x{width}")
    if scale is not None and not normalize:
        raise ValueError("sine position encoding: scale needs normalize=True")
    scale = 2.0 * math.pi if scale is None else float(scale)
    return jnp.asarray(_table(int(height), int(width), int(dim), float(temperature), bool(normalize), scale),
                       dtype=dtype)

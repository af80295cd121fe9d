"""2-D axial rotary position encoding of SAM2's memory attention (upstream `compute_axial_cis`,
`apply_rotary_enc`).

Token n of an (H, W) grid (row-major, the order of `flatten(2)` on NCHW features) sits at x = n mod W,
y = ⌊n / W⌋. With head dim D, the D/2 channel pairs (2i, 2i+1) are rotated: the first D/4 pairs by x·f_k,
the last D/4 by y·f_k, with f_k = θ^(−4k/D), k = 0 … D/4−1. The tables are numpy constants (static shapes).

`grid_dtype="bfloat16"` reproduces the released TPO copy of SAM2 (MODEL-SPEC §7.4): it builds the flat index
arange(H·W) in bf16, so every index above 256 that bf16 cannot represent is rounded (to nearest, ties to
even) *before* the x/y split, e.g. 257 → 256 → (0, 8) and 1023 → 1024 → (0, 32) on a 32×32 grid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np


def axial_positions(height: int, width: int, grid_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) float32 positions of the H·W tokens, as upstream `init_t_xy(end_x=width, end_y=height)`."""
    t = np.arange(height * width, dtype=np.float32)
    if grid_dtype == "bfloat16":
        t = t.astype(ml_dtypes.bfloat16).astype(np.float32)
    elif grid_dtype != "float32":
        raise ValueError(f"rope grid_dtype: expected 'float32' or 'bfloat16', got {grid_dtype!r}")
    return np.mod(t, np.float32(width)), np.floor(t / np.float32(width))


@functools.lru_cache(maxsize=32)
def axial_rope_table(head_dim: int, height: int, width: int, theta: float = 10000.0,
                     grid_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (H·W, head_dim // 2) float32: the angle of each channel pair of each token."""
    if head_dim % 4:
        raise ValueError(f"axial RoPE needs a head dim divisible by 4, got {head_dim}")
    freqs = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 4, dtype=np.float32)[: head_dim // 4]
                                          / np.float32(head_dim)))).astype(np.float32)
    x, y = axial_positions(height, width, grid_dtype)
    angles = np.concatenate([np.outer(x, freqs), np.outer(y, freqs)], axis=-1).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    cos.setflags(write=False)
    sin.setflags(write=False)
    return cos, sin


def apply_rope(x: jax.Array, cos: np.ndarray | jax.Array, sin: np.ndarray | jax.Array) -> jax.Array:
    """Rotate the interleaved channel pairs of x (B, N, heads, D) by the angles of tokens 0 … N−1.

    `cos`/`sin` (N0, D/2) with N a multiple of N0 tile over the tokens (`rope_k_repeat`: memory frames of
    the same grid get the same positions). Computed in float32, returned in x's dtype."""
    n, n0 = x.shape[1], cos.shape[0]
    if n % n0:
        raise ValueError(f"RoPE: {n} tokens is not a multiple of the {n0}-token grid")
    reps = n // n0
    cos = jnp.tile(jnp.asarray(cos), (reps, 1))[None, :, None, :]
    sin = jnp.tile(jnp.asarray(sin), (reps, 1))[None, :, None, :]
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    a, b = x32[..., 0], x32[..., 1]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)

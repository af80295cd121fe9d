"""Hiera image-encoder trunk of SAM2 (upstream `sam2.modeling.backbones.hieradet.Hiera`), channels-last.

    image (B, S, S, 3) ─ patch_embed (7×7 conv, stride 4) ─ + pos embed ─ blocks ─► one map per stage
                                                                                   (B, S/4·2⁻ˢ, …, C·2ˢ)

Position embedding: the background table `pos_embed` (bkg h × bkg w, C) is resized bicubically (PyTorch
semantics) to the patch grid, and the window table `pos_embed_window` (w0, w0, C) is tiled over it.

Block (`MultiScaleBlock`): pre-norm; attention inside non-overlapping windows of the block's size (zero-padded to
a multiple; 0 = global); the first block of a new stage widens the channels (`proj` on the normed input, pooled
for the shortcut) and max-pools the queries 2×2, so the map halves; then a GELU MLP. The first block of a stage
still uses the previous stage's window (halved by the pooling), as upstream.

Params (upstream names, see `tpo_jax.checkpoints.tables.sam2`): patch_embed.proj.{kernel,bias}, pos_embed
(1, h, w, C), pos_embed_window (1, w0, w0, C), blocks.{i}.{norm1,norm2}.{scale,bias}, blocks.{i}.attn.qkv,
blocks.{i}.attn.proj, blocks.{i}.mlp.layers.{0,1}, blocks.{i}.proj (stage-opening blocks only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax.attention import attention
from tpo_jax.layers import LayerNorm, Linear, gelu, param
from tpo_jax.sam2.config import HieraConfig
from tpo_jax.sam2.layers import MLP, Conv2d, bicubic_resize, max_pool


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """(B, H, W, C) → (B·nh·nw, window, window, C), zero-padding H and W up to multiples of `window`."""
    b, h, w, c = x.shape
    ph, pw = (-h) % window, (-w) % window
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(x: jax.Array, window: int, padded: tuple[int, int], hw: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`: windows → (B, H, W, C) with the padding cut off."""
    hp, wp = padded
    b = x.shape[0] // ((hp // window) * (wp // window))
    x = x.reshape(b, hp // window, wp // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, : hw[0], : hw[1]]


class MultiScaleAttention(nnx.Module):
    """Self-attention over a (B, H, W, C) map with optional 2×2 query max-pooling (output (B, H', W', C_out))."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: tuple[int, int] | None, *, dtype,
                 param_dtype, rngs):
        self.num_heads, self.q_stride, self.dtype = num_heads, q_stride, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Linear(dim, 3 * dim_out, axes=("embed", "qkv"), **kw)
        self.proj = Linear(dim_out, dim_out, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, HW, heads, hd)
        if self.q_stride:
            q = max_pool(q.reshape(b, h, w, -1), self.q_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        out = attention(q, k, v).reshape(b, h, w, -1)
        return self.proj(out)


class MultiScaleBlock(nnx.Module):
    def __init__(self, dim: int, dim_out: int, num_heads: int, window: int, q_stride: tuple[int, int] | None,
                 cfg: HieraConfig, *, dtype, param_dtype, rngs):
        self.dim, self.dim_out, self.window, self.q_stride = dim, dim_out, window, q_stride
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, eps=cfg.norm_eps, axis_name="embed", **kw)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride, **kw)
        self.norm2 = LayerNorm(dim_out, eps=cfg.norm_eps, axis_name="embed", **kw)
        self.mlp = MLP(dim_out, int(dim_out * cfg.mlp_ratio), dim_out, 2, act=gelu, **kw)
        self.proj = Linear(dim, dim_out, axes=("embed", "mlp"), **kw) if dim != dim_out else None

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        x = self.norm1(x)
        if self.proj is not None:
            shortcut = self.proj(x)
            if self.q_stride:
                shortcut = max_pool(shortcut, self.q_stride)
        window = self.window
        h, w = x.shape[1:3]
        if window > 0:
            x, padded = window_partition(x, window)
        x = self.attn(x)
        if self.q_stride:
            window = self.window // self.q_stride[0]
            h, w = shortcut.shape[1:3]
            padded = (h + (-h) % window, w + (-w) % window) if window > 0 else (h, w)
        if self.window > 0:
            x = window_unpartition(x, window, padded, (h, w))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Hiera(nnx.Module):
    def __init__(self, cfg: HieraConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None):
        self.cfg, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c = cfg.embed_dim
        self.patch_embed = nnx.Dict(proj=Conv2d(cfg.in_chans, c, cfg.patch_kernel, stride=cfg.patch_stride,
                                                padding=cfg.patch_padding, **kw))
        bh, bw = cfg.window_pos_embed_bkg_spatial_size
        w0 = cfg.window_spec[0]
        self.pos_embed = param(rngs, nnx.initializers.zeros, (1, bh, bw, c), (None, None, None, "embed"), param_dtype)
        self.pos_embed_window = param(rngs, nnx.initializers.zeros, (1, w0, w0, c), (None, None, None, "embed"),
                                      param_dtype)
        self.blocks = nnx.List([
            MultiScaleBlock(d, d_out, heads, window, cfg.q_stride if pool else None, cfg, **kw)
            for d, d_out, heads, window, pool in cfg.block_specs()])

    def position_embedding(self, h: int, w: int) -> jax.Array:
        """(1, h, w, C): bicubic-resized background table + tiled window table, float32."""
        pe = bicubic_resize(self.pos_embed[...].astype(jnp.float32), (h, w))
        win = self.pos_embed_window[...].astype(jnp.float32)
        reps = (1, h // win.shape[1], w // win.shape[2], 1)
        return pe + jnp.tile(win, reps)

    def __call__(self, images: jax.Array) -> list[jax.Array]:
        """images (B, S, S, in_chans), normalised → one map per stage, highest resolution first."""
        x = self.patch_embed["proj"](images.astype(self.dtype))
        x = (x + self.position_embedding(*x.shape[1:3])).astype(self.dtype)
        outs, ends = [], set(self.cfg.stage_ends)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in ends:
                outs.append(x)
        return outs

"""UMT video ViT: the vision encoder of VideoChat-TPO (MODEL-SPEC §1).

frames (B, T, H, W, C) ─► PatchEmbed ─► + fixed sinusoid positions ─► depth × ViTBlock ─► outer LayerNorm
                                                                  (a `tpo_jax.stack`)
                                                                        (the checkpoint's `vision_layernorm`)

* Patch embedding: a tubelet × patch × patch convolution with stride equal to its kernel is just a linear map of
  each non-overlapping patch, so it is a reshape into patches plus one einsum. The kernel is kept in the Flax
  conv layout (tubelet, patch, patch, in_chans, width); token n = tokens_per_frame·t + grid·h + w.
* Positions (not parameters): the 1-D sinusoid table θ(p, j) = p / 10000^(2⌊j/2⌋/width), sin for even j, cos
  for odd j, over the flat token index p. A video uses the table built for `ckpt_num_frames` pretraining frames,
  linearly interpolated along time to `num_frames` (PyTorch `align_corners=False`); an image (T = 1) uses the
  plain table for one frame. With `tubelet_size > 1` every count of frames here is a count of tubelets
  (frames // tubelet_size), as the temporal token axis has one entry per tubelet.
* Block (pre-norm): x += proj(MHA(LN1(x))); x += fc2(GELU(fc1(LN2(x)))). The qkv projection has a bias only on
  q and v (`q_bias`, `v_bias`; the k bias is fixed at zero), as in the checkpoint. Full spatio-temporal
  attention over all tokens, no mask, scale head_dim^-1/2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax import layers
from tpo_jax.attention import attention
from tpo_jax.config import ViTConfig
from tpo_jax.layers import LayerNorm, Linear, param
from tpo_jax.sharding import constrain
from tpo_jax.stack import StackLayout, build_stack, name, run_stack

# The frames every model input takes: RGB / 255, then normalised with ImageNet's mean / std (UMT's input; the
# LLaVA-OV vision side maps them on to SigLIP's own normalisation, `tpo_jax.llava_ov.vision`).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

ACT = ("batch", "length", "act_embed")  # logical axes of the residual stream
HEADS = ("batch", "length", "act_heads", None)  # q, k, v: (B, N, heads, head_dim)


# ------------------------------------------------------------------------------------------------------------------
# Fixed position tables (NumPy constants)
# ------------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _sinusoid_table_cached(n_position: int, dim: int) -> np.ndarray:
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    j = np.arange(dim)
    theta = pos / np.power(10000.0, 2.0 * (j // 2) / dim)[None, :]
    table = np.where(j % 2 == 0, np.sin(theta), np.cos(theta)).astype(np.float32)
    table.flags.writeable = False
    return table


def sinusoid_table(n_position: int, dim: int) -> np.ndarray:
    """(n_position, dim) float32 table: sin(θ) on even channels, cos(θ) on odd, θ = p / 10000^(2⌊j/2⌋/dim).

    Computed in float64 and cast to float32. The result is cached and read-only.
    """
    return _sinusoid_table_cached(int(n_position), int(dim))


def _interpolate_time(base: np.ndarray, out_len: int) -> np.ndarray:
    """Linear interpolation along axis 0 with PyTorch `F.interpolate(mode="linear", align_corners=False)` rules."""
    in_len = base.shape[0]
    i = np.arange(out_len, dtype=np.float64)
    s = np.maximum(0.0, (i + 0.5) * (in_len / out_len) - 0.5)
    t0 = np.floor(s).astype(np.int64)
    t1 = np.minimum(t0 + 1, in_len - 1)
    lam = (s - t0)[:, None, None]
    base = base.astype(np.float64)
    return (1.0 - lam) * base[t0] + lam * base[t1]


@functools.lru_cache(maxsize=16)
def position_table(cfg: ViTConfig, num_frames: int) -> np.ndarray:
    """The fixed position embeddings for `num_frames` input frames: (1, num_tubelets·tokens_per_frame, width).

    * num_frames == 1 (image): the plain sinusoid table over tokens_per_frame positions.
    * num_frames == cfg.num_frames (video): the table for cfg.ckpt_num_frames frames, viewed as
      (ckpt_frames, tokens_per_frame, width) and linearly interpolated along time to cfg.num_frames
      (MODEL-SPEC §1.3). Frame counts are divided by cfg.tubelet_size (the temporal axis counts tubelets).

    Any other frame count raises ValueError. The result is cached and read-only; cast it to the activation
    dtype before adding.
    """
    tpf, width, tubelet = cfg.tokens_per_frame, cfg.width, cfg.tubelet_size
    if num_frames == 1:
        if tubelet != 1:
            raise ValueError(f"the image path (1 frame) needs tubelet_size 1, but the ViT config has tubelet_size "
                             f"{tubelet}; pass {cfg.num_frames} frames instead")
        return sinusoid_table(tpf, width)[None]
    if num_frames != cfg.num_frames:
        raise ValueError(f"no position table for {num_frames} frames: the ViT supports exactly "
                         f"{cfg.num_frames} frames (video, cfg.num_frames) or 1 frame (image)")
    if cfg.num_frames % tubelet or cfg.ckpt_num_frames % tubelet:
        raise ValueError(f"tubelet_size {tubelet} must divide num_frames {cfg.num_frames} and "
                         f"ckpt_num_frames {cfg.ckpt_num_frames}")
    t_ckpt, t_out = cfg.ckpt_num_frames // tubelet, cfg.num_frames // tubelet
    base = sinusoid_table(t_ckpt * tpf, width).reshape(t_ckpt, tpf, width)
    table = _interpolate_time(base, t_out).reshape(1, t_out * tpf, width).astype(np.float32)
    table.flags.writeable = False
    return table


# ------------------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------------------

class PatchEmbed(nnx.Module):
    """Non-overlapping tubelet × patch × patch patches → width, as a reshape and one einsum.

    kernel: (tubelet, patch, patch, in_chans, width) (Flax conv layout; PyTorch Conv3d weight (O, I, T, H, W)
    permuted to (T, H, W, I, O)); bias: (width,).
    """

    def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.tubelet, self.patch, self.width, self.dtype = cfg.tubelet_size, cfg.patch_size, cfg.width, dtype
        self.kernel = param(rngs, nnx.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4),
                            (cfg.tubelet_size, cfg.patch_size, cfg.patch_size, cfg.in_chans, cfg.width),
                            (None, None, None, None, "embed"), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (cfg.width,), ("embed",), param_dtype)

    def __call__(self, frames: jax.Array) -> jax.Array:
        """frames (B, T, H, W, C) → (B, (T/tubelet)·(H/patch)·(W/patch), width); time-major, then row, column."""
        b, t, h, w, c = frames.shape
        tt, p = self.tubelet, self.patch
        x = frames.astype(self.dtype).reshape(b, t // tt, tt, h // p, p, w // p, p, c)
        # n: tubelet index, a: frame in tubelet, (y, i): patch row / row in patch, (x, j): patch column / column.
        y = jnp.einsum("bnayixjc,aijco->bnyxo", x, self.kernel[...].astype(self.dtype))
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, -1, self.width)


class ViTAttention(nnx.Module):
    """Multi-head self-attention with the checkpoint's fused qkv kernel and separate q/v biases (k bias = 0)."""

    def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.width // cfg.num_heads
        self.width, self.dtype, self.implementation = cfg.width, dtype, cfg.stack.attention
        self.qkv = param(rngs, layers.default_kernel_init, (cfg.width, 3 * cfg.width), ("embed", "qkv"), param_dtype)
        self.q_bias = param(rngs, nnx.initializers.zeros, (cfg.width,), ("heads",), param_dtype)
        self.v_bias = param(rngs, nnx.initializers.zeros, (cfg.width,), ("heads",), param_dtype)
        self.proj = Linear(cfg.width, cfg.width, axes=("heads", "embed"), dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
        qkv = jnp.dot(x.astype(self.dtype), self.qkv[...].astype(self.dtype)) + bias.astype(self.dtype)
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim)  # rows [q | k | v], each head-major
        q, k, v = (constrain(name(qkv[:, :, i], tag), *HEADS)
                   for i, tag in enumerate(("query_proj", "key_proj", "value_proj")))
        out = name(attention(q, k, v, scale=self.head_dim ** -0.5, implementation=self.implementation),
                   "attention_out")
        return name(self.proj(out.reshape(b, n, self.width)), "out_proj")


class ViTBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + fc2(gelu(fc1(norm2(x))))."""

    def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(cfg.width, eps=cfg.norm_eps, **kw)
        self.attn = ViTAttention(cfg, **kw)
        self.norm2 = LayerNorm(cfg.width, eps=cfg.norm_eps, **kw)
        self.fc1 = Linear(cfg.width, cfg.mlp_dim, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.mlp_dim, cfg.width, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        h = constrain(layers.gelu(self.fc1(self.norm2(x))), "batch", "length", "act_mlp")
        return x + name(self.fc2(name(h, "mlp_hidden")), "mlp_out")


class UMTViT(nnx.Module):
    """The UMT video ViT encoder plus the checkpoint's outer `vision_layernorm` (MODEL-SPEC §1)."""

    def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.blocks = build_stack(lambda r: ViTBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.depth,
                                  scan=cfg.stack.scan_layers, rngs=rngs)
        self.outer_norm = (LayerNorm(cfg.width, eps=cfg.outer_norm_eps, **kw)
                           if cfg.outer_norm else None)

    def check_input(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError unless `shape` is (B, T, H, W, C) with T in {cfg.num_frames, 1} and the config's H, W, C."""
        cfg = self.cfg
        expected = f"(B, T, {cfg.img_size}, {cfg.img_size}, {cfg.in_chans}) with T = {cfg.num_frames} or 1"
        if len(shape) != 5 or tuple(shape[2:]) != (cfg.img_size, cfg.img_size, cfg.in_chans):
            raise ValueError(f"UMTViT expects frames of shape {expected} (channels last), got {tuple(shape)}")
        if shape[1] not in (cfg.num_frames, 1):
            raise ValueError(f"UMTViT expects frames of shape {expected}, got T = {shape[1]} "
                             f"(shape {tuple(shape)})")
        if shape[1] % cfg.tubelet_size:
            raise ValueError(f"UMTViT got T = {shape[1]} frames, not a multiple of tubelet_size "
                             f"{cfg.tubelet_size}")

    def __call__(self, frames: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """frames (B, T, H, W, C) float, T = cfg.num_frames or 1 → (B, (T/tubelet)·tokens_per_frame, width).

        `rng` is accepted for interface uniformity; the released encoder has no dropout or drop-path.
        """
        del rng
        self.check_input(frames.shape)
        x = self.patch_embed(frames)
        x = x + jnp.asarray(position_table(self.cfg, frames.shape[1])).astype(x.dtype)
        x = constrain(x, *ACT)
        groups = (self.blocks,) if self.cfg.stack.scan_layers else [(block,) for block in self.blocks]
        x, _ = run_stack(lambda block, x, _: (constrain(block[0](x), *ACT), None), groups, x, None,
                         cfg=self.cfg.stack, length=self.cfg.depth)
        if self.outer_norm is not None:
            x = self.outer_norm(x)
        return x


def vit_stack_layouts(cfg: ViTConfig, prefix: str = "vision") -> list[StackLayout]:
    """Scanned ViT: `{prefix}.blocks.<rest>` (leading axis depth) ↔ `{prefix}.blocks.{i}.<rest>`."""
    pre = f"{prefix}." if prefix else ""
    if not cfg.stack.scan_layers:
        return []
    return [StackLayout(f"{pre}blocks.", f"{pre}blocks.{{i}}.", cfg.depth)]

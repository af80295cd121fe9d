"""SAM2 memory encoder (upstream `MemoryEncoder`, `MaskDownSampler`, `Fuser`, `CXBlock`) and the mask
preprocessing SAM2Base applies before it (`_encode_new_memory`).

    mask_for_mem = sigmoid(logits) (or logits > 0 for a frame whose mask came from points, at eval)
                   · sigmoid_scale + sigmoid_bias                         (20, −10 in the release)
    m   = mask_downsampler(mask_for_mem)   [conv k3 s2 p1 → LayerNorm2d → GELU] × log2(16), conv 1×1 → in_dim
    x   = pix_feat_proj(pix_feat) + m      (1×1 conv)
    x   = fuser(x)                         CXBlock × 2: x + γ·pwconv2(GELU(pwconv1(LN(dwconv7×7(x)))))
    out = out_proj(x)                      1×1 conv in_dim → out_dim (64)
    pos = sine position encoding of the (H, W) output grid, out_dim channels (tpo_jax.sam2.position)

Channel-last throughout: pix_feat (B, H, W, in_dim), masks (B, 16·H, 16·W, 1); outputs (B, H, W, out_dim).
Conv kernels are stored (kh, kw, in/groups, out) (PyTorch (out, in/groups, kh, kw) permuted).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax.layers import LayerNorm, Linear, gelu, param
from tpo_jax.sam2.layers import Conv2d
from tpo_jax.sam2.memory_config import MemoryEncoderConfig
from tpo_jax.sam2.position import sine_position_encoding


class MaskDownSampler(nnx.Module):
    """`convs.{i}` + `norms.{i}` (LayerNorm2d, eps 1e-6) with GELU, then `final` 1×1 conv to in_dim."""

    def __init__(self, cfg: MemoryEncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chans = [1] + cfg.mask_channels()
        self.convs = nnx.List([Conv2d(c_in, c_out, cfg.mask_kernel, stride=cfg.mask_stride,
                                      padding=cfg.mask_padding, in_axis=None, out_axis=None, **kw)
                               for c_in, c_out in zip(chans[:-1], chans[1:])])
        self.norms = nnx.List([LayerNorm(c, eps=1e-6, axis_name=None, **kw) for c in chans[1:]])
        self.final = Conv2d(chans[-1], cfg.in_dim, 1, in_axis=None, out_axis="embed", **kw)

    def __call__(self, mask: jax.Array) -> jax.Array:
        x = mask
        for conv, norm in zip(self.convs, self.norms):
            x = gelu(norm(conv(x)))
        return self.final(x)


class CXBlock(nnx.Module):
    """ConvNeXt block: depthwise conv, LayerNorm (eps 1e-6), Linear 4× + GELU + Linear, layer scale `gamma`."""

    def __init__(self, cfg: MemoryEncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None):
        d = cfg.in_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dwconv = Conv2d(d, d, cfg.fuser_kernel, padding=cfg.fuser_kernel // 2, groups=d, in_axis=None,
                             out_axis="embed", **kw)
        self.norm = LayerNorm(d, eps=1e-6, axis_name="embed", **kw)
        self.pwconv1 = Linear(d, cfg.fuser_expansion * d, axes=("embed", "mlp"), **kw)
        self.pwconv2 = Linear(cfg.fuser_expansion * d, d, axes=("mlp", "embed"), **kw)
        self.gamma = param(rngs, nnx.initializers.constant(cfg.layer_scale_init), (d,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.pwconv2(gelu(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma[...].astype(y.dtype) * y


class MemoryEncoder(nnx.Module):
    """`mask_downsampler`, `pix_feat_proj`, `fuser.{i}`, `out_proj` (names follow upstream)."""

    def __init__(self, cfg: MemoryEncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None):
        cfg.validate()
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mask_downsampler = MaskDownSampler(cfg, **kw)
        self.pix_feat_proj = Conv2d(cfg.in_dim, cfg.in_dim, 1, in_axis="embed", out_axis="embed", **kw)
        self.fuser = nnx.List([CXBlock(cfg, **kw) for _ in range(cfg.fuser_layers)])
        self.out_proj = Conv2d(cfg.in_dim, cfg.out_dim, 1, in_axis="embed", out_axis="mem_embed", **kw)

    def __call__(self, pix_feat: jax.Array, mask: jax.Array, *, skip_mask_sigmoid: bool = True
                 ) -> tuple[jax.Array, jax.Array]:
        """pix_feat (B, H, W, in_dim); mask (B, s·H, s·W, 1) with s = mask_total_stride, already scaled
        (`mask_for_memory`) unless skip_mask_sigmoid=False. Returns (features, pos), each (B, H, W, out_dim)."""
        b, h, w, _ = pix_feat.shape
        s = self.cfg.mask_total_stride
        if mask.shape != (b, s * h, s * w, 1):
            raise ValueError(f"memory encoder: mask of shape {mask.shape}, expected {(b, s * h, s * w, 1)} for "
                             f"features {pix_feat.shape} (stride {s})")
        if not skip_mask_sigmoid:
            mask = jax.nn.sigmoid(mask)
        x = self.pix_feat_proj(pix_feat) + self.mask_downsampler(mask)
        for block in self.fuser:
            x = block(x)
        x = self.out_proj(x)
        pos = sine_position_encoding(h, w, self.cfg.out_dim, temperature=self.cfg.pos_temperature, dtype=x.dtype)
        return x, jnp.broadcast_to(pos[None], x.shape)


def mask_for_memory(cfg: MemoryEncoderConfig, mask_logits: jax.Array, binarize: jax.Array | bool = False
                    ) -> jax.Array:
    """SAM2Base `_encode_new_memory` before the encoder: sigmoid (or `logits > 0` where `binarize`, per example
    (B,) for frames whose mask came from points at eval) · scale + bias."""
    probs = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
    binarize = jnp.asarray(binarize, bool).reshape((-1,) + (1,) * (mask_logits.ndim - 1))
    probs = jnp.where(binarize, (mask_logits > 0).astype(jnp.float32), probs)
    return (probs * cfg.sigmoid_scale + cfg.sigmoid_bias).astype(mask_logits.dtype)


def encode_new_memory(encoder: MemoryEncoder, pix_feat: jax.Array, mask_logits: jax.Array,
                      binarize: jax.Array | bool = False) -> tuple[jax.Array, jax.Array]:
    """High-res mask logits (B, 16·H, 16·W, 1) + features (B, H, W, C) -> memory (features, pos)."""
    return encoder(pix_feat, mask_for_memory(encoder.cfg, mask_logits, binarize), skip_mask_sigmoid=True)

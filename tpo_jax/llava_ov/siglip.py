"""SigLIP vision tower of LLaVA-OneVision (transformers `SiglipVisionModel`, used without its pooling head).

pixels (B, H, W, C) ─► PatchEmbed ─► + learned positions ─► num_layers × SiglipBlock ─► [post_layernorm]
                                                              (a `tpo_jax.stack`)

* Patch embedding: a patch × patch convolution with stride = kernel, i.e. a reshape into patches plus one
  einsum. Kernel in the Flax conv layout (patch, patch, in_chans, hidden); token n = grid·row + column.
* Positions: one learned table `position_embedding` (grid², hidden), added as is (no interpolation: every
  tile and frame has the tower's own `image_size`).
* Block (pre-norm): x += out_proj(MHA(layer_norm1(x))); x += fc2(GELU_tanh(fc1(layer_norm2(x)))). Separate
  q/k/v projections with biases, scale head_dim^-1/2, no mask.
* What LLaVA-OV reads: `vision_feature_layer = -1` with `vision_feature_select_strategy = "full"`, i.e.
  `hidden_states[-1]` of the tower, all grid² tokens (no CLS to drop). transformers' SigLIP captures its
  hidden states with `tie_last_hidden_states=False`, so `hidden_states[-1]` is the output of the last encoder
  layer *before* `post_layernorm`. The llava-hf config builds 26 of SO400M's 27 layers (the original LLaVA-OV
  code deletes the last layer and takes the new last one, the same numbers). So the LLaVA-OV presets do not
  build `post_layernorm` (`SiglipConfig.post_layernorm = False`); its checkpoint weights are kept as unused
  extras by the conversion table. With `post_layernorm = True` the tower returns SigLIP's own
  `last_hidden_state` instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax import layers
from tpo_jax.attention import attention
from tpo_jax.config import SiglipConfig
from tpo_jax.layers import LayerNorm, Linear, param
from tpo_jax.sharding import constrain
from tpo_jax.stack import StackLayout, build_stack, name, run_stack

ACT = ("batch", "length", "act_embed")
HEADS = ("batch", "length", "act_heads", None)


def so400m_patch14_384(**overrides) -> SiglipConfig:
    """SigLIP SO400M/14 @ 384 as LLaVA-OneVision-7B uses it: hidden 1152, MLP 4304, 16 heads, 26 layers.

    Source: transformers 5.25 `LlavaOnevisionConfig` vision-config defaults (hidden_size 1152,
    intermediate_size 4304, patch_size 14, image_size 384, num_hidden_layers 26, num_attention_heads 16,
    vision_use_head False) and `SiglipVisionConfig` defaults (layer_norm_eps 1e-6, gelu_pytorch_tanh), the same
    numbers as llava-hf/llava-onevision-qwen2-7b-ov-hf's config.json (26 layers: SO400M's 27 minus the last).
    """
    cfg = dataclasses.replace(SiglipConfig(), **overrides)
    cfg.validate()
    return cfg


def tiny(**overrides) -> SiglipConfig:
    """A tiny tower for tests: 20 px images, 4 px patches (5 × 5 grid, odd like 27), hidden 32, 2 layers."""
    cfg = dataclasses.replace(SiglipConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                                           patch_size=4, image_size=20), **overrides)
    cfg.validate()
    return cfg


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (transformers' `gelu_pytorch_tanh`)."""
    return jax.nn.gelu(x, approximate=True)


class PatchEmbed(nnx.Module):
    """Non-overlapping patch × patch patches → hidden. kernel (p, p, in_chans, hidden) (PyTorch Conv2d weight
    (O, I, p, p) permuted to (p, p, I, O)); bias (hidden,). Pixels outside the grid·patch square are dropped,
    as the stride-p convolution with "valid" padding does."""

    def __init__(self, cfg: SiglipConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.patch, self.grid, self.hidden, self.dtype = cfg.patch_size, cfg.grid, cfg.hidden_size, dtype
        self.kernel = param(rngs, nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                            (cfg.patch_size, cfg.patch_size, cfg.in_chans, cfg.hidden_size),
                            (None, None, None, "embed"), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (cfg.hidden_size,), ("embed",), param_dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels (B, H, W, C) → (B, grid², hidden), row-major over the patch grid."""
        b, _, _, c = pixels.shape
        g, p = self.grid, self.patch
        x = pixels[:, :g * p, :g * p].astype(self.dtype).reshape(b, g, p, g, p, c)
        y = jnp.einsum("byixjc,ijco->byxo", x, self.kernel[...].astype(self.dtype))
        return (y + self.bias[...].astype(self.dtype)).reshape(b, g * g, self.hidden)


class SiglipAttention(nnx.Module):
    """Multi-head self-attention with separate q, k, v and output projections (all with biases)."""

    def __init__(self, cfg: SiglipConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads, self.head_dim, self.implementation = cfg.num_heads, cfg.head_dim, cfg.stack.attention
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.hidden_size
        self.q_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = Linear(d, d, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape

        def heads(proj, tag):
            return constrain(name(proj(x).reshape(b, n, self.num_heads, self.head_dim), tag), *HEADS)

        q, k, v = heads(self.q_proj, "query_proj"), heads(self.k_proj, "key_proj"), heads(self.v_proj, "value_proj")
        out = name(attention(q, k, v, scale=self.head_dim ** -0.5, implementation=self.implementation),
                   "attention_out")
        return name(self.out_proj(out.reshape(b, n, d)), "out_proj")


class SiglipBlock(nnx.Module):
    """Pre-norm encoder layer: x + attn(layer_norm1(x)), then x + fc2(gelu_tanh(fc1(layer_norm2(x))))."""

    def __init__(self, cfg: SiglipConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.attn = SiglipAttention(cfg, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.layer_norm1(x))
        h = constrain(gelu_tanh(self.fc1(self.layer_norm2(x))), "batch", "length", "act_mlp")
        return x + name(self.fc2(name(h, "mlp_hidden")), "mlp_out")


class SiglipVisionTower(nnx.Module):
    """The SigLIP vision tower: pixels → the features LLaVA-OV projects (module docstring)."""

    def __init__(self, cfg: SiglipConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.position_embedding = param(rngs, layers.embedding_init, (cfg.num_patches, cfg.hidden_size),
                                        (None, "embed"), param_dtype)
        self.layers = build_stack(lambda r: SiglipBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                                  cfg.num_layers, scan=cfg.stack.scan_layers, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw) if cfg.post_layernorm else None

    def check_input(self, shape: tuple[int, ...]) -> None:
        cfg = self.cfg
        if len(shape) != 4 or tuple(shape[1:]) != (cfg.image_size, cfg.image_size, cfg.in_chans):
            raise ValueError(f"SiglipVisionTower expects pixels of shape (B, {cfg.image_size}, {cfg.image_size}, "
                             f"{cfg.in_chans}) (channels last), got {tuple(shape)}")

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels (B, image_size, image_size, C) → (B, grid², hidden)."""
        self.check_input(pixels.shape)
        x = self.patch_embed(pixels)
        x = constrain(x + self.position_embedding[...].astype(x.dtype)[None], *ACT)
        groups = (self.layers,) if self.cfg.stack.scan_layers else [(layer,) for layer in self.layers]
        x, _ = run_stack(lambda layer, x, _: (constrain(layer[0](x), *ACT), None), groups, x, None,
                         cfg=self.cfg.stack, length=self.cfg.num_layers)
        if self.post_layernorm is not None:
            x = self.post_layernorm(x)
        return x


def siglip_stack_layouts(cfg: SiglipConfig, prefix: str = "vision_tower") -> list[StackLayout]:
    """Scanned tower: `{prefix}.layers.<rest>` (leading axis num_layers) ↔ `{prefix}.layers.{i}.<rest>`."""
    if not cfg.stack.scan_layers:
        return []
    pre = f"{prefix}." if prefix else ""
    return [StackLayout(f"{pre}layers.", f"{pre}layers.{{i}}.", cfg.num_layers)]

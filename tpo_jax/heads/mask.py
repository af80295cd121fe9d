"""Mask head: `track_embed` → SAM2 sparse prompt, `track_embed_decode2` → box, plus the SAM2 box-prompt target
(MODEL-SPEC §5.1, §5.3.2, §7.1).

Checkpoint mapping (Linear weight (out, in) → kernel (in, out), transposed; biases as is):

    track_embed.layers.{0,1}.{weight,bias}          → track_embed.layers.{0,1}.{kernel,bias}
        (4096 → 4096 → 768)
    track_embed_decode2.layers.{0,1}.{weight,bias}  → track_embed_decode2.layers.{0,1}.{kernel,bias}
        (4096 → 4096 → 4)
    sam.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix (2, 128)
                                                    → <prompt encoder>.pe_layer.positional_encoding_gaussian_matrix
    sam.sam_prompt_encoder.point_embeddings.{i}.weight (1, 256), i = 0..3
                                                    → <prompt encoder>.point_embeddings[i]   (stack → (4, 256))
    sam.sam_prompt_encoder.not_a_point_embed.weight (1, 256)
                                                    → <prompt encoder>.not_a_point_embed      (1, 256)

The dense-prompt part (`no_mask_embed`, `mask_downscaling.*`) is built only when `SAM2PromptEncoder` is given
`image_embedding_size` / `mask_in_chans` (the SAM2 image path, `tpo_jax.sam2.image`); the TPO model's mask head
builds the sparse part alone. Its conversion rules are in `tpo_jax.checkpoints.tables.sam2`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax.config import MaskHeadConfig
from tpo_jax.layers import MLP, LayerNorm, gelu, param
from tpo_jax.sam2.layers import Conv2d

_NORMAL_1 = nnx.initializers.normal(stddev=1.0)


class PositionEmbeddingRandom(nnx.Module):
    """SAM/SAM2 random-Fourier point encoding: u ∈ [0,1]² → [sin(2π(2u−1)G), cos(2π(2u−1)G)].

    `positional_encoding_gaussian_matrix` G (2, dim/2) is a buffer in SAM2 (scale 1.0 → N(0, 1) init) and is
    frozen with the rest of SAM.
    """

    def __init__(self, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs | None):
        self.positional_encoding_gaussian_matrix = param(rngs, _NORMAL_1, (2, dim // 2), (None, None), param_dtype)

    def __call__(self, u: jax.Array) -> jax.Array:
        """u (..., 2) normalised coordinates (x, y) → (..., dim), computed in float32.

        The (…,2)@(2,dim/2) product is written as two broadcast multiply-adds so it is exact float32 on
        every backend (no reduced-precision matmul passes on GPU/TPU).
        """
        g = self.positional_encoding_gaussian_matrix[...].astype(jnp.float32)
        c = 2.0 * u.astype(jnp.float32) - 1.0
        proj = c[..., 0:1] * g[0] + c[..., 1:2] * g[1]
        proj = (2.0 * math.pi) * proj
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class MaskDownscaling(nnx.Module):
    """SAM2 `mask_downscaling`: mask (B, 4h, 4w, 1) → (B, h, w, P): conv 2×2/2 → LN → GELU → conv 2×2/2 → LN →
    GELU → conv 1×1 (LayerNorm2d over channels, eps 1e-6). Upstream indices 0, 1, 3, 4, 6 = conv1, norm1,
    conv2, norm2, conv3."""

    def __init__(self, mask_in_chans: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c = mask_in_chans
        self.conv1 = Conv2d(1, c // 4, 2, stride=2, **kw)
        self.norm1 = LayerNorm(c // 4, eps=1e-6, axis_name=None, **kw)
        self.conv2 = Conv2d(c // 4, c, 2, stride=2, **kw)
        self.norm2 = LayerNorm(c, eps=1e-6, axis_name=None, **kw)
        self.conv3 = Conv2d(c, dim, 1, **kw)

    def __call__(self, masks: jax.Array) -> jax.Array:
        x = gelu(self.norm1(self.conv1(masks)))
        x = gelu(self.norm2(self.conv2(x)))
        return self.conv3(x)


class SAM2PromptEncoder(nnx.Module):
    """The sparse-prompt part of SAM2's prompt encoder, enough to embed a box as TPO does (MODEL-SPEC §7.1).

    Params (names chosen so `sam.sam_prompt_encoder.*` maps trivially, see the module docstring):
    `pe_layer.positional_encoding_gaussian_matrix` (2, P/2), `point_embeddings` (4, P) (one row per point label
    0..3: neg / pos / box top-left / box bottom-right), `not_a_point_embed` (1, P).

    SAM is frozen in TPO: keep these out of the optimizer (filter by path) and treat `box_prompt` outputs as
    constants (`jax.lax.stop_gradient`).

    With `image_embedding_size` E it also holds SAM2's dense-prompt part: `no_mask_embed` (1, P) and, with
    `mask_in_chans`, `mask_downscaling` (mask inputs of size 4E × 4E); see `embed_points`, `dense_pe`,
    `dense_embedding` (the SAM2 image path, `tpo_jax.sam2.image`).
    """

    def __init__(self, cfg: MaskHeadConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs | None,
                 image_embedding_size: int | None = None, mask_in_chans: int | None = None, dtype=jnp.float32):
        self.cfg = cfg
        p = cfg.prompt_dim
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(p, param_dtype=param_dtype, rngs=rngs)
        self.point_embeddings = param(rngs, _NORMAL_1, (4, p), (None, None), param_dtype)
        self.not_a_point_embed = param(rngs, _NORMAL_1, (1, p), (None, None), param_dtype)
        if image_embedding_size is not None:
            self.no_mask_embed = param(rngs, _NORMAL_1, (1, p), (None, None), param_dtype)
            self.mask_downscaling = (None if mask_in_chans is None else
                                     MaskDownscaling(mask_in_chans, p, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
        else:
            self.no_mask_embed = self.mask_downscaling = None

    def embed_points(self, points: jax.Array, labels: jax.Array, *, pad: bool) -> jax.Array:
        """SAM2 `_embed_points`: pixel points (B, N, 2) (x, y) in the S×S model input (S = cfg.sam_image_size),
        labels (B, N) int (−1 pad, 0 negative, 1 positive, 2 / 3 box corners) → (B, N + pad, P) float32.

        p = points + 0.5 (pixel centres; rounded to bfloat16 with cfg.emulate_bf16_points); with `pad` a point
        (0, 0) labelled −1 is appended (upstream pads when no box is given). Label −1 rows are
        `not_a_point_embed`; labels 0..3 add `point_embeddings[label]` to the Fourier encoding of p / S.
        """
        s = float(self.cfg.sam_image_size)
        pts = points.astype(jnp.float32) + 0.5
        labels = labels.astype(jnp.int32)
        if pad:
            b = pts.shape[0]
            pts = jnp.concatenate([pts, jnp.zeros((b, 1, 2), jnp.float32)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((b, 1), jnp.int32)], axis=1)
        if self.cfg.emulate_bf16_points:
            pts = pts.astype(jnp.bfloat16).astype(jnp.float32)
        enc = self.pe_layer(pts / s)
        e = self.point_embeddings[...].astype(jnp.float32)
        nap = self.not_a_point_embed[...].astype(jnp.float32)[0]
        lab = labels[..., None]
        enc = jnp.where(lab == -1, nap, enc)
        for k in range(4):
            enc = jnp.where(lab == k, enc + e[k], enc)
        return enc

    def embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """SAM2 `_embed_boxes`: pixel boxes (B, 4) xyxy → corner embeddings (B, 2, P) float32."""
        corners = boxes.astype(jnp.float32).reshape(-1, 2, 2) + 0.5
        enc = self.pe_layer(corners / float(self.cfg.sam_image_size))
        e = self.point_embeddings[...].astype(jnp.float32)
        return jnp.stack([enc[:, 0] + e[2], enc[:, 1] + e[3]], axis=1)

    def dense_pe(self) -> jax.Array:
        """Fourier encoding of the E×E image-embedding grid (pixel centres), (E, E, P) float32 (`get_dense_pe`)."""
        n = self.image_embedding_size
        c = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
        grid = jnp.stack(jnp.broadcast_arrays(c[None, :], c[:, None]), axis=-1)  # (E, E, (x, y))
        return self.pe_layer(grid)

    def dense_embedding(self, batch: int, masks: jax.Array | None = None) -> jax.Array:
        """(B, E, E, P): `mask_downscaling(masks)` for mask inputs (B, 4E, 4E, 1), else `no_mask_embed` everywhere."""
        if masks is not None:
            if self.mask_downscaling is None:
                raise ValueError("SAM2PromptEncoder: mask inputs need mask_in_chans (mask_downscaling)")
            return self.mask_downscaling(masks)
        n = self.image_embedding_size
        return jnp.broadcast_to(self.no_mask_embed[...].astype(jnp.float32)[0], (batch, n, n, self.cfg.prompt_dim))

    def box_prompt(self, boxes: jax.Array) -> jax.Array:
        """Normalised xyxy boxes (..., 4) → SAM2 sparse prompt embedding (..., 3, P), float32.

        Exactly `get_prompt_embeding(box)` of TPO (MODEL-SPEC §7.1): corners c₁ = (x0, y0) (label 2) and
        c₂ = (x1, y1) (label 3); pixel points p = S·c + 0.5 (S = cfg.sam_image_size; with
        cfg.emulate_bf16_points p is rounded to bfloat16 as TPO does); u = p / S;
        rows = [PE(u₁) + E₂, PE(u₂) + E₃, not_a_point_embed] (the padding point (0, 0), label −1, has its
        encoding zeroed and replaced by `not_a_point_embed`).
        """
        s = float(self.cfg.sam_image_size)
        b = boxes.astype(jnp.float32)
        corners = b.reshape(*b.shape[:-1], 2, 2)  # (..., 2 corners, (x, y))
        pts = corners * s + 0.5
        if self.cfg.emulate_bf16_points:
            pts = pts.astype(jnp.bfloat16).astype(jnp.float32)
        enc = self.pe_layer(pts / s)  # (..., 2, P)
        e = self.point_embeddings[...].astype(jnp.float32)
        nap = self.not_a_point_embed[...].astype(jnp.float32)  # (1, P)
        first = enc[..., 0, :] + e[2]
        second = enc[..., 1, :] + e[3]
        pad = jnp.broadcast_to(nap[0], first.shape)
        return jnp.stack([first, second, pad], axis=-2)


class MaskHead(nnx.Module):
    """`track_embed`: D → D → num_prompt_tokens·prompt_dim (ReLU between), reshaped to (..., 3, P);
    `track_embed_decode2`: D → D → 4 (auxiliary box regression, training loss only)."""

    def __init__(self, llm_hidden: int, cfg: MaskHeadConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.track_embed = MLP((llm_hidden, llm_hidden, cfg.num_prompt_tokens * cfg.prompt_dim),
                               axes=[("embed", "mlp"), ("mlp", None)], **kw)
        self.track_embed_decode2 = MLP((llm_hidden, llm_hidden, 4), axes=[("embed", "mlp"), ("mlp", None)], **kw)

    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """h (..., D) hidden states at `<tracking>` rows → (prompt (..., 3, P), box (..., 4)), compute dtype."""
        prompt = self.track_embed(h)
        prompt = prompt.reshape(*prompt.shape[:-1], self.cfg.num_prompt_tokens, self.cfg.prompt_dim)
        return prompt, self.track_embed_decode2(h)


def mask_loss_terms(pred_prompt: jax.Array, target_prompt: jax.Array, pred_box: jax.Array, gt_box: jax.Array,
                    cfg: MaskHeadConfig) -> dict[str, jax.Array]:
    """Per-sample mask-head loss terms (MODEL-SPEC §5.3.2), all float32 of shape (B,).

    pred_prompt / target_prompt (B, 3, P); pred_box / gt_box (B, 4) normalised xyxy.
    * ``sam_l1``    = mean |Ŝ − S*| over the 3·P values,
    * ``box_l1``    = mean |b̂ − b| over the 4 coordinates,
    * ``loss_mask`` = sam_l1 + cfg.box_weight·box_l1 (released: weight 1).

    The target S* must be `jax.lax.stop_gradient(SAM2PromptEncoder.box_prompt(gt_box))` — the caller applies
    the stop_gradient (SAM is frozen). The caller also masks samples without a `<tracking>` target and
    averages over the valid ones (released: mean over samples of each term).
    """
    ds = pred_prompt.astype(jnp.float32) - target_prompt.astype(jnp.float32)
    sam_l1 = jnp.mean(jnp.abs(ds), axis=(-2, -1))
    box_l1 = jnp.mean(jnp.abs(pred_box.astype(jnp.float32) - gt_box.astype(jnp.float32)), axis=-1)
    return {"sam_l1": sam_l1, "box_l1": box_l1, "loss_mask": sam_l1 + cfg.box_weight * box_l1}

"""SAM2 mask decoder (upstream `MaskDecoder` + `TwoWayTransformer`), channels-last.

    tokens = [obj_score_token, iou_token, mask_tokens (1 + num_multimask)] ++ sparse prompt   (B, T, d)
    src    = image embedding + dense prompt (B, h, w, d), pos = dense PE
    two-way transformer (depth blocks + final token→image attention) → tokens', src'
    src' → ConvT 2×2/2 (+ conv_s1(feat_s1)) → LN → GELU → ConvT 2×2/2 (+ conv_s0(feat_s0)) → GELU  (B, 4h, 4w, d/8)
    masks[k] = hypernetwork_k(mask token k) · upscaled    (B, 1 + num_multimask, 4h, 4w)
    iou = MLP(iou token) (sigmoid), object score logit = MLP(obj score token)

Output selection (`select_masks`): multimask → tokens 1..; single → token 0, or with dynamic stability
(inference) the best multimask output when token 0's mask is unstable: stability = |logits > δ| / |logits > −δ|
(1 where the denominator is 0), unstable below the threshold (δ 0.05, threshold 0.98).

Params (upstream names unless noted; tables in `tpo_jax.checkpoints.tables.sam2`): iou_token (1, d), mask_tokens
(M, d), obj_score_token (1, d), transformer.layers.{i}.{self_attn, cross_attn_token_to_image,
cross_attn_image_to_token}.{q,k,v,out}_proj, transformer.layers.{i}.norm{1..4}, transformer.layers.{i}.mlp
(lin1/lin2 upstream → layers.0/1), transformer.final_attn_token_to_image, transformer.norm_final_attn,
upscale_conv1 / upscale_norm / upscale_conv2 (upstream output_upscaling.0 / .1 / .3), conv_s0, conv_s1,
output_hypernetworks_mlps.{k}.layers.{0,1,2}, iou_prediction_head.layers.{0..}, pred_obj_score_head.layers.{0..}.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax.attention import attention
from tpo_jax.layers import LayerNorm, Linear, gelu, param
from tpo_jax.sam2.config import MaskDecoderConfig
from tpo_jax.sam2.layers import MLP, Conv2d, ConvTranspose2x2

_NORMAL_1 = nnx.initializers.normal(stddev=1.0)


class Attention(nnx.Module):
    """SAM attention: q/k/v projections to d / downsample_rate, heads, output projection back to d."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1, *, dtype, param_dtype, rngs):
        inner = dim // downsample_rate
        self.num_heads = num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(dim, inner, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(dim, inner, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(dim, inner, axes=("embed", "heads"), **kw)
        self.out_proj = Linear(inner, dim, axes=("heads", "embed"), **kw)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        def heads(x):
            return x.reshape(*x.shape[:2], self.num_heads, -1)
        out = attention(heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v)))
        return self.out_proj(out.reshape(*out.shape[:2], -1))


class TwoWayAttentionBlock(nnx.Module):
    def __init__(self, dim: int, cfg: MaskDecoderConfig, skip_first_layer_pe: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        r = cfg.attention_downsample_rate
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = Attention(dim, cfg.num_heads, **kw)
        self.norm1 = LayerNorm(dim, eps=1e-5, axis_name="embed", **kw)
        self.cross_attn_token_to_image = Attention(dim, cfg.num_heads, r, **kw)
        self.norm2 = LayerNorm(dim, eps=1e-5, axis_name="embed", **kw)
        self.mlp = MLP(dim, cfg.mlp_dim, dim, 2, act=jax.nn.relu, **kw)
        self.norm3 = LayerNorm(dim, eps=1e-5, axis_name="embed", **kw)
        self.norm4 = LayerNorm(dim, eps=1e-5, axis_name="embed", **kw)
        self.cross_attn_image_to_token = Attention(dim, cfg.num_heads, r, **kw)

    def __call__(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    def __init__(self, dim: int, cfg: MaskDecoderConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([TwoWayAttentionBlock(dim, cfg, i == 0, **kw) for i in range(cfg.depth)])
        self.final_attn_token_to_image = Attention(dim, cfg.num_heads, cfg.attention_downsample_rate, **kw)
        self.norm_final_attn = LayerNorm(dim, eps=1e-5, axis_name="embed", **kw)

    def __call__(self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """image, image_pe (B, h, w, d); tokens (B, T, d) → (tokens (B, T, d), image (B, h·w, d))."""
        b, h, w, d = image.shape
        keys = image.reshape(b, h * w, d)
        key_pe = image_pe.reshape(b, h * w, d)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class DecoderOutput(NamedTuple):
    """All mask-token outputs, before selection: masks (B, M, 4h, 4w) logits, iou (B, M), mask tokens (B, M, d),
    object score logits (B, 1); all float32."""

    masks: jax.Array
    iou: jax.Array
    mask_tokens: jax.Array
    object_score_logits: jax.Array


class MaskDecoder(nnx.Module):
    def __init__(self, dim: int, cfg: MaskDecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None):
        self.cfg, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        m = cfg.num_multimask_outputs + 1
        self.num_mask_tokens = m
        self.iou_token = param(rngs, _NORMAL_1, (1, dim), (None, "embed"), param_dtype)
        self.mask_tokens = param(rngs, _NORMAL_1, (m, dim), (None, "embed"), param_dtype)
        self.obj_score_token = (param(rngs, _NORMAL_1, (1, dim), (None, "embed"), param_dtype)
                                if cfg.pred_obj_scores else None)
        self.transformer = TwoWayTransformer(dim, cfg, **kw)
        self.upscale_conv1 = ConvTranspose2x2(dim, dim // 4, **kw)
        self.upscale_norm = LayerNorm(dim // 4, eps=1e-6, axis_name=None, **kw)
        self.upscale_conv2 = ConvTranspose2x2(dim // 4, dim // 8, **kw)
        if cfg.use_high_res_features:
            self.conv_s0 = Conv2d(dim, dim // 8, 1, **kw)
            self.conv_s1 = Conv2d(dim, dim // 4, 1, **kw)
        else:
            self.conv_s0 = self.conv_s1 = None
        self.output_hypernetworks_mlps = nnx.List([MLP(dim, dim, dim // 8, 3, **kw) for _ in range(m)])
        self.iou_prediction_head = MLP(dim, cfg.iou_head_hidden_dim, m, cfg.iou_head_depth,
                                       sigmoid_output=cfg.iou_prediction_use_sigmoid, **kw)
        if cfg.pred_obj_scores:
            self.pred_obj_score_head = (MLP(dim, dim, 1, 3, **kw) if cfg.pred_obj_scores_mlp
                                        else Linear(dim, 1, axes=("embed", None), **kw))
        else:
            self.pred_obj_score_head = None

    def high_res_features(self, feat_s0: jax.Array, feat_s1: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The neck's two highest-resolution maps (B, 4h, 4w, d), (B, 2h, 2w, d) → conv_s0 / conv_s1 outputs
        (SAM2Base.forward_image applies these once per image)."""
        return self.conv_s0(feat_s0), self.conv_s1(feat_s1)

    def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse: jax.Array, dense: jax.Array,
                 high_res_features: tuple[jax.Array, jax.Array] | None = None) -> DecoderOutput:
        """image_embeddings (B, h, w, d) (or (1, …), repeated over the prompts), image_pe (h, w, d), sparse prompt
        (B, N, d), dense prompt (B, h, w, d), high-res features already through conv_s0/conv_s1
        ((B, 4h, 4w, d/8), (B, 2h, 2w, d/4)) → every mask token's output (`DecoderOutput`)."""
        b = sparse.shape[0]
        dt = self.dtype
        rows = ([self.obj_score_token[...]] if self.obj_score_token is not None else []) + [
            self.iou_token[...], self.mask_tokens[...]]
        out_tokens = jnp.concatenate([r.astype(jnp.float32) for r in rows], axis=0)
        s = 1 if self.obj_score_token is not None else 0
        tokens = jnp.concatenate([jnp.broadcast_to(out_tokens, (b, *out_tokens.shape)),
                                  sparse.astype(jnp.float32)], axis=1).astype(dt)
        src = jnp.broadcast_to(image_embeddings, (b, *image_embeddings.shape[1:])) + dense
        pos = jnp.broadcast_to(image_pe, src.shape)
        _, h, w, d = src.shape
        hs, keys = self.transformer(src.astype(dt), pos.astype(dt), tokens)
        iou_token_out = hs[:, s]
        mask_tokens_out = hs[:, s + 1: s + 1 + self.num_mask_tokens]

        src = keys.reshape(b, h, w, d)
        up = self.upscale_conv1(src)
        if high_res_features is not None:
            feat_s0, feat_s1 = high_res_features
            up = gelu(self.upscale_norm(up + jnp.broadcast_to(feat_s1, up.shape).astype(dt)))
            up = self.upscale_conv2(up)
            up = gelu(up + jnp.broadcast_to(feat_s0, up.shape).astype(dt))
        else:
            up = gelu(self.upscale_conv2(gelu(self.upscale_norm(up))))
        hyper = jnp.stack([mlp(mask_tokens_out[:, k]) for k, mlp in enumerate(self.output_hypernetworks_mlps)],
                          axis=1)  # (B, M, d/8)
        masks = jnp.einsum("bmc,bhwc->bmhw", hyper.astype(jnp.float32), up.astype(jnp.float32))
        iou = self.iou_prediction_head(iou_token_out).astype(jnp.float32)
        if self.pred_obj_score_head is not None:
            obj = self.pred_obj_score_head(hs[:, 0]).astype(jnp.float32)
        else:
            obj = jnp.full((b, 1), 10.0, jnp.float32)
        return DecoderOutput(masks, iou, mask_tokens_out.astype(jnp.float32), obj)


def stability_scores(mask_logits: jax.Array, delta: float) -> jax.Array:
    """(..., H, W) logits → (...,) |logits > δ| / |logits > −δ| (1 where nothing is above −δ)."""
    inter = jnp.sum(mask_logits > delta, axis=(-2, -1)).astype(jnp.float32)
    union = jnp.sum(mask_logits > -delta, axis=(-2, -1)).astype(jnp.float32)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def select_masks(out: DecoderOutput, cfg: MaskDecoderConfig, multimask_output: bool, *, training: bool = False
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Upstream `MaskDecoder.forward`'s output selection → (masks (B, K, H, W), iou (B, K), sam tokens (B, K', d)),
    K = num_multimask if multimask_output else 1."""
    masks, iou = out.masks, out.iou
    if multimask_output:
        sel_masks, sel_iou = masks[:, 1:], iou[:, 1:]
    elif cfg.dynamic_multimask_via_stability and not training:
        multi_masks, multi_iou = masks[:, 1:], iou[:, 1:]
        best = jnp.argmax(multi_iou, axis=-1)
        best_masks = jnp.take_along_axis(multi_masks, best[:, None, None, None], axis=1)
        best_iou = jnp.take_along_axis(multi_iou, best[:, None], axis=1)
        stable = stability_scores(masks[:, 0], cfg.dynamic_multimask_stability_delta) \
            >= cfg.dynamic_multimask_stability_thresh
        sel_masks = jnp.where(stable[:, None, None, None], masks[:, 0:1], best_masks)
        sel_iou = jnp.where(stable[:, None], iou[:, 0:1], best_iou)
    else:
        sel_masks, sel_iou = masks[:, 0:1], iou[:, 0:1]
    tokens = out.mask_tokens[:, 1:] if multimask_output and cfg.use_multimask_token_for_obj_ptr \
        else out.mask_tokens[:, 0:1]
    return sel_masks, sel_iou, tokens

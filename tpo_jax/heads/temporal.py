"""CG-DETR temporal-grounding head and its losses (MODEL-SPEC §6, quirks §10.16–§10.17).

`CGDETR` maps text-token features, per-clip video features and the LLM hidden state at the `<temp>` token to
`num_queries` moment proposals (center, width) with foreground logits, plus per-clip saliency scores.
Everything runs with static shapes and per-sample semantics for any batch size B ≥ 1 (no sample influences
another; the reference's B > 1 T2V `attn_mask` head/batch mix-up is not reproduced and the redundant mask is
omitted). The forward (§6.3 steps 1–8):

1. the prompt is inserted right after the k valid text tokens of each sample (a static gather, Lt' = Lt + 1);
2. `input_{txt,vid}_proj`: [LN → Dropout(input_dropout) → Linear → ReLU] then [LN → Dropout → Linear];
   token-type embeddings (text 0, video 1);
3. video positions = normalised sine encoding of the video mask (256 features; text positions are 0);
4. `txtproj_encoder` (2 post-norm layers) over [dummy_rep_token; text] gives the dummy tokens;
5./7a. T2V encoder: video queries attend to [dummies; *unencoded* projected text]; dummies take softmax mass but
   contribute no value; y = x + attn, out = norm2(y + FFN(norm1(y))); A = head- and layer-averaged attention;
7b. saliency token from the 10 `global_rep_token`s weighted by clip importance (from A), + the detached video
   mean; its second T2V pass has no keys, so each layer is y = g + out_proj.bias, norm2(y + FFN(norm1(y)));
7c/d. 3 post-norm encoder layers over [global; video] (text dropped); memory_local = out[1:] + out[0];
7e. DAB/Conditional-DETR decoder (tgt₀ = 0, sine reference embedding, query_scale, width modulation of the
   whole sine embedding, layer-0-only `ca_qpos_proj`, 2·head_dim cross-attention heads, reference refinement);
8. class / span heads per decoder layer, saliency = ⟨proj1(local), proj2(global)⟩ / √d, T2V attention values.

Dropout (only when an `rng` is passed) follows the reference modules: attention-probability dropout and the
FFN inner dropout (rate `cfg.dropout`), per-sample stochastic depth ("DropPath", rate `cfg.dropout`) on every
attention / FFN residual branch, and `input_dropout` inside the input projections.

Losses (`temporal_loss_terms`) are per sample, returned with shape (B,): Hungarian-matched span L1 / GIoU /
label CE on the last decoder layer and (if `cfg.aux_loss`) on every earlier layer with its own matching, and the
saliency loss of the reference's B = 1 path (§6.7) applied to each sample separately. The reference's B > 1
negative-pair pass (rolled text, `saliency_scores_neg`), and the `ms_align`, `distill` and `orthogonal_dummy`
losses (which need the training-only moment / sentence encoders) are NOT implemented.

Parameter tree (logical axes in brackets; d = hidden_dim, F = ffn_dim, nd = num_dummies):

    input_txt_proj.{0,1}.norm.{scale,bias}        (txt_dim) / (d)        [None] / [norm]
    input_txt_proj.0.linear.{kernel,bias}         (txt_dim, d)           [None, mlp]
    input_txt_proj.1.linear.{kernel,bias}         (d, d)                 [mlp, embed]
    input_vid_proj.*                              same with vid_dim
    token_type_embeddings.embedding               (2, d)                 [None, embed]
    dummy_rep_token, dummy_rep_pos                (nd, d)                [None, embed]
    global_rep_token                              (total_prompts, d)     [None, embed]
    global_rep_pos                                (1, d)                 [None, embed]
    query_embed.embedding                         (num_queries, 2)       [None, None]
    txtproj_encoder.layers.{i}.<STD>              i < 2
    transformer.t2v_encoder.layers.{i}.self_attn.out_proj.{kernel,bias}, linear1, linear2, norm1, norm2,
        activation.weight                         i < t2v_layers
    transformer.encoder.layers.{i}.<STD>          i < enc_layers
    transformer.decoder.layers.{i}.{sa_qcontent,sa_qpos,sa_kcontent,sa_kpos,sa_v,
        ca_qcontent,ca_kcontent,ca_kpos,ca_v,ca_qpos_sine}_proj.{kernel,bias}   (d, d)
    transformer.decoder.layers.0.ca_qpos_proj.{kernel,bias}                      (layer 0 only)
    transformer.decoder.layers.{i}.{self_attn,cross_attn}.out_proj, linear1, linear2, norm1..3, activation.weight
    transformer.decoder.norm.{scale,bias}
    transformer.decoder.{query_scale,ref_point_head}.layers.{0,1}.{kernel,bias}  (d, d)
    transformer.decoder.ref_anchor_head.layers.{0,1}                             (d, d), (d, 1)
    transformer.decoder.bbox_embed.layers.{0,1,2}                                (d, d), (d, d), (d, 2)
    class_embed.{kernel,bias}                     (d, 2)
    span_embed.layers.{0,1,2}.{kernel,bias}       (d, d), (d, d), (d, 2)
    saliency_proj{1,2}.{kernel,bias}              (d, d)
  with <STD> = self_attn.{q_proj,k_proj,v_proj,out_proj}.{kernel,bias}, linear1 (d, F), linear2 (F, d),
  norm1, norm2, activation.weight (1,) (the PReLU slope, one per layer).

Checkpoint mapping (prefix `cg_model.`; Linear `weight` (out, in) → `kernel` (in, out) transposed, `bias` as is;
LayerNorm `weight` → `scale`; nn.Embedding `weight` → `embedding`; plain tensors as is):

    input_{txt,vid}_proj.{i}.LayerNorm.{weight,bias}  → input_{txt,vid}_proj.{i}.norm.{scale,bias}
    input_{txt,vid}_proj.{i}.net.1.{weight,bias}      → input_{txt,vid}_proj.{i}.linear.{kernel,bias}
    token_type_embeddings.weight, query_embed.weight  → token_type_embeddings.embedding, query_embed.embedding
    dummy_rep_token, dummy_rep_pos, global_rep_token, global_rep_pos → same names
    {P}.layers.{i}.self_attn.in_proj_weight (3d, d)   → rows [0:d], [d:2d], [2d:3d] transposed →
                                                        {P}.layers.{i}.self_attn.{q,k,v}_proj.kernel
    {P}.layers.{i}.self_attn.in_proj_bias (3d,)       → thirds → {P}.layers.{i}.self_attn.{q,k,v}_proj.bias
        for P ∈ {txtproj_encoder, transformer.encoder}
    every other `cg_model.X.weight` / `X.bias` of a Linear → `X.kernel` (transposed) / `X.bias`, same path
        (…out_proj, linear1, linear2, sa_*_proj, ca_*_proj, decoder MLP `layers.N`, class_embed, span_embed,
        saliency_proj1/2); every `…normN.{weight,bias}` / `decoder.norm.{weight,bias}` → `.{scale,bias}`;
        `…activation.weight` (1,) → `…activation.weight` (as is).
    Dropped (training-only or unused, no parameters here): moment_rep_token, moment_rep_pos, sent_rep_token,
        sent_rep_pos, scls_encoder.*, transformer.mcls_encoder.*, txt_proj_linear.*, txt_position_embed.*;
        cg_criterion.empty_weight is the constant [1, eos_coef] in the loss.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax import layers
from tpo_jax.config import TemporalHeadConfig
from tpo_jax.heads import box_ops, hungarian
from tpo_jax.layers import Embed, LayerNorm, Linear, MLP, param, split_rng

LN_EPS = 1e-5  # PyTorch nn.LayerNorm default, used everywhere in CG-DETR
FOREGROUND, BACKGROUND = 0, 1  # class indices of `class_embed`
RANK_TAU = 0.5  # temperature of the rank-contrastive saliency term
RANK_LEVELS = 11  # ranks r = 1..11 (saliency labels >= r are positives)
_NEG_FILL = -1e3  # score given to padded clips in the rank-contrastive term

_xavier = nnx.initializers.xavier_uniform()  # the reference's Transformer._reset_parameters
_torch_linear = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # nn.Linear: U(±1/√in)
_randn = nnx.initializers.normal(stddev=1.0)  # torch.randn tokens, nn.Embedding


# ------------------------------------------------------------------------------------------------- helpers

def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Per-sample stochastic depth (the reference's `DropPath`): zero the whole (B, ...) row x[b] with
    probability `rate`, scale the kept rows by 1/(1 − rate). Identity when `rng` is None or `rate` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def inverse_sigmoid(x: jax.Array, eps: float = 1e-3) -> jax.Array:
    """log(max(x, eps) / max(1 − x, eps)) after clamping x to [0, 1] (the reference's `inverse_sigmoid`)."""
    x = jnp.clip(x, 0.0, 1.0)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


def _sine(x: jax.Array, num_feats: int) -> jax.Array:
    """x (...) → (..., num_feats): feature k = sin(x/ω_k) for even k, cos(x/ω_k) for odd k,
    ω_k = 10000^(2⌊k/2⌋/num_feats) (the interleaved sin/cos of DETR's sine embeddings). float32."""
    k = jnp.arange(num_feats)
    dim_t = 10000.0 ** (2.0 * (k // 2) / num_feats)
    p = x.astype(jnp.float32)[..., None] / dim_t
    return jnp.where(k % 2 == 0, jnp.sin(p), jnp.cos(p))


def video_position_embedding(mask: jax.Array, num_feats: int) -> jax.Array:
    """`PositionEmbeddingSine(num_feats, normalize=True)` of a (B, L) mask → (B, L, num_feats) float32:
    x_l = cumsum(mask)_l / (cumsum(mask)_last + 1e-6) · 2π, then the interleaved sine features."""
    c = jnp.cumsum(mask.astype(jnp.float32), axis=1)
    x = c / (c[:, -1:] + 1e-6) * (2.0 * math.pi)
    return _sine(x, num_feats)


def reference_sine_embedding(ref: jax.Array, d_model: int) -> jax.Array:
    """`gen_sineembed_for_position`: ref (..., 2) (center, width) → (..., d_model) float32 =
    [sine(2π·center, d/2); sine(2π·width, d/2)]."""
    half = d_model // 2
    return jnp.concatenate([_sine(ref[..., 0] * (2.0 * math.pi), half),
                            _sine(ref[..., 1] * (2.0 * math.pi), half)], axis=-1)


def _l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """F.normalize: x / max(‖x‖₂, 1e-12)."""
    n = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
    return x / jnp.maximum(n, 1e-12).astype(x.dtype)


def insert_prompt(txt: jax.Array, txt_mask: jax.Array, prompt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Insert prompt (B, D) after the k = Σ mask valid tokens of each row (valid tokens first):
    [txt[:k], prompt, txt[k:]] and [mask[:k], 1, mask[k:]], shapes (B, Lt+1, D) / (B, Lt+1). Static gather."""
    b, lt = txt_mask.shape
    k = jnp.sum(txt_mask.astype(jnp.int32), axis=1)[:, None]  # (B, 1)
    j = jnp.arange(lt + 1)[None, :]  # (1, Lt+1)
    src = jnp.clip(j - (j > k).astype(jnp.int32), 0, lt - 1)  # (B, Lt+1)
    at_prompt = j == k
    gathered = jnp.take_along_axis(txt, src[..., None], axis=1)
    out = jnp.where(at_prompt[..., None], prompt[:, None, :].astype(txt.dtype), gathered)
    mask = jnp.where(at_prompt, jnp.ones((), txt_mask.dtype), jnp.take_along_axis(txt_mask, src, axis=1))
    return out, mask


# ------------------------------------------------------------------------------------------------- modules

class PReLU(nnx.Module):
    """nn.PReLU() with a single learned slope `weight` (1,), initialised to 0.25."""

    def __init__(self, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.weight = param(rngs, nnx.initializers.constant(0.25), (1,), (None,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.weight[...].astype(x.dtype)
        return jnp.where(x >= 0, x, a * x)


class LinearLayer(nnx.Module):
    """CG-DETR `LinearLayer`: LayerNorm(in) → Dropout → Linear → optional ReLU."""

    def __init__(self, in_features: int, out_features: int, *, relu: bool, dropout_rate: float,
                 in_axis: str | None, out_axis: str | None, dtype, param_dtype, rngs: nnx.Rngs):
        self.relu, self.dropout_rate = relu, dropout_rate
        norm_axis = "norm" if in_axis is not None else None
        self.norm = LayerNorm(in_features, eps=LN_EPS, axis_name=norm_axis, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
        self.linear = Linear(in_features, out_features, axes=(in_axis, out_axis), dtype=dtype,
                             param_dtype=param_dtype, kernel_init=_torch_linear, rngs=rngs)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        y = self.linear(layers.dropout(self.norm(x), self.dropout_rate, rng))
        return jax.nn.relu(y) if self.relu else y


class OutProj(nnx.Module):
    """An attention module without input projections (DAB-DETR / CG-DETR `attention.py`, `crossattention.py`):
    only `out_proj` exists."""

    def __init__(self, d: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.out_proj = Linear(d, d, axes=("heads", "embed"), dtype=dtype, param_dtype=param_dtype,
                               kernel_init=_xavier, rngs=rngs)


class MultiheadAttention(nnx.Module):
    """nn.MultiheadAttention (packed in_proj stored as separate q/k/v projections), softmax(q·kᵀ/√hd)."""

    def __init__(self, d: int, num_heads: int, dropout_rate: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.dropout_rate = num_heads, dropout_rate
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_xavier, rngs=rngs)
        self.q_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = Linear(d, d, axes=("heads", "embed"), **kw)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array,
                 rng: jax.Array | None = None) -> jax.Array:
        b, lq, d = q.shape
        s, h = k.shape[1], self.num_heads
        qh = self.q_proj(q).reshape(b, lq, h, d // h)
        kh = self.k_proj(k).reshape(b, s, h, d // h)
        vh = self.v_proj(v).reshape(b, s, h, d // h)
        out = layers.attention(qh, kh, vh, key_valid[:, None, None, :].astype(bool),
                               dropout_rate=self.dropout_rate, rng=rng)
        return self.out_proj(out.reshape(b, lq, d))


class FFN(nnx.Module):
    """Shared pieces of the post-norm layers: linear1 → PReLU → Dropout → linear2."""

    def _init_ffn(self, d: int, ffn: int, dropout_rate: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dropout_rate = dropout_rate
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_xavier, rngs=rngs)
        self.linear1 = Linear(d, ffn, axes=("embed", "mlp"), **kw)
        self.linear2 = Linear(ffn, d, axes=("mlp", "embed"), **kw)
        self.activation = PReLU(param_dtype=param_dtype, rngs=rngs)

    def _ffn(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        return self.linear2(layers.dropout(self.activation(self.linear1(x)), self.dropout_rate, rng))


class EncoderLayer(FFN):
    """Standard post-norm `TransformerEncoderLayer`: q = k = x + pos, v = x;
    x = norm1(x + MHA); x = norm2(x + FFN(x))."""

    def __init__(self, cfg: TemporalHeadConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_dim
        self._init_ffn(d, cfg.ffn_dim, cfg.dropout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = MultiheadAttention(d, cfg.num_heads, cfg.dropout, dtype=dtype, param_dtype=param_dtype,
                                            rngs=rngs)
        self.norm1 = LayerNorm(d, eps=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, eps=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, valid: jax.Array, pos: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        r = split_rng(rng, 4)
        qk = x + pos
        x = self.norm1(x + drop_path(self.self_attn(qk, qk, x, valid, r[0]), self.dropout_rate, r[1]))
        return self.norm2(x + drop_path(self._ffn(x, r[2]), self.dropout_rate, r[3]))


class Stack(nnx.Module):
    """A container with `layers` (keeps the `…encoder.layers.{i}` checkpoint paths)."""

    def __init__(self, layer_list):
        self.layers = nnx.List(layer_list)


class T2VEncoderLayer(FFN):
    """`T2V_TransformerEncoderLayer` (post-norm) with the dummy-token attention of `crossattention.py`.

    Video queries (x + pos) attend to keys (keys + keys_pos) = [dummies; text] with values = keys, no input
    projections, logits scaled by 1/√head_dim, padded keys masked. The softmax runs over all keys but only the
    non-dummy keys contribute values. Residual order: y = x + out_proj(ctx); out = norm2(y + FFN(norm1(y))).
    """

    def __init__(self, cfg: TemporalHeadConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_dim
        self.num_heads, self.num_dummies = cfg.num_heads, cfg.num_dummies
        self._init_ffn(d, cfg.ffn_dim, cfg.dropout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = OutProj(d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(d, eps=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, eps=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _post(self, y: jax.Array, r: list) -> jax.Array:
        return self.norm2(y + drop_path(self._ffn(self.norm1(y), r[0]), self.dropout_rate, r[1]))

    def __call__(self, x: jax.Array, pos: jax.Array, keys: jax.Array, keys_pos: jax.Array, key_valid: jax.Array,
                 rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x, pos (B, Lv, d); keys, keys_pos (B, S, d); key_valid (B, S) → (new x, head-averaged attention
        probabilities (B, Lv, S) float32, before dropout)."""
        r = split_rng(rng, 4)
        b, lv, d = x.shape
        s, h = keys.shape[1], self.num_heads
        hd = d // h
        q = ((x + pos) * (hd ** -0.5)).reshape(b, lv, h, hd)
        k = (keys + keys_pos).reshape(b, s, h, hd)
        v = keys.reshape(b, s, h, hd)
        logits = jnp.einsum("blhd,bshd->bhls", q, k).astype(jnp.float32)
        logits = jnp.where(key_valid[:, None, None, :].astype(bool), logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        attn_map = probs.mean(axis=1)
        probs_d = layers.dropout(probs, self.dropout_rate, r[0]).astype(x.dtype)
        nd = self.num_dummies
        ctx = jnp.einsum("bhls,bshd->blhd", probs_d[..., nd:], v[:, nd:])  # dummies: mass but no value
        y = x + drop_path(self.self_attn.out_proj(ctx.reshape(b, lv, d)), self.dropout_rate, r[1])
        return self._post(y, r[2:]), attn_map

    def empty_keys(self, g: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """The layer on a sequence whose key set is empty (the saliency token pass, `dummy=False`): the
        attention output is exactly `out_proj.bias`, so y = g + bias; out = norm2(y + FFN(norm1(y)))."""
        r = split_rng(rng, 3)
        attn = jnp.broadcast_to(self.self_attn.out_proj.bias[...].astype(g.dtype), g.shape)
        y = g + drop_path(attn, self.dropout_rate, r[0])
        return self._post(y, r[1:])


class DecoderLayer(FFN):
    """Conditional/DAB-DETR `TransformerDecoderLayer` (post-norm, no self-attention input projections).

    Self-attention: q = sa_qcontent(tgt) + sa_qpos(query_pos), k = sa_kcontent(tgt) + sa_kpos(query_pos),
    v = sa_v(tgt), scale 1/√hd. Cross-attention over memory: per head q = [q_content_h; ca_qpos_sine(S)_h],
    k = [k_content_h; ca_kpos(pos)_h] (2·hd features, scale 1/√(2·hd)), v = ca_v(memory) (hd per head);
    in the first layer q_content += ca_qpos(query_pos) and k_content += k_pos.
    """

    def __init__(self, cfg: TemporalHeadConfig, is_first: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_dim
        self.num_heads, self.is_first = cfg.num_heads, is_first
        self._init_ffn(d, cfg.ffn_dim, cfg.dropout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(axes=("embed", "heads"), dtype=dtype, param_dtype=param_dtype, kernel_init=_xavier, rngs=rngs)
        self.sa_qcontent_proj = Linear(d, d, **kw)
        self.sa_qpos_proj = Linear(d, d, **kw)
        self.sa_kcontent_proj = Linear(d, d, **kw)
        self.sa_kpos_proj = Linear(d, d, **kw)
        self.sa_v_proj = Linear(d, d, **kw)
        self.self_attn = OutProj(d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ca_qcontent_proj = Linear(d, d, **kw)
        self.ca_qpos_proj = Linear(d, d, **kw) if is_first else None
        self.ca_kcontent_proj = Linear(d, d, **kw)
        self.ca_kpos_proj = Linear(d, d, **kw)
        self.ca_v_proj = Linear(d, d, **kw)
        self.ca_qpos_sine_proj = Linear(d, d, **kw)
        self.cross_attn = OutProj(d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(d, eps=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, eps=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm3 = LayerNorm(d, eps=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, tgt, memory, mem_valid, pos, query_pos, query_sine, rng: jax.Array | None = None):
        """tgt, query_pos, query_sine (B, Q, d); memory, pos (B, S, d); mem_valid (B, S) → tgt (B, Q, d)."""
        r = split_rng(rng, 6)
        b, nq, d = tgt.shape
        s, h = memory.shape[1], self.num_heads
        hd = d // h
        # self-attention
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        v = self.sa_v_proj(tgt)
        a = layers.attention(q.reshape(b, nq, h, hd), k.reshape(b, nq, h, hd), v.reshape(b, nq, h, hd),
                             dropout_rate=self.dropout_rate, rng=r[0])
        tgt = self.norm1(tgt + drop_path(self.self_attn.out_proj(a.reshape(b, nq, d)), self.dropout_rate, r[1]))
        # cross-attention
        q_content = self.ca_qcontent_proj(tgt)
        k_content = self.ca_kcontent_proj(memory)
        v = self.ca_v_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.is_first:
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        q_sine = self.ca_qpos_sine_proj(query_sine)
        q = jnp.concatenate([q_content.reshape(b, nq, h, hd), q_sine.reshape(b, nq, h, hd)], axis=-1)
        k = jnp.concatenate([k_content.reshape(b, s, h, hd), k_pos.reshape(b, s, h, hd)], axis=-1)
        a = layers.attention(q, k, v.reshape(b, s, h, hd), mem_valid[:, None, None, :].astype(bool),
                             scale=(2 * hd) ** -0.5, dropout_rate=self.dropout_rate, rng=r[2])
        tgt = self.norm2(tgt + drop_path(self.cross_attn.out_proj(a.reshape(b, nq, d)), self.dropout_rate, r[3]))
        return self.norm3(tgt + drop_path(self._ffn(tgt, r[4]), self.dropout_rate, r[5]))


class Decoder(nnx.Module):
    """`TransformerDecoder` with iterative (detached) reference refinement; returns every layer."""

    def __init__(self, cfg: TemporalHeadConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_dim
        self.d_model = d
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i == 0, **kw) for i in range(cfg.dec_layers)])
        self.norm = LayerNorm(d, eps=LN_EPS, **kw)
        sq = [("embed", "mlp"), ("mlp", "embed")]
        self.query_scale = MLP((d, d, d), axes=sq, **kw)
        self.ref_point_head = MLP((d, d, d), axes=sq, **kw)
        self.ref_anchor_head = MLP((d, d, 1), axes=[("embed", "mlp"), ("mlp", None)], **kw)
        self.bbox_embed = MLP((d, d, d, 2), axes=[("embed", "mlp"), ("mlp", "embed"), ("embed", None)], **kw)

    def __call__(self, memory, mem_valid, pos, ref_unsigmoid, rng: jax.Array | None = None):
        """memory, pos (B, S, d); mem_valid (B, S); ref_unsigmoid (Q, 2) →
        (hs (L, B, Q, d) = norm(tgt_ℓ), references (L, B, Q, 2) = each layer's *input* reference)."""
        b = memory.shape[0]
        nq = ref_unsigmoid.shape[0]
        dtype = memory.dtype
        r = split_rng(rng, len(self.layers))
        tgt = jnp.zeros((b, nq, self.d_model), dtype)
        ref = jnp.broadcast_to(jax.nn.sigmoid(ref_unsigmoid.astype(jnp.float32)), (b, nq, 2))
        refs, hs = [ref], []
        for i, layer in enumerate(self.layers):
            sine = reference_sine_embedding(ref, self.d_model).astype(dtype)
            query_pos = self.ref_point_head(sine)
            if i > 0:
                sine = sine * self.query_scale(tgt)
            width_mod = jax.nn.sigmoid(self.ref_anchor_head(tgt).astype(jnp.float32))[..., 0] / ref[..., 1]
            sine = sine * width_mod[..., None].astype(dtype)
            tgt = layer(tgt, memory, mem_valid, pos, query_pos, sine, r[i])
            new_ref = jax.nn.sigmoid(self.bbox_embed(tgt).astype(jnp.float32) + inverse_sigmoid(ref))
            if i < len(self.layers) - 1:
                refs.append(new_ref)  # not detached: the heads see it with gradient
            ref = jax.lax.stop_gradient(new_ref)
            hs.append(self.norm(tgt))
        return jnp.stack(hs), jnp.stack(refs)


class Transformer(nnx.Module):
    """Container for `t2v_encoder`, `encoder` and `decoder` (§6.3 step 7); the logic lives in `CGDETR`."""

    def __init__(self, cfg: TemporalHeadConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.t2v_encoder = Stack([T2VEncoderLayer(cfg, **kw) for _ in range(cfg.t2v_layers)])
        self.encoder = Stack([EncoderLayer(cfg, **kw) for _ in range(cfg.enc_layers)])
        self.decoder = Decoder(cfg, **kw)


class CGDETR(nnx.Module):
    """CG-DETR temporal grounding head (MODEL-SPEC §6.3); see the module docstring."""

    def __init__(self, cfg: TemporalHeadConfig, prompt_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if prompt_dim != cfg.txt_dim:
            raise ValueError(f"CGDETR: prompt_dim {prompt_dim} must equal cfg.txt_dim {cfg.txt_dim} (the prompt "
                             "is inserted into the text sequence before `input_txt_proj`)")
        if cfg.hidden_dim % 2 or cfg.hidden_dim % cfg.num_heads:
            raise ValueError(f"CGDETR: hidden_dim {cfg.hidden_dim} must be even and divisible by num_heads")
        self.cfg, self.dtype = cfg, dtype
        d = cfg.hidden_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def proj(in_dim):
            return nnx.List([
                LinearLayer(in_dim, d, relu=True, dropout_rate=cfg.input_dropout, in_axis=None, out_axis="mlp",
                            **kw),
                LinearLayer(d, d, relu=False, dropout_rate=cfg.input_dropout, in_axis="mlp", out_axis="embed",
                            **kw)])

        self.input_txt_proj = proj(cfg.txt_dim)
        self.input_vid_proj = proj(cfg.vid_dim)
        self.token_type_embeddings = Embed(2, d, axes=(None, "embed"), **kw)
        self.dummy_rep_token = param(rngs, _randn, (cfg.num_dummies, d), (None, "embed"), param_dtype)
        self.dummy_rep_pos = param(rngs, _randn, (cfg.num_dummies, d), (None, "embed"), param_dtype)
        self.global_rep_token = param(rngs, _randn, (cfg.total_prompts, d), (None, "embed"), param_dtype)
        self.global_rep_pos = param(rngs, _randn, (1, d), (None, "embed"), param_dtype)
        self.query_embed = Embed(cfg.num_queries, 2, axes=(None, None), **kw)
        self.query_embed.embedding = param(rngs, _randn, (cfg.num_queries, 2), (None, None), param_dtype)
        self.txtproj_encoder = Stack([EncoderLayer(cfg, **kw) for _ in range(cfg.dummy_layers)])
        self.transformer = Transformer(cfg, **kw)
        self.class_embed = Linear(d, 2, axes=("embed", None), kernel_init=_torch_linear, **kw)
        self.span_embed = MLP((d, d, d, 2), axes=[("embed", "mlp"), ("mlp", "embed"), ("embed", None)], **kw)
        self.saliency_proj1 = Linear(d, d, axes=("embed", "mlp"), kernel_init=_torch_linear, **kw)
        self.saliency_proj2 = Linear(d, d, axes=("embed", "mlp"), kernel_init=_torch_linear, **kw)

    def __call__(self, txt: jax.Array, txt_mask: jax.Array, vid: jax.Array, vid_mask: jax.Array,
                 prompt: jax.Array, rng: jax.Array | None = None) -> dict[str, Any]:
        """txt (B, Lt, txt_dim), txt_mask (B, Lt) (1 = valid, valid first), vid (B, Lv, vid_dim), vid_mask (B, Lv)
        (valid first, ≥ 1 valid clip), prompt (B, txt_dim) or (B, 1, txt_dim) (the `<temp>` hidden state);
        rng: dropout key or None (deterministic). Returns

        * pred_logits (B, Q, 2) (class 0 = foreground), pred_spans (B, Q, 2) normalised (center, width), both of
          the last decoder layer, float32;
        * aux_outputs: list of dec_layers − 1 dicts {pred_logits, pred_spans} for the earlier layers;
        * saliency_scores (B, Lv); t2v_attn_values (alias t2vattnvalues) (B, Lv) ∈ [0, 1];
        * cate_attn_weights (B, Lv, nd + Lt + 1) (T2V attention, head- and layer-averaged);
        * video_mask (B, Lv); txt_mask (B, Lt + 1) (after inserting the prompt); dummy_tokens (B, nd, d).
        """
        cfg, dt = self.cfg, self.dtype
        d, nd = cfg.hidden_dim, cfg.num_dummies
        r = split_rng(rng, 8)
        b, lv = vid_mask.shape
        vmask = vid_mask.astype(jnp.float32)
        vvalid = vid_mask.astype(bool)
        if prompt.ndim == 3:
            prompt = prompt[:, 0]

        # 1. prompt after the valid text tokens
        txt, tmask = insert_prompt(txt.astype(dt), txt_mask, prompt.astype(dt))
        tvalid = tmask.astype(bool)
        # 2. input projections + token types
        rt, rv = split_rng(r[0], 2), split_rng(r[1], 2)
        t, v = txt, vid.astype(dt)
        for i, lyr in enumerate(self.input_txt_proj):
            t = lyr(t, rt[i])
        for i, lyr in enumerate(self.input_vid_proj):
            v = lyr(v, rv[i])
        tte = self.token_type_embeddings.embedding[...].astype(dt)
        t = t + tte[0]
        v = v + tte[1]
        # 3. positions
        pos_v = video_position_embedding(vid_mask, d).astype(dt)
        # 4. dummy tokens from the txtproj_encoder over [dummies; text]
        dummy = jnp.broadcast_to(self.dummy_rep_token[...].astype(dt), (b, nd, d))
        dummy_pos = jnp.broadcast_to(self.dummy_rep_pos[...].astype(dt), (b, nd, d))
        x = jnp.concatenate([dummy, t], axis=1)
        x_pos = jnp.concatenate([dummy_pos, jnp.zeros_like(t)], axis=1)
        x_valid = jnp.concatenate([jnp.ones((b, nd), bool), tvalid], axis=1)
        rd = split_rng(r[2], len(self.txtproj_encoder.layers))
        for i, lyr in enumerate(self.txtproj_encoder.layers):
            x = lyr(x, x_valid, x_pos, rd[i])
        dummy_tokens = x[:, :nd]
        keys = jnp.concatenate([dummy_tokens, t], axis=1)  # [dummies; unencoded projected text]
        keys_pos = x_pos
        # 6. detached mean of the valid video tokens
        vlen = jnp.maximum(jnp.sum(vmask, axis=1), 1.0)
        ctx = jax.lax.stop_gradient(jnp.sum(v * vmask[..., None].astype(dt), axis=1) / vlen[:, None].astype(dt))

        # 7a. T2V encoder
        tr = self.transformer
        h = v
        attn = jnp.zeros((b, lv, keys.shape[1]), jnp.float32)
        r_t2v = split_rng(r[3], len(tr.t2v_encoder.layers))
        for i, lyr in enumerate(tr.t2v_encoder.layers):
            h, a = lyr(h, pos_v, keys, keys_pos, x_valid, r_t2v[i])
            attn = attn + a
        attn = attn / len(tr.t2v_encoder.layers)

        # 7b. saliency (global) token
        G = self.global_rep_token[...].astype(dt)
        sim = jax.nn.softmax((_l2_normalize(v - ctx[:, None]) @ _l2_normalize(G).T).astype(jnp.float32), axis=-1)
        imp = jax.lax.stop_gradient(jnp.sum(attn[..., nd:], axis=-1) * vmask)  # (B, Lv)
        imp = imp / jnp.maximum(jnp.sum(imp, axis=1, keepdims=True), jnp.finfo(jnp.float32).tiny) * lv
        score = jnp.mean(sim * imp[..., None], axis=1)  # (B, total_prompts)
        top_val, top_idx = jax.lax.top_k(score, cfg.num_prompts)
        g = jnp.einsum("bk,bkd->bd", top_val.astype(dt), G[top_idx]) + ctx  # (B, d)
        g = g[:, None]
        r_g = split_rng(r[4], len(tr.t2v_encoder.layers))
        for i, lyr in enumerate(tr.t2v_encoder.layers):
            g = lyr.empty_keys(g, r_g[i])

        # 7c/d. encoder over [global; video]
        gpos = jnp.broadcast_to(self.global_rep_pos[...].astype(dt), (b, 1, d))
        src = jnp.concatenate([g, h], axis=1)
        src_pos = jnp.concatenate([gpos, pos_v], axis=1)
        src_valid = jnp.concatenate([jnp.ones((b, 1), bool), vvalid], axis=1)
        r_enc = split_rng(r[5], len(tr.encoder.layers))
        for i, lyr in enumerate(tr.encoder.layers):
            src = lyr(src, src_valid, src_pos, r_enc[i])
        memory_global = src[:, 0]
        memory_local = src[:, 1:] + memory_global[:, None]

        # 7e. decoder
        hs, refs = tr.decoder(memory_local, vvalid, pos_v, self.query_embed.embedding[...], r[6])

        # 8. heads
        logits = self.class_embed(hs).astype(jnp.float32)  # (L, B, Q, 2)
        spans = jax.nn.sigmoid(self.span_embed(hs).astype(jnp.float32) + inverse_sigmoid(refs))
        saliency = jnp.sum((self.saliency_proj1(memory_local) * self.saliency_proj2(memory_global)[:, None])
                           .astype(jnp.float32), axis=-1) / math.sqrt(d)
        t2v_values = jnp.clip(jnp.sum(attn[..., nd:] * tmask.astype(jnp.float32)[:, None, :], axis=-1), 0.0, 1.0)
        return {
            "pred_logits": logits[-1],
            "pred_spans": spans[-1],
            "aux_outputs": [{"pred_logits": logits[i], "pred_spans": spans[i]} for i in range(len(hs) - 1)],
            "saliency_scores": saliency,
            "t2v_attn_values": t2v_values,
            "t2vattnvalues": t2v_values,
            "cate_attn_weights": attn,
            "video_mask": vid_mask,
            "txt_mask": tmask,
            "dummy_tokens": dummy_tokens,
        }


# --------------------------------------------------------------------------------------------------- losses

def _match_one(logits, spans, tgt, valid, cfg: TemporalHeadConfig):
    """One sample: logits (Q, 2), spans (Q, 2) cw, tgt (G, 2) cw, valid (G,) → span/giou/label losses ()."""
    nq = logits.shape[0]
    prob_fg = jax.nn.softmax(logits, axis=-1)[:, FOREGROUND]
    cost = (cfg.cost_span * box_ops.pairwise_l1(spans, tgt)
            - cfg.cost_giou * box_ops.pairwise_span_giou(box_ops.span_cw_to_xx(spans), box_ops.span_cw_to_xx(tgt))
            - cfg.cost_class * prob_fg[:, None])
    qidx = hungarian.match_targets(jax.lax.stop_gradient(cost), valid)
    matched = spans[qidx]  # (G, 2)
    vf = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(vf), 1.0)
    loss_span = jnp.sum(jnp.abs(matched - tgt) * vf[:, None]) / (2.0 * n)
    giou = box_ops.span_giou(box_ops.span_cw_to_xx(matched), box_ops.span_cw_to_xx(tgt))
    loss_giou = jnp.sum((1.0 - giou) * vf) / n
    fg = hungarian.matched_query_mask(qidx, valid, nq)
    target = jnp.where(fg, FOREGROUND, BACKGROUND)
    logp = jax.nn.log_softmax(logits, axis=-1)
    weight = jnp.where(fg, 1.0, cfg.eos_coef)
    ce = -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0] * weight
    return loss_span, loss_giou, jnp.mean(ce), qidx


def set_losses(pred_logits: jax.Array, pred_spans: jax.Array, spans: jax.Array, span_valid: jax.Array,
               cfg: TemporalHeadConfig) -> dict[str, jax.Array]:
    """Hungarian-matched losses of one decoder layer, per sample: loss_span, loss_giou, loss_label (B,) and the
    matching `query_index` (B, Ns) (entries for invalid targets are arbitrary)."""
    valid = span_valid.astype(bool)
    # padded targets get a harmless stand-in span (their values never reach a loss)
    tgt = jnp.where(valid[..., None], spans.astype(jnp.float32), jnp.asarray([0.5, 1.0], jnp.float32))
    fn = jax.vmap(lambda lg, sp, tg, va: _match_one(lg, sp, tg, va, cfg))
    l_span, l_giou, l_label, qidx = fn(pred_logits.astype(jnp.float32), pred_spans.astype(jnp.float32), tgt, valid)
    return {"loss_span": l_span, "loss_giou": l_giou, "loss_label": l_label, "query_index": qidx}


def rank_contrastive(scores: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Rank-contrastive saliency term RC of one sample (§6.7): scores, labels, mask (Lv,) → ().

    s = mask·scores + (1 − mask)·(−1000); for r = 1..11 with any label ≥ r: logits = s/τ (τ = 0.5; entries with
    labels > 100 are "dropped" to −1000), minus the max, logp = logits − log(Σ exp + 1e-6),
    term_r = −Σ(pos·logp·mask) / (Σ pos + 1e-6); RC = Σ_r term_r / 12.
    """
    scores = scores.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    s = mask * scores + (1.0 - mask) * _NEG_FILL
    keep = labels <= 100.0
    cur = jnp.where(keep, s / RANK_TAU, _NEG_FILL)
    logits = cur - jnp.max(cur)
    logp = logits - jnp.log(jnp.sum(jnp.exp(logits)) + 1e-6)
    total = jnp.zeros((), jnp.float32)
    for r in range(1, RANK_LEVELS + 1):
        pos = (labels >= r).astype(jnp.float32)
        mean_pos = jnp.sum(pos * logp * mask) / (jnp.sum(pos) + 1e-6)
        total = total + jnp.where(jnp.sum(pos) > 0, -mean_pos, 0.0)
    return total / (RANK_LEVELS + 1)


def margin_loss(scores: jax.Array, pos_idx: jax.Array, neg_idx: jax.Array, margin: float) -> jax.Array:
    """MG of one sample: Σ_p max(m + s[neg_p] − s[pos_p], 0) / #pairs · 2; scores (Lv,), pos/neg (P,) → ()."""
    scores = scores.astype(jnp.float32)
    terms = jnp.maximum(margin + scores[neg_idx] - scores[pos_idx], 0.0)
    return jnp.sum(terms) / pos_idx.shape[0] * 2.0


def binary_cross_entropy(p: jax.Array, y: jax.Array) -> jax.Array:
    """nn.BCELoss (mean), with the log terms clamped at −100 as PyTorch does."""
    p = p.astype(jnp.float32)
    y = y.astype(jnp.float32)
    log_p = jnp.maximum(jnp.log(p), -100.0)
    log_1mp = jnp.maximum(jnp.log1p(-p), -100.0)
    return jnp.mean(-(y * log_p + (1.0 - y) * log_1mp))


def saliency_loss(saliency: jax.Array, t2v_values: jax.Array, labels: jax.Array, pos_idx: jax.Array,
                  neg_idx: jax.Array, vid_mask: jax.Array, cfg: TemporalHeadConfig) -> jax.Array:
    """Per-sample saliency loss (the reference's B = 1 formula, §6.7) → (B,):
    MG(S) + RC(S, y, M) + w_wattn·[RC(A, y, M) + BCE(A, clamp(y, 0, 1)) + MG(A)]."""
    def one(s, a, y, p, n, m):
        main = margin_loss(s, p, n, cfg.saliency_margin) + rank_contrastive(s, y, m)
        attn = (rank_contrastive(a, y, m) + binary_cross_entropy(a, jnp.clip(y, 0.0, 1.0))
                + margin_loss(a, p, n, cfg.saliency_margin))
        return main + cfg.w_wattn * attn
    return jax.vmap(one)(saliency, t2v_values, labels, pos_idx.astype(jnp.int32), neg_idx.astype(jnp.int32),
                         vid_mask)


def temporal_loss_terms(outputs: dict[str, Any], targets: dict[str, jax.Array],
                        cfg: TemporalHeadConfig) -> dict[str, jax.Array]:
    """CG-DETR loss terms, each of shape (B,) (one value per sample; the caller masks / averages).

    targets: spans (B, Ns, 2) normalised (center, width); span_valid (B, Ns) bool; saliency_labels (B, Lv) per-clip
    scores; saliency_pos / saliency_neg (B, P) clip indices; vid_mask (B, Lv) (defaults to outputs["video_mask"]).
    Returns loss_span, loss_giou, loss_label, loss_{span,giou,label}_{i} for each aux layer i (if cfg.aux_loss),
    loss_saliency (0 when targets has no "saliency_pos") and
    loss_temporal = cfg.loss_scale · (w_span·span + w_giou·giou + w_label·label [+ same per aux layer]
    + w_saliency·saliency). Matching runs in-graph (`hungarian.match_targets`, cost under stop_gradient), once
    per layer and sample: cost = cost_span·L1(cw) − cost_giou·GIoU(xx) − cost_class·p_fg.
    A sample without valid spans gives finite values (span/giou 0, all queries background).
    """
    spans, valid = targets["spans"], targets["span_valid"]
    out: dict[str, jax.Array] = {}
    main = set_losses(outputs["pred_logits"], outputs["pred_spans"], spans, valid, cfg)
    for k in ("loss_span", "loss_giou", "loss_label"):
        out[k] = main[k]
    weights = {"loss_span": cfg.w_span, "loss_giou": cfg.w_giou, "loss_label": cfg.w_label}
    total = sum(weights[k] * out[k] for k in weights)
    if cfg.aux_loss:
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            terms = set_losses(aux["pred_logits"], aux["pred_spans"], spans, valid, cfg)
            for k in ("loss_span", "loss_giou", "loss_label"):
                out[f"{k}_{i}"] = terms[k]
                total = total + weights[k] * terms[k]
    b = outputs["pred_logits"].shape[0]
    if "saliency_pos" in targets:
        vid_mask = targets.get("vid_mask", outputs["video_mask"])
        out["loss_saliency"] = saliency_loss(outputs["saliency_scores"], outputs["t2v_attn_values"],
                                             targets["saliency_labels"], targets["saliency_pos"],
                                             targets["saliency_neg"], vid_mask, cfg)
    else:
        out["loss_saliency"] = jnp.zeros((b,), jnp.float32)
    total = total + cfg.w_saliency * out["loss_saliency"]
    out["loss_temporal"] = cfg.loss_scale * total
    return out


# -------------------------------------------------------------------------------------------- inference

def postprocess_spans(outputs: dict[str, Any], duration, *, clip_length: float | None = None) -> dict[str, jax.Array]:
    """§6.4: score = softmax(pred_logits)[..., 0]; windows = clamp(xx(pred_spans) · duration, 0, duration),
    sorted by score (descending, stable). duration: scalar or (B,) seconds.

    With `clip_length` (the demo's PostProcessorDETR, clip_length = 1): windows are rounded to 4 decimals and
    then to multiples of clip_length (round half to even, as torch.round).
    Returns {"windows": (B, Q, 2) [start, end] seconds, "scores": (B, Q), "order": (B, Q) query indices}.
    """
    logits = jnp.asarray(outputs["pred_logits"], jnp.float32)
    spans = jnp.asarray(outputs["pred_spans"], jnp.float32)
    score = jax.nn.softmax(logits, axis=-1)[..., FOREGROUND]
    dur = jnp.asarray(duration, jnp.float32)
    if dur.ndim == 1:
        dur = dur[:, None, None]
    windows = jnp.clip(box_ops.span_cw_to_xx(spans) * dur, 0.0, dur)
    if clip_length is not None:
        windows = jnp.round(windows, 4)
        windows = jnp.round(windows / clip_length) * clip_length
    order = jnp.argsort(-score, axis=-1, stable=True)
    return {"windows": jnp.take_along_axis(windows, order[..., None], axis=1),
            "scores": jnp.take_along_axis(score, order, axis=1), "order": order}


__all__ = ["CGDETR", "temporal_loss_terms", "set_losses", "saliency_loss", "rank_contrastive", "margin_loss",
           "binary_cross_entropy", "postprocess_spans", "insert_prompt", "inverse_sigmoid",
           "video_position_embedding", "reference_sine_embedding"]

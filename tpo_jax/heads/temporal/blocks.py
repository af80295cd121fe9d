"""Building blocks of the CG-DETR temporal head (MODEL-SPEC §6.3); `CGDETR` in `model.py` assembles them.

- `LinearLayer`: the input projections' [LN → Dropout → Linear → optional ReLU];
- `EncoderLayer`: standard post-norm `TransformerEncoderLayer` (the `txtproj_encoder` and `transformer.encoder`);
- `T2VEncoderLayer`: the text-to-video encoder layer with the dummy-token attention (dummies take softmax mass but
  contribute no value), and its empty-key pass for the saliency token;
- `DecoderLayer` / `Decoder`: the DAB/Conditional-DETR decoder with iterative reference refinement;
- `Stack`, `Transformer`, `OutProj`, `MultiheadAttention`, `FFN`, `PReLU`: containers and pieces that keep the
  checkpoint's module paths;
- `drop_path` (per-sample stochastic depth), `inverse_sigmoid`, and the DETR sine embeddings
  (`video_position_embedding`, `reference_sine_embedding`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax import layers
from tpo_jax.attention import AttentionMask, attention
from tpo_jax.config import TemporalHeadConfig
from tpo_jax.layers import LayerNorm, Linear, MLP, param, split_rng

LN_EPS = 1e-5  # PyTorch nn.LayerNorm default, used everywhere in CG-DETR

_xavier = nnx.initializers.xavier_uniform()  # the reference's Transformer._reset_parameters
_torch_linear = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # nn.Linear: U(±1/√in)


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
        out = attention(qh, kh, vh, AttentionMask(key_valid=key_valid.astype(bool)), dropout_rate=self.dropout_rate,
                        rng=rng)
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
    x = norm1(x + MHA); x = norm2(x + FFN(x)). `num_heads` defaults to `cfg.num_heads`."""

    def __init__(self, cfg: TemporalHeadConfig, *, num_heads: int | None = None, dtype, param_dtype,
                 rngs: nnx.Rngs):
        d = cfg.hidden_dim
        self._init_ffn(d, cfg.ffn_dim, cfg.dropout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = MultiheadAttention(d, num_heads or cfg.num_heads, cfg.dropout, dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs)
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
        a = attention(q.reshape(b, nq, h, hd), k.reshape(b, nq, h, hd), v.reshape(b, nq, h, hd),
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
        a = attention(q, k, v.reshape(b, s, h, hd), AttentionMask(key_valid=mem_valid.astype(bool)),
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
    """Container for `t2v_encoder`, `encoder`, `decoder` (§6.3 step 7) and the training-only moment-token
    encoder `mcls_encoder`; the logic lives in `CGDETR`."""

    def __init__(self, cfg: TemporalHeadConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.t2v_encoder = Stack([T2VEncoderLayer(cfg, **kw) for _ in range(cfg.t2v_layers)])
        self.encoder = Stack([EncoderLayer(cfg, **kw) for _ in range(cfg.enc_layers)])
        self.decoder = Decoder(cfg, **kw)
        self.mcls_encoder = Stack([EncoderLayer(cfg, **kw) for _ in range(cfg.moment_layers)])  # training only


__all__ = ["drop_path", "inverse_sigmoid", "video_position_embedding", "reference_sine_embedding", "PReLU",
           "LinearLayer", "OutProj", "MultiheadAttention", "FFN", "EncoderLayer", "Stack", "T2VEncoderLayer",
           "DecoderLayer", "Decoder", "Transformer"]

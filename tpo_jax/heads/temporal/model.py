"""CG-DETR temporal-grounding head, the module (MODEL-SPEC §6, quirks §10.16–§10.17).

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

The building blocks live in `blocks.py`, the losses in `loss.py`, the inference post-processing in
`postprocess.py`.

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

from tpo_jax.config import TemporalHeadConfig
from tpo_jax.heads.temporal.blocks import (EncoderLayer, LinearLayer, Stack, Transformer, _torch_linear,
                                           inverse_sigmoid, video_position_embedding)
from tpo_jax.layers import Embed, Linear, MLP, param, split_rng

FOREGROUND, BACKGROUND = 0, 1  # class indices of `class_embed`

_randn = nnx.initializers.normal(stddev=1.0)  # torch.randn tokens, nn.Embedding


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


__all__ = ["CGDETR", "insert_prompt", "FOREGROUND", "BACKGROUND"]

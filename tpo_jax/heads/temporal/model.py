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

Training-path extras (what the criterion's `loss_saliency` with negatives, `loss_ms_align` and `loss_distill`
read; `tpo_jax.heads.temporal.loss`):

9. `neg_partner` (B,) given: the negative pass — steps 7a–7d re-run with each row's video against the dummy +
   text keys of row `neg_partner[b]` (its own positions, video mean and mask), giving `saliency_scores_neg` and
   `t2vattnvalues_neg` (B, Lv). Which rows pair is decided outside (`tpo_jax.heads.temporal.batch`); rows
   without a real negative are computed too (static shapes) and masked by the loss.
6'. `relevant_clips` (B, Lv) given (the per-clip saliency labels; moment clips = label > 0): sentence tokens from
   `scls_encoder` over [sent_rep_token; text] (positions [sent_rep_pos; 0]) and over [sent_rep_token; dummies]
   ([sent_rep_pos; dummy_rep_pos]); moment / non-moment tokens from `transformer.mcls_encoder` over
   [moment_rep_token; video] (positions [moment_rep_pos; video positions]) with the keys restricted to the
   valid moment resp. non-moment clips; `moment2txt_similarity` = moment-encoder frame outputs ·
   [dummy-sentence words; text-sentence words]ᵀ (B, Lv, nd + Lt + 1).

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
    moment_rep_{token,pos}, sent_rep_{token,pos}  (d,)                   [embed]           (training only)
    query_embed.embedding                         (num_queries, 2)       [None, None]
    txtproj_encoder.layers.{i}.<STD>              i < dummy_layers  (txtproj_num_heads heads)
    scls_encoder.layers.{i}.<STD>                 i < sent_layers   (txtproj_num_heads heads; training only)
    transformer.mcls_encoder.layers.{i}.<STD>     i < moment_layers (training only)
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
    dummy_rep_token, dummy_rep_pos, global_rep_token, global_rep_pos, moment_rep_token, moment_rep_pos,
        sent_rep_token, sent_rep_pos                  → same names
    {P}.layers.{i}.self_attn.in_proj_weight (3d, d)   → rows [0:d], [d:2d], [2d:3d] transposed →
                                                        {P}.layers.{i}.self_attn.{q,k,v}_proj.kernel
    {P}.layers.{i}.self_attn.in_proj_bias (3d,)       → thirds → {P}.layers.{i}.self_attn.{q,k,v}_proj.bias
        for P ∈ {txtproj_encoder, scls_encoder, transformer.encoder, transformer.mcls_encoder}
    every other `cg_model.X.weight` / `X.bias` of a Linear → `X.kernel` (transposed) / `X.bias`, same path
        (…out_proj, linear1, linear2, sa_*_proj, ca_*_proj, decoder MLP `layers.N`, class_embed, span_embed,
        saliency_proj1/2); every `…normN.{weight,bias}` / `decoder.norm.{weight,bias}` → `.{scale,bias}`;
        `…activation.weight` (1,) → `…activation.weight` (as is).
    Dropped (unused by every path, no parameters here): txt_proj_linear.*, txt_position_embed.*;
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
        if cfg.hidden_dim % 2 or cfg.hidden_dim % cfg.num_heads or cfg.hidden_dim % cfg.txtproj_num_heads:
            raise ValueError(f"CGDETR: hidden_dim {cfg.hidden_dim} must be even and divisible by num_heads and "
                             "txtproj_num_heads")
        self.cfg, self.dtype = cfg, dtype
        d = cfg.hidden_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def proj(in_dim):
            return nnx.List([
                LinearLayer(in_dim, d, relu=True, dropout_rate=cfg.input_dropout, in_axis=None, out_axis="mlp",
                            **kw),
                LinearLayer(d, d, relu=False, dropout_rate=cfg.input_dropout, in_axis="mlp", out_axis="embed",
                            **kw)])

        def token(shape):
            return param(rngs, _randn, shape, (None, "embed")[-len(shape):], param_dtype)

        self.input_txt_proj = proj(cfg.txt_dim)
        self.input_vid_proj = proj(cfg.vid_dim)
        self.token_type_embeddings = Embed(2, d, axes=(None, "embed"), **kw)
        self.dummy_rep_token = token((cfg.num_dummies, d))
        self.dummy_rep_pos = token((cfg.num_dummies, d))
        self.global_rep_token = token((cfg.total_prompts, d))
        self.global_rep_pos = token((1, d))
        self.moment_rep_token, self.moment_rep_pos = token((d,)), token((d,))
        self.sent_rep_token, self.sent_rep_pos = token((d,)), token((d,))
        self.query_embed = Embed(cfg.num_queries, 2, axes=(None, None), **kw)
        self.query_embed.embedding = param(rngs, _randn, (cfg.num_queries, 2), (None, None), param_dtype)
        text_heads = cfg.txtproj_num_heads
        self.txtproj_encoder = Stack([EncoderLayer(cfg, num_heads=text_heads, **kw) for _ in range(cfg.dummy_layers)])
        self.scls_encoder = Stack([EncoderLayer(cfg, num_heads=text_heads, **kw) for _ in range(cfg.sent_layers)])
        self.transformer = Transformer(cfg, **kw)
        self.class_embed = Linear(d, 2, axes=("embed", None), kernel_init=_torch_linear, **kw)
        self.span_embed = MLP((d, d, d, 2), axes=[("embed", "mlp"), ("mlp", "embed"), ("embed", None)], **kw)
        self.saliency_proj1 = Linear(d, d, axes=("embed", "mlp"), kernel_init=_torch_linear, **kw)
        self.saliency_proj2 = Linear(d, d, axes=("embed", "mlp"), kernel_init=_torch_linear, **kw)

    def __call__(self, txt: jax.Array, txt_mask: jax.Array, vid: jax.Array, vid_mask: jax.Array,
                 prompt: jax.Array, rng: jax.Array | None = None, *, relevant_clips: jax.Array | None = None,
                 neg_partner: jax.Array | None = None) -> dict[str, Any]:
        """txt (B, Lt, txt_dim), txt_mask (B, Lt) (1 = valid, valid first), vid (B, Lv, vid_dim), vid_mask (B, Lv)
        (valid first, ≥ 1 valid clip), prompt (B, txt_dim) or (B, 1, txt_dim) (the `<temp>` hidden state);
        rng: dropout key or None (deterministic). Returns

        * pred_logits (B, Q, 2) (class 0 = foreground), pred_spans (B, Q, 2) normalised (center, width), both of
          the last decoder layer, float32;
        * aux_outputs: list of dec_layers − 1 dicts {pred_logits, pred_spans} for the earlier layers;
        * saliency_scores (B, Lv); t2v_attn_values (alias t2vattnvalues) (B, Lv) ∈ [0, 1];
        * cate_attn_weights (B, Lv, nd + Lt + 1) (T2V attention, head- and layer-averaged);
        * video_mask (B, Lv); txt_mask (B, Lt + 1) (after inserting the prompt); dummy_tokens (B, nd, d);
          global_rep_tokens (total_prompts, d);
        * with `neg_partner` (B,) int (step 9): saliency_scores_neg, t2vattnvalues_neg (B, Lv);
        * with `relevant_clips` (B, Lv) (step 6'): sentence_txt, sentence_dummy, memory_moment, nmmemory_moment
          (B, d); moment_frames, nonmoment_frames (B, Lv, d); moment2txt_similarity (B, Lv, nd + Lt + 1) float32;
          moment_mask (B, Lv) bool.
        """
        cfg, dt = self.cfg, self.dtype
        d, nd = cfg.hidden_dim, cfg.num_dummies
        r = split_rng(rng, 6)
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
        dummy_pos = jnp.broadcast_to(self.dummy_rep_pos[...].astype(dt), (b, nd, d))
        x_pos = jnp.concatenate([dummy_pos, jnp.zeros_like(t)], axis=1)
        x_valid = jnp.concatenate([jnp.ones((b, nd), bool), tvalid], axis=1)
        x = jnp.concatenate([jnp.broadcast_to(self.dummy_rep_token[...].astype(dt), (b, nd, d)), t], axis=1)
        dummy_tokens = _run_stack(self.txtproj_encoder, x, x_valid, x_pos, r[2])[:, :nd]
        keys = jnp.concatenate([dummy_tokens, t], axis=1)  # [dummies; unencoded projected text]
        # 6. detached mean of the valid video tokens
        vlen = jnp.maximum(jnp.sum(vmask, axis=1), 1.0)
        ctx = jax.lax.stop_gradient(jnp.sum(v * vmask[..., None].astype(dt), axis=1) / vlen[:, None].astype(dt))

        # 7a–7d. T2V encoder, saliency token, encoder over [global; video]; with `neg_partner` (step 9) the
        # negative pass runs in the same call on B more rows: row b's video against row neg_partner[b]'s keys
        if neg_partner is None:
            memory_local, memory_global, attn = self._encode(v, pos_v, vmask, ctx, keys, x_pos, x_valid, r[3])
        else:
            def both(a, partner=False):
                return jnp.concatenate([a, jnp.take(a, neg_partner.astype(jnp.int32), axis=0) if partner else a])
            ml, mg, at = self._encode(both(v), both(pos_v), both(vmask), both(ctx), both(keys, True), both(x_pos),
                                      both(x_valid, True), r[3])
            memory_local, memory_global, attn = ml[:b], mg[:b], at[:b]
        # 7e. decoder
        hs, refs = self.transformer.decoder(memory_local, vvalid, pos_v, self.query_embed.embedding[...], r[4])

        # 8. heads
        logits = self.class_embed(hs).astype(jnp.float32)  # (L, B, Q, 2)
        spans = jax.nn.sigmoid(self.span_embed(hs).astype(jnp.float32) + inverse_sigmoid(refs))
        t2v_values = _t2v_values(attn, tmask, nd)
        out = {
            "pred_logits": logits[-1],
            "pred_spans": spans[-1],
            "aux_outputs": [{"pred_logits": logits[i], "pred_spans": spans[i]} for i in range(len(hs) - 1)],
            "saliency_scores": self._saliency(memory_local, memory_global),
            "t2v_attn_values": t2v_values,
            "t2vattnvalues": t2v_values,
            "cate_attn_weights": attn,
            "video_mask": vid_mask,
            "txt_mask": tmask,
            "dummy_tokens": dummy_tokens,
            "global_rep_tokens": self.global_rep_token[...],
        }
        if neg_partner is not None:  # 9. the negative pass
            out["saliency_scores_neg"] = self._saliency(ml[b:], mg[b:])
            out["t2vattnvalues_neg"] = _t2v_values(at[b:], jnp.take(tmask, neg_partner.astype(jnp.int32), axis=0), nd)
        if relevant_clips is not None:  # 6'. moment / sentence tokens (training only)
            out.update(self._moment_sentence(t, tvalid, v, pos_v, vvalid, dummy_tokens, dummy_pos,
                                             relevant_clips, r[5]))
        return out

    def _encode(self, v, pos_v, vmask, ctx, keys, keys_pos, keys_valid, rng):
        """§6.3 steps 7a–7d for video tokens v against T2V keys → (memory_local (B, Lv, d), memory_global
        (B, d), head- and layer-averaged T2V attention (B, Lv, S) float32)."""
        cfg, dt, tr = self.cfg, self.dtype, self.transformer
        b, lv, d = v.shape
        r = split_rng(rng, 3)
        # 7a. T2V encoder
        h = v
        attn = jnp.zeros((b, lv, keys.shape[1]), jnp.float32)
        r_t2v = split_rng(r[0], len(tr.t2v_encoder.layers))
        for i, lyr in enumerate(tr.t2v_encoder.layers):
            h, a = lyr(h, pos_v, keys, keys_pos, keys_valid, r_t2v[i])
            attn = attn + a
        attn = attn / len(tr.t2v_encoder.layers)
        # 7b. saliency (global) token
        G = self.global_rep_token[...].astype(dt)
        sim = jax.nn.softmax((_l2_normalize(v - ctx[:, None]) @ _l2_normalize(G).T).astype(jnp.float32), axis=-1)
        imp = jax.lax.stop_gradient(jnp.sum(attn[..., cfg.num_dummies:], axis=-1) * vmask)  # (B, Lv)
        imp = imp / jnp.maximum(jnp.sum(imp, axis=1, keepdims=True), jnp.finfo(jnp.float32).tiny) * lv
        score = jnp.mean(sim * imp[..., None], axis=1)  # (B, total_prompts)
        top_val, top_idx = jax.lax.top_k(score, cfg.num_prompts)
        g = (jnp.einsum("bk,bkd->bd", top_val.astype(dt), G[top_idx]) + ctx)[:, None]
        r_g = split_rng(r[1], len(tr.t2v_encoder.layers))
        for i, lyr in enumerate(tr.t2v_encoder.layers):
            g = lyr.empty_keys(g, r_g[i])
        # 7c/d. encoder over [global; video]
        src = jnp.concatenate([g, h], axis=1)
        src_pos = jnp.concatenate([jnp.broadcast_to(self.global_rep_pos[...].astype(dt), (b, 1, d)), pos_v], axis=1)
        src_valid = jnp.concatenate([jnp.ones((b, 1), bool), vmask.astype(bool)], axis=1)
        src = _run_stack(tr.encoder, src, src_valid, src_pos, r[2])
        return src[:, 1:] + src[:, :1], src[:, 0], attn

    def _saliency(self, memory_local, memory_global):
        """saliency = ⟨proj1(memory_local), proj2(memory_global)⟩ / √d → (B, Lv) float32."""
        prod = self.saliency_proj1(memory_local) * self.saliency_proj2(memory_global)[:, None]
        return jnp.sum(prod.astype(jnp.float32), axis=-1) / math.sqrt(self.cfg.hidden_dim)

    def _moment_sentence(self, t, tvalid, v, pos_v, vvalid, dummy_tokens, dummy_pos, relevant_clips, rng):
        """Step 6': sentence, dummy-sentence, moment and non-moment tokens and the moment→text similarity."""
        dt = self.dtype
        b, lv, d = v.shape
        nd, lt = dummy_tokens.shape[1], t.shape[1]
        r = split_rng(rng, 2)
        one = jnp.ones((b, 1), bool)

        def lead(tok):
            return jnp.broadcast_to(tok[...].astype(dt), (b, 1, d))

        def pad(x, n):  # (B, L, ...) → (B, n, ...) with zeros / False
            return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

        # one scls_encoder call on 2B rows: [sent; text] and [sent; dummies], padded to a common length
        n = max(lt, nd)
        sent = _run_stack(
            self.scls_encoder,
            jnp.concatenate([pad(jnp.concatenate([lead(self.sent_rep_token), x], axis=1), n + 1)
                             for x in (t, dummy_tokens)]),
            jnp.concatenate([pad(jnp.concatenate([one, m], axis=1), n + 1) for m in (tvalid, jnp.ones((b, nd), bool))]),
            jnp.concatenate([pad(jnp.concatenate([lead(self.sent_rep_pos), p], axis=1), n + 1)
                             for p in (jnp.zeros_like(t), dummy_pos)]), r[0])
        sent, sent_d = sent[:b, :lt + 1], sent[b:, :nd + 1]
        # one mcls_encoder call on 2B rows: keys restricted to the moment resp. the non-moment clips
        moment = relevant_clips > 0
        m_src = jnp.concatenate([lead(self.moment_rep_token), v], axis=1)
        m_pos = jnp.concatenate([lead(self.moment_rep_pos), pos_v], axis=1)
        m_valid = jnp.concatenate([jnp.concatenate([one, vvalid & moment], axis=1),
                                   jnp.concatenate([one, vvalid & ~moment], axis=1)])
        mom = _run_stack(self.transformer.mcls_encoder, jnp.concatenate([m_src, m_src]), m_valid,
                         jnp.concatenate([m_pos, m_pos]), r[1])
        mom, non = mom[:b], mom[b:]
        words = jnp.concatenate([sent_d[:, 1:], sent[:, 1:]], axis=1)  # (B, nd + Lt + 1, d)
        f32 = jnp.float32
        return {"sentence_txt": sent[:, 0], "sentence_dummy": sent_d[:, 0], "memory_moment": mom[:, 0],
                "nmmemory_moment": non[:, 0], "moment_frames": mom[:, 1:], "nonmoment_frames": non[:, 1:],
                "moment2txt_similarity": jnp.einsum("bld,bkd->blk", mom[:, 1:].astype(f32), words.astype(f32)),
                "moment_mask": moment}


def _run_stack(stack: Stack, x, valid, pos, rng):
    r = split_rng(rng, len(stack.layers))
    for i, lyr in enumerate(stack.layers):
        x = lyr(x, valid, pos, r[i])
    return x


def _t2v_values(attn, tmask, num_dummies):
    """clamp(Σ_{j ≥ nd} A[:, l, j] · textmask_j, 0, 1) → (B, Lv) float32."""
    return jnp.clip(jnp.sum(attn[..., num_dummies:] * tmask.astype(jnp.float32)[:, None, :], axis=-1), 0.0, 1.0)


__all__ = ["CGDETR", "insert_prompt", "FOREGROUND", "BACKGROUND"]

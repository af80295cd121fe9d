"""Losses of the CG-DETR temporal head (MODEL-SPEC §6.5–§6.7); `CGDETR` (model.py) makes the outputs they read.

Losses (`temporal_loss_terms`) are per sample, returned with shape (B,): Hungarian-matched span L1 / GIoU /
label CE on the last decoder layer and (if `cfg.aux_loss`) on every earlier layer with its own matching, and the
saliency loss of the reference's B = 1 path (§6.7) applied to each sample separately. The reference's B > 1
negative-pair pass (rolled text, `saliency_scores_neg`), and the `ms_align`, `distill` and `orthogonal_dummy`
losses (which need the training-only moment / sentence encoders) are NOT implemented.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tpo_jax.config import TemporalHeadConfig
from tpo_jax.heads import box_ops, hungarian
from tpo_jax.heads.temporal.model import BACKGROUND, FOREGROUND

RANK_TAU = 0.5  # temperature of the rank-contrastive saliency term
RANK_LEVELS = 11  # ranks r = 1..11 (saliency labels >= r are positives)
_NEG_FILL = -1e3  # score given to padded clips in the rank-contrastive term


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


__all__ = ["temporal_loss_terms", "set_losses", "saliency_loss", "rank_contrastive", "margin_loss",
           "binary_cross_entropy"]

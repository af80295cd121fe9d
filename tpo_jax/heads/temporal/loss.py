"""The CG-DETR criterion (MODEL-SPEC §6.5–§6.7, quirks §10.16–§10.17); `CGDETR` (model.py) makes the outputs it
reads, `batch.py` decides which rows form a criterion batch, who pairs with whom, and the counts.

Each term is returned per row as a *sum over that row's units*, (B,), and normalised by the number of those
units in the whole batch (`TERM_COUNTS` names the count of each term; `tpo_jax.losses.total_loss` divides the
masked sum by it), which reproduces the reference's batch means and keeps gradient accumulation exact:

| term | per row b | count | reference reduction |
|---|---|---|---|
| loss_span, loss_giou (+ `_i` per aux layer) | Σ over matched pairs of mean_c \\|ŝ − s\\| / of 1 − GIoU | matched targets | mean over the batch's matched pairs |
| loss_label (+ `_i`) | mean over the Q queries of the class-weighted CE | rows | plain mean over B·Q |
| saliency_margin, saliency_attn_margin | MG of S / of A | rows | Σ / (B·#pairs) · 2 |
| saliency_attn_bce | mean over Lv of BCE(A, clamp(y, 0, 1)) | rows | mean over B·Lv |
| saliency_rank | RC(S, y, M), rows without a negative | rows without one | mean over those rows |
| saliency_rank_neg, saliency_attn_rank_neg | RC over [S, S_neg] / [A, A_neg] with labels [y, 0], mask [M, M] | rows with a negative | mean over those rows |
| saliency_neg_pair | Σ_l −log(1 − σ(S_neg))·M | rows with a negative | mean over those rows |
| saliency_attn_neg_pair | Σ_l −log(1 − A_neg)·M (no sigmoid, no clamp) | rows with a negative | mean over those rows |
| saliency_attn_rank | RC(A, y, M), rows of a group without negatives | those rows | mean over the rows (†) |
| loss_ms_align | CE_sentence + CE_dummy + Σ_l BCE(σ(m̃·f_l), clamp(y_l, 0, 1))·M_l / Lv | rows | CE means over B rows; BCE mean over B·Lv |
| loss_distill | Σ_l moment_l · mean_k KL(softmax(sim)_lk ‖ A_lk) | moment clips | Σ / Σ moment_mask |
| loss_orthogonal_dummy | mean over nd² of \\|cos(dummy_i, sg(dummy_j))\\| (diagonal 0) + the same over the global tokens | rows | mean over B·nd² (+ one global-token term) |

(†) kept only when the criterion batch has no negative pair: with one, the reference adds the other rows'
attention RC to an accumulator it has already used (MODEL-SPEC §6.7, §10.17), so it is dropped here too.

RC is the rank-contrastive term (ranks r = 1..11, /12): the levels assume saliency labels on the QVHighlights
scale 0–12 (the sum of three annotators' 0–4 scores), which is what the data pipeline provides
(`tpo_jax.data.conversation.SALIENCY_MAX`). `temporal_totals` combines the normalised terms with the released
weights (§6.6: span 10, giou 1, label 4, saliency 4, ms_align 1, distill 1, orthogonal_dummy 1 = lw_distill,
lw_wattn 1 inside the saliency loss) and TPO's factor 0.05; `temporal_criterion` is the whole criterion of one
batch (counts from that batch). Matching runs in-graph (`hungarian.match_targets`, cost under stop_gradient).

Numerics differ from the reference only where it would produce inf/NaN: a count of 0 (no moment clip, no matched
target) gives a 0 term, not a division by zero; BCE terms clamp each log at −100 as `nn.BCELoss` does, computed
from the logits (log σ) where the reference takes log of a float32 sigmoid.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from tpo_jax.config import TemporalHeadConfig
from tpo_jax.heads import box_ops, hungarian
from tpo_jax.heads.temporal.batch import negative_pairs, same_group, temporal_counts
from tpo_jax.heads.temporal.model import BACKGROUND, FOREGROUND

RANK_TAU = 0.5  # temperature of the rank-contrastive saliency term
RANK_LEVELS = 11  # ranks r = 1..11 (saliency labels >= r are positives); labels on the 0-12 scale
_NEG_FILL = -1e3  # score given to padded clips in the rank-contrastive term
_LOG_CLAMP = -100.0  # nn.BCELoss clamps log(p) and log(1 - p) here

# the count (tpo_jax.losses.loss_counts key) each term is divided by; others divide by "temporal" (rows)
TERM_COUNTS = {"loss_span": "temporal_spans", "loss_giou": "temporal_spans", "saliency_rank": "temporal_plain",
               "saliency_rank_neg": "temporal_neg", "saliency_neg_pair": "temporal_neg",
               "saliency_attn_rank_neg": "temporal_neg", "saliency_attn_neg_pair": "temporal_neg",
               "saliency_attn_rank": "temporal_plain_attn", "loss_distill": "temporal_moment_clips"}
SALIENCY_TERMS = ("saliency_margin", "saliency_rank", "saliency_rank_neg", "saliency_neg_pair")
SALIENCY_ATTN_TERMS = ("saliency_attn_margin", "saliency_attn_bce", "saliency_attn_rank", "saliency_attn_rank_neg",
                       "saliency_attn_neg_pair")


def term_count(term: str) -> str:
    """The count a term is normalised by (aux-layer terms `loss_span_0` as their last-layer term)."""
    return TERM_COUNTS.get(re.sub(r"_\d+$", "", term), "temporal")


# ------------------------------------------------------------------------------------------ matched set losses

def _match_one(logits, spans, tgt, valid, cfg: TemporalHeadConfig):
    """One row: logits (Q, 2), spans (Q, 2) cw, tgt (G, 2) cw, valid (G,) → summed span / giou, mean label."""
    nq = logits.shape[0]
    prob_fg = jax.nn.softmax(logits, axis=-1)[:, FOREGROUND]
    cost = (cfg.cost_span * box_ops.pairwise_l1(spans, tgt)
            - cfg.cost_giou * box_ops.pairwise_span_giou(box_ops.span_cw_to_xx(spans), box_ops.span_cw_to_xx(tgt))
            - cfg.cost_class * prob_fg[:, None])
    qidx = hungarian.match_targets(jax.lax.stop_gradient(cost), valid)
    matched = spans[qidx]  # (G, 2)
    vf = valid.astype(jnp.float32)
    loss_span = jnp.sum(jnp.mean(jnp.abs(matched - tgt), axis=-1) * vf)
    giou = box_ops.span_giou(box_ops.span_cw_to_xx(matched), box_ops.span_cw_to_xx(tgt))
    loss_giou = jnp.sum((1.0 - giou) * vf)
    fg = hungarian.matched_query_mask(qidx, valid, nq)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.where(fg, logp[:, FOREGROUND], logp[:, BACKGROUND] * cfg.eos_coef)
    return loss_span, loss_giou, jnp.mean(ce), qidx


def set_losses(pred_logits: jax.Array, pred_spans: jax.Array, spans: jax.Array, span_valid: jax.Array,
               cfg: TemporalHeadConfig) -> dict[str, jax.Array]:
    """Hungarian-matched losses of one decoder layer, per row: loss_span = Σ over the row's matched pairs of the
    mean |ŝ − s| over (center, width), loss_giou = Σ of 1 − GIoU, loss_label = the mean class-weighted CE over
    the queries (B,), and the matching `query_index` (B, Ns) (entries for invalid targets are arbitrary)."""
    valid = span_valid.astype(bool)
    # padded targets get a harmless stand-in span (their values never reach a loss)
    tgt = jnp.where(valid[..., None], spans.astype(jnp.float32), jnp.asarray([0.5, 1.0], jnp.float32))
    fn = jax.vmap(lambda lg, sp, tg, va: _match_one(lg, sp, tg, va, cfg))
    l_span, l_giou, l_label, qidx = fn(pred_logits.astype(jnp.float32), pred_spans.astype(jnp.float32), tgt, valid)
    return {"loss_span": l_span, "loss_giou": l_giou, "loss_label": l_label, "query_index": qidx}


# ------------------------------------------------------------------------------------------ saliency

def rank_contrastive(scores: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Rank-contrastive term RC of one row (§6.7): scores, labels, mask (L,) → ().

    s = mask·scores + (1 − mask)·(−1000); for r = 1..11 with any label ≥ r: logits = s/τ (τ = 0.5; entries
    with labels > 100 are "dropped" to −1000), minus the max, logp = logits − log(Σ exp + 1e-6),
    term_r = −Σ(pos·logp·mask) / (Σ pos + 1e-6); RC = Σ_r term_r / 12. (The reference skips a level without
    positives in the whole batch and multiplies rows without positives by 0: the same per row.)
    """
    scores = scores.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    s = mask * scores + (1.0 - mask) * _NEG_FILL
    cur = jnp.where(labels <= 100.0, s / RANK_TAU, _NEG_FILL)
    logits = cur - jnp.max(cur)
    logp = logits - jnp.log(jnp.sum(jnp.exp(logits)) + 1e-6)
    total = jnp.zeros((), jnp.float32)
    for r in range(1, RANK_LEVELS + 1):
        pos = (labels >= r).astype(jnp.float32)
        mean_pos = jnp.sum(pos * logp * mask) / (jnp.sum(pos) + 1e-6)
        total = total + jnp.where(jnp.sum(pos) > 0, -mean_pos, 0.0)
    return total / (RANK_LEVELS + 1)


def margin_loss(scores: jax.Array, pos_idx: jax.Array, neg_idx: jax.Array, margin: float) -> jax.Array:
    """MG of one row: Σ_p max(m + s[neg_p] − s[pos_p], 0) / #pairs · 2; scores (Lv,), pos/neg (P,) → ()."""
    scores = scores.astype(jnp.float32)
    terms = jnp.maximum(margin + scores[neg_idx] - scores[pos_idx], 0.0)
    return jnp.sum(terms) / pos_idx.shape[0] * 2.0


def binary_cross_entropy(p: jax.Array, y: jax.Array) -> jax.Array:
    """nn.BCELoss (mean), with the log terms clamped at −100 as PyTorch does."""
    p = p.astype(jnp.float32)
    y = y.astype(jnp.float32)
    log_p = jnp.maximum(jnp.log(p), _LOG_CLAMP)
    log_1mp = jnp.maximum(jnp.log1p(-p), _LOG_CLAMP)
    return jnp.mean(-(y * log_p + (1.0 - y) * log_1mp))


def saliency_terms(outputs: Mapping[str, Any], targets: Mapping[str, jax.Array], pairs: Mapping[str, jax.Array],
                   cfg: TemporalHeadConfig) -> dict[str, jax.Array]:
    """The parts of `loss_saliency` per row (see the module table), (B,) each; `pairs` from `negative_pairs`."""
    S, A = outputs["saliency_scores"].astype(jnp.float32), outputs["t2v_attn_values"].astype(jnp.float32)
    y = targets["saliency_labels"].astype(jnp.float32)
    M = targets.get("vid_mask", outputs["video_mask"]).astype(jnp.float32)
    pos, negi = targets["saliency_pos"].astype(jnp.int32), targets["saliency_neg"].astype(jnp.int32)
    neg, plain_attn = pairs["neg"], pairs["plain_attn"]
    margin = jax.vmap(lambda s, p, n: margin_loss(s, p, n, cfg.saliency_margin))
    rc = jax.vmap(rank_contrastive)
    zero = jnp.zeros_like(S[:, 0])
    out = {"saliency_margin": margin(S, pos, negi), "saliency_rank": jnp.where(neg, 0.0, rc(S, y, M)),
           "saliency_attn_margin": margin(A, pos, negi),
           "saliency_attn_bce": jax.vmap(binary_cross_entropy)(A, jnp.clip(y, 0.0, 1.0)),
           "saliency_attn_rank": jnp.where(plain_attn, rc(A, y, M), 0.0)}
    if "saliency_scores_neg" not in outputs:
        return dict(out, saliency_rank_neg=zero, saliency_neg_pair=zero, saliency_attn_rank_neg=zero,
                    saliency_attn_neg_pair=zero)
    Sn = outputs["saliency_scores_neg"].astype(jnp.float32)
    An = jnp.where(neg[:, None], outputs["t2vattnvalues_neg"].astype(jnp.float32), 0.0)  # no inf off the rows
    y2, M2 = jnp.concatenate([y, jnp.zeros_like(y)], axis=1), jnp.concatenate([M, M], axis=1)
    out["saliency_rank_neg"] = jnp.where(neg, rc(jnp.concatenate([S, Sn], axis=1), y2, M2), 0.0)
    out["saliency_neg_pair"] = jnp.where(neg, jnp.sum(jax.nn.softplus(Sn) * M, axis=1), 0.0)  # −log(1 − σ(x))
    out["saliency_attn_rank_neg"] = jnp.where(neg, rc(jnp.concatenate([A, An], axis=1), y2, M2), 0.0)
    out["saliency_attn_neg_pair"] = jnp.where(neg, jnp.sum(-jnp.log1p(-An) * M, axis=1), 0.0)
    return out


# ------------------------------------------------------------------------------------------ CG-DETR extras

def _normalize(x):
    """F.normalize: x / max(‖x‖₂, 1e-12), float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _bce_logits(x, y):
    """Elementwise nn.BCELoss(σ(x), y) with both logs clamped at −100."""
    return -(y * jnp.maximum(jax.nn.log_sigmoid(x), _LOG_CLAMP)
             + (1.0 - y) * jnp.maximum(jax.nn.log_sigmoid(-x), _LOG_CLAMP))


def ms_align_loss(outputs: Mapping[str, Any], rows: jax.Array, labels: jax.Array, vid_mask: jax.Array,
                  group: int) -> jax.Array:
    """`loss_ms_align` per row (B,): the moment–sentence CE over the criterion rows of the row's group, the
    moment–dummy-sentence CE (target: the first column other than the row's own moment column, in the order
    [moment·d_j; non-moment·d_j]) and Σ_l BCE(σ(m̃·f_l), clamp(y_l, 0, 1))·M_l / Lv, f = moment-encoder frame
    outputs on moment clips (y > 0), non-moment-encoder outputs elsewhere, m̃ the unnormalised moment token."""
    m, n = _normalize(outputs["memory_moment"]), _normalize(outputs["nmmemory_moment"])
    s, d = _normalize(outputs["sentence_txt"]), _normalize(outputs["sentence_dummy"])
    b = m.shape[0]
    eye = jnp.eye(b, dtype=bool)
    cols = (same_group(b, group) & rows.astype(bool)[None, :]) | eye  # own column kept: finite on every row
    cols2 = jnp.concatenate([cols, cols], axis=1)
    fill = jnp.finfo(jnp.float32).min

    def ce(logits, target):
        logits = jnp.where(cols2, logits, fill)
        return jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]

    own = jnp.arange(b)
    ce_sent = ce(jnp.concatenate([m @ s.T, n @ s.T], axis=1), own)
    other = cols & ~eye
    target = jnp.where(jnp.any(other, axis=1), jnp.argmax(other, axis=1), b + own)
    ce_dummy = ce(jnp.concatenate([m @ d.T, n @ d.T], axis=1), target)
    moment = outputs["moment_mask"].astype(bool)
    frames = jnp.where(moment[..., None], outputs["moment_frames"], outputs["nonmoment_frames"]).astype(jnp.float32)
    x = jnp.einsum("bd,bld->bl", outputs["memory_moment"].astype(jnp.float32), frames)
    bce = _bce_logits(x, jnp.clip(labels.astype(jnp.float32), 0.0, 1.0)) * vid_mask.astype(jnp.float32)
    return ce_sent + ce_dummy + jnp.mean(bce, axis=1)


def distill_loss(outputs: Mapping[str, Any]) -> jax.Array:
    """`loss_distill` per row (B,): Σ over moment clips of mean_k KL(p ‖ A) with p = softmax(moment2txt sim)
    (detached) and KLDivLoss(log(A + 1e-6), p) = p·(log p − log(A + 1e-6)) (0 where p = 0)."""
    p = jax.nn.softmax(jax.lax.stop_gradient(outputs["moment2txt_similarity"].astype(jnp.float32)), axis=-1)
    log_a = jnp.log(outputs["cate_attn_weights"].astype(jnp.float32) + 1e-6)
    kl = jnp.mean(jax.scipy.special.xlogy(p, p) - p * log_a, axis=-1)  # (B, Lv)
    return jnp.sum(kl * outputs["moment_mask"].astype(jnp.float32), axis=1)


def _offdiag_abs_cos(x):
    """mean over (n, n) of |cos(x_i, sg(x_j))| with the diagonal set to 0; x (..., n, d) → (...)."""
    x = x.astype(jnp.float32)
    xn = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    sim = jnp.einsum("...id,...jd->...ij", xn, jax.lax.stop_gradient(xn))
    sim = jnp.where(jnp.eye(x.shape[-2], dtype=bool), 0.0, sim)
    return jnp.mean(jnp.abs(sim), axis=(-2, -1))


def orthogonal_dummy_loss(outputs: Mapping[str, Any]) -> jax.Array:
    """`loss_orthogonal_dummy` per row (B,): the row's dummy-token term plus the global-token term (the same for
    every row, so normalising by the row count adds it once)."""
    return _offdiag_abs_cos(outputs["dummy_tokens"]) + _offdiag_abs_cos(outputs["global_rep_tokens"])


# ------------------------------------------------------------------------------------------ the criterion

def temporal_loss_terms(outputs: Mapping[str, Any], targets: Mapping[str, jax.Array],
                        cfg: TemporalHeadConfig) -> dict[str, jax.Array]:
    """Every CG-DETR loss term per row, (B,), each a sum over the row's units (module table; `term_count` names
    its normaliser). targets: spans (B, Ns, 2) (center, width); span_valid (B, Ns); saliency_labels (B, Lv)
    (0–12); saliency_pos / saliency_neg (B, P); vid_mask (B, Lv) (default outputs["video_mask"]); rows (B,) bool,
    the criterion rows (default all); vid (B,) int video ids (optional: pairs rows, needs the model's
    negative pass). Saliency terms need saliency_pos; ms_align / distill need the moment / sentence outputs."""
    b = outputs["pred_logits"].shape[0]
    rows = targets.get("rows", jnp.ones((b,), bool)).astype(bool)
    if "vid" in targets and "saliency_scores_neg" not in outputs:
        raise ValueError("temporal_loss_terms: targets pair rows by `vid`, but the outputs hold no negative pass "
                         "(call CGDETR with neg_partner=negative_pairs(...)['partner'])")
    pairs = negative_pairs(rows, targets.get("vid"), cfg.criterion_group)
    spans, valid = targets["spans"], targets["span_valid"]
    out: dict[str, jax.Array] = {}
    layers = [("", outputs)] + ([(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
                                if cfg.aux_loss else [])
    for suffix, layer in layers:
        terms = set_losses(layer["pred_logits"], layer["pred_spans"], spans, valid, cfg)
        out.update({f"{k}{suffix}": terms[k] for k in ("loss_span", "loss_giou", "loss_label")})
    if "saliency_pos" in targets:
        out.update(saliency_terms(outputs, targets, pairs, cfg))
    vid_mask = targets.get("vid_mask", outputs["video_mask"])
    if "memory_moment" in outputs:
        out["loss_ms_align"] = ms_align_loss(outputs, rows, targets["saliency_labels"], vid_mask,
                                             cfg.criterion_group)
        out["loss_distill"] = distill_loss(outputs)
    out["loss_orthogonal_dummy"] = orthogonal_dummy_loss(outputs)
    return out


def temporal_totals(terms: Mapping[str, jax.Array], cfg: TemporalHeadConfig) -> dict[str, jax.Array]:
    """From the normalised terms: loss_saliency = Σ saliency parts + lw_wattn · Σ attention parts, and
    loss_temporal = loss_scale · (Σ_layers 10·span + 1·giou + 4·label + 4·saliency + 1·ms_align + 1·distill
    + 1·orthogonal_dummy) with the config's weights."""
    sal = (sum((terms[k] for k in SALIENCY_TERMS if k in terms), jnp.zeros((), jnp.float32))
           + cfg.w_wattn * sum((terms[k] for k in SALIENCY_ATTN_TERMS if k in terms), jnp.zeros((), jnp.float32)))
    weights = {"loss_span": cfg.w_span, "loss_giou": cfg.w_giou, "loss_label": cfg.w_label,
               "loss_ms_align": cfg.w_ms_align, "loss_distill": cfg.w_distill,
               "loss_orthogonal_dummy": cfg.w_orthogonal_dummy}
    total = cfg.w_saliency * sal
    for k, v in terms.items():
        total = total + weights.get(re.sub(r"_\d+$", "", k), 0.0) * v
    return {"loss_saliency": sal, "loss_temporal": cfg.loss_scale * total}


def normalise_terms(terms: Mapping[str, jax.Array], rows: jax.Array,
                    counts: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Σ over the criterion rows of each per-row term / its count (≥ 1), float32 scalars."""
    rows = rows.astype(bool)
    return {k: jnp.sum(jnp.where(rows, v.astype(jnp.float32), 0.0)) / jnp.maximum(counts[term_count(k)], 1.0)
            for k, v in terms.items()}


def temporal_criterion(outputs: Mapping[str, Any], targets: Mapping[str, jax.Array],
                       cfg: TemporalHeadConfig) -> dict[str, jax.Array]:
    """The whole criterion of one batch, as the reference computes it: every term normalised by this batch's
    counts, plus loss_saliency and loss_temporal (float32 scalars)."""
    b = outputs["pred_logits"].shape[0]
    rows = targets.get("rows", jnp.ones((b,), bool)).astype(bool)
    counts = dict(temporal_counts(rows, targets, cfg), temporal=jnp.sum(rows).astype(jnp.float32))
    out = normalise_terms(temporal_loss_terms(outputs, targets, cfg), rows, counts)
    return dict(out, **temporal_totals(out, cfg))


__all__ = ["temporal_loss_terms", "temporal_totals", "temporal_criterion", "normalise_terms", "term_count",
           "TERM_COUNTS", "set_losses", "saliency_terms", "ms_align_loss", "distill_loss", "orthogonal_dummy_loss",
           "rank_contrastive", "margin_loss", "binary_cross_entropy"]

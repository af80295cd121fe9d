"""Loss assembly: LM cross-entropy on assistant tokens plus the task-head losses.

Every term is a masked *sum* over this (micro-)batch divided by a *count* that depends on the batch
alone (label tokens, valid task slots), never on the parameters. That makes gradient accumulation
exact: the train step computes the counts of the whole batch once, and each micro-batch
contributes `sum_micro / count_total`. A task with no example in the batch has count 0 and
contributes exactly 0 (sums use `where`, so a NaN in a masked-out slot cannot leak).
A head's terms divide by the head's count (valid examples) unless the head names another: the temporal
terms divide by the batch's matched targets, rows with a negative pair, moment clips, ...
(`tpo_jax.heads.temporal.loss.term_count`, counts from `tpo_jax.heads.temporal.batch.temporal_counts`).

Batch keys (static shapes; B = batch, L = tokens):
  input_ids (B, L) int32, attention_mask (B, L), labels (B, L) int32 (-100 = ignored; label t is the
  token at position t, the shift happens here), visual_mask (B, L) bool, frames (B, T, H, W, 3),
  track_boxes (B, Kt, 4) optional inputs for `<track_box>`;
  region:   region_boxes (B, Kr, 4) normalised xyxy targets of the k-th `<boxes>`, region_valid (B, Kr)
  mask:     mask_boxes (B, 4) ground-truth box of the `<tracking>` example, mask_valid (B,)
  temporal: temporal_valid (B,), spans (B, Ns, 2) (center, width), span_valid (B, Ns),
            saliency_labels (B, Lv) (0–12), saliency_pos (B, 2), saliency_neg (B, 2), vid_mask (B, Lv),
            vid (B,) int32 video ids (optional: negative query pairs, tpo_jax.heads.temporal.batch), and
            either video_feats (B, Lv, vid_dim) + text_feats (B, Lq, txt_dim) + text_mask (B, Lq)
            (feature_source "batch") or temporal_text_ids (B, Lq) + text_mask (B, Lq) ("model").
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from tpo_jax import config as C
from tpo_jax.heads.mask import mask_loss_terms
from tpo_jax.heads.region import region_loss_terms
from tpo_jax.heads.temporal.batch import temporal_counts, temporal_rows
from tpo_jax.heads.temporal.loss import temporal_loss_terms, temporal_totals, term_count
from tpo_jax.model import HEADS, HeadOutputs, TPOModel

IGNORE = -100


def shifted_labels(labels: jax.Array) -> jax.Array:
    """Targets aligned with the logits: position t predicts label t+1; the last position predicts nothing."""
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)


def _token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of each position (0 where the target is IGNORE), f32, the shape of `targets`."""
    valid = targets != IGNORE
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, logz - picked, 0.0)


def _cross_entropy_sum(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.sum(_token_cross_entropy(logits, targets))


def lm_loss_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Summed next-token cross-entropy over the positions whose shifted label is not IGNORE."""
    return _cross_entropy_sum(logits, shifted_labels(labels))


def label_rows(labels: jax.Array, num_rows: int):
    """The first `num_rows` positions of each sample whose shifted label counts, as (positions (B, n),
    targets (B, n) with IGNORE in the padding rows, dropped (B,) = label tokens beyond `num_rows`)."""
    targets = shifted_labels(labels)
    valid = targets != IGNORE
    n = min(num_rows, labels.shape[1])
    order = jnp.argsort(~valid, axis=1, stable=True)[:, :n]  # valid positions first, in sequence order
    picked = jnp.take_along_axis(targets, order, axis=1)
    dropped = jnp.maximum(jnp.sum(valid, axis=1) - n, 0)
    return order, picked, dropped


def lm_loss_sum_at_labels(llm, hidden: jax.Array, labels: jax.Array, num_rows: int,
                          rng: jax.Array | None = None):
    """`lm_loss_sum` with the lm_head applied only to the label rows (at most `num_rows` per sample):
    (sum, dropped label tokens). Equal to `lm_loss_sum` whenever nothing is dropped, at a fraction of the
    (B, L, vocab) logits' FLOPs and memory when answers are short next to the sequence."""
    nll, dropped = _label_row_nll(llm, hidden, labels, num_rows, rng)
    return jnp.sum(nll), jnp.sum(dropped)


def label_log_likelihood(llm, hidden: jax.Array, labels: jax.Array, num_rows: int):
    """(B,) log-probability of each sample's label tokens, from the final hidden states with the lm_head
    applied only to the (at most `num_rows`) label rows; and (B,) the label tokens left out beyond them."""
    nll, dropped = _label_row_nll(llm, hidden, labels, num_rows)
    return -jnp.sum(nll, axis=-1), dropped


def _label_row_nll(llm, hidden, labels, num_rows, rng=None):
    rows, targets, dropped = label_rows(labels, num_rows)
    h = jnp.take_along_axis(hidden, rows[..., None], axis=1)
    return _token_cross_entropy(llm.logits(h, rng), targets), dropped


def _has_token(input_ids: jax.Array, token_id: int) -> jax.Array:
    return jnp.any(input_ids == token_id, axis=1)


def _slot_present(input_ids: jax.Array, token_id: int, num_slots: int) -> jax.Array:
    count = jnp.sum(input_ids == token_id, axis=1)
    return jnp.arange(num_slots)[None, :] < count[:, None]


def valid_masks(batch: Mapping[str, jax.Array], cfg: C.TPOConfig, heads=HEADS) -> dict[str, jax.Array]:
    """Which label tokens / task slots count, from the batch alone: {"lm": (B, L), head: (B, ...)}."""
    ids = batch["input_ids"]
    masks = {"lm": shifted_labels(batch["labels"]) != IGNORE}
    if "region" in heads:
        k = batch["region_boxes"].shape[1]
        masks["region"] = batch["region_valid"].astype(bool) & _slot_present(ids, cfg.task_tokens.boxes, k)
    if "mask" in heads:
        masks["mask"] = batch["mask_valid"].astype(bool) & _has_token(ids, cfg.task_tokens.tracking)
    if "temporal" in heads:
        masks["temporal"] = temporal_rows(ids, batch["temporal_valid"], batch["span_valid"], cfg.task_tokens.temp)
    return masks


def loss_counts(batch: Mapping[str, jax.Array], cfg: C.TPOConfig, heads=HEADS) -> dict[str, jax.Array]:
    """Normalisers of each loss: the number of label tokens and of valid examples per head, and the temporal
    criterion's own counts (`temporal_spans`, `temporal_neg`, ...: `temporal_counts`)."""
    masks = valid_masks(batch, cfg, heads)
    counts = {name: jnp.sum(m).astype(jnp.float32) for name, m in masks.items()}
    if "temporal" in heads:
        counts.update(temporal_counts(masks["temporal"], batch, cfg.heads.temporal))
    return counts


def head_loss_terms(heads: HeadOutputs, batch: Mapping[str, jax.Array], cfg: C.TPOConfig) -> dict:
    """Per-slot / per-sample loss terms of each head in `heads` (the model's `TPOOutput.heads`):
    {head: {term: array}}; `loss_<head>` is the head's total (the temporal head's comes from its normalised
    terms, `temporal_totals`)."""
    terms = {}
    if heads.region is not None:
        terms["region"] = region_loss_terms(heads.region.boxes, batch["region_boxes"], cfg.heads.region)
    if heads.mask is not None:
        m = heads.mask
        terms["mask"] = mask_loss_terms(m.prompt, jax.lax.stop_gradient(m.target), m.box, batch["mask_boxes"],
                                        cfg.heads.mask)
    if heads.temporal is not None:
        targets = {key: batch[key] for key in ("spans", "span_valid", "saliency_labels", "saliency_pos",
                                               "saliency_neg", "vid_mask", "vid") if key in batch}
        targets["rows"] = temporal_rows(batch["input_ids"], batch["temporal_valid"], batch["span_valid"],
                                        cfg.task_tokens.temp)
        terms["temporal"] = temporal_loss_terms(heads.temporal.outputs, targets, cfg.heads.temporal)
    return terms


def _masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x.astype(jnp.float32), 0.0))


def total_loss(model: TPOModel, batch: Mapping[str, jax.Array], counts: Mapping[str, jax.Array],
               weights: Mapping[str, float], heads=HEADS, rng: jax.Array | None = None, lm_rows: int = 0):
    """(loss, metrics) for one (micro-)batch, each term normalised by the whole batch's `counts`.

    loss = sum_lm / n_lm · w_lm + Σ_head w_head · sum_head / n_head. `metrics` holds the same
    normalised value of every term (`loss/lm`, `loss/region`, `region/l1`, ...), so summing the
    metrics of the micro-batches gives the metrics of the whole batch.

    `lm_rows` > 0 computes logits only at the first `lm_rows` label positions of each sample
    (`lm_loss_sum_at_labels`); label tokens beyond that are left out of the LM loss and counted in
    `count/lm_dropped`. 0 computes logits at every position.
    """
    r_model, r_heads = (None, None) if rng is None else tuple(jax.random.split(rng))
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                visual_mask=batch.get("visual_mask"), frames=batch.get("frames"),
                track_boxes=batch.get("track_boxes"), rng=r_model, logits=lm_rows <= 0,
                heads=heads, head_inputs=batch, head_rng=r_heads, training_outputs=True)
    masks = valid_masks(batch, model.cfg, heads)

    def norm(name):
        return jnp.maximum(counts[name], 1.0)

    def term_norm(head, term):
        return norm(term_count(term) if head == "temporal" else head)

    if lm_rows > 0:
        r_logits = None if rng is None else jax.random.fold_in(r_model, 1)  # the other streams stay as without lm_rows
        lm_sum, dropped = lm_loss_sum_at_labels(model.llm, out.hidden, batch["labels"], lm_rows, r_logits)
        metrics = {"count/lm_dropped": dropped.astype(jnp.float32)}
    else:
        lm_sum, metrics = lm_loss_sum(out.logits, batch["labels"]), {}
    lm = lm_sum / norm("lm")
    metrics["loss/lm"] = lm
    loss = weights.get("lm", 1.0) * lm
    for head, head_terms in (head_loss_terms(out.heads, batch, model.cfg) if heads else {}).items():
        mask = masks[head]
        for term, value in head_terms.items():
            metrics[f"{head}/{term}"] = _masked_sum(value, mask) / term_norm(head, term)
        if head == "temporal":
            totals = temporal_totals({t: metrics[f"temporal/{t}"] for t in head_terms}, model.cfg.heads.temporal)
            metrics.update({f"temporal/{k}": v for k, v in totals.items()})
        head_loss = metrics[f"{head}/loss_{head}"]
        metrics[f"loss/{head}"] = head_loss
        loss = loss + weights.get(head, 1.0) * head_loss
    metrics["loss/total"] = loss
    return loss, metrics

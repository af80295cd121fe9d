"""Loss assembly: LM cross-entropy on assistant tokens plus the task-head losses.

Every term is a masked *sum* over this (micro-)batch divided by a *count* that depends on the batch
alone (label tokens, valid task slots), never on the parameters. That makes gradient accumulation
exact: the train step computes the counts of the whole batch once, and each micro-batch
contributes `sum_micro / count_total`. A task with no example in the batch has count 0 and
contributes exactly 0 (sums use `where`, so a NaN in a masked-out slot cannot leak).

Batch keys (static shapes; B = batch, L = tokens):
  input_ids (B, L) int32, attention_mask (B, L), labels (B, L) int32 (-100 = ignored; label t is the
  token at position t, the shift happens here), visual_mask (B, L) bool, frames (B, T, H, W, 3),
  track_boxes (B, Kt, 4) optional inputs for `<track_box>`;
  region:   region_boxes (B, Kr, 4) normalised xyxy targets of the k-th `<boxes>`, region_valid (B, Kr)
  mask:     mask_boxes (B, 4) ground-truth box of the `<tracking>` example, mask_valid (B,)
  temporal: temporal_valid (B,), spans (B, Ns, 2) (center, width), span_valid (B, Ns),
            saliency_labels (B, Lv), saliency_pos (B, 2), saliency_neg (B, 2), vid_mask (B, Lv), and
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
from tpo_jax.heads.temporal import temporal_loss_terms
from tpo_jax.model import TPOModel, gather_task_hidden

IGNORE = -100
HEADS = ("region", "temporal", "mask")


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
        masks["region"] = batch["region_valid"].astype(bool) & _slot_present(ids, C.BOXES_ID, k)
    if "mask" in heads:
        masks["mask"] = batch["mask_valid"].astype(bool) & _has_token(ids, C.TRACKING_ID)
    if "temporal" in heads:
        masks["temporal"] = (batch["temporal_valid"].astype(bool) & _has_token(ids, C.TEMP_ID)
                             & jnp.any(batch["span_valid"].astype(bool), axis=1))
    return masks


def loss_counts(batch: Mapping[str, jax.Array], cfg: C.TPOConfig, heads=HEADS) -> dict[str, jax.Array]:
    """Normalisers of each loss: the number of label tokens and of valid examples per head."""
    return {name: jnp.sum(m).astype(jnp.float32) for name, m in valid_masks(batch, cfg, heads).items()}


def temporal_features(model: TPOModel, batch: Mapping[str, jax.Array], vision_feats: jax.Array | None):
    """CG-DETR inputs: from the batch, or from the model (pooled per-frame ViT features + TEF, and the
    LLM's input embeddings of the query text). Model features are inputs to the head, not trained
    through it (stop_gradient), as precomputed features would be."""
    cfg = model.cfg.heads.temporal
    if cfg.feature_source == "batch":
        return batch["text_feats"], batch["text_mask"], batch["video_feats"], batch["vid_mask"]
    b, n, w = vision_feats.shape
    t = model.cfg.vit.num_frames // model.cfg.vit.tubelet_size
    clips = vision_feats.reshape(b, t, n // t, w).mean(axis=2)
    tef = jnp.stack([jnp.arange(t) / t, (jnp.arange(t) + 1) / t], axis=-1).astype(clips.dtype)
    video = jnp.concatenate([clips, jnp.broadcast_to(tef, (b, t, 2))], axis=-1)
    text = model.llm.embed(batch["temporal_text_ids"])
    return (jax.lax.stop_gradient(text), batch["text_mask"], jax.lax.stop_gradient(video), batch["vid_mask"])


def head_loss_terms(model: TPOModel, batch: Mapping[str, jax.Array], hidden: jax.Array,
                    vision_feats: jax.Array | None, heads=HEADS, rng: jax.Array | None = None):
    """Per-slot / per-sample loss terms of each head: {head: {term: array}}; `loss_<head>` is the total."""
    cfg, ids = model.cfg, batch["input_ids"]
    terms = {}
    if "region" in heads:
        k = batch["region_boxes"].shape[1]
        h, _, _ = gather_task_hidden(hidden, ids, C.BOXES_ID, k)
        terms["region"] = region_loss_terms(model.region_head(h), batch["region_boxes"], cfg.heads.region)
    if "mask" in heads:
        h, _, _ = gather_task_hidden(hidden, ids, C.TRACKING_ID, 1)
        prompt, box = model.mask_head(h[:, 0])
        target = jax.lax.stop_gradient(model.sam2.box_prompt(batch["mask_boxes"]))
        terms["mask"] = mask_loss_terms(prompt, target, box, batch["mask_boxes"], cfg.heads.mask)
    if "temporal" in heads:
        h, _, _ = gather_task_hidden(hidden, ids, C.TEMP_ID, 1)
        txt, txt_mask, vid, vid_mask = temporal_features(model, batch, vision_feats)
        outputs = model.temporal_head(txt, txt_mask, vid, vid_mask, h[:, 0], rng=rng)
        targets = {key: batch[key] for key in ("spans", "span_valid", "saliency_labels", "saliency_pos",
                                               "saliency_neg", "vid_mask")}
        terms["temporal"] = temporal_loss_terms(outputs, targets, cfg.heads.temporal)
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
    need_vision = "temporal" in heads and model.cfg.heads.temporal.feature_source == "model"
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                visual_mask=batch.get("visual_mask"), frames=batch.get("frames"),
                track_boxes=batch.get("track_boxes"), return_vision_features=need_vision, rng=r_model,
                logits=lm_rows <= 0)
    masks = valid_masks(batch, model.cfg, heads)

    def norm(name):
        return jnp.maximum(counts[name], 1.0)

    if lm_rows > 0:
        r_logits = None if rng is None else jax.random.fold_in(r_model, 1)  # the other streams stay as without lm_rows
        lm_sum, dropped = lm_loss_sum_at_labels(model.llm, out.hidden, batch["labels"], lm_rows, r_logits)
        metrics = {"count/lm_dropped": dropped.astype(jnp.float32)}
    else:
        lm_sum, metrics = lm_loss_sum(out.logits, batch["labels"]), {}
    lm = lm_sum / norm("lm")
    metrics["loss/lm"] = lm
    loss = weights.get("lm", 1.0) * lm
    for head, head_terms in head_loss_terms(model, batch, out.hidden, out.vision_features, heads, r_heads).items():
        mask = masks[head]
        for term, value in head_terms.items():
            metrics[f"{head}/{term}"] = _masked_sum(value, mask) / norm(head)
        head_loss = metrics[f"{head}/loss_{head}"]
        metrics[f"loss/{head}"] = head_loss
        loss = loss + weights.get(head, 1.0) * head_loss
    metrics["loss/total"] = loss
    return loss, metrics

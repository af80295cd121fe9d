"""Model → task predictions → metrics (`tpo_jax.train.metrics`), on teacher-forced evaluation batches.

One jitted forward pass per batch (`make_predict_fn`) gives every task's prediction at once:

* region: the region head's box at each `<boxes>` token (the model's `TPOOutput.heads`, as the losses read them);
* temporal: CG-DETR outputs → `postprocess_spans` (duration 1: normalised time) → the top-1 window; the
  per-clip saliency scores for highlight detection;
* multiple choice: the logits at the position before `mc_letter_pos` (the one predicting the answer's
  option letter, "B" of "(B) text") over the option tokens `mc_options`; in cloze form
  (`tpo_jax.data.pipeline.MC_CLOZE` batches, one row per option, the option's text as the answer to the bare
  question) each row's answer log-likelihood, the best option being the most likely answer;
* mask: the predicted SAM2 sparse prompt at `<tracking>` and its target `sam2.box_prompt(mask_boxes)`; in batches
  with SAM2 frames (`tpo_jax.data.pipeline.SAM2_FRAMES`: the `mask` evaluation batches) also the track,
  `model.sam2.propagate` of those frames from the predicted prompt: low-res logits `track_logits` (B, T, 4E, 4E).

`evaluate` runs it over batches (dicts of numpy arrays in the `tpo_jax.data.pipeline` format) and returns
flat metrics `{"rec/acc@0.5", "rec/miou", "temporal/r1@0.5", ..., "highlight/map", "mc/acc",
"mc_cloze/acc", "mask/l1", "track/jf", "track/auc", ..., "<task>/count"}`: the `track/...` metrics are DAVIS J&F and
tracking success AUC / precision of the tracks (`tpo_jax.train.tracking_metrics.track_summary`; the logits
hole-filled on the host as SAM2's predictor does, `fill_holes`, then resized to each record's frame size).
Validity masks come from `tpo_jax.losses.valid_masks`, so
an example counts for a task exactly when it would get that task's loss. With `mode="generate"` (or
`"both"`) it scores the model's own generated answers on the same examples instead (or too): the `gen/...`
metrics of `tpo_jax.train.evaluate_generate`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax.config import TPOConfig
from tpo_jax.data.pipeline import SAM2_FRAMES, TRACK_GT_FIELDS
from tpo_jax.heads.temporal.postprocess import postprocess_spans
from tpo_jax.losses import label_log_likelihood, valid_masks
from tpo_jax.model import HEADS
from tpo_jax.sam2.video import fill_holes
from tpo_jax.sharding import activation_sharding
from tpo_jax.train.metric_accumulator import NEG_INF, MetricAccumulator


def predict(model, batch: Mapping[str, jax.Array], label_rows: int = 0) -> dict[str, jax.Array]:
    """Every task's predictions (and validity) for one batch; deterministic (no dropout). The lm_head runs
    only where a prediction needs it: the MC answer position, and for cloze rows the first `label_rows`
    label positions (0: all; `cloze_label_rows` gives a bound that drops none)."""
    cfg: TPOConfig = model.cfg
    ids = batch["input_ids"]
    if "cloze_question" in batch:  # cloze multiple-choice rows: only the answer's log-likelihood matters
        out = model(ids, attention_mask=batch.get("attention_mask"), visual_mask=batch.get("visual_mask"),
                    frames=batch.get("frames"), logits=False)
        logprob, _ = label_log_likelihood(model.llm, out.hidden, batch["labels"], label_rows or ids.shape[1])
        return {"answer_logprob": logprob}
    out = model(ids, attention_mask=batch.get("attention_mask"), visual_mask=batch.get("visual_mask"),
                frames=batch.get("frames"), track_boxes=batch.get("track_boxes"), logits=False,
                heads=HEADS, head_inputs=batch)
    masks = valid_masks(batch, cfg, HEADS)
    f32 = jnp.float32
    heads = out.heads
    preds: dict[str, jax.Array] = {
        "region_pred": heads.region.boxes.astype(f32), "region_valid": masks["region"],
        "mask_pred": heads.mask.prompt.astype(f32), "mask_target": heads.mask.target.astype(f32),
        "mask_valid": masks["mask"],
        "temporal_top1": postprocess_spans(heads.temporal.outputs, 1.0)["windows"][:, 0],
        "saliency": heads.temporal.outputs["saliency_scores"].astype(f32), "temporal_valid": masks["temporal"],
    }

    if "mc_options" in batch and "mc_letter_pos" in batch:
        pos = jnp.clip(batch["mc_letter_pos"].astype(jnp.int32) - 1, 0, ids.shape[1] - 1)
        logits = model.llm.logits(jnp.take_along_axis(out.hidden, pos[:, None, None], axis=1)[:, 0]).astype(f32)
        options = batch["mc_options"].astype(jnp.int32)
        scores = jnp.take_along_axis(logits, jnp.clip(options, 0, logits.shape[-1] - 1), axis=1)
        preds["mc_scores"] = jnp.where(options >= 0, scores, NEG_INF)
    if SAM2_FRAMES in batch:  # tracking: SAM2 propagation over the sampled frames from the predicted prompt
        preds["track_logits"] = model.sam2.propagate(batch[SAM2_FRAMES], heads.mask.prompt).masks.astype(f32)
    return preds


def make_predict_fn(graphdef, mesh=None, rules=None, *, fill_hole_area: int = 0) -> Callable:
    """Jitted `predict_fn(state, batch, label_rows=0) -> predictions` for the full model state
    `nnx.split(model)` (`label_rows` static; the batch's `TRACK_GT_FIELDS` are ignored); with a `mesh`, the
    activation constraints of `rules` apply. `predict_fn.graphdef` is `graphdef` (generation-mode evaluation rebuilds the model from it);
    `predict_fn.fill_hole_area` the hole filling `evaluate` applies to the tracks (the model's
    `sam2.fill_hole_area`; 0: none)."""
    @functools.partial(jax.jit, static_argnames="label_rows")
    def jitted(state, batch, label_rows=0):
        model = nnx.merge(graphdef, state)
        if mesh is None:
            return predict(model, batch, label_rows)
        with activation_sharding(mesh, rules):
            return predict(model, batch, label_rows)

    def predict_fn(state, batch, label_rows=0):  # the host-only ground truth never enters the computation
        return jitted(state, {k: v for k, v in batch.items() if k not in TRACK_GT_FIELDS}, label_rows=label_rows)
    predict_fn.graphdef = graphdef
    predict_fn.fill_hole_area = int(fill_hole_area)
    return predict_fn


def cloze_label_rows(batch: Mapping[str, Any]) -> int:
    """Label rows that hold every label of a cloze batch, rounded up to a multiple of 8 (few compiles);
    0 for other batches."""
    if "cloze_question" not in batch:
        return 0
    return max(8, -(-int((np.asarray(batch["labels"]) >= 0).sum(axis=1).max()) // 8) * 8)


MODES = ("teacher", "generate", "both")


def evaluate(predict_fn: Callable, state, batches: Iterable[Mapping[str, Any]],
             place: Callable[[Mapping[str, Any]], Any] | None = None,
             accumulator: MetricAccumulator | None = None, *, mode: str = "teacher",
             generation: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Metrics of `predict_fn(state, batch, label_rows)` over `batches` (numpy dicts); `place` puts a batch on the
    devices (default: as is). Pass an empty `accumulator` to keep the per-example predictions too.

    `mode`: "teacher" (teacher-forced predictions), "generate" (the model's generated answers: the `gen/...`
    metrics of `tpo_jax.train.evaluate_generate.evaluate_generate`, given the keyword arguments `generation`,
    on the model `nnx.merge(predict_fn.graphdef, state)`) or "both" (one dict with both)."""
    if mode not in MODES:
        raise ValueError(f"evaluate: mode {mode!r} is not one of {list(MODES)}")
    batches = list(batches)
    out: dict[str, float] = {}
    if mode != "generate":
        acc = MetricAccumulator() if accumulator is None else accumulator
        holes = getattr(predict_fn, "fill_hole_area", 0)
        for batch in batches:
            device_batch = {k: v for k, v in batch.items() if k not in TRACK_GT_FIELDS}  # ground truth: host only
            placed = place(device_batch) if place else device_batch
            preds = jax.device_get(predict_fn(state, placed, label_rows=cloze_label_rows(batch)))
            if "track_logits" in preds and holes > 0:
                preds = dict(preds, track_logits=fill_holes(np.asarray(preds["track_logits"]), holes))
            acc.update(preds, batch)
        out.update(acc.compute())
    if mode != "teacher":
        from tpo_jax.train.evaluate_generate import evaluate_generate  # noqa: PLC0415  (it builds on this module)
        out.update(evaluate_generate(predict_fn.graphdef, state, batches, **(generation or {})))
    return out

"""Model → task predictions → metrics (`tpo_jax.train.metrics`), on teacher-forced evaluation batches.

One jitted forward pass per batch (`make_predict_fn`) gives every task's prediction at once:

* region: the region head's box at each `<boxes>` token (the model's `TPOOutput.heads`, as the losses read them);
* temporal: CG-DETR outputs → `postprocess_spans` (duration 1: normalised time) → the top-1 window; the
  per-clip saliency scores for highlight detection;
* multiple choice: the logits at the position before `mc_letter_pos` (the one predicting the answer's
  option letter, "B" of "(B) text") over the option tokens `mc_options`; in cloze form
  (`tpo_jax.data.pipeline.MC_CLOZE` batches, one row per option, the option's text as the answer to the bare
  question) each row's answer log-likelihood, the best option being the most likely answer;
* mask: the predicted SAM2 sparse prompt at `<tracking>` and its target `sam2.box_prompt(mask_boxes)`.

`evaluate` runs it over batches (dicts of numpy arrays in the `tpo_jax.data.pipeline` format) and returns
flat metrics `{"rec/acc@0.5", "rec/miou", "temporal/r1@0.5", ..., "highlight/map", "mc/acc",
"mc_cloze/acc", "mask/l1", "<task>/count"}`. Validity masks come from `tpo_jax.losses.valid_masks`, so
an example counts for a task exactly when it would get that task's loss.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax.data.pipeline import CLOZE_FIELDS
from tpo_jax.config import TPOConfig
from tpo_jax.heads.box_ops import span_cw_to_xx
from tpo_jax.heads.temporal.postprocess import postprocess_spans
from tpo_jax.losses import label_log_likelihood, valid_masks
from tpo_jax.model import HEADS
from tpo_jax.sharding import activation_sharding
from tpo_jax.train import metrics as M

NEG_INF = -1e30  # score of a padded multiple-choice option


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
    return preds


def make_predict_fn(graphdef, mesh=None, rules=None) -> Callable:
    """Jitted `predict_fn(state, batch, label_rows=0) -> predictions` for the full model state
    `nnx.split(model)` (`label_rows` static); with a `mesh`, the activation constraints of `rules` apply."""
    @functools.partial(jax.jit, static_argnames="label_rows")
    def predict_fn(state, batch, label_rows=0):
        model = nnx.merge(graphdef, state)
        if mesh is None:
            return predict(model, batch, label_rows)
        with activation_sharding(mesh, rules):
            return predict(model, batch, label_rows)
    return predict_fn


def cloze_label_rows(batch: Mapping[str, Any]) -> int:
    """Label rows that hold every label of a cloze batch, rounded up to a multiple of 8 (few compiles);
    0 for other batches."""
    if "cloze_question" not in batch:
        return 0
    return max(8, -(-int((np.asarray(batch["labels"]) >= 0).sum(axis=1).max()) // 8) * 8)


class MetricAccumulator:
    """Collects the valid predictions of many batches, then computes every metric at once."""

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {}

    def _add(self, name, value):
        self.parts.setdefault(name, []).append(np.asarray(value))

    def _get(self, name, shape_tail=()):
        parts = self.parts.get(name)
        return np.concatenate(parts) if parts else np.zeros((0, *shape_tail))

    def update(self, preds: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        p = {k: np.asarray(v) for k, v in preds.items()}
        if "answer_logprob" in p:
            keep = np.asarray(batch["cloze_question"]) >= 0
            self._add("cloze_logprob", p["answer_logprob"][keep])
            for name in CLOZE_FIELDS:
                self._add(name, np.asarray(batch[name])[keep])
            return
        rv = p["region_valid"].astype(bool)
        self._add("region_pred", p["region_pred"][rv])
        self._add("region_gt", np.asarray(batch["region_boxes"])[rv])
        tv = p["temporal_valid"].astype(bool)
        spans = np.asarray(batch["spans"], np.float64)[tv]
        self._add("temporal_pred", p["temporal_top1"][tv])
        self._add("temporal_gt", np.asarray(span_cw_to_xx(spans)) if len(spans) else spans)
        self._add("temporal_gt_valid", np.asarray(batch["span_valid"]).astype(bool)[tv])
        self._add("saliency", p["saliency"][tv])
        self._add("saliency_labels", np.asarray(batch["saliency_labels"])[tv])
        self._add("vid_mask", np.asarray(batch["vid_mask"])[tv])
        mv = p["mask_valid"].astype(bool)
        self._add("mask_pred", p["mask_pred"][mv])
        self._add("mask_target", p["mask_target"][mv])
        if "mc_scores" in p:
            keep = np.asarray(batch["mc_answer"]) >= 0
            self._add("mc_scores", p["mc_scores"][keep])
            self._add("mc_answer", np.asarray(batch["mc_answer"])[keep])

    def _cloze_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Cloze rows → (questions, options) answer log-likelihoods (NEG_INF: no such option), answers."""
        q, k = self._get("cloze_question").astype(int), self._get("cloze_option").astype(int)
        scores = np.full((q.max() + 1 if len(q) else 0, k.max() + 1 if len(k) else 1), NEG_INF)
        scores[q, k] = self._get("cloze_logprob")
        answers = np.full(len(scores), -1)
        answers[q] = self._get("cloze_answer")
        return scores, answers

    def _mc_scores(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(option scores, answers) of the letter form (`"mc"`) and the cloze form (`"mc_cloze"`)."""
        return {"mc": (self._get("mc_scores", (1,)), self._get("mc_answer")), "mc_cloze": self._cloze_scores()}

    def mc_questions(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-question multiple choice in validation order, for each form of `_mc_scores`: the option chosen
        (`tpo_jax.train.metrics.mc_choices`), the right option and whether they agree."""
        out = {}
        for name, (scores, answers) in self._mc_scores().items():
            chosen, right = M.mc_choices(scores, answers)
            out[name] = {"chosen": chosen, "answer": right, "correct": chosen == right}
        return out

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        mc = self._mc_scores()
        for prefix, values in (
            ("rec", M.rec_metrics(self._get("region_pred", (4,)), self._get("region_gt", (4,)))),
            ("temporal", M.temporal_grounding_metrics(self._get("temporal_pred", (2,)),
                                                      self._get("temporal_gt", (1, 2)),
                                                      self._get("temporal_gt_valid", (1,)))),
            ("highlight", M.highlight_metrics(self._get("saliency", (1,)), self._get("saliency_labels", (1,)),
                                              self._get("vid_mask", (1,)))),
            ("mc", M.mc_accuracy(*mc["mc"])),
            ("mc_cloze", M.mc_accuracy(*mc["mc_cloze"])),
            ("mask", M.prompt_l1(self._get("mask_pred", (1,)), self._get("mask_target", (1,)))),
        ):
            out.update({f"{prefix}/{k}": v for k, v in values.items()})
        return out


def evaluate(predict_fn: Callable, state, batches: Iterable[Mapping[str, Any]],
             place: Callable[[Mapping[str, Any]], Any] | None = None,
             accumulator: MetricAccumulator | None = None) -> dict[str, float]:
    """Metrics of `predict_fn(state, batch, label_rows)` over `batches` (numpy dicts); `place` puts a batch on the
    devices (default: as is). Pass an empty `accumulator` to keep the per-example predictions too."""
    acc = MetricAccumulator() if accumulator is None else accumulator
    for batch in batches:
        placed = place(batch) if place else batch
        preds = jax.device_get(predict_fn(state, placed, label_rows=cloze_label_rows(batch)))
        acc.update(preds, batch)
    return acc.compute()

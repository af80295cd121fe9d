"""`MetricAccumulator`: the valid predictions of many evaluation batches → every metric of
`tpo_jax.train.metrics` at once (teacher-forced predictions of `tpo_jax.train.evaluate`; the generated answers
of `tpo_jax.train.evaluate_generate` fill the same arrays), and the tracking metrics
(`tpo_jax.train.tracking_metrics`) of the SAM2 mask tracks of `mask` rows (`track_logits`)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from tpo_jax.data.pipeline import CLOZE_FIELDS
from tpo_jax.heads.box_ops import span_cw_to_xx
from tpo_jax.train import metrics as M
from tpo_jax.train import tracking_metrics as TM

NEG_INF = -1e30  # score of a padded multiple-choice option


class MetricAccumulator:
    """Collects the valid predictions of many batches, then computes every metric at once."""

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {}
        self.track_rows: list[dict] = []  # one `tracking_metrics.track_record_metrics` dict per tracked record

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
        if "track_logits" in p:
            self._tracks(p["track_logits"], batch, mv)
        if "mc_scores" in p:
            keep = np.asarray(batch["mc_answer"]) >= 0
            self._add("mc_scores", p["mc_scores"][keep])
            self._add("mc_answer", np.asarray(batch["mc_answer"])[keep])

    def _tracks(self, logits: np.ndarray, batch: Mapping[str, Any], valid: np.ndarray) -> None:
        """SAM2 low-res logits (B, T, h, w) of the valid mask rows → masks at each record's frame size (bilinear,
        foreground > 0, as `tpo_jax.sam2.video.upscale_masks`) → `track_record_metrics` against the batch's
        `tpo_jax.data.pipeline.TRACK_GT_FIELDS`."""
        from tpo_jax.sam2.video import upscale_masks  # noqa: PLC0415

        for i in np.flatnonzero(valid):
            h, w = (int(x) for x in np.asarray(batch["gt_frame_size"][i]))
            pred = np.asarray(upscale_masks(logits[i], h, w)) > 0
            gt = np.asarray(batch["gt_track_masks"][i])[:, :h, :w]
            boxes = np.asarray(batch["gt_track_boxes"][i], np.float64) * np.array([w, h, w, h], np.float64)
            self.track_rows.append(TM.track_record_metrics(pred, gt, boxes, np.asarray(batch["gt_track_visible"][i]),
                                                           has_masks=bool(batch["gt_has_masks"][i])))

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
        if self.track_rows:
            out.update({f"track/{k}": v for k, v in TM.track_summary(self.track_rows).items()})
        return out

"""Evaluation metrics of the TPO tasks, pure NumPy (one function per metric family).

| task                 | metric                                    | function                     |
|----------------------|-------------------------------------------|------------------------------|
| referring expression | Acc@0.5 (IoU ≥ 0.5), mean IoU             | `rec_metrics`                |
| temporal grounding   | R1@{0.3, 0.5, 0.7}, mIoU of the top-1 span | `temporal_grounding_metrics` |
| highlight detection  | HIT@1, mAP of the per-clip saliency       | `highlight_metrics`          |
| multiple choice      | accuracy of the best-scored option        | `mc_accuracy`                |
| mask (SAM2 prompt)   | mean L1 to the SAM2 box-prompt target      | `prompt_l1`                  |

Every function takes the predictions and targets of N examples and returns a dict of floats
(plus the number of examples under `count`); with N = 0 the metrics are NaN.
"""

from __future__ import annotations

import numpy as np

GROUNDING_THRESHOLDS = (0.3, 0.5, 0.7)


def _nan_if_empty(n: int, value) -> float:
    return float("nan") if n == 0 else float(value)


def box_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Row-wise IoU of xyxy boxes (..., 4) → (...). A prediction with x1 < x0 or y1 < y0 has IoU 0."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    ix = np.clip(np.minimum(pred[..., 2], gt[..., 2]) - np.maximum(pred[..., 0], gt[..., 0]), 0, None)
    iy = np.clip(np.minimum(pred[..., 3], gt[..., 3]) - np.maximum(pred[..., 1], gt[..., 1]), 0, None)
    inter = ix * iy
    area_p = np.clip(pred[..., 2] - pred[..., 0], 0, None) * np.clip(pred[..., 3] - pred[..., 1], 0, None)
    area_g = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
    union = area_p + area_g - inter
    valid = (pred[..., 2] >= pred[..., 0]) & (pred[..., 3] >= pred[..., 1]) & (union > 0)
    return np.where(valid, inter / np.where(union > 0, union, 1.0), 0.0)


def rec_metrics(pred_boxes: np.ndarray, gt_boxes: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Referring-expression comprehension: pred/gt (N, 4) xyxy → {acc@0.5, miou, count}."""
    iou = box_iou(pred_boxes, gt_boxes).reshape(-1)
    n = iou.size
    return {f"acc@{threshold:g}": _nan_if_empty(n, np.mean(iou >= threshold) if n else 0),
            "miou": _nan_if_empty(n, iou.mean() if n else 0), "count": n}


def span_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Row-wise IoU of [start, end] spans (..., 2) → (...); an empty union gives 0."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    inter = np.clip(np.minimum(pred[..., 1], gt[..., 1]) - np.maximum(pred[..., 0], gt[..., 0]), 0, None)
    union = (np.clip(pred[..., 1] - pred[..., 0], 0, None) + np.clip(gt[..., 1] - gt[..., 0], 0, None) - inter)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def temporal_grounding_metrics(pred_spans: np.ndarray, gt_spans: np.ndarray, gt_valid: np.ndarray | None = None,
                               thresholds=GROUNDING_THRESHOLDS) -> dict[str, float]:
    """Moment retrieval from the top-1 span: pred (N, 2) [start, end]; gt (N, G, 2) (or (N, 2)) with
    gt_valid (N, G). Each prediction is scored by its best IoU over the valid ground-truth spans.
    → {r1@0.3, r1@0.5, r1@0.7, miou, count}."""
    pred = np.asarray(pred_spans, np.float64)
    gt = np.asarray(gt_spans, np.float64)
    if gt.ndim == 2:
        gt = gt[:, None]
    valid = np.ones(gt.shape[:2], bool) if gt_valid is None else np.asarray(gt_valid, bool).reshape(gt.shape[:2])
    iou = np.where(valid, span_iou(pred[:, None], gt), -np.inf).max(axis=1) if len(pred) else np.zeros(0)
    iou = np.maximum(iou, 0.0)
    n = iou.size
    out = {f"r1@{t:g}": _nan_if_empty(n, np.mean(iou >= t) if n else 0) for t in thresholds}
    out.update(miou=_nan_if_empty(n, iou.mean() if n else 0), count=n)
    return out


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Non-interpolated AP of one ranking (scikit-learn's definition, tied scores form one threshold):
    AP = Σ_k (R_k − R_{k−1}) · P_k over the distinct score thresholds in descending order. NaN without a
    relevant item."""
    scores = np.asarray(scores, np.float64)
    relevant = np.asarray(relevant, bool)
    n_pos = int(relevant.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, r = scores[order], relevant[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # index of each threshold's last item
    tp = np.cumsum(r)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def highlight_metrics(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None,
                      min_label: float = 1e-6) -> dict[str, float]:
    """Highlight detection from per-clip saliency: scores, labels (N, Lv), mask (N, Lv) (1 = real clip).
    A clip is relevant when its label ≥ `min_label` (default: any positive label).
    HIT@1 = fraction of videos whose top-scored valid clip is relevant; mAP = mean over videos of
    `average_precision` over the valid clips. Videos without a relevant clip are skipped.
    → {hit@1, map, count}."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, np.float64)
    mask = np.ones_like(scores, bool) if mask is None else np.asarray(mask).astype(bool)
    hits, aps = [], []
    for s, y, m in zip(scores, labels, mask):
        s, rel = s[m], y[m] >= min_label
        if not rel.any():
            continue
        hits.append(float(rel[int(np.argmax(s))]))
        aps.append(average_precision(s, rel))
    n = len(hits)
    return {"hit@1": _nan_if_empty(n, np.mean(hits) if n else 0), "map": _nan_if_empty(n, np.mean(aps) if n else 0),
            "count": n}


def mc_choices(option_scores: np.ndarray, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multiple choice: option_scores (N, K) (e.g. logits of the option tokens), answers (N,) the index of the
    right option (−1: not a multiple-choice example, skipped). → (chosen, right) of the kept examples, the
    chosen option being the first best-scored one."""
    scores = np.asarray(option_scores, np.float64)
    answers = np.asarray(answers).reshape(-1).astype(int)
    keep = answers >= 0
    chosen = np.argmax(scores[keep], axis=-1) if keep.any() else np.zeros(0, int)
    return chosen, answers[keep]


def mc_accuracy(option_scores: np.ndarray, answers: np.ndarray) -> dict[str, float]:
    """Accuracy of `mc_choices(option_scores, answers)` → {acc, count}."""
    chosen, right = mc_choices(option_scores, answers)
    n = len(right)
    return {"acc": _nan_if_empty(n, np.mean(chosen == right) if n else 0), "count": n}


def prompt_l1(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mask-prompt embedding error: pred / target (N, ...) (e.g. (N, 3, P) SAM2 sparse prompts) →
    {l1: mean over examples of the mean |pred − target| of each example, count}."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    n = pred.shape[0]
    per = np.abs(pred - target).reshape(n, -1).mean(axis=1) if n else np.zeros(0)
    return {"l1": _nan_if_empty(n, per.mean() if n else 0), "count": n}


# Direction of each metric: +1 higher is better, −1 lower is better (used to report improvements).
HIGHER_IS_BETTER = {"acc@0.5": 1, "miou": 1, "r1@0.3": 1, "r1@0.5": 1, "r1@0.7": 1, "hit@1": 1, "map": 1, "acc": 1,
                    "l1": -1,
                    # tracking (`tpo_jax.train.tracking_metrics.track_summary`): DAVIS J&F, J, F, tracking success
                    "jf": 1, "j": 1, "f": 1, "auc": 1, "precision@20": 1, "norm_precision@0.2": 1}


def improvement(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """after − before of every shared metric `task/name`, signed so that a positive value is better."""
    out = {}
    for key, b in before.items():
        name = key.rsplit("/", 1)[-1]
        if key in after and name in HIGHER_IS_BETTER:
            out[key] = HIGHER_IS_BETTER[name] * (float(after[key]) - float(b))
    return out

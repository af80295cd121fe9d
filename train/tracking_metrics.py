"""Video object segmentation (DAVIS J&F) and single-object tracking (OTB / LaSOT OPE) metrics, host-side NumPy.

| task                         | metric                                               | function                   |
|------------------------------|------------------------------------------------------|----------------------------|
| video object segmentation    | J (mask IoU) per frame                               | `region_similarity`        |
|                              | F (boundary F-measure) per frame, with P and R       | `boundary_f_measure`       |
|                              | J/F mean, recall, decay and J&F of one object        | `davis_sequence_metrics`   |
|                              | the same over the objects of a label-map video       | `davis_label_metrics`      |
|                              | the dataset means over objects                       | `davis_summary`            |
| single-object tracking       | success AUC, precision@20 px, normalised precision   | `tracking_metrics`         |
|                              | the dataset means over sequences                     | `tracking_summary`         |
| a predicted mask track       | J&F and the box metrics of one record's frames       | `track_record_metrics`     |
|                              | their means over records (the `track/...` metrics)   | `track_summary`            |

Conventions (docs/training.md, "Segmentation and tracking metrics", has the references):

* J: |P ∩ G| / |P ∪ G|; both masks empty → 1. Void pixels (optional) are left out of both masks.
* F: boundary maps after Martin et al. (the DAVIS one): a pixel is a boundary pixel when it differs from its
  right, lower or lower-right neighbour (outside the image counts as background), except that the last row
  compares only to the right, the last column only downwards, and the bottom-right pixel never is one — the
  boundary sits half a pixel towards the origin and the image border is no boundary. A boundary pixel matches
  when the other map has a boundary pixel within the disk x² + y² ≤ r², r = ceil(bound_th · image diagonal)
  for bound_th < 1 (DAVIS: 0.008), else bound_th pixels. P = matched predicted / predicted boundary pixels,
  R = matched true / true boundary pixels, F = 2PR / (P + R) (0 when P + R = 0). Empty boundaries: both empty
  → P = R = 1; only the prediction's → P = 1, R = 0; only the truth's → P = 0, R = 1.
* Statistics of a per-frame series X: mean; recall = fraction of frames with X > 0.5; decay = mean of the
  first quarter − mean of the last quarter (the four bins of the DAVIS toolkit share their edge frames).
  NaN frames are skipped.
* Tracking: boxes (x0, y0, x1, y1) in pixels. A ground-truth frame counts when its flag is set and the box
  is finite with positive width and height; a predicted box counts when its flag is set, it is finite and
  x1 ≥ x0, y1 ≥ y0 (a missing prediction: IoU 0 and an infinite centre error, a failure at every
  threshold). Success rate S(t) = fraction of frames with IoU > t (strict) over t = 0, 0.05, …, 1;
  AUC = mean of the 21 rates. Precision P(d) = fraction with centre distance ≤ d px, d = 0..50, reported at
  20 px. Normalised precision: the centre offset divided by the true box's width and height before the
  distance, d = 0, 0.01, …, 0.5, reported at 0.2 (pytracking, LaSOT) and as the mean over the curve
  (TrackingNet's AUC). Frames without a valid ground truth are left out (`invalid_gt="exclude"`) or count
  as failures of every metric (`invalid_gt="fail"`, the full-length denominator of pytracking's default).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

DAVIS_BOUND_TH = 0.008
SUCCESS_THRESHOLDS = np.linspace(0.0, 1.0, 21)
PRECISION_THRESHOLDS = np.arange(51, dtype=np.float64)  # pixels
NORM_PRECISION_THRESHOLDS = np.arange(51, dtype=np.float64) / 100.0
PRECISION_AT = 20.0
NORM_PRECISION_AT = 0.2


# ------------------------------------------------------------------------------------------------
# Video object segmentation (DAVIS)
# ------------------------------------------------------------------------------------------------

def _as_masks(pred, gt, void=None):
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} masks differ in shape")
    if pred.ndim < 2:
        raise ValueError(f"masks need at least 2 dims (..., H, W), got shape {pred.shape}")
    if void is not None:
        void = np.broadcast_to(np.asarray(void).astype(bool), gt.shape)
        pred, gt = pred & ~void, gt & ~void
    return pred, gt


def region_similarity(pred, gt, void=None) -> np.ndarray:
    """J per mask: binary masks (..., H, W) → (...) float64 IoU; both empty → 1 (DAVIS)."""
    pred, gt = _as_masks(pred, gt, void)
    inter = np.count_nonzero(pred & gt, axis=(-2, -1))
    union = np.count_nonzero(pred | gt, axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def boundary_map(mask) -> np.ndarray:
    """1-pixel-wide boundary of a binary mask (H, W), half a pixel towards the origin (module docstring)."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"boundary_map takes one (H, W) mask, got shape {m.shape}")
    # Neighbours to the right, below and below-right, background outside the image.
    padded = np.pad(m, ((0, 1), (0, 1)))
    right, down, diag = padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]
    out = (m != right) | (m != down) | (m != diag)
    out[-1, :] = m[-1, :] != right[-1, :]
    out[:, -1] = m[:, -1] != down[:, -1]
    out[-1, -1] = False
    return out


def boundary_radius(shape: Sequence[int], bound_th: float = DAVIS_BOUND_TH) -> float:
    """Matching tolerance in pixels: bound_th pixels if ≥ 1, else ceil(bound_th · image diagonal)."""
    if bound_th >= 1:
        return float(bound_th)
    return float(math.ceil(bound_th * math.hypot(shape[-2], shape[-1])))


def disk(radius: float) -> np.ndarray:
    """Structuring element {(dy, dx): dy² + dx² ≤ radius²}, (2⌊r⌋+1)² boolean."""
    r = int(math.floor(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    return dy * dy + dx * dx <= radius * radius


def dilate(b: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation of a non-empty (H, W) map by `disk(radius)`, clipped to the image: the pixels within
    Euclidean distance `radius` of a set pixel (an exact distance transform: 2-3× faster than
    `ndimage.binary_dilation` with the disk at DAVIS's r = 8, and equal to it)."""
    return ndimage.distance_transform_edt(~b) <= radius


def _boundary_prf(pred2d: np.ndarray, gt2d: np.ndarray, radius: float) -> tuple[float, float, float]:
    bp, bg = boundary_map(pred2d), boundary_map(gt2d)
    n_p, n_g = int(bp.sum()), int(bg.sum())
    if n_p == 0 and n_g == 0:
        return 1.0, 1.0, 1.0
    if n_p == 0:           # nothing predicted: nothing wrong, nothing found
        return 0.0, 1.0, 0.0
    if n_g == 0:           # boundary predicted where there is none
        return 0.0, 0.0, 1.0
    near_g, near_p = dilate(bg, radius), dilate(bp, radius)
    precision = np.count_nonzero(bp & near_g) / n_p
    recall = np.count_nonzero(bg & near_p) / n_g
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return float(f), float(precision), float(recall)


def boundary_f_measure(pred, gt, bound_th: float = DAVIS_BOUND_TH, void=None,
                       return_pr: bool = False):
    """F per mask: binary masks (..., H, W) → F (...) float64, or (F, precision, recall) with return_pr."""
    pred, gt = _as_masks(pred, gt, void)
    radius = boundary_radius(gt.shape, bound_th)
    lead = gt.shape[:-2]
    out = np.zeros((3,) + lead, np.float64)
    for idx in np.ndindex(*lead):
        out[(slice(None),) + idx] = _boundary_prf(pred[idx], gt[idx], radius)
    if return_pr:
        return out[0], out[1], out[2]
    return out[0]


def _decay_edges(n: int, n_bins: int = 4) -> np.ndarray:
    # Bin edges of the DAVIS toolkit: n frames split at round(linspace(0, n − 1, 5)), halves rounded up;
    # bin i spans frames edges[i]..edges[i + 1] inclusive.
    return np.floor(np.linspace(0, n - 1, n_bins + 1) + 0.5 + 1e-10).astype(np.int64)


def davis_statistics(values) -> dict[str, float]:
    """{mean, recall, decay} of one per-frame series (J or F); NaN frames skipped, all NaN for no frame."""
    x = np.asarray(values, np.float64).reshape(-1)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"mean": float("nan"), "recall": float("nan"), "decay": float("nan")}
    e = _decay_edges(x.size)
    return {"mean": float(x.mean()), "recall": float(np.mean(x > 0.5)),
            "decay": float(x[e[0]:e[1] + 1].mean() - x[e[3]:e[4] + 1].mean())}


def davis_sequence_metrics(pred, gt, void=None, bound_th: float = DAVIS_BOUND_TH,
                           skip_first_last: bool = False) -> dict[str, float]:
    """One object through one video: binary masks (T, H, W) → J/F mean, recall, decay, J&F and frame count.

    `skip_first_last` drops the first and last frame, as the DAVIS 2017 semi-supervised protocol does (the first
    frame's mask is given to the method)."""
    pred, gt = _as_masks(pred, gt, void)
    if pred.ndim != 3:
        raise ValueError(f"davis_sequence_metrics takes (T, H, W) masks, got shape {pred.shape}")
    if skip_first_last:
        pred, gt = pred[1:-1], gt[1:-1]
    j = region_similarity(pred, gt)
    f = boundary_f_measure(pred, gt, bound_th)
    out = {f"J_{k}": v for k, v in davis_statistics(j).items()}
    out.update({f"F_{k}": v for k, v in davis_statistics(f).items()})
    out["J&F"] = (out["J_mean"] + out["F_mean"]) / 2
    out["count"] = int(j.size)
    return out


def davis_label_metrics(pred_labels, gt_labels, void=None, bound_th: float = DAVIS_BOUND_TH,
                        skip_first_last: bool = False) -> list[dict[str, float]]:
    """Label-map videos (T, H, W), 0 = background, object k = label k: one `davis_sequence_metrics` dict per
    object of the ground truth (labels 1..max); a label the prediction lacks is an empty prediction, labels the
    ground truth lacks are ignored."""
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"label maps differ in shape: {pred_labels.shape} vs {gt_labels.shape}")
    n_obj = int(gt_labels.max()) if gt_labels.size else 0
    return [dict(davis_sequence_metrics(pred_labels == k, gt_labels == k, void, bound_th, skip_first_last),
                 object=k) for k in range(1, n_obj + 1)]


def _mean_over(rows: Sequence[Mapping[str, float]], keys: Iterable[str]) -> dict[str, float]:
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in rows], np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[k] = float(np.nanmean(vals)) if vals.size else float("nan")
    return out


def davis_summary(per_object: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Dataset level (DAVIS 2017): every statistic averaged over all objects of all sequences; J&F = (J_mean +
    F_mean) / 2 of those means. `count` = number of objects."""
    keys = [f"{m}_{s}" for m in "JF" for s in ("mean", "recall", "decay")]
    out = _mean_over(per_object, keys)
    out["J&F"] = (out["J_mean"] + out["F_mean"]) / 2
    out["count"] = len(per_object)
    return out


# ------------------------------------------------------------------------------------------------
# Single-object tracking (OTB / LaSOT / TrackingNet one-pass evaluation)
# ------------------------------------------------------------------------------------------------

def _boxes(b, name: str) -> np.ndarray:
    b = np.asarray(b, np.float64)
    if b.ndim != 2 or b.shape[-1] != 4:
        raise ValueError(f"{name} boxes must be (T, 4) (x0, y0, x1, y1), got shape {b.shape}")
    return b


def _flags(flag, n: int, name: str) -> np.ndarray:
    if flag is None:
        return np.ones(n, bool)
    flag = np.asarray(flag).astype(bool).reshape(-1)
    if flag.size != n:
        raise ValueError(f"{name} has {flag.size} flags for {n} frames")
    return flag


def tracking_frame_errors(pred_boxes, gt_boxes, gt_valid=None, pred_valid=None):
    """Per-frame (iou, centre distance px, normalised centre distance, gt_ok) of one sequence (T frames).

    Frames whose prediction is missing have IoU 0 and infinite distances; frames whose ground truth is not
    valid (gt_ok False) carry NaN."""
    pred, gt = _boxes(pred_boxes, "predicted"), _boxes(gt_boxes, "ground-truth")
    if pred.shape != gt.shape:
        raise ValueError(f"{pred.shape[0]} predicted boxes for {gt.shape[0]} frames")
    n = gt.shape[0]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gt_ok = _flags(gt_valid, n, "gt_valid") & np.isfinite(gt).all(1) & (gw > 0) & (gh > 0)
    pred_ok = (_flags(pred_valid, n, "pred_valid") & np.isfinite(pred).all(1)
               & (pred[:, 2] >= pred[:, 0]) & (pred[:, 3] >= pred[:, 1]))
    p = np.where(pred_ok[:, None], pred, 0.0)
    g = np.where(gt_ok[:, None], gt, 0.0)

    ix = np.clip(np.minimum(p[:, 2], g[:, 2]) - np.maximum(p[:, 0], g[:, 0]), 0, None)
    iy = np.clip(np.minimum(p[:, 3], g[:, 3]) - np.maximum(p[:, 1], g[:, 1]), 0, None)
    inter = ix * iy
    union = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inter
    iou = np.where(pred_ok & (union > 0), inter / np.where(union > 0, union, 1.0), 0.0)

    off = (p[:, :2] + p[:, 2:]) / 2 - (g[:, :2] + g[:, 2:]) / 2          # centre offset (dx, dy)
    size = np.stack([np.where(gt_ok, gw, 1.0), np.where(gt_ok, gh, 1.0)], 1)
    dist = np.where(pred_ok, np.hypot(off[:, 0], off[:, 1]), np.inf)
    ndist = np.where(pred_ok, np.hypot(off[:, 0] / size[:, 0], off[:, 1] / size[:, 1]), np.inf)
    nan = np.full(n, np.nan)
    return np.where(gt_ok, iou, nan), np.where(gt_ok, dist, nan), np.where(gt_ok, ndist, nan), gt_ok


def tracking_metrics(pred_boxes, gt_boxes, gt_valid=None, pred_valid=None,
                     invalid_gt: str = "exclude") -> dict:
    """One sequence: pred/gt (T, 4) xyxy pixels, optional per-frame flags (T,) → {auc, precision@20,
    norm_precision@0.2, norm_precision_auc, ao (mean IoU), count (frames scored), success_curve (21,),
    precision_curve (51,), norm_precision_curve (51,)}; NaN scores when no frame is scored."""
    if invalid_gt not in ("exclude", "fail"):
        raise ValueError(f"invalid_gt must be 'exclude' or 'fail', got {invalid_gt!r}")
    iou, dist, ndist, gt_ok = tracking_frame_errors(pred_boxes, gt_boxes, gt_valid, pred_valid)
    if invalid_gt == "exclude":
        iou, dist, ndist = iou[gt_ok], dist[gt_ok], ndist[gt_ok]
    else:  # a frame without ground truth fails every threshold
        iou, dist, ndist = (np.where(gt_ok, iou, -1.0), np.where(gt_ok, dist, np.inf),
                            np.where(gt_ok, ndist, np.inf))
    n = iou.size
    if n == 0:
        nan21, nan51 = np.full(21, np.nan), np.full(51, np.nan)
        return {"auc": float("nan"), "precision@20": float("nan"), "norm_precision@0.2": float("nan"),
                "norm_precision_auc": float("nan"), "ao": float("nan"), "count": 0,
                "success_curve": nan21, "precision_curve": nan51, "norm_precision_curve": nan51}
    success = (iou[:, None] > SUCCESS_THRESHOLDS[None]).mean(0)
    prec = (dist[:, None] <= PRECISION_THRESHOLDS[None]).mean(0)
    nprec = (ndist[:, None] <= NORM_PRECISION_THRESHOLDS[None]).mean(0)
    return {"auc": float(success.mean()),
            "precision@20": float(prec[int(PRECISION_AT)]),
            "norm_precision@0.2": float(nprec[int(round(NORM_PRECISION_AT * 100))]),
            "norm_precision_auc": float(nprec.mean()),
            "ao": float(np.maximum(iou, 0.0).mean()),
            "count": int(n),
            "success_curve": success, "precision_curve": prec, "norm_precision_curve": nprec}


def tracking_summary(per_sequence: Sequence[Mapping]) -> dict:
    """Dataset level (OTB / LaSOT): curves and scores averaged over sequences, each sequence weighing the same;
    sequences with no scored frame are left out. `count` = number of sequences averaged."""
    rows = [r for r in per_sequence if r["count"] > 0]
    out = _mean_over(rows, ["auc", "precision@20", "norm_precision@0.2", "norm_precision_auc", "ao"])
    for k, size in (("success_curve", 21), ("precision_curve", 51), ("norm_precision_curve", 51)):
        out[k] = np.mean([r[k] for r in rows], 0) if rows else np.full(size, np.nan)
    out["count"] = len(rows)
    return out


# ------------------------------------------------------------------------------------------------
# Mask tracks of a video (the evaluation of `tpo_jax.train.evaluate`: SAM2 propagation from the mask head's prompt)
# ------------------------------------------------------------------------------------------------

def mask_boxes(masks) -> tuple[np.ndarray, np.ndarray]:
    """Binary masks (T, H, W) → pixel boxes (T, 4) (x0, y0, x1, y1), max exclusive (a one-pixel mask at (x, y) is
    (x, y, x + 1, y + 1), the convention of the synthetic boxes and `tpo_jax.generate.track.mask_box`), and
    whether each mask is non-empty (an empty mask: box 0, flag False, a missing prediction)."""
    m = np.asarray(masks).astype(bool)
    rows, cols = m.any(axis=2), m.any(axis=1)
    valid = rows.any(axis=1)
    h, w = m.shape[1:]
    y0, x0 = rows.argmax(axis=1), cols.argmax(axis=1)
    y1, x1 = h - rows[:, ::-1].argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x0, y0, x1, y1], axis=1).astype(np.float64)
    return np.where(valid[:, None], boxes, 0.0), valid


def track_record_metrics(pred_masks, gt_masks, gt_boxes, gt_visible, *, has_masks: bool = True,
                         bound_th: float = DAVIS_BOUND_TH) -> dict:
    """One object tracked through the T sampled frames of one record: predicted / true masks (T, H, W) at the
    frame size, true pixel boxes (T, 4) and visibility (T,) →
    {"davis": `davis_sequence_metrics` over all T frames (None without true masks), "tracking": `tracking_metrics`}.

    J&F: every frame counts (the first one too: the prompt is a box or a description, not the first mask); a frame
    where the object is not visible has an empty true mask, scored by the DAVIS convention (an empty prediction
    J = F = 1, anything else 0). Boxes: the predicted mask's bounding box (`mask_boxes`; empty = missing, a failure)
    against the true box, frames where the object is not visible left out (`invalid_gt="exclude"`, as LaSOT's
    absent frames)."""
    pred = np.asarray(pred_masks).astype(bool)
    boxes, pred_ok = mask_boxes(pred)
    return {"davis": davis_sequence_metrics(pred, gt_masks, bound_th=bound_th) if has_masks else None,
            "tracking": tracking_metrics(boxes, gt_boxes, gt_valid=gt_visible, pred_valid=pred_ok)}


def track_summary(rows: Sequence[Mapping]) -> dict[str, float]:
    """Records of `track_record_metrics` → flat means over records (each weighing the same):
    jf = (j + f) / 2 with j / f the DAVIS J / F means (mean over frames, then over records), j_recall, f_recall;
    auc, precision@20, norm_precision@0.2 (`tracking_summary`); count = records, frames = frames scored by J&F."""
    davis = [r["davis"] for r in rows if r["davis"] is not None]
    d = davis_summary(davis)
    t = tracking_summary([r["tracking"] for r in rows])
    return {"jf": d["J&F"], "j": d["J_mean"], "f": d["F_mean"], "j_recall": d["J_recall"], "f_recall": d["F_recall"],
            "auc": t["auc"], "precision@20": t["precision@20"], "norm_precision@0.2": t["norm_precision@0.2"],
            "count": len(rows), "frames": int(sum(r["count"] for r in davis))}

"""Box and span geometry for the task-head losses and the Hungarian matcher (pure `jax.numpy`).

Boxes are xyxy ``(x0, y0, x1, y1)`` (DETR / torchvision convention, MODEL-SPEC §5.3); temporal spans are
``(start, end)`` ("xx") or ``(center, width)`` ("cw", the CG-DETR output, §6.4). Everything is jittable,
differentiable and NaN-free on degenerate inputs (zero size, or end < start): side lengths are clamped at 0 and
every division is ``x / max(y, eps)``, so values *and* gradients stay finite. For well-formed inputs whose
denominators exceed ``eps`` the results equal the reference formulas exactly.

Paired functions (``box_iou``, ``box_giou``, ``span_giou``) work elementwise over broadcastable leading dims
(DETR's diagonal); ``pairwise_*`` build the full (N, M) matrix (DETR's ``generalized_box_iou`` /
CG-DETR's ``generalized_temporal_iou``).
"""

from __future__ import annotations

import jax.numpy as jnp

EPS = 1e-7


def _safe_div(num, den, eps: float = EPS):
    """num / max(den, eps): finite value and finite gradient even when den <= 0."""
    return num / jnp.maximum(den, eps)


# --------------------------------------------------------------------------------------------- 2-D boxes (xyxy)

def box_area(b):
    """Area of xyxy boxes (..., 4) -> (...): max(x1 − x0, 0) · max(y1 − y0, 0).

    (torchvision's `box_area` does not clamp; identical for well-formed boxes, 0 instead of a signed value
    for inverted ones.)
    """
    b = jnp.asarray(b)
    return jnp.maximum(b[..., 2] - b[..., 0], 0.0) * jnp.maximum(b[..., 3] - b[..., 1], 0.0)


def _box_inter_union(a, b):
    a, b = jnp.asarray(a), jnp.asarray(b)
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def box_iou(a, b, eps: float = EPS):
    """Paired IoU of xyxy boxes: (..., 4), (..., 4) -> (...), broadcasting over the leading dims.

    inter = max(min(x1a, x1b) − max(x0a, x0b), 0) · max(min(y1a, y1b) − max(y0a, y0b), 0),
    union = area(a) + area(b) − inter, IoU = inter / max(union, eps).
    """
    inter, union = _box_inter_union(a, b)
    return _safe_div(inter, union, eps)


def box_giou(a, b, eps: float = EPS):
    """Paired generalized IoU (Rezatofighi et al.; DETR `generalized_box_iou` diagonal) of xyxy boxes.

    C = area of the smallest enclosing box = max(max(x1) − min(x0), 0) · max(max(y1) − min(y0), 0),
    GIoU = IoU − (C − union) / max(C, eps) ∈ [−1, 1].  (..., 4), (..., 4) -> (...).
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    inter, union = _box_inter_union(a, b)
    iou = _safe_div(inter, union, eps)
    lt = jnp.minimum(a[..., :2], b[..., :2])
    rb = jnp.maximum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - _safe_div(enclosing - union, enclosing, eps)


def pairwise_box_iou(a, b, eps: float = EPS):
    """All-pairs IoU: a (N, 4), b (M, 4) -> (N, M)."""
    return box_iou(jnp.asarray(a)[:, None, :], jnp.asarray(b)[None, :, :], eps)


def pairwise_box_giou(a, b, eps: float = EPS):
    """All-pairs GIoU (DETR `generalized_box_iou`): a (N, 4), b (M, 4) -> (N, M)."""
    return box_giou(jnp.asarray(a)[:, None, :], jnp.asarray(b)[None, :, :], eps)


# ----------------------------------------------------------------------------------------------- 1-D spans

def span_cw_to_xx(s):
    """(center, width) -> (start, end) = (c − w/2, c + w/2); (..., 2) -> (..., 2)."""
    s = jnp.asarray(s)
    c, w = s[..., 0], s[..., 1]
    return jnp.stack([c - 0.5 * w, c + 0.5 * w], axis=-1)


def span_xx_to_cw(s):
    """(start, end) -> (center, width) = ((s + e)/2, e − s); (..., 2) -> (..., 2)."""
    s = jnp.asarray(s)
    x0, x1 = s[..., 0], s[..., 1]
    return jnp.stack([0.5 * (x0 + x1), x1 - x0], axis=-1)


def span_iou(a, b, eps: float = EPS):
    """Paired 1-D IoU of (start, end) spans: inter = max(min(e) − max(s), 0),
    union = len(a) + len(b) − inter (len = max(e − s, 0)), IoU = inter / max(union, eps). (..., 2) -> (...)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    inter = jnp.maximum(jnp.minimum(a[..., 1], b[..., 1]) - jnp.maximum(a[..., 0], b[..., 0]), 0.0)
    union = jnp.maximum(a[..., 1] - a[..., 0], 0.0) + jnp.maximum(b[..., 1] - b[..., 0], 0.0) - inter
    return _safe_div(inter, union, eps)


def span_giou(a, b, eps: float = EPS):
    """Paired 1-D generalized IoU of (start, end) spans (CG-DETR `generalized_temporal_iou` diagonal).

    IoU as in `span_iou`; enclosing = max(max(e) − min(s), 0);
    GIoU = IoU − (enclosing − union) / max(enclosing, eps) ∈ [−1, 1].  (..., 2), (..., 2) -> (...).
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    inter = jnp.maximum(jnp.minimum(a[..., 1], b[..., 1]) - jnp.maximum(a[..., 0], b[..., 0]), 0.0)
    union = jnp.maximum(a[..., 1] - a[..., 0], 0.0) + jnp.maximum(b[..., 1] - b[..., 0], 0.0) - inter
    iou = _safe_div(inter, union, eps)
    enclosing = jnp.maximum(jnp.maximum(a[..., 1], b[..., 1]) - jnp.minimum(a[..., 0], b[..., 0]), 0.0)
    return iou - _safe_div(enclosing - union, enclosing, eps)


def pairwise_span_giou(a, b, eps: float = EPS):
    """All-pairs 1-D GIoU of (start, end) spans: a (N, 2), b (M, 2) -> (N, M)."""
    return span_giou(jnp.asarray(a)[:, None, :], jnp.asarray(b)[None, :, :], eps)


def pairwise_l1(a, b):
    """All-pairs L1 distance Σ_k |a_ik − b_jk| (torch.cdist with p=1): a (N, d), b (M, d) -> (N, M)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    return jnp.sum(jnp.abs(a[:, None, :] - b[None, :, :]), axis=-1)

"""DAVIS J&F and OTB/LaSOT tracking metrics (train/tracking_metrics.py) against hand-computed values,
pycocotools' mask IoU and a brute-force boundary matcher."""

import math

import numpy as np
import pytest

from tpo_jax.train import tracking_metrics as T


def _square(shape, top, left, size):
    m = np.zeros(shape, bool)
    m[top:top + size, left:left + size] = True
    return m


# ---------------------------------------------------------------------------------------------- boundaries

def test_boundary_map_of_a_square_is_the_ring_of_the_box_grown_towards_the_origin():
    # 6×6 square at rows/cols 4..9 of a 16×16 image. A pixel is on the boundary when it differs from its
    # right, lower or lower-right neighbour, so the boundary is the square's last row and column (11 pixels)
    # plus the background row above and column left of it (7 + 7 − 1 = 13): the 24-pixel ring of the 7×7 box
    # rows/cols 3..9.
    b = T.boundary_map(_square((16, 16), 4, 4, 6))
    ring = np.zeros((16, 16), bool)
    ring[3:10, 3:10] = True
    ring[4:9, 4:9] = False
    np.testing.assert_array_equal(b, ring)
    assert b.sum() == 24


def test_boundary_map_at_the_image_border():
    # A 2×2 object in the bottom-right corner of a 4×4 image. The last row compares only to the right, the last
    # column only downwards and the corner pixel is never a boundary, so the image border is no boundary: what
    # is left is the "L" above and left of the object: (1,1), (1,2), (1,3), (2,1), (3,1).
    b = T.boundary_map(_square((4, 4), 2, 2, 2))
    expected = np.zeros((4, 4), bool)
    for y, x in [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)]:
        expected[y, x] = True
    np.testing.assert_array_equal(b, expected)
    assert not T.boundary_map(np.ones((5, 7), bool)).any()      # a full frame has no boundary
    assert not T.boundary_map(np.zeros((5, 7), bool)).any()


def test_boundary_radius_and_disk():
    assert T.boundary_radius((16, 16)) == 1.0                   # ceil(0.008 · 22.6) = ceil(0.18)
    assert T.boundary_radius((480, 854)) == 8.0                 # DAVIS 480p: ceil(0.008 · 979.6) = ceil(7.84)
    assert T.boundary_radius((480, 854), 3) == 3.0              # ≥ 1: pixels
    np.testing.assert_array_equal(T.disk(1), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])   # (1, 1) is √2 > 1 away
    assert T.disk(2).sum() == 13 and T.disk(2)[1, 1]            # 2: the 3×3 block plus the 4 axis points


def test_dilate_equals_binary_dilation_by_the_disk():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(2)
    for radius in (0, 1, 2, 3.5, 8):
        b = rng.random((40, 61)) < 0.01
        b[0, 0] = b[-1, -1] = True                                   # set pixels on the border too
        np.testing.assert_array_equal(T.dilate(b, radius), ndimage.binary_dilation(b, structure=T.disk(radius)))


# ---------------------------------------------------------------------------------------------- J and F by hand

def test_j_and_f_of_a_square_shifted_by_two_pixels():
    # GT 6×6 square rows/cols 4..9 → boundary ring R_g = box rows 3..9, cols 3..9 (24 px).
    # Prediction shifted 2 px right (cols 6..11) → ring R_p = box rows 3..9, cols 5..11 (24 px).
    # J = 6·4 / (36 + 36 − 24) = 24 / 48 = 1/2.
    # Tolerance r = 1 (16×16 image), the disk is the 4-neighbourhood. Precision, over R_p:
    #   top row (3, 5..11): (3,5..9) lie on R_g's top row, (3,10) touches (3,9), (3,11) does not → 6 of 7;
    #   bottom row (9, 5..11): 6 of 7 likewise;
    #   left column (4..8, 5): (4,5) touches R_g's top row at (3,5), (8,5) its bottom row at (9,5); (5..7, 5)
    #   are 2 px from R_g's left column (col 3), 4 px from its right one (col 9) → 2 of 5;
    #   right column (4..8, 11): two columns beyond R_g → 0 of 5.
    #   P = (6 + 6 + 2) / 24 = 7/12. The configuration is a mirror image of itself, so R = 7/12 and F = 7/12.
    gt = _square((16, 16), 4, 4, 6)
    pred = _square((16, 16), 4, 6, 6)
    assert T.region_similarity(pred, gt) == pytest.approx(0.5)
    f, p, r = T.boundary_f_measure(pred, gt, return_pr=True)
    assert (p, r, f) == pytest.approx((7 / 12, 7 / 12, 7 / 12), abs=1e-12)
    # Exact matching (r = 0): only the shared parts of the top and bottom rows, (3|9, 5..9) → 10 / 24 each.
    f0, p0, r0 = T.boundary_f_measure(pred, gt, bound_th=0, return_pr=True)
    assert (p0, r0, f0) == pytest.approx((10 / 24, 10 / 24, 10 / 24), abs=1e-12)


def test_j_and_f_of_a_smaller_square_inside():
    # GT 6×6 (rows/cols 4..9, ring 3..9: 24 px); prediction the centred 4×4 (rows/cols 5..8, ring 4..8: 16 px).
    # J = 16 / 36 = 4/9.
    # r = 1: every pixel of the predicted ring has a 4-neighbour on the GT ring one row/column further out
    # → P = 16/16 = 1. Of the GT ring, the 4 corners ((3,3), (3,9), (9,3), (9,9)) are √2 from the nearest
    # predicted pixel, the other 20 are 1 away → R = 20/24 = 5/6. F = 2 · 1 · 5/6 / (1 + 5/6) = 10/11.
    gt = _square((16, 16), 4, 4, 6)
    pred = _square((16, 16), 5, 5, 4)
    assert T.region_similarity(pred, gt) == pytest.approx(4 / 9)
    f, p, r = T.boundary_f_measure(pred, gt, return_pr=True)
    assert (p, r, f) == pytest.approx((1.0, 5 / 6, 10 / 11), abs=1e-12)
    # r = 2 px: the disk reaches the diagonal neighbours (√2 ≤ 2), the corners match too → P = R = F = 1.
    assert T.boundary_f_measure(pred, gt, bound_th=2) == pytest.approx(1.0)


def test_empty_mask_conventions():
    z = np.zeros((8, 8), bool)
    sq = _square((8, 8), 2, 2, 3)
    assert T.region_similarity(z, z) == 1.0                       # both empty
    assert T.region_similarity(z, sq) == 0.0 and T.region_similarity(sq, z) == 0.0
    assert T.boundary_f_measure(z, z, return_pr=True) == (1.0, 1.0, 1.0)
    # nothing predicted: P = 1, R = 0 → F = 0;   predicted on an empty truth: P = 0, R = 1 → F = 0
    assert tuple(map(float, T.boundary_f_measure(z, sq, return_pr=True))) == (0.0, 1.0, 0.0)
    assert tuple(map(float, T.boundary_f_measure(sq, z, return_pr=True))) == (0.0, 0.0, 1.0)


def test_void_pixels_are_left_out():
    gt = _square((16, 16), 4, 4, 6)
    pred = _square((16, 16), 4, 6, 6)
    void = np.zeros((16, 16), bool)
    void[:, 10:] = True                      # the columns only the prediction covers
    # inside the non-void part the prediction is cols 6..9 of the GT's 4..9: J = 24 / 36
    assert T.region_similarity(pred, gt, void=void) == pytest.approx(24 / 36)


# ---------------------------------------------------------------------------------------------- random masks

def _blobs(rng, n, h, w, density):
    noise = rng.random((n, h + 4, w + 4))
    k = np.ones((5, 5)) / 25.0
    smooth = np.stack([np.real(np.fft.ifft2(np.fft.fft2(a) * np.fft.fft2(k, a.shape))) for a in noise])
    smooth = smooth[:, 4:, 4:]
    return smooth > np.quantile(smooth, 1 - density, axis=(1, 2), keepdims=True)


def test_j_matches_pycocotools_on_random_masks():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    pred = _blobs(rng, 20, 37, 53, 0.3)
    gt = _blobs(rng, 20, 37, 53, 0.3)
    ours = T.region_similarity(pred, gt)
    enc = lambda m: mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))     # noqa: E731
    ref = np.array([mask_utils.iou([enc(p)], [enc(g)], [0])[0, 0] for p, g in zip(pred, gt)])
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert 0.05 < ours.mean() < 0.6


def _brute_boundary(m):
    """The boundary definition pixel by pixel (independent of the shifted-array code)."""
    h, w = m.shape
    at = lambda y, x: bool(m[y, x]) if y < h and x < w else False              # noqa: E731
    out = np.zeros_like(m, bool)
    for y in range(h):
        for x in range(w):
            if y == h - 1 and x == w - 1:
                continue
            if y == h - 1:
                out[y, x] = at(y, x) != at(y, x + 1)
            elif x == w - 1:
                out[y, x] = at(y, x) != at(y + 1, x)
            else:
                out[y, x] = any(at(y, x) != at(y + dy, x + dx) for dy, dx in ((0, 1), (1, 0), (1, 1)))
    return out


def _brute_f(pred, gt, radius):
    bp, bg = np.argwhere(_brute_boundary(pred)), np.argwhere(_brute_boundary(gt))
    if len(bp) == 0 or len(bg) == 0:
        return None
    d2 = ((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1)          # all pairwise squared distances
    p = np.mean(d2.min(1) <= radius ** 2)
    r = np.mean(d2.min(0) <= radius ** 2)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r), p, r


@pytest.mark.parametrize("bound_th, radius", [(T.DAVIS_BOUND_TH, 1), (2, 2), (3.5, 3.5), (0.05, 3)])
def test_f_matches_brute_force_on_random_masks(bound_th, radius):
    rng = np.random.default_rng(1)
    pred = _blobs(rng, 6, 31, 47, 0.35)
    gt = _blobs(rng, 6, 31, 47, 0.35)
    assert T.boundary_radius(gt.shape, bound_th) == radius      # diagonal 56.3: 0.008 → 1, 0.05 → ceil(2.8) = 3
    f, p, r = T.boundary_f_measure(pred, gt, bound_th, return_pr=True)
    for i in range(len(pred)):
        np.testing.assert_array_equal(T.boundary_map(gt[i]), _brute_boundary(gt[i]))
        ref = _brute_f(pred[i], gt[i], radius)
        assert (f[i], p[i], r[i]) == pytest.approx(ref, abs=1e-12)
    assert 0.1 < f.mean() < 0.99


# ---------------------------------------------------------------------------------------------- DAVIS sequence

def test_davis_statistics_recall_and_decay():
    # 9 frames: DAVIS bins split at round(linspace(0, 8, 5)) = 0, 2, 4, 6, 8 and include both edges:
    # first bin frames 0..2, last bin frames 6..8.
    x = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    s = T.davis_statistics(x)
    assert s["mean"] == pytest.approx(0.6)
    assert s["recall"] == pytest.approx(5 / 9)                   # > 0.5 strictly: 1.0 .. 0.6
    assert s["decay"] == pytest.approx(0.9 - 0.3)
    # 6 frames: linspace(0, 5, 5) = 0, 1.25, 2.5, 3.75, 5 → 0, 1, 3, 4, 5 (2.5 rounds up)
    y = np.array([1.0, 0.0, 0.0, 0.0, 0.5, 0.25])
    assert T.davis_statistics(y)["decay"] == pytest.approx(0.5 - (0.5 + 0.25) / 2)
    assert math.isnan(T.davis_statistics([])["mean"])


def test_davis_sequence_and_summary():
    gt = np.stack([_square((16, 16), 4, 4, 6)] * 3)
    pred = np.stack([gt[0], _square((16, 16), 4, 6, 6), _square((16, 16), 5, 5, 4)])
    out = T.davis_sequence_metrics(pred, gt)
    j = [1.0, 0.5, 4 / 9]
    f = [1.0, 7 / 12, 10 / 11]
    assert out["J_mean"] == pytest.approx(np.mean(j)) and out["F_mean"] == pytest.approx(np.mean(f))
    assert out["J&F"] == pytest.approx((np.mean(j) + np.mean(f)) / 2) and out["count"] == 3
    assert out["J_recall"] == pytest.approx(1 / 3) and out["F_recall"] == pytest.approx(1.0)
    # first/last dropped: only the middle frame
    mid = T.davis_sequence_metrics(pred, gt, skip_first_last=True)
    assert mid["J_mean"] == pytest.approx(0.5) and mid["count"] == 1

    # label maps: object 1 as above, object 2 never predicted (J = 0, F = 0 each frame)
    gt_l = gt.astype(np.int32)
    gt_l[:, 12:15, 12:15] = 2
    pred_l = pred.astype(np.int32)
    per_obj = T.davis_label_metrics(pred_l, gt_l)
    assert [o["object"] for o in per_obj] == [1, 2]
    assert per_obj[0]["J_mean"] == pytest.approx(np.mean(j)) and per_obj[1]["J_mean"] == 0.0
    summ = T.davis_summary(per_obj)
    assert summ["J_mean"] == pytest.approx(np.mean(j) / 2) and summ["F_mean"] == pytest.approx(np.mean(f) / 2)
    assert summ["J&F"] == pytest.approx((np.mean(j) + np.mean(f)) / 4) and summ["count"] == 2


# ---------------------------------------------------------------------------------------------- tracking

GT = np.array([[0.0, 0.0, 10.0, 10.0]] * 4)
PRED = np.array([
    [0.0, 0.0, 10.0, 10.0],     # IoU 1,        centre error 0,   normalised 0
    [5.0, 0.0, 15.0, 10.0],     # IoU 50/150,   centre error 5,   normalised 0.5
    [30.0, 0.0, 40.0, 10.0],    # IoU 0,        centre error 30,  normalised 3
    [0.0, 0.0, 10.0, 5.0],      # IoU 50/100,   centre error 2.5, normalised 0.25
])
# Success S(t) = #(IoU > t) / 4 over t = 0, 0.05, ..., 1 (strict):
#   t = 0 .. 0.30 (7 thresholds): IoU 1, 1/3, 0.5 → 3/4;   t = 0.35 .. 0.45 (3): 1, 0.5 → 2/4;
#   t = 0.50 .. 0.95 (10): only 1 (0.5 is not > 0.5) → 1/4;   t = 1: none.
AUC = (7 * 0.75 + 3 * 0.5 + 10 * 0.25 + 0.0) / 21               # 9.25 / 21 = 0.4405
# Normalised precision over d = 0, 0.01, ..., 0.5 (51): frame 1 passes all 51, frame 4 (0.25) the 26 from
# 0.25, frame 2 (0.5) only d = 0.5; frame 3 none → (51 + 26 + 1) / (4 · 51).
NORM_AUC = (51 + 26 + 1) / (4 * 51)


def test_tracking_metrics_by_hand():
    out = T.tracking_metrics(PRED, GT)
    assert out["auc"] == pytest.approx(AUC, abs=1e-12)
    assert out["precision@20"] == pytest.approx(0.75)            # errors 0, 5, 2.5 ≤ 20; 30 is not
    assert out["norm_precision@0.2"] == pytest.approx(0.25)      # only frame 1 ≤ 0.2
    assert out["norm_precision_auc"] == pytest.approx(NORM_AUC, abs=1e-12)
    assert out["ao"] == pytest.approx((1 + 1 / 3 + 0 + 0.5) / 4)
    assert out["count"] == 4
    np.testing.assert_allclose(out["success_curve"], [0.75] * 7 + [0.5] * 3 + [0.25] * 10 + [0.0])
    prec = out["precision_curve"]
    assert prec[0] == 0.25 and prec[2] == 0.25 and prec[3] == 0.5 and prec[5] == 0.75 and prec[29] == 0.75
    assert prec[30] == 1.0 and prec[50] == 1.0


def test_tracking_invalid_frames():
    # Frame 5: no ground truth (target absent, flagged), whatever the prediction.
    # Frame 6: ground truth, but the tracker reported nothing (pred flag off; the box is garbage).
    gt = np.concatenate([GT, [[0, 0, 0, 0], [0, 0, 10, 10]]])
    pred = np.concatenate([PRED, [[0, 0, 10, 10], [np.nan, 0, 0, 0]]])
    gt_valid = np.array([1, 1, 1, 1, 0, 1], bool)
    pred_valid = np.array([1, 1, 1, 1, 1, 0], bool)
    out = T.tracking_metrics(pred, gt, gt_valid, pred_valid)
    # excluded: frame 5 is dropped, frame 6 fails every threshold → 5 frames, the same passes as before
    assert out["count"] == 5
    assert out["auc"] == pytest.approx(AUC * 4 / 5, abs=1e-12)
    assert out["precision@20"] == pytest.approx(3 / 5) and out["norm_precision@0.2"] == pytest.approx(1 / 5)
    assert out["ao"] == pytest.approx((1 + 1 / 3 + 0.5) / 5)
    # counted as failures: 6 frames
    fail = T.tracking_metrics(pred, gt, gt_valid, pred_valid, invalid_gt="fail")
    assert fail["count"] == 6 and fail["auc"] == pytest.approx(AUC * 4 / 6, abs=1e-12)
    assert fail["precision@20"] == pytest.approx(3 / 6)
    assert fail["norm_precision_auc"] == pytest.approx(NORM_AUC * 4 / 6, abs=1e-12)
    # a zero-width GT box is invalid without a flag; an inverted predicted box is a missing prediction
    out2 = T.tracking_metrics(np.array([[0, 0, 10, 10], [10, 10, 0, 0]]), np.array([[5, 5, 5, 9], GT[0]]))
    assert out2["count"] == 1 and out2["auc"] == 0.0 and out2["precision@20"] == 0.0
    # nothing to score
    none = T.tracking_metrics(pred[4:5], gt[4:5], gt_valid[4:5])
    assert none["count"] == 0 and math.isnan(none["auc"])
    with pytest.raises(ValueError):
        T.tracking_metrics(PRED, GT, invalid_gt="ignore")
    with pytest.raises(ValueError):
        T.tracking_metrics(PRED[:3], GT)


def test_tracking_summary_weighs_sequences_equally():
    a = T.tracking_metrics(PRED, GT)                              # 4 frames, AUC 9.25/21
    b = T.tracking_metrics(GT[:1], GT[:1])                        # 1 perfect frame: 20 of 21 thresholds
    empty = T.tracking_metrics(GT[:1], GT[:1], gt_valid=[False])
    s = T.tracking_summary([a, b, empty])
    assert s["count"] == 2
    assert s["auc"] == pytest.approx((AUC + 20 / 21) / 2, abs=1e-12)
    assert s["precision@20"] == pytest.approx((0.75 + 1.0) / 2)
    np.testing.assert_allclose(s["success_curve"], (a["success_curve"] + b["success_curve"]) / 2)
    assert s["auc"] == pytest.approx(s["success_curve"].mean(), abs=1e-12)


def test_mask_boxes_and_a_track_record():
    """Pixel boxes of masks (max exclusive; an empty mask is missing), and one record's J&F / box metrics: a frame
    where the object is absent counts for J&F (empty prediction: 1) and is left out of the box metrics."""
    masks = np.zeros((3, 6, 8), bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4, 7] = True
    boxes, ok = T.mask_boxes(masks)
    np.testing.assert_array_equal(boxes, [[2, 1, 5, 3], [7, 4, 8, 5], [0, 0, 0, 0]])
    np.testing.assert_array_equal(ok, [True, True, False])
    gt = masks.copy()
    gt[1] = False                                      # frame 1: object absent, but predicted
    visible = np.array([True, False, False])           # frame 2: absent and empty prediction
    row = T.track_record_metrics(masks, gt, np.array([[2, 1, 5, 3], [0, 0, 0, 0], [0, 0, 0, 0]], float), visible)
    assert row["davis"]["J_mean"] == pytest.approx(2 / 3) and row["davis"]["count"] == 3
    assert row["tracking"]["count"] == 1 and row["tracking"]["precision@20"] == 1.0
    out = T.track_summary([row, dict(row, davis=None)])
    assert out["count"] == 2 and out["frames"] == 3 and out["j"] == pytest.approx(2 / 3)
    assert out["auc"] == pytest.approx(20 / 21)

"""Box / span geometry: hand-computed IoU / GIoU values, pairwise vs paired, degenerate inputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpo_jax.heads import box_ops as B


@pytest.mark.parametrize("a, b, iou, giou", [
    ((0., 2.), (1., 3.), 1 / 3, 1 / 3),                 # inter 1, union 3, enclosing 3
    ((0., 1.), (2., 3.), 0.0, -1 / 3),                  # disjoint: union 2, enclosing 3
    ((0., 4.), (1., 2.), 1 / 4, 1 / 4),                 # nested: inter 1, union 4 = enclosing
    ((0., 1.), (1., 2.), 0.0, 0.0),                     # touching: union 2 = enclosing
    ((0., 1.), (9., 10.), 0.0, 2 / 10 - 1),             # far apart: enclosing 10 → GIoU −0.8
    ((0.2, 0.7), (0.2, 0.7), 1.0, 1.0),
])
def test_span_iou_giou_hand_values(a, b, iou, giou):
    assert float(B.span_iou(jnp.array(a), jnp.array(b))) == pytest.approx(iou, abs=1e-6)
    assert float(B.span_giou(jnp.array(a), jnp.array(b))) == pytest.approx(giou, abs=1e-6)


@pytest.mark.parametrize("a, b, iou, giou", [
    ([0., 0., 2., 2.], [1., 1., 3., 3.], 1 / 7, 1 / 7 - 2 / 9),     # inter 1, union 7, enclosing 9
    ([0., 0., 1., 1.], [0., 0., 1., 1.], 1.0, 1.0),
    ([0., 0., 1., 1.], [2., 0., 3., 1.], 0.0, -1 / 3),               # disjoint: union 2, enclosing 3
    ([0., 0., 4., 2.], [1., 0., 3., 1.], 2 / 8, 2 / 8),              # nested: inter 2, union 8 = enclosing
    ([0., 0., 1., 1.], [1., 1., 2., 2.], 0.0, -2 / 4),               # corner touch: union 2, enclosing 4
])
def test_box_iou_giou_hand_values(a, b, iou, giou):
    assert float(B.box_iou(jnp.array(a), jnp.array(b))) == pytest.approx(iou, abs=1e-6)
    assert float(B.box_giou(jnp.array(a), jnp.array(b))) == pytest.approx(giou, abs=1e-6)


def test_box_area():
    np.testing.assert_allclose(B.box_area(jnp.array([[0., 0., 2., 3.], [1., 1., 0., 4.]])), [6.0, 0.0])


def _random_boxes(rng, n):
    xy = rng.uniform(0, 1, size=(n, 2)); wh = rng.uniform(0.01, 0.5, size=(n, 2))
    return jnp.asarray(np.concatenate([xy, xy + wh], -1), jnp.float32)


def _nested(fn):
    """The explicit double loop over (i, j) as a nested vmap of the paired function."""
    return jax.vmap(jax.vmap(fn, in_axes=(None, 0)), in_axes=(0, None))


@jax.jit
def _pairwise_and_loops(a, b, sa, sb):
    return (B.pairwise_box_giou(a, b), _nested(B.box_giou)(a, b), B.pairwise_box_iou(a, b), _nested(B.box_iou)(a, b),
            B.pairwise_span_giou(sa, sb), _nested(B.span_giou)(sa, sb), B.box_giou(a[1], b[4]),
            B.span_giou(sa[3], sb[0]), jnp.diag(B.pairwise_box_giou(a, a)))


def test_pairwise_matches_paired():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 5), _random_boxes(rng, 7)
    sa = B.span_cw_to_xx(jnp.asarray(rng.uniform(0.05, 0.5, size=(4, 2)), jnp.float32))
    sb = B.span_cw_to_xx(jnp.asarray(rng.uniform(0.05, 0.5, size=(6, 2)), jnp.float32))
    pw, loop, pw_iou, loop_iou, ps, loop_s, g14, s30, diag = _pairwise_and_loops(a, b, sa, sb)
    assert pw.shape == (5, 7) and ps.shape == (4, 6)
    np.testing.assert_allclose(pw, loop, atol=1e-7)
    np.testing.assert_allclose(pw_iou, loop_iou, atol=1e-7)
    np.testing.assert_allclose(ps, loop_s, atol=1e-7)
    np.testing.assert_allclose(pw[1, 4], g14, atol=1e-7)
    np.testing.assert_allclose(ps[3, 0], s30, atol=1e-7)
    # GIoU of identical elements is 1, values stay in [−1, 1]
    np.testing.assert_allclose(diag, 1.0, atol=1e-6)
    assert float(pw.min()) >= -1.0 and float(pw.max()) <= 1.0


def test_pairwise_l1_matches_cdist():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 2)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)
    ref = torch.cdist(torch.from_numpy(a), torch.from_numpy(b), p=1).numpy()
    np.testing.assert_allclose(B.pairwise_l1(a, b), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(B.pairwise_l1(a, b)[1, 2], np.abs(a[1] - b[2]).sum(), rtol=1e-6)


def test_span_cw_xx_round_trip():
    np.testing.assert_allclose(B.span_cw_to_xx(jnp.array([0.5, 0.2])), [0.4, 0.6], atol=1e-7)
    np.testing.assert_allclose(B.span_xx_to_cw(jnp.array([0.4, 0.6])), [0.5, 0.2], atol=1e-7)
    s = jnp.asarray(np.random.default_rng(2).uniform(0, 1, size=(3, 5, 2)), jnp.float32)
    np.testing.assert_allclose(B.span_xx_to_cw(B.span_cw_to_xx(s)), s, atol=1e-6)
    np.testing.assert_allclose(B.span_cw_to_xx(B.span_xx_to_cw(s)), s, atol=1e-6)


def test_matches_torchvision_style_reference():
    """Against a direct float64 transcription of DETR's generalized_box_iou on valid boxes."""
    rng = np.random.default_rng(3)
    a, b = np.asarray(_random_boxes(rng, 6), np.float64), np.asarray(_random_boxes(rng, 4), np.float64)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2]); rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None); inter = wh[..., 0] * wh[..., 1]
    union = area(a)[:, None] + area(b)[None] - inter
    lt = np.minimum(a[:, None, :2], b[None, :, :2]); rb = np.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None); enc = wh[..., 0] * wh[..., 1]
    ref = inter / union - (enc - union) / enc
    np.testing.assert_allclose(B.pairwise_box_giou(a.astype(np.float32), b.astype(np.float32)), ref, atol=1e-6)


DEGENERATE_BOXES = [
    ([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]),   # two identical points
    ([0.2, 0.2, 0.2, 0.6], [0.1, 0.1, 0.3, 0.3]),   # zero width
    ([0.6, 0.6, 0.2, 0.2], [0.1, 0.1, 0.3, 0.3]),   # x1 < x0, y1 < y0
    ([0.6, 0.6, 0.2, 0.2], [0.7, 0.7, 0.1, 0.1]),   # both inverted
    ([0.0, 0.0, 0.0, 0.0], [0.4, 0.4, 0.4, 0.9]),
]


@jax.jit
def _box_values_and_grads(a, b):
    out = []
    for fn in (B.box_iou, B.box_giou):
        out.append((fn(a, b),) + jax.grad(fn, argnums=(0, 1))(a, b))
    out.append(jax.grad(lambda x: (1.0 - B.pairwise_box_giou(x[None], b[None])).sum())(a))
    return out


@pytest.mark.parametrize("a, b", DEGENERATE_BOXES)
def test_degenerate_boxes_finite_values_and_grads(a, b):
    (iou, *g_iou), (giou, *g_giou), g_pw = _box_values_and_grads(jnp.array(a), jnp.array(b))
    for val in (iou, giou):
        assert np.isfinite(val) and -1.0 <= float(val) <= 1.0
    for g in (*g_iou, *g_giou, g_pw):
        assert np.isfinite(g).all()


@jax.jit
def _span_values_and_grads(a, b):
    val = B.span_giou(a, b)
    ga, gb = jax.grad(B.span_giou, argnums=(0, 1))(a, b)
    # through the (center, width) parametrisation with zero width, as in the CG-DETR loss
    cw = jnp.stack([jnp.array([0.5, 0.0]), b])
    gcw = jax.grad(lambda s: jnp.sum(1.0 - B.pairwise_span_giou(B.span_cw_to_xx(s), B.span_cw_to_xx(s))))(cw)
    return val, ga, gb, gcw


@pytest.mark.parametrize("a, b", [
    ([0.3, 0.3], [0.3, 0.3]),          # identical zero-length spans
    ([0.5, 0.2], [0.1, 0.4]),          # end < start
    ([0.5, 0.2], [0.6, 0.1]),          # both inverted
    ([0.0, 0.0], [0.2, 0.6]),
])
def test_degenerate_spans_finite_values_and_grads(a, b):
    val, *grads = _span_values_and_grads(jnp.array(a), jnp.array(b))
    assert np.isfinite(val) and -1.0 <= float(val) <= 1.0
    for g in grads:
        assert np.isfinite(g).all()


def test_jit_and_grad_valid_boxes():
    rng = np.random.default_rng(4)
    a, b = _random_boxes(rng, 8), _random_boxes(rng, 8)
    loss = jax.jit(lambda x: jnp.mean(1.0 - B.box_giou(x, b)))
    g = jax.grad(loss)(a)
    assert np.isfinite(g).all() and float(jnp.abs(g).sum()) > 0
    assert float(loss(b)) == pytest.approx(0.0, abs=1e-6)

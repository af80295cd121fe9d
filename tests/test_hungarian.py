"""In-graph Hungarian solver vs scipy.optimize.linear_sum_assignment (batched under jit + vmap)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from tpo_jax.heads.box_ops import pairwise_l1, pairwise_span_giou, span_cw_to_xx
from tpo_jax.heads.hungarian import linear_sum_assignment, match_targets, matched_query_mask

# jit caches one executable per input shape, so each (B, N, M) compiles once and is reused.
batched_lsa = jax.jit(jax.vmap(linear_sum_assignment))
jit_lsa = jax.jit(linear_sum_assignment)
batched_match = jax.jit(jax.vmap(match_targets))
batched_mask = jax.jit(jax.vmap(matched_query_mask, in_axes=(0, 0, None)), static_argnums=2)

SHAPES = [(10, 10), (10, 4), (4, 10), (1, 1), (10, 1)]
N_MATRICES = 200


def _check_valid(rows, cols, n, m):
    k = min(n, m)
    assert rows.shape == (k,) and cols.shape == (k,)
    assert rows.dtype == np.int32 and cols.dtype == np.int32
    assert np.all(np.diff(rows) > 0), "row_ind must be strictly ascending"
    assert len(set(cols.tolist())) == k, "columns must be distinct"
    assert rows.min() >= 0 and rows.max() < n and cols.min() >= 0 and cols.max() < m
    if n <= m:
        np.testing.assert_array_equal(rows, np.arange(n))
    else:
        np.testing.assert_array_equal(np.sort(cols), np.arange(m))


def _compare(costs, exact_assignment):
    rows, cols = map(np.asarray, batched_lsa(jnp.asarray(costs)))
    n, m = costs.shape[1:]
    for c, r, k in zip(costs, rows, cols):
        _check_valid(r, k, n, m)
        sr, sc = scipy_lsa(c.astype(np.float64))
        best = c.astype(np.float64)[sr, sc].sum()
        got = c.astype(np.float64)[r, k].sum()
        assert got == pytest.approx(best, rel=1e-5, abs=1e-5 * max(1.0, float(np.abs(c).max())))
        if exact_assignment:
            np.testing.assert_array_equal(r, sr)
            np.testing.assert_array_equal(k, sc)


@pytest.mark.parametrize("shape", SHAPES)
def test_continuous_costs_match_scipy_exactly(shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    costs = rng.normal(size=(N_MATRICES,) + shape).astype(np.float32) * rng.choice([0.1, 1.0, 100.0])
    _compare(costs, exact_assignment=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_tied_costs_reach_scipy_optimum(shape):
    rng = np.random.default_rng(1 + shape[0] * 100 + shape[1])
    n, m = shape
    ints = rng.integers(0, 4, size=(N_MATRICES,) + shape).astype(np.float32)
    # a quarter with duplicated rows, a quarter with duplicated columns, a few all-equal, some large offsets
    q = N_MATRICES // 4
    if n > 1:
        ints[:q, 1:] = ints[:q, :1]
        ints[:q, n // 2:] = ints[:q, : n - n // 2]
    if m > 1:
        ints[q:2 * q, :, 1::2] = ints[q:2 * q, :, :1]
    ints[2 * q:2 * q + 10] = 2.0
    ints[2 * q + 10:3 * q] = ints[2 * q + 10:3 * q] * 1000.0 + 1.0e5     # large magnitudes, still ties
    _compare(ints, exact_assignment=False)


def test_jit_single_and_deterministic():
    rng = np.random.default_rng(7)
    c = jnp.asarray(rng.integers(0, 3, size=(6, 9)).astype(np.float32))
    r1, c1 = jit_lsa(c)
    r2, c2 = jit_lsa(c)
    r3, c3 = batched_lsa(c[None])               # unbatched and vmapped agree
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(c1, c3[0])
    np.testing.assert_array_equal(r1, r3[0])


def test_integer_and_infinite_inputs():
    # integer dtype is accepted; +inf marks forbidden pairs (scipy semantics when a finite solution exists)
    c = np.array([[4, 1, 3], [2, 0, 5], [3, 2, 2]], np.int32)
    r, k = jit_lsa(c)
    sr, sc = scipy_lsa(c)
    assert c[np.asarray(r), np.asarray(k)].sum() == c[sr, sc].sum()
    ci = np.array([[np.inf, 1.0, 3.0], [2.0, np.inf, 5.0], [3.0, 2.0, np.inf]], np.float32)
    r, k = map(np.asarray, jit_lsa(ci))
    sr, sc = scipy_lsa(ci)
    assert np.isfinite(ci[r, k]).all() and ci[r, k].sum() == ci[sr, sc].sum()
    r, k = jit_lsa(np.full((3, 2), np.nan, np.float32))    # garbage in: still a valid matching
    _check_valid(np.asarray(r), np.asarray(k), 3, 2)


def test_empty():
    r, k = linear_sum_assignment(jnp.zeros((0, 5)))
    assert r.shape == (0,) and k.shape == (0,)
    assert match_targets(jnp.zeros((5, 0))).shape == (0,)


def test_match_targets_padded_targets_do_not_influence_valid():
    rng = np.random.default_rng(3)
    b, q, g = 60, 10, 4
    costs = rng.normal(size=(b, q, g)).astype(np.float32)
    n_valid = rng.integers(0, g + 1, size=b)
    valid = np.arange(g)[None, :] < n_valid[:, None]
    costs[~np.broadcast_to(valid[:, None, :], costs.shape)] = -1e3     # tempting garbage in padded columns
    costs[0, :, ~valid[0]] = np.nan
    qidx = np.asarray(batched_match(jnp.asarray(costs), jnp.asarray(valid)))
    for c, qi, nv in zip(costs, qidx, n_valid):
        assert len(set(qi.tolist())) == g and qi.min() >= 0 and qi.max() < q
        if nv == 0:
            continue
        sr, sc = scipy_lsa(c[:, :nv].astype(np.float64))        # queries sr[i] -> targets sc[i]
        ref = np.empty(nv, np.int64)
        ref[sc] = sr
        np.testing.assert_array_equal(qi[:nv], ref)
    mask = np.asarray(batched_mask(jnp.asarray(qidx), jnp.asarray(valid), q))
    for mk, qi, v in zip(mask, qidx, valid):
        expect = np.zeros(q, bool)
        expect[qi[v]] = True
        np.testing.assert_array_equal(mk, expect)
    assert mask.sum() == n_valid.sum()


def test_match_targets_without_mask_and_ties():
    rng = np.random.default_rng(4)
    costs = rng.integers(0, 3, size=(50, 10, 3)).astype(np.float32)
    qidx = np.asarray(batched_match(jnp.asarray(costs), jnp.ones((50, 3), bool)))
    qidx2 = np.asarray(jax.jit(jax.vmap(lambda c: match_targets(c)))(jnp.asarray(costs)))
    np.testing.assert_array_equal(qidx, qidx2)
    for c, qi in zip(costs, qidx):
        assert len(set(qi.tolist())) == 3
        sr, sc = scipy_lsa(c)
        assert c[qi, np.arange(3)].sum() == c[sr, sc].sum()
    np.testing.assert_array_equal(matched_query_mask(jnp.array([2, 0]), None, 4), [True, False, True, False])


def test_usable_inside_grad():
    """A matched-cost loss differentiates w.r.t. the cost (the assignment itself is treated as constant)."""
    def loss(c):
        qi = match_targets(c)
        return c[qi, jnp.arange(c.shape[1])].sum()

    c = jnp.array([[4.0, 1.0], [2.0, 0.5], [3.0, 2.0]])
    g = np.asarray(jax.jit(jax.grad(loss))(c))
    np.testing.assert_array_equal(g, [[0, 1], [1, 0], [0, 0]])


def test_more_targets_than_queries_raises():
    with pytest.raises(ValueError, match="5 targets cannot be matched to 3 queries"):
        match_targets(jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="5 targets cannot be matched to 3 queries"):
        jax.jit(match_targets)(jnp.zeros((3, 5)))


def _detr_cost(pred_spans, pred_logits, tgt_spans):
    """MODEL-SPEC §6.5: C = 10·L1(cw) − GIoU_1D(xx) − 4·softmax(logits)[:, 0]."""
    prob_fg = jax.nn.softmax(pred_logits, axis=-1)[:, 0]
    return (10.0 * pairwise_l1(pred_spans, tgt_spans)
            - pairwise_span_giou(span_cw_to_xx(pred_spans), span_cw_to_xx(tgt_spans))
            - 4.0 * prob_fg[:, None])


def test_realistic_detr_span_matching():
    rng = np.random.default_rng(5)
    b, q, g = 40, 10, 4
    c = rng.uniform(0.05, 0.95, size=(b, q, 1)); w = rng.uniform(0.02, 0.6, size=(b, q, 1))
    pred = jnp.asarray(np.concatenate([c, w], -1), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(b, q, 2)), jnp.float32)
    tc = rng.uniform(0.1, 0.9, size=(b, g, 1)); tw = rng.uniform(0.05, 0.5, size=(b, g, 1))
    tgt = jnp.asarray(np.concatenate([tc, tw], -1), jnp.float32)
    n_valid = rng.integers(1, g + 1, size=b)
    valid = np.arange(g)[None, :] < n_valid[:, None]

    @jax.jit
    def match(pred, logits, tgt, valid):
        return jax.vmap(lambda p, l, t, v: match_targets(_detr_cost(p, l, t), v))(pred, logits, tgt, valid)

    qidx = np.asarray(match(pred, logits, tgt, jnp.asarray(valid)))
    costs = np.asarray(jax.vmap(_detr_cost)(pred, logits, tgt))
    for cst, qi, nv in zip(costs, qidx, n_valid):
        sr, sc = scipy_lsa(cst[:, :nv].astype(np.float64))
        ref = np.empty(nv, np.int64)
        ref[sc] = sr
        np.testing.assert_array_equal(qi[:nv], ref)

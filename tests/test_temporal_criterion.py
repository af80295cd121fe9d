"""The CG-DETR criterion (tpo_jax.heads.temporal.loss / batch) against an independent float64 NumPy evaluation of
MODEL-SPEC §6.5–§6.7 written as the reference reduces its batch (one criterion batch: every mean over the whole
batch, the negative pairs by rolling the batch by one, the moment–sentence contrast over all rows), on random
head outputs for a batch of 3 with 1, 2 and 3 target spans; the row pairing within groups; and exact gradient
accumulation of the train step with unequal target counts and negative pairs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.optimize import linear_sum_assignment

from tpo_jax import config as C
from tpo_jax.config import TemporalHeadConfig
from tpo_jax.heads.temporal import batch as TBa, loss as TL

from test_temporal_head import cw_to_xx as xx, np_giou_1d as giou_1d  # 1-D GIoU, (center, width) → (start, end)

CFG = TemporalHeadConfig(hidden_dim=16, num_queries=5, num_dummies=4, total_prompts=3, max_spans=3)
B, Q, LV, LT, D = 3, 5, 7, 4, 16  # LT: text length after inserting the prompt
K = CFG.num_dummies + LT


# ------------------------------------------------------------------------------------------ random head outputs

def random_case(seed=0):
    r = np.random.default_rng(seed)
    f = np.float32

    def layer():
        return {"pred_logits": r.normal(size=(B, Q, 2)).astype(f),
                "pred_spans": r.uniform(0.1, 0.9, size=(B, Q, 2)).astype(f)}

    M = np.ones((B, LV), f)
    M[1, 5:] = 0.0
    y = r.integers(0, 13, size=(B, LV)).astype(f)  # 0-12 scale
    y[:, 0], y[2, 1], y[2, 2] = 0.0, 0.5, 12.0  # a non-moment clip per row, a fractional and a top label
    y[1, 5:] = 0.0  # padded clips
    A = jax.nn.softmax(r.normal(size=(B, LV, K)) * 2, axis=-1)
    out = dict(layer(), aux_outputs=[layer(), layer()], video_mask=M,
               saliency_scores=r.normal(size=(B, LV)).astype(f), saliency_scores_neg=r.normal(size=(B, LV)).astype(f),
               t2v_attn_values=r.uniform(0.02, 0.98, size=(B, LV)).astype(f),
               t2vattnvalues_neg=r.uniform(0.02, 0.98, size=(B, LV)).astype(f),
               cate_attn_weights=np.asarray(A, f), dummy_tokens=r.normal(size=(B, CFG.num_dummies, D)).astype(f),
               global_rep_tokens=r.normal(size=(CFG.total_prompts, D)).astype(f),
               memory_moment=(r.normal(size=(B, D)) / 2).astype(f), nmmemory_moment=r.normal(size=(B, D)).astype(f),
               sentence_txt=r.normal(size=(B, D)).astype(f), sentence_dummy=r.normal(size=(B, D)).astype(f),
               moment_frames=(r.normal(size=(B, LV, D)) / 2).astype(f),
               nonmoment_frames=(r.normal(size=(B, LV, D)) / 2).astype(f),
               moment2txt_similarity=(r.normal(size=(B, LV, K)) * 2).astype(f), moment_mask=y > 0)
    spans = r.uniform(0.1, 0.5, size=(B, 3, 2)).astype(f)
    valid = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], bool)  # 1, 2 and 3 target spans
    pos = np.array([[2, 3], [1, 4], [2, 3]])
    neg = np.array([[0, 0], [0, 6], [0, 0]])  # row 1: clip 6 is padding (the reference reads it anyway)
    tgt = dict(spans=spans, span_valid=valid, saliency_labels=y, saliency_pos=pos, saliency_neg=neg, vid_mask=M)
    return out, tgt


# ------------------------------------------------------------------------------------------ NumPy reference

def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_set_losses(logits, spans, tgt, valid):
    """§6.5 matching per sample (scipy), then §6.7 span / giou (means over all matched pairs of the batch) and
    label (plain mean of the class-weighted CE over B×Q)."""
    l1, gi, ce = [], [], []
    for b in range(B):
        cols = np.flatnonzero(valid[b])
        p = softmax(logits[b])
        cost = np.array([[10 * np.abs(spans[b, q] - tgt[b, g]).sum() - giou_1d(xx(spans[b, q]), xx(tgt[b, g]))
                          - 4 * p[q, 0] for g in cols] for q in range(Q)])
        rows, cc = linear_sum_assignment(cost)
        fg = np.zeros(Q, bool)
        for q, c in zip(rows, cc):
            g = cols[c]
            l1.append(np.abs(spans[b, q] - tgt[b, g]))
            gi.append(1 - giou_1d(xx(spans[b, q]), xx(tgt[b, g])))
            fg[q] = True
        logp = np.log(p)
        ce.extend(np.where(fg, -logp[:, 0], -0.1 * logp[:, 1]))
    return np.mean(l1), np.mean(gi), np.mean(ce)


def np_rc(scores, labels, mask):
    """RC over a batch (rows × clips): Σ_r mean_rows(−mean_pos · rows_with_pos) / 12, levels without a positive
    anywhere skipped."""
    s = mask * scores + (1 - mask) * -1000.0
    total = 0.0
    for r in range(1, 12):
        pos = labels >= r
        if pos.sum() == 0:
            continue
        logits = s / 0.5
        logits = logits - logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True) + 1e-6)
        mean_pos = (pos * logp * mask).sum(1) / (pos.sum(1) + 1e-6)
        total += np.mean(-mean_pos * pos.any(1))
    return total / 12


def np_mg(scores, pos, neg, m=0.2):
    rows = np.arange(len(scores))[:, None]
    return np.maximum(m + scores[rows, neg] - scores[rows, pos], 0).sum() / pos.size * 2


def np_bce(p, y):
    return -(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log(1 - p), -100))


def np_saliency(o, t, vid):
    """§6.7 loss_saliency of one batch: the B > 1 path with negatives (rows whose vid differs from the next
    row's, the roll wrapping around) or, without any, the B = 1 formula over the batch."""
    S, A = o["saliency_scores"].astype(np.float64), o["t2v_attn_values"].astype(np.float64)
    y, M = t["saliency_labels"].astype(np.float64), t["vid_mask"].astype(np.float64)
    pos, neg = t["saliency_pos"], t["saliency_neg"]
    R = np.zeros(B, bool) if vid is None else vid != np.roll(vid, -1)
    if not R.any():
        return (np_mg(S, pos, neg) + np_rc(S, y, M)
                + (np_rc(A, y, M) + np_bce(A, np.clip(y, 0, 1)).mean() + np_mg(A, pos, neg)))
    Sn, An = o["saliency_scores_neg"][R].astype(np.float64), o["t2vattnvalues_neg"][R].astype(np.float64)
    y2, M2 = np.concatenate([y[R], 0 * y[R]], 1), np.concatenate([M[R], M[R]], 1)
    loss = np_mg(S, pos, neg) + np_rc(np.concatenate([S[R], Sn], 1), y2, M2)
    loss += (-np.log(1 - sigmoid(Sn)) * M[R]).sum(1).mean()
    if (~R).any():
        loss += np_rc(S[~R], y[~R], M[~R])
    attn = np_rc(np.concatenate([A[R], An], 1), y2, M2) + np_bce(A, np.clip(y, 0, 1)).mean() + np_mg(A, pos, neg)
    attn += (-np.log(1 - An) * M[R]).sum(1).mean()  # the non-R attention RC is dropped (wrong accumulator)
    return loss + attn


def normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_ms_align(o, t):
    m, n = normalize(o["memory_moment"].astype(np.float64)), normalize(o["nmmemory_moment"].astype(np.float64))
    s, d = normalize(o["sentence_txt"].astype(np.float64)), normalize(o["sentence_dummy"].astype(np.float64))

    def ce(logits, target):
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -np.mean(logp[np.arange(B), target])

    loss = ce(np.concatenate([m @ s.T, n @ s.T], 1), np.arange(B))
    dummy_target = np.argmax(np.concatenate([~np.eye(B, dtype=bool), np.ones((B, B), bool)], 1), axis=1)
    loss += ce(np.concatenate([m @ d.T, n @ d.T], 1), dummy_target)
    mm = o["moment_mask"]
    f = np.where(mm[..., None], o["moment_frames"], o["nonmoment_frames"]).astype(np.float64)
    logit = np.einsum("bd,bld->bl", o["memory_moment"].astype(np.float64), f)
    bce = np_bce(sigmoid(logit), np.clip(t["saliency_labels"].astype(np.float64), 0, 1)) * t["vid_mask"]
    return loss + bce.mean()


def np_distill(o):
    p = softmax(o["moment2txt_similarity"].astype(np.float64))
    kl = (p * (np.log(p) - np.log(o["cate_attn_weights"].astype(np.float64) + 1e-6))).mean(-1)
    mm = o["moment_mask"].astype(np.float64)
    return (kl * mm).sum() / mm.sum()


def np_orthogonal(o):
    def offdiag(x):
        xn = normalize(x.astype(np.float64))
        sim = np.einsum("...id,...jd->...ij", xn, xn)
        sim = sim * (1 - np.eye(x.shape[-2]))
        return np.abs(sim).mean()
    return offdiag(o["dummy_tokens"]) + offdiag(o["global_rep_tokens"])


def np_criterion(o, t, vid=None):
    out = {}
    for suffix, layer in [("", o)] + [(f"_{i}", a) for i, a in enumerate(o["aux_outputs"])]:
        out[f"loss_span{suffix}"], out[f"loss_giou{suffix}"], out[f"loss_label{suffix}"] = np_set_losses(
            layer["pred_logits"].astype(np.float64), layer["pred_spans"].astype(np.float64),
            t["spans"].astype(np.float64), t["span_valid"])
    out["loss_saliency"] = np_saliency(o, t, vid)
    out["loss_ms_align"], out["loss_distill"], out["loss_orthogonal_dummy"] = np_ms_align(o, t), np_distill(o), \
        np_orthogonal(o)
    w = {"loss_span": 10, "loss_giou": 1, "loss_label": 4, "loss_saliency": 4, "loss_ms_align": 1, "loss_distill": 1,
         "loss_orthogonal_dummy": 1}
    out["loss_temporal"] = 0.05 * sum(w[k.rstrip("_01")] * v for k, v in out.items())
    return out


# ------------------------------------------------------------------------------------------ tests

criterion = jax.jit(lambda o, t: TL.temporal_criterion(o, t, CFG))


@pytest.mark.parametrize("vid", [np.array([10, 20, 20]), np.array([10, 20, 30]), None, np.array([7, 7, 7])],
                         ids=["some_negatives", "all_negatives", "no_vid", "one_video"])
def test_every_term_matches_the_float64_spec_evaluation(vid):
    out, tgt = random_case(0)
    if vid is None:
        out = {k: v for k, v in out.items() if not k.endswith("_neg")}
    else:
        tgt = dict(tgt, vid=vid.astype(np.int32))
    got = {k: float(v) for k, v in criterion(out, tgt).items()}
    want = np_criterion(out, tgt, vid)
    assert want.keys() <= got.keys()
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    has_neg = vid is not None and (vid != np.roll(vid, -1)).any()
    assert (got["saliency_neg_pair"] > 0) == has_neg and (got["saliency_attn_rank"] > 0) == (not has_neg)


def test_terms_are_independent_of_the_batch_order_split():
    """Per-row sums normalised by whole-batch counts: two halves of a batch, each divided by the full batch's
    counts, add up to the whole batch's criterion (the grouping keeps each pair inside one half)."""
    out, tgt = random_case(1)
    cfg = dataclasses.replace(CFG, criterion_group=1)  # lone rows: no pairs, no cross-row contrast
    tgt = dict(tgt, vid=np.array([1, 2, 3], np.int32))
    out = dict(out, saliency_scores_neg=out["saliency_scores"])
    terms = jax.jit(lambda o, t: TL.temporal_loss_terms(o, t, cfg))(out, tgt)
    rows = np.ones(B, bool)
    counts = dict(TBa.temporal_counts(rows, tgt, cfg), temporal=jnp.float32(B))
    whole = TL.normalise_terms(terms, rows, counts)
    parts = [TL.normalise_terms(terms, np.arange(B) == i, counts) for i in range(B)]
    for k, v in whole.items():
        np.testing.assert_allclose(sum(float(p[k]) for p in parts), float(v), rtol=1e-5, atol=1e-7, err_msg=k)


def test_negative_pairs_inside_groups():
    rows = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
    vid = np.array([5, 6, 0, 6, 9, 9, 0, 9], np.int32)
    p = jax.jit(TBa.negative_pairs, static_argnums=2)(rows, vid, 4)
    # group 0: rows 0, 1, 3 → partners 1, 3, 0 (row 1 → 3 share video 6); group 1: rows 4, 5, 7 (all video 9)
    np.testing.assert_array_equal(p["partner"], [1, 3, 2, 0, 5, 7, 6, 4])
    np.testing.assert_array_equal(p["neg"], [1, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(p["plain_attn"], [0, 0, 0, 0, 1, 1, 0, 1])
    lone = jax.jit(TBa.negative_pairs, static_argnums=2)(rows, vid, 1)
    np.testing.assert_array_equal(lone["partner"], np.arange(8))
    assert not np.any(lone["neg"])
    counts = TBa.temporal_counts(jnp.asarray(rows), {"vid": vid, "span_valid": np.ones((8, 2), bool),
                                                     "saliency_labels": np.eye(8, 3) * 12},
                                 dataclasses.replace(CFG, criterion_group=4))
    assert {k: float(v) for k, v in counts.items()} == {
        "temporal_spans": 12.0, "temporal_neg": 2.0, "temporal_plain": 4.0, "temporal_plain_attn": 3.0,
        "temporal_moment_clips": 2.0}


@pytest.mark.slow
def test_grad_accumulation_with_negatives_and_unequal_targets():
    from tpo_jax.data.synthetic import synthetic_batch
    from tpo_jax.model import TPOModel
    from tpo_jax.train.stages import get_recipe
    from tpo_jax.train.step import TrainConfig, make_grad_fn, split_model

    cfg = C.replace(C.get_config("tiny"), **{"heads.temporal.criterion_group": 2})  # divides the micro-batch of 2
    batch = synthetic_batch(cfg, 8, seed=3, tasks=("temporal", "temporal", "region", "temporal"))
    batch["span_valid"][[0, 4], 1] = True  # two target spans in rows 0 and 4, one elsewhere
    batch["spans"][[0, 4], 1] = [[0.7, 0.2], [0.2, 0.3]]
    batch["saliency_labels"] *= 3.0  # 0-12 scale
    batch["vid"] = np.array([1, 2, 3, 3, 4, 4, 5, 6], np.int32)  # rows 4, 5 share a video: no negative
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    model = TPOModel(cfg, rngs=nnx.Rngs(0))
    out = {}
    for n in (1, 4):
        graphdef, params, frozen = split_model(model, get_recipe("stage3"))
        train_cfg = TrainConfig(stage="stage3", micro_batches=n, dropout=False)
        out[n] = jax.jit(make_grad_fn(graphdef, cfg, train_cfg))(params, frozen, batch, jax.random.key(0))
    (m1, g1), (m4, g4) = out[1], out[4]
    assert float(m1["count/temporal"]) == 6 and float(m1["count/temporal_spans"]) == 8
    assert float(m1["count/temporal_neg"]) == 2  # rows 0 → 1 and 1 → 0; rows 4 ↔ 5 share a video
    for key in [k for k in m1 if k.startswith(("loss/", "temporal/"))]:
        np.testing.assert_allclose(float(m4[key]), float(m1[key]), rtol=1e-5, atol=1e-7, err_msg=key)
    assert float(m1["temporal/saliency_neg_pair"]) > 0 and float(m1["temporal/loss_ms_align"]) > 0
    f1 = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(g1)[0]}
    f4 = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(g4)[0]}
    top = max(np.abs(v).max() for v in f1.values())
    worst = max(np.abs(f4[k] - f1[k]).max() / max(np.abs(f1[k]).max(), 1e-2 * top) for k in f1)
    assert worst <= 1e-5, worst

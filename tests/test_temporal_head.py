"""CG-DETR temporal head (tpo_jax.heads.temporal: model, blocks, loss, postprocess): losses vs hand / NumPy /
scipy values, structural properties of the forward, a full-forward parity check against an independent per-sample
PyTorch re-derivation of MODEL-SPEC §6.3 that reads the weights under their checkpoint (`cg_model.*`) names, and
those names checked against the released checkpoint index shipped in tpo_jax/assets/videochat_tpo/."""

from __future__ import annotations

import importlib.resources
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpo_jax.config import TemporalHeadConfig
from tpo_jax.heads.temporal import blocks as TB, loss as TL, model as TM, postprocess as TP

CFG = TemporalHeadConfig(hidden_dim=32, num_heads=4, ffn_dim=64, num_queries=4, num_dummies=5, total_prompts=4,
                         txt_dim=24, vid_dim=10, max_spans=2)
PROMPT_DIM = 24
B, LT, LV = 2, 6, 8
# the released checkpoint index, shipped with the package (tpo_jax/assets/videochat_tpo/)
INDEX_JSON = importlib.resources.files("tpo_jax") / "assets" / "videochat_tpo" / "model.safetensors.index.json"


def _fast_compile_options():
    """XLA:CPU options that cut the compile time of these small graphs ~3x (no LLVM optimisation, no fusion
    emitters; numerics unchanged); falls back to the defaults if this XLA does not know them."""
    opts = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    try:
        jax.jit(lambda x: x + 1, compiler_options=opts)(jnp.zeros(2))
        return opts
    except Exception:  # pragma: no cover - option names are XLA-version specific
        return {}


FAST = _fast_compile_options()


def fast_jit(fn, **kw):
    return jax.jit(fn, compiler_options=FAST, **kw)


# ------------------------------------------------------------------------------------------ NumPy references

def np_rank_contrastive(scores, labels, mask):
    """RC for a single sample (B = 1), straight from MODEL-SPEC §6.7."""
    s = mask * scores + (1 - mask) * (-1000.0)
    total = 0.0
    for r in range(1, 12):
        pos = (labels >= r).astype(np.float64)
        if pos.sum() == 0:
            continue
        logits = s / 0.5
        logits = logits - logits.max()
        logp = logits - np.log(np.exp(logits).sum() + 1e-6)
        mean_pos = (pos * logp * mask).sum() / (pos.sum() + 1e-6)
        total += -mean_pos * float(pos.any())
    return total / 12


def np_margin(scores, pos, neg, m):
    return sum(max(m + scores[n] - scores[p], 0.0) for p, n in zip(pos, neg)) / (1 * len(pos)) * 2


def np_bce(p, y):
    return float(np.mean(-(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log(1 - p), -100))))


def np_saliency(S, A, y, pos, neg, M, m=0.2, w_wattn=1.0):
    return (np_margin(S, pos, neg, m) + np_rank_contrastive(S, y, M)
            + w_wattn * (np_rank_contrastive(A, y, M) + np_bce(A, np.clip(y, 0, 1)) + np_margin(A, pos, neg, m)))


def np_giou_1d(a, b):
    """a, b (start, end)."""
    inter = max(min(a[1], b[1]) - max(a[0], b[0]), 0.0)
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    enc = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union - (enc - union) / enc


def cw_to_xx(s):
    return np.array([s[0] - s[1] / 2, s[0] + s[1] / 2])


# ------------------------------------------------------------------------------------------------- losses

def test_margin_term_hand_value():
    s = jnp.array([0.4, 0.5, 0.3, 0.2])
    # pairs (pos 1, neg 0): 0.2 + 0.4 − 0.5 = 0.1; (pos 2, neg 3): 0.2 + 0.2 − 0.3 = 0.1 → 0.2 / 2 · 2 = 0.2
    mg = fast_jit(TL.margin_loss, static_argnums=3)
    got = mg(s, jnp.array([1, 2]), jnp.array([0, 3]), 0.2)
    np.testing.assert_allclose(got, 0.2, rtol=1e-6)
    # all pairs beyond the margin → 0
    assert float(mg(s, jnp.array([1, 1]), jnp.array([3, 2]), 0.05)) == 0.0


def test_rank_contrastive_and_bce_hand_values():
    # two valid clips, labels (1, 0), equal scores: only rank 1 has a positive;
    # logp(clip 0) = −log(2 + 1e-6), RC = log(2 + 1e-6) / (1 + 1e-6) / 12
    rc, bce = fast_jit(TL.rank_contrastive), fast_jit(TL.binary_cross_entropy)
    got = rc(jnp.zeros(2), jnp.array([1.0, 0.0]), jnp.ones(2))
    np.testing.assert_allclose(got, math.log(2 + 1e-6) / (1 + 1e-6) / 12, rtol=1e-6)
    # a padded clip gets score −1000 and drops out of the softmax; no positive at all → 0
    got = rc(jnp.array([0.0, 0.0, 5.0]), jnp.array([1.0, 0.0, 0.0]), jnp.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(got, math.log(2 + 1e-6) / (1 + 1e-6) / 12, rtol=1e-6)
    assert float(rc(jnp.array([1.0, 2.0]), jnp.zeros(2), jnp.ones(2))) == 0.0
    np.testing.assert_allclose(bce(jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0])), math.log(2), rtol=1e-6)
    # PyTorch clamps log at −100
    np.testing.assert_allclose(bce(jnp.array([0.5, 0.0]), jnp.array([0.0, 1.0])), (math.log(2) + 100) / 2, rtol=1e-6)


def test_saliency_loss_matches_numpy():
    rng = np.random.default_rng(0)
    b, lv = 3, 9
    S = rng.normal(size=(b, lv)).astype(np.float32)
    A = rng.uniform(0.01, 0.99, size=(b, lv)).astype(np.float32)
    y = rng.integers(0, 5, size=(b, lv)).astype(np.float32)
    y[2] = 0.0  # a sample with no positive at any rank
    M = np.ones((b, lv), np.float32)
    M[1, 6:] = 0.0
    pos = np.array([[0, 1], [2, 3], [4, 4]])
    neg = np.array([[5, 6], [0, 1], [2, 8]])
    outputs = {"saliency_scores": S, "t2v_attn_values": A, "video_mask": M}
    targets = {"saliency_labels": y, "saliency_pos": pos, "saliency_neg": neg, "vid_mask": M}
    pairs = {"neg": np.zeros(b, bool), "plain_attn": np.ones(b, bool)}  # no negatives: the B = 1 formula per row
    parts = fast_jit(lambda *a: TL.saliency_terms(*a, cfg=CFG))(outputs, targets, pairs)
    got = sum(parts[k] for k in TL.SALIENCY_TERMS) + CFG.w_wattn * sum(parts[k] for k in TL.SALIENCY_ATTN_TERMS)
    want = [np_saliency(S[i].astype(np.float64), A[i].astype(np.float64), y[i], pos[i], neg[i], M[i],
                        CFG.saliency_margin, CFG.w_wattn) for i in range(b)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_label_ce_with_eos_weight_hand_value():
    # 3 queries; query 0 predicts the target span exactly and is confidently foreground → matched
    logits = jnp.array([[[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    spans = jnp.array([[[0.5, 0.2], [0.1, 0.05], [0.9, 0.1]]])
    tgt = jnp.array([[[0.5, 0.2]]])
    cfg = TemporalHeadConfig(num_queries=3, max_spans=1)
    out = fast_jit(lambda *a: TL.set_losses(*a, cfg=cfg))(logits, spans, tgt, jnp.array([[True]]))
    assert int(out["query_index"][0, 0]) == 0
    # fg CE of q0: log(1 + e^-2); bg CE of q1: log(1 + e^-1) · 0.1; bg CE of q2: log 2 · 0.1; plain mean over 3
    want = (math.log(1 + math.exp(-2)) + 0.1 * math.log(1 + math.exp(-1)) + 0.1 * math.log(2)) / 3
    np.testing.assert_allclose(out["loss_label"][0], want, rtol=1e-6)
    np.testing.assert_allclose(out["loss_span"][0], 0.0, atol=1e-7)
    np.testing.assert_allclose(out["loss_giou"][0], 0.0, atol=1e-6)


def test_matching_and_span_losses_match_scipy():
    from scipy.optimize import linear_sum_assignment
    rng = np.random.default_rng(1)
    b, q, g = 4, 6, 3
    cfg = TemporalHeadConfig(num_queries=q, max_spans=g)
    logits = rng.normal(size=(b, q, 2)).astype(np.float32)
    spans = rng.uniform(0.05, 0.95, size=(b, q, 2)).astype(np.float32)
    tgt = rng.uniform(0.05, 0.6, size=(b, g, 2)).astype(np.float32)
    valid = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 0]], bool)  # last: no valid span
    out = fast_jit(lambda *a: TL.set_losses(*a, cfg=cfg))(logits, spans, tgt, valid)
    for i in range(b):
        cols = np.flatnonzero(valid[i])
        p = np.exp(logits[i]) / np.exp(logits[i]).sum(-1, keepdims=True)
        cost = np.zeros((q, len(cols)))
        for a in range(q):
            for c, j in enumerate(cols):
                cost[a, c] = (cfg.cost_span * np.abs(spans[i, a] - tgt[i, j]).sum()
                              - cfg.cost_giou * np_giou_1d(cw_to_xx(spans[i, a]), cw_to_xx(tgt[i, j]))
                              - cfg.cost_class * p[a, 0])
        rows, cc = linear_sum_assignment(cost)
        q_of_tgt = {cols[c]: r for r, c in zip(rows, cc)}
        for j in cols:
            assert int(out["query_index"][i, j]) == q_of_tgt[j]
        # per row: sums over the matched pairs (normalised by the batch's matched targets in the criterion)
        l1 = sum(np.abs(spans[i, q_of_tgt[j]] - tgt[i, j]).mean() for j in cols)
        giou = sum(1 - np_giou_1d(cw_to_xx(spans[i, q_of_tgt[j]]), cw_to_xx(tgt[i, j])) for j in cols)
        fg = np.zeros(q, bool)
        fg[[q_of_tgt[j] for j in cols]] = True
        logp = logits[i] - np.log(np.exp(logits[i]).sum(-1, keepdims=True))
        ce = np.where(fg, -logp[:, 0], -logp[:, 1] * cfg.eos_coef).mean()
        np.testing.assert_allclose(out["loss_span"][i], l1, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out["loss_giou"][i], giou, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["loss_label"][i], ce, rtol=1e-5)
    for k in ("loss_span", "loss_giou", "loss_label"):
        assert np.all(np.isfinite(out[k]))


def test_postprocess_spans():
    out = {"pred_logits": jnp.array([[[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]]),
           "pred_spans": jnp.array([[[0.5, 0.2], [0.05, 0.3], [0.9, 0.4]]])}
    pp = fast_jit(TP.postprocess_spans, static_argnames="clip_length")
    res = pp(out, 10.0)
    np.testing.assert_array_equal(res["order"][0], [1, 2, 0])
    np.testing.assert_allclose(res["windows"][0], [[0.0, 2.0], [7.0, 10.0], [4.0, 6.0]], atol=1e-5)
    assert np.all(np.diff(np.asarray(res["scores"][0])) <= 0)
    res = pp(out, jnp.array([3.0]), clip_length=1.0)
    # (0, 0.6) → (0, 1); (2.1, 3) → (2, 3); (1.2, 1.8) → (1, 2)
    np.testing.assert_allclose(res["windows"][0], [[0.0, 1.0], [2.0, 3.0], [1.0, 2.0]])


# ------------------------------------------------------------------------------------------ forward fixtures

def make_inputs(seed=0):
    r = np.random.default_rng(seed)
    txt = r.normal(size=(B, LT, CFG.txt_dim)).astype(np.float32)
    vid = r.normal(size=(B, LV, CFG.vid_dim)).astype(np.float32)
    prompt = r.normal(size=(B, PROMPT_DIM)).astype(np.float32)
    tm = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
    vm = np.array([[1] * 8, [1] * 5 + [0] * 3], np.float32)
    return dict(txt=txt, tm=tm, vid=vid, vm=vm, prompt=prompt)


TARGETS = dict(spans=np.array([[[0.3, 0.2], [0.7, 0.1]], [[0.4, 0.3], [0.0, 0.0]]], np.float32),
               span_valid=np.array([[1, 1], [1, 0]], bool),
               saliency_labels=np.array([[0, 1, 2, 3, 4, 0, 0, 1], [4, 4, 2, 0, 0, 0, 0, 0]], np.float32),
               saliency_pos=np.array([[3, 4], [0, 1]]), saliency_neg=np.array([[0, 5], [3, 4]]),
               vid=np.array([3, 5], np.int32))
NEG_PARTNER = np.array([1, 0], np.int32)  # negative_pairs of two criterion rows with different videos


def randomize(model, seed=0):
    """Give every parameter a generic, non-degenerate value (non-zero biases, LN scales ≠ 1, PReLU slopes ≠ 0.25,
    kernels with unit-gain fan-in scaling), so that no path of the forward is hidden by the initialisation."""
    r = np.random.default_rng(seed)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        shape, leaf = var.get_value().shape, path[-1]
        if leaf == "kernel":
            val = r.normal(size=shape) / np.sqrt(shape[0])
        elif leaf == "scale":
            val = 1.0 + 0.2 * r.normal(size=shape)
        elif leaf == "bias":
            val = 0.2 * r.normal(size=shape)
        elif leaf == "weight":  # PReLU slope
            val = r.uniform(0.1, 0.4, size=shape)
        else:  # tokens, positions, embeddings
            val = r.normal(size=shape)
        var.set_value(jnp.asarray(val, jnp.float32))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


@pytest.fixture(scope="module")
def head():
    """(model, step) with step(inputs) → (outputs with the training extras, per-row loss terms and the batch
    criterion under "batch/<term>", d loss_temporal / d prompt), one compile."""
    # every parameter is overwritten by `randomize`, so skip the (eager, slow) initialisers
    model = randomize(nnx.eval_shape(lambda: TM.CGDETR(CFG, PROMPT_DIM, rngs=nnx.Rngs(0))))
    graphdef, state = nnx.split(model)

    @fast_jit
    def _step(state, txt, tm, vid, vm, prompt):
        def loss_fn(p):
            out = nnx.merge(graphdef, state)(txt, tm, vid, vm, p, relevant_clips=TARGETS["saliency_labels"],
                                             neg_partner=NEG_PARTNER)
            targets = dict(TARGETS, vid_mask=vm)
            crit = TL.temporal_criterion(out, targets, CFG)
            terms = dict(TL.temporal_loss_terms(out, targets, CFG), **{f"batch/{k}": v for k, v in crit.items()})
            return crit["loss_temporal"], (out, terms)
        grad, (out, terms) = jax.grad(loss_fn, has_aux=True)(prompt)
        return out, terms, grad

    def step(inp):
        return _step(state, inp["txt"], inp["tm"], inp["vid"], inp["vm"], inp["prompt"])

    return model, step


@pytest.fixture(scope="module")
def base(head):
    inp = make_inputs()
    return inp, head[1](inp)


def _close(a, b, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


def test_forward_shapes_finite_losses_and_prompt_gradient(base):
    _, (out, terms, grad) = base
    q = CFG.num_queries
    assert out["pred_logits"].shape == (B, q, 2) and out["pred_spans"].shape == (B, q, 2)
    assert len(out["aux_outputs"]) == CFG.dec_layers - 1
    assert out["saliency_scores"].shape == (B, LV) and out["t2v_attn_values"].shape == (B, LV)
    assert out["cate_attn_weights"].shape == (B, LV, CFG.num_dummies + LT + 1)
    for v in jax.tree.leaves(out):
        assert np.all(np.isfinite(np.asarray(v)))
    spans = np.asarray(out["pred_spans"])
    assert np.all((spans > 0) & (spans < 1))
    # T2V attention rows sum to 1 over [dummies; text]; t2v values ∈ [0, 1]
    _close(np.asarray(out["cate_attn_weights"]).sum(-1), 1.0, atol=1e-5)
    assert np.all((np.asarray(out["t2v_attn_values"]) >= 0) & (np.asarray(out["t2v_attn_values"]) <= 1))
    per_row = {"loss_span", "loss_giou", "loss_label", "loss_ms_align", "loss_distill", "loss_orthogonal_dummy",
               *TL.SALIENCY_TERMS, *TL.SALIENCY_ATTN_TERMS}
    per_row |= {f"{k}_{i}" for k in ("loss_span", "loss_giou", "loss_label") for i in range(CFG.dec_layers - 1)}
    assert set(terms) == per_row | {f"batch/{k}" for k in per_row | {"loss_saliency", "loss_temporal"}}
    for k, v in terms.items():
        assert v.shape == (() if k.startswith("batch/") else (B,)) and np.all(np.isfinite(np.asarray(v))), k
    c = {k[len("batch/"):]: float(v) for k, v in terms.items() if k.startswith("batch/")}
    assert c["saliency_neg_pair"] > 0 and c["saliency_rank_neg"] > 0  # both rows have a negative partner
    weights = {"loss_span": 10, "loss_giou": 1, "loss_label": 4, "loss_ms_align": 1, "loss_distill": 1,
               "loss_orthogonal_dummy": 1}
    total = 4 * c["loss_saliency"] + sum(w * c[k] for k, w in weights.items())
    total += sum(w * c[f"{k}_{i}"] for k, w in (("loss_span", 10), ("loss_giou", 1), ("loss_label", 4))
                 for i in range(CFG.dec_layers - 1))
    np.testing.assert_allclose(c["loss_temporal"], 0.05 * total, rtol=1e-6)
    np.testing.assert_allclose(c["loss_saliency"], sum(c[k] for k in TL.SALIENCY_TERMS)
                               + sum(c[k] for k in TL.SALIENCY_ATTN_TERMS), rtol=1e-6)
    g = np.asarray(grad)
    assert np.all(np.isfinite(g)) and np.all(np.abs(g).sum(-1) > 0)


def test_negative_pass_is_the_forward_with_the_partners_query(head, base):
    inp, (out, _, _) = base
    swapped = dict(inp, **{k: inp[k][NEG_PARTNER] for k in ("txt", "tm", "prompt")})
    out2 = head[1](swapped)[0]
    _close(out["saliency_scores_neg"], out2["saliency_scores"], atol=1e-5)
    _close(out["t2vattnvalues_neg"], out2["t2v_attn_values"], atol=1e-5)
    assert np.abs(np.asarray(out["saliency_scores_neg"] - out["saliency_scores"])).max() > 1e-4


def test_moment_tokens_read_only_their_clips(head, base):
    inp, (out, _, _) = base
    y = TARGETS["saliency_labels"]
    np.testing.assert_array_equal(out["moment_mask"], y > 0)
    inp2 = dict(inp, vid=inp["vid"].copy())
    non = y[0] == 0  # sample 0's non-moment clips (new values: a constant shift would vanish in LN)
    inp2["vid"][0, non] = np.random.default_rng(5).normal(size=(non.sum(), CFG.vid_dim))
    out2 = head[1](inp2)[0]
    _close(out2["memory_moment"], out["memory_moment"], atol=1e-5)
    _close(out2["moment_frames"][0, y[0] > 0], out["moment_frames"][0, y[0] > 0], atol=1e-5)
    assert np.abs(np.asarray(out2["nmmemory_moment"][0] - out["nmmemory_moment"][0])).max() > 1e-4
    for k in ("sentence_txt", "sentence_dummy"):
        _close(out2[k], out[k], atol=1e-6)
    n = CFG.num_dummies + LT + 1
    assert out["moment2txt_similarity"].shape == (B, LV, n) and out["memory_moment"].shape == (B, CFG.hidden_dim)


def test_prompt_inserted_after_valid_text():
    txt = jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4, 1) + 1
    tm = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    out, mask = fast_jit(TM.insert_prompt)(txt, tm, jnp.array([[-1.0], [-2.0]]))
    np.testing.assert_array_equal(out[..., 0], [[1, 2, -1, 3, 4], [5, 6, 7, 8, -2]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def test_padded_text_is_ignored_and_prompt_matters(head, base):
    inp, (out, _, _) = base
    step = head[1]
    inp2 = dict(inp, txt=inp["txt"].copy())
    inp2["txt"][0, 3:] = 100.0  # sample 0's padded text tokens
    out2 = step(inp2)[0]
    for k in ("pred_logits", "pred_spans", "saliency_scores", "t2v_attn_values", "dummy_tokens"):
        _close(out2[k], out[k], atol=1e-5)
    _close(np.asarray(out2["txt_mask"]), [[1, 1, 1, 1, 0, 0, 0], [1] * 7])
    # changing the prompt of sample 0 changes its outputs
    inp3 = dict(inp, prompt=inp["prompt"].copy())
    inp3["prompt"][0] = np.random.default_rng(9).normal(size=PROMPT_DIM)  # (a constant shift would vanish in LN)
    out3 = step(inp3)[0]
    assert np.abs(np.asarray(out3["pred_spans"][0] - out["pred_spans"][0])).max() > 1e-5
    assert np.abs(np.asarray(out3["t2v_attn_values"][0] - out["t2v_attn_values"][0])).max() > 1e-5


def test_padded_video_values_do_not_matter(head, base):
    inp, (out, _, _) = base
    inp2 = dict(inp, vid=inp["vid"].copy())
    inp2["vid"][1, 5:] = 50.0  # sample 1's padded clips
    out2 = head[1](inp2)[0]
    for k in ("pred_logits", "pred_spans"):
        _close(out2[k], out[k], atol=1e-5)
    for k in ("saliency_scores", "t2v_attn_values"):
        _close(out2[k][:, :5], out[k][:, :5], atol=1e-5)


def test_samples_are_independent(head, base):
    inp, (out, _, _) = base
    r = np.random.default_rng(7)
    inp2 = {k: v.copy() for k, v in inp.items()}
    inp2["txt"][1] = r.normal(size=inp2["txt"][1].shape)
    inp2["vid"][1] = r.normal(size=inp2["vid"][1].shape)
    inp2["prompt"][1] = r.normal(size=inp2["prompt"][1].shape)
    inp2["tm"][1] = [1, 1, 0, 0, 0, 0]
    inp2["vm"][1] = [1, 1, 1, 0, 0, 0, 0, 0]
    out2 = head[1](inp2)[0]
    for k in ("pred_logits", "pred_spans", "saliency_scores", "t2v_attn_values", "cate_attn_weights"):
        _close(out2[k][0], out[k][0], atol=1e-6)
        assert np.abs(np.asarray(out2[k][1] - out[k][1])).max() > 1e-5
    for i in range(CFG.dec_layers - 1):
        _close(out2["aux_outputs"][i]["pred_spans"][0], out["aux_outputs"][i]["pred_spans"][0])


# ------------------------------------------------------------------------------------------- T2V layer

def _np_layer_norm(x, p, prefix):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p[prefix + ".scale"] + p[prefix + ".bias"]


def _np_params(module):
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(map(str, k)): np.asarray(v.get_value(), np.float64) for k, v in flat}


def _np_ffn_post(y, p):
    h = _np_layer_norm(y, p, "norm1") @ p["linear1.kernel"] + p["linear1.bias"]
    h = np.where(h >= 0, h, p["activation.weight"] * h)
    return _np_layer_norm(y + h @ p["linear2.kernel"] + p["linear2.bias"], p, "norm2")


def test_t2v_layer_dummies_take_mass_but_give_no_value():
    nd, d, h = CFG.num_dummies, CFG.hidden_dim, CFG.num_heads
    layer = randomize(TB.T2VEncoderLayer(CFG, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3)), 3)
    r = np.random.default_rng(3)
    x, pos = r.normal(size=(1, 4, d)), r.normal(size=(1, 4, d))
    keys, kpos = r.normal(size=(1, nd + 3, d)), r.normal(size=(1, nd + 3, d))
    valid = np.array([[1] * nd + [1, 1, 0]], bool)
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, pos, keys, kpos)]
    y, attn = fast_jit(lambda *a: layer(*a))(*f32, jnp.asarray(valid))
    p = _np_params(layer)
    hd = d // h
    q = (x[0] + pos[0]).reshape(4, h, hd) / math.sqrt(hd)
    k = (keys[0] + kpos[0]).reshape(-1, h, hd)
    v = keys[0].reshape(-1, h, hd)
    logits = np.einsum("lhd,shd->hls", q, k)
    logits[:, :, ~valid[0]] = -np.inf
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    ctx = np.einsum("hls,shd->lhd", prob[:, :, nd:], v[nd:]).reshape(4, d)  # only text keys carry values
    want = _np_ffn_post(x[0] + ctx @ p["self_attn.out_proj.kernel"] + p["self_attn.out_proj.bias"], p)
    _close(y[0], want, atol=1e-5)
    _close(attn[0], prob.mean(0), atol=1e-6)
    assert np.all(np.asarray(attn[0, :, :nd]).sum(-1) > 0.05)  # the dummies do take probability mass
    assert np.all(np.asarray(attn[0, :, -1]) == 0.0)  # the padded key takes none


def test_t2v_empty_key_pass_closed_form():
    d = CFG.hidden_dim
    layer = randomize(TB.T2VEncoderLayer(CFG, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(4)), 4)
    g = np.random.default_rng(4).normal(size=(2, 1, d)).astype(np.float32)
    p = _np_params(layer)
    want = _np_ffn_post(g.astype(np.float64) + p["self_attn.out_proj.bias"], p)
    _close(fast_jit(lambda a: layer.empty_keys(a))(jnp.asarray(g)), want, atol=1e-5)
    # the generic path with an empty key set gives the same (attention output = out_proj bias)
    empty = jnp.zeros((2, 0, d))
    y, _ = fast_jit(lambda *a: layer(*a))(jnp.asarray(g), jnp.zeros((2, 1, d)), empty, empty, jnp.zeros((2, 0), bool))
    _close(y, want, atol=1e-5)


def test_dropout_paths():
    x = jnp.ones((64, 3, 4))
    y = fast_jit(lambda a, k: TB.drop_path(a, 0.5, k))(x, jax.random.key(0))
    per_sample = np.asarray(y).reshape(64, -1)
    assert np.all((per_sample == 0).all(1) | (per_sample == 2).all(1))  # whole samples dropped / rescaled
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert TB.drop_path(x, 0.5, None) is x
    layer = TB.EncoderLayer(CFG, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(5))
    xs = jax.random.normal(jax.random.key(1), (2, 5, CFG.hidden_dim))
    valid, pos = jnp.ones((2, 5), bool), jnp.zeros((2, 5, CFG.hidden_dim))
    run = fast_jit(lambda *a: layer(*a))
    det = run(xs, valid, pos, None)
    sto = run(xs, valid, pos, jax.random.key(2))
    _close(run(xs, valid, pos, jax.random.key(2)), sto)  # same key, same draw
    assert np.all(np.isfinite(np.asarray(sto))) and np.abs(np.asarray(sto - det)).max() > 1e-3


# --------------------------------------------------------------------------------- checkpoint names / parity

DROPPED = ("txt_proj_linear.", "txt_position_embed.")


def checkpoint_state(model) -> dict[str, np.ndarray]:
    """The model's parameters under their released names (`cg_model.*`, PyTorch layouts), following the mapping
    in the tpo_jax.heads.temporal.model docstring."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    out, packed = {}, {}
    for path, var in flat:
        name = ".".join(map(str, path))
        val = np.asarray(var.get_value())
        name = re.sub(r"^(input_(?:txt|vid)_proj\.\d+)\.norm\.", r"\1.LayerNorm.", name)
        name = re.sub(r"^(input_(?:txt|vid)_proj\.\d+)\.linear\.", r"\1.net.1.", name)
        m = re.match(r"(.*\.self_attn)\.([qkv])_proj\.(kernel|bias)$", name)
        if m:
            packed.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = val.T if m.group(3) == "kernel" else val
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "kernel":
            name, val = name[:-len("kernel")] + "weight", val.T
        elif leaf in ("scale", "embedding"):
            name = name[:-len(leaf)] + "weight"
        out["cg_model." + name] = val
    for (prefix, kind), qkv in packed.items():
        suffix = "in_proj_weight" if kind == "kernel" else "in_proj_bias"
        out[f"cg_model.{prefix}.{suffix}"] = np.concatenate([qkv["q"], qkv["k"], qkv["v"]], axis=0)
    return out


def test_checkpoint_names_and_sizes():
    full = TemporalHeadConfig()  # released shapes
    model = nnx.eval_shape(lambda: TM.CGDETR(full, full.txt_dim, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    count = sum(int(np.prod(var.get_value().shape)) for _, var in flat)
    names = _names_from_paths([p for p, _ in flat])
    keys = {k for k in json.loads(INDEX_JSON.read_text())["weight_map"] if k.startswith("cg_model.")}
    kept = {k for k in keys if not k[len("cg_model."):].startswith(DROPPED)}
    assert names == kept
    # Appendix B: CG-DETR model = 13,953,835 values, of which the dropped unused tensors hold
    # 1,057,024 (txt_proj_linear) + 26,112 (txt pos); the training-only moment / sentence modules are kept.
    assert count == 13_953_835 - (1_057_024 + 26_112)


def _names_from_paths(paths):
    names = set()
    for path in paths:
        name = ".".join(map(str, path))
        name = re.sub(r"^(input_(?:txt|vid)_proj\.\d+)\.norm\.", r"\1.LayerNorm.", name)
        name = re.sub(r"^(input_(?:txt|vid)_proj\.\d+)\.linear\.", r"\1.net.1.", name)
        m = re.match(r"(.*\.self_attn)\.[qkv]_proj\.(kernel|bias)$", name)
        if m:
            names.add(f"cg_model.{m.group(1)}.in_proj_{'weight' if m.group(2) == 'kernel' else 'bias'}")
            continue
        name = re.sub(r"\.(kernel|scale|embedding)$", ".weight", name)
        names.add("cg_model." + name)
    return names


def torch_reference(sd, cfg, inp):
    """Independent per-sample PyTorch re-derivation of MODEL-SPEC §6.3 (inference), float64, reading the
    weights by checkpoint name. Returns per-sample lists of numpy arrays."""
    import torch
    import torch.nn.functional as F
    P = {k[len("cg_model."):]: torch.tensor(v, dtype=torch.float64) for k, v in sd.items()}
    d, H, nd = cfg.hidden_dim, cfg.num_heads, cfg.num_dummies
    hd = d // H

    def lin(x, n):
        return x @ P[n + ".weight"].T + P[n + ".bias"]

    def ln(x, n):
        return F.layer_norm(x, (x.shape[-1],), P[n + ".weight"], P[n + ".bias"], 1e-5)

    def mlp(x, n, k):
        for i in range(k):
            x = lin(x, f"{n}.layers.{i}")
            x = F.relu(x) if i < k - 1 else x
        return x

    def ffn(x, n):
        return lin(F.prelu(lin(x, n + ".linear1"), P[n + ".activation.weight"]), n + ".linear2")

    def enc_layer(x, pos, valid, n, heads=H):  # nn.MultiheadAttention, post-norm
        qk = (x + pos)[:, None]
        a = F.multi_head_attention_forward(
            qk, qk, x[:, None], d, heads, P[n + ".self_attn.in_proj_weight"], P[n + ".self_attn.in_proj_bias"],
            None, None, False, 0.0, P[n + ".self_attn.out_proj.weight"], P[n + ".self_attn.out_proj.bias"],
            training=False, key_padding_mask=~valid[None], need_weights=False)[0][:, 0]
        x = ln(x + a, n + ".norm1")
        return ln(x + ffn(x, n), n + ".norm2")

    def sine(x, nf):  # DETR layout: stack(sin of even, cos of odd) then flatten
        dim_t = 10000 ** (2 * (torch.arange(nf, dtype=torch.float64) // 2) / nf)
        p = x[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    def inv_sig(x, eps=1e-3):
        x = x.clamp(0, 1)
        return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))

    res = {k: [] for k in ("logits", "spans", "saliency", "t2v", "dummy")}
    for i in range(inp["txt"].shape[0]):
        txt = torch.tensor(inp["txt"][i], dtype=torch.float64)
        vid = torch.tensor(inp["vid"][i], dtype=torch.float64)
        tm = torch.tensor(inp["tm"][i]).bool()
        vm = torch.tensor(inp["vm"][i]).bool()
        k = int(tm.sum())
        t = torch.cat([txt[:k], torch.tensor(inp["prompt"][i], dtype=torch.float64)[None], txt[k:]])
        m = torch.cat([tm[:k], torch.tensor([True]), tm[k:]])
        t = F.relu(lin(ln(t, "input_txt_proj.0.LayerNorm"), "input_txt_proj.0.net.1"))
        t = lin(ln(t, "input_txt_proj.1.LayerNorm"), "input_txt_proj.1.net.1") + P["token_type_embeddings.weight"][0]
        v = F.relu(lin(ln(vid, "input_vid_proj.0.LayerNorm"), "input_vid_proj.0.net.1"))
        v = lin(ln(v, "input_vid_proj.1.LayerNorm"), "input_vid_proj.1.net.1") + P["token_type_embeddings.weight"][1]
        lv, vlen = v.shape[0], int(vm.sum())
        c = torch.cumsum(vm.double(), 0)
        pos_v = sine(c / (c[-1] + 1e-6) * 2 * math.pi, d)
        # dummy tokens
        x = torch.cat([P["dummy_rep_token"], t])
        xpos = torch.cat([P["dummy_rep_pos"], torch.zeros_like(t)])
        xvalid = torch.cat([torch.ones(nd, dtype=torch.bool), m])
        for li in range(2):
            x = enc_layer(x, xpos, xvalid, f"txtproj_encoder.layers.{li}", cfg.txtproj_num_heads)  # 8, not H
        dummy = x[:nd]
        keys = torch.cat([dummy, t])
        ctx = v[:vlen].mean(0)
        # T2V encoder
        h, A = v, 0
        for li in range(cfg.t2v_layers):
            n = f"transformer.t2v_encoder.layers.{li}"
            q, kk = h + pos_v, keys + xpos
            heads, probs = [], []
            for hh in range(H):
                sl = slice(hh * hd, (hh + 1) * hd)
                lg = (q[:, sl] * hd ** -0.5) @ kk[:, sl].T
                lg = lg.masked_fill(~xvalid[None], float("-inf"))
                pr = lg.softmax(-1)
                probs.append(pr)
                heads.append(pr[:, nd:] @ keys[nd:, sl])
            y = h + lin(torch.cat(heads, 1), n + ".self_attn.out_proj")
            h = ln(y + ffn(ln(y, n + ".norm1"), n), n + ".norm2")
            A = A + torch.stack(probs).mean(0)
        A = A / cfg.t2v_layers
        # saliency token
        G = P["global_rep_token"]
        sim = (F.normalize(v - ctx, dim=1) @ F.normalize(G, dim=1).T).softmax(-1)
        imp = A[:, nd:].sum(1).clone()
        imp[vlen:] = 0
        imp = imp / imp.sum() * lv
        score = (sim * imp[:, None]).mean(0)
        tv, ti = torch.topk(score, cfg.num_prompts)
        g = (tv[:, None] * G[ti]).sum(0) + ctx
        for li in range(cfg.t2v_layers):  # empty key set: attention output = out_proj.bias
            n = f"transformer.t2v_encoder.layers.{li}"
            y = g + P[n + ".self_attn.out_proj.bias"]
            g = ln(y + ffn(ln(y, n + ".norm1"), n), n + ".norm2")
        # encoder over [global; video]
        s = torch.cat([g[None], h])
        spos = torch.cat([P["global_rep_pos"], pos_v])
        svalid = torch.cat([torch.tensor([True]), vm])
        for li in range(cfg.enc_layers):
            s = enc_layer(s, spos, svalid, f"transformer.encoder.layers.{li}")
        mg, ml = s[0], s[1:] + s[0]
        # decoder
        r = P["query_embed.weight"].sigmoid()
        tgt = torch.zeros(cfg.num_queries, d, dtype=torch.float64)
        logits_l, spans_l = [], []
        for li in range(cfg.dec_layers):
            n = f"transformer.decoder.layers.{li}"
            S = torch.cat([sine(r[:, 0] * 2 * math.pi, d // 2), sine(r[:, 1] * 2 * math.pi, d // 2)], 1)
            qpos = mlp(S, "transformer.decoder.ref_point_head", 2)
            if li > 0:
                S = S * mlp(tgt, "transformer.decoder.query_scale", 2)
            S = S * (mlp(tgt, "transformer.decoder.ref_anchor_head", 2).sigmoid()[:, 0] / r[:, 1])[:, None]
            qa = lin(tgt, n + ".sa_qcontent_proj") + lin(qpos, n + ".sa_qpos_proj")
            ka = lin(tgt, n + ".sa_kcontent_proj") + lin(qpos, n + ".sa_kpos_proj")
            va = lin(tgt, n + ".sa_v_proj")
            o = torch.cat([((qa[:, sl] @ ka[:, sl].T) * hd ** -0.5).softmax(-1) @ va[:, sl]
                           for sl in (slice(j * hd, (j + 1) * hd) for j in range(H))], 1)
            tgt = ln(tgt + lin(o, n + ".self_attn.out_proj"), n + ".norm1")
            qc, kc = lin(tgt, n + ".ca_qcontent_proj"), lin(ml, n + ".ca_kcontent_proj")
            vc, kp = lin(ml, n + ".ca_v_proj"), lin(pos_v, n + ".ca_kpos_proj")
            if li == 0:
                qc, kc = qc + lin(qpos, n + ".ca_qpos_proj"), kc + kp
            qs = lin(S, n + ".ca_qpos_sine_proj")
            outs = []
            for j in range(H):
                sl = slice(j * hd, (j + 1) * hd)
                qh, kh = torch.cat([qc[:, sl], qs[:, sl]], 1), torch.cat([kc[:, sl], kp[:, sl]], 1)
                lg = (qh @ kh.T) / math.sqrt(2 * hd)
                outs.append(lg.masked_fill(~vm[None], float("-inf")).softmax(-1) @ vc[:, sl])
            tgt = ln(tgt + lin(torch.cat(outs, 1), n + ".cross_attn.out_proj"), n + ".norm2")
            tgt = ln(tgt + ffn(tgt, n), n + ".norm3")
            hs = ln(tgt, "transformer.decoder.norm")
            logits_l.append(lin(hs, "class_embed"))
            spans_l.append((mlp(hs, "span_embed", 3) + inv_sig(r)).sigmoid())
            r = (mlp(tgt, "transformer.decoder.bbox_embed", 3) + inv_sig(r)).sigmoid()
        res["logits"].append(torch.stack(logits_l).numpy())
        res["spans"].append(torch.stack(spans_l).numpy())
        res["saliency"].append(((lin(ml, "saliency_proj1") * lin(mg, "saliency_proj2")).sum(-1) / math.sqrt(d)).numpy())
        res["t2v"].append((A[:, nd:] * m[None]).sum(1).clamp(0, 1).numpy())
        res["dummy"].append(dummy.numpy())
    return res


def test_forward_matches_torch_rederivation(head, base):
    model, _ = head
    inp, (out, _, _) = base
    ref = torch_reference(checkpoint_state(model), CFG, inp)
    layers_logits = [o["pred_logits"] for o in out["aux_outputs"]] + [out["pred_logits"]]
    layers_spans = [o["pred_spans"] for o in out["aux_outputs"]] + [out["pred_spans"]]
    for i in range(B):
        for li in range(CFG.dec_layers):
            _close(layers_logits[li][i], ref["logits"][i][li], atol=2e-5)
            _close(layers_spans[li][i], ref["spans"][i][li], atol=2e-5)
        _close(out["saliency_scores"][i], ref["saliency"][i], atol=2e-5)
        _close(out["t2v_attn_values"][i], ref["t2v"][i], atol=2e-5)
        _close(out["dummy_tokens"][i], ref["dummy"][i], atol=2e-5)

"""Evaluation metrics against hand-computed values, and the model → predictions → metrics path."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from tpo_jax import config as C
from tpo_jax.model import TPOModel
from tpo_jax.train import metrics as M


def test_box_iou_and_rec():
    gt = np.array([[0.0, 0.0, 0.5, 0.5]] * 4)
    pred = np.array([
        [0.0, 0.0, 0.5, 0.5],      # identical: IoU 1
        [0.25, 0.0, 0.75, 0.5],    # half overlap: inter 0.125, union 0.375 → 1/3
        [0.0, 0.0, 0.5, 0.25],     # inside: 0.125 / 0.25 = 0.5 (counts for Acc@0.5)
        [0.5, 0.5, 0.0, 0.0],      # x1 < x0: invalid → 0
    ])
    np.testing.assert_allclose(M.box_iou(pred, gt), [1.0, 1 / 3, 0.5, 0.0], rtol=1e-12)
    out = M.rec_metrics(pred, gt)
    assert out["acc@0.5"] == pytest.approx(0.5) and out["count"] == 4
    assert out["miou"] == pytest.approx((1 + 1 / 3 + 0.5) / 4)
    assert math.isnan(M.rec_metrics(np.zeros((0, 4)), np.zeros((0, 4)))["acc@0.5"])


def test_temporal_grounding_r1_and_miou():
    pred = np.array([[0.0, 10.0], [2.0, 6.0], [5.0, 9.0], [0.0, 1.0]])
    gt = np.array([[[0.0, 10.0], [0, 0]],      # IoU 1
                   [[0.0, 4.0], [4.0, 8.0]],   # best of 2/6 and 2/6 → 1/3
                   [[4.0, 8.0], [0, 0]],       # inter 3, union 5 → 0.6
                   [[5.0, 6.0], [0.0, 1.0]]])  # 2nd span padded out → IoU 0 (not 1)
    valid = np.array([[1, 0], [1, 1], [1, 0], [1, 0]], bool)
    out = M.temporal_grounding_metrics(pred, gt, valid)
    assert out["r1@0.3"] == pytest.approx(3 / 4)
    assert out["r1@0.5"] == pytest.approx(2 / 4)
    assert out["r1@0.7"] == pytest.approx(1 / 4)
    assert out["miou"] == pytest.approx((1 + 1 / 3 + 0.6 + 0) / 4)
    assert out["count"] == 4


def test_average_precision_by_hand():
    # ranking: rel, non, rel, non → P@1 = 1, P@3 = 2/3 → AP = (1 + 2/3) / 2
    assert M.average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # a tie of a relevant and a non-relevant item at the top forms one threshold: P = 1/2, R = 1 → 0.5
    assert M.average_precision([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert math.isnan(M.average_precision([0.3, 0.2], [0, 0]))


def test_highlight_hit_and_map():
    scores = np.array([[0.1, 0.9, 0.3, 5.0],    # top valid clip (index 3 is padding) is clip 1: relevant
                       [0.8, 0.2, 0.6, 0.0],    # top clip 0 not relevant; ranking non, rel, non → AP 1/2
                       [0.5, 0.4, 0.3, 0.2]])   # no relevant clip: skipped
    labels = np.array([[0, 4, 2, 0], [0, 0, 3, 0], [0, 0, 0, 0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], np.float32)
    out = M.highlight_metrics(scores, labels, mask)
    assert out["count"] == 2
    assert out["hit@1"] == pytest.approx(0.5)
    # video 0: ranking clip1 (rel), clip2 (rel), clip0 → AP 1; video 1: clip0 (non), clip2 (rel) → P = 1/2
    assert out["map"] == pytest.approx((1.0 + 0.5) / 2)
    strict = M.highlight_metrics(scores, labels, mask, min_label=3)  # only label ≥ 3 relevant
    assert strict["hit@1"] == pytest.approx(0.5) and strict["map"] == pytest.approx((1.0 + 0.5) / 2)


def test_mc_accuracy_and_prompt_l1():
    scores = np.array([[1.0, 3.0, -1e30], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0], [9.0, 1.0, 1.0]])
    out = M.mc_accuracy(scores, np.array([1, 2, 2, -1]))   # right, wrong, right, not MC
    assert out == {"acc": pytest.approx(2 / 3), "count": 3}
    pred = np.zeros((2, 3, 2))
    target = np.ones((2, 3, 2))
    target[1] = 3.0  # example errors 1 and 3 → mean 2
    assert M.prompt_l1(pred, target) == {"l1": pytest.approx(2.0), "count": 2}


def test_improvement_signs():
    before = {"rec/acc@0.5": 0.1, "mask/l1": 1.2, "rec/count": 64}
    after = {"rec/acc@0.5": 0.4, "mask/l1": 0.5, "rec/count": 64}
    assert M.improvement(before, after) == {"rec/acc@0.5": pytest.approx(0.3), "mask/l1": pytest.approx(0.7)}


def test_evaluate_perfect_predictions_score_perfectly():
    """The accumulator pipeline with ground-truth predictions gives the top score of every metric."""
    from tpo_jax.train.metric_accumulator import MetricAccumulator

    batch = {
        "region_boxes": np.array([[[0.1, 0.2, 0.5, 0.6]], [[0, 0, 1, 1]]], np.float32),
        "spans": np.array([[[0.5, 0.5], [0, 0]], [[0.25, 0.5], [0.75, 0.5]]], np.float32),
        "span_valid": np.array([[1, 0], [1, 1]], bool),
        "saliency_labels": np.array([[0, 4, 4, 0], [4, 0, 0, 4]], np.float32),
        "vid_mask": np.ones((2, 4), np.float32),
        "mc_answer": np.array([1, -1], np.int32),
    }
    preds = {
        "region_pred": batch["region_boxes"], "region_valid": np.array([[True], [False]]),
        "temporal_top1": np.array([[0.25, 0.75], [0.5, 1.0]], np.float32),
        "saliency": batch["saliency_labels"] + 0.1, "temporal_valid": np.array([True, True]),
        "mask_pred": np.ones((2, 3, 4), np.float32), "mask_target": np.ones((2, 3, 4), np.float32),
        "mask_valid": np.array([True, False]),
        "mc_scores": np.array([[0.0, 2.0, -1e30], [0.0, 0.0, 0.0]], np.float32),
    }
    acc = MetricAccumulator()
    acc.update(preds, batch)
    out = acc.compute()
    assert out["rec/acc@0.5"] == 1.0 and out["rec/count"] == 1
    assert out["temporal/r1@0.7"] == 1.0 and out["temporal/miou"] == pytest.approx(1.0)
    assert out["highlight/hit@1"] == 1.0 and out["highlight/map"] == 1.0
    assert out["mc/acc"] == 1.0 and out["mc/count"] == 1
    assert out["mask/l1"] == 0.0 and out["mask/count"] == 1


def test_mc_cloze_accuracy_by_hand():
    """Cloze rows (question, option, answer log-likelihood) from several batches, padding rows dropped:
    question 0 (2 options, answer 1): −3 vs −1 → right; question 1 (3 options, answer 0): −2, −0.5, −4
    → wrong; question 2 (answer 2): −9, −8, −1 → right. Accuracy 2/3."""
    from tpo_jax.train.metric_accumulator import MetricAccumulator

    acc = MetricAccumulator()
    batches = [  # (cloze_question, cloze_option, cloze_answer, answer_logprob)
        ([0, 0, 1, 1], [0, 1, 0, 1], [1, 1, 0, 0], [-3.0, -1.0, -2.0, -0.5]),
        ([1, 2, 2, 2], [2, 0, 1, 2], [0, 2, 2, 2], [-4.0, -9.0, -8.0, -1.0]),
        ([-1, -1, -1, -1], [0, 0, 0, 0], [0, 0, 0, 0], [0.0, 0.0, 0.0, 0.0]),  # padding: would be right
    ]
    for q, k, a, lp in batches:
        batch = {"cloze_question": np.array(q), "cloze_option": np.array(k), "cloze_answer": np.array(a)}
        acc.update({"answer_logprob": np.array(lp, np.float32)}, batch)
    out = acc.compute()
    assert out["mc_cloze/count"] == 3 and out["mc_cloze/acc"] == pytest.approx(2 / 3)
    per_question = acc.mc_questions()["mc_cloze"]
    np.testing.assert_array_equal(per_question["chosen"], [1, 1, 2])
    np.testing.assert_array_equal(per_question["answer"], [1, 0, 2])
    np.testing.assert_array_equal(per_question["correct"], [True, False, True])


def test_mc_letter_form_per_question():
    """Letter-form scores of two batches; the second row of the first is not an MC example (answer −1).
    Row 0: logits 0, 2, pad → B, answer B; row 2: 1, 1, 0 (a tie: the first) → A, answer C."""
    from tpo_jax.train.metric_accumulator import MetricAccumulator

    acc = MetricAccumulator()
    empty = {"region_valid": np.zeros((2, 1), bool), "region_pred": np.zeros((2, 1, 4)),
             "temporal_valid": np.zeros(2, bool), "temporal_top1": np.zeros((2, 2)), "saliency": np.zeros((2, 4)),
             "mask_valid": np.zeros(2, bool), "mask_pred": np.zeros((2, 3, 4)), "mask_target": np.zeros((2, 3, 4))}
    batch = {"region_boxes": np.zeros((2, 1, 4)), "spans": np.zeros((2, 1, 2)), "span_valid": np.zeros((2, 1), bool),
             "saliency_labels": np.zeros((2, 4)), "vid_mask": np.zeros((2, 4))}
    for scores, answers in (([[0.0, 2.0, -1e30], [5.0, 0.0, 0.0]], [1, -1]), ([[1.0, 1.0, 0.0], [0.0, 0.0, 3.0]], [2, 2])):
        acc.update(dict(empty, mc_scores=np.array(scores)), dict(batch, mc_answer=np.array(answers)))
    letter = acc.mc_questions()["mc"]
    np.testing.assert_array_equal(letter["chosen"], [1, 0, 2])
    np.testing.assert_array_equal(letter["answer"], [1, 2, 2])
    np.testing.assert_array_equal(letter["correct"], [True, False, True])
    assert acc.compute()["mc/acc"] == pytest.approx(2 / 3)
    assert len(acc.mc_questions()["mc_cloze"]["correct"]) == 0  # no cloze rows seen


@pytest.fixture(scope="module")
def eval_setup():
    from tpo_jax.data.pipeline import DataConfig, eval_batches
    from tpo_jax.train.evaluate import make_predict_fn

    cfg = C.get_config("tiny")
    data = DataConfig(batch_size=2, seq_len=128, eval_examples=2)
    per_task = eval_batches(data, cfg, tasks=("mc", "mc_cloze", "temporal", "region", "mask"))
    graphdef, state = nnx.split(TPOModel(cfg, rngs=nnx.Rngs(0)))
    return graphdef, state, per_task, make_predict_fn(graphdef)


def test_predictions_match_the_heads(eval_setup):
    """Region boxes, top-1 windows, saliency, MC option scores and mask prompts of the batched `predict` equal
    a direct computation on each example alone."""
    from tpo_jax.model import gather_task_hidden
    from tpo_jax.train.metric_accumulator import MetricAccumulator

    graphdef, state, per_task, predict_fn = eval_setup

    @jax.jit
    def direct(state, one):  # one example (batch of 1), each head called on its own
        model = nnx.merge(graphdef, state)
        out = model(one["input_ids"], attention_mask=one["attention_mask"], visual_mask=one["visual_mask"],
                    frames=one["frames"], track_boxes=one["track_boxes"], return_vision_features=True)
        ids = one["input_ids"]
        h_box, _, _ = gather_task_hidden(out.hidden, ids, C.BOXES_ID, 1)
        h_temp, _, _ = gather_task_hidden(out.hidden, ids, C.TEMP_ID, 1)
        h_track, _, _ = gather_task_hidden(out.hidden, ids, C.TRACKING_ID, 1)
        t = model.temporal_head(*model.temporal_features(one, out.vision_features), h_temp[:, 0])
        return {"box": model.region_head(h_box)[0, 0], "logits": out.logits[0],
                "prompt": model.mask_head(h_track[:, 0])[0][0], "target": model.sam2.box_prompt(one["mask_boxes"])[0],
                "t_logits": t["pred_logits"][0], "t_spans": t["pred_spans"][0], "saliency": t["saliency_scores"][0]}

    acc = MetricAccumulator()
    for task in ("region", "mc", "mask", "temporal"):
        batch = per_task[task][0]
        preds = jax.device_get(predict_fn(state, batch))
        acc.update(preds, batch)
        for i in range(len(batch["input_ids"])):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            d = jax.device_get(direct(state, one))
            if task == "temporal":  # top-1 window = the query with the highest foreground probability
                p_fg = np.exp(d["t_logits"][:, 0]) / np.exp(d["t_logits"]).sum(-1)
                c, w = d["t_spans"][np.argmax(p_fg)]
                np.testing.assert_allclose(preds["temporal_top1"][i], np.clip([c - w / 2, c + w / 2], 0, 1),
                                           atol=1e-5)
                np.testing.assert_allclose(preds["saliency"][i], d["saliency"], atol=1e-5)
                assert preds["temporal_valid"][i]
            elif task == "region":
                np.testing.assert_allclose(preds["region_pred"][i, 0], d["box"], atol=1e-5)
                assert preds["region_valid"][i, 0]
            elif task == "mc":
                pos = int(one["mc_letter_pos"][0]) - 1
                assert one["input_ids"][0, pos + 1] == one["mc_options"][0, one["mc_answer"][0]]
                opts = one["mc_options"][0]
                k = int(np.sum(opts >= 0))
                np.testing.assert_allclose(preds["mc_scores"][i, :k], d["logits"][pos, opts[:k]], rtol=1e-5, atol=1e-5)
                assert np.all(preds["mc_scores"][i, k:] < -1e29)
            else:
                np.testing.assert_allclose(preds["mask_pred"][i], d["prompt"], atol=1e-5)
                np.testing.assert_allclose(preds["mask_target"][i], d["target"], atol=1e-5)
                assert preds["mask_valid"][i]
    from tpo_jax.data.pipeline import CLOZE_FIELDS
    from tpo_jax.train.evaluate import cloze_label_rows

    batch = per_task["mc_cloze"][0]  # cloze rows: the summed log-softmax of the answer's label tokens
    assert cloze_label_rows(batch) == 8  # answers of a few tokens: the lm_head runs on 8 rows, not 128
    preds = jax.device_get(predict_fn(state, batch, label_rows=cloze_label_rows(batch)))
    for i in range(len(batch["input_ids"])):
        one = {k: v[i:i + 1] for k, v in batch.items() if k not in CLOZE_FIELDS}
        logits = np.asarray(jax.device_get(direct(state, one))["logits"], np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        pos = np.flatnonzero(batch["labels"][i] >= 0)
        assert len(pos) >= 2 and pos[0] == batch["answer_start"][i]
        want = sum(logp[t - 1, batch["labels"][i][t]] for t in pos)
        np.testing.assert_allclose(preds["answer_logprob"][i], want, rtol=1e-5, atol=1e-4)
    out = acc.compute()
    assert out["rec/count"] == 2 and out["mc/count"] == 2 and out["mask/count"] == 2
    assert out["temporal/count"] == 2 and out["highlight/count"] == 2
    assert all(0 <= out[k] <= 1 for k in ("rec/acc@0.5", "temporal/r1@0.5", "highlight/map", "mc/acc"))


def test_tracking_metrics_of_the_eval_equal_a_hand_computation(eval_setup):
    """`track/...` of `evaluate` on the mask batches = DAVIS J&F and success AUC / precision computed here from
    `model.sam2.propagate` called directly on the batch's SAM2 frames and the predicted prompt (hole-filled,
    resized to the frame size, > 0), against the records' `track_masks` / `track_boxes` decoded by hand."""
    from tpo_jax.data.pipeline import DataConfig, synthetic_config
    from tpo_jax.data.rle import rle_decode
    from tpo_jax.data.synthetic import make_record
    from tpo_jax.sam2.video import fill_holes, upscale_masks
    from tpo_jax.train import tracking_metrics as TM
    from tpo_jax.train.evaluate import evaluate

    graphdef, state, per_task, predict_fn = eval_setup
    cfg = C.get_config("tiny")
    batches = per_task["mask"]
    predict_fn.fill_hole_area = cfg.sam2.fill_hole_area  # the trainer's setting (same compiled function)
    try:
        out = evaluate(predict_fn, state, batches)
    finally:
        predict_fn.fill_hole_area = 0
    propagate = jax.jit(lambda state, frames, prompt: nnx.merge(graphdef, state).sam2.propagate(frames, prompt))
    records = [make_record(synthetic_config(DataConfig(), cfg), "mask", i, split="validation") for i in range(2)]
    davis, tracks = [], []
    for batch in batches:
        prompts = jax.device_get(predict_fn(state, batch))["mask_pred"]
        low = np.asarray(propagate(state, batch["sam2_frames"], prompts).masks)
        low = fill_holes(low, cfg.sam2.fill_hole_area)
        for i, rec in enumerate(records):  # 4 frames, 4 sampled: frame t is the record's entry t
            gt = np.stack([rle_decode(m) for m in rec.track_masks]).astype(bool)
            h, w = gt.shape[1:]
            pred = np.asarray(upscale_masks(low[i], h, w)) > 0
            j = TM.region_similarity(pred, gt)
            f = TM.boundary_f_measure(pred, gt)
            davis.append((j.mean(), f.mean()))
            boxes = [(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(ys) else (np.nan,) * 4
                     for ys, xs in (np.nonzero(m) for m in pred)]
            ok = np.array([np.isfinite(b[0]) for b in boxes])
            tracks.append(TM.tracking_metrics(np.nan_to_num(np.array(boxes, float)),
                                              np.asarray(rec.track_boxes, float) * [w, h, w, h],
                                              gt_valid=rec.track_visible, pred_valid=ok))
    j, f = np.mean(davis, axis=0)
    assert out["track/count"] == 2 and out["track/frames"] == 8
    assert out["track/j"] == pytest.approx(j, abs=1e-9) and out["track/f"] == pytest.approx(f, abs=1e-9)
    assert out["track/jf"] == pytest.approx((j + f) / 2, abs=1e-9)
    for key in ("auc", "precision@20", "norm_precision@0.2"):
        assert out[f"track/{key}"] == pytest.approx(np.mean([t[key] for t in tracks]), abs=1e-9)


def test_tracking_metrics_of_a_perfect_track(eval_setup):
    """Logits that are the ground-truth masks give J = F = J&F = 1, precision 1 and success AUC 20/21 (every IoU
    is 1, which passes every threshold but the strict IoU > 1)."""
    from tpo_jax.train.metric_accumulator import MetricAccumulator

    graphdef, state, per_task, predict_fn = eval_setup
    acc = MetricAccumulator()
    for batch in per_task["mask"]:
        preds = dict(jax.device_get(predict_fn(state, batch)))
        preds["track_logits"] = np.where(batch["gt_track_masks"], 5.0, -5.0).astype(np.float32)
        acc.update(preds, batch)
    out = acc.compute()
    assert out["track/count"] == 2
    assert out["track/j"] == out["track/f"] == out["track/jf"] == 1.0
    assert out["track/j_recall"] == out["track/f_recall"] == 1.0
    assert out["track/precision@20"] == 1.0 and out["track/norm_precision@0.2"] == 1.0
    assert out["track/auc"] == pytest.approx(20 / 21)

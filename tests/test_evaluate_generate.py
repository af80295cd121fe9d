"""Generation-mode evaluation (tpo_jax/train/evaluate_generate.py): hand-built generated answers give hand-computed
metrics; on the tiny random model of each architecture (VideoChat-TPO, LLaVA-OV-TPO) `evaluate(..., mode="generate")`
runs end to end, deterministically."""

import collections
import math

import jax
import numpy as np
import pytest
from flax import nnx

from tpo_jax import config as C
from tpo_jax.data.pipeline import DataConfig, eval_batches
from tpo_jax.data.records import TASKS
from tpo_jax.generate import GenerationResult, Generator
from tpo_jax.model import TPOModel
from tpo_jax.train import evaluate_generate as EG
from tpo_jax.train.evaluate import evaluate, make_predict_fn
from tpo_jax.train.run_config import EvalConfig

EVAL_TASKS = ("mc", "mc_cloze", "temporal", "region", "mask")


def result(text=None, boxes=(), span=None, saliency=None, prompt=None):
    temporal = None if span is None else {"span": list(span), "saliency": list(saliency)}
    return GenerationResult(token_ids=[], text=text, finish_reason="stop",
                            region=[{"box": None, "box_normalized": list(b)} for b in boxes], temporal=temporal,
                            track=None if prompt is None else {"prompt": prompt})


def hand_batch():
    """Nine rows: region ×2, temporal ×2, mc ×3, mask ×2."""
    tasks = ["region", "region", "temporal", "temporal", "mc", "mc", "mc", "mask", "mask"]
    n = len(tasks)
    b = {"task_id": np.array([TASKS.index(t) for t in tasks]),
         "region_valid": np.zeros((n, 1), bool), "region_boxes": np.zeros((n, 1, 4), np.float32),
         "temporal_valid": np.zeros(n, bool), "spans": np.zeros((n, 2, 2), np.float32),
         "span_valid": np.zeros((n, 2), bool), "saliency_labels": np.zeros((n, 4), np.float32),
         "vid_mask": np.ones((n, 4), np.float32), "mc_answer": np.full(n, -1), "mc_options": np.full((n, 5), -1),
         "mask_valid": np.zeros(n, bool)}
    b["region_valid"][:2] = True
    b["region_boxes"][:2, 0] = [0.1, 0.1, 0.5, 0.5]
    b["temporal_valid"][2:4] = True
    b["spans"][2:4, 0] = [0.5, 0.4]  # (centre, width) → [0.3, 0.7]
    b["span_valid"][2:4, 0] = True
    b["saliency_labels"][2:4] = [0, 12, 12, 0]
    b["mc_options"][4:7, :3] = [10, 11, 12]
    b["mc_answer"][4:7] = [1, 0, 2]
    b["mask_valid"][7:] = True
    return b


def test_scoring_of_hand_built_answers():
    b = hand_batch()
    target = np.zeros((9, 3, 2), np.float32)
    target[7] = [[1, 1], [1, 1], [1, 1]]
    results = [
        result(boxes=[(0.1, 0.1, 0.5, 0.4)]),  # IoU 0.12 / 0.16 = 0.75
        result(text="no box token"),  # a miss: IoU 0
        result(span=(0.4, 0.7), saliency=[0.0, 0.1, 0.9, 0.2]),  # IoU 0.3 / 0.4 = 0.75; top clip 2 is relevant
        result(text="no time token"),  # a miss for R1 / mIoU, left out of highlight
        result(text="(B) A square."),  # right
        result(text="A square."),  # no option letter: wrong
        result(text="(D) A circle."),  # a letter, but not one of the three options: wrong
        result(prompt=[[1.5, 1.0], [1.0, 0.5], [1.0, 1.0]]),  # L1 mean |p - t| = (0.5 + 0.5) / 6
        result(text="no track token"),  # left out of the mask L1
    ]
    acc = EG.GenerationAccumulator()
    acc.update(results, b, target)
    out = acc.compute()
    assert out["gen/rec/acc@0.5"] == 0.5 and out["gen/rec/miou"] == pytest.approx(0.375)
    assert out["gen/rec/count"] == 2 and out["gen/rec/emitted"] == 0.5
    for t in ("0.3", "0.5", "0.7"):
        assert out[f"gen/temporal/r1@{t}"] == 0.5
    assert out["gen/temporal/miou"] == pytest.approx(0.375) and out["gen/temporal/emitted"] == 0.5
    # highlight over the one example whose temporal head ran: clips 1, 2 relevant; ranked 2, 3, 1, 0 by saliency,
    # the top clip relevant (HIT@1 = 1), relevant at ranks 1 and 3: AP = (1/1 + 2/3) / 2
    assert out["gen/highlight/count"] == 1 and out["gen/highlight/hit@1"] == 1.0
    assert out["gen/highlight/map"] == pytest.approx(5 / 6)
    assert out["gen/mc/acc"] == pytest.approx(1 / 3) and out["gen/mc/count"] == 3
    assert out["gen/mc/emitted"] == pytest.approx(1 / 3)
    assert out["gen/mask/l1"] == pytest.approx(1 / 6) and out["gen/mask/count"] == 1 and out["gen/mask/emitted"] == 0.5
    assert not any(k.startswith("gen/mc_cloze") for k in out)


def test_option_letter_and_prompt_lengths():
    assert [EG.option_letter(t) for t in ("(B) A square.", " (A) x", "C) y", "A square.", "", None, "(b) z")] == \
        [1, 0, 2, -1, -1, -1, -1]
    labels = np.full((2, 8), -100)
    labels[0, 5:7] = [7, 2]
    labels[1, 3:8] = 9
    np.testing.assert_array_equal(EG.prompt_lengths(labels), [5, 3])
    with pytest.raises(ValueError, match="no answer tokens"):
        EG.prompt_lengths(np.full((1, 4), -100))


@pytest.fixture(scope="module", params=[("tiny", 128), ("llava_ov_tpo_tiny", 256)], ids=["videochat", "llava_ov"])
def planted(request):
    """The tiny random model of each architecture, its evaluation batches (2 per task), and begin tokens planted in
    the lm_head so that the first region, temporal and mask prompts start their answers with `<box_begin>`,
    `<time_begin>`, `<track_begin>` (each head runs)."""
    preset, seq_len = request.param
    cfg = C.get_config(preset)
    per_task = eval_batches(DataConfig(batch_size=2, seq_len=seq_len, eval_examples=2), cfg, tasks=EVAL_TASKS)
    batches = [b for t in EVAL_TASKS for b in per_task[t]]
    model = TPOModel(cfg, rngs=nnx.Rngs(0))
    rows = next(EG._rows(batches, EG.BATCH_SIZE))
    requests = EG.make_requests(rows)
    gen = EG.generation_config(seq_len)
    kernel = model.llm.lm_head.kernel
    firsts = Generator(model, gen).decode(requests).tokens[:, 0]  # before any planting: no chains of copies
    planted_tasks = []  # a task whose first token another task already took cannot get its own begin token
    for task, token_id in zip(("region", "temporal", "mask"), cfg.task_tokens.begin_tokens):
        row = list(rows["task_id"]).index(TASKS.index(task))
        first = int(firsts[row])
        if any(int(firsts[list(rows["task_id"]).index(TASKS.index(t))]) == first for t in planted_tasks):
            continue
        planted_tasks.append(task)
        n = len(requests[row].input_ids)  # the winning logit's sign: which way a copy of its column must be scaled
        logit = float(model(rows["input_ids"][row:row + 1, :n], visual_mask=rows["visual_mask"][row:row + 1, :n],
                            frames=rows["frames"][row:row + 1],
                            track_boxes=rows["track_boxes"][row:row + 1]).logits[0, -1, first])
        kernel[...] = kernel[...].at[:, token_id].set((1.01 if logit > 0 else 0.99) * kernel[...][:, first])
    return model, batches, rows, requests, planted_tasks


def test_requests_are_the_prompts(planted):
    _, _, rows, requests, _ = planted
    for i, req in enumerate(requests):
        n = len(req.input_ids)
        assert rows["labels"][i, n] != -100 and np.all(rows["labels"][i, :n] == -100)
        assert n == rows["answer_start"][i]  # one turn: the answer starts where the labels do
        np.testing.assert_array_equal(req.input_ids, rows["input_ids"][i, :n])
        assert req.duration == 1.0 and np.shape(req.track_boxes) == (1, 4)


def test_track_boxes_reach_the_prompt(planted):
    """A tracking prompt's `<track_box>` is fed as `loc_encoder(box)`, as in training: the first generated token's
    log-probability equals the teacher-forced forward's at the last prompt position."""
    model, _, rows, requests, _ = planted
    i = next(i for i, r in enumerate(requests) if (np.asarray(r.input_ids) == model.cfg.task_tokens.track_box).any())
    n = len(requests[i].input_ids)
    out = Generator(model, EG.generation_config(len(rows["input_ids"][i]), max_new_tokens=1)).decode([requests[i]])
    full = model(rows["input_ids"][i:i + 1, :n], visual_mask=rows["visual_mask"][i:i + 1, :n],
                 frames=rows["frames"][i:i + 1], track_boxes=rows["track_boxes"][i:i + 1])
    logp = jax.nn.log_softmax(full.logits[0, -1].astype(np.float32))
    assert int(out.tokens[0, 0]) == int(np.argmax(logp))
    np.testing.assert_allclose(float(out.scores[0]), float(logp.max()), atol=1e-4)


def test_evaluate_generate_end_to_end(planted):
    model, batches, _, _, planted_tasks = planted
    graphdef, state = nnx.split(model)
    predict_fn = make_predict_fn(graphdef)
    first = evaluate(predict_fn, state, batches, mode="generate")
    second = evaluate(predict_fn, state, batches, mode="generate")
    keys = {f"gen/{k}" for k in ("rec/acc@0.5", "rec/miou", "rec/count", "temporal/r1@0.3", "temporal/r1@0.5",
                                  "temporal/r1@0.7", "temporal/miou", "temporal/count", "highlight/hit@1",
                                  "highlight/map", "highlight/count", "mc/acc", "mc/count", "mask/l1", "mask/count",
                                  "rec/emitted", "temporal/emitted", "mc/emitted", "mask/emitted")}
    assert set(first) == keys
    assert first.keys() == second.keys()
    for k, v in first.items():
        assert v == second[k] or (math.isnan(v) and math.isnan(second[k])), k
    assert first["gen/rec/count"] == first["gen/temporal/count"] == first["gen/mc/count"] == 2
    assert len(planted_tasks) >= 2 and (model.cfg.arch == "llava_ov" or len(planted_tasks) == 3)
    for task in planted_tasks:  # the planted begin tokens: each head ran on a generated token
        assert first[f"gen/{'rec' if task == 'region' else task}/emitted"] >= 0.5, task
    assert first["gen/highlight/count"] >= 1 and first["gen/mask/count"] >= 1
    assert np.isfinite(first["gen/mask/l1"]) and 0 <= first["gen/rec/miou"] <= 1
    counts = collections.Counter(TASKS[t] for b in batches if "cloze_question" not in b for t in b["task_id"])
    assert counts == {"mc": 2, "temporal": 2, "region": 2, "mask": 2}


def test_eval_generate_switch_is_validated():
    assert EvalConfig().generate is True
    from tpo_jax.config import ConfigError
    with pytest.raises(ConfigError, match="'eval.generate': must be true or false"):
        EvalConfig(generate="yes").validate()


def test_summary_table_shows_teacher_and_generated():
    from tpo_jax.train.report import generation_table

    after = {"rec/acc@0.5": 0.75, "gen/rec/acc@0.5": 0.5, "gen/rec/emitted": 0.9, "mc/acc": 0.4, "gen/mc/acc": 0.3,
             "gen/mc/emitted": 1.0, "highlight/hit@1": 0.6, "gen/highlight/hit@1": 0.2, "gen/temporal/emitted": 0.5}
    lines = generation_table(after).splitlines()
    assert lines[1].split() == ["metric", "teacher", "generated", "emitted"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows == {"rec/acc@0.5": ["0.750", "0.500", "0.900"], "highlight/hit@1": ["0.600", "0.200", "0.500"],
                    "mc/acc": ["0.400", "0.300", "1.000"]}

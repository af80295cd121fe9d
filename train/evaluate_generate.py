"""Generation-mode evaluation: the model answers each validation prompt itself, and its decoded answer and the
heads' outputs at the task tokens it emitted are scored with the metrics of `tpo_jax.train.metrics`.

The examples are those of the teacher-forced evaluation (`tpo_jax.data.pipeline.eval_batches`; the cloze
multiple-choice rows are a likelihood score and have no generated form). Each example's prompt is its input up
to the first answer token (`prompt_lengths`), with its frames and `<track_box>` boxes; `generate` decodes it
greedily with the training-style side step (`side_step="training"`: `<box_begin>` is followed by `<boxes>`
and the head reads that token's hidden state, as in the training data's `<box_begin><boxes>` answers).
Metrics (keys: `gen/` + the teacher-forced key, computed by the same `MetricAccumulator` code):

* region: rec/acc@0.5, rec/miou of the box at the j-th generated `<boxes>` against ground-truth box j; no such
  token: a miss (IoU 0).
* temporal: temporal/r1@{0.3,0.5,0.7}, temporal/miou of the top-1 window in normalised time (duration 1, as
  teacher forcing); no `<temp>`: a miss (IoU 0). highlight/hit@1, highlight/map of the per-clip saliency, over
  the examples whose temporal head ran (the others are left out; `count` says how many are in).
* mc: mc/acc of the option letter the answer starts with ("(B) text"); no option letter: wrong.
* mask: mask/l1 of the SAM2 prompt at the generated `<tracking>` against the box prompt of the target box (as
  teacher forcing); no `<tracking>`: left out.

`gen/<task>/emitted` (task rec, temporal, mc, mask) is the fraction of the task's examples whose expected task
token was generated and read by its head (for mc: whose answer starts with an option letter, "(X)").

Prompts are generated in batches of `batch_size` rows (the last one padded to a power of two), all padded to
one length bucket (the batches' sequence length): one compile of the decode for the whole evaluation.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax.data.conversation import IGNORE
from tpo_jax.data.records import TASKS
from tpo_jax.data.templates import OPTION_LETTERS
from tpo_jax.generate import GenerationConfig, GenerationRequest, GenerationResult, Generator
from tpo_jax.heads.box_ops import span_cw_to_xx
from tpo_jax.model_tokenizer import model_tokenizer
from tpo_jax.train.metric_accumulator import MetricAccumulator

PREFIX = "gen/"
#: the synthetic answers are at most 8 tokens with the end token ("(B) A square." and the task-token pairs)
MAX_NEW_TOKENS = 12
BATCH_SIZE = 64
MISS_BOX = (1.0, 1.0, 0.0, 0.0)  # an inverted box: IoU 0 with any box (`box_iou`)
MISS_SPAN = (1.0, 0.0)  # an inverted span: IoU 0 with any span (`span_iou`)
LETTER = re.compile(r"\s*\(?([A-Z])\)")  # "(B) text" (or "B) text"): the option letter
EMITTED = {"region": "rec", "temporal": "temporal", "mc": "mc", "mask": "mask"}  # task → its metric prefix


def generation_config(seq_len: int, max_new_tokens: int = MAX_NEW_TOKENS) -> GenerationConfig:
    """Greedy decoding with the training-style side step, every prompt padded to `seq_len` (one bucket)."""
    return GenerationConfig(max_new_tokens=max_new_tokens, strategy="greedy", side_step="training",
                            buckets=(seq_len,)).validate()


def prompt_lengths(labels: np.ndarray) -> np.ndarray:
    """(B,) prompt length of each row: the index of its first answer token. Labels are aligned with the input
    ids (the label of answer token t is token t itself, -100 elsewhere; `tpo_jax.losses.shifted_labels` moves
    them one to the left so that position t - 1 predicts it), so the prompt is `input_ids[:start]`."""
    answer = np.asarray(labels) != IGNORE
    if not answer.any(axis=1).all():
        raise ValueError("an evaluation row has no answer tokens (labels all -100)")
    return np.argmax(answer, axis=1)


def make_requests(batch: Mapping[str, np.ndarray]) -> list[GenerationRequest]:
    """One request per row of an evaluation batch: the prompt, its frames and `<track_box>` boxes, the temporal
    query, duration 1 (spans in normalised time)."""
    starts = prompt_lengths(batch["labels"])
    return [GenerationRequest(
        batch["input_ids"][i, :n], batch["visual_mask"][i, :n], batch["frames"][i], duration=1.0,
        query_ids=batch["temporal_text_ids"][i][batch["text_mask"][i] > 0].tolist(),
        track_boxes=batch["track_boxes"][i]) for i, n in enumerate(starts)]


def option_letter(text: str | None) -> int:
    """Index of the option letter an answer starts with ("(B) text" → 1), or -1."""
    m = LETTER.match(text or "")
    return OPTION_LETTERS.find(m.group(1)) if m else -1


class GenerationAccumulator(MetricAccumulator):
    """Collects the generated answers of many batches; `compute` gives the `gen/...` metrics (module docstring)
    with the teacher-forced accumulator's metric code."""

    def __init__(self):
        super().__init__()
        self.emitted: dict[str, list[bool]] = {task: [] for task in EMITTED}

    def update(self, results: Sequence[GenerationResult], batch: Mapping[str, Any],
               mask_target: np.ndarray | None = None) -> None:
        """`results[i]` answers row i of `batch` (normalised boxes, spans in normalised time); `mask_target`
        (B, 3, P) the SAM2 box prompt of `mask_boxes` (needed when the batch has mask rows)."""
        b = {k: np.asarray(v) for k, v in batch.items()}
        tasks = [TASKS[t] for t in b["task_id"]]
        for i, (res, task) in enumerate(zip(results, tasks)):
            if task == "region" and b["region_valid"][i].any():
                self._region(res, b["region_boxes"][i], b["region_valid"][i])
            elif task == "temporal" and b["temporal_valid"][i]:
                self._temporal(res, b, i)
            elif task == "mc" and b["mc_answer"][i] >= 0:
                self._mc(res, b["mc_options"][i], b["mc_answer"][i])
            elif task == "mask" and b["mask_valid"][i]:
                self.emitted["mask"].append(res.track is not None)
                if res.track is not None:
                    self._add("mask_pred", np.asarray(res.track["prompt"], np.float32)[None])
                    self._add("mask_target", np.asarray(mask_target)[i:i + 1])

    def _region(self, res, gt, valid):
        boxes = [r["box_normalized"] for r in res.region]
        pred = [boxes[j] if j < len(boxes) else MISS_BOX for j in range(len(gt))]
        self._add("region_pred", np.asarray(pred, np.float32)[valid])
        self._add("region_gt", gt[valid])
        self.emitted["region"].append(bool(boxes))

    def _temporal(self, res, b, i):
        t = res.temporal
        self.emitted["temporal"].append(t is not None)
        self._add("temporal_pred", np.asarray([t["span"] if t else MISS_SPAN], np.float64))
        self._add("temporal_gt", np.asarray(span_cw_to_xx(b["spans"][i:i + 1].astype(np.float64))))
        self._add("temporal_gt_valid", b["span_valid"][i:i + 1].astype(bool))
        if t is not None:  # highlight: only the examples whose temporal head ran
            saliency = np.zeros(b["saliency_labels"].shape[1], np.float32)
            saliency[:len(t["saliency"])] = t["saliency"]
            self._add("saliency", saliency[None])
            self._add("saliency_labels", b["saliency_labels"][i:i + 1])
            self._add("vid_mask", b["vid_mask"][i:i + 1])

    def _mc(self, res, options, answer):
        k = int(np.sum(options >= 0))
        letter = option_letter(res.text)
        chosen = letter if 0 <= letter < k else len(options)  # the extra last column: no option (never right)
        scores = np.zeros((1, len(options) + 1), np.float32)
        scores[0, chosen] = 1.0
        self._add("mc_scores", scores)
        self._add("mc_answer", np.asarray([answer]))
        self.emitted["mc"].append(0 <= letter < k)

    def compute(self) -> dict[str, float]:
        out = {PREFIX + k: v for k, v in super().compute().items() if not k.startswith("mc_cloze/")}
        for task, prefix in EMITTED.items():
            seen = self.emitted[task]
            out[f"{PREFIX}{prefix}/emitted"] = float(np.mean(seen)) if seen else float("nan")
        return out


@functools.partial(jax.jit, static_argnames="graphdef")
def _mask_targets(graphdef, state, boxes):
    """SAM2 box prompts (B, 3, P) of the target boxes (B, 4): the mask metric's target, as teacher forcing."""
    return nnx.merge(graphdef, state).sam2.box_prompt(boxes).astype(jnp.float32)


def _rows(batches: Iterable[Mapping[str, Any]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """The rows of the (non-cloze) batches regrouped into batches of `size` rows (the last one shorter)."""
    buf: list[dict[str, np.ndarray]] = []
    for batch in batches:
        if "cloze_question" in batch:
            continue
        buf.append({k: np.asarray(v) for k, v in batch.items()})
        while sum(len(x["labels"]) for x in buf) >= size:
            merged = {k: np.concatenate([x[k] for x in buf]) for k in buf[0]}
            yield {k: v[:size] for k, v in merged.items()}
            buf = [{k: v[size:] for k, v in merged.items()}]
    rest = {k: np.concatenate([x[k] for x in buf]) for k in buf[0]} if buf else {}
    if rest and len(rest["labels"]):
        yield rest


def evaluate_generate(graphdef, state, batches: Iterable[Mapping[str, Any]], *,
                      config: GenerationConfig | None = None, batch_size: int = BATCH_SIZE,
                      accumulator: GenerationAccumulator | None = None,
                      tokenizer=None) -> dict[str, float]:
    """The `gen/...` metrics of the model `nnx.merge(graphdef, state)` over `batches` (numpy dicts of
    `eval_batches`). `config`: default `generation_config` of the batches' sequence length. `tokenizer`: default
    the model's (`model_tokenizer(model.cfg)`), which also gives the stop / pad ids."""
    batches = [b for b in batches if "cloze_question" not in b]
    acc = GenerationAccumulator() if accumulator is None else accumulator
    if not batches:
        return acc.compute()
    model = nnx.merge(graphdef, state)
    if config is None:
        config = generation_config(max(np.shape(b["input_ids"])[1] for b in batches))
    tok = tokenizer if tokenizer is not None else model_tokenizer(model.cfg)
    generator = Generator(model, config, tok)
    for rows in _rows(batches, batch_size):
        n = len(rows["labels"])
        requests = make_requests(rows)
        padded = min(batch_size, 1 << (n - 1).bit_length())  # few shapes: few compiles
        results = generator(requests + [requests[0]] * (padded - n))[:n]
        target = None
        if rows["mask_valid"].any():
            target = jax.device_get(_mask_targets(generator.graphdef, generator.state, jnp.asarray(rows["mask_boxes"])))
        acc.update(results, rows, target)
    return acc.compute()


def short(metrics: Mapping[str, float]) -> str:
    """The headline `gen/...` metrics on one line, each task with the fraction that emitted its token."""
    keys = (("rec/acc@0.5", "rec"), ("temporal/r1@0.5", "temporal"), ("mc/acc", "mc"), ("mask/l1", "mask"))
    return ", ".join(f"{PREFIX}{k} {metrics[PREFIX + k]:.3f} (emitted {metrics[f'{PREFIX}{t}/emitted']:.2f})"
                     for k, t in keys if PREFIX + k in metrics)


__all__ = ["BATCH_SIZE", "GenerationAccumulator", "MAX_NEW_TOKENS", "evaluate_generate", "generation_config",
           "make_requests", "option_letter", "prompt_lengths", "short"]

"""A fixed, hand-made batch for unit tests, benchmarks and the forward demo: clips of one coloured
square on a grey background, one task per example (re-exported by `tpo_jax.data.synthetic`).

Every example is the model's one-turn prompt followed by a supervised answer and the end of turn
(`tpo_jax.data.conversation.tokenize_dialogue`): arch "videochat", the demo prompt (MODEL-SPEC §4.3) and `</s>`;
arch "llava_ov", LLaVA-OV's ChatML prompt (default system message, one `<video>` block) and `<|im_end|>`, padded with
`<|endoftext|>`:

| task         | question                                   | answer                      | head target                        |
|--------------|--------------------------------------------|-----------------------------|------------------------------------|
| region       | "Where is the square in the first frame?"  | `<box_begin><boxes>`        | the square's box (normalised xyxy) |
| temporal     | "When is the square visible?"              | `<time_begin><temp>`        | the visible span + per-clip saliency |
| mask         | "Track the square."                        | `<track_begin><tracking>`   | the square's first-frame box       |
| conversation | "What colour is the square?"               | the colour name             | —                                  |

Everything is deterministic in the seed. The procedural dataset with all tasks, templates and exact
ground truth is `tpo_jax.data.synthetic` (`SyntheticConfig`, `make_record`) with `tpo_jax.data.conversation`.
"""

from __future__ import annotations

import numpy as np

from tpo_jax.config import TPOConfig
from tpo_jax.data.conversation import SALIENCY_MAX, tokenize_dialogue
from tpo_jax.tokenizer import MultimodalTokenizer
from tpo_jax.vit import IMAGENET_MEAN, IMAGENET_STD

TASKS = ("region", "temporal", "mask", "conversation")
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9)}
QUESTIONS = {
    "region": "Where is the square in the first frame?",
    "temporal": "When is the square visible?",
    "mask": "Track the square.",
    "conversation": "What colour is the square?",
}
ANSWERS = {"region": "<box_begin><boxes>", "temporal": "<time_begin><temp>", "mask": "<track_begin><tracking>"}


def synthetic_clip(rng: np.random.Generator, num_frames: int, size: int, always_visible: bool = True):
    """Frames (T, H, W, 3) normalised, the per-frame boxes (T, 4) and visibility (T,), the colour name.

    The square is visible in every frame (`always_visible`) or in one random run of frames."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    side = int(rng.integers(max(2, size // 5), max(3, size // 2)))
    start = 0 if always_visible else int(rng.integers(0, num_frames))
    end = num_frames - 1 if always_visible else int(rng.integers(start, num_frames))  # inclusive
    x0, y0 = rng.integers(0, size - side, 2)
    vx, vy = rng.integers(-2, 3, 2)
    frames = np.full((num_frames, size, size, 3), 0.5, np.float32)
    boxes = np.zeros((num_frames, 4), np.float32)
    visible = np.zeros(num_frames, bool)
    for t in range(num_frames):
        x = int(np.clip(x0 + vx * t, 0, size - side))
        y = int(np.clip(y0 + vy * t, 0, size - side))
        boxes[t] = (x / size, y / size, (x + side) / size, (y + side) / size)
        if start <= t <= end:
            frames[t, y:y + side, x:x + side] = COLOURS[colour]
            visible[t] = True
    frames += rng.normal(0, 0.02, frames.shape).astype(np.float32)
    frames = (frames.clip(0, 1) - IMAGENET_MEAN) / IMAGENET_STD
    return frames.astype(np.float32), boxes, visible, colour


#: `synthetic_batch`'s default sequence length: 64 (arch "videochat"), or the visual rows + this many (arch
#: "llava_ov": the ChatML template and the tiny Qwen2 tokenizer's short pieces need more text tokens).
LLAVA_OV_TEXT_TOKENS = 96


def synthetic_batch(cfg: TPOConfig, batch_size: int, *, seq_len: int | None = None, seed: int = 0,
                    tasks: tuple[str, ...] = TASKS, tokenizer=None) -> dict:
    """One batch of `batch_size` examples cycling through `tasks`, as the dict the train step takes.

    Either architecture: frames at `cfg.frame_size` × `cfg.num_frames`, the prompt form and tokenizer of the model
    (`tokenizer`, default: `MultimodalTokenizer` for arch "videochat", `model_tokenizer(cfg)` for "llava_ov").
    `seq_len` None: 64 (videochat) or `cfg.num_visual_tokens + LLAVA_OV_TEXT_TOKENS` (llava_ov); ValueError if an
    example does not fit."""
    if tokenizer is not None:
        tok = tokenizer
    elif cfg.arch == "llava_ov":
        from tpo_jax.model_tokenizer import model_tokenizer  # noqa: PLC0415  (loads transformers)

        tok = model_tokenizer(cfg)
    else:
        tok = MultimodalTokenizer(num_visual_tokens=cfg.num_visual_tokens)
    if seq_len is None:
        seq_len = 64 if cfg.arch == "videochat" else cfg.num_visual_tokens + LLAVA_OV_TEXT_TOKENS
    rng = np.random.default_rng(seed)
    t_frames, size = cfg.num_frames, cfg.frame_size
    lv = cfg.num_clips
    tmp = cfg.heads.temporal
    lq, ns, kr = tmp.max_text_len, tmp.max_spans, cfg.heads.region.max_slots
    b = batch_size
    out = {
        "input_ids": np.full((b, seq_len), tok.pad_id, np.int32), "attention_mask": np.zeros((b, seq_len), np.int32),
        "labels": np.full((b, seq_len), -100, np.int32), "visual_mask": np.zeros((b, seq_len), bool),
        "frames": np.zeros((b, t_frames, size, size, 3), np.float32),
        "region_boxes": np.zeros((b, kr, 4), np.float32), "region_valid": np.zeros((b, kr), bool),
        "mask_boxes": np.zeros((b, 4), np.float32), "mask_valid": np.zeros((b,), bool),
        "temporal_valid": np.zeros((b,), bool), "spans": np.zeros((b, ns, 2), np.float32),
        "span_valid": np.zeros((b, ns), bool), "saliency_labels": np.zeros((b, lv), np.float32),
        "saliency_pos": np.zeros((b, 2), np.int32), "saliency_neg": np.zeros((b, 2), np.int32),
        "vid_mask": np.ones((b, lv), np.float32), "vid": np.arange(b, dtype=np.int32),  # each clip its own video
        "temporal_text_ids": np.zeros((b, lq), np.int32), "text_mask": np.zeros((b, lq), np.float32),
    }
    for i in range(b):
        task = tasks[i % len(tasks)]
        frames, boxes, visible, colour = synthetic_clip(rng, t_frames, size, always_visible=task != "temporal")
        question = QUESTIONS[task]
        answer = ANSWERS.get(task, colour)
        ((prompt_ids, visual, answer_ids),) = tokenize_dialogue(tok, [(question, answer)], is_video=True,
                                                                 frame_times=None,
                                                                 num_visual_tokens=cfg.num_visual_tokens)
        ids = np.concatenate([prompt_ids, answer_ids])
        if len(ids) > seq_len:
            raise ValueError(f"synthetic example of {len(ids)} tokens does not fit seq_len {seq_len}")
        n = len(ids)
        out["input_ids"][i, :n] = ids
        out["attention_mask"][i, :n] = 1
        out["labels"][i, len(prompt_ids):n] = answer_ids
        out["visual_mask"][i, :len(prompt_ids)] = visual
        out["frames"][i] = frames
        if task == "region":
            out["region_boxes"][i, 0] = boxes[0]
            out["region_valid"][i, 0] = True
        elif task == "mask":
            out["mask_boxes"][i] = boxes[0]
            out["mask_valid"][i] = True
        elif task == "temporal":
            clips = visible.reshape(lv, -1).any(axis=1)
            first, last = np.flatnonzero(clips)[[0, -1]]
            out["spans"][i, 0] = ((first + last + 1) / 2 / lv, (last + 1 - first) / lv)
            out["span_valid"][i, 0] = True
            out["temporal_valid"][i] = True
            out["saliency_labels"][i] = np.where(clips, SALIENCY_MAX, 0.0)
            pos, neg = np.flatnonzero(clips), np.flatnonzero(~clips)
            out["saliency_pos"][i] = rng.choice(pos, 2)
            out["saliency_neg"][i] = rng.choice(neg, 2) if len(neg) else rng.choice(pos, 2)
            q = tok.encode(question, add_bos=False)[:lq]
            out["temporal_text_ids"][i, :len(q)] = q
            out["text_mask"][i, :len(q)] = 1.0
    return out

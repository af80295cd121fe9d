"""One decoded `Record` → the fixed-shape arrays of one training example (the batch format of
`tpo_jax.losses`, plus `task_id`, `mc_options`, `mc_answer`, `mc_letter_pos`, `answer_start`).

Token layout (MODEL-SPEC §4.3, demo form, as `tpo_jax.data.prompts.encode_demo_prompt` builds it):

    [BOS] "[INST] <Video>"  ×num_visual_tokens placeholder ids 0  [BOS] "</Video>[/INST]"
    [BOS] " [INST] " user_1 " [/INST] "   answer_1 </s>
    [BOS] " [INST] " user_2 " [/INST] "   answer_2 </s>  ...                 (further turns, same form)
    pad (id 0, attention 0) to `seq_len`

A record's `instruction` (system text, e.g. VideoChat2's "i") is put before the first "[INST]", in the
first segment, followed by a newline: `[BOS] instruction "\n[INST] <Video>" …` (the `[instruction]` slot
of MODEL-SPEC §4.3's library form; the demo form has none, so without an instruction the ids are the demo's).

Images use `<Image>` and their one frame is repeated to the model's frame count. A user text with
"timestamp" gets the frame-time sentence of the demo. Labels are the answer ids (incl. `</s>`) and
-100 everywhere else (prompt, placeholders, padding); each answer is tokenised on its own (its first
piece carries the SentencePiece dummy prefix, as after the demo prompt's trailing space).

Arch "llava_ov" (`LlavaOVTokenizer`, Qwen2): LLaVA-OV's ChatML template (`chatml_prompt_texts`), every sample a video
(an image's frame repeated to the model's frame count, as above):

    <|im_start|>system\\n{instruction or DEFAULT_SYSTEM_PROMPT}<|im_end|>\\n<|im_start|>user\\n
    <video> ×num_visual_tokens (visual_mask)  "\\n" [timestamp sentence + " "] user_1
    <|im_end|>\\n<|im_start|>assistant\\n
    answer_1 <|im_end|>
    \\n<|im_start|>user\\n user_2 <|im_end|>\\n<|im_start|>assistant\\n   answer_2 <|im_end|>  ...
    pad (`<|endoftext|>`, attention 0) to `seq_len`

The ids are `LlavaOVTokenizer.build_input_ids` of the whole conversation (`add_generation_prompt=False`) without its
final "\\n", and the labels are exactly its `assistant_mask` positions (each answer and its `<|im_end|>`); the "\\n"
after an `<|im_end|>` is unlabelled, part of the next turn's prompt (tests/test_conversation_llava_ov.py).

What each task puts in the user text / answer (templates in `tpo_jax.data.templates`):

| task         | user text                              | answer                         | targets                         |
|--------------|----------------------------------------|--------------------------------|---------------------------------|
| conversation | each turn's question                   | each turn's answer             | —                               |
| mc           | question + "(A) …" option lines        | "(B) text"                     | mc_options, mc_answer, mc_letter_pos |
| region       | Tab. 22 template with the expression   | `<box_begin><boxes>` per box   | region_boxes / region_valid     |
| temporal     | Tab. 20 template with the query        | `<time_begin><temp>`           | spans (center, width)/duration, saliency per clip, vid |
| mask         | Tab. 21 (`<track_box>`) or Tab. 23     | `<track_begin><tracking>`      | mask_boxes; track_boxes input   |

Saliency labels are on the QVHighlights scale 0–12 (the sum of three annotators' 0–4 scores, as the
Moment-DETR / CG-DETR data): the rank levels of the CG-DETR saliency loss (r = 1..11) assume it. `vid` is a
31-bit CRC of the record's video (`video_key`): the temporal criterion pairs a query only with another
video's clips (`tpo_jax.heads.temporal.batch`).

Fixed length: an example longer than `seq_len` drops whole trailing conversation turns (never
part of a turn, so a placeholder block or a task-token pair is never cut); if even the first turn
does not fit, or a target does not fit its static slots (more spans than `max_spans`, more
`<track_box>` than `track_slots`, more options than `max_options`), `RecordError` is raised so the
pipeline skips and counts the record. Extra boxes beyond `region_slots` keep their `<boxes>` tokens
(LM loss) without a head target.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Sequence

import numpy as np

from tpo_jax.data.prompts import demo_prompt, encode_demo_prompt, timestamp_message
from tpo_jax.data.records import TASKS, Record, RecordError
from tpo_jax.data.templates import OPTION_LETTERS, TASK_ANSWERS, mc_answer_text, mc_question, task_instruction
from tpo_jax import config as C
from tpo_jax.llava_ov.tokenizer import DEFAULT_SYSTEM_PROMPT, LlavaOVTokenizer, render_chat
from tpo_jax.tokenizer import MultimodalTokenizer, TokenizedPrompt

#: Either model's tokenizer (`tpo_jax.model_tokenizer.model_tokenizer`).
Tokenizer = MultimodalTokenizer | LlavaOVTokenizer

IGNORE = -100
SALIENCY_MAX = 12.0  # saliency label of a clip fully inside a span (QVHighlights scale 0..12: 3 annotators × 0..4)
VIDEO_ID_SEP = "#"  # a record id "<video id>#<rest>" names its video (tpo_jax.data.formats temporal records)


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """Static shapes of one example."""

    seq_len: int
    num_frames: int
    img_size: int
    num_clips: int  # Lv: temporal positions of the video (frames / tubelet)
    num_visual_tokens: int
    region_slots: int = 1
    max_spans: int = 2
    max_text_len: int = 16
    track_slots: int = 1
    max_options: int = 5
    saliency_pairs: int = 2
    track_box_id: int = C.TRACK_BOX_ID  # the model's `<track_box>` id (`TPOConfig.task_tokens.track_box`)

    @classmethod
    def from_model(cls, cfg: C.TPOConfig, seq_len: int, *, track_slots: int = 1, max_options: int = 5):
        """The shapes of `cfg`'s examples, for either architecture (`TPOConfig.num_frames`, `frame_size`,
        `num_clips`, `num_visual_tokens`; the task-token ids of `cfg.task_tokens`)."""
        return cls(seq_len=seq_len, num_frames=cfg.num_frames, img_size=cfg.frame_size, num_clips=cfg.num_clips,
                   num_visual_tokens=cfg.num_visual_tokens, region_slots=cfg.heads.region.max_slots,
                   max_spans=cfg.heads.temporal.max_spans, max_text_len=cfg.heads.temporal.max_text_len,
                   track_slots=track_slots, max_options=max_options, track_box_id=cfg.task_tokens.track_box)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of every key of one example."""
        L, T, S = self.seq_len, self.num_frames, self.img_size
        return {
            "input_ids": ((L,), np.int32), "attention_mask": ((L,), np.int32), "labels": ((L,), np.int32),
            "visual_mask": ((L,), np.bool_), "frames": ((T, S, S, 3), np.float32),
            "track_boxes": ((self.track_slots, 4), np.float32),
            "region_boxes": ((self.region_slots, 4), np.float32), "region_valid": ((self.region_slots,), np.bool_),
            "mask_boxes": ((4,), np.float32), "mask_valid": ((), np.bool_),
            "temporal_valid": ((), np.bool_), "spans": ((self.max_spans, 2), np.float32),
            "span_valid": ((self.max_spans,), np.bool_), "saliency_labels": ((self.num_clips,), np.float32),
            "saliency_pos": ((self.saliency_pairs,), np.int32), "saliency_neg": ((self.saliency_pairs,), np.int32),
            "vid_mask": ((self.num_clips,), np.float32), "vid": ((), np.int32),
            "temporal_text_ids": ((self.max_text_len,), np.int32), "text_mask": ((self.max_text_len,), np.float32),
            "task_id": ((), np.int32), "mc_options": ((self.max_options,), np.int32), "mc_answer": ((), np.int32),
            "mc_letter_pos": ((), np.int32), "answer_start": ((), np.int32),
        }

    def empty(self) -> dict[str, np.ndarray]:
        out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.shapes().items()}
        out["labels"][:] = IGNORE
        out["vid_mask"][:] = 1.0
        out["mc_options"][:] = -1
        out["mc_answer"][...] = -1
        out["mc_letter_pos"][...] = -1
        return out


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack examples into a batch (leading axis B)."""
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def video_key(record: Record) -> str:
    """The identity of a record's video: the file name without extension for a video path, else the part of
    the record id before "#" (the format parsers give temporal records ids "<video id>#<n>", which survive
    `tpo-build-data`), else the whole id (a synthetic clip is its record's own)."""
    if isinstance(record.video, str):
        return os.path.splitext(os.path.basename(record.video.rstrip("/")))[0]
    return record.id.split(VIDEO_ID_SEP, 1)[0]


def video_id(record: Record) -> int:
    """`video_key` as a non-negative int32 (CRC-32, 31 bits): the batch's `vid`."""
    return zlib.crc32(video_key(record).encode("utf-8")) & 0x7FFFFFFF


def _fail(record: Record, msg: str, kind: str = "template"):
    raise RecordError(f"record {record.id!r} ({record.task}): {msg}", kind)


def _is_video(record: Record) -> bool:
    if record.image is not None:
        return False
    return not (record.frames is not None and len(record.frames) == 1)


def dialogue(record: Record, seed: int) -> list[tuple[str, str]]:
    """(user text, answer) turns of a record, with the task templates and task-token answers."""
    task = record.task
    if task == "conversation":
        return [(q, a) for q, a in record.turns]
    if task == "mc":
        return [(mc_question(record.question, record.options), mc_answer_text(record.options, record.mc_answer))]
    pair = TASK_ANSWERS[task]
    if record.answer and pair in record.answer:
        answer = record.answer
    elif task == "region":
        answer = ", ".join([pair] * len(record.boxes))
    else:
        answer = pair
    return [(task_instruction(task, record.question, seed), answer)]


def instruction_prefix(instruction: str) -> str:
    """The text put before the first "[INST] <Video>": the instruction (trailing whitespace stripped) + "\n",
    or "" without one (MODEL-SPEC §4.3, library form: `[instruction] + "[INST] " + …`)."""
    instruction = instruction.rstrip()
    return instruction + "\n" if instruction else ""


def tokenize_dialogue(tok: Tokenizer, turns: list[tuple[str, str]], *, is_video: bool,
                      frame_times: Sequence[float] | None, instruction: str = "", num_visual_tokens: int | None = None):
    """Per turn: (prompt ids, prompt visual flags, answer ids incl. the end of turn), in either model's form.

    `MultimodalTokenizer` (arch "videochat"): the demo form of the module docstring; `instruction` goes before the
    first turn's "[INST] <Video>" (same segment, so no extra BOS); answers end with `</s>`.

    `LlavaOVTokenizer` (arch "llava_ov"): the ChatML form of `chatml_prompt_texts` (every sample is a video: one
    `<video>`, expanded to `num_visual_tokens` ids flagged visual); answers end with `<|im_end|>`."""
    if isinstance(tok, LlavaOVTokenizer):
        return _tokenize_chatml(tok, turns, frame_times=frame_times, instruction=instruction,
                                num_visual_tokens=num_visual_tokens)
    out = []
    for k, (question, answer) in enumerate(turns):
        if k == 0 and instruction_prefix(instruction):
            part1, part2 = demo_prompt(question, is_video=is_video, frame_times=frame_times)
            p = TokenizedPrompt.concatenate([tok.build_input_ids(instruction_prefix(instruction) + part1,
                                                                 is_video=is_video),
                                             tok.build_input_ids(part2, is_video=is_video)], is_video=is_video)
        elif k == 0:
            p = encode_demo_prompt(tok, question, is_video=is_video, frame_times=frame_times, max_length=None)
        else:
            p = tok.build_input_ids(demo_prompt(question, is_video=is_video)[1], is_video=is_video)
        out.append((p.input_ids, p.visual_index,
                    np.asarray(tok.encode(answer, add_bos=False) + [tok.eos_id], np.int32)))
    return out


def chatml_user_text(question: str, frame_times: Sequence[float] | None) -> str:
    """The text of the first user turn after `<video>\\n`: the question, preceded by the frame-time sentence
    (`prompts.timestamp_message`, stripped, then a space) when the question contains "timestamp" and frame times are
    given (the rule of the demo form)."""
    if frame_times is not None and "timestamp" in question:
        return timestamp_message(frame_times).strip() + " " + question
    return question


def chatml_prompt_texts(questions: Sequence[str], *, frame_times: Sequence[float] | None = None,
                        instruction: str = "") -> list[str]:
    """The prompt text of each turn in LLaVA-OV's chat template (`tpo_jax.llava_ov.tokenizer.render_chat`):

        turn 1:  <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<video>\\n{user text}<|im_end|>\\n
                 <|im_start|>assistant\\n
        turn k:  \\n<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n

    `system`: the record's `instruction` (verbatim) if it has non-blank text, else `DEFAULT_SYSTEM_PROMPT`; the user
    text: `chatml_user_text`. Each answer then follows as `{answer}<|im_end|>`, and the "\\n" that the template puts
    after an `<|im_end|>` opens the next turn's prompt, so prompt + answer pieces concatenate to the template's
    rendering of the whole conversation without its final "\\n"."""
    system = instruction if instruction.strip() else DEFAULT_SYSTEM_PROMPT
    texts = []
    for k, question in enumerate(questions):
        if k == 0:
            msgs = [{"role": "system", "content": [{"type": "text", "text": system}]},
                    {"role": "user", "content": [{"type": "video"},
                                                 {"type": "text", "text": chatml_user_text(question, frame_times)}]}]
            texts.append(render_chat(msgs, add_generation_prompt=True)[0])
        else:
            msgs = [{"role": "user", "content": [{"type": "text", "text": question}]}]
            texts.append("\n" + render_chat(msgs, add_generation_prompt=True)[0])
    return texts


def _tokenize_chatml(tok: LlavaOVTokenizer, turns: list[tuple[str, str]], *, frame_times: Sequence[float] | None,
                     instruction: str, num_visual_tokens: int | None):
    """`tokenize_dialogue` for `LlavaOVTokenizer`: each prompt text of `chatml_prompt_texts` tokenised on its own
    (chat tokens are single ids, so every piece boundary is a token boundary of the whole rendering), its one
    `<video>` (first turn) repeated to `num_visual_tokens` ids, as `LlavaOVTokenizer.build_input_ids` expands it;
    each answer tokenised on its own (as the model generates it after "assistant\\n") + `<|im_end|>`. ValueError if a
    text holds `<image>` / `<video>` of its own."""
    if not isinstance(num_visual_tokens, int) or num_visual_tokens <= 0:
        raise ValueError(f"arch llava_ov: num_visual_tokens (the `<video>` rows) is required, "
                         f"got {num_visual_tokens!r}")
    visual_ids = (tok.image_token_id, tok.video_token_id)
    texts = chatml_prompt_texts([q for q, _ in turns], frame_times=frame_times, instruction=instruction)
    out = []
    for k, (text, (_, answer)) in enumerate(zip(texts, turns)):
        ids = np.asarray(tok.encode(text), np.int64)
        n_video = int(np.sum(ids == tok.video_token_id))
        if n_video != (k == 0) or np.any(ids == tok.image_token_id):
            n_image = int(np.sum(ids == tok.image_token_id))
            raise ValueError(f"turn {k + 1}'s prompt holds {n_video} <video> and {n_image} <image> tokens; "
                             f"the text may not hold these placeholders itself")
        ids = np.repeat(ids, np.where(ids == tok.video_token_id, num_visual_tokens, 1)).astype(np.int32)
        answer_ids = np.asarray(tok.encode(answer) + [tok.eos_id], np.int32)
        if np.isin(answer_ids, visual_ids).any():
            raise ValueError(f"turn {k + 1}'s answer holds an <image> / <video> placeholder")
        out.append((ids, ids == tok.video_token_id, answer_ids))
    return out


def _interval_overlap(a0, a1, b0, b1):
    return np.maximum(0.0, np.minimum(a1, b1) - np.maximum(a0, b0))


def clip_saliency(record: Record, duration: float, num_clips: int) -> np.ndarray:
    """Saliency label of each of the model's `num_clips` equal clips of [0, duration].

    From `record.saliency` (clips of `record.clip_seconds`): the overlap-weighted mean of the record
    clips a model clip covers. Without it: SALIENCY_MAX × the fraction of the clip inside the spans.
    """
    edges = np.linspace(0.0, duration, num_clips + 1)
    a, b = edges[:-1, None], edges[1:, None]
    if record.saliency is not None and len(record.saliency):
        sal = np.asarray(record.saliency, np.float64)
        c = float(record.clip_seconds)
        r0 = np.arange(len(sal))[None] * c
        w = _interval_overlap(a, b, r0, r0 + c)
        total = w.sum(axis=1)
        return np.where(total > 0, (w * sal[None]).sum(axis=1) / np.maximum(total, 1e-12), 0.0).astype(np.float32)
    spans = np.asarray(record.spans, np.float64)
    inside = np.zeros(num_clips)
    for s, e in spans:  # spans may overlap: take the union by clipping each clip's coverage at 1
        inside += _interval_overlap(a[:, 0], b[:, 0], s, e)
    frac = np.minimum(inside / np.maximum(b[:, 0] - a[:, 0], 1e-12), 1.0)
    return (SALIENCY_MAX * frac).astype(np.float32)


def _saliency_pairs(labels: np.ndarray, spans_cw: np.ndarray, n: int, rng: np.random.Generator):
    """`n` positive clips (drawn from the highest-labelled) and `n` negatives (label 0; else the lowest)."""
    top = labels.max()
    if top > 0:
        pos = np.flatnonzero(labels == top)
    else:  # a span shorter than any overlap: the clip holding its centre
        pos = np.minimum((spans_cw[:, 0] * len(labels)).astype(int), len(labels) - 1)
    neg = np.flatnonzero(labels == 0)
    if len(neg) == 0:
        neg = np.flatnonzero(labels == labels.min())
    return rng.choice(pos, n).astype(np.int32), rng.choice(neg, n).astype(np.int32)


def _record_frame_index(record: Record, media, num_entries: int) -> np.ndarray:
    """Index into the record's per-frame annotation (`track_boxes`) of each sampled frame: the entry
    whose source frame (`box_frames`) is nearest; without `box_frames`, entries spread uniformly over
    the source frames (one per frame when their counts agree)."""
    idx = np.asarray(media.indices, np.float64)
    if record.box_frames is not None and len(record.box_frames) == num_entries:
        annotated = np.asarray(record.box_frames, np.float64)
        return np.abs(idx[:, None] - annotated[None]).argmin(axis=1)
    source = len(record.frames) if record.frames is not None else round(media.duration * media.fps)
    if source and source != num_entries:
        idx = np.floor(idx * num_entries / source)
    return np.clip(idx.astype(np.int64), 0, num_entries - 1)


def option_tokens(tok: Tokenizer, text: str, k: int) -> tuple[int, list[int] | None]:
    """Where the option letter sits in an answer "(X) text" and which token it is for each of the first `k`
    letters: (offset into the answer's ids, [token of "(A) text", "(B) text", …]), from the answers as tokenised,
    so it holds whether the letter is a token of its own (Mistral: "▁(", "B", ")") or merged with the bracket (a
    Qwen2 BPE may have "(B"). The offset is the first position where the answers differ; None for the tokens when
    two letters share one there."""
    seqs = [tok.encode(f"({letter}) {text}", add_bos=False) for letter in OPTION_LETTERS[:max(k, 2)]]
    offset = next((i for i in range(min(map(len, seqs))) if len({s[i] for s in seqs}) > 1), 0)
    tokens = [int(s[offset]) if offset < len(s) else -1 for s in seqs[:k]]
    return offset, tokens if len(set(tokens)) == k and min(tokens) >= 0 else None


def mc_cloze_examples(record: Record, media, spec: ExampleSpec, tok: Tokenizer, *,
                      seed: int = 0) -> list[dict]:
    """The cloze form of a multiple-choice record, for evaluation: one conversation example per option,
    the bare question (no option list) answered by that option's text. Comparing the options' answer
    log-likelihoods scores the question without asking the model to bind options to letters."""
    if record.task != "mc":
        _fail(record, "cloze examples are built from multiple-choice records")
    record.validate()
    return [build_example(dataclasses.replace(record, task="conversation", turns=[(record.question, option)],
                                              options=(), mc_answer=-1), media, spec, tok, seed=seed)
            for option in record.options]


def build_example(record: Record, media, spec: ExampleSpec, tok: Tokenizer, *, seed: int = 0) -> dict:
    """The arrays of one example (keys and shapes of `spec.shapes()`).

    `media` is the record's decoded media (`tpo_jax.data.video.Media`: normalised float32 frames (T, H, W, 3)
    with T = 1 for an image, timestamps, duration, fps, indices). `seed` picks the template and the
    saliency pairs. `tok`: the model's tokenizer (`tpo_jax.model_tokenizer.model_tokenizer`), which picks the
    prompt form (`tokenize_dialogue`), the end-of-turn id and the padding id (`tok.pad_id`, attention 0). Raises
    RecordError when the record cannot become an example of this shape.
    """
    record.validate()
    task = record.task
    out = spec.empty()
    out["task_id"][...] = TASKS.index(task)
    rng = np.random.default_rng([int(seed), 7])
    is_video = _is_video(record)

    frames = np.asarray(media.frames, np.float32)
    if frames.ndim != 4 or frames.shape[1:] != (spec.img_size, spec.img_size, 3):
        _fail(record, f"frames of shape {frames.shape}, expected (T, {spec.img_size}, {spec.img_size}, 3)", "decode")
    if not is_video and len(frames) == 1:
        frames = np.repeat(frames, spec.num_frames, axis=0)
    if len(frames) != spec.num_frames:
        _fail(record, f"{len(frames)} frames, the model takes {spec.num_frames}")
    out["frames"][:] = frames

    # --- tokens: drop whole trailing turns until the example fits ---------------------------------------------------
    if task == "mc" and len(record.options) > min(spec.max_options, len(OPTION_LETTERS)):
        _fail(record, f"{len(record.options)} options, at most {min(spec.max_options, len(OPTION_LETTERS))} supported")
    turns = dialogue(record, seed)
    times = np.asarray(media.timestamps, np.float64).tolist() if is_video else None
    try:
        pieces = tokenize_dialogue(tok, turns, is_video=is_video, frame_times=times, instruction=record.instruction,
                                   num_visual_tokens=spec.num_visual_tokens)
    except RecordError:
        raise
    except Exception as e:  # noqa: BLE001  (the tokenizer library's own errors: this record's text)
        _fail(record, f"cannot tokenize ({type(e).__name__}: {str(e)[:120]})", "tokenize")
    lengths = np.cumsum([len(p) + len(a) for p, _, a in pieces])
    keep = int(np.sum(lengths <= spec.seq_len))
    if keep == 0:
        _fail(record, f"{int(lengths[0])} tokens (first turn) do not fit seq_len {spec.seq_len}")
    out["input_ids"][:] = tok.pad_id
    pos, answer_start = 0, 0
    for prompt_ids, visual, answer_ids in pieces[:keep]:
        n, m = len(prompt_ids), len(answer_ids)
        out["input_ids"][pos:pos + n] = prompt_ids
        out["visual_mask"][pos:pos + n] = visual
        answer_start = pos + n
        out["input_ids"][answer_start:answer_start + m] = answer_ids
        out["labels"][answer_start:answer_start + m] = answer_ids
        pos = answer_start + m
    out["attention_mask"][:pos] = 1
    out["answer_start"][...] = answer_start
    ids = out["input_ids"][:pos]

    # --- task targets ----------------------------------------------------------------------------------------------
    n_track = int(np.sum(ids == spec.track_box_id))
    if n_track > spec.track_slots:
        _fail(record, f"{n_track} <track_box> tokens, the example has {spec.track_slots} track box slot(s)")
    if n_track and task != "mask":
        _fail(record, "<track_box> in the prompt of a record without track boxes")

    if task == "mc":
        k = len(record.options)
        if k > spec.max_options or k > len(OPTION_LETTERS):
            _fail(record, f"{k} options, at most {min(spec.max_options, len(OPTION_LETTERS))} supported")
        offset, letters = option_tokens(tok, record.options[record.mc_answer], k)
        pos = answer_start + offset
        if letters is None or pos >= len(ids) or ids[pos] != letters[record.mc_answer]:
            _fail(record, f"the answer {tok.decode(ids[answer_start:])!r} does not hold the option letter "
                          f"{OPTION_LETTERS[record.mc_answer]!r} as a token of its own")
        out["mc_options"][:k] = letters
        out["mc_answer"][...] = record.mc_answer
        out["mc_letter_pos"][...] = pos
    elif task == "region":
        boxes = np.asarray(record.boxes, np.float32)
        n = min(len(boxes), spec.region_slots)
        out["region_boxes"][:n] = boxes[:n]
        out["region_valid"][:n] = True
    elif task == "temporal":
        if not is_video:
            _fail(record, "temporal grounding needs a video, got an image")
        spans = np.asarray(record.spans, np.float64)
        if len(spans) > spec.max_spans:
            _fail(record, f"{len(spans)} spans, the model takes at most max_spans={spec.max_spans}")
        d = float(record.duration)
        cw = np.stack([(spans[:, 0] + spans[:, 1]) / 2 / d, (spans[:, 1] - spans[:, 0]) / d], axis=-1).clip(0, 1)
        out["spans"][:len(cw)] = cw
        out["span_valid"][:len(cw)] = True
        out["temporal_valid"][...] = True
        out["vid"][...] = video_id(record)
        labels = clip_saliency(record, d, spec.num_clips)
        out["saliency_labels"][:] = labels
        out["saliency_pos"][:], out["saliency_neg"][:] = _saliency_pairs(labels, cw, spec.saliency_pairs, rng)
        q = tok.encode(record.question, add_bos=False)[:spec.max_text_len]
        out["temporal_text_ids"][:len(q)] = q
        out["text_mask"][:len(q)] = 1.0
    elif task == "mask":
        if not is_video:
            _fail(record, "tracking needs a video, got an image")
        boxes = np.asarray(record.track_boxes, np.float32)
        visible = (np.ones(len(boxes), bool) if record.track_visible is None
                   else np.asarray(record.track_visible, bool))
        if len(visible) != len(boxes):
            _fail(record, f"track_visible has {len(visible)} entries for {len(boxes)} track_boxes")
        idx = _record_frame_index(record, media, len(boxes))
        seen = np.flatnonzero(visible[idx])
        if len(seen) == 0:
            _fail(record, "the tracked object is not visible in any sampled frame")
        if n_track and seen[0] != 0:
            _fail(record, "tracking prompt, but the object is not visible in the first sampled frame")
        box = boxes[idx[seen[0]]]
        out["mask_boxes"][:] = box
        out["mask_valid"][...] = True
        out["track_boxes"][:n_track] = box
    return out

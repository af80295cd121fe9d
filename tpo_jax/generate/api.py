"""`generate`: batches requests (left padding to a length bucket), runs the compiled decode and the task
heads, and returns one `GenerationResult` per request."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax.generate import heads as H
from tpo_jax.generate import track as T
from tpo_jax.generate.decode import DecodeOutput, compiled_decode
from tpo_jax.generate.settings import KINDS, GenerationConfig, GenerationError, bucket_length, check_context
from tpo_jax.config import TPOConfig


@dataclasses.dataclass
class GenerationRequest:
    """One prompt. `input_ids` / `visual_mask` (L,) in the model's prompt form (`tpo_jax.data.generation_prompt.
    encode_question`, or the tokenizer's `build_input_ids`); `frames` (T, H, W, 3) normalised at `cfg.frame_size`
    (T = cfg.num_frames for a video, 1 for an image; arch "llava_ov" repeats an image's frame to cfg.num_frames,
    its prompt always has the video's rows) or None;
    `frame_size` (height, width) of the source media (boxes in pixels), `duration` seconds (spans in
    seconds); `query_ids`: the question's token ids (temporal head, model features); `temporal_features`:
    precomputed temporal-head features (`load_temporal_features`), used instead of the model's;
    `track_boxes` (K, 4): normalised xyxy boxes of the prompt's `<track_box>` tokens, in order (as training's
    `track_boxes`; without them a `<track_box>` is fed as its plain embedding); `track_frames`: every frame of
    the video as SAM2 inputs (T, S, S, 3) (`tpo_jax.sam2.frames.sam2_frames`), or a zero-argument callable
    returning them (read only when the answer tracks): a `<track_begin>` answer then gets per-frame masks
    (`tpo_jax.generate.track`), from the first tracking box when the request has one (the released demo's
    rule), else from the mask head's prompt."""
    input_ids: Any
    visual_mask: Any = None
    frames: Any = None
    frame_size: tuple[int, int] | None = None
    duration: float | None = None
    query_ids: Sequence[int] | None = None
    temporal_features: H.TemporalFeatures | None = None
    track_boxes: Any = None
    track_frames: Any = None


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids, the stop token excluded
    text: str | None  # decoded with skip_special_tokens (task tokens kept), when a tokenizer is given
    finish_reason: str  # "stop" or "length"
    region: list[dict]  # per `<box_begin>`: {"box": [x0, y0, x1, y1] pixels, "box_normalized": [...]}
    temporal: dict | None  # {"span": [start, end] s, "score", "spans": [[s, e, score]...], "saliency", "clips"}
    # {"prompt": (3, P) SAM2 sparse prompt, "box": pixels, "box_normalized"}; with track_frames also
    # "prompt_source" ("track_embed" / "box"), per-frame "mask_boxes" (pixels or None) and "object_scores"
    track: dict | None
    notes: list[str] = dataclasses.field(default_factory=list)
    # numpy arrays: "task_hidden" (K + 2, D) slot states, "task_slots" (K + 2,) which are filled, and the raw
    # head outputs (region_boxes, pred_spans, pred_logits, saliency, track_prompt, track_box, ...; with masks
    # "track_masks" (T, h, w) bool and "track_low_res" logits); not in JSON
    raw: dict = dataclasses.field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "raw"}


@functools.lru_cache(maxsize=8)
def default_tokenizer(cfg: TPOConfig):
    """`model_tokenizer(cfg)`, loaded once per config (the Qwen2 tokenizer takes seconds to load)."""
    from tpo_jax.model_tokenizer import model_tokenizer  # noqa: PLC0415
    return model_tokenizer(cfg)


class Generator:
    """Holds a split model; `__call__(requests, rng=None)` → results. Compiled functions are shared by every
    Generator of the same graphdef and settings (jit caches on the static arguments).

    tokenizer: the model's (`model_tokenizer(model.cfg)`); it decodes the answers (no text without it) and
    fills the settings' stop / pad ids left None (`GenerationConfig.for_tokenizer`; without a tokenizer the
    model config's is loaded for them). `self.gen` holds the settings the decode runs with."""

    def __init__(self, model, config: GenerationConfig = GenerationConfig(), tokenizer=None):
        self.cfg = model.cfg
        if not config.resolved:
            config = config.for_tokenizer(tokenizer if tokenizer is not None else default_tokenizer(model.cfg))
        self.gen = config.validate()
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = tokenizer

    def decode(self, requests: Sequence[GenerationRequest], rng=None) -> DecodeOutput:
        """The raw compiled decode of a batch (tokens, lengths, task-token slot states, vision features)."""
        return self._decode(requests, rng)[0]

    def _decode(self, requests, rng):
        gen, cfg = self.gen, self.cfg
        if not requests:
            raise GenerationError("no requests")
        if gen.strategy == "sample" and rng is None:
            raise GenerationError("strategy 'sample' needs an explicit rng (jax.random.key(seed))")
        ids = [np.asarray(r.input_ids, np.int32).reshape(-1) for r in requests]
        if min(len(x) for x in ids) == 0:
            raise GenerationError("empty prompt")
        check_context([len(x) for x in ids], gen.max_new_tokens, cfg.llm.max_position)
        length = bucket_length(max(len(x) for x in ids), gen.buckets)
        b = len(ids)
        batch_ids = np.full((b, length), gen.pad_id, np.int32)
        attn = np.zeros((b, length), np.int32)
        vmask = np.zeros((b, length), bool)
        for i, (x, r) in enumerate(zip(ids, requests)):
            batch_ids[i, length - len(x):], attn[i, length - len(x):] = x, 1
            if r.visual_mask is not None:
                vmask[i, length - len(x):] = np.asarray(r.visual_mask, bool).reshape(-1)
        frames = self._frames(requests)
        if frames is None and vmask.any():
            raise GenerationError("a prompt has visual placeholders but no request has frames")
        video = frames is not None and frames.shape[1] == cfg.num_frames > 1
        if frames is not None and cfg.arch == "llava_ov" and frames.shape[1] == 1:  # an image: its frame repeated
            frames = np.repeat(frames, cfg.num_frames, axis=1)
        want = video and any(r.temporal_features is None for r in requests) and H.model_features_ok(cfg)
        boxes = _track_boxes(requests)
        out = compiled_decode(self.graphdef, self.state, jnp.asarray(batch_ids), jnp.asarray(attn),
                     jnp.asarray(vmask), None if frames is None else jnp.asarray(frames), rng,
                     None if boxes is None else jnp.asarray(boxes), gen=gen, vision_features=bool(want))
        return out, video

    def _frames(self, requests) -> np.ndarray | None:
        shapes = {np.shape(r.frames) for r in requests if r.frames is not None}
        if not shapes:
            return None
        if len(shapes) > 1:
            raise GenerationError(f"a batch mixes frame shapes {sorted(shapes)} (videos and images, or other "
                                  f"sizes); generate them in separate batches")
        (shape,) = shapes
        return np.stack([np.zeros(shape, np.float32) if r.frames is None else np.asarray(r.frames, np.float32)
                         for r in requests])

    def __call__(self, requests: Sequence[GenerationRequest], rng=None) -> list[GenerationResult]:
        for i, r in enumerate(requests):
            if r.temporal_features is not None and r.frames is not None and np.shape(r.frames)[0] == 1:
                raise GenerationError(f"request {i}: temporal features need a video, but its media is an image")
        out, video = self._decode(requests, rng)
        tokens, lengths, stopped = (np.asarray(x) for x in (out.tokens, out.lengths, out.stopped))
        slot_on = np.asarray(out.slot_on).copy()
        notes: list[list[str]] = [[] for _ in requests]
        k = self.gen.max_boxes
        inputs, file_features = self._temporal_inputs(requests, slot_on[:, k], video, notes)
        slot_on[:, k] &= np.array([not n for n in notes])
        heads = tuple(h for h, on in zip(KINDS, (slot_on[:, :k].any(), slot_on[:, k].any(),
                                                   slot_on[:, k + 1].any())) if on)
        arrays = {}
        if heads:
            feats = out.vision_features if (not file_features and "temporal" in heads) else None
            arrays = H.run_task_heads(self.graphdef, self.state, out.slot_hidden, jnp.asarray(slot_on),
                                      inputs if "temporal" in heads else {}, feats, heads=heads,
                                      file_features=file_features)
        durations = [r.duration if r.temporal_features is None or r.temporal_features.duration is None
                     else r.temporal_features.duration for r in requests]
        for i, d in enumerate(durations):
            if slot_on[i, k] and not d:
                durations[i] = 1.0
                notes[i].append("no duration given: spans and clips are in units of the video's length")
        arrays = jax.device_get(arrays)
        per = H.head_results(arrays, slot_on, [r.frame_size for r in requests], durations)
        hidden = np.asarray(out.slot_hidden)
        tracks = self._tracks(requests, slot_on[:, k + 1], arrays, per, notes)
        results = []
        for i in range(len(requests)):
            n = int(lengths[i]) - int(stopped[i])
            ids = tokens[i, :n].tolist()
            text = self._text(ids, notes[i])
            raw = {"task_hidden": hidden[i], "task_slots": slot_on[i],
                   **{name: np.asarray(v[i]) for name, v in arrays.items()}, **tracks.get(i, {})}
            results.append(GenerationResult(token_ids=ids, text=text, finish_reason="stop" if stopped[i] else "length",
                                            notes=notes[i], raw=raw, **per[i]))
        return results

    def _text(self, ids: list[int], notes: list[str]) -> str | None:
        """The answer's text (task tokens kept); ids past the tokenizer's vocabulary (the embedding's padding
        rows, e.g. Qwen2-7B's 152128 rows over its tokenizer's ids) have no text and are left out, with a note."""
        if self.tokenizer is None:
            return None
        n = len(self.tokenizer)
        outside = [t for t in ids if not 0 <= t < n]
        if outside:
            notes.append(f"{len(outside)} generated id(s) outside the tokenizer's {n} ids (embedding padding rows) "
                         f"are not in the text: {sorted(set(outside))[:8]}")
        return self.tokenizer.decode([t for t in ids if 0 <= t < n], skip_special_tokens=True)

    def _tracks(self, requests, wants, arrays, per, notes) -> dict[int, dict]:
        """SAM2 masks for the rows that emitted `<track_begin>` and supplied `track_frames`: fills `per[i]["track"]`
        and returns each row's raw mask arrays."""
        raws = {}
        for i in np.flatnonzero(wants):
            r = requests[i]
            if r.track_frames is None:
                notes[i].append("no masks: the request has no track_frames (SAM2 inputs)")
                continue
            frames = r.track_frames() if callable(r.track_frames) else r.track_frames
            s = self.cfg.sam2.image_size
            if np.ndim(frames) != 4 or np.shape(frames)[1:] != (s, s, 3):
                raise GenerationError(f"request {i}: track_frames of shape {np.shape(frames)}, expected "
                                      f"(T, {s}, {s}, 3) SAM2 inputs")
            user_box = r.track_boxes is not None and len(np.asarray(r.track_boxes).reshape(-1, 4)) > 0
            if user_box:
                box = np.asarray(r.track_boxes, np.float32).reshape(-1, 4)[:1]
                prompt = np.asarray(T.compiled_box_prompt(self.graphdef, self.state, jnp.asarray(box)))[0]
            else:
                prompt = np.asarray(arrays["track_prompt"][i], np.float32)
            size = r.frame_size or (s, s)
            got = T.track_masks(self.graphdef, self.state, frames, prompt, size, self.cfg.sam2.fill_hole_area)
            per[i]["track"].update(prompt_source="box" if user_box else "track_embed",
                                   mask_boxes=[T.mask_box(m) for m in got["masks"]],
                                   object_scores=[float(v) for v in got["object_scores"]])
            raws[i] = {"track_masks": got["masks"], "track_low_res": got["low_res"]}
        return raws

    def _temporal_inputs(self, requests, wants, video: bool, notes):
        """Temporal-head inputs for the rows that emitted `<time_begin>` (notes for the ones it cannot serve)."""
        cfg = self.cfg
        if not wants.any():
            return {}, False
        if any(r.temporal_features is not None for r in requests):
            for i, r in enumerate(requests):
                if wants[i] and r.temporal_features is None:
                    notes[i].append("temporal head not run: no precomputed features for this request")
            return H.feature_batch([r.temporal_features for r in requests], cfg), True
        reason = ("the media is an image, temporal grounding needs a video" if not video else
                  "the temporal head reads precomputed features (heads.temporal widths differ from the model's); "
                  "pass temporal features")
        if not video or not H.model_features_ok(cfg):
            for i in np.flatnonzero(wants):
                notes[i].append(f"temporal head not run: {reason}")
            return {}, False
        return H.query_batch([r.query_ids for r in requests], cfg.num_clips, cfg), False


def _track_boxes(requests) -> np.ndarray | None:
    """(B, K, 4) `<track_box>` boxes (zeros where a request has fewer), or None when no request has any."""
    boxes = [np.zeros((0, 4), np.float32) if r.track_boxes is None else np.asarray(r.track_boxes, np.float32)
             .reshape(-1, 4) for r in requests]
    k = max(len(b) for b in boxes)
    if k == 0:
        return None
    out = np.zeros((len(requests), k, 4), np.float32)
    for i, b in enumerate(boxes):
        out[i, :len(b)] = b
    return out


def generate(model, requests: Sequence[GenerationRequest], config: GenerationConfig = GenerationConfig(), *,
             rng=None, tokenizer=None) -> list[GenerationResult]:
    """Decode every request (one batch) with `config`; see `tpo_jax.generate`. `tokenizer`: the model's
    (`model_tokenizer(model.cfg)`), for the answers' text and the default stop / pad ids."""
    return Generator(model, config, tokenizer)(requests, rng)

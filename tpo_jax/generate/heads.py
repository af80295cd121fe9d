"""The task heads on the generated task-token states, their inputs, and their outputs in media units.

The heads run through `TPOModel.run_heads` (the one place heads are dispatched): the slot hidden states of
`decode` are handed over as a short "sequence" whose ids mark each filled slot with its placeholder
(`<boxes>` × K, `<temp>`, `<tracking>`).

Temporal-head features (MODEL-SPEC §6.2, §8.4) come either from the model (feature_source "model": per-clip
means of the prompt frames' vision-encoder features (UMT ViT, or SigLIP per frame) + TEF, and the LLM input
embeddings of the question's tokens, as in training) or from a file of precomputed features
(`load_temporal_features`, the demo's InternVideo2-CLIP path):

    .npz or .safetensors with
      video_feats  (Lv, vid_dim) or (Lv, vid_dim - 2)  per-clip features (§8.4: 1-s clips of 8 frames at 8 fps);
                   with vid_dim - 2 columns the TEF [l/Lv, (l+1)/Lv] is appended (no L2 normalisation, as the demo)
      text_feats   (Lq, txt_dim)  query-token features (§8.4: the whole user message); more than
                   heads.temporal.max_text_len rows are cut
      video_mask (Lv,), text_mask (Lq,)  optional, 1 = valid (valid rows first); default all valid
      duration     optional scalar, seconds (default: the media's duration)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax import config as C
from tpo_jax.config import TPOConfig
from tpo_jax.generate.settings import GenerationError
from tpo_jax.heads.temporal.postprocess import postprocess_spans

FEATURE_KEYS = ("video_feats", "text_feats", "video_mask", "text_mask", "duration")


@dataclasses.dataclass(frozen=True)
class TemporalFeatures:
    """Precomputed CG-DETR inputs of one video (see the module docstring)."""
    video: np.ndarray  # (Lv, vid_dim), TEF included
    text: np.ndarray  # (Lq, txt_dim)
    video_mask: np.ndarray  # (Lv,)
    text_mask: np.ndarray  # (Lq,)
    duration: float | None = None


def _read_feature_file(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise GenerationError(f"{path}: temporal feature file not found")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                return {k: np.asarray(f[k]) for k in f.files}
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file  # noqa: PLC0415
            return load_file(path)
    except Exception as e:  # noqa: BLE001  (any reader failure is a bad file)
        raise GenerationError(f"{path}: cannot read temporal features ({type(e).__name__}: {e})") from None
    raise GenerationError(f"{path}: temporal features must be a .npz or .safetensors file")


def load_temporal_features(path: str, cfg: TPOConfig) -> TemporalFeatures:
    """Read and check a feature file against the model's temporal head (`heads.temporal.{vid_dim, txt_dim}`)."""
    t = cfg.heads.temporal
    arrays = _read_feature_file(path)
    for key in ("video_feats", "text_feats"):
        if key not in arrays:
            raise GenerationError(f"{path}: no array '{key}' (has {sorted(arrays)}; expected {list(FEATURE_KEYS)})")
    video, text = arrays["video_feats"].astype(np.float32), arrays["text_feats"].astype(np.float32)
    if video.ndim != 2 or video.shape[1] not in (t.vid_dim, t.vid_dim - 2) or len(video) == 0:
        raise GenerationError(f"{path}: key 'video_feats' has shape {video.shape}; expected (Lv > 0, {t.vid_dim}) "
                              f"or (Lv, {t.vid_dim - 2}) without the TEF")
    if text.ndim != 2 or text.shape[1] != t.txt_dim:
        raise GenerationError(f"{path}: key 'text_feats' has shape {text.shape}; expected (Lq, {t.txt_dim})")
    lv = len(video)
    if video.shape[1] == t.vid_dim - 2:
        tef = np.stack([np.arange(lv) / lv, (np.arange(lv) + 1) / lv], axis=1).astype(np.float32)
        video = np.concatenate([video, tef], axis=1)
    vmask = arrays.get("video_mask", np.ones(lv, np.float32)).astype(np.float32)
    tmask = arrays.get("text_mask", np.ones(len(text), np.float32)).astype(np.float32)
    for key, mask, n in (("video_mask", vmask, lv), ("text_mask", tmask, len(text))):
        if mask.shape != (n,):
            raise GenerationError(f"{path}: key '{key}' has shape {mask.shape}; expected ({n},)")
    if vmask.sum() < 1:
        raise GenerationError(f"{path}: key 'video_mask' marks no valid clip")
    duration = float(arrays["duration"]) if "duration" in arrays else None
    n = t.max_text_len
    return TemporalFeatures(video, text[:n], vmask, tmask[:n], duration)


def feature_batch(feats: Sequence[TemporalFeatures | None], cfg: TPOConfig) -> dict[str, np.ndarray]:
    """Padded batch arrays (`run_heads` feature_source "batch" keys); a missing entry is one masked clip."""
    t = cfg.heads.temporal
    lv = max(len(f.video) for f in feats if f is not None)
    lv = -(-lv // 8) * 8  # few shapes, few compiles
    out = {"video_feats": np.zeros((len(feats), lv, t.vid_dim), np.float32),
           "vid_mask": np.zeros((len(feats), lv), np.float32),
           "text_feats": np.zeros((len(feats), t.max_text_len, t.txt_dim), np.float32),
           "text_mask": np.zeros((len(feats), t.max_text_len), np.float32)}
    for i, f in enumerate(feats):
        if f is None:
            out["vid_mask"][i, 0] = 1.0
            continue
        out["video_feats"][i, :len(f.video)], out["vid_mask"][i, :len(f.video)] = f.video, f.video_mask
        out["text_feats"][i, :len(f.text)], out["text_mask"][i, :len(f.text)] = f.text, f.text_mask
    return out


def query_batch(queries: Sequence[Sequence[int] | None], num_clips: int, cfg: TPOConfig) -> dict[str, np.ndarray]:
    """Model-feature inputs: the question's token ids (cut to max_text_len) and all `num_clips` clips valid."""
    n = cfg.heads.temporal.max_text_len
    ids, mask = np.zeros((len(queries), n), np.int32), np.zeros((len(queries), n), np.float32)
    for i, q in enumerate(queries):
        q = list(q or [])[:n]
        ids[i, :len(q)], mask[i, :len(q)] = q, 1.0
    return {"temporal_text_ids": ids, "text_mask": mask, "vid_mask": np.ones((len(queries), num_clips), np.float32)}


def model_features_ok(cfg: TPOConfig) -> bool:
    """Whether the temporal head's input widths fit the model's own features (vision encoder width + 2, LLM
    hidden)."""
    t = cfg.heads.temporal
    return t.vid_dim == cfg.vision_width + 2 and t.txt_dim == cfg.llm.hidden_size


@functools.partial(jax.jit, static_argnames=("graphdef", "heads", "file_features"))
def run_task_heads(graphdef, state, slot_hidden, slot_on, inputs: Mapping[str, jax.Array], vision_features, *,
                   heads: tuple[str, ...], file_features: bool) -> dict[str, jax.Array]:
    """The heads in `heads` on the slot states (B, K + 2, D); temporal inputs from `inputs` ("file" or model)."""
    model = nnx.merge(graphdef, state)
    source = "batch" if file_features else "model"
    if model.cfg.heads.temporal.feature_source != source:  # same parameters, other input path
        model.cfg = C.replace(model.cfg, **{"heads.temporal.feature_source": source})
    b, s, _ = slot_hidden.shape
    k = s - 2
    tt = model.cfg.task_tokens
    marks = jnp.asarray([tt.boxes] * k + [tt.temp, tt.tracking], jnp.int32)
    ids = jnp.where(slot_on, marks[None, :], 0)
    out = model.run_heads(slot_hidden, ids, heads, {**inputs, "region_boxes": jnp.zeros((b, k, 4))},
                          vision_features)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    res = {}
    if out.region is not None:
        res.update(region_boxes=f32(out.region.boxes), region_present=out.region.present)
    if out.temporal is not None:
        o = out.temporal.outputs
        res.update(pred_spans=f32(o["pred_spans"]), pred_logits=f32(o["pred_logits"]),
                   saliency=f32(o["saliency_scores"]), video_mask=f32(o["video_mask"]))
    if out.mask is not None:
        res.update(track_prompt=f32(out.mask.prompt), track_box=f32(out.mask.box))
    return res


def _pixels(box: np.ndarray, size: tuple[int, int] | None) -> list[float] | None:
    if size is None:
        return None
    h, w = size
    return [float(v) for v in box * np.array([w, h, w, h], np.float32)]


def head_results(arrays: Mapping[str, Any], slot_on: np.ndarray, sizes, durations) -> list[dict[str, Any]]:
    """Per sample {"region": [...], "temporal": {...} | None, "track": {...} | None} in media units (boxes in
    pixels of `sizes` (height, width), spans and clips in seconds of `durations`); slots off → nothing."""
    a = {k: np.asarray(v) for k, v in arrays.items()}
    b = slot_on.shape[0]
    k = slot_on.shape[1] - 2
    out = [{"region": [], "temporal": None, "track": None} for _ in range(b)]
    if "region_boxes" in a:
        for i in range(b):
            for j in range(k):
                if slot_on[i, j]:
                    box = a["region_boxes"][i, j]
                    out[i]["region"].append({"box": _pixels(box, sizes[i]),
                                             "box_normalized": [float(v) for v in box]})
    if "pred_spans" in a:
        dur = np.asarray([d or 0.0 for d in durations], np.float32)
        post = {n: np.asarray(v) for n, v in postprocess_spans(
            {"pred_spans": a["pred_spans"], "pred_logits": a["pred_logits"]}, dur).items()}
        for i in range(b):
            if not slot_on[i, k]:
                continue
            valid = a["video_mask"][i] > 0
            lv = int(valid.sum())
            edges = np.linspace(0.0, float(dur[i]), lv + 1)
            spans = [[float(s), float(e), float(c)] for (s, e), c in zip(post["windows"][i], post["scores"][i])]
            out[i]["temporal"] = {"span": spans[0][:2], "score": spans[0][2], "spans": spans,
                                  "duration": float(dur[i]),
                                  "saliency": [float(v) for v in a["saliency"][i][valid]],
                                  "clips": [[float(edges[j]), float(edges[j + 1])] for j in range(lv)]}
    if "track_prompt" in a:
        for i in range(b):
            if slot_on[i, k + 1]:
                box = a["track_box"][i]
                out[i]["track"] = {"prompt": a["track_prompt"][i].tolist(), "box": _pixels(box, sizes[i]),
                                   "box_normalized": [float(v) for v in box]}
    return out


__all__ = ["TemporalFeatures", "feature_batch", "head_results", "load_temporal_features",
           "model_features_ok", "query_batch", "run_task_heads"]

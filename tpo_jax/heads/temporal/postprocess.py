"""Inference post-processing of the CG-DETR temporal head (MODEL-SPEC §6.4): scored [start, end] windows."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tpo_jax.heads import box_ops
from tpo_jax.heads.temporal.model import FOREGROUND


def postprocess_spans(outputs: dict[str, Any], duration, *, clip_length: float | None = None) -> dict[str, jax.Array]:
    """§6.4: score = softmax(pred_logits)[..., 0]; windows = clamp(xx(pred_spans) · duration, 0, duration),
    sorted by score (descending, stable). duration: scalar or (B,) seconds.

    With `clip_length` (the demo's PostProcessorDETR, clip_length = 1): windows are rounded to 4 decimals and
    then to multiples of clip_length (round half to even, as torch.round).
    Returns {"windows": (B, Q, 2) [start, end] seconds, "scores": (B, Q), "order": (B, Q) query indices}.
    """
    logits = jnp.asarray(outputs["pred_logits"], jnp.float32)
    spans = jnp.asarray(outputs["pred_spans"], jnp.float32)
    score = jax.nn.softmax(logits, axis=-1)[..., FOREGROUND]
    dur = jnp.asarray(duration, jnp.float32)
    if dur.ndim == 1:
        dur = dur[:, None, None]
    windows = jnp.clip(box_ops.span_cw_to_xx(spans) * dur, 0.0, dur)
    if clip_length is not None:
        windows = jnp.round(windows, 4)
        windows = jnp.round(windows / clip_length) * clip_length
    order = jnp.argsort(-score, axis=-1, stable=True)
    return {"windows": jnp.take_along_axis(windows, order[..., None], axis=1),
            "scores": jnp.take_along_axis(score, order, axis=1), "order": order}


__all__ = ["postprocess_spans"]

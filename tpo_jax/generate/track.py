"""Per-frame masks for `<track_begin>` answers (MODEL-SPEC §8.5): SAM2 propagation from the mask head's
predicted prompt — or, when the request gave a tracking box (`track_boxes`), from that box's prompt, as the
released demo does — over every frame the request supplies in `track_frames`.

    masks = track_masks(graphdef, state, frames, prompt, frame_size=(h, w), fill_hole_area=8)

The clip is padded to a multiple of `FRAME_BUCKET` frames (one compile per bucket; later frames never change
earlier ones), propagated by the compiled `Sam2Video.propagate`, its low-res logits hole-filled
(`fill_holes`), resized to the frame size and thresholded at 0. `GenerationResult.track` gets each frame's mask
box in pixels (None where the mask is empty) and object score, `raw["track_masks"]` the (T, h, w) masks;
`tpo-infer` writes them as COCO RLE per frame.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax.sam2.video import fill_holes, upscale_masks

FRAME_BUCKET = 8


@functools.partial(jax.jit, static_argnames=("graphdef",))
def compiled_propagate(graphdef, state, frames, prompt):
    """`model.sam2.propagate` compiled (frames (B, T, S, S, 3), prompt (B, 3, C))."""
    return nnx.merge(graphdef, state).sam2.propagate(frames, prompt)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def compiled_box_prompt(graphdef, state, boxes):
    return nnx.merge(graphdef, state).sam2.box_prompt(boxes)


def mask_box(mask: np.ndarray) -> list[float] | None:
    """Pixel box [x0, y0, x1, y1] (exclusive max) of a boolean mask; None when empty."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def track_masks(graphdef, state, frames: np.ndarray, prompt: np.ndarray, frame_size: tuple[int, int],
                fill_hole_area: int = 0) -> dict:
    """frames (T, S, S, 3) SAM2 inputs (`tpo_jax.sam2.frames.sam2_frames`), prompt (3, C) → {"masks": (T, h, w)
    bool, "object_scores": (T,), "low_res": (T, 4E, 4E) logits after hole filling}."""
    frames = np.asarray(frames, np.float32)
    n = len(frames)
    padded = -(-n // FRAME_BUCKET) * FRAME_BUCKET
    if padded > n:
        frames = np.concatenate([frames, np.zeros((padded - n,) + frames.shape[1:], np.float32)])
    out = compiled_propagate(graphdef, state, jnp.asarray(frames)[None], jnp.asarray(prompt, jnp.float32)[None])
    low = fill_holes(np.asarray(out.masks[0, :n]), fill_hole_area)
    h, w = frame_size
    masks = np.asarray(upscale_masks(low, h, w)) > 0
    return {"masks": masks, "object_scores": np.asarray(out.object_score_logits[0, :n]), "low_res": low}

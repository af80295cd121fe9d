"""Drawing a generation result over its media: boxes on the frames, and a timeline strip with the predicted
spans (shaded by score, the top one outlined) and the per-clip saliency curve.

    draw_overlay("out.png", frames, result, frame_times, duration)   # the middle frame + the strip
    draw_overlay("out.gif", frames, result, frame_times, duration)   # every frame, with a time cursor
    draw_overlay("out.png", frames, result, truth={"boxes": [[x0, y0, x1, y1]], "spans": [[s, e]]})
    draw_overlay("out.gif", frames, result, masks=masks)   # a tracked answer: (T, H, W) masks tinted per frame

`truth` (a validation example's ground truth, same units as the result) is drawn in white: boxes labelled
"true", spans as a bar under the predicted ones.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_WIDTH = 640
STRIP = 56  # timeline strip height in pixels
REGION_COLOUR, TRACK_COLOUR = (255, 64, 64), (64, 160, 255)
SPAN_COLOUR, SALIENCY_COLOUR = (255, 190, 0), (40, 200, 90)
TRUTH_COLOUR = (255, 255, 255)


def _boxes(result) -> list[tuple[list[float], tuple[int, int, int], str]]:
    out = [(r["box"], REGION_COLOUR, f"box {i}") for i, r in enumerate(result.region) if r.get("box")]
    if result.track and result.track.get("box"):
        out.append((result.track["box"], TRACK_COLOUR, "track"))
    return out


def _tint(frame: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The frame with `mask` (H, W) blended in the track colour (half opacity) and its edge drawn solid."""
    if mask is None:
        return frame
    m = np.asarray(mask, bool)
    out = frame.astype(np.float32)
    colour = np.asarray(TRACK_COLOUR, np.float32)
    out[m] = 0.5 * out[m] + 0.5 * colour
    inner = m.copy()
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    out[m & ~inner] = colour
    return out.astype(np.uint8)


def _frame_panel(frame: np.ndarray, boxes, scale: float, mask: np.ndarray | None = None) -> Image.Image:
    img = Image.fromarray(_tint(frame, mask)).convert("RGB")
    if scale != 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for box, colour, label in boxes:
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=colour, width=3)
        draw.text((min(x0, x1) + 3, min(y0, y1) + 2), label, fill=colour, font=font)
    return img


def _strip(width: int, temporal: dict | None, duration: float, frame_times: Sequence[float],
           cursor: float | None, truth_spans: Sequence[Sequence[float]] = ()) -> Image.Image:
    img = Image.new("RGB", (width, STRIP), (24, 24, 24))
    draw = ImageDraw.Draw(img, "RGBA")
    font = ImageFont.load_default()
    dur = duration if duration and duration > 0 else 1.0
    x = lambda t: (width - 1) * min(max(float(t) / dur, 0.0), 1.0)  # noqa: E731
    for t in frame_times:
        draw.line([x(t), STRIP - 6, x(t), STRIP - 1], fill=(160, 160, 160))
    for s, e in truth_spans:
        draw.rectangle([x(s), STRIP - 7, max(x(e), x(s) + 1), STRIP - 4], fill=TRUTH_COLOUR)
    if temporal:
        for rank, (s, e, score) in reversed(list(enumerate(temporal["spans"][:3]))):
            draw.rectangle([x(s), 4, max(x(e), x(s) + 1), STRIP - 8],
                           fill=(*SPAN_COLOUR, int(40 + 150 * float(score))),
                           outline=SPAN_COLOUR if rank == 0 else None)
        sal = np.asarray(temporal["saliency"], np.float64)
        if len(sal):
            lo, hi = sal.min(), sal.max()
            level = (sal - lo) / (hi - lo) if hi > lo else np.full_like(sal, 0.5)
            pts = [(x((a + b) / 2), 4 + (1 - v) * (STRIP - 14)) for (a, b), v in zip(temporal["clips"], level)]
            for (px, py) in pts:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=SALIENCY_COLOUR)
            if len(pts) > 1:
                draw.line(pts, fill=SALIENCY_COLOUR, width=2)
        s, e = temporal["span"]
        draw.text((4, 4), f"{s:.1f}-{e:.1f} s ({temporal['score']:.2f})", fill=(255, 255, 255), font=font)
    else:
        draw.text((4, 4), "no temporal prediction", fill=(150, 150, 150), font=font)
    if cursor is not None:
        draw.line([x(cursor), 0, x(cursor), STRIP], fill=(255, 255, 255), width=2)
    return img


def _stack(top: Image.Image, bottom: Image.Image) -> Image.Image:
    out = Image.new("RGB", (top.width, top.height + bottom.height))
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height))
    return out


def draw_overlay(path: str, frames: np.ndarray, result, frame_times: Sequence[float] = (),
                 duration: float = 0.0, truth: dict | None = None, masks: np.ndarray | None = None) -> str:
    """Write `path` (.png: the middle frame; .gif: every frame) with `result`'s boxes (pixels of `frames`)
    and the timeline strip, and `truth`'s boxes and spans when given. frames: (T, H, W, 3) uint8 at the
    source resolution; masks: (T, H, W) bool, a tracked object's mask on each of those frames. Returns `path`."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".gif"):
        raise ValueError(f"{path}: the overlay must be a .png or .gif file")
    frames = np.asarray(frames, np.uint8)
    scale = min(1.0, MAX_WIDTH / frames.shape[2])
    truth = truth or {}
    boxes = [(b, TRUTH_COLOUR, "true") for b in truth.get("boxes", [])] + _boxes(result)
    spans = truth.get("spans", [])
    times = list(frame_times) if len(frame_times) == len(frames) else [0.0] * len(frames)
    if masks is not None and np.shape(masks) != frames.shape[:3]:
        raise ValueError(f"overlay masks of shape {np.shape(masks)} do not match the frames {frames.shape[:3]}")
    mask_of = lambda i: None if masks is None else masks[i]  # noqa: E731
    if ext == ".png":
        mid = len(frames) // 2
        panel = _frame_panel(frames[mid], boxes, scale, mask_of(mid))
        strip = _strip(panel.width, result.temporal, duration, times, times[mid] if duration else None, spans)
        _stack(panel, strip).save(path)
        return path
    images = []
    for i, (frame, t) in enumerate(zip(frames, times)):
        panel = _frame_panel(frame, boxes, scale, mask_of(i))
        images.append(_stack(panel, _strip(panel.width, result.temporal, duration, times, t if duration else None,
                                          spans)))
    images[0].save(path, save_all=True, append_images=images[1:], duration=500, loop=0)
    return path

"""The raw example every data source produces, before frames are decoded and text is tokenized.

Parsers of the real-data formats (`data/formats.py`) and the synthetic generator
(`data/synthetic.py`) both emit `Record`s; the TFDS builders store them; the conversation builder
(`data/conversation.py`) turns one decoded `Record` into the fixed-shape arrays the train step takes.

Units: times in seconds, boxes normalised xyxy in [0, 1] of the frame they refer to.

| task           | what it carries                                                              |
|----------------|------------------------------------------------------------------------------|
| `conversation` | `turns` (question, answer) pairs                                            |
| `mc`           | `question`, `options`, `mc_answer` (index of the right option)               |
| `temporal`     | `question` (the query), `duration`, `spans` (N, 2) start/end, `saliency`     |
| `region`       | `question` (the expression), `boxes` (K, 4), `box_frames` (K,) frame indices |
| `mask`         | `question`, `track_boxes` (T, 4), `track_visible` (T,), `track_masks` (RLE)  |

Any task may carry an `instruction` (system text before the first turn). Frames sampled from a video at
build time carry their source times in `frame_times` (with `fps` and `source_duration` of the source).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

TASKS = ("conversation", "mc", "temporal", "region", "mask")


class RecordError(ValueError):
    """A record that cannot be used (malformed annotation, box outside the frame, missing media)."""


class DataError(RuntimeError):
    """Too many bad records, or a data source that cannot be used at all."""


@dataclasses.dataclass
class Record:
    id: str
    task: str
    # media: exactly one of video (path or encoded bytes), image (path or encoded bytes) or frames
    video: str | bytes | None = None
    image: str | bytes | None = None
    frames: np.ndarray | None = None  # (T, H, W, 3) uint8, already decoded (synthetic data)
    fps: float | None = None  # of `frames`
    question: str = ""
    answer: str = ""
    turns: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    options: tuple[str, ...] = ()
    mc_answer: int = -1
    duration: float | None = None
    spans: np.ndarray | None = None  # (N, 2) seconds
    saliency: np.ndarray | None = None  # (C,) per-clip scores, clips of `clip_seconds`
    clip_seconds: float = 2.0
    boxes: np.ndarray | None = None  # (K, 4)
    box_frames: np.ndarray | None = None  # (K,) index of the frame each box refers to
    track_boxes: np.ndarray | None = None  # (T, 4)
    track_visible: np.ndarray | None = None  # (T,)
    track_masks: list[dict[str, Any]] | None = None  # per frame COCO RLE {"size": [h, w], "counts": ...}
    # media sampled at build time (tpo_jax.data.record_codec storage "sampled_jpeg"): `frames` are the sampled frames
    frame_times: np.ndarray | None = None  # (T,) seconds of each frame of `frames` in the source video
    source_duration: float | None = None  # seconds of the source video (frame count / fps)
    instruction: str = ""  # system / instruction text before the first turn (VideoChat2 "i")

    def validate(self) -> "Record":
        """Raise one RecordError naming this record and the bad field; return self when usable."""
        def fail(msg):
            raise RecordError(f"record {self.id!r} ({self.task}): {msg}")

        if self.task not in TASKS:
            fail(f"unknown task; known: {TASKS}")
        media = [m is not None for m in (self.video, self.image, self.frames)]
        if sum(media) != 1:
            fail("needs exactly one of video, image, frames")
        for name in ("boxes", "track_boxes"):
            b = getattr(self, name)
            if b is None:
                continue
            b = np.asarray(b, np.float64)
            if b.ndim != 2 or b.shape[-1] != 4:
                fail(f"{name} must have shape (K, 4), got {b.shape}")
            if not np.all(np.isfinite(b)) or b.min() < -1e-6 or b.max() > 1 + 1e-6:
                fail(f"{name} outside the frame (normalised xyxy must lie in [0, 1]): {b.tolist()}")
            if np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1]):
                fail(f"{name} has x1 < x0 or y1 < y0: {b.tolist()}")
        if self.task == "region" and (self.boxes is None or len(self.boxes) == 0):
            fail("region record without boxes")
        if self.task == "temporal":
            if self.duration is None or not self.duration > 0:
                fail(f"duration must be positive, got {self.duration}")
            s = np.asarray(self.spans if self.spans is not None else np.zeros((0, 2)), np.float64)
            if s.ndim != 2 or s.shape[-1] != 2 or len(s) == 0:
                fail(f"spans must have shape (N>0, 2), got {s.shape}")
            if np.any(s[:, 1] < s[:, 0]) or s.min() < 0 or s.max() > self.duration + 1e-3:
                fail(f"spans {s.tolist()} not inside [0, duration={self.duration}]")
        if self.task == "mc" and not (0 <= self.mc_answer < len(self.options)):
            fail(f"mc_answer {self.mc_answer} not an index into {len(self.options)} options")
        if self.task == "mask" and self.track_boxes is None:
            fail("mask record without track_boxes")
        if self.task == "conversation" and not self.turns:
            fail("conversation record without turns")
        return self

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
import math
from typing import Any

import numpy as np

TASKS = ("conversation", "mc", "temporal", "region", "mask")
MAX_OPTIONS = 8  # options a multiple-choice prompt can letter ("(A)" … "(H)", tpo_jax.data.templates.OPTION_LETTERS)
SALIENCY_SCALE = 12.0  # saliency labels live on 0..12 (QVHighlights: 3 annotators × 0..4)


#: Short keys of why a record was skipped (`RecordError.kind`); the pipeline and the builders count skips per kind.
SKIP_KINDS = {
    "parse": "the annotation entry is not valid JSON / text (bad line, deep nesting, huge integer)",
    "bad_field": "a missing field, a wrong type (strings for numbers, bool for a number), a value out of range "
                 "(non-finite or negative duration / fps, box outside the frame, saliency off its scale)",
    "path": "a media path outside the media root ('..', absolute path, symlink leaving the root)",
    "media_missing": "the media file or frame folder does not exist",
    "media_kind": "the file's content is not what its name or field says (an image named .mp4, a video as image)",
    "media_budget": "media or annotation sizes above the budget (pixels, frames, bytes, seconds, RLE size, clips)",
    "decode": "media that cannot be decoded (truncated, corrupt, garbage bytes)",
    "template": "a record the prompt / example cannot represent (too many options, spans, too long)",
    "tokenize": "text the tokenizer rejects",
    "internal": "an unexpected exception of a library underneath (its type is in the message)",
}


class RecordError(ValueError):
    """A record that cannot be used (malformed annotation, box outside the frame, missing media).

    `kind` is one of `SKIP_KINDS` (the short reason key skips are counted by)."""

    default_kind = "bad_field"

    def __init__(self, message: str = "", kind: str | None = None):
        super().__init__(message)
        self.kind = kind or self.default_kind

    def __reduce__(self):  # picklable with its kind (grain workers send errors between processes)
        return (type(self), (str(self), self.kind))


def as_record_error(e: BaseException, where: str, kind: str = "internal") -> RecordError:
    """Any exception of one record's processing → a RecordError naming `where` and the exception type (a
    RecordError keeps its message and kind, prefixed by `where` unless already named). MemoryError,
    KeyboardInterrupt and SystemExit are not records' faults: the caller must not convert them."""
    if isinstance(e, RecordError):
        msg = _printable(str(e))
        return RecordError(msg if where in msg else f"{where}: {msg}", e.kind)
    if isinstance(e, RecursionError):
        return RecordError(f"{where}: nesting too deep (RecursionError)", "parse")
    text = _printable(str(e).splitlines()[0][:200]) if str(e).strip() else ""
    return RecordError(f"{where}: {type(e).__name__}: {text}" if text else f"{where}: {type(e).__name__}", kind)


def _printable(text: str) -> str:
    """One line, encodable as UTF-8 (lone surrogates escaped), so any log handler can write it."""
    return " ".join(text.encode("utf-8", "backslashreplace").decode("utf-8").splitlines())


def text_problem(value: Any) -> str | None:
    """Why `value` is not usable text (not a str, or not encodable as UTF-8: a lone surrogate), else None."""
    if not isinstance(value, str):
        return f"must be text, got {type(value).__name__}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds {value[e.start:e.end]!r} at {e.start}, not encodable as UTF-8 (a lone surrogate)"
    return None


@dataclasses.dataclass(frozen=True)
class MediaBudget:
    """Limits checked *before* allocating: a record over one of them is skipped as `media_budget`.

    Defaults fit real training data with a wide margin (a 4K frame is 8.3 Mpx, a 1 h clip at 60 fps
    216,000 frames) while bounding one record's decode to ~1-2 GiB. The pipeline's `DataConfig.budget`
    (`--set data.budget.max_pixels=...`) and the builders' `budget=` argument override them."""

    max_pixels: int = 40_000_000  # per frame / image (w × h) from the header, before decoding (PIL's bomb limit: 179 M)
    max_frames: int = 500_000  # frames (packets) of a video, or files of a frame folder
    max_bytes: int = 2 << 30  # size of one media file or buffer
    max_seconds: float = 6 * 3600.0  # duration of a video or a temporal annotation
    max_decoded_bytes: int = 1 << 30  # frames decoded at once (T × h × w × 3), e.g. "jpeg"/"raw" storage of every frame
    max_mask_pixels: int = 40_000_000  # RLE size h × w and a track's width × height (masks are decoded to h × w)
    max_clips: int = 100_000  # saliency clips of a temporal annotation (duration / clip_seconds)
    allow_outside_media_root: bool = False  # media paths may leave the declared media root

    def validate(self, prefix: str = "budget.") -> "MediaBudget":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "allow_outside_media_root":
                ok = isinstance(v, bool)
            else:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)
            if not ok:
                raise ValueError(f"config field '{prefix}{f.name}': must be a positive number, got {v!r}")
        return self


DEFAULT_BUDGET = MediaBudget()


def finite_number(value: Any, what: str, *, minimum: float | None = None, positive: bool = False) -> float:
    """A real number (int or float, not bool, not a string), finite, >= minimum (> 0 with `positive`);
    else RecordError(kind="bad_field") naming `what`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RecordError(f"{what} must be a number, got {type(value).__name__} {str(value)[:40]!r}")
    try:
        x = float(value)
    except OverflowError:
        raise RecordError(f"{what} must be finite, got an integer of {len(str(value))} digits") from None
    if not math.isfinite(x):
        raise RecordError(f"{what} must be finite, got {x}")
    if positive and not x > 0:
        raise RecordError(f"{what} must be positive, got {x}")
    if minimum is not None and x < minimum:
        raise RecordError(f"{what} must be >= {minimum}, got {x}")
    return x


class DataError(RuntimeError):
    """Too many bad records, or a data source that cannot be used at all."""


# --- COCO RLE sizes (checked here, before `tpo_jax.data.rle` decodes anything) ---

def is_int(v) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def rle_size(rle: dict[str, Any], budget: MediaBudget | None = None) -> tuple[int, int]:
    """(h, w) of an RLE: two non-negative integers (not strings, not bools) with h × w within
    `budget.max_mask_pixels` (checked before anything is allocated)."""
    size = rle.get("size") if isinstance(rle, dict) else None
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(is_int(v) for v in size)):
        raise RecordError(f"RLE needs 'size': [h, w] (two integers), got {str(rle)[:80]}")
    h, w = int(size[0]), int(size[1])
    if h < 0 or w < 0:
        raise RecordError(f"RLE size must be non-negative, got {[h, w]}")
    limit = (budget or DEFAULT_BUDGET).max_mask_pixels
    if h * w > limit:
        raise RecordError(f"RLE size {h}x{w} = {h * w} pixels is over the budget max_mask_pixels={limit}",
                          "media_budget")
    return h, w


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
        def fail(msg, kind="bad_field"):
            raise RecordError(f"record {self.id!r} ({self.task}): {msg}", kind)

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
        if not isinstance(self.id, str):
            raise RecordError(f"record id must be text, got {type(self.id).__name__}")
        for name, text in self._texts():
            why = text_problem(text)
            if why:
                fail(f"{name} {why}")
        if self.fps is not None and not (isinstance(self.fps, (int, float, np.number)) and math.isfinite(self.fps)
                                         and self.fps > 0):
            fail(f"fps must be a finite positive number, got {self.fps!r}")
        for name in ("duration", "source_duration"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float, np.number)) and math.isfinite(v) and v >= 0):
                fail(f"{name} must be a finite number >= 0, got {v!r}")
        if self.saliency is not None:
            sal = np.asarray(self.saliency, np.float64)
            if sal.ndim != 1 or not np.all(np.isfinite(sal)) or (sal.size and (sal.min() < 0 or sal.max() > SALIENCY_SCALE)):
                fail(f"saliency must be per-clip values on the 0..{SALIENCY_SCALE:g} scale, got {sal.tolist()[:8]}")
            if not (math.isfinite(self.clip_seconds) and self.clip_seconds > 0):
                fail(f"clip_seconds must be positive, got {self.clip_seconds}")
        if self.track_masks is not None:
            if not isinstance(self.track_masks, list):
                fail(f"track_masks must be a list of RLEs, got {type(self.track_masks).__name__}")
            for k, m in enumerate(self.track_masks):
                try:
                    rle_size(m)  # the size only: nothing decoded; over DEFAULT_BUDGET.max_mask_pixels fails
                except RecordError as e:
                    fail(f"track_masks[{k}]: {e}", e.kind)
        if self.task == "region" and (self.boxes is None or len(self.boxes) == 0):
            fail("region record without boxes")
        if self.task == "temporal":
            if self.duration is None or not self.duration > 0:
                fail(f"duration must be positive, got {self.duration}")
            s = np.asarray(self.spans if self.spans is not None else np.zeros((0, 2)), np.float64)
            if s.ndim != 2 or s.shape[-1] != 2 or len(s) == 0:
                fail(f"spans must have shape (N>0, 2), got {s.shape}")
            if not np.all(np.isfinite(s)) or np.any(s[:, 1] < s[:, 0]) or s.min() < 0 or s.max() > self.duration + 1e-3:
                fail(f"spans {s.tolist()} not inside [0, duration={self.duration}]")
        if self.task == "mc":
            if not 2 <= len(self.options) <= MAX_OPTIONS:
                fail(f"{len(self.options)} options, a multiple-choice prompt takes 2 to {MAX_OPTIONS}", "template")
            if isinstance(self.mc_answer, (bool, np.bool_)) or not 0 <= self.mc_answer < len(self.options):
                fail(f"mc_answer {self.mc_answer!r} not an index into {len(self.options)} options")
        if self.task == "mask" and self.track_boxes is None:
            fail("mask record without track_boxes")
        if self.task == "conversation" and not self.turns:
            fail("conversation record without turns")
        return self

    def _texts(self):
        yield "id", self.id
        for name in ("question", "answer", "instruction"):
            yield name, getattr(self, name)
        for k, turn in enumerate(self.turns):
            if not (isinstance(turn, (tuple, list)) and len(turn) == 2):
                raise RecordError(f"record {self.id!r} ({self.task}): turns[{k}] must be (question, answer)")
            yield f"turns[{k}] question", turn[0]
            yield f"turns[{k}] answer", turn[1]
        for k, o in enumerate(self.options):
            yield f"options[{k}]", o
        for name in ("video", "image"):
            v = getattr(self, name)
            if isinstance(v, str):
                yield name, v

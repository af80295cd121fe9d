"""The synthetic TPO dataset: rendered clips of coloured shapes with exact ground truth for every task.

Each clip shows 1..N squares, circles and triangles in saturated colours, moving (bouncing off the
frame edges) over a grey, optionally textured background; each object is painted from its first to
its last frame (it appears and vanishes). One record per (seed, split, task, index), generated on
demand: random access, no storage, so `SyntheticSource` backs a grain `MapDataset` directly.

| task           | question (`Record.question`)                   | ground truth                                       |
|----------------|------------------------------------------------|----------------------------------------------------|
| `conversation` | 1-2 turns: counts, colours, shapes, order of appearance, presence | exact answers (`turns`)         |
| `mc`           | one of those questions with 2-4 options        | `options`, `mc_answer`                             |
| `temporal`     | query "the red square is visible"              | `spans` (seconds; frame k covers [k/fps, (k+1)/fps)), per-frame `saliency` (12 visible, 0 not) |
| `region`       | expression "the red square" (still image, T=1) or "… in the first frame" (video) | `boxes` = exact pixel extent in that frame |
| `mask`         | "" (tracking: the prompt gives the first-frame box via `<track_box>`) or the object's description (referring) | per-frame `track_boxes`, `track_visible`, `track_masks` (COCO RLE) |

The described object of region / temporal / mask records (the *target*) is painted last, so it is
never occluded; other objects may be partly or fully hidden, and every fact (counts, order, boxes)
is computed from what is actually visible. Objects are unambiguous by their "colour shape" name
(by colour alone when `unique_colours`). `SyntheticConfig()` is easy enough for the `tiny` model
(32 px, 4 frames: 1-2 big objects, flat background); `PRESETS["hard"]` is for bigger models.
Frames are uint8 (T, H, W, 3) in `Record.frames`; normalisation happens in `tpo_jax.data.conversation`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tpo_jax.data.conversation import SALIENCY_MAX
from tpo_jax.data.fixed_batch import synthetic_batch, synthetic_clip  # noqa: F401  (re-exported)
from tpo_jax.data.records import TASKS, Record
from tpo_jax.data.rle import rle_encode
from tpo_jax.data.synthetic_render import COLOURS, SHAPES, SceneObject, background, bounce, mask_box, render, runs
from tpo_jax.config import ConfigError
from tpo_jax.config_fields import check_field

SPLITS = ("train", "validation", "test")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VISIBLE_PHRASES = ("is visible", "can be seen", "is on the screen", "is shown")
CONVERSATION_KINDS = ("count", "colour", "shape", "order", "presence")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What the synthetic clips look like. Sizes are fractions of the frame side."""

    size: int = 32  # frame height = width, pixels
    num_frames: int = 4
    fps: float = 1.0
    num_objects: tuple[int, int] = (1, 2)  # inclusive range of objects per clip (target included)
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    unique_colours: bool = True  # no two objects share a colour (else: no two share colour and shape)
    min_side: float = 0.3
    max_side: float = 0.5
    max_speed: float = 0.08  # per frame
    always_visible: float = 0.5  # probability that a non-target object is on screen in every frame
    texture: float = 0.0  # background texture amplitude (0: flat grey)
    noise: float = 0.01  # pixel noise std (fraction of 255)
    colour_jitter: float = 0.0  # per-object RGB jitter (fraction of 255)
    image_prob: float = 0.5  # region records on a still image (else the first frame of a clip)
    tracking_prob: float = 0.5  # mask records with a `<track_box>` prompt (else a described object)
    max_turns: int = 2  # conversation turns per record
    train_size: int = 1_000_000  # records per task and split
    eval_size: int = 1024

    def validate(self, prefix: str = "synthetic.") -> "SyntheticConfig":
        for name in ("size", "num_frames", "max_turns", "train_size", "eval_size"):
            v = getattr(self, name)
            check_field(isinstance(v, int) and v > 0, prefix + name, f"must be a positive integer, got {v!r}")
        check_field(self.fps > 0, prefix + "fps", f"must be positive, got {self.fps}")
        lo, hi = self.num_objects
        check_field(1 <= lo <= hi, prefix + "num_objects", f"must be a range 1 <= lo <= hi, got {self.num_objects}")
        unknown = sorted(set(self.shapes) - set(SHAPES))
        check_field(self.shapes and not unknown, prefix + "shapes", f"unknown {unknown}; known: {SHAPES}")
        unknown = sorted(set(self.colours) - set(COLOURS))
        check_field(self.colours and not unknown, prefix + "colours", f"unknown {unknown}; known: {sorted(COLOURS)}")
        kinds = len(self.colours) if self.unique_colours else len(self.colours) * len(self.shapes)
        check_field(hi <= kinds, prefix + "num_objects", f"{hi} objects need {hi} distinct names, have {kinds}")
        check_field(0 < self.min_side <= self.max_side <= 0.9, prefix + "max_side",
                    f"need 0 < min_side <= max_side <= 0.9, got {self.min_side}, {self.max_side}")
        check_field(self.min_side * self.size >= 2, prefix + "min_side", f"shapes under 2 px at size {self.size}")
        for name in ("always_visible", "image_prob", "tracking_prob"):
            check_field(0 <= getattr(self, name) <= 1, prefix + name, "must be a probability in [0, 1]")
        for name in ("max_speed", "texture", "noise", "colour_jitter"):
            check_field(getattr(self, name) >= 0, prefix + name, "must be >= 0")
        return self

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def split_size(self, split: str) -> int:
        if split not in SPLITS:
            raise ConfigError(f"config field 'split': unknown split {split!r}; known: {SPLITS}")
        return self.train_size if split == "train" else self.eval_size


def hard() -> SyntheticConfig:
    """More, smaller, faster objects on a textured, noisy background; repeated colours."""
    return SyntheticConfig(size=64, num_frames=8, fps=2.0, num_objects=(2, 5), colours=tuple(COLOURS),
                           unique_colours=False, min_side=0.12, max_side=0.3, max_speed=0.12, always_visible=0.3,
                           texture=0.35, noise=0.04, colour_jitter=0.08, image_prob=0.3, max_turns=3)


def easy() -> SyntheticConfig:
    """One big object per clip on a flat background: the quickest to learn."""
    return SyntheticConfig(num_objects=(1, 1), min_side=0.35, max_side=0.5, noise=0.0)


PRESETS = {"default": SyntheticConfig, "easy": easy, "hard": hard}


def get_synthetic_config(name: str = "default", **overrides) -> SyntheticConfig:
    if name not in PRESETS:
        raise ConfigError(f"config field 'synthetic.preset': unknown preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), **overrides).validate()


# --- scenes ---------------------------------------------------------------------------------------------------------


def record_rng(seed: int, split: str, task: str, index: int) -> np.random.Generator:
    """The generator of one record: a pure function of (seed, split, task, index)."""
    return np.random.default_rng([int(seed), SPLITS.index(split), TASKS.index(task), int(index)])


def _names(cfg: SyntheticConfig, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    if cfg.unique_colours:
        colours = rng.choice(len(cfg.colours), n, replace=False)
        return [(cfg.colours[c], cfg.shapes[rng.integers(len(cfg.shapes))]) for c in colours]
    pairs = rng.choice(len(cfg.colours) * len(cfg.shapes), n, replace=False)
    return [(cfg.colours[p // len(cfg.shapes)], cfg.shapes[p % len(cfg.shapes)]) for p in pairs]


def _span(rng: np.random.Generator, num_frames: int) -> tuple[int, int]:
    a, b = sorted(rng.integers(0, num_frames, 2).tolist())
    return a, b


def sample_objects(cfg: SyntheticConfig, rng: np.random.Generator, num_frames: int, *,
                   target_span: tuple[int, int] | None = None) -> list[SceneObject]:
    """The clip's objects, bottom to top; the last one is the target (painted over `target_span`)."""
    n = int(rng.integers(cfg.num_objects[0], cfg.num_objects[1] + 1))
    size = cfg.size
    objects = []
    for k, (colour, shape) in enumerate(_names(cfg, rng, n)):
        side = rng.uniform(cfg.min_side, cfg.max_side) * size
        r = side / 2
        start = rng.uniform(r, size - r, 2)
        velocity = rng.uniform(-1, 1, 2) * cfg.max_speed * size
        centres = np.stack([bounce(start[0], velocity[0], r, size - r, num_frames),
                            bounce(start[1], velocity[1], r, size - r, num_frames)], axis=-1)
        if k == n - 1 and target_span is not None:
            first, last = target_span
        elif rng.random() < cfg.always_visible:
            first, last = 0, num_frames - 1
        else:
            first, last = _span(rng, num_frames)
        rgb = np.asarray(COLOURS[colour], np.float64) + rng.normal(0, cfg.colour_jitter * 255, 3)
        objects.append(SceneObject(shape, colour, np.clip(rgb, 0, 255), side, centres, first, last))
    return objects


@dataclasses.dataclass
class Scene:
    frames: np.ndarray  # (T, H, W, 3) uint8
    objects: list[SceneObject]
    visible: np.ndarray  # (N, T, H, W) bool visible masks

    @property
    def target(self) -> int:
        return len(self.objects) - 1

    def present(self) -> list[int]:
        """Indices of the objects visible in at least one frame."""
        return [i for i in range(len(self.objects)) if self.visible[i].any()]

    def first_seen(self, i: int) -> int:
        return int(np.flatnonzero(self.visible[i].any(axis=(1, 2)))[0])


def make_scene(cfg: SyntheticConfig, rng: np.random.Generator, num_frames: int | None = None, *,
               target_span: tuple[int, int] | None = None) -> Scene:
    t = cfg.num_frames if num_frames is None else num_frames
    objects = sample_objects(cfg, rng, t, target_span=target_span)
    bg = background(rng, cfg.size, cfg.size, cfg.texture)
    frames, visible = render(objects, bg, t, rng, cfg.noise)
    return Scene(frames, objects, visible)


# --- questions about a scene ----------------------------------------------------------------------------------------


def _options(rng, correct: str, pool: list[str], k: int) -> tuple[tuple[str, ...], int]:
    wrong = [p for p in dict.fromkeys(pool) if p != correct]
    picked = [wrong[i] for i in rng.permutation(len(wrong))[:k - 1]]
    options = picked + [correct]
    order = rng.permutation(len(options))
    options = [options[i] for i in order]
    return tuple(options), options.index(correct)


def scene_question(cfg: SyntheticConfig, scene: Scene, rng: np.random.Generator, kind: str):
    """(question, answer, options, answer index) of one question `kind` about the scene, or None if the
    scene does not support it (e.g. no unique shape for "colour", one object for "order")."""
    objs = scene.objects
    present = scene.present()
    names = [objs[i].name for i in present]
    if kind == "count":
        n = len(present)
        pool = [NUMBER_WORDS[m].capitalize() + "." for m in range(1, max(cfg.num_objects[1], 4) + 1)]
        answer = NUMBER_WORDS[n].capitalize() + "."
        return ("How many shapes appear in the video?", answer, *_options(rng, answer, pool, 4))
    if kind == "colour":
        shapes = [objs[i].shape for i in present]
        unique = [i for i in present if shapes.count(objs[i].shape) == 1]
        if not unique:
            return None
        ob = objs[unique[rng.integers(len(unique))]]
        answer = ob.colour.capitalize() + "."
        pool = [c.capitalize() + "." for c in cfg.colours]
        return (f"What colour is the {ob.shape}?", answer, *_options(rng, answer, pool, 4))
    if kind == "shape":
        colours = [objs[i].colour for i in present]
        unique = [i for i in present if colours.count(objs[i].colour) == 1]
        if not unique:
            return None
        ob = objs[unique[rng.integers(len(unique))]]
        answer = f"A {ob.shape}."
        pool = [f"A {s}." for s in SHAPES]
        return (f"What shape is the {ob.colour} object?", answer, *_options(rng, answer, pool, 3))
    if kind == "order":
        firsts = {i: scene.first_seen(i) for i in present}
        pairs = [(a, b) for a in present for b in present if a < b and firsts[a] != firsts[b]]
        if not pairs:
            return None
        a, b = pairs[rng.integers(len(pairs))]
        if rng.random() < 0.5:
            a, b = b, a
        early = a if firsts[a] < firsts[b] else b
        answer = f"The {objs[early].name}."
        question = f"Which appears first, the {objs[a].name} or the {objs[b].name}?"
        return (question, answer, *_options(rng, answer, [f"The {objs[a].name}.", f"The {objs[b].name}."], 2))
    if kind == "presence":
        if rng.random() < 0.5:
            name = names[rng.integers(len(names))]
            answer = "Yes."
        else:
            absent = [f"{c} {s}" for c in cfg.colours for s in cfg.shapes if f"{c} {s}" not in names]
            if not absent:
                return None
            name, answer = absent[rng.integers(len(absent))], "No."
        return (f"Is there a {name} in the video?", answer, *_options(rng, answer, ["Yes.", "No."], 2))
    raise ValueError(f"unknown question kind {kind!r}; known: {CONVERSATION_KINDS}")


#: how each kind's question starts (`scene_question`), for breaking results down by kind
QUESTION_STARTS = {"count": "How many ", "colour": "What colour ", "shape": "What shape ", "order": "Which appears first",
                   "presence": "Is there "}


def question_kind(question: str) -> str:
    """The `CONVERSATION_KINDS` entry of a `scene_question` question (a multiple-choice record's `question`)."""
    for kind, start in QUESTION_STARTS.items():
        if question.startswith(start):
            return kind
    raise ValueError(f"question {question!r} is none of the synthetic kinds {CONVERSATION_KINDS}")


def _pick_questions(cfg, scene, rng, count):
    out = []
    for i in rng.permutation(len(CONVERSATION_KINDS)):
        q = scene_question(cfg, scene, rng, CONVERSATION_KINDS[i])
        if q is not None:
            out.append(q)
        if len(out) == count:
            break
    return out


# --- records --------------------------------------------------------------------------------------------------------


def make_record(cfg: SyntheticConfig, task: str, index: int, *, split: str = "train", seed: int = 0) -> Record:
    """Record `index` of `task` in `split`; identical for identical arguments."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    rng = record_rng(seed, split, task, index)
    t = cfg.num_frames
    rid = f"synthetic-{split}-{task}-{index}"
    common = dict(id=rid, task=task, fps=cfg.fps)
    if task in ("conversation", "mc"):
        scene = make_scene(cfg, rng)
        if task == "mc":
            q, _, options, answer = _pick_questions(cfg, scene, rng, 1)[0]
            return Record(**common, frames=scene.frames, question=q, options=options, mc_answer=answer)
        turns = [(q, a) for q, a, _, _ in _pick_questions(cfg, scene, rng, int(rng.integers(1, cfg.max_turns + 1)))]
        return Record(**common, frames=scene.frames, turns=turns)
    if task == "temporal":
        scene = make_scene(cfg, rng, target_span=_span(rng, t))
        tgt = scene.objects[scene.target]
        flags = scene.visible[scene.target].any(axis=(1, 2))
        spans = np.array([[a / cfg.fps, (b + 1) / cfg.fps] for a, b in runs(flags)], np.float32)
        phrase = VISIBLE_PHRASES[rng.integers(len(VISIBLE_PHRASES))]
        return Record(**common, frames=scene.frames, question=f"the {tgt.name} {phrase}", duration=cfg.duration,
                      spans=spans, saliency=np.where(flags, SALIENCY_MAX, 0.0).astype(np.float32),
                      clip_seconds=1.0 / cfg.fps)
    if task == "region":
        still = rng.random() < cfg.image_prob
        scene = make_scene(cfg, rng, 1 if still else t, target_span=(0, 0 if still else t - 1))
        tgt = scene.objects[scene.target]
        box = mask_box(scene.visible[scene.target, 0])
        expr = f"the {tgt.name}" + ("" if still else " in the first frame")
        return Record(**common, frames=scene.frames, question=expr, boxes=box[None],
                      box_frames=np.zeros(1, np.int64))
    # mask: the target is on screen in frame 0 (the tracking prompt's box) and may vanish later
    scene = make_scene(cfg, rng, target_span=(0, int(rng.integers(t // 2, t)) if t > 1 else 0))
    tgt = scene.objects[scene.target]
    vis = scene.visible[scene.target]
    flags = vis.any(axis=(1, 2))
    boxes = np.stack([mask_box(m) if f else np.zeros(4, np.float32) for m, f in zip(vis, flags)])
    question = "" if rng.random() < cfg.tracking_prob else f"the {tgt.name}"
    return Record(**common, frames=scene.frames, question=question, track_boxes=boxes, track_visible=flags,
                  track_masks=[rle_encode(m) for m in vis])


class SyntheticSource:
    """Random-access source of one task's records (grain `RandomAccessDataSource` protocol)."""

    def __init__(self, cfg: SyntheticConfig, task: str, split: str = "train", seed: int = 0):
        self.cfg, self.task, self.split, self.seed = cfg.validate(), task, split, seed
        self._len = cfg.split_size(split)
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {TASKS}")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self!r}")
        return make_record(self.cfg, self.task, int(index), split=self.split, seed=self.seed)

    def __repr__(self) -> str:
        return f"SyntheticSource(task={self.task!r}, split={self.split!r}, seed={self.seed}, len={self._len})"

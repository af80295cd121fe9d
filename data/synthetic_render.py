"""Rasterising the synthetic clips: coloured squares, circles and triangles moving over a textured
background, appearing and vanishing, with exact per-object visible masks.

A pixel (x, y) belongs to a shape when its centre (x + 0.5, y + 0.5) lies inside it. Objects are
painted in list order (later ones on top); an object's *visible* mask in a frame is its own mask
minus the masks of the visible objects above it, and every box is the exact pixel extent of a
visible mask: normalised xyxy (x_min / W, y_min / H, (x_max + 1) / W, (y_max + 1) / H).
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("square", "circle", "triangle")
#: Saturated RGB colours, far apart from each other and from the grey background.
COLOURS = {
    "red": (225, 30, 30), "green": (30, 190, 50), "blue": (35, 65, 230), "yellow": (240, 220, 30),
    "purple": (150, 50, 200), "orange": (250, 135, 20), "cyan": (30, 210, 220), "white": (250, 250, 250),
}


@dataclasses.dataclass
class SceneObject:
    shape: str
    colour: str
    rgb: np.ndarray  # (3,) float, 0..255
    side: float  # pixels (bounding-square side)
    centres: np.ndarray  # (T, 2) float (x, y) pixel coordinates per frame
    first: int  # first frame where the object is painted (inclusive)
    last: int  # last frame where the object is painted (inclusive)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def bounce(start: float, velocity: float, lo: float, hi: float, num: int) -> np.ndarray:
    """Positions start + velocity·t for t = 0..num-1, reflected at the walls lo and hi."""
    if hi <= lo:
        return np.full(num, (lo + hi) / 2)
    period = 2 * (hi - lo)
    p = np.mod(start - lo + velocity * np.arange(num), period)
    return lo + np.where(p > hi - lo, period - p, p)


def shape_mask(shape: str, cx: float, cy: float, side: float, height: int, width: int) -> np.ndarray:
    """(H, W) bool: pixels whose centre lies inside the shape of bounding side `side` centred at (cx, cy)."""
    ys = np.arange(height)[:, None] + 0.5
    xs = np.arange(width)[None, :] + 0.5
    r = side / 2
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "triangle":  # apex up, base at the bottom of the bounding square
        top = cy - r
        return (ys >= top) & (ys <= cy + r) & (np.abs(xs - cx) <= (ys - top) / 2)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Normalised xyxy pixel extent of a non-empty (H, W) mask."""
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h], np.float32)


def background(rng: np.random.Generator, height: int, width: int, texture: float) -> np.ndarray:
    """(H, W, 3) float 0..255: a grey level plus `texture` × (a random grating and a checkerboard)."""
    base = rng.uniform(95, 135) + rng.uniform(-8, 8, 3)
    img = np.broadcast_to(base, (height, width, 3)).astype(np.float64)
    if texture > 0:
        ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 8)
        grating = np.sin(2 * np.pi * freq * (xs * np.cos(angle) + ys * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
        cell = int(rng.integers(2, 6))
        checker = ((np.arange(height)[:, None] * cell // height + np.arange(width)[None] * cell // width) % 2) * 2 - 1
        tint = rng.uniform(0.5, 1.0, 3)
        img = img + texture * 110 * (0.7 * grating + 0.3 * checker)[..., None] * tint
    return img


def render(objects: list[SceneObject], bg: np.ndarray, num_frames: int, rng: np.random.Generator,
           noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) uint8 and visible masks (N, T, H, W) bool of `objects` painted over `bg`."""
    h, w = bg.shape[:2]
    n = len(objects)
    full = np.zeros((n, num_frames, h, w), bool)
    for i, ob in enumerate(objects):
        for t in range(ob.first, ob.last + 1):
            full[i, t] = shape_mask(ob.shape, ob.centres[t, 0], ob.centres[t, 1], ob.side, h, w)
    visible = full.copy()
    covered = np.zeros((num_frames, h, w), bool)
    for i in range(n - 1, -1, -1):  # from the top object down
        visible[i] &= ~covered
        covered |= full[i]
    frames = np.repeat(bg[None], num_frames, axis=0)
    for i, ob in enumerate(objects):
        frames[visible[i]] = ob.rgb
    if noise > 0:
        frames = frames + rng.normal(0, noise * 255, frames.shape)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8), visible


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D bool array as inclusive (first, last) index pairs."""
    out, start = [], None
    for i, f in enumerate(np.asarray(flags, bool).tolist() + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i - 1))
            start = None
    return out

"""LLaVA-OV visual tokens: anyres_max_9 image tiling and packing, video frame pooling; static shapes under jit.

Images (transformers `LlavaOnevisionModel.pack_image_features` and the image processor's `_get_image_patches`):

1. Host (NumPy): `select_best_resolution` picks the grid pinpoint (h, w) for the image's (height, width); the
   image is resized into it keeping its aspect ratio, centred on a padded canvas, and split row-major into
   rows × cols tiles of `image_size`; slot 0 holds the whole image resized to `image_size` (the base image).
   `tile_image` writes them into a fixed budget of 1 + `max_tiles` slots.
2. Device: every slot runs through the tower and the projector → (B, 1 + max_tiles, grid², D).
3. Packing: the tile features form a (rows·grid) × (cols·grid) map; `unpad_image` crops the rows (or columns)
   that came from the padding; if the map is larger than `max_num_patches` base images (ratio
   √(h·w / (9·grid²)) > 1.1, the "anyres_max_9" rule) it is bilinearly resized to (⌊h/ratio⌋, ⌊w/ratio⌋);
   `image_newline` is appended to every row; the base image's grid² tokens come first.

   All of this is linear in the features and depends only on the image size, so the host compiles it into an
   `ImagePlan`: for each of `token_budget` output slots, 4 source indices into the flattened tile features
   with bilinear weights (1, 0, 0, 0 where there is no resize), a newline flag and a validity flag.
   `pack_image_features` applies a plan with gathers: fixed shapes, any image size, one jit.

   An image of a multi-image sample is not tiled in transformers (`batch_num_images > 1`): its plan
   (`image_plan(..., tiled=False)`) is the base image's grid² tokens plus one newline.

Video (`get_video_features` / `apply_pooling`): each frame's grid × grid projected features are bilinearly
resized to ⌈grid/2⌉ × ⌈grid/2⌉ (27 → 14: 196 tokens per frame), the frames are concatenated and ONE
`image_newline` closes the video. A fixed frame budget F with `num_frames` valid leading frames gives
(B, F·p² + 1) slots, the newline right after the last valid frame, validity masks for the rest.

Bilinear weights follow PyTorch `F.interpolate(mode="bilinear", align_corners=False)` with an explicit
output size: source coordinate s = (o + ½)·in/out − ½ clamped at 0, taps ⌊s⌋ and min(⌊s⌋+1, in−1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tpo_jax.config_fields import check_field, check_positive


def _default_pinpoints(image_size: int = 384, max_side: int = 6) -> tuple[tuple[int, int], ...]:
    """(h, w) for h, w in image_size·{1..max_side}: the 36 pinpoints of LLaVA-OV (384 … 2304)."""
    sides = [image_size * k for k in range(1, max_side + 1)]
    return tuple((h, w) for h in sides for w in sides)


@dataclass(frozen=True)
class AnyresConfig:
    """Tiling of images and pooling of video frames; the static budgets the jitted model sees.

    image_size / patch_size: the tower's (a tile is one tower input; grid = image_size // patch_size).
    pinpoints: the (height, width) canvases an image may be tiled into (multiples of image_size).
    max_num_patches: the N of "anyres_max_N" (transformers' `vision_aspect_ratio`).
    max_tiles: tile slots after the base image (default: the largest pinpoint's tile count, 36 for 7B).
    image_tokens: token slots per image (default 0: the exact maximum over every pinpoint and image shape).
    """

    image_size: int = 384
    patch_size: int = 14
    pinpoints: tuple[tuple[int, int], ...] = field(default_factory=_default_pinpoints)
    max_num_patches: int = 9
    max_tiles: int = 0
    image_tokens: int = 0

    def __post_init__(self):  # pinpoints as a tuple of (h, w) tuples: the config stays hashable
        object.__setattr__(self, "pinpoints", tuple(tuple(int(v) for v in hw) for hw in self.pinpoints))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tile_budget(self) -> int:
        return self.max_tiles or max(h * w for h, w in self.tile_grids())

    @property
    def token_budget(self) -> int:
        return self.image_tokens or max_image_tokens(self)

    @property
    def pooled_grid(self) -> int:
        """Tokens per side of a pooled video frame: ⌈grid / 2⌉."""
        return math.ceil(self.grid / 2)

    def tile_grids(self) -> list[tuple[int, int]]:
        """(rows, cols) of tiles of every pinpoint."""
        return [(h // self.image_size, w // self.image_size) for h, w in self.pinpoints]

    def validate(self, prefix: str = "anyres.") -> None:
        check_positive(self, prefix, "image_size", "patch_size", "max_num_patches")
        check_field(self.patch_size <= self.image_size, prefix + "patch_size",
                    f"{self.patch_size} is larger than image_size {self.image_size}")
        check_field(len(self.pinpoints) > 0, prefix + "pinpoints", "needs at least one (height, width)")
        for hw in self.pinpoints:
            check_field(len(hw) == 2 and all(isinstance(v, int) and v > 0 and v % self.image_size == 0 for v in hw),
                        prefix + "pinpoints", f"{tuple(hw)} is not a (height, width) of positive multiples of "
                                              f"image_size {self.image_size}")
        need = max(h * w for h, w in self.tile_grids())
        check_field(isinstance(self.max_tiles, int) and (self.max_tiles == 0 or self.max_tiles >= need),
                    prefix + "max_tiles", f"{self.max_tiles} cannot hold the largest pinpoint's {need} tiles "
                                          "(0 = that count)")
        if self.image_tokens:
            need = max_image_tokens(self)
            check_field(self.image_tokens >= need, prefix + "image_tokens",
                        f"{self.image_tokens} cannot hold the longest packed image ({need} tokens; 0 = that count)")


def tiny(**overrides) -> AnyresConfig:
    """Tiling for the tiny tower (20 px tiles, 5 × 5 grid): pinpoints up to 4 × 4 tiles, 16 tile slots."""
    cfg = dataclasses.replace(AnyresConfig(image_size=20, patch_size=4, pinpoints=_default_pinpoints(20, 4)),
                              **overrides)
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------------------------------ host-side sizes

def select_best_resolution(size_hw: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (h, w) that keeps most of the image's pixels when it is scaled to fit, ties broken by the
    least canvas area wasted (first in list order on a full tie), as transformers selects it."""
    oh, ow = int(size_hw[0]), int(size_hw[1])
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    if best is None:
        raise ValueError(f"no pinpoint fits an image of size {tuple(size_hw)} (pinpoints {list(pinpoints)})")
    return best


def fit_size(size_hw: Sequence[int], target_hw: Sequence[int]) -> tuple[int, int]:
    """The (h, w) an image of `size_hw` is resized to inside a `target_hw` canvas (aspect ratio kept)."""
    oh, ow = int(size_hw[0]), int(size_hw[1])
    th, tw = int(target_hw[0]), int(target_hw[1])
    if tw / ow < th / oh:
        return min(math.ceil(oh * (tw / ow)), th), tw
    return th, min(math.ceil(ow * (th / oh)), tw)


def unpadded_window(size_hw: Sequence[int], map_hw: Sequence[int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the feature map rows/columns that cover the image, not the padding
    (transformers `unpad_image`: the same count of rows or columns is cut from both sides)."""
    oh, ow = int(size_hw[0]), int(size_hw[1])
    h, w = int(map_hw[0]), int(map_hw[1])
    if ow / oh > w / h:
        new_h = int(round(oh * (w / ow), 7))
        pad = (h - new_h) // 2
        return pad, 0, h - 2 * pad, w
    new_w = int(round(ow * (h / oh), 7))
    pad = (w - new_w) // 2
    return 0, pad, h, w - 2 * pad


def downscaled_size(h: int, w: int, grid: int, max_num_patches: int) -> tuple[int, int]:
    """The anyres_max_N rule: maps larger than 1.1² × N base images shrink to about N base images."""
    ratio = math.sqrt(h * w / (max_num_patches * grid ** 2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return h, w


def _packed_length(h: int, w: int, cfg: AnyresConfig) -> int:
    h2, w2 = downscaled_size(h, w, cfg.grid, cfg.max_num_patches)
    return cfg.grid ** 2 + h2 * (w2 + 1)


@functools.lru_cache(maxsize=32)
def max_image_tokens(cfg: AnyresConfig) -> int:
    """The longest packed image over every pinpoint and every unpadded shape it can give (the base image's
    grid² tokens + rows × (columns + newline))."""
    g, best = cfg.grid, cfg.grid ** 2 + 1  # an untiled image: base + one newline
    for rows, cols in cfg.tile_grids():
        full_h, full_w = rows * g, cols * g
        for h in range(1, full_h + 1):
            best = max(best, _packed_length(h, full_w, cfg))
        for w in range(1, full_w + 1):
            best = max(best, _packed_length(full_h, w, cfg))
    return best


def bilinear_taps(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, λ) per output index: out[o] = (1 − λ)·in[i0] + λ·in[i1] (PyTorch bilinear, align_corners=False)."""
    o = np.arange(out_len, dtype=np.float64)
    s = np.maximum((o + 0.5) * (in_len / out_len) - 0.5, 0.0)
    i0 = np.minimum(np.floor(s).astype(np.int64), in_len - 1)
    i1 = np.minimum(i0 + 1, in_len - 1)
    return i0, i1, s - i0


def bilinear_matrix(in_len: int, out_len: int) -> np.ndarray:
    """(out_len, in_len) float32 matrix of the 1-D bilinear resize."""
    i0, i1, lam = bilinear_taps(in_len, out_len)
    m = np.zeros((out_len, in_len), np.float64)
    np.add.at(m, (np.arange(out_len), i0), 1.0 - lam)
    np.add.at(m, (np.arange(out_len), i1), lam)
    return m.astype(np.float32)


# ------------------------------------------------------------------------------------------------ packing plans

class ImagePlan(NamedTuple):
    """How to pack one image's (or, batched, each image's) tile features: (…, T) slots of the output.

    index (…, T, 4) int32: rows of the flattened (1 + max_tiles)·grid² features; weight (…, T, 4) float32;
    newline (…, T) bool: the slot holds `image_newline`; valid (…, T) bool: the slot is part of the image
    (valid slots come first; `length` of them, (…,) int32).
    """

    index: np.ndarray
    weight: np.ndarray
    newline: np.ndarray
    valid: np.ndarray
    length: np.ndarray


def image_plan(size_hw: Sequence[int], cfg: AnyresConfig, *, tiled: bool = True) -> ImagePlan:
    """The packing plan of one image of original (height, width) `size_hw` (see the module docstring)."""
    g, budget = cfg.grid, cfg.token_budget
    base = np.arange(g * g)
    index = np.zeros((budget, 4), np.int64)
    weight = np.zeros((budget, 4), np.float64)
    newline = np.zeros(budget, bool)
    index[:g * g, 0], weight[:g * g, 0] = base, 1.0
    if not tiled:
        length = g * g + 1
        newline[g * g] = True
    else:
        best_h, best_w = select_best_resolution(size_hw, cfg.pinpoints)
        rows, cols = best_h // cfg.image_size, best_w // cfg.image_size
        if rows * cols > cfg.tile_budget:
            raise ValueError(f"an image of size {tuple(size_hw)} is tiled {rows} × {cols}, more than the "
                             f"{cfg.tile_budget} tile slots (anyres.max_tiles)")
        top, left, h, w = unpadded_window(size_hw, (rows * g, cols * g))
        h2, w2 = downscaled_size(h, w, g, cfg.max_num_patches)
        length = g * g + h2 * (w2 + 1)
        if length > budget:
            raise ValueError(f"an image of size {tuple(size_hw)} packs into {length} tokens, more than the "
                             f"{budget} slots (anyres.image_tokens)")
        if (h2, w2) == (h, w):  # no resize: tap 0 with weight 1
            y0, ly = np.arange(h), np.zeros(h)
            x0, lx = np.arange(w), np.zeros(w)
            y1, x1 = y0, x0
        else:
            y0, y1, ly = bilinear_taps(h, h2)
            x0, x1, lx = bilinear_taps(w, w2)
        ys = np.stack([y0, y0, y1, y1], -1)[:, None, :].repeat(w2, 1)
        xs = np.stack([x0, x1, x0, x1], -1)[None, :, :].repeat(h2, 0)
        taps_w = (np.stack([1 - ly, 1 - ly, ly, ly], -1)[:, None, :]
                  * np.stack([1 - lx, lx, 1 - lx, lx], -1)[None, :, :])
        ys, xs = ys + top, xs + left  # coordinates in the full (rows·g) × (cols·g) map
        tile = 1 + (ys // g) * cols + (xs // g)
        src = tile * g * g + (ys % g) * g + (xs % g)
        body = np.zeros((h2, w2 + 1, 4), np.int64)
        body_w = np.zeros((h2, w2 + 1, 4), np.float64)
        body[:, :w2], body_w[:, :w2] = src, taps_w
        body_nl = np.zeros((h2, w2 + 1), bool)
        body_nl[:, w2] = True
        n = h2 * (w2 + 1)
        index[g * g:g * g + n] = body.reshape(n, 4)
        weight[g * g:g * g + n] = body_w.reshape(n, 4)
        newline[g * g:g * g + n] = body_nl.reshape(n)
    valid = np.arange(budget) < length
    weight[newline | ~valid] = 0.0
    index[newline | ~valid] = 0
    return ImagePlan(index.astype(np.int32), weight.astype(np.float32), newline, valid, np.int32(length))


def stack_plans(plans: Sequence[ImagePlan]) -> ImagePlan:
    """One batched plan (leading axis B) from per-image plans of the same budget."""
    return ImagePlan(*(np.stack([np.asarray(getattr(p, f)) for p in plans]) for f in ImagePlan._fields))


def pack_image_features(features: jax.Array, plan: ImagePlan, image_newline: jax.Array) -> jax.Array:
    """features (B, 1 + max_tiles, grid², D) projected tile features (slot 0 = base image), `plan` batched
    (B, T, …) → (B, T, D): the packed image tokens; slots past `plan.length` are zero."""
    b, s, n, d = features.shape
    flat = features.reshape(b, s * n, d)
    index = jnp.asarray(plan.index)
    gathered = jnp.take_along_axis(flat, index.reshape(b, -1, 1), axis=1).reshape(*index.shape, d)
    out = jnp.einsum("btk,btkd->btd", jnp.asarray(plan.weight).astype(features.dtype), gathered)
    out = jnp.where(jnp.asarray(plan.newline)[..., None], image_newline.astype(out.dtype), out)
    return jnp.where(jnp.asarray(plan.valid)[..., None], out, jnp.zeros((), out.dtype))


# ------------------------------------------------------------------------------------------------ video

def pool_frames(features: jax.Array, grid: int) -> jax.Array:
    """features (…, grid², D) → (…, p², D), p = ⌈grid/2⌉: bilinear resize of each grid × grid frame."""
    p = math.ceil(grid / 2)
    m = jnp.asarray(bilinear_matrix(grid, p)).astype(features.dtype)
    x = features.reshape(*features.shape[:-2], grid, grid, features.shape[-1])
    y = jnp.einsum("ph,...hwd->...pwd", m, x)
    y = jnp.einsum("qw,...pwd->...pqd", m, y)
    return y.reshape(*features.shape[:-2], p * p, features.shape[-1])


def pack_video_features(features: jax.Array, grid: int, image_newline: jax.Array,
                        num_frames: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """features (B, F, grid², D) projected frame features → (tokens (B, F·p² + 1, D), valid (B, F·p² + 1)).

    The first `num_frames` (B,) frames are real (default: all F); their pooled tokens come first, then one
    `image_newline`; the slots after it are zero and not valid."""
    b, f = features.shape[:2]
    pooled = pool_frames(features, grid)  # (B, F, p², D)
    pp = pooled.shape[2]
    seq = jnp.concatenate([pooled.reshape(b, f * pp, -1),
                           jnp.broadcast_to(image_newline.astype(pooled.dtype), (b, 1, pooled.shape[-1]))], 1)
    n = jnp.full((b,), f, jnp.int32) if num_frames is None else jnp.asarray(num_frames, jnp.int32)
    k = jnp.arange(f * pp + 1)[None]
    end = (n * pp)[:, None]
    src = jnp.where(k < end, k, f * pp)  # the newline row sits at f·p² in `seq`
    out = jnp.take_along_axis(seq, src[..., None], axis=1)
    valid = k <= end
    return jnp.where(valid[..., None], out, jnp.zeros((), out.dtype)), valid


# ------------------------------------------------------------------------------------------------ host-side pixels

def resize(image: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """(H, W, C) → (h, w, C) float32, bicubic (PIL, per channel, antialiased when shrinking; the LLaVA-OV
    processor's resample). Not bit-identical to transformers' torchvision path."""
    from PIL import Image

    h, w = int(size_hw[0]), int(size_hw[1])
    image = np.asarray(image, np.float32)
    chans = [np.asarray(Image.fromarray(image[..., c], mode="F").resize((w, h), Image.BICUBIC))
             for c in range(image.shape[-1])]
    return np.stack(chans, -1).astype(np.float32)


def tile_image(image: np.ndarray, cfg: AnyresConfig, *, pad_value: float = 0.0) -> tuple[np.ndarray, int]:
    """(H, W, C) pixels → (tiles (1 + max_tiles, S, S, C) float32, tile count without the base).

    Slot 0: the whole image resized to S × S; slots 1…rows·cols: the image resized into the best pinpoint,
    centred on a `pad_value` canvas, cut row-major into S × S tiles; the remaining slots are zero. Apply the
    same pixel normalisation as the tower expects before or after (pad with the normalised black, e.g. −1 for
    SigLIP's mean = std = 0.5, if normalising first)."""
    s = cfg.image_size
    oh, ow = image.shape[:2]
    best_h, best_w = select_best_resolution((oh, ow), cfg.pinpoints)
    rows, cols = best_h // s, best_w // s
    if rows * cols > cfg.tile_budget:
        raise ValueError(f"an image of size {(oh, ow)} is tiled {rows} × {cols}, more than the {cfg.tile_budget} "
                         "tile slots (anyres.max_tiles)")
    nh, nw = fit_size((oh, ow), (best_h, best_w))
    canvas = np.full((best_h, best_w, image.shape[-1]), pad_value, np.float32)
    top, left = (best_h - nh) // 2, (best_w - nw) // 2
    canvas[top:top + nh, left:left + nw] = resize(image, (nh, nw))
    out = np.zeros((1 + cfg.tile_budget, s, s, image.shape[-1]), np.float32)
    out[0] = resize(image, (s, s))
    tiles = canvas.reshape(rows, s, cols, s, -1).transpose(0, 2, 1, 3, 4).reshape(rows * cols, s, s, -1)
    out[1:1 + rows * cols] = tiles
    return out, rows * cols

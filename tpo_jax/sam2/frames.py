"""Frames for SAM2: the release's "Mask" transform (MODEL-SPEC §8.5) — every frame /255, resized to the
model's S×S by bicubic interpolation on the float values (aspect ratio not kept, antialiased when shrinking, no
rounding), then ImageNet-normalised (`tpo_jax.sam2.image.normalize_images`)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tpo_jax.sam2.image import PIXEL_MEAN, PIXEL_STD


def resize_bicubic(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, h, w, C) float → (T, H, W, C) float32, antialiased bicubic (a = −0.5) per channel with PIL (mode "F");
    no clamping or rounding."""
    frames = np.asarray(frames, np.float32)
    h, w = size
    out = np.empty((len(frames), h, w, frames.shape[-1]), np.float32)
    for t, frame in enumerate(frames):
        for c in range(frames.shape[-1]):
            out[t, ..., c] = np.asarray(Image.fromarray(frame[..., c], mode="F").resize((w, h),
                                                                                        Image.Resampling.BICUBIC))
    return out


def sam2_frames(frames: np.ndarray, image_size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB → (T, S, S, 3) float32 SAM2 input (S = image_size)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"SAM2 frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    x = frames.astype(np.float32) / 255.0
    if frames.shape[1:3] != (image_size, image_size):
        x = resize_bicubic(x, (image_size, image_size))
    return (x - np.asarray(PIXEL_MEAN, np.float32)) / np.asarray(PIXEL_STD, np.float32)

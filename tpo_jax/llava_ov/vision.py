"""The vision side of LLaVA-OneVision: SigLIP tower + projector + `image_newline`, images and video to LLM rows.

    tiles (B, 1 + max_tiles, S, S, C) ─► tower ─► projector ─► pack_image_features(plan) ─► (B, T, D_llm), valid
    frames (B, F, S, S, C)            ─► tower ─► projector ─► pool 2× + newline          ─► (B, F·p² + 1, D_llm), valid

Parameters (paths as the conversion table `tpo_jax.checkpoints.tables.llava_ov_vision` writes them):
`vision_tower.*` (`siglip.SiglipVisionTower`), `projector.linear_{1,2}.*`, `image_newline` (D_llm,).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax.config import SiglipConfig, check_tiles_match_tower
from tpo_jax.config_fields import check_positive
from tpo_jax.layers import param
from tpo_jax.llava_ov import siglip, visual_tokens
from tpo_jax.llava_ov.projector import MultiModalProjector
from tpo_jax.llava_ov.siglip import SiglipVisionTower
from tpo_jax.llava_ov.visual_tokens import AnyresConfig, ImagePlan, pack_image_features, pack_video_features
from tpo_jax.vit import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class LlavaOVVisionConfig:
    """Tower, tiling and the LLM width the projector maps to (3584 for the Qwen2-7B of LLaVA-OV-7B)."""

    siglip: SiglipConfig = field(default_factory=siglip.so400m_patch14_384)
    anyres: AnyresConfig = field(default_factory=AnyresConfig)
    llm_hidden: int = 3584

    def validate(self, prefix: str = "llava_ov.") -> None:
        self.siglip.validate(prefix + "siglip.")
        self.anyres.validate(prefix + "anyres.")
        check_positive(self, prefix, "llm_hidden")
        check_tiles_match_tower(self.siglip, self.anyres, prefix)


def tiny(llm_hidden: int = 40, **siglip_overrides) -> LlavaOVVisionConfig:
    return LlavaOVVisionConfig(siglip=siglip.tiny(**siglip_overrides), anyres=visual_tokens.tiny(),
                               llm_hidden=llm_hidden)


class LlavaOVVision(nnx.Module):
    """SigLIP tower, multimodal projector and the learned `image_newline` row."""

    def __init__(self, cfg: LlavaOVVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_tower = SiglipVisionTower(cfg.siglip, **kw)
        self.projector = MultiModalProjector(cfg.siglip.hidden_size, cfg.llm_hidden, **kw)
        self.image_newline = param(rngs, nnx.initializers.normal(1.0 / math.sqrt(cfg.llm_hidden)),
                                   (cfg.llm_hidden,), ("embed",), param_dtype)

    def features(self, pixels: jax.Array) -> jax.Array:
        """pixels (N, S, S, C) → projected features (N, grid², D_llm)."""
        return self.projector(self.vision_tower(pixels))

    def _per_slot(self, pixels: jax.Array) -> jax.Array:
        b, n = pixels.shape[:2]
        return self.features(pixels.reshape(b * n, *pixels.shape[2:])).reshape(b, n, -1, self.cfg.llm_hidden)

    def encode_images(self, tiles: jax.Array, plan: ImagePlan) -> tuple[jax.Array, jax.Array]:
        """tiles (B, 1 + max_tiles, S, S, C) (slot 0: base image), `plan` batched → (tokens (B, T, D), valid (B, T))."""
        feats = self._per_slot(tiles)
        return pack_image_features(feats, plan, self.image_newline[...]), jnp.asarray(plan.valid)

    def encode_video(self, frames: jax.Array, num_frames: jax.Array | None = None, *,
                     return_features: bool = False):
        """frames (B, F, S, S, C), the first `num_frames` (B,) real → (tokens (B, F·p² + 1, D), valid), and with
        `return_features` also the tower's features (B, F·grid², width) before the projector."""
        b, f = frames.shape[:2]
        tower = self.vision_tower(frames.reshape(b * f, *frames.shape[2:]))
        projected = self.projector(tower).reshape(b, f, -1, self.cfg.llm_hidden)
        tokens, valid = pack_video_features(projected, self.cfg.siglip.grid, self.image_newline[...], num_frames)
        if return_features:
            return tokens, valid, tower.reshape(b, -1, tower.shape[-1])
        return tokens, valid


def siglip_from_imagenet(frames: jax.Array) -> jax.Array:
    """Frames normalised with ImageNet's mean / std (every model input of this project, `tpo_jax.vit.IMAGENET_MEAN`)
    → SigLIP's normalisation (mean = std = 0.5): one affine map per channel, x·std/0.5 + (mean − 0.5)/0.5."""
    scale = jnp.asarray(IMAGENET_STD / 0.5, frames.dtype)
    shift = jnp.asarray((IMAGENET_MEAN - 0.5) / 0.5, frames.dtype)
    return frames * scale + shift


def with_scan(cfg: LlavaOVVisionConfig, scan: bool = True) -> LlavaOVVisionConfig:
    """The same config with the tower's layers scanned (or unrolled)."""
    stack = dataclasses.replace(cfg.siglip.stack, scan_layers=scan)
    return dataclasses.replace(cfg, siglip=dataclasses.replace(cfg.siglip, stack=stack))

"""The LLaVA-OneVision base model (transformers `LlavaOnevisionForConditionalGeneration`): vision side + Qwen2.

    input_ids (B, L) ──► llm.embed_tokens ──► rows of `<image>` tokens ◄── packed image features (per sample)
                                          └─► rows of `<video>` tokens ◄── pooled video features (per sample)
                     ──► Qwen2 decoder (`tpo_jax.llm.MistralDecoder`, q/k/v bias) ──► logits, final-norm hidden

Static shapes everywhere. Each sample has `max_images` image slots of `1 + anyres.max_tiles` tiles
(`ImagePlan`s from `visual_tokens.image_plan`, `empty_plan` for an unused slot) and `max_frames` video frame
slots (the first `num_frames` real). The valid image tokens of a sample (its images in order, each its plan's
`length` rows) are written, in order, into the sample's `<image>` rows; the video's `num_frames·p² + 1` tokens
into its `<video>` rows (`tpo_jax.model.scatter_rows`: a gather by rank). The prompt must hold exactly that many
placeholder rows per sample, as the HF processor expands them: `expand_placeholders` builds such prompts and
`check_placeholders` verifies them on the host (under jit a mismatch cannot raise: surplus features are
dropped, surplus `<image>` rows of a multi-image sample get zeros, surplus `<video>` rows keep their embedding).

Parameters: `vision.vision_tower.*`, `vision.projector.*`, `vision.image_newline` (`LlavaOVVision`), `llm.*`
(`MistralDecoder`). Conversion: `tpo_jax.checkpoints.tables.llava_ov`. KV-cache decoding works as for the
decoder: prefill `model(prompt_ids, images=…, cache=KVCache.init(cfg.llm, …))`, then `model(next_ids, cache=…)`
(no images; the decoder's cache conventions).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax.config import (LLAVA_OV_IMAGE_TOKEN_ID, LLAVA_OV_VIDEO_TOKEN_ID, LLMConfig, LoRAConfig, SiglipConfig,
                            StackConfig, TPOConfig, qwen2_7b_llm, qwen2_tiny_llm)
from tpo_jax.config_fields import DTYPES, check_field, check_positive
from tpo_jax.llava_ov import siglip, visual_tokens
from tpo_jax.llava_ov.siglip import siglip_stack_layouts
from tpo_jax.llava_ov.vision import LlavaOVVision, LlavaOVVisionConfig
from tpo_jax.llava_ov.visual_tokens import AnyresConfig, ImagePlan
from tpo_jax.llm import LLMOutput, MistralDecoder, llm_stack_layouts
from tpo_jax.model import scatter_rows
from tpo_jax.stack import StackLayout


@dataclass(frozen=True)
class LlavaOVConfig:
    """The whole base model. The projector maps the tower's width to `llm.hidden_size` (`vision`).

    max_images: image slots per sample (1: one anyres image; >1: multi-image, plans with `tiled=False` as HF
    does for `batch_num_images > 1`). max_frames: video frame slots per sample.
    """

    siglip: SiglipConfig = field(default_factory=siglip.so400m_patch14_384)
    anyres: AnyresConfig = field(default_factory=AnyresConfig)
    llm: LLMConfig = field(default_factory=qwen2_7b_llm)
    image_token_id: int = LLAVA_OV_IMAGE_TOKEN_ID
    video_token_id: int = LLAVA_OV_VIDEO_TOKEN_ID
    max_images: int = 1
    max_frames: int = 32
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"

    @property
    def vision(self) -> LlavaOVVisionConfig:
        return LlavaOVVisionConfig(siglip=self.siglip, anyres=self.anyres, llm_hidden=self.llm.hidden_size)

    @property
    def video_tokens(self) -> int:
        """Video token slots per sample: max_frames · p² + 1 (the closing newline)."""
        return self.max_frames * self.anyres.pooled_grid ** 2 + 1

    def validate(self, prefix: str = "llava_ov.") -> "LlavaOVConfig":
        self.vision.validate(prefix)
        self.llm.validate(prefix + "llm.")
        check_positive(self, prefix, "max_images", "max_frames")
        for name in ("image_token_id", "video_token_id"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and 0 <= value < self.llm.vocab_size, prefix + name,
                        f"{value!r} is not a token id of the vocabulary (0 … {self.llm.vocab_size - 1})")
        check_field(self.image_token_id != self.video_token_id, prefix + "video_token_id",
                    f"{self.video_token_id} is also image_token_id")
        for name in ("dtype", "param_dtype"):
            check_field(getattr(self, name) in DTYPES, prefix + name,
                        f"{getattr(self, name)!r} is not one of {list(DTYPES)}")
        return self


def llava_ov_7b(**overrides) -> LlavaOVConfig:
    """LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf): SigLIP SO400M/14 @ 384 with 26 layers
    (`siglip.so400m_patch14_384`), anyres_max_9 over the 36 pinpoints 384·{1..6}² (`AnyresConfig()`), Qwen2-7B
    (`config.qwen2_7b_llm`: hidden 3584, 28 layers, vocab 152128), `<image>` 151646, `<video>` 151647; one image
    slot and 32 frame slots (32 × 196 + 1 = 6273 video tokens)."""
    return dataclasses.replace(LlavaOVConfig(), **overrides).validate()


def tiny(**overrides) -> LlavaOVConfig:
    """A tiny model for CPU tests: `siglip.tiny` (20 px, 5 × 5 grid), `visual_tokens.tiny` (up to 4 × 4 tiles),
    `qwen2_tiny_llm` (hidden 64) with the vocabulary of the shipped tiny tokenizer (`LlavaOVTokenizer.tiny()`:
    396 ids, `<image>` 387, `<video>` 388, the task tokens 389-395; 400 rows); 4 frame slots."""
    base = LlavaOVConfig(siglip=siglip.tiny(), anyres=visual_tokens.tiny(), llm=qwen2_tiny_llm(vocab_size=400),
                         image_token_id=387, video_token_id=388, max_images=1, max_frames=4)
    return dataclasses.replace(base, **overrides).validate()


def base_config(cfg: TPOConfig) -> LlavaOVConfig:
    """The base model of an arch "llava_ov" `TPOConfig`: its tower, tiling, LLM, visual ids and frame count (what
    the tokenizer's `build_input_ids` and the conversion tables read)."""
    v = cfg.llava_ov
    if v is None:
        raise ValueError("base_config: the TPOConfig is not arch 'llava_ov' (its llava_ov section is null)")
    return LlavaOVConfig(siglip=v.siglip, anyres=v.anyres, llm=cfg.llm, image_token_id=v.image_token_id,
                         video_token_id=v.video_token_id, max_images=1, max_frames=v.num_frames, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype)


def with_scan(cfg: LlavaOVConfig, scan: bool = True) -> LlavaOVConfig:
    """The same config with both layer stacks (tower and decoder) scanned (or unrolled)."""
    def st(s: StackConfig) -> StackConfig:
        return dataclasses.replace(s, scan_layers=scan)
    return dataclasses.replace(cfg, siglip=dataclasses.replace(cfg.siglip, stack=st(cfg.siglip.stack)),
                               llm=dataclasses.replace(cfg.llm, stack=st(cfg.llm.stack)))


def stack_layouts(cfg: LlavaOVConfig) -> list[StackLayout]:
    """The scanned stacks of `LlavaOV(cfg)` as the conversion tables see them (per-layer key names)."""
    return siglip_stack_layouts(cfg.siglip, "vision.vision_tower") + llm_stack_layouts(cfg.llm, "llm")


# ------------------------------------------------------------------------------------------------ host side

def empty_plan(cfg: AnyresConfig) -> ImagePlan:
    """The plan of an unused image slot: no valid token."""
    t = cfg.token_budget
    return ImagePlan(np.zeros((t, 4), np.int32), np.zeros((t, 4), np.float32), np.zeros(t, bool),
                     np.zeros(t, bool), np.int32(0))


def batch_plans(plans: Sequence[Sequence[ImagePlan]], cfg: LlavaOVConfig) -> ImagePlan:
    """Per-sample lists of plans (at most `max_images` each; missing slots get `empty_plan`) → one plan with
    leading axes (B, max_images)."""
    rows = []
    for b, sample in enumerate(plans):
        if len(sample) > cfg.max_images:
            raise ValueError(f"sample {b} has {len(sample)} images, more than max_images = {cfg.max_images}")
        rows.append(visual_tokens.stack_plans(list(sample) + [empty_plan(cfg.anyres)] * (cfg.max_images - len(sample))))
    return visual_tokens.stack_plans(rows)


def video_token_count(num_frames: int, cfg: LlavaOVConfig) -> int:
    """`<video>` rows of a video of `num_frames` frames: num_frames · p² + 1 (0 for no video)."""
    return num_frames * cfg.anyres.pooled_grid ** 2 + 1 if num_frames > 0 else 0


def expand_placeholders(tokens: Sequence[int], cfg: LlavaOVConfig, image_lengths: Sequence[int] = (),
                        num_frames: int = 0) -> list[int]:
    """The processor's prompt expansion: the k-th `<image>` token becomes `image_lengths[k]` (its plan's
    `length`) copies, the `<video>` token `video_token_count(num_frames)` copies."""
    out, k, videos = [], 0, 0
    for t in tokens:
        if t == cfg.image_token_id:
            if k >= len(image_lengths):
                raise ValueError(f"the prompt has more <image> tokens than the {len(image_lengths)} images given")
            out += [t] * int(image_lengths[k])
            k += 1
        elif t == cfg.video_token_id:
            videos += 1
            if videos > 1:
                raise ValueError("the prompt has more than one <video> token (one video per sample)")
            out += [t] * video_token_count(num_frames, cfg)
        else:
            out.append(int(t))
    if k != len(image_lengths):
        raise ValueError(f"{len(image_lengths)} images given but the prompt has {k} <image> tokens")
    return out


def check_placeholders(input_ids, cfg: LlavaOVConfig, image_plans: ImagePlan | None = None,
                       num_frames=None) -> None:
    """Host check: each sample's `<image>` / `<video>` rows equal its valid image / video tokens."""
    ids = np.asarray(input_ids)
    n_img = (ids == cfg.image_token_id).sum(1)
    n_vid = (ids == cfg.video_token_id).sum(1)
    want_img = np.zeros(len(ids), int) if image_plans is None else \
        np.asarray(image_plans.length).reshape(len(ids), -1).sum(1)
    want_vid = np.zeros(len(ids), int) if num_frames is None else \
        np.array([video_token_count(int(n), cfg) for n in np.asarray(num_frames)])
    for b in range(len(ids)):
        if n_img[b] != want_img[b]:
            raise ValueError(f"sample {b}: {n_img[b]} <image> tokens (id {cfg.image_token_id}) but its images pack "
                             f"into {want_img[b]} tokens")
        if n_vid[b] != want_vid[b]:
            raise ValueError(f"sample {b}: {n_vid[b]} <video> tokens (id {cfg.video_token_id}) but its video packs "
                             f"into {want_vid[b]} tokens")


# ------------------------------------------------------------------------------------------------ model

def _compact(tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """(B, N, D) with valid rows anywhere → the valid rows first, in order (stable), zeros after."""
    order = jnp.argsort(jnp.logical_not(valid), axis=1, stable=True)
    tokens = jnp.where(valid[..., None], tokens, jnp.zeros((), tokens.dtype))
    return jnp.take_along_axis(tokens, order[..., None], axis=1)


class LlavaOV(nnx.Module):
    """`vision` (SigLIP + projector + image_newline) and `llm` (the Qwen2 decoder)."""

    def __init__(self, cfg: LlavaOVConfig, lora: LoRAConfig | None = None, *, rngs: nnx.Rngs | None):
        cfg.validate()
        self.cfg = cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.vision = LlavaOVVision(cfg.vision, **kw)
        self.llm = MistralDecoder(cfg.llm, lora, **kw)

    def encode_images(self, images: jax.Array, plans: ImagePlan) -> jax.Array:
        """images (B, I, 1 + max_tiles, S, S, C), plans (B, I, T, …) → (B, I·T, D): each sample's valid image
        tokens first, in image order, then zeros. (B, 1 + max_tiles, S, S, C) with plans (B, T, …) is I = 1."""
        if images.ndim == 5:
            images = images[:, None]
            plans = ImagePlan(*(jnp.asarray(x)[:, None] for x in plans))
        b, i = images.shape[:2]
        flat = ImagePlan(*(jnp.asarray(x).reshape(b * i, *jnp.shape(x)[2:]) for x in plans))
        tokens, valid = self.vision.encode_images(images.reshape(b * i, *images.shape[2:]), flat)
        tokens, valid = tokens.reshape(b, i * tokens.shape[1], -1), valid.reshape(b, -1)
        return tokens if i == 1 else _compact(tokens, valid)  # one image: its valid slots already come first

    def embed_inputs(self, input_ids: jax.Array, *, images: jax.Array | None = None,
                     image_plans: ImagePlan | None = None, videos: jax.Array | None = None,
                     num_frames: jax.Array | None = None) -> jax.Array:
        """Token embeddings with the image / video features written into the placeholder rows, (B, L, D).

        videos (B, F, S, S, C) with the first `num_frames` (B,) frames real (default: all F)."""
        x = self.llm.embed(input_ids)
        if images is not None:
            if image_plans is None:
                raise ValueError("LlavaOV: images need their image_plans")
            x = scatter_rows(x, input_ids == self.cfg.image_token_id, self.encode_images(images, image_plans))
        if videos is not None:
            tokens, _ = self.vision.encode_video(videos, num_frames)
            x = scatter_rows(x, input_ids == self.cfg.video_token_id, tokens)
        return x

    def __call__(self, input_ids: jax.Array, *, images: jax.Array | None = None,
                 image_plans: ImagePlan | None = None, videos: jax.Array | None = None,
                 num_frames: jax.Array | None = None, **llm_kwargs) -> LLMOutput:
        """→ `LLMOutput(logits, hidden, cache)`; `llm_kwargs` go to the decoder (attention_mask, positions, cache,
        rng, logits)."""
        embeds = self.embed_inputs(input_ids, images=images, image_plans=image_plans, videos=videos,
                                   num_frames=num_frames)
        return self.llm(inputs_embeds=embeds, **llm_kwargs)


__all__ = ["LlavaOVConfig", "LlavaOV", "base_config", "llava_ov_7b", "tiny", "with_scan", "stack_layouts", "empty_plan",
           "batch_plans", "video_token_count", "expand_placeholders", "check_placeholders"]

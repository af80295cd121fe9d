"""The SAM2 image path assembled: image → Hiera → FPN neck → (prompt encoder + mask decoder) → masks.

Follows upstream `SAM2ImagePredictor` (`set_image` + `predict`) on a model built from `sam2_hiera_l.yaml`:

* `encode_image(images)`: images (B, S, S, 3), already resized to S = cfg.image_size and normalised with
  `normalize_images`; the neck's output levels (without the scalp level), the two highest-resolution levels
  through the mask decoder's conv_s0 / conv_s1 (`SAM2Base.forward_image`), and the lowest-resolution level as
  the image embedding, plus `no_mem_embed` when given (`directly_add_no_mem_embed`: a frame without memory;
  the parameter lives in `tpo_jax.sam2.pointers.MemoryTokens`, so it is passed in).
* `predict(features, points=…, labels=…, boxes=…, mask_input=…)`: prompts in model-input pixels (x, y) of the
  S×S image; box corners become points labelled 2 / 3 placed before the clicks, and the prompt encoder pads
  with one not-a-point (exactly as the predictor, which never passes `boxes` to the prompt encoder). Returns
  the low-resolution mask logits (B, K, S/4, S/4), IoU scores (B, K), object-score logits (B, 1) and the SAM
  output tokens; K = 3 with multimask output, else 1 (dynamic stability selection). Upscaling the logits to the
  original frame is left to the caller.

Params: image_encoder.trunk.* (`hiera`), image_encoder.neck.* (`neck`), sam_prompt_encoder.* (`heads.mask`),
sam_mask_decoder.* (`mask_decoder`) — the upstream state-dict prefixes (`tpo_jax.checkpoints.tables.sam2`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax.config import MaskHeadConfig
from tpo_jax.heads.mask import SAM2PromptEncoder
from tpo_jax.sam2.config import Sam2Config
from tpo_jax.sam2.hiera import Hiera
from tpo_jax.sam2.mask_decoder import MaskDecoder, select_masks
from tpo_jax.sam2.neck import FpnNeck

PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


def normalize_images(images: jax.Array) -> jax.Array:
    """RGB images in [0, 1], (..., 3) channels-last → ImageNet-normalised float32 (the predictor's transform)."""
    return (images.astype(jnp.float32) - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)


class ImageFeatures(NamedTuple):
    """What `encode_image` returns (all channels-last, compute dtype).

    image_embed (B, E, E, d): lowest-resolution level (+ no_mem_embed when given); high_res (s0 (B, 4E, 4E, d/8),
    s1 (B, 2E, 2E, d/4)): after conv_s0 / conv_s1; backbone_fpn / vision_pos: the neck's levels (highest
    resolution first; the first two through conv_s0 / conv_s1, the last without no_mem_embed) and their sine
    position encodings, for the memory path."""

    image_embed: jax.Array
    high_res: tuple[jax.Array, jax.Array] | None
    backbone_fpn: list[jax.Array]
    vision_pos: list[jax.Array]


class Prediction(NamedTuple):
    masks: jax.Array  # (B, K, 4E, 4E) low-resolution mask logits, float32
    iou: jax.Array  # (B, K)
    sam_tokens: jax.Array  # (B, K', d) SAM output tokens (object-pointer input)
    object_score_logits: jax.Array  # (B, 1)


class ImageEncoder(nnx.Module):
    def __init__(self, cfg: Sam2Config, *, dtype, param_dtype, rngs):
        self.trunk = Hiera(cfg.trunk, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.neck = FpnNeck(cfg.neck, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        return self.neck(self.trunk(images))


class Sam2Image(nnx.Module):
    def __init__(self, cfg: Sam2Config, *, rngs: nnx.Rngs | None, prompt_cfg: MaskHeadConfig | None = None):
        """`prompt_cfg`: the mask head's config when SAM2 sits in the TPO model (its point-coordinate settings
        reach the prompt encoder); its prompt_dim / sam_image_size must be SAM2's."""
        cfg.validate()
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image_encoder = ImageEncoder(cfg, **kw)
        pe_cfg = prompt_cfg or MaskHeadConfig(prompt_dim=cfg.hidden_dim, sam_image_size=cfg.image_size)
        if (pe_cfg.prompt_dim, pe_cfg.sam_image_size) != (cfg.hidden_dim, cfg.image_size):
            raise ValueError(f"SAM2 prompt encoder: prompt_dim {pe_cfg.prompt_dim} / image size "
                             f"{pe_cfg.sam_image_size} differ from SAM2's {cfg.hidden_dim} / {cfg.image_size}")
        self.sam_prompt_encoder = SAM2PromptEncoder(pe_cfg, image_embedding_size=cfg.image_embedding_size,
                                                    mask_in_chans=cfg.mask_in_chans, **kw)
        self.sam_mask_decoder = MaskDecoder(cfg.hidden_dim, cfg.mask_decoder, **kw)

    def encode_image(self, images: jax.Array, no_mem_embed: jax.Array | None = None) -> ImageFeatures:
        """images (B, S, S, 3) normalised → `ImageFeatures`; `no_mem_embed` (d,) is added to the image embedding
        when given and cfg.directly_add_no_mem_embed."""
        fpn, pos = self.image_encoder(images)
        fpn = list(fpn)
        high_res = None
        if self.cfg.mask_decoder.use_high_res_features:
            fpn[0], fpn[1] = self.sam_mask_decoder.high_res_features(fpn[0], fpn[1])
            high_res = (fpn[0], fpn[1])
        embed = fpn[-1]
        if no_mem_embed is not None and self.cfg.directly_add_no_mem_embed:
            embed = embed + no_mem_embed.reshape(-1).astype(embed.dtype)
        return ImageFeatures(embed, high_res, fpn, pos)

    def predict(self, features: ImageFeatures, *, points: jax.Array | None = None, labels: jax.Array | None = None,
                boxes: jax.Array | None = None, mask_input: jax.Array | None = None,
                multimask_output: bool = True) -> Prediction:
        """Prompts for each image of `features` (B prompts sets for B images, or B sets for one image):
        points (B, N, 2) pixels with labels (B, N); boxes (B, 4) pixel xyxy; mask_input (B, 4E, 4E, 1) logits."""
        coords, labs = [], []
        if boxes is not None:
            b = boxes.shape[0]
            coords.append(boxes.astype(jnp.float32).reshape(b, 2, 2))
            labs.append(jnp.broadcast_to(jnp.asarray([2, 3], jnp.int32), (b, 2)))
        if points is not None:
            coords.append(points.astype(jnp.float32))
            labs.append(labels.astype(jnp.int32))
        if not coords:
            raise ValueError("Sam2Image.predict: give points (with labels) and/or boxes")
        pe = self.sam_prompt_encoder
        sparse = pe.embed_points(jnp.concatenate(coords, 1), jnp.concatenate(labs, 1), pad=True)
        dense = pe.dense_embedding(sparse.shape[0], mask_input)
        out = self.sam_mask_decoder(features.image_embed, pe.dense_pe(), sparse.astype(self.dtype),
                                    dense.astype(self.dtype), features.high_res)
        masks, iou, tokens = select_masks(out, self.cfg.mask_decoder, multimask_output)
        return Prediction(masks, iou, tokens, out.object_score_logits)

    def __call__(self, images: jax.Array, *, no_mem_embed: jax.Array | None = None, **prompts) -> Prediction:
        return self.predict(self.encode_image(images, no_mem_embed), **prompts)

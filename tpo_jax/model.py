"""The assembled TPO model (MODEL-SPEC §4.4, §5.1-§5.2).

frames → UMT ViT → Q-Former → project_up = visual tokens, written into the placeholder rows of
the token embeddings; the learnable task-token vectors are written at `<boxes>` / `<temp>` /
`<tracking>` rows and `loc_encoder(box)` at `<track_box>` rows; the Mistral decoder then returns
logits and the final-norm hidden states, from which `gather_task_hidden` takes the rows that feed
the task heads. Every step uses static shapes: rows are selected by masks and ranks, never by
Python loops over the batch.

The model owns its forward pass: `model(input_ids, ..., heads=("region", "temporal", "mask"),
head_inputs=batch)` returns a `TPOOutput` whose `heads` hold each head's outputs at its task-token
slots (`RegionOutput`, `TemporalOutput`, `MaskOutput`). `run_heads` is the one place heads are
dispatched; the losses (`tpo_jax.losses`), evaluation and generation read these outputs.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from tpo_jax.config import TPOConfig
from tpo_jax.heads.mask import MaskHead
from tpo_jax.heads.region import RegionHead
from tpo_jax.heads.temporal.batch import negative_pairs, temporal_rows
from tpo_jax.heads.temporal.model import CGDETR
from tpo_jax.layers import MLP, param, split_rng
from tpo_jax.llava_ov.siglip import siglip_stack_layouts
from tpo_jax.llava_ov.vision import LlavaOVVision, LlavaOVVisionConfig, siglip_from_imagenet
from tpo_jax.llm import KVCache, MistralDecoder, llm_stack_layouts
from tpo_jax.qformer import QFormer, qformer_stack_layouts
from tpo_jax.sam2.video import Sam2Video
from tpo_jax.stack import StackLayout
from tpo_jax.vit import UMTViT, vit_stack_layouts

# task-token field (`TaskTokenIds`) → name of the learnable vector written at its rows
TASK_TOKEN_ROWS = {"boxes": "box_token", "temp": "temporal_token", "tracking": "track_token"}


HEADS = ("region", "temporal", "mask")


@struct.dataclass
class RegionOutput:
    """The region head at the first K `<boxes>` tokens of each sample."""
    boxes: jax.Array  # (B, K, 4) predicted normalised xyxy boxes (f32 where the model computes in f32)
    present: jax.Array  # (B, K) bool: the sample has a k-th `<boxes>` token
    positions: jax.Array  # (B, K) int32 token positions (0 where absent)


@struct.dataclass
class TemporalOutput:
    """CG-DETR at the first `<temp>` token: `outputs` as `CGDETR.__call__` returns them (pred_spans,
    pred_logits, saliency_scores, aux outputs, ... — everything its losses and post-processing read; with
    `training_outputs` also the negative pass and the moment / sentence tokens of the training criterion)."""
    outputs: dict
    present: jax.Array  # (B,) bool: the sample has a `<temp>` token
    position: jax.Array  # (B,) int32


@struct.dataclass
class MaskOutput:
    """The mask head at the first `<tracking>` token."""
    prompt: jax.Array  # (B, 3, D_sam) predicted SAM2 sparse prompt
    box: jax.Array  # (B, 4) box decoded from the task-token state
    target: jax.Array | None  # (B, 3, D_sam) SAM2 box prompt of the given ground-truth boxes (the loss target)
    present: jax.Array  # (B,) bool: the sample has a `<tracking>` token
    position: jax.Array  # (B,) int32


@struct.dataclass
class HeadOutputs:
    region: RegionOutput | None = None
    temporal: TemporalOutput | None = None
    mask: MaskOutput | None = None


@struct.dataclass
class TPOOutput:
    logits: jax.Array | None  # (B, L, vocab); None with logits=False
    hidden: jax.Array  # (B, L, D) final-norm hidden states
    cache: KVCache | None = None
    vision_features: jax.Array | None = None  # (B, T·N, vit width), when asked for
    heads: HeadOutputs | None = None  # the heads asked for with `heads=`


def scatter_rows(embeds: jax.Array, row_mask: jax.Array, values: jax.Array) -> jax.Array:
    """Write values[b, k] into the k-th row of sample b where `row_mask` is True.

    embeds: (B, L, D); row_mask: (B, L) bool; values: (B, N, D). Rows beyond the N-th marked row
    keep their embedding. Implemented as a gather by rank (cumsum), so shapes stay static.
    """
    rank = jnp.cumsum(row_mask.astype(jnp.int32), axis=1) - 1
    take = row_mask & (rank < values.shape[1])
    gathered = jnp.take_along_axis(values, jnp.clip(rank, 0, values.shape[1] - 1)[..., None], axis=1)
    return jnp.where(take[..., None], gathered.astype(embeds.dtype), embeds)


def gather_task_hidden(hidden: jax.Array, input_ids: jax.Array, token_id: int, num_slots: int):
    """Hidden states at the first `num_slots` occurrences of `token_id` in each sample.

    Returns (states (B, num_slots, D), positions (B, num_slots) int32, valid (B, num_slots) bool);
    unused slots have valid False, position 0 and a zero state.
    """
    def one(ids):
        (pos,) = jnp.nonzero(ids == token_id, size=num_slots, fill_value=0)
        return pos.astype(jnp.int32), jnp.arange(num_slots) < jnp.sum(ids == token_id)

    positions, valid = jax.vmap(one)(input_ids)
    states = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    return jnp.where(valid[..., None], states, 0).astype(hidden.dtype), positions, valid


class TPOModel(nnx.Module):
    def __init__(self, cfg: TPOConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.llm.hidden_size
        if cfg.llava_ov is None:
            self.vision = UMTViT(cfg.vit, **kw)
            self.qformer = QFormer(cfg.qformer, d, **kw)
        else:  # LLaVA-OV: `vision` = tower + projector + image_newline, the paths of the base model's checkpoint
            v = cfg.llava_ov
            self.vision = LlavaOVVision(LlavaOVVisionConfig(siglip=v.siglip, anyres=v.anyres, llm_hidden=d), **kw)
        self.llm = MistralDecoder(cfg.llm, cfg.lora if cfg.lora.enabled else None, **kw)
        token_init = jax.nn.initializers.normal(stddev=1.0)
        self.box_token = param(rngs, token_init, (d,), ("embed",), param_dtype)
        self.temporal_token = param(rngs, token_init, (d,), ("embed",), param_dtype)
        self.track_token = param(rngs, token_init, (d,), ("embed",), param_dtype)
        self.loc_encoder = MLP((4, cfg.loc_hidden, d), axes=[(None, "mlp"), ("mlp", "embed")], **kw)
        # task heads (MODEL-SPEC §5-§7); `sam2` is the frozen SAM2: its prompt encoder gives the mask head's
        # regression target, its propagation turns the predicted prompt into per-frame masks (tpo_jax.sam2.video)
        self.region_head = RegionHead(d, cfg.heads.region, **kw)
        self.temporal_head = CGDETR(cfg.heads.temporal, d, **kw)
        self.mask_head = MaskHead(d, cfg.heads.mask, **kw)
        self.sam2 = Sam2Video(cfg.sam2, rngs=rngs, prompt_cfg=cfg.heads.mask)

    def encode_visual(self, frames: jax.Array, *, qformer_text_ids=None, qformer_text_mask=None,
                      rng: jax.Array | None = None, return_features: bool = False):
        """frames (B, T, H, W, 3) normalised → visual tokens (B, num_visual_tokens, llm hidden)
        (and the encoder features (B, T·N, width) with `return_features`). LLaVA-OV: SigLIP on every frame, the
        projector, 2×2 pooling and the closing newline row (`LlavaOVVision.encode_video`); the Q-Former inputs
        are ignored."""
        if self.cfg.llava_ov is not None:
            tokens, _, feats = self.vision.encode_video(siglip_from_imagenet(frames), return_features=True)
            return (tokens, feats) if return_features else tokens
        r_vit, r_q = split_rng(rng, 2)
        feats = self.vision(frames, rng=r_vit)
        tokens = self.qformer(feats, text_ids=qformer_text_ids, text_mask=qformer_text_mask, rng=r_q)
        return (tokens, feats) if return_features else tokens

    def embed_inputs(self, input_ids: jax.Array, *, visual_mask: jax.Array | None = None,
                     frames: jax.Array | None = None, track_boxes: jax.Array | None = None,
                     qformer_text_ids=None, qformer_text_mask=None, rng: jax.Array | None = None,
                     return_vision_features: bool = False):
        """The LLM input embeddings with visual rows, task-token rows and `<track_box>` rows filled in
        (and the ViT features, or None, with `return_vision_features`).

        visual_mask (B, L) marks the placeholder rows (the tokenizer's visual index); track_boxes
        (B, K, 4) are the normalised xyxy boxes for the k-th `<track_box>` of each sample.
        """
        embeds = self.llm.embed(input_ids)
        feats = None
        if frames is not None:
            if visual_mask is None:
                raise ValueError("TPOModel: frames were given without visual_mask (the placeholder rows)")
            visual, feats = self.encode_visual(frames, qformer_text_ids=qformer_text_ids,
                                               qformer_text_mask=qformer_text_mask, rng=rng, return_features=True)
            embeds = scatter_rows(embeds, visual_mask, visual)
        ids = self.cfg.task_tokens
        for field, name in TASK_TOKEN_ROWS.items():
            vec = getattr(self, name)[...].astype(embeds.dtype)
            embeds = jnp.where((input_ids == getattr(ids, field))[..., None], vec, embeds)
        if track_boxes is not None:
            encoded = self.loc_encoder(track_boxes.astype(embeds.dtype))
            embeds = scatter_rows(embeds, input_ids == ids.track_box, encoded)
        return (embeds, feats) if return_vision_features else embeds

    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 visual_mask: jax.Array | None = None, frames: jax.Array | None = None,
                 track_boxes: jax.Array | None = None, positions: jax.Array | None = None,
                 cache: KVCache | None = None, qformer_text_ids=None, qformer_text_mask=None,
                 return_vision_features: bool = False, rng: jax.Array | None = None,
                 logits: bool = True, heads: Sequence[str] = (), head_inputs: Mapping[str, jax.Array] | None = None,
                 head_rng: jax.Array | None = None, training_outputs: bool = False) -> TPOOutput:
        """The whole model: LLM logits / hidden states and, for each head in `heads`, its outputs at the
        task-token slots (`HeadOutputs`). `head_inputs` holds what the heads read besides the hidden states
        (`run_heads`); `rng` drives the encoder and LLM dropout, `head_rng` the heads' (None: deterministic);
        `training_outputs` adds what only the training losses read (`run_heads`)."""
        r_embed, r_llm = split_rng(rng, 2)
        need_vision = return_vision_features or ("temporal" in heads and self.cfg.heads.temporal.feature_source == "model")
        embeds, feats = self.embed_inputs(
            input_ids, visual_mask=visual_mask, frames=frames, track_boxes=track_boxes,
            qformer_text_ids=qformer_text_ids, qformer_text_mask=qformer_text_mask, rng=r_embed,
            return_vision_features=True)
        out = self.llm(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask, cache=cache,
                       rng=r_llm, logits=logits)
        head_out = None
        if heads:
            head_out = self.run_heads(out.hidden, input_ids, heads, head_inputs or {}, feats, rng=head_rng,
                                      training_outputs=training_outputs)
        return TPOOutput(logits=out.logits, hidden=out.hidden, cache=out.cache,
                         vision_features=feats if need_vision else None, heads=head_out)

    # --- the task heads: the one place that dispatches them ------------------------------------------------------

    def run_heads(self, hidden: jax.Array, input_ids: jax.Array, heads: Sequence[str],
                  inputs: Mapping[str, jax.Array], vision_features: jax.Array | None = None,
                  rng: jax.Array | None = None, training_outputs: bool = False) -> HeadOutputs:
        """Each head in `heads` applied to the final hidden states at its task-token slots.

        `inputs` (a batch in the `tpo_jax.data.pipeline` format, or just these keys):
          region:   `region_boxes` (B, K, 4) — only its K (slots per sample) is read; default
                    `cfg.heads.region.max_slots`;
          mask:     `mask_boxes` (B, 4) optional — their SAM2 box prompt becomes `MaskOutput.target`;
          temporal: `temporal_features` (feature_source "batch": `text_feats`, `text_mask`, `video_feats`,
                    `vid_mask`; "model": `temporal_text_ids`, `text_mask`, `vid_mask` with `vision_features`);
                    with `training_outputs`: `saliency_labels` (B, Lv) → the moment / sentence tokens, and
                    `vid` (B,) with `temporal_valid`, `span_valid` → the negative pass, each row's video
                    against its partner's query (`tpo_jax.heads.temporal.batch.negative_pairs`).
        """
        unknown = set(heads) - set(HEADS)
        if unknown:
            raise ValueError(f"TPOModel.run_heads: unknown head(s) {sorted(unknown)}; known: {list(HEADS)}")
        cfg, out = self.cfg, {}
        if "region" in heads:
            k = inputs["region_boxes"].shape[1] if "region_boxes" in inputs else cfg.heads.region.max_slots
            h, pos, present = gather_task_hidden(hidden, input_ids, cfg.task_tokens.boxes, k)
            out["region"] = RegionOutput(boxes=self.region_head(h), present=present, positions=pos)
        if "mask" in heads:
            h, pos, present = gather_task_hidden(hidden, input_ids, cfg.task_tokens.tracking, 1)
            prompt, box = self.mask_head(h[:, 0])
            target = self.sam2.box_prompt(inputs["mask_boxes"]) if "mask_boxes" in inputs else None
            out["mask"] = MaskOutput(prompt=prompt, box=box, target=target, present=present[:, 0], position=pos[:, 0])
        if "temporal" in heads:
            h, pos, present = gather_task_hidden(hidden, input_ids, cfg.task_tokens.temp, 1)
            txt, txt_mask, vid, vid_mask = self.temporal_features(inputs, vision_features)
            extra = {}
            if training_outputs and "saliency_labels" in inputs:
                extra["relevant_clips"] = inputs["saliency_labels"]
            if training_outputs and "vid" in inputs:
                rows = temporal_rows(input_ids, inputs["temporal_valid"], inputs["span_valid"], cfg.task_tokens.temp)
                pairs = negative_pairs(rows, inputs["vid"], cfg.heads.temporal.criterion_group)
                extra["neg_partner"] = pairs["partner"]
            outputs = self.temporal_head(txt, txt_mask, vid, vid_mask, h[:, 0], rng=rng, **extra)
            out["temporal"] = TemporalOutput(outputs=outputs, present=present[:, 0], position=pos[:, 0])
        return HeadOutputs(**out)

    def temporal_features(self, inputs: Mapping[str, jax.Array], vision_features: jax.Array | None):
        """CG-DETR inputs (text, text mask, video, video mask): from `inputs` (feature_source "batch"), or from
        the model ("model": per-clip means of the encoder features (UMT ViT, or SigLIP per frame) + TEF, and the LLM's input embeddings of
        `temporal_text_ids`). Model features are inputs to the head, not trained through it (stop_gradient), as
        precomputed features would be."""
        cfg = self.cfg.heads.temporal
        if cfg.feature_source == "batch":
            return inputs["text_feats"], inputs["text_mask"], inputs["video_feats"], inputs["vid_mask"]
        if vision_features is None:
            raise ValueError("TPOModel.temporal_features: feature_source 'model' needs the vision features (frames)")
        b, n, w = vision_features.shape
        t = self.cfg.num_clips
        clips = vision_features.reshape(b, t, n // t, w).mean(axis=2)
        tef = jnp.stack([jnp.arange(t) / t, (jnp.arange(t) + 1) / t], axis=-1).astype(clips.dtype)
        video = jnp.concatenate([clips, jnp.broadcast_to(tef, (b, t, 2))], axis=-1)
        text = self.llm.embed(inputs["temporal_text_ids"])
        return (jax.lax.stop_gradient(text), inputs["text_mask"], jax.lax.stop_gradient(video), inputs["vid_mask"])


def stack_layouts(cfg: TPOConfig) -> list[StackLayout]:
    """How the scanned stacks' parameter paths map to per-layer paths (empty where a stack is unrolled)."""
    if cfg.llava_ov is not None:
        return llm_stack_layouts(cfg.llm, "llm") + siglip_stack_layouts(cfg.llava_ov.siglip, "vision.vision_tower")
    return llm_stack_layouts(cfg.llm, "llm") + vit_stack_layouts(cfg.vit, "vision") + \
        qformer_stack_layouts(cfg.qformer, "qformer")


def abstract_model(cfg: TPOConfig, seed: int = 0) -> TPOModel:
    """The TPOModel of `cfg` with ShapeDtypeStructs for parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: TPOModel(cfg, rngs=nnx.Rngs(seed)))

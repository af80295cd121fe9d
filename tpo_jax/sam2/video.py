"""The whole SAM2 and its video propagation: one prompted frame, then every later frame conditioned on a
fixed-size memory bank, as one `lax.scan` (upstream `SAM2VideoPredictor.add_new_points_or_box` +
`propagate_in_video` for one object, prompted on frame 0; MODEL-SPEC §7.2-§7.3).

Frame 0 (the conditioning frame): features + `no_mem_embed`; the prompt is a sparse embedding (B, 3, C) —
TPO's `track_embed` output, which replaces the prompt encoder's sparse rows (§7.2), or a user box through the
prompt encoder (`box_prompt`); the dense prompt is `no_mask_embed`. Two prompt points ⇒ one mask, with the
dynamic-stability fallback. Its memory is encoded from the binarised mask (`binarize_mask_from_pts_for_mem_enc`).

Frame t ≥ 1: memory attention over the bank, then the SAM heads with no prompt (two not-a-point rows); with
`multimask_output_for_tracking` the mask of highest predicted IoU and its token are taken. Its memory is encoded
from sigmoid(logits).

Every frame: masks of frames without the object (object score ≤ 0) are set to −1024 (NO_OBJ_SCORE) before
anything reads them; the object pointer is `obj_ptr_proj(token)` gated by the object score; the memory
features are stored in `cfg.memory_storage_dtype` (bf16 as upstream's predictor).

The bank (`TrackState`) has static size: slot 0 holds the conditioning frame, slots 1…N−1 (N = num_maskmem)
a ring of the last N−1 frames; pointer slot 0 holds frame 0's pointer, slots 1…P−1 a ring of the last P−1
frames' pointers (P = max_obj_ptrs). Each slot remembers its frame index, so frame t attends exactly to what
upstream gathers: the conditioning frame (t_pos 0), frames t−N+1 … t−1 (t_pos = N − (t − f)), and pointers of
frame 0 and frames t−P+1 … t−1. One compiled program serves every clip of its length bucket: pad the clip
to the bucket and drop the padded frames' outputs (later frames never influence earlier ones).

Masks come back as low-resolution logits (B, T, 4E, 4E) (E = image embedding size; 256×256 at 1024 px),
float32; `upscale_masks` resizes them to the video, `fill_holes` is upstream's small-hole post-processing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax.config import MaskHeadConfig
from tpo_jax.sam2.config import Sam2Config
from tpo_jax.sam2.image import ImageFeatures, Sam2Image
from tpo_jax.sam2.mask_decoder import select_masks
from tpo_jax.sam2.memory_attention import MemoryAttention
from tpo_jax.sam2.memory_encoder import MemoryEncoder, encode_new_memory
from tpo_jax.sam2.pointers import MemoryTokens
from tpo_jax.sam2.position import sine_position_encoding

NO_OBJ_SCORE = -1024.0


class FrameOutput(NamedTuple):
    masks: jax.Array  # (B, 4E, 4E) low-resolution mask logits, float32 (−1024 where no object)
    iou: jax.Array  # (B,) predicted IoU of the chosen mask
    object_score_logits: jax.Array  # (B,)


class TrackState(NamedTuple):
    """The fixed-size memory bank carried from frame to frame."""
    mem_feats: jax.Array  # (B, N, H, W, M) memory features, storage dtype
    mem_frame: jax.Array  # (N,) int32 frame index held by each slot, −1 when empty
    ptrs: jax.Array  # (B, P, C) object pointers
    ptr_frame: jax.Array  # (P,) int32 frame index of each pointer, −1 when empty


class HeadsOut(NamedTuple):
    low_res: jax.Array  # (B, 1, 4E, 4E) float32, NO_OBJ_SCORE where no object
    iou: jax.Array  # (B,)
    score: jax.Array  # (B, 1) object score logits
    ptr: jax.Array  # (B, C) object pointer


class Sam2Video(Sam2Image):
    """The image path (`Sam2Image`) plus `memory_encoder`, `memory_attention` and `memory_tokens` (upstream's
    SAM2Base-owned parameters): every tensor of the released SAM2, under upstream's names."""

    def __init__(self, cfg: Sam2Config, *, rngs: nnx.Rngs | None, prompt_cfg: MaskHeadConfig | None = None):
        super().__init__(cfg, rngs=rngs, prompt_cfg=prompt_cfg)
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.memory_encoder = MemoryEncoder(cfg.memory.encoder, **kw)
        self.memory_attention = MemoryAttention(cfg.memory.attention, **kw)
        self.memory_tokens = MemoryTokens(cfg.memory.tokens, **kw)

    # ------------------------------------------------------------------------------------------ prompts

    def box_prompt(self, boxes: jax.Array) -> jax.Array:
        """Normalised xyxy boxes (B, 4) → sparse prompt (B, 3, C): a user box, as `add_new_points_or_box`."""
        return self.sam_prompt_encoder.box_prompt(boxes)

    def _no_prompt(self, batch: int) -> jax.Array:
        """Sparse embedding of a frame without points: one padding point plus the appended pad (2 rows)."""
        pts = jnp.zeros((batch, 1, 2), jnp.float32)
        return self.sam_prompt_encoder.embed_points(pts, -jnp.ones((batch, 1), jnp.int32), pad=True)

    # ------------------------------------------------------------------------------------------ pieces

    def _heads(self, pix_feat: jax.Array, high_res, sparse: jax.Array, multimask: bool) -> HeadsOut:
        """`_forward_sam_heads` without mask inputs."""
        pe = self.sam_prompt_encoder
        dense = pe.dense_embedding(pix_feat.shape[0])
        out = self.sam_mask_decoder(pix_feat, pe.dense_pe(), sparse.astype(self.dtype), dense.astype(self.dtype),
                                    high_res)
        masks, iou, tokens = select_masks(out, self.cfg.mask_decoder, multimask)
        score = out.object_score_logits.astype(jnp.float32)
        masks = masks.astype(jnp.float32)
        if self.cfg.mask_decoder.pred_obj_scores:
            masks = jnp.where((score > 0)[:, :, None, None], masks, NO_OBJ_SCORE)
        best = jnp.argmax(iou, axis=-1)
        mask = jnp.take_along_axis(masks, best[:, None, None, None], axis=1)
        iou = jnp.take_along_axis(iou, best[:, None], axis=1)[:, 0]
        token = jnp.take_along_axis(tokens, jnp.minimum(best, tokens.shape[1] - 1)[:, None, None], axis=1)[:, 0]
        ptr = self.memory_tokens.object_pointer(token, score)
        return HeadsOut(mask, iou, score, ptr)

    def _memory(self, pix_feat: jax.Array, low_res: jax.Array, binarize: bool) -> jax.Array:
        """Memory features of a frame from its (gated) low-res mask: upsampled bilinearly to the model input,
        as `_forward_sam_heads` does, then `_encode_new_memory`; stored in the storage dtype."""
        b, _, h, w = low_res.shape
        s = self.cfg.image_size
        high = jax.image.resize(low_res[:, 0, :, :, None], (b, s, s, 1), "bilinear")
        feats, _ = encode_new_memory(self.memory_encoder, pix_feat, high.astype(pix_feat.dtype), binarize)
        return feats.astype(jnp.dtype(self.cfg.memory_storage_dtype))

    def _multimask_tracking(self) -> bool:
        c = self.cfg
        return c.multimask_output_in_sam and c.multimask_output_for_tracking and \
            c.multimask_min_pt_num <= 0 <= c.multimask_max_pt_num

    def _multimask_prompted(self, num_points: int) -> bool:
        c = self.cfg
        return c.multimask_output_in_sam and c.multimask_min_pt_num <= num_points <= c.multimask_max_pt_num

    # ------------------------------------------------------------------------------------------ frames

    def init_frame(self, frame: jax.Array, sparse_prompt: jax.Array) -> tuple[TrackState, FrameOutput]:
        """Frame 0: frame (B, S, S, 3) normalised, sparse_prompt (B, n, C) → the bank holding it + its output."""
        feats = self.encode_image(frame)
        pix = self.memory_tokens.no_memory(feats.image_embed) if self.cfg.directly_add_no_mem_embed \
            else feats.image_embed
        num_points = sparse_prompt.shape[1] - 1  # the prompt encoder's padding row is not a point
        heads = self._heads(pix, feats.high_res, sparse_prompt, self._multimask_prompted(num_points))
        mem = self._memory(feats.image_embed, heads.low_res, binarize=True)
        b, h, w, m = mem.shape
        t = self.cfg.memory.tokens
        mem_feats = jnp.zeros((b, t.num_maskmem, h, w, m), mem.dtype).at[:, 0].set(mem)
        ptrs = jnp.zeros((b, t.max_obj_ptrs, heads.ptr.shape[-1]), heads.ptr.dtype).at[:, 0].set(heads.ptr)
        empty = lambda n: jnp.full((n,), -1, jnp.int32).at[0].set(0)  # noqa: E731
        state = TrackState(mem_feats, empty(t.num_maskmem), ptrs, empty(t.max_obj_ptrs))
        return state, FrameOutput(heads.low_res[:, 0], heads.iou, heads.score[:, 0])

    def track_frame(self, state: TrackState, frame: jax.Array, t: jax.Array) -> tuple[TrackState, FrameOutput]:
        """Frame t ≥ 1 (t a traced int32 scalar) conditioned on the bank → updated bank + its output."""
        feats = self.encode_image(frame)
        pix = self._condition(feats, state, t)
        heads = self._heads(pix, feats.high_res, self._no_prompt(frame.shape[0]), self._multimask_tracking())
        mem = self._memory(feats.image_embed, heads.low_res, binarize=False)
        n_mem, n_ptr = state.mem_frame.shape[0], state.ptr_frame.shape[0]
        slot = 1 + (t - 1) % (n_mem - 1)
        state = TrackState(state.mem_feats.at[:, slot].set(mem), state.mem_frame.at[slot].set(t),
                           state.ptrs, state.ptr_frame)
        if n_ptr > 1:
            p_slot = 1 + (t - 1) % (n_ptr - 1)
            state = state._replace(ptrs=state.ptrs.at[:, p_slot].set(heads.ptr.astype(state.ptrs.dtype)),
                                   ptr_frame=state.ptr_frame.at[p_slot].set(t))
        return state, FrameOutput(heads.low_res[:, 0], heads.iou, heads.score[:, 0])

    def _condition(self, feats: ImageFeatures, state: TrackState, t: jax.Array) -> jax.Array:
        """`_prepare_memory_conditioned_features` for a non-conditioning frame, over the static bank."""
        tok = self.memory_tokens.cfg
        b, n_mem, h, w, m = state.mem_feats.shape
        t_rel = t - state.mem_frame
        is_cond = jnp.arange(n_mem) == 0
        mem_valid = (state.mem_frame >= 0) & (is_cond | ((t_rel >= 1) & (t_rel <= n_mem - 1)))
        t_pos = jnp.where(is_cond, 0, jnp.clip(tok.num_maskmem - t_rel, 0, tok.num_maskmem - 1))
        ptr_valid = (state.ptr_frame >= 0) & (state.ptr_frame <= t) & \
            ((jnp.arange(state.ptr_frame.shape[0]) == 0) | (t - state.ptr_frame <= tok.max_obj_ptrs - 1))
        pos = sine_position_encoding(h, w, m, temperature=self.memory_encoder.cfg.pos_temperature,
                                     dtype=jnp.float32)
        mem_pos = jnp.broadcast_to(pos[None, None], (b, n_mem, h, w, m))
        bcast = lambda v: jnp.broadcast_to(v[None], (b,) + v.shape)  # noqa: E731
        memory, memory_pos, valid, n_ptr_tokens = self.memory_tokens.memory_bank(
            state.mem_feats.astype(jnp.float32), mem_pos, bcast(t_pos), bcast(mem_valid),
            state.ptrs.astype(jnp.float32), bcast(ptr_valid))
        dt = feats.image_embed.dtype
        return self.memory_attention(feats.image_embed, feats.vision_pos[-1].astype(dt), memory.astype(dt),
                                     memory_pos.astype(dt), memory_valid=valid, num_k_exclude_rope=n_ptr_tokens)

    # ------------------------------------------------------------------------------------------ video

    def propagate(self, frames: jax.Array, sparse_prompt: jax.Array) -> FrameOutput:
        """frames (B, T, S, S, 3) normalised (`normalize_images`), sparse_prompt (B, 3, C) for frame 0 →
        per-frame outputs stacked on axis 1: masks (B, T, 4E, 4E), iou (B, T), object_score_logits (B, T)."""
        b, n = frames.shape[:2]
        s = self.cfg.image_size
        if frames.shape[2:] != (s, s, 3):
            raise ValueError(f"Sam2Video.propagate: frames of shape {frames.shape}, expected (B, T, {s}, {s}, 3)")
        if sparse_prompt.shape[0] != b or sparse_prompt.shape[2] != self.cfg.hidden_dim:
            raise ValueError(f"Sam2Video.propagate: prompt of shape {sparse_prompt.shape} for {b} videos, "
                             f"expected ({b}, n, {self.cfg.hidden_dim})")
        state, first = self.init_frame(frames[:, 0], sparse_prompt)
        if n == 1:
            return jax.tree.map(lambda x: x[:, None], first)

        def step(carry, xs):
            frame, t = xs
            return self.track_frame(carry, frame, t)

        _, rest = jax.lax.scan(step, state, (jnp.swapaxes(frames[:, 1:], 0, 1), jnp.arange(1, n, dtype=jnp.int32)))
        return jax.tree.map(lambda a, r: jnp.concatenate([a[:, None], jnp.swapaxes(r, 0, 1)], axis=1), first, rest)


# ---------------------------------------------------------------------------------------------- host side

def upscale_masks(low_res: np.ndarray | jax.Array, height: int, width: int) -> jax.Array:
    """Low-res logits (..., h, w) → (..., height, width) bilinear (align_corners=False, no antialias), as the
    predictor resizes its outputs to the video; a pixel is foreground where the result is > 0."""
    x = jnp.asarray(low_res, jnp.float32)
    return jax.image.resize(x, x.shape[:-2] + (height, width), "bilinear", antialias=False)


def fill_holes(low_res: np.ndarray, max_area: int) -> np.ndarray:
    """Upstream `fill_holes_in_mask_scores`: background (logits ≤ 0) components of at most `max_area` pixels
    (8-connected) get the score 0.1. low_res (..., h, w) NumPy; returns a new array."""
    from scipy import ndimage

    out = np.array(low_res, dtype=np.float32, copy=True)
    if max_area <= 0:
        return out
    flat = out.reshape(-1, *out.shape[-2:])
    for m in flat:
        labels, n = ndimage.label(m <= 0, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        hole = (labels > 0) & (areas[labels] <= max_area)
        m[hole] = 0.1
    return out

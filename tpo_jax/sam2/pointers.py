"""The memory-side parameters SAM2Base owns itself, and the static-shape memory bank built from them.

Parameters (`MemoryTokens`; upstream name -> ours):

    obj_ptr_proj.layers.{0,1,2}   -> obj_ptr_proj.layers.{0,1,2}  MLP 256→256→256→256, ReLU between
    no_obj_ptr (1, C)             -> no_obj_ptr (C,)               pointer of a frame without the object
    maskmem_tpos_enc (7, 1, 1, M) -> maskmem_tpos_enc (7, M)       temporal encoding of memory frames
    no_mem_embed (1, 1, C)        -> no_mem_embed (C,)             added to the features of an initial
    no_mem_pos_enc (1, 1, C)      -> no_mem_pos_enc (C,)           conditioning frame (directly_add_no_mem_embed)
    mask_downsample (1, 1, 4, 4)  -> mask_downsample (4, 4, 1, 1)  Conv2d k4 s4: a mask input -> SAM mask prompt

Object pointer (`_forward_sam_heads`): p = obj_ptr_proj(sam_output_token); with λ = [object score > 0] (or
sigmoid(score) with soft_no_obj_ptr), fixed_no_obj_ptr: p = λ·p; then p += (1 − λ)·no_obj_ptr.

Memory bank (`_prepare_memory_conditioned_features`, at fixed size): F frame slots of H·W spatial tokens
(memory features; position = spatial sine encoding + maskmem_tpos_enc[num_maskmem − t_pos − 1], t_pos 0 for
the conditioning frame and 1 … num_maskmem−1 for previous frames, the latest having the largest t_pos) and P
pointer slots, each pointer split into C/M tokens of M channels with position 0 (v1: no temporal encoding
on pointers). Validity masks mark the slots to attend to; the order of valid slots does not change the result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax.layers import MLP, param
from tpo_jax.sam2.memory_config import MemoryTokensConfig
from tpo_jax.sam2.layers import Conv2d


class MemoryTokens(nnx.Module):
    def __init__(self, cfg: MemoryTokensConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None):
        cfg.validate()
        self.cfg, self.dtype = cfg, dtype
        c, m = cfg.hidden_dim, cfg.mem_dim
        init = nnx.initializers.truncated_normal(stddev=0.02)
        self.obj_ptr_proj = MLP([c] * (cfg.obj_ptr_mlp_layers + 1), axes=[("embed", "mlp")] * cfg.obj_ptr_mlp_layers,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.no_obj_ptr = param(rngs, init, (c,), ("embed",), param_dtype)
        self.maskmem_tpos_enc = param(rngs, init, (cfg.num_maskmem, m), (None, "mem_embed"), param_dtype)
        self.no_mem_embed = param(rngs, init, (c,), ("embed",), param_dtype)
        self.no_mem_pos_enc = param(rngs, init, (c,), ("embed",), param_dtype)
        k = cfg.mask_downsample_stride
        self.mask_downsample = Conv2d(1, 1, k, stride=k, in_axis=None, out_axis=None, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)

    def object_pointer(self, sam_output_token: jax.Array, object_score_logits: jax.Array) -> jax.Array:
        """(B, C) SAM output token + (B, 1) object score logits -> (B, C) object pointer."""
        ptr = self.obj_ptr_proj(sam_output_token)
        score = object_score_logits.astype(jnp.float32)
        lam = jax.nn.sigmoid(score) if self.cfg.soft_no_obj_ptr else (score > 0).astype(jnp.float32)
        lam = lam.astype(ptr.dtype)
        if self.cfg.fixed_no_obj_ptr:
            ptr = lam * ptr
        return ptr + (1 - lam) * self.no_obj_ptr[...].astype(ptr.dtype)

    def no_memory(self, pix_feat: jax.Array) -> jax.Array:
        """An initial conditioning frame: features + no_mem_embed (directly_add_no_mem_embed)."""
        return pix_feat + self.no_mem_embed[...].astype(pix_feat.dtype)

    def downsample_mask_input(self, mask: jax.Array) -> jax.Array:
        """(B, H, W, 1) float mask input -> (B, H/4, W/4, 1) mask prompt (`_use_mask_as_output`)."""
        return self.mask_downsample(mask)

    def temporal_encoding(self, t_pos: jax.Array) -> jax.Array:
        """(…,) int t_pos in [0, num_maskmem) -> (…, M): maskmem_tpos_enc[num_maskmem − t_pos − 1]."""
        return jnp.take(self.maskmem_tpos_enc[...], self.cfg.num_maskmem - 1 - t_pos, axis=0)

    def memory_bank(self, mem_feats: jax.Array, mem_pos: jax.Array, t_pos: jax.Array, frame_valid: jax.Array,
                    obj_ptrs: jax.Array, ptr_valid: jax.Array):
        """Assemble the fixed-size bank.

        mem_feats, mem_pos (B, F, H, W, M); t_pos (B, F) int; frame_valid (B, F) bool; obj_ptrs (B, P, C);
        ptr_valid (B, P) bool. Returns (memory (B, S, M), memory_pos (B, S, M), valid (B, S),
        num_k_exclude_rope = P·C/M) with S = F·H·W + P·C/M, for `MemoryAttention`."""
        b, f, h, w, m = mem_feats.shape
        p = obj_ptrs.shape[1]
        n_tok = self.cfg.tokens_per_ptr
        pos = mem_pos + self.temporal_encoding(t_pos)[:, :, None, None, :].astype(mem_pos.dtype)
        spatial = mem_feats.reshape(b, f * h * w, m)
        spatial_pos = pos.reshape(b, f * h * w, m)
        spatial_valid = jnp.repeat(frame_valid.astype(bool), h * w, axis=1)
        ptr_tokens = obj_ptrs.reshape(b, p * n_tok, m).astype(spatial.dtype)
        ptr_pos = jnp.zeros_like(ptr_tokens)
        ptr_tok_valid = jnp.repeat(ptr_valid.astype(bool), n_tok, axis=1)
        memory = jnp.concatenate([spatial, ptr_tokens], axis=1)
        memory_pos = jnp.concatenate([spatial_pos, ptr_pos.astype(spatial_pos.dtype)], axis=1)
        valid = jnp.concatenate([spatial_valid, ptr_tok_valid], axis=1)
        return memory, memory_pos, valid, p * n_tok

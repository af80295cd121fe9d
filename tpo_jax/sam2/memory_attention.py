"""SAM2 memory attention (upstream `MemoryAttention`, `MemoryAttentionLayer`, `RoPEAttention`).

Conditions the current frame's stride-16 features on the memory bank:

    x = curr + 0.1·curr_pos                                  (pos_enc_at_input)
    per layer (pre-norm):
        x += SelfAttn(q = k = v = norm1(x))                  RoPE on q and k (same grid)
        x += CrossAttn(q = norm2(x), k = mem + mem_pos, v = mem)
                                                             RoPE on q and on the spatial memory keys (the
                                                             grid's table repeated per memory frame,
                                                             `rope_k_repeat`); the trailing object-pointer
                                                             tokens (`num_k_exclude_rope`) get no RoPE
        x += Linear2(ReLU(Linear1(norm3(x))))
    out = norm(x)

Static shapes: the bank is a fixed number of slots with a validity mask `memory_valid` (B, S); a masked slot
is zeroed and gets zero attention weight, so the output equals the reference run on the bank without those slots (as long
as each example has at least one valid slot). The bank layout is [F frames × H·W spatial tokens][pointer
tokens]: all F·H·W spatial slots take RoPE (positions repeat per frame), the last `num_k_exclude_rope` do not.
Features are channel-last (B, H, W, C); tokens are in row-major order (upstream's `flatten(2)` of NCHW).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax.attention import AttentionMask, attention
from tpo_jax.layers import LayerNorm, Linear, dropout, split_rng
from tpo_jax.sam2.memory_config import MemoryAttentionConfig
from tpo_jax.sam2.rope import apply_rope, axial_rope_table


class RoPEAttention(nnx.Module):
    """Multi-head attention with q/k/v/out projections and 2-D axial RoPE on q and (some of) k."""

    def __init__(self, cfg: MemoryAttentionConfig, kv_dim: int, *, rope_k_repeat: bool, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None):
        d, inner = cfg.d_model, cfg.internal_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, inner, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(kv_dim, inner, axes=("mem_embed", "heads"), **kw)
        self.v_proj = Linear(kv_dim, inner, axes=("mem_embed", "heads"), **kw)
        self.out_proj = Linear(inner, d, axes=("heads", "embed"), **kw)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.theta, self.grid_dtype = cfg.rope_theta, cfg.rope_grid_dtype
        self.rope_k_repeat, self.dropout_rate, self.impl = rope_k_repeat, cfg.dropout, cfg.attention_impl

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, grid: tuple[int, int], *,
                 key_valid: jax.Array | None = None, num_k_exclude_rope: int = 0,
                 rng: jax.Array | None = None) -> jax.Array:
        b, nq, _ = q.shape
        nk = k.shape[1]
        heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))
        cos, sin = axial_rope_table(self.head_dim, grid[0], grid[1], self.theta, self.grid_dtype)
        if cos.shape[0] != nq:
            raise ValueError(f"RoPE attention: {nq} query tokens, but the grid {grid} has {cos.shape[0]}")
        num_rope = nk - num_k_exclude_rope
        if num_rope != nq and not self.rope_k_repeat:
            raise ValueError(f"RoPE attention: {num_rope} RoPE keys for {nq} queries needs rope_k_repeat")
        q = apply_rope(q, cos, sin)
        if num_rope > 0:
            k = jnp.concatenate([apply_rope(k[:, :num_rope], cos, sin), k[:, num_rope:]], axis=1)
        mask = None if key_valid is None else AttentionMask(key_valid=key_valid)
        out = attention(q, k, v, mask, implementation=self.impl, dropout_rate=self.dropout_rate, rng=rng)
        return self.out_proj(out.reshape(b, nq, self.num_heads * self.head_dim))


class MemoryAttentionLayer(nnx.Module):
    def __init__(self, cfg: MemoryAttentionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = RoPEAttention(cfg, cfg.d_model, rope_k_repeat=False, **kw)
        self.cross_attn_image = RoPEAttention(cfg, cfg.kv_dim, rope_k_repeat=True, **kw)
        self.linear1 = Linear(cfg.d_model, cfg.ffn_dim, axes=("embed", "mlp"), **kw)
        self.linear2 = Linear(cfg.ffn_dim, cfg.d_model, axes=("mlp", "embed"), **kw)
        self.norm1, self.norm2, self.norm3 = (LayerNorm(cfg.d_model, eps=1e-5, axis_name="embed", **kw)
                                              for _ in range(3))
        self.dropout_rate = cfg.dropout

    def __call__(self, x, memory, memory_pos, grid, *, memory_valid=None, num_k_exclude_rope=0, rng=None):
        r = split_rng(rng, 7)
        y = self.norm1(x)
        x = x + dropout(self.self_attn(y, y, y, grid, rng=r[0]), self.dropout_rate, r[1])
        y = self.norm2(x)
        y = self.cross_attn_image(y, memory + memory_pos, memory, grid, key_valid=memory_valid,
                                  num_k_exclude_rope=num_k_exclude_rope, rng=r[2])
        x = x + dropout(y, self.dropout_rate, r[3])
        y = jax.nn.relu(self.linear1(self.norm3(x)))
        y = self.linear2(dropout(y, self.dropout_rate, r[4]))
        return x + dropout(y, self.dropout_rate, r[5])


class MemoryAttention(nnx.Module):
    """`layers.{i}` (MemoryAttentionLayer) and the final `norm`."""

    def __init__(self, cfg: MemoryAttentionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None):
        cfg.validate()
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([MemoryAttentionLayer(cfg, **kw) for _ in range(cfg.num_layers)])
        self.norm = LayerNorm(cfg.d_model, eps=1e-5, axis_name="embed", **kw)

    def __call__(self, curr: jax.Array, curr_pos: jax.Array, memory: jax.Array, memory_pos: jax.Array, *,
                 memory_valid: jax.Array | None = None, num_k_exclude_rope: int = 0,
                 rng: jax.Array | None = None) -> jax.Array:
        """curr, curr_pos (B, H, W, C); memory, memory_pos (B, S, kv_dim); memory_valid (B, S) bool or None;
        `num_k_exclude_rope` (static): trailing bank slots that are object-pointer tokens. Returns (B, H, W, C)."""
        b, h, w, c = curr.shape
        n_spatial = memory.shape[1] - num_k_exclude_rope
        if n_spatial < 0 or n_spatial % (h * w):
            raise ValueError(f"memory attention: {memory.shape[1]} bank slots minus {num_k_exclude_rope} "
                             f"pointer tokens is not a whole number of {h}×{w} memory frames")
        if memory_valid is not None:  # invalid slots may hold anything (even NaN): zero them, then mask them
            keep = memory_valid.astype(bool)[..., None]
            memory = jnp.where(keep, memory, jnp.zeros((), memory.dtype))
            memory_pos = jnp.where(keep, memory_pos, jnp.zeros((), memory_pos.dtype))
        x = curr.reshape(b, h * w, c)
        if self.cfg.pos_enc_at_input:
            x = x + 0.1 * curr_pos.reshape(b, h * w, c).astype(x.dtype)
        for layer, r in zip(self.layers, split_rng(rng, len(self.layers))):
            x = layer(x, memory, memory_pos, (h, w), memory_valid=memory_valid,
                      num_k_exclude_rope=num_k_exclude_rope, rng=r)
        return self.norm(x).reshape(b, h, w, c)

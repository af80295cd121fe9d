"""Mistral-family decoder (MODEL-SPEC §3): GQA, rotate-half RoPE, RMSNorm, SwiGLU, untied lm_head,
optional sliding window, LoRA on the configured projections, and a functional KV cache.

Call conventions:
* `MistralDecoder(input_ids=...)` or `(inputs_embeds=...)` → `LLMOutput(logits, hidden, cache)`, where
  `hidden` is the output of the final RMSNorm (what every TPO head reads).
* Without a cache, positions default to 0..L-1 and `attention_mask` (B, L) marks valid keys.
* With a `KVCache` (from `KVCache.init`), the L new tokens are written at slots
  `cache.length … cache.length+L-1`; positions default to those slot indices and `attention_mask`,
  if given, is (B, max_len) over cache slots. The returned cache has `length` advanced by L.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from tpo_jax.config import LLMConfig, LoRAConfig
from tpo_jax.layers import Embed, Linear, RMSNorm, attention, split_rng
from tpo_jax.lora import LoRALinear
from tpo_jax.sharding import constrain

ACT = ("batch", "length", "act_embed")  # logical axes of the residual stream


@struct.dataclass
class KVCache:
    """Per-layer key/value buffers (B, max_len, kv_heads, head_dim) and the number of filled slots."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array  # int32 scalar

    @classmethod
    def init(cls, cfg: LLMConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   length=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]


@struct.dataclass
class LLMOutput:
    logits: jax.Array | None  # (B, L, vocab); None when called with logits=False
    hidden: jax.Array  # (B, L, hidden) after the final RMSNorm
    cache: KVCache | None = None


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention (Hugging Face layout). x: (B, L, H, D); positions: (B, L)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, L, D/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def attention_mask_for(q_slots: jax.Array, num_keys: int, key_mask: jax.Array | None,
                       sliding_window: int | None) -> jax.Array:
    """Boolean (B or 1, 1, L, S) mask: causal in slot order, optional sliding window and key padding."""
    k_slots = jnp.arange(num_keys)
    mask = k_slots[None, :] <= q_slots[:, None]
    if sliding_window is not None:
        mask &= k_slots[None, :] > q_slots[:, None] - sliding_window
    mask = mask[None, None]
    if key_mask is not None:
        mask = mask & key_mask.astype(bool)[:, None, None, :]
    return mask


class _Factory:
    """Builds a projection as LoRALinear when LoRA targets it, else a bias-free Linear."""

    def __init__(self, lora: LoRAConfig | None, dtype, param_dtype, rngs: nnx.Rngs):
        self.lora, self.dtype, self.param_dtype, self.rngs = lora, dtype, param_dtype, rngs

    def __call__(self, name: str, d_in: int, d_out: int, axes) -> Linear:
        kw = dict(axes=axes, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)
        if self.lora is not None and self.lora.enabled and name in self.lora.targets:
            return LoRALinear(d_in, d_out, rank=self.lora.rank, alpha=self.lora.alpha,
                              dropout_rate=self.lora.dropout, **kw)
        return Linear(d_in, d_out, **kw)


def _apply(proj: Linear, x: jax.Array, rng: jax.Array | None) -> jax.Array:
    return proj(x, rng) if isinstance(proj, LoRALinear) else proj(x)


class MistralAttention(nnx.Module):
    def __init__(self, cfg: LLMConfig, make: _Factory):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.resolved_head_dim
        self.q_proj = make("q_proj", d, cfg.num_heads * hd, ("embed", "q_heads"))
        self.k_proj = make("k_proj", d, cfg.num_kv_heads * hd, ("embed", "kv_heads"))
        self.v_proj = make("v_proj", d, cfg.num_kv_heads * hd, ("embed", "kv_heads"))
        self.o_proj = make("o_proj", cfg.num_heads * hd, d, ("q_heads", "embed"))

    def __call__(self, x, positions, mask, cache_kv=None, cache_len=None, rng=None):
        cfg, (b, l, _) = self.cfg, x.shape
        hd = cfg.resolved_head_dim
        rq, rk, rv, ro = split_rng(rng, 4)
        q = _apply(self.q_proj, x, rq).reshape(b, l, cfg.num_heads, hd)
        k = _apply(self.k_proj, x, rk).reshape(b, l, cfg.num_kv_heads, hd)
        v = _apply(self.v_proj, x, rv).reshape(b, l, cfg.num_kv_heads, hd)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        new_kv = None
        if cache_kv is not None:
            ck, cv = cache_kv
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_len, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_len, 0, 0))
            new_kv = (k, v)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        return _apply(self.o_proj, out.reshape(b, l, cfg.num_heads * hd), ro), new_kv


class MistralMLP(nnx.Module):
    def __init__(self, cfg: LLMConfig, make: _Factory):
        self.gate_proj = make("gate_proj", cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
        self.up_proj = make("up_proj", cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
        self.down_proj = make("down_proj", cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"))

    def __call__(self, x, rng=None):
        rg, ru, rd = split_rng(rng, 3)
        h = jax.nn.silu(_apply(self.gate_proj, x, rg)) * _apply(self.up_proj, x, ru)
        return _apply(self.down_proj, h, rd)


class MistralLayer(nnx.Module):
    def __init__(self, cfg: LLMConfig, make: _Factory, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = MistralAttention(cfg, make)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MistralMLP(cfg, make)

    def __call__(self, x, positions, mask, cache_kv=None, cache_len=None, rng=None):
        ra, rm = split_rng(rng, 2)
        h, new_kv = self.self_attn(self.input_layernorm(x), positions, mask, cache_kv, cache_len, ra)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), rm)
        return x, new_kv


class MistralDecoder(nnx.Module):
    """Token embeddings → N decoder layers → final RMSNorm → lm_head."""

    def __init__(self, cfg: LLMConfig, lora: LoRAConfig | None = None, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        make = _Factory(lora, dtype, param_dtype, rngs)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([MistralLayer(cfg, make, dtype, param_dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else make("lm_head", cfg.hidden_size, cfg.vocab_size,
                                                           ("embed", "vocab"))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        if self.lm_head is None:
            return jnp.dot(hidden, self.embed_tokens.embedding[...].astype(self.dtype).T)
        return _apply(self.lm_head, hidden, rng)

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 cache: KVCache | None = None, rng: jax.Array | None = None, logits: bool = True) -> LLMOutput:
        """`logits=False` skips the lm_head (callers that need logits at a few rows apply `self.logits`
        to those rows of `hidden`, e.g. the LM loss at the label positions)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MistralDecoder: pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        x = constrain(x, *ACT)
        b, l, _ = x.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache.length
        q_slots = start + jnp.arange(l)
        if positions is None:
            positions = jnp.broadcast_to(q_slots, (b, l))
        num_keys = l if cache is None else cache.max_len
        mask = attention_mask_for(q_slots, num_keys, attention_mask, self.cfg.sliding_window)

        rngs = split_rng(rng, len(self.layers) + 1)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            cache_kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = layer(x, positions, mask, cache_kv, start, rngs[i])
            x = constrain(x, *ACT)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        hidden = self.norm(x)
        new_cache = None if cache is None else KVCache(tuple(new_keys), tuple(new_values), start + l)
        return LLMOutput(logits=self.logits(hidden, rngs[-1]) if logits else None, hidden=hidden, cache=new_cache)


def mean_init_new_rows(table: jax.Array | np.ndarray, new_size: int, axis: int = 0):
    """Grow `table` along `axis` to `new_size`; each new row is the mean of all existing rows.

    Used when starting from a plain LLM: the added-token rows of `embed_tokens` (axis 0) and of the
    lm_head kernel (in, vocab) (axis 1) start at the mean of that same matrix (MODEL-SPEC §3.3).
    """
    old = table.shape[axis]
    if new_size < old:
        raise ValueError(f"cannot grow a table of {old} rows to {new_size} rows")
    xp = np if isinstance(table, np.ndarray) else jnp
    mean = xp.mean(table.astype(np.float32), axis=axis, keepdims=True).astype(table.dtype)
    reps = [1] * table.ndim
    reps[axis] = new_size - old
    return xp.concatenate([table, xp.tile(mean, reps)], axis=axis)


def init_added_token_rows(llm: MistralDecoder, num_added: int) -> MistralDecoder:
    """Set the last `num_added` rows of the input embedding and of the lm_head to the mean of the rows
    before them (in place), as when a plain LLM is extended with the TPO task tokens (MODEL-SPEC §3.3)."""
    vocab = llm.cfg.vocab_size
    table = llm.embed_tokens.embedding
    table[...] = mean_init_new_rows(table[...][: vocab - num_added], vocab, axis=0)
    if llm.lm_head is not None:
        head = llm.lm_head.kernel
        head[...] = mean_init_new_rows(head[...][:, : vocab - num_added], vocab, axis=1)
    return llm

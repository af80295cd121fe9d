"""Mistral-family decoder (MODEL-SPEC §3): GQA, rotate-half RoPE, RMSNorm, SwiGLU, untied lm_head,
optional sliding window, LoRA on the configured projections, and a functional KV cache.

Llama and Qwen2 are configurations of the same decoder (`LLMConfig`): Qwen2 adds a bias to q/k/v
(`attention_bias`), and small Qwen2 models tie the lm_head to the embeddings (`tie_embeddings`); presets
`tpo_jax.config.qwen2_7b_llm` / `qwen2_tiny_llm`.

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
from tpo_jax.attention import AttentionMask, attention
from tpo_jax.layers import Embed, Linear, RMSNorm, split_rng
from tpo_jax.lora import LoRALinear
from tpo_jax.sharding import constrain
from tpo_jax.stack import StackLayout, build_stack, name, run_stack

ACT = ("batch", "length", "act_embed")  # logical axes of the residual stream
HEADS = ("batch", "length", "act_heads", None)  # q and the attention output, (B, L, heads, head_dim)
KV_HEADS = ("batch", "length", "act_kv_heads", None)


@struct.dataclass
class KVCache:
    """Key/value buffers with a layer axis, (num_layers, B, max_len, kv_heads, head_dim), and the number of
    filled slots. One array per tensor in both stack layouts, so a scanned decoder reads its layer's slice."""

    keys: jax.Array
    values: jax.Array
    length: jax.Array  # int32 scalar

    @classmethod
    def init(cls, cfg: LLMConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype), length=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]


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


class _Factory:
    """Builds a projection as LoRALinear when LoRA targets it, else a Linear; bias only where asked (the bias
    of a LoRA-targeted projection is its base Linear's, as in PEFT)."""

    def __init__(self, lora: LoRAConfig | None, dtype, param_dtype, rngs: nnx.Rngs):
        self.lora, self.dtype, self.param_dtype, self.rngs = lora, dtype, param_dtype, rngs

    def __call__(self, name: str, d_in: int, d_out: int, axes, bias: bool = False) -> Linear:
        kw = dict(axes=axes, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)
        if self.lora is not None and self.lora.enabled and name in self.lora.targets:
            return LoRALinear(d_in, d_out, rank=self.lora.rank, alpha=self.lora.alpha,
                              dropout_rate=self.lora.dropout, **kw)
        return Linear(d_in, d_out, **kw)


def _apply(proj: Linear, x: jax.Array, rng: jax.Array | None) -> jax.Array:
    return proj(x, rng) if isinstance(proj, LoRALinear) else proj(x)


class MistralAttention(nnx.Module):
    def __init__(self, cfg: LLMConfig, make: _Factory):
        self.cfg = cfg
        d, hd, bias = cfg.hidden_size, cfg.resolved_head_dim, cfg.attention_bias
        self.q_proj = make("q_proj", d, cfg.num_heads * hd, ("embed", "q_heads"), bias)
        self.k_proj = make("k_proj", d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias)
        self.v_proj = make("v_proj", d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias)
        self.o_proj = make("o_proj", cfg.num_heads * hd, d, ("q_heads", "embed"))

    def __call__(self, x, positions, mask, cache_kv=None, cache_len=None, rng=None):
        cfg, (b, l, _) = self.cfg, x.shape
        hd = cfg.resolved_head_dim
        rq, rk, rv, ro = split_rng(rng, 4)
        q = constrain(name(_apply(self.q_proj, x, rq), "query_proj").reshape(b, l, cfg.num_heads, hd), *HEADS)
        k = constrain(name(_apply(self.k_proj, x, rk), "key_proj").reshape(b, l, cfg.num_kv_heads, hd), *KV_HEADS)
        v = constrain(name(_apply(self.v_proj, x, rv), "value_proj").reshape(b, l, cfg.num_kv_heads, hd), *KV_HEADS)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        new_kv = None
        if cache_kv is not None:
            ck, cv = cache_kv
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_len, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_len, 0, 0))
            new_kv = (k, v)
        impl = cfg.stack.attention
        if cache_kv is not None and impl in ("cudnn", "splash"):  # neither takes a traced cache offset
            impl = "xla"
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, implementation=impl)
        out = name(constrain(out, *HEADS), "attention_out")
        return name(_apply(self.o_proj, out.reshape(b, l, cfg.num_heads * hd), ro), "out_proj"), new_kv


class MistralMLP(nnx.Module):
    def __init__(self, cfg: LLMConfig, make: _Factory):
        self.gate_proj = make("gate_proj", cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
        self.up_proj = make("up_proj", cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
        self.down_proj = make("down_proj", cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"))

    def __call__(self, x, rng=None):
        rg, ru, rd = split_rng(rng, 3)
        h = jax.nn.silu(_apply(self.gate_proj, x, rg)) * _apply(self.up_proj, x, ru)
        h = name(constrain(h, "batch", "length", "act_mlp"), "mlp_hidden")
        return name(_apply(self.down_proj, h, rd), "mlp_out")


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
    """Token embeddings → N decoder layers (a `tpo_jax.stack`: scanned or unrolled, per `cfg.stack`) → final
    RMSNorm → lm_head."""

    def __init__(self, cfg: LLMConfig, lora: LoRAConfig | None = None, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        make = _Factory(lora, dtype, param_dtype, rngs)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = build_stack(
            lambda r: MistralLayer(cfg, _Factory(lora, dtype, param_dtype, r), dtype, param_dtype, r),
            cfg.num_layers, scan=cfg.stack.scan_layers, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else make("lm_head", cfg.hidden_size, cfg.vocab_size,
                                                           ("embed", "vocab"))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        if self.lm_head is None:
            out = jnp.dot(hidden, self.embed_tokens.embedding[...].astype(self.dtype).T)
        else:
            out = _apply(self.lm_head, hidden, rng)
        return constrain(out, "batch", "length", "act_vocab") if out.ndim == 3 else out

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
        key_valid = None if attention_mask is None else attention_mask.astype(bool)
        mask = AttentionMask.decoder(q_offset=0 if cache is None else start, key_valid=key_valid,
                                     sliding_window=self.cfg.sliding_window)

        n = self.cfg.num_layers
        layer_rng, head_rng = split_rng(rng, 2)
        layer_rngs = None if layer_rng is None else jax.random.split(layer_rng, n)
        cache_kv = None if cache is None else (cache.keys, cache.values)

        def body(layer, x, xs):
            kv, r = xs
            x, new_kv = layer[0](x, positions, mask, kv, start, r)
            return constrain(x, *ACT), new_kv

        stack = self.layers
        groups = (stack,) if self.cfg.stack.scan_layers else [(layer,) for layer in stack]
        x, new_kv = run_stack(body, groups, x, (cache_kv, layer_rngs), cfg=self.cfg.stack, length=n)
        hidden = self.norm(x)
        new_cache = None if cache is None else KVCache(new_kv[0], new_kv[1], start + l)
        return LLMOutput(logits=self.logits(hidden, head_rng) if logits else None, hidden=hidden, cache=new_cache)


def llm_stack_layouts(cfg: LLMConfig, prefix: str = "llm") -> list[StackLayout]:
    """Scanned decoder: `{prefix}.layers.<rest>` (leading axis num_layers) ↔ `{prefix}.layers.{i}.<rest>`."""
    pre = f"{prefix}." if prefix else ""
    if not cfg.stack.scan_layers:
        return []
    return [StackLayout(f"{pre}layers.", f"{pre}layers.{{i}}.", cfg.num_layers)]


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

"""One attention entry point, `attention(q, k, v, mask, implementation=...)`, with selectable kernels.

Shapes: q (B, L, H, D); k (B, S, K, D); v (B, S, K, Dv) with K dividing H (grouped-query attention:
query head h uses kv head h // (H/K)). Returns (B, L, H, Dv).

The mask is described structurally by `AttentionMask` (causal, sliding window, KV-cache offset, key
padding, an optional arbitrary dense mask), so that each implementation can translate what it supports
and refuse, with a ValueError, what it cannot express (never computing something else silently):

=========  ===========================================================================================
einsum     The reference (parity oracle): float32 scores materialised, every mask, probability dropout.
xla        `jax.nn.dot_product_attention(implementation="xla")`: every mask; no dropout.
cudnn      The same API with `implementation="cudnn"` (GPU, bf16/fp16): causal, sliding window, right
           padding (`key_lengths`); no dense mask, no `key_valid`, no cache offset, no dropout.
splash     The TPU Pallas splash-attention kernel (or Pallas interpret mode on any backend, slow; for
           tests): causal, sliding window, key padding (`key_valid`/`key_lengths`, via segment ids) and a
           *static* (Python int) cache offset; no dense mask, no dropout. Sequences are padded to the
           kernel's block size inside the call.
auto       By backend (TPU splash, GPU cudnn, CPU einsum, else xla), see `resolve_implementation`.
=========  ===========================================================================================

Rows with no visible key at all (e.g. a left-padding query under a causal mask): einsum, xla and splash
return the uniform average of all S values, as the reference always did (einsum fills masked scores with
finfo.min, xla with a large negative number, splash is patched to match). cuDNN's output for such rows
is whatever the library returns (unspecified; not checked here, no GPU was available).

Attention dropout is only implemented by einsum; other implementations raise when a dropout rate and
an rng are given, and `auto` resolves to einsum then (so train with attention dropout on einsum).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from tpo_jax.sharding import BATCH_AXES, active_mesh, target_platform

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "splash")
_FAST_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SPLASH_BLOCK = 512  # largest splash block (q and kv); lengths are padded to a multiple of 128 up to it
_LANES = 128  # splash needs kv blocks (and, for segment ids, q blocks) that are multiples of 128
SPLASH_MIN_LEN = 128  # `auto` on TPU uses splash only from this query length on (shorter pads too much)


def _static_int(x: Any) -> int | None:
    """`x` as a Python int when its value is known at trace time, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return int(x)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: fields hold arrays; hash by identity
class AttentionMask:
    """Which keys each query may attend to (True = may attend), described structurally.

    * `causal`: key slot j is visible to the query at slot p iff j <= p.
    * `sliding_window` (needs `causal`): additionally p - window < j (Mistral / HF convention).
    * `q_offset`: slot of the first query (queries at q_offset + arange(L), keys at arange(S)); 0 without
      a KV cache. A Python int is static (part of the pytree structure); an array is a traced leaf.
    * `key_valid`: (B, S) bool, key padding on any side. `key_lengths`: (B,) int, keys at slots >= length
      are padding (right padding; the only padding cuDNN takes).
    * `dense`: bool broadcastable to (B, H|1, L, S), ANDed with the rest (einsum and xla only).

    A pytree: causal/sliding_window (and an int q_offset) are static, the arrays are leaves, so a mask
    can be built inside or passed into `jax.jit`.
    """

    causal: bool = False
    sliding_window: int | None = None
    q_offset: int | jax.Array = 0
    key_valid: jax.Array | None = None
    key_lengths: jax.Array | None = None
    dense: jax.Array | None = None

    def __post_init__(self):
        if self.sliding_window is not None:
            if not self.causal:
                raise ValueError("AttentionMask: sliding_window needs causal=True "
                                 "(the window is q_slot - window < key_slot <= q_slot)")
            if self.sliding_window < 1:
                raise ValueError(f"AttentionMask: sliding_window must be >= 1, got {self.sliding_window}")

    @classmethod
    def none(cls) -> "AttentionMask":
        """Every query sees every key (the same as passing mask=None)."""
        return cls()

    @classmethod
    def decoder(cls, *, q_offset: int | jax.Array = 0, key_valid: jax.Array | None = None,
                sliding_window: int | None = None) -> "AttentionMask":
        """The decoder mask: causal in slot order, optional sliding window and key padding."""
        return cls(causal=True, sliding_window=sliding_window, q_offset=q_offset, key_valid=key_valid)

    @property
    def static_q_offset(self) -> int | None:
        """`q_offset` as a Python int when known at trace time, else None (a traced KV-cache length)."""
        return _static_int(self.q_offset)

    @property
    def offset_is_zero(self) -> bool:
        """True when the query offset is known to be 0 or does not matter (no causal structure)."""
        return not self.causal or self.static_q_offset == 0

    def key_padding(self, kv_len: int) -> jax.Array | None:
        """(B, S) bool of valid keys from `key_valid` and `key_lengths`, or None without padding."""
        valid = None if self.key_valid is None else jnp.asarray(self.key_valid).astype(bool)
        if self.key_lengths is not None:
            by_len = jnp.arange(kv_len)[None, :] < jnp.asarray(self.key_lengths)[:, None]
            valid = by_len if valid is None else valid & by_len
        return valid

    def to_dense(self, batch: int, q_len: int, kv_len: int) -> jax.Array:
        """The full boolean mask, (B|1, H|1, L, S); the head axis is 1 unless `dense` has one."""
        for name, arr, shape in (("key_valid", self.key_valid, (batch, kv_len)),
                                 ("key_lengths", self.key_lengths, (batch,))):
            if arr is not None and tuple(arr.shape) != shape:
                raise ValueError(f"AttentionMask.{name}: expected shape {shape}, got {tuple(arr.shape)}")
        q_slots = self.q_offset + jnp.arange(q_len)
        k_slots = jnp.arange(kv_len)
        mask = jnp.ones((q_len, kv_len), bool)
        if self.causal:
            mask &= k_slots[None, :] <= q_slots[:, None]
        if self.sliding_window is not None:
            mask &= k_slots[None, :] > q_slots[:, None] - self.sliding_window
        mask = mask[None, None]
        valid = self.key_padding(kv_len)
        if valid is not None:
            mask = mask & valid[:, None, None, :]
        if self.dense is not None:
            mask = mask & _as_4d(jnp.asarray(self.dense).astype(bool))
        return mask


def _flatten(m: AttentionMask):
    offset_static = not isinstance(m.q_offset, (jax.Array, np.ndarray))
    leaves = (None if offset_static else m.q_offset, m.key_valid, m.key_lengths, m.dense)
    return leaves, (m.causal, m.sliding_window, m.q_offset if offset_static else None, offset_static)


def _unflatten(aux, leaves) -> AttentionMask:
    causal, window, offset, offset_static = aux
    return AttentionMask(causal, window, offset if offset_static else leaves[0], *leaves[1:])


jax.tree_util.register_pytree_node(AttentionMask, _flatten, _unflatten)


def _as_4d(x: jax.Array) -> jax.Array:
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


# ---------------------------------------------------------------------------------------------------
# Choosing an implementation

def _cudnn_problem(mask: AttentionMask | None, dtype: Any, head_dim: int | None) -> str | None:
    """Why cuDNN cannot compute this attention exactly, or None when it can."""
    if dtype is not None and jnp.dtype(dtype) not in _FAST_DTYPES:
        return f"needs bfloat16/float16 inputs (got {jnp.dtype(dtype)}); cast q/k/v or use 'xla'"
    if head_dim is not None and head_dim % 8:
        return f"needs a head dim that is a multiple of 8 (got {head_dim}); use 'xla'"
    if mask is None:
        return None
    if mask.dense is not None:
        return "cannot take an arbitrary dense mask (AttentionMask.dense); use 'xla' or 'einsum'"
    if mask.key_valid is not None:
        return ("cannot express arbitrary key padding (AttentionMask.key_valid); pass right padding as "
                "key_lengths, or use 'xla' or 'einsum'")
    if not mask.offset_is_zero:
        return ("cannot express a KV-cache query offset (AttentionMask.q_offset != 0 or traced); "
                "use 'xla' or 'einsum'")
    return None


def _splash_problem(mask: AttentionMask | None) -> str | None:
    """Why splash cannot compute this attention exactly, or None when it can."""
    if mask is None:
        return None
    if mask.dense is not None:
        return "cannot take an arbitrary dense mask (AttentionMask.dense); use 'xla' or 'einsum'"
    if mask.causal and mask.static_q_offset is None:
        return ("needs a static query offset (AttentionMask.q_offset as a Python int), got a traced one; "
                "use 'xla' or 'einsum'")
    return None


def resolve_implementation(name: str, *, backend: str | None = None, dtype: Any = None,
                           mask: AttentionMask | None = None, q_len: int | None = None,
                           head_dim: int | None = None, dropout: bool = False,
                           interpret: bool = False) -> str:
    """The concrete implementation for `name` on `backend` (default: the platform of the active mesh, so an
    ahead-of-time compile for a TPU topology picks TPU kernels on a CPU host; else `jax.default_backend()`).

    Raises ValueError when `name` is unknown or cannot run there (cudnn off GPU, splash off TPU without
    `interpret`, any non-einsum implementation with `dropout`). The optional facts (dtype, mask, q_len,
    head_dim) refine `auto` and the checks; a config validator can call this with only `backend`.

    `auto`: einsum when dropout is on (the only one with attention dropout). TPU: splash when the mask
    is expressible and q_len >= SPLASH_MIN_LEN, else xla. GPU: cudnn for bf16/fp16 inputs with an
    expressible mask and head_dim <= 128, else xla. CPU: einsum, the faster of the two there (measured
    on 2 cores, float32, jitted: forward 1.1-1.5x faster than xla on LLM (causal, GQA), ViT, Q-Former
    cross-attention and decode shapes; gradients within about 20% either way). Other backends: xla.
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; known: {', '.join(IMPLEMENTATIONS)}")
    backend = backend or target_platform()
    if name == "auto":
        if dropout:
            return "einsum"
        if backend == "tpu" and _splash_problem(mask) is None and (q_len is None or q_len >= SPLASH_MIN_LEN):
            return "splash"
        # head_dim <= 128: what cuDNN flash attention takes on every GPU generation (256 from Hopper on).
        if (backend == "gpu" and dtype is not None and head_dim is not None and head_dim <= 128
                and _cudnn_problem(mask, dtype, head_dim) is None):
            return "cudnn"
        return "einsum" if backend == "cpu" else "xla"
    if dropout and name != "einsum":
        raise ValueError(f"attention implementation {name!r} has no attention dropout; use 'einsum' when "
                         "training with attention dropout (or set the attention dropout rate to 0)")
    if name == "cudnn":
        if backend != "gpu":
            raise ValueError(f"attention implementation 'cudnn' needs a GPU (backend is {backend!r}); "
                             "use 'xla' or 'einsum'")
        problem = _cudnn_problem(mask, dtype, head_dim)
        if problem:
            raise ValueError(f"attention implementation 'cudnn' {problem}")
    if name == "splash":
        if backend != "tpu" and not interpret:
            raise ValueError(f"attention implementation 'splash' needs a TPU (backend is {backend!r}); "
                             "use 'xla' or 'einsum' (or interpret=True: the Pallas kernel interpreted, slowly)")
        problem = _splash_problem(mask)
        if problem:
            raise ValueError(f"attention implementation 'splash' {problem}")
    return name


# ---------------------------------------------------------------------------------------------------
# Implementations

def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout, as `layers.dropout` (kept here so layers can import this module)."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _einsum(q, k, v, mask: AttentionMask | None, scale: float, dropout_rate: float, rng) -> jax.Array:
    b, l, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    groups = h // kv_heads
    # Head-major layout first, so both products are plain batched matmuls over (B, K): on CPU this is
    # ~1.5x faster than a grouped einsum on the (B, L, H, D) layout (benchmarks/bench_llm_vs_torch.py).
    qh = q.reshape(b, l, kv_heads, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, groups * l, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkqd,bksd->bkqs", qh, kh).astype(jnp.float32) * scale
    logits = logits.reshape(b, kv_heads, groups, l, s)
    if mask is not None:
        dense = jnp.broadcast_to(mask.to_dense(b, l, s), (b, h, l, s)).reshape(b, kv_heads, groups, l, s)
        logits = jnp.where(dense, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = _dropout(probs, dropout_rate, rng).astype(v.dtype).reshape(b, kv_heads, groups * l, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vh).reshape(b, kv_heads, groups, l, v.shape[-1])
    return out.transpose(0, 3, 1, 2, 4).reshape(b, l, h, v.shape[-1])


def _dpa(q, k, v, mask: AttentionMask | None, scale: float, implementation: str) -> jax.Array:
    """jax.nn.dot_product_attention. Its is_causal / local_window_size align query i with key i (top-left),
    i.e. q_offset 0; any other offset goes in as a dense mask (xla; cudnn was refused before)."""
    b, l, _, _ = q.shape
    s = k.shape[1]
    kw: dict[str, Any] = {}
    if mask is not None:
        if mask.offset_is_zero:
            kw["is_causal"] = mask.causal
            if mask.sliding_window is not None:
                kw["local_window_size"] = (mask.sliding_window - 1, 0)
            if mask.key_lengths is not None:
                kw["key_value_seq_lengths"] = jnp.asarray(mask.key_lengths).astype(jnp.int32)
            extra = AttentionMask(key_valid=mask.key_valid, dense=mask.dense)
            if extra.key_valid is not None or extra.dense is not None:
                kw["mask"] = extra.to_dense(b, l, s)
        else:
            kw["mask"] = mask.to_dense(b, l, s)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation, **kw)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _splash(q, k, v, mask: AttentionMask | None, scale: float, interpret: bool) -> jax.Array:
    """Splash attention, vmapped over batch. L and S are padded to the block sizes; padded keys and real
    padding keys get kv segment id 0, valid keys 1. A query whose structural window holds no valid key
    gets q segment id 0 (so the kernel never sees an empty row, which would give NaN) and its output is
    replaced by the uniform average of the values, as in the reference."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, l, h, _ = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    mask = mask or AttentionMask()
    offset = mask.static_q_offset if mask.causal else 0
    bq = min(SPLASH_BLOCK, _round_up(l, _LANES))
    lp = _round_up(l, bq)
    # Causal rows must each reach a key slot of their own: padded query rows sit at slots up to offset+lp-1.
    min_keys = max(s, offset + lp) if mask.causal else s
    bkv = min(SPLASH_BLOCK, _round_up(min_keys, _LANES))
    sp = _round_up(min_keys, bkv)

    if mask.sliding_window is not None:
        base = sa.LocalMask((lp, sp), window_size=(mask.sliding_window - 1, 0), offset=offset)
    elif mask.causal:
        base = sa.CausalMask((lp, sp), offset=offset)
    else:
        base = sa.FullMask((lp, sp))
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    kernel = sa.make_splash_mha_single_device(sa.MultiHeadMask([base] * h), block_sizes=blocks,
                                              interpret=interpret)

    valid = mask.key_padding(s)
    valid = jnp.ones((b, s), bool) if valid is None else valid
    kv_ids = jnp.pad(valid, ((0, 0), (0, sp - s))).astype(jnp.int32)  # (B, Sp)
    # Number of valid keys in each padded query row's window [lo, hi], from a prefix sum over keys.
    slots = offset + jnp.arange(lp)
    hi = jnp.minimum(slots, sp - 1) if mask.causal else jnp.full((lp,), sp - 1)
    lo = jnp.maximum(slots - mask.sliding_window + 1, 0) if mask.sliding_window else jnp.zeros((lp,), int)
    csum = jnp.pad(jnp.cumsum(kv_ids, axis=1), ((0, 0), (1, 0)))
    has_key = (csum[:, hi + 1] - csum[:, lo]) > 0  # (B, Lp)
    q_ids = has_key.astype(jnp.int32)

    def heads_first(x, n):
        return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    qp = heads_first(q * jnp.asarray(scale, q.dtype), lp)
    kp, vp = heads_first(k, sp), heads_first(v, sp)
    run = jax.vmap(lambda q_, k_, v_, qi, ki: kernel(q_, k_, v_, segment_ids=sa.SegmentIds(qi, ki)))
    out = _per_shard(run, qp, kp, vp, q_ids, kv_ids)
    out = out.transpose(0, 2, 1, 3)[:, :l]  # (B, L, H, Dv)
    mean_v = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), h // kv_heads, axis=1)  # (B, H, Dv)
    return jnp.where(has_key[:, :l, None, None], out, mean_v[:, None].astype(out.dtype))


def _per_shard(run, qp, kp, vp, q_ids, kv_ids):
    """`run` on each device's block under the active mesh (`tpo_jax.sharding.activation_sharding`): a Mosaic
    kernel cannot be partitioned by XLA, so it runs in a `shard_map` with the batch split over data × fsdp
    (where it divides). The heads are not split: the kernel's mask is built for all of them, so under a
    `tensor` axis each device gathers the heads and computes them all (correct, not yet the Megatron split).
    Without a mesh (or on one device) `run` is called as is."""
    mesh = active_mesh()
    if mesh is None or mesh.devices.size == 1:
        return run(qp, kp, vp, q_ids, kv_ids)
    batch = BATCH_AXES if qp.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else None
    heads_spec, ids_spec = P(batch, None, None, None), P(batch, None)
    return jax.shard_map(run, mesh=mesh, in_specs=(heads_spec,) * 3 + (ids_spec,) * 2, out_specs=heads_spec,
                         check_vma=False)(qp, kp, vp, q_ids, kv_ids)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None = None, *,
              implementation: str = "einsum", scale: float | None = None, dropout_rate: float = 0.0,
              rng: jax.Array | None = None, backend: str | None = None, interpret: bool = False) -> jax.Array:
    """Multi-head attention with grouped key/value heads; see the module docstring.

    q (B, L, H, D); k (B, S, K, D); v (B, S, K, Dv); K divides H. Returns (B, L, H, Dv).
    `scale` defaults to D ** -0.5. `dropout_rate` with an `rng` drops attention probabilities (einsum
    only). `backend` overrides the target platform (the active mesh's, else `jax.default_backend()`) for the
    choice/checks; `interpret` runs splash in
    Pallas interpret mode (any backend; slow, for tests).
    """
    if mask is not None and not isinstance(mask, AttentionMask):
        raise TypeError(f"attention: mask must be an AttentionMask or None, got {type(mask).__name__} "
                        "(wrap a boolean array as AttentionMask(dense=...))")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: expected q (B,L,H,D), k (B,S,K,D), v (B,S,K,Dv) with K dividing H; "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dropout = dropout_rate > 0.0 and rng is not None
    impl = resolve_implementation(implementation, backend=backend, dtype=q.dtype, mask=mask, q_len=q.shape[1],
                                  head_dim=q.shape[-1], dropout=dropout, interpret=interpret)
    if impl == "einsum":
        return _einsum(q, k, v, mask, scale, dropout_rate, rng)
    if impl == "splash":
        return _splash(q, k, v, mask, scale, interpret)
    return _dpa(q, k, v, mask, scale, impl)


def check_config(cfg, backend: str | None = None) -> None:
    """One `ConfigError` naming the field when a stack's `attention` cannot run on `backend` (default: the
    current one), e.g. `config field 'llm.stack.attention': attention implementation 'cudnn' needs a GPU ...`.
    `cfg` is a TPOConfig (its three stacks) or one stack's config (LLMConfig, ViTConfig, QFormerConfig)."""
    from tpo_jax.config import ConfigError, TPOConfig

    stacks = {"vit": cfg.vit, "qformer": cfg.qformer, "llm": cfg.llm} if isinstance(cfg, TPOConfig) else {"": cfg}
    dtype = jnp.dtype(cfg.dtype) if isinstance(cfg, TPOConfig) else None
    for prefix, sub in stacks.items():
        try:
            resolve_implementation(sub.stack.attention, backend=backend, dtype=dtype)
        except ValueError as e:
            field = f"{prefix}.stack.attention" if prefix else "stack.attention"
            raise ConfigError(f"config field '{field}': {e}") from None

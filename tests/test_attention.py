"""tpo_jax.attention: every CPU-runnable implementation (einsum, xla, splash in Pallas interpret mode)
against the einsum oracle, the oracle against hand-written numpy, masks, gradients and the refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpo_jax.attention import AttentionMask, attention, resolve_implementation

jax.config.update("jax_default_matmul_precision", "highest")

B, H, D = 2, 4, 8


def qkv(l, s, kv_heads, seed=0, dtype=jnp.float32):
    r = np.random.RandomState(seed)
    return tuple(jnp.asarray(r.randn(*shape), dtype)
                 for shape in ((B, l, H, D), (B, s, kv_heads, D), (B, s, kv_heads, D)))


def valid(s, left=(0, 0), filled=None):
    """(B, S) key padding: `left[b]` padding slots at the start, slots >= filled[b] empty."""
    out = np.ones((B, s), bool)
    for b in range(B):
        out[b, : left[b]] = False
        if filled is not None:
            out[b, filled[b]:] = False
    return jnp.asarray(out)


# name: (L, S, K, mask); every mask is static in structure and offset, so splash can run them all.
CASES = {
    "none": (6, 6, 4, None),
    "causal": (6, 6, 4, AttentionMask(causal=True)),
    "pad_left": (6, 6, 4, AttentionMask(key_valid=valid(6, left=(2, 0)))),
    "pad_right": (6, 6, 4, AttentionMask(key_valid=valid(6, filled=(6, 3)))),
    "key_lengths": (6, 6, 4, AttentionMask(causal=True, key_lengths=jnp.array([6, 4]))),
    "window": (7, 7, 4, AttentionMask(causal=True, sliding_window=3)),
    "gqa2": (6, 6, 2, AttentionMask(causal=True)),
    "gqa1": (6, 6, 1, AttentionMask(causal=True)),
    # KV cache of 8 slots: a decode step at slot 5 and a 3-token chunk at slots 2..4, later slots empty.
    "decode": (1, 8, 2, AttentionMask.decoder(q_offset=5, key_valid=valid(8, left=(0, 2), filled=(6, 6)))),
    "prefill_chunk": (3, 8, 2, AttentionMask.decoder(q_offset=2, key_valid=valid(8, left=(1, 0), filled=(5, 5)))),
    # Left padding under a causal mask leaves the first rows with no visible key at all.
    "causal_pad_left": (6, 6, 2, AttentionMask(causal=True, key_valid=valid(6, left=(3, 1)))),
    "combo": (7, 7, 2, AttentionMask(causal=True, sliding_window=3, key_valid=valid(7, left=(2, 0), filled=(7, 5)))),
    "combo_cache": (3, 8, 1, AttentionMask.decoder(q_offset=3, sliding_window=2,
                                                   key_valid=valid(8, left=(1, 0), filled=(6, 6)))),
}
SPLASH_CASES = ["none", "pad_left", "gqa1", "prefill_chunk", "causal_pad_left", "combo", "combo_cache"]
PARAMS = ([pytest.param("xla", c, id=f"xla-{c}") for c in CASES]
          + [pytest.param("splash", c, id=f"splash-{c}") for c in SPLASH_CASES])


def numpy_mask(l, s, mask):
    """The (B, L, S) mask built by hand, query by query and key by key."""
    out = np.ones((B, l, s), bool)
    if mask is None:
        return out
    offset = int(mask.q_offset)
    kv = np.ones((B, s), bool) if mask.key_valid is None else np.asarray(mask.key_valid)
    for b in range(B):
        for i in range(l):
            for j in range(s):
                ok = bool(kv[b, j])
                if mask.key_lengths is not None:
                    ok &= j < int(mask.key_lengths[b])
                if mask.causal:
                    ok &= j <= offset + i
                if mask.sliding_window is not None:
                    ok &= j > offset + i - mask.sliding_window
                out[b, i, j] = ok
    return out


def numpy_attention(q, k, v, mask_bls):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask_bls[:, None], logits, -np.inf)
    empty = ~mask_bls.any(-1)[:, None, :, None]  # rows with no visible key: uniform over all keys
    logits = np.where(empty, 0.0, logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", p, v)


@pytest.mark.parametrize("case", ["causal", "causal_pad_left", "combo", "combo_cache"])
def test_mask_and_einsum_match_numpy(case):
    l, s, kv_heads, mask = CASES[case]
    expected = numpy_mask(l, s, mask)
    np.testing.assert_array_equal(np.broadcast_to(mask.to_dense(B, l, s), (B, 1, l, s))[:, 0], expected)
    q, k, v = qkv(l, s, kv_heads)
    np.testing.assert_allclose(attention(q, k, v, mask), numpy_attention(q, k, v, expected), atol=1e-5)


@pytest.mark.parametrize("impl,case", PARAMS)
def test_matches_einsum(impl, case):
    l, s, kv_heads, mask = CASES[case]
    q, k, v = qkv(l, s, kv_heads)
    # Under jit with the mask as an argument: its arrays are traced, its structure and int offset static.
    run = lambda name: jax.jit(functools.partial(attention, implementation=name, interpret=True))(q, k, v, mask)
    expected, got = run("einsum"), run(impl)
    assert got.shape == (B, l, H, D)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_traced_offset_and_dense_mask_under_jit():
    """A traced KV-cache offset and an arbitrary dense mask (einsum/xla only), the mask a jit argument."""
    l, s = 3, 8
    q, k, v = qkv(l, s, 2)
    dense = jnp.asarray(np.random.RandomState(1).rand(B, H, l, s) > 0.3)
    mask = AttentionMask.decoder(q_offset=jnp.int32(2), key_valid=valid(s, filled=(5, 5)))
    mask = AttentionMask(True, None, mask.q_offset, mask.key_valid, dense=dense)
    run = jax.jit(lambda q, k, v, m, impl: attention(q, k, v, m, implementation=impl), static_argnums=4)
    expected = run(q, k, v, mask, "einsum")
    np.testing.assert_allclose(run(q, k, v, mask, "xla"), expected, atol=1e-5)
    hand = numpy_mask(l, s, AttentionMask.decoder(q_offset=2, key_valid=mask.key_valid)) & np.asarray(dense)[:, 0]
    np.testing.assert_array_equal(mask.to_dense(B, l, s)[:, 0], hand)


@pytest.mark.parametrize("impl,case", [("xla", "combo"), ("xla", "prefill_chunk"), ("splash", "combo")])
def test_gradients_match_einsum(impl, case):
    l, s, kv_heads, mask = CASES[case]
    q, k, v = qkv(l, s, kv_heads)
    w = jnp.asarray(np.random.RandomState(2).randn(B, l, H, D), jnp.float32)

    def grads(name):
        loss = lambda q, k, v: jnp.sum(w * attention(q, k, v, mask, implementation=name, interpret=True))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, expected in zip(grads(impl), grads("einsum")):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_einsum_dropout():
    q, k, v = qkv(4, 4, 2)
    plain = attention(q, k, v)
    np.testing.assert_array_equal(attention(q, k, v, dropout_rate=0.5), plain)  # no rng: deterministic
    dropped = attention(q, k, v, dropout_rate=0.5, rng=jax.random.key(0))
    assert dropped.shape == plain.shape and not np.allclose(dropped, plain)


def test_auto_choice():
    mask = AttentionMask(causal=True)
    assert resolve_implementation("auto", backend="cpu") == "einsum"
    assert resolve_implementation("auto", backend="tpu", mask=mask, q_len=256) == "splash"
    assert resolve_implementation("auto", backend="tpu", mask=mask, q_len=1) == "xla"
    assert resolve_implementation("auto", backend="gpu", dtype=jnp.bfloat16, mask=mask, head_dim=64) == "cudnn"
    assert resolve_implementation("auto", backend="gpu", dtype=jnp.float32, mask=mask) == "xla"
    assert resolve_implementation("auto", backend="gpu", dtype=jnp.bfloat16, head_dim=64,
                                  mask=AttentionMask(key_valid=jnp.ones((1, 4), bool))) == "xla"
    assert resolve_implementation("auto", backend="gpu", dtype=jnp.bfloat16, mask=mask, head_dim=256) == "xla"
    assert resolve_implementation("auto", backend="tpu", dropout=True) == "einsum"
    q, k, v = qkv(4, 4, 2)
    np.testing.assert_array_equal(attention(q, k, v, mask, implementation="auto"), attention(q, k, v, mask))


def _bf16_call(mask, impl="cudnn", **kw):
    q, k, v = qkv(4, 4, 2, dtype=jnp.bfloat16)
    return attention(q, k, v, mask, implementation=impl, backend="gpu", **kw)


@pytest.mark.parametrize("call,match", [
    (lambda: resolve_implementation("flash"), r"unknown attention implementation 'flash'.*einsum"),
    (lambda: resolve_implementation("cudnn", backend="cpu"),
     r"attention implementation 'cudnn' needs a GPU \(backend is 'cpu'\); use 'xla' or 'einsum'"),
    (lambda: resolve_implementation("splash", backend="cpu"), r"'splash' needs a TPU .*interpret=True"),
    (lambda: attention(*qkv(4, 4, 2), implementation="xla", dropout_rate=0.1, rng=jax.random.key(0)),
     r"'xla' has no attention dropout; use 'einsum'"),
    (lambda: attention(*qkv(4, 4, 2), implementation="cudnn", backend="gpu"), r"'cudnn' needs bfloat16/float16"),
    (lambda: _bf16_call(AttentionMask(key_valid=jnp.ones((B, 4), bool))), r"'cudnn' .*key_valid.*key_lengths"),
    (lambda: _bf16_call(AttentionMask(dense=jnp.ones((4, 4), bool))), r"'cudnn' .*AttentionMask.dense"),
    (lambda: _bf16_call(AttentionMask(causal=True, q_offset=2)), r"'cudnn' .*q_offset"),
    (lambda: _bf16_call(AttentionMask(dense=jnp.ones((4, 4), bool)), "splash", interpret=True),
     r"'splash' .*AttentionMask.dense"),
    (lambda: jax.jit(lambda o: _bf16_call(AttentionMask.decoder(q_offset=o), "splash", interpret=True))(1),
     r"'splash' needs a static query offset"),
    (lambda: AttentionMask(sliding_window=4), r"sliding_window needs causal=True"),
])
def test_refusals(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_splash_runs_per_shard_under_a_mesh():
    """A Mosaic kernel cannot be partitioned by XLA: under an active mesh splash runs in a shard_map over the
    batch axes, and gives the einsum result (interpret mode on 8 fake CPU devices, fsdp 4 × tensor 2)."""
    from tpo_jax import sharding as S

    mesh = S.make_mesh(S.MeshConfig(1, 4, 2))
    q = jax.random.normal(jax.random.key(0), (8, 40, 4, 16))
    k = jax.random.normal(jax.random.key(1), (8, 40, 2, 16))
    v = jax.random.normal(jax.random.key(2), (8, 40, 2, 16))
    valid = jnp.ones((8, 40), bool).at[0, -5:].set(False)
    ref = attention(q, k, v, AttentionMask.decoder(key_valid=valid))

    def sharded(q, k, v, valid):
        with S.activation_sharding(mesh, S.get_rules("fsdp_tp")):
            assert S.target_platform() == "cpu"
            return attention(q, k, v, AttentionMask.decoder(key_valid=valid), implementation="splash", interpret=True)

    np.testing.assert_allclose(np.asarray(jax.jit(sharded)(q, k, v, valid)), np.asarray(ref), atol=1e-5)

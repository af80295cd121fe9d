"""Choosing the next token: greedy, sampling (temperature / top-k / top-p) and one beam-search step.

All functions work on a (R, V) block of float32 logits (R rows = prompts × beams) inside the jitted decode
loop; `restrict` first pins rows that are finished (only the pad id) or that must emit a forced token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tpo_jax.generate.settings import GenerationConfig


def restrict(logits: jax.Array, done: jax.Array, forced: jax.Array, pad_id: int) -> jax.Array:
    """Rows that are `done` may only emit `pad_id`; rows with `forced` >= 0 only that id (logit 0, others -inf)."""
    only = jnp.where(done, pad_id, forced)
    onehot = jnp.arange(logits.shape[-1])[None, :] == only[:, None]
    pinned = jnp.where(onehot, 0.0, -jnp.inf)
    return jnp.where((only >= 0)[:, None], pinned, logits)


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Logits / temperature, then every token outside the top-k and outside the top-p nucleus set to -inf
    (the most likely token always stays)."""
    x = logits / temperature
    if top_k:
        kth = jax.lax.top_k(x, min(top_k, x.shape[-1]))[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p < 1.0:
        desc = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, -jnp.inf, x)
    return x


def choose(logits: jax.Array, scores: jax.Array, key: jax.Array | None, gen: GenerationConfig):
    """(origin rows (R,), tokens (R,), new scores (R,)) for one step.

    greedy / sample: origin = own row, score += log p(token). beam: rows are (prompt, beam) blocks of
    `num_beams`; the `num_beams` best (beam, token) continuations of each prompt by cumulative log-probability.
    """
    r, v = logits.shape
    logp = jax.nn.log_softmax(logits, axis=-1)
    own = jnp.arange(r)
    if gen.strategy == "greedy":
        tok = jnp.argmax(logits, axis=-1)
        return own, tok, scores + jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0]
    if gen.strategy == "sample":
        tok = jax.random.categorical(key, filter_logits(logits, gen.temperature, gen.top_k, gen.top_p), axis=-1)
        return own, tok, scores + jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0]
    nb = gen.num_beams
    cand = (scores[:, None] + logp).reshape(r // nb, nb * v)
    top, idx = jax.lax.top_k(cand, nb)
    origin = (jnp.arange(r // nb)[:, None] * nb + idx // v).reshape(r)
    return origin, (idx % v).reshape(r), top.reshape(r)


def initial_scores(batch: int, gen: GenerationConfig) -> jax.Array:
    """0 for the first beam of each prompt, -inf for the others (all beams start identical)."""
    nb = gen.rows_per_prompt
    first = (jnp.arange(batch * nb) % nb) == 0
    return jnp.where(first, 0.0, -jnp.inf).astype(jnp.float32)


def best_rows(scores: jax.Array, lengths: jax.Array, gen: GenerationConfig) -> jax.Array:
    """Per prompt, the row to return: itself, or the beam with the best length-normalised score."""
    nb = gen.rows_per_prompt
    if nb == 1:
        return jnp.arange(scores.shape[0])
    norm = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** gen.length_penalty
    best = jnp.argmax(norm.reshape(-1, nb), axis=-1)
    return jnp.arange(best.shape[0]) * nb + best

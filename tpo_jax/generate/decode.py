"""The compiled decode: one prefill of the left-padded prompts into a KV cache, then a `lax.while_loop` of
single-token steps with the task-token side steps (MODEL-SPEC §8.3), all in one `jax.jit` whose static
arguments are the model's graphdef and the `GenerationConfig`; the shapes are (batch, bucket length).

Per row the loop carries the emitted tokens, whether it has stopped, its score, a forced next token
("training" side steps) and the task-token hidden states: slots 0..K-1 for the region head (in emission
order), slot K for the temporal head and K+1 for the mask head (the last one of each kind wins).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from tpo_jax.generate import sampling
from tpo_jax.generate.settings import GenerationConfig, GenerationError
from tpo_jax.llm import KVCache


@struct.dataclass
class DecodeOutput:
    tokens: jax.Array  # (B, max_new_tokens) int32, pad after the end
    lengths: jax.Array  # (B,) tokens emitted, the stop token included
    stopped: jax.Array  # (B,) bool: ended on a stop id
    scores: jax.Array  # (B,) cumulative log-probability of the emitted tokens
    slot_hidden: jax.Array  # (B, K + 2, D) final-norm hidden state of each task-token slot
    slot_on: jax.Array  # (B, K + 2) bool
    vision_features: jax.Array | None  # (B, T·N, width) vision-encoder features of the prompt's frames, when asked


def _kind(tok: jax.Array, ids) -> jax.Array:
    """0 / 1 / 2 where tok is ids[0] / ids[1] / ids[2], else -1."""
    return jnp.select([tok == i for i in ids], [0, 1, 2], -1)


def _store(slot_h, slot_on, reg_n, kind, rows, h):
    """Write h (R, D) into the slot of each row's head kind where `rows`; region fills slots in order."""
    k = slot_h.shape[1] - 2
    idx = jnp.where(kind == 0, reg_n, k + kind - 1)
    ok = rows & (kind >= 0) & ((kind != 0) | (reg_n < k))
    hit = (jnp.arange(k + 2)[None, :] == idx[:, None]) & ok[:, None]
    slot_h = jnp.where(hit[..., None], h[:, None, :].astype(slot_h.dtype), slot_h)
    return slot_h, slot_on | hit, reg_n + (ok & (kind == 0)).astype(jnp.int32)


def _placeholder(kind: jax.Array, placeholders) -> jax.Array:
    return jnp.asarray(placeholders)[jnp.clip(kind, 0, 2)]


def decode_impl(model, ids, attention_mask, visual_mask, frames, rng, gen: GenerationConfig,
                vision_features: bool = False, track_boxes=None) -> DecodeOutput:
    """The whole decode for left-padded prompts ids (B, L) with attention_mask (B, L) (1 = token);
    track_boxes (B, K, 4): the boxes of the prompts' `<track_box>` tokens (or None). The task tokens are the
    model's (`cfg.task_tokens`); `gen` must carry the tokenizer's stop / pad ids (`GenerationConfig.for_tokenizer`)."""
    cfg = model.cfg
    if not gen.resolved:
        raise GenerationError("GenerationConfig stop_ids / pad_id are None: fill them from the model's tokenizer "
                              "with GenerationConfig.for_tokenizer(tok) (Generator does)")
    begin_tokens, placeholders = cfg.task_tokens.begin_tokens, cfg.task_tokens.placeholders
    b, l = ids.shape
    nb, n_new = gen.rows_per_prompt, gen.max_new_tokens
    attn = attention_mask.astype(jnp.int32)
    key_mask = jnp.concatenate([attn, jnp.ones((b, n_new), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(attn, axis=1) - 1, 0)
    cache = KVCache.init(cfg.llm, b, l + n_new, jnp.dtype(cfg.dtype))
    out = model(ids, attention_mask=key_mask, visual_mask=visual_mask, frames=frames, positions=positions,
                track_boxes=track_boxes, cache=cache, logits=False, return_vision_features=vision_features)
    logits = model.llm.logits(out.hidden[:, -1]).astype(jnp.float32)

    rep = lambda x, axis=0: jnp.repeat(x, nb, axis=axis)  # noqa: E731  (prompt rows → prompt × beam rows)
    cache = out.cache.replace(keys=rep(out.cache.keys, 1), values=rep(out.cache.values, 1))  # (layers, B, …)
    logits, key_mask = rep(logits), rep(key_mask)
    n_valid = rep(jnp.sum(attn, axis=1))
    r, d, k = b * nb, cfg.llm.hidden_size, gen.max_boxes
    carry = dict(
        s=jnp.zeros((), jnp.int32), cache=cache, logits=logits,
        tokens=jnp.full((r, n_new), gen.pad_id, jnp.int32), lengths=jnp.zeros((r,), jnp.int32),
        done=jnp.zeros((r,), bool), stopped=jnp.zeros((r,), bool), forced=jnp.full((r,), -1, jnp.int32),
        scores=sampling.initial_scores(b, gen), slot_h=jnp.zeros((r, k + 2, d), out.hidden.dtype),
        slot_on=jnp.zeros((r, k + 2), bool), reg_n=jnp.zeros((r,), jnp.int32))
    stop_ids = jnp.asarray(gen.stop_ids or (-1,), jnp.int32)
    training = gen.side_step == "training"

    def llm_step(c, embeds, pos):
        return model.llm(inputs_embeds=embeds, positions=pos[:, None], attention_mask=key_mask, cache=c,
                         logits=False)

    def body(c):
        s = c["s"]
        key = None if rng is None else jax.random.fold_in(rng, s)
        logits = sampling.restrict(c["logits"], c["done"], c["forced"], gen.pad_id)
        origin, tok, scores = sampling.choose(logits, c["scores"], key, gen)
        if nb > 1:  # beams: every per-row state follows the beam it extends
            cache = c["cache"].replace(keys=c["cache"].keys[:, origin], values=c["cache"].values[:, origin])
            c = {**c, "cache": cache, **{n: c[n][origin] for n in (
                "tokens", "lengths", "done", "stopped", "slot_h", "slot_on", "reg_n")}}
        live = ~c["done"]
        tok = jnp.where(live, tok, gen.pad_id).astype(jnp.int32)
        is_stop = live & jnp.isin(tok, stop_ids)
        pos = n_valid + s
        slot_h, slot_on, reg_n = c["slot_h"], c["slot_on"], c["reg_n"]
        begin = _kind(tok, begin_tokens)
        if not training:  # side step at this position with the cache before it; its cache is dropped
            side_rows = live & (begin >= 0)

            def side(_):
                emb = model.embed_inputs(jnp.where(side_rows, _placeholder(begin, placeholders), 0)[:, None])
                return llm_step(c["cache"], emb, pos).hidden[:, 0]

            h = jax.lax.cond(jnp.any(side_rows), side, lambda _: jnp.zeros((r, d), slot_h.dtype), None)
            slot_h, slot_on, reg_n = _store(slot_h, slot_on, reg_n, begin, side_rows, h)
            emb = model.llm.embed(tok[:, None])
        else:
            emb = model.embed_inputs(tok[:, None])
        step = llm_step(c["cache"], emb, pos)
        if training:
            slot_h, slot_on, reg_n = _store(slot_h, slot_on, reg_n, _kind(tok, placeholders), live,
                                            step.hidden[:, 0])
        forced = jnp.where(live & (begin >= 0) & training, _placeholder(begin, placeholders), -1)
        return dict(
            s=s + 1, cache=step.cache, logits=model.llm.logits(step.hidden[:, 0]).astype(jnp.float32),
            tokens=c["tokens"].at[:, s].set(tok), lengths=c["lengths"] + live.astype(jnp.int32),
            done=c["done"] | is_stop, stopped=c["stopped"] | is_stop, forced=forced.astype(jnp.int32),
            scores=scores, slot_h=slot_h, slot_on=slot_on, reg_n=reg_n)

    def cond(c):
        return (c["s"] < n_new) & ~jnp.all(c["done"])

    c = jax.lax.while_loop(cond, body, carry)
    best = sampling.best_rows(c["scores"], c["lengths"], gen)
    pick = lambda x: x[best]  # noqa: E731
    return DecodeOutput(tokens=pick(c["tokens"]), lengths=pick(c["lengths"]), stopped=pick(c["stopped"]),
                        scores=pick(c["scores"]), slot_hidden=pick(c["slot_h"]), slot_on=pick(c["slot_on"]),
                        vision_features=out.vision_features)


@functools.partial(jax.jit, static_argnames=("graphdef", "gen", "vision_features"))
def compiled_decode(graphdef, state, ids, attention_mask, visual_mask, frames, rng, track_boxes=None, *,
                    gen: GenerationConfig, vision_features: bool = False) -> DecodeOutput:
    """`decode_impl` compiled: one compile per (graphdef, settings, input shapes)."""
    return decode_impl(nnx.merge(graphdef, state), ids, attention_mask, visual_mask, frames, rng, gen,
                       vision_features, track_boxes)

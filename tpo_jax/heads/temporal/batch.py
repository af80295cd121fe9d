"""Which rows of a batch the CG-DETR criterion sees, who pairs with whom, and the batch-wide loss counts.

The reference computes its criterion (MODEL-SPEC §6.7) on the batch of one forward pass: its rows are the
samples with temporal inputs, and two of its terms couple rows — the negative pass (§6.3 step 9: each row's
video against the *next* row's query, for the rows whose video id differs from the next row's; the roll wraps
around) and the moment–sentence contrast of `loss_ms_align` (a softmax over the sentence tokens of all rows).

Decision (static shapes, exact gradient accumulation): the batch's rows are cut into consecutive groups of
`cfg.criterion_group` rows (the last group may be shorter), and each group is one criterion batch of the
reference: its *criterion rows* (`temporal_rows`: a temporal example with a `<temp>` token and ≥ 1 target
span) pair and contrast only with each other, in row order. A micro-batch of the train step is a run of
consecutive rows, so whenever `criterion_group` divides the micro-batch size every group lies inside one
micro-batch and the pairing is the same with or without accumulation — and it must lie inside one, because the
partner's query includes its `<temp>` hidden state, which exists only in the micro-batch's forward pass.
Pairing within the micro-batch instead would make the loss depend on the accumulation; a pairing computed by
the data pipeline could not know the micro-batch size.

Every loss term is a sum over units (matched spans, rows, negative rows, moment clips) divided by the number of
those units in the *whole* batch (`temporal_counts`, computed once per step, like every count in
`tpo_jax.losses`). Without `vid` in the batch no row has a negative (the reference without video ids).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from tpo_jax import config as C


def temporal_rows(input_ids: jax.Array, temporal_valid: jax.Array, span_valid: jax.Array,
                  temp_id: int = C.TEMP_ID) -> jax.Array:
    """(B,) bool: the rows the temporal criterion sees (a temporal example with a `<temp>` token — id `temp_id`,
    the model's `task_tokens.temp` — and a span)."""
    return (temporal_valid.astype(bool) & jnp.any(input_ids == temp_id, axis=1)
            & jnp.any(span_valid.astype(bool), axis=1))


def same_group(batch_size: int, group: int) -> jax.Array:
    """(B, B) bool: rows i and j lie in the same group of `group` consecutive rows."""
    g = jnp.arange(batch_size) // group
    return g[:, None] == g[None, :]


def negative_pairs(rows: jax.Array, vid: jax.Array | None, group: int) -> dict[str, jax.Array]:
    """The reference's negative pairs inside each group: the criterion rows of a group in row order, each row's
    partner is the next one (the last wraps to the first; a lone row is its own partner).

    Returns partner (B,) int32 (a row index; the row itself for non-criterion rows), neg (B,) bool (a criterion
    row whose partner's video id differs: the reference's `real_neg_mask`; all False without `vid`) and
    plain_attn (B,) bool (criterion rows of a group without any negative: the rows whose attention rank term the
    reference keeps, see `tpo_jax.heads.temporal.loss.saliency_terms`)."""
    rows = rows.astype(bool)
    b = rows.shape[0]
    idx = jnp.arange(b)
    grp = same_group(b, group)
    member = grp & rows[None, :]  # (i, j): j is a criterion row of i's group
    rank = jnp.sum(member & (idx[None, :] < idx[:, None]), axis=1)  # rank of i among them
    n = jnp.sum(member, axis=1)
    nxt = (rank + 1) % jnp.maximum(n, 1)
    hit = member & (rank[None, :] == nxt[:, None])
    partner = jnp.where(rows & jnp.any(hit, axis=1), jnp.argmax(hit, axis=1), idx).astype(jnp.int32)
    if vid is None:
        neg = jnp.zeros((b,), bool)
    else:
        neg = rows & (partner != idx) & (jnp.take(vid, partner) != vid)
    plain_attn = rows & ~jnp.any(grp & neg[None, :], axis=1)
    return {"partner": partner, "neg": neg, "plain_attn": plain_attn}


def temporal_counts(rows: jax.Array, batch: Mapping[str, jax.Array],
                    cfg: C.TemporalHeadConfig) -> dict[str, jax.Array]:
    """The normalisers of the temporal loss terms, from the whole batch (float32 scalars):
    temporal_spans (matched targets = valid spans of criterion rows), temporal_neg (rows with a negative),
    temporal_plain (criterion rows without one), temporal_plain_attn (criterion rows of groups without any),
    temporal_moment_clips (clips with a positive saliency label in criterion rows). The row count itself is
    `counts["temporal"]` (`tpo_jax.losses.loss_counts`)."""
    rows = rows.astype(bool)
    pairs = negative_pairs(rows, batch.get("vid"), cfg.criterion_group)
    f32 = jnp.float32
    out = {"temporal_spans": jnp.sum(rows[:, None] & batch["span_valid"].astype(bool)).astype(f32),
           "temporal_neg": jnp.sum(pairs["neg"]).astype(f32),
           "temporal_plain": jnp.sum(rows & ~pairs["neg"]).astype(f32),
           "temporal_plain_attn": jnp.sum(pairs["plain_attn"]).astype(f32)}
    if "saliency_labels" in batch:
        out["temporal_moment_clips"] = jnp.sum(rows[:, None] & (batch["saliency_labels"] > 0)).astype(f32)
    return out


__all__ = ["temporal_rows", "same_group", "negative_pairs", "temporal_counts"]

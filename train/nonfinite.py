"""Skip updates that are not finite or explode (inside the jitted step, no host round trip).

`skip_nonfinite(train_step)` wraps a pure `train_step(state, frozen, batch, rng) -> (state, metrics)`
(what `tpo_jax.train.step.make_train_step(..., guard_nonfinite=True)` does). A step is rejected when its
`loss/total` or `grad_norm` is NaN/Inf, when any new parameter or optimizer-state value is NaN/Inf (a finite loss
can come with a NaN update: an LR of `inf × 0`), or when a new parameter's magnitude exceeds `max_param_abs` (an
exploding update, e.g. an LR of 1e30, gives finite but meaningless weights). A rejected step's params and
optimizer state are discarded (`jnp.where` on every leaf) and the old ones returned; the step counter still
advances (the batch was consumed). `metrics["nonfinite"]` is 1 for a rejected step, so the training loop
counts them and stops past a threshold (`NonFiniteError`); no rejected state is ever returned, so none is
ever checkpointed.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

MAX_PARAM_ABS = 1e6  # no weight of a trained model comes near this; an exploding one passes it in a step or two


class NonFiniteError(RuntimeError):
    """Too many steps had a non-finite loss, gradient or update."""


def max_abs(tree) -> jax.Array:
    """The largest |value| over the floating leaves of `tree` (NaN if any is NaN; 0 for none)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    # jnp.max propagates NaN, so one comparison of the result also rejects NaN
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in leaves]))


def skip_nonfinite(train_step: Callable, max_param_abs: float = MAX_PARAM_ABS) -> Callable:
    """`train_step` that keeps the old params / optimizer state when the step is not finite or explodes."""
    def guarded(state, frozen, batch, rng):
        new, metrics = train_step(state, frozen, batch, rng)
        ok = (jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(metrics["grad_norm"])
              & (max_abs(new.params) <= max_param_abs) & (max_abs(new.opt_state) < jnp.inf))
        keep = lambda n, o: jnp.where(ok, n, o)  # noqa: E731
        out = new.replace(params=jax.tree.map(keep, new.params, state.params),
                          opt_state=jax.tree.map(keep, new.opt_state, state.opt_state))
        return out, dict(metrics, nonfinite=jnp.logical_not(ok).astype(jnp.int32))

    return guarded

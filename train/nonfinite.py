"""Reject updates that are not finite or explode (inside the jitted step, no host round trip).

`skip_nonfinite(train_step, max_update_ratio)` wraps a pure `train_step(state, frozen, batch, rng) -> (state,
metrics)` (what `tpo_jax.train.step.make_train_step(..., guard_nonfinite=True)` does). The step's metrics carry
scalars it already computed, and the guard reads only those, so the check costs a few scalar compares:

* `loss/total` and `grad_norm` finite (a NaN in a batch, a gradient overflow: `‖g‖²` overflows to inf first);
* every `lr/<group>` finite (an LR schedule of `inf × 0` is NaN, and a finite loss can come with it);
* `update_norm` (‖Δθ‖ over all trainable params) finite and at most `max_update_ratio × max(‖θ‖, 1)`: an update
  larger than the parameters themselves is an explosion (an LR of 1e30 gives finite but meaningless weights).

A finite gradient keeps Adam's moments finite, and a finite, bounded update of finite params gives finite params,
so these scalars vouch for every leaf of the new state without a reduction over each one (such per-leaf checks
made the sharded step's compile many times larger). A rejected step's params and optimizer state are discarded
(`jnp.where` on every leaf) and the old ones returned; the step counter still advances (the batch was consumed).
`metrics["nonfinite"]` is 1 for a rejected step, so the training loop counts them and stops past a threshold
(`NonFiniteError`); a rejected state is never returned, so none is ever checkpointed.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

MAX_UPDATE_RATIO = 1.0  # ‖Δθ‖ / ‖θ‖ of healthy steps is < 0.1 (docs/reliability.md); an exploding one is ≫ 1


class NonFiniteError(RuntimeError):
    """Too many steps had a non-finite loss, gradient, learning rate or update, or an exploding update."""


def step_ok(metrics, max_update_ratio: float = MAX_UPDATE_RATIO) -> jax.Array:
    """True when the step's loss, gradient norm, learning rates and update norm are finite and the update is
    at most `max_update_ratio` times the parameters' norm (at least 1)."""
    ok = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(metrics["grad_norm"])
    for key, value in metrics.items():
        if key.startswith("lr/"):
            ok &= jnp.isfinite(value)
    update, params = metrics["update_norm"], metrics["param_norm"]
    # `<=` is False for NaN, so one comparison also rejects a NaN or infinite update
    return ok & (update <= max_update_ratio * jnp.maximum(params, 1.0))


def skip_nonfinite(train_step: Callable, max_update_ratio: float = MAX_UPDATE_RATIO) -> Callable:
    """`train_step` that keeps the old params / optimizer state when `step_ok` rejects the step."""
    def guarded(state, frozen, batch, rng):
        new, metrics = train_step(state, frozen, batch, rng)
        ok = step_ok(metrics, max_update_ratio)
        keep = lambda n, o: jnp.where(ok, n, o)  # noqa: E731
        out = new.replace(params=jax.tree.map(keep, new.params, state.params),
                          opt_state=jax.tree.map(keep, new.opt_state, state.opt_state))
        return out, dict(metrics, nonfinite=jnp.logical_not(ok).astype(jnp.int32))

    return guarded

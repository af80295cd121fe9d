"""Skip updates whose loss or gradient is not finite (inside the jitted step, no host round trip).

`skip_nonfinite(train_step)` wraps a pure `train_step(state, frozen, batch, rng) -> (state, metrics)`
(what `tpo_jax.train.step.make_train_step(..., guard_nonfinite=True)` does): when `loss/total` or
`grad_norm` is NaN/Inf, the new params and optimizer state are discarded (`jnp.where` on every leaf)
and the old ones returned; the step counter still advances (the batch was consumed). `metrics["nonfinite"]` is 1 for a skipped step,
so the training loop counts them and stops past a threshold (`NonFiniteError`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


class NonFiniteError(RuntimeError):
    """Too many steps had a non-finite loss or gradient."""


def skip_nonfinite(train_step: Callable) -> Callable:
    """`train_step` that keeps the old params / optimizer state when the loss or gradient is not finite."""
    def guarded(state, frozen, batch, rng):
        new, metrics = train_step(state, frozen, batch, rng)
        ok = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda n, o: jnp.where(ok, n, o)  # noqa: E731
        out = new.replace(params=jax.tree.map(keep, new.params, state.params),
                          opt_state=jax.tree.map(keep, new.opt_state, state.opt_state))
        return out, dict(metrics, nonfinite=jnp.logical_not(ok).astype(jnp.int32))

    return guarded

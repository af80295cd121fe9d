"""The step guard: a rejected update never replaces the state, whatever made it bad."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tpo_jax.train.nonfinite import max_abs, skip_nonfinite
from tpo_jax.train.step import TrainState


def _step(lr):
    """A plain SGD step on loss = sum(w²)/2 (gradient w) whose LR comes from the batch."""
    tx = optax.sgd(1.0)

    def train_step(state, frozen, batch, rng):
        grads = jax.grad(lambda p: 0.5 * jnp.sum(p["w"] ** 2))(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: u * batch["lr"], updates)
        params = optax.apply_updates(state.params, updates)
        loss = 0.5 * jnp.sum(state.params["w"] ** 2)
        return (TrainState(step=state.step + 1, params=params, opt_state=opt_state),
                {"loss/total": loss, "grad_norm": optax.tree.norm(grads)})

    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    return jax.jit(skip_nonfinite(train_step, max_param_abs=1e6)), TrainState(jnp.array(0), params, tx.init(params))


@pytest.mark.parametrize("lr, accepted", [
    (0.5, True),
    (jnp.inf, False),  # a finite loss and gradient, but w - inf·w is ±inf and NaN (inf · 0 in a real LR schedule)
    (jnp.nan, False),
    (-1e7, False),  # finite, but the weights grow past max_param_abs: an exploding update
])
def test_only_finite_bounded_updates_are_taken(lr, accepted):
    step, state = _step(lr)
    new, metrics = step(state, None, {"lr": jnp.float32(lr)}, None)
    assert np.isfinite(float(metrics["loss/total"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["nonfinite"]) == (0 if accepted else 1)
    assert int(new.step) == 1
    expected = np.array([1.0, -2.0, 3.0]) * (1 - lr) if accepted else np.array([1.0, -2.0, 3.0])
    np.testing.assert_allclose(np.asarray(new.params["w"]), expected, rtol=1e-6)


def test_max_abs_sees_nan_and_ignores_integers():
    assert float(max_abs({"a": jnp.array([1.0, -5.0]), "n": jnp.array([10**9])})) == 5.0
    assert np.isnan(float(max_abs({"a": jnp.array([1.0, jnp.nan])})))
    assert float(max_abs({"n": jnp.array([3])})) == 0.0

"""The pure train step: `train_step(state, frozen, batch, rng) -> (state, metrics)`.

* The model is split once into a graphdef, the trainable params of the stage recipe (f32, in
  `TrainState` with the optimizer state) and the frozen params (everything else: no optimizer
  state, passed in unchanged, bit-identical after any number of steps).
* Exact gradient accumulation: the batch is cut into `micro_batches` along its first axis, the
  loss normalisers (label tokens, valid task examples) are counted once on the whole batch, and a
  `lax.scan` sums each micro-batch's `sum / count_total` loss and gradient. The result equals one
  step on the whole batch.
* Global-norm clipping, AdamW with warmup + cosine, per-group learning rates (`train.optim`).
* `state` is donated: its buffers are reused for the new state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from tpo_jax.config import ConfigError, TPOConfig, check_positive
from tpo_jax.losses import HEADS, loss_counts, total_loss
from train.optim import OptimConfig, learning_rates, make_optimizer
from train.stages import StageRecipe, get_recipe, param_group

DEFAULT_LOSS_WEIGHTS = {"lm": 1.0, "region": 1.0, "temporal": 1.0, "mask": 1.0}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    stage: str = "stage1"
    heads: tuple[str, ...] | None = None  # head losses to compute; None: the stage recipe's
    micro_batches: int = 1
    dropout: bool = True
    loss_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def validate(self, prefix: str = "train.") -> "TrainConfig":
        get_recipe(self.stage)
        if self.heads is not None and set(self.heads) - set(HEADS):
            raise ConfigError(f"config field '{prefix}heads': unknown head(s) "
                              f"{sorted(set(self.heads) - set(HEADS))}; known: {list(HEADS)}")
        check_positive(self, prefix, "micro_batches")
        unknown = set(self.loss_weights) - set(DEFAULT_LOSS_WEIGHTS)
        if unknown:
            raise ConfigError(f"config field '{prefix}loss_weights': unknown term(s) {sorted(unknown)}; "
                              f"known: {sorted(DEFAULT_LOSS_WEIGHTS)}")
        self.optim.validate()
        return self


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the trainable parameters
    opt_state: Any


def trainable_filter(recipe: StageRecipe) -> Callable:
    groups = recipe.trainable_groups
    return lambda path, value: isinstance(value, nnx.Param) and param_group(path) in groups


def split_model(model: nnx.Module, recipe: StageRecipe):
    """(graphdef, trainable params, frozen rest) for the stage."""
    return nnx.split(model, trainable_filter(recipe), ...)


def init_train_state(model: nnx.Module, train_cfg: TrainConfig):
    """Split `model` for the stage and build the optimizer: (graphdef, state, frozen, optimizer)."""
    train_cfg.validate()
    recipe = get_recipe(train_cfg.stage)
    graphdef, params, frozen = split_model(model, recipe)
    tx = make_optimizer(recipe, params, train_cfg.optim)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    return graphdef, state, frozen, tx


def _split_micro(batch: Mapping[str, jax.Array], n: int):
    def cut(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} does not split into {n} micro-batches")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return {k: cut(v) for k, v in batch.items()}


def make_grad_fn(graphdef, model_cfg: TPOConfig, train_cfg: TrainConfig):
    """`grad_fn(params, frozen, batch, rng) -> (metrics, grads)` with exact micro-batch accumulation."""
    recipe = get_recipe(train_cfg.stage)
    heads = recipe.heads if train_cfg.heads is None else tuple(train_cfg.heads)
    weights = {k: float(v) for k, v in train_cfg.loss_weights.items()}
    n_micro = train_cfg.micro_batches

    def loss_fn(params, frozen, batch, counts, rng):
        model = nnx.merge(graphdef, params, frozen)
        return total_loss(model, batch, counts, weights, heads, rng=rng if train_cfg.dropout else None)

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def grad_fn(params, frozen, batch, rng):
        counts = loss_counts(batch, model_cfg, heads)
        if n_micro == 1:
            (_, metrics), grads = value_and_grad(params, frozen, batch, counts, rng)
        else:
            micro = _split_micro(batch, n_micro)
            first = jax.tree.map(lambda x: x[0], micro)
            _, metric_shapes = jax.eval_shape(loss_fn, params, frozen, first, counts, rng)
            zeros = (jax.tree.map(jnp.zeros_like, params),
                     jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))

            def body(carry, xs):
                mb, i = xs
                (_, m), g = value_and_grad(params, frozen, mb, counts, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, m)), None

            (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(n_micro)))
        metrics = dict(metrics, **{f"count/{k}": v for k, v in counts.items()})
        return metrics, grads

    return grad_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, model_cfg: TPOConfig, train_cfg: TrainConfig,
                    *, jit: bool = True, donate: bool = True):
    """Build `train_step(state, frozen, batch, rng) -> (state, metrics)` (jitted unless `jit=False`)."""
    recipe = get_recipe(train_cfg.stage)
    grad_fn = make_grad_fn(graphdef, model_cfg, train_cfg)

    def train_step(state: TrainState, frozen, batch, rng):
        metrics, grads = grad_fn(state.params, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                       **learning_rates(recipe, train_cfg.optim, state.step))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if not jit:
        return train_step
    return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def make_eval_step(graphdef, model_cfg: TPOConfig, heads=HEADS,
                   weights: Mapping[str, float] | None = None):
    """Jitted `eval_step(params, frozen, batch) -> metrics` (deterministic, no update)."""
    weights = dict(DEFAULT_LOSS_WEIGHTS if weights is None else weights)

    @jax.jit
    def eval_step(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        counts = loss_counts(batch, model_cfg, heads)
        return total_loss(model, batch, counts, weights, heads)[1]

    return eval_step

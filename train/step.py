"""The pure train step: `train_step(state, frozen, batch, rng) -> (state, metrics)`.

* The model is split once into a graphdef, the trainable params of the stage recipe (f32, in
  `TrainState` with the optimizer state) and the frozen params (everything else: no optimizer
  state, passed in unchanged, bit-identical after any number of steps).
* Exact gradient accumulation: the batch is cut into `micro_batches` along its first axis, the
  loss normalisers (label tokens, valid task examples) are counted once on the whole batch, and a
  `lax.scan` sums each micro-batch's `sum / count_total` loss and gradient. The result equals one
  step on the whole batch.
* Global-norm clipping, AdamW with warmup + cosine, per-group learning rates (`tpo_jax.train.optim`).
* `state` is donated: its buffers are reused for the new state.

Sharded training (`tpo_jax.sharding`): `train_shardings` gives the shapes and shardings of the state
without allocating, `init_sharded` builds the state directly in its shards, and
`make_train_step(..., shardings=...)` jits the same step with explicit in/out shardings and activation
constraints on a device mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from tpo_jax.config import ConfigError, TPOConfig
from tpo_jax.config_fields import check_field, check_positive
from tpo_jax.losses import loss_counts, total_loss
from tpo_jax.model import HEADS, TPOModel, abstract_model
from tpo_jax.sharding import activation_sharding, batch_sharding, replicated, tree_shardings
from tpo_jax.train.nonfinite import MAX_UPDATE_RATIO, skip_nonfinite
from tpo_jax.train.optim import OptimConfig, learning_rates, make_optimizer
from tpo_jax.train.stages import StageRecipe, get_recipe, param_group

DEFAULT_LOSS_WEIGHTS = {"lm": 1.0, "region": 1.0, "temporal": 1.0, "mask": 1.0}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    stage: str = "stage1"
    heads: tuple[str, ...] | None = None  # head losses to compute; None: the stage recipe's
    micro_batches: int = 1
    dropout: bool = True
    loss_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    # > 0: LM logits only at the first `lm_rows` label positions per sample (`count/lm_dropped` counts the
    # label tokens beyond); 0: logits at every position
    lm_rows: int = 0

    def validate(self, prefix: str = "train.") -> "TrainConfig":
        get_recipe(self.stage)
        if self.heads is not None and set(self.heads) - set(HEADS):
            raise ConfigError(f"config field '{prefix}heads': unknown head(s) "
                              f"{sorted(set(self.heads) - set(HEADS))}; known: {list(HEADS)}")
        check_positive(self, prefix, "micro_batches")
        check_field(isinstance(self.lm_rows, int) and self.lm_rows >= 0, prefix + "lm_rows",
                    f"must be an integer >= 0, got {self.lm_rows!r}")
        unknown = set(self.loss_weights) - set(DEFAULT_LOSS_WEIGHTS)
        if unknown:
            raise ConfigError(f"config field '{prefix}loss_weights': unknown term(s) {sorted(unknown)}; "
                              f"known: {sorted(DEFAULT_LOSS_WEIGHTS)}")
        check_field(all(w >= 0 for w in self.loss_weights.values()), prefix + "loss_weights",
                    f"must be >= 0, got {dict(self.loss_weights)}")
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
        return total_loss(model, batch, counts, weights, heads, rng=rng if train_cfg.dropout else None,
                          lm_rows=train_cfg.lm_rows)

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
                    *, shardings: "TrainShardings | None" = None, guard_nonfinite: bool = False,
                    max_update_ratio: float = MAX_UPDATE_RATIO, jit: bool = True, donate: bool = True,
                    keep_unused: bool = False):
    """Build `train_step(state, frozen, batch, rng) -> (state, metrics)` — the one place the step is assembled.

    * `shardings` (from `train_shardings` / `init_sharded`): jit with explicit in/out shardings on its mesh and
      the activation constraints of its rules active; `batch` then holds global arrays
      (`tpo_jax.sharding.shard_batch`) and the metrics come back replicated. None: plain `jax.jit`.
    * `guard_nonfinite`: a step whose loss, gradient, LR or update is not finite, or whose update exceeds
      `max_update_ratio` × the params' norm, keeps the old params and optimizer state
      (`tpo_jax.train.nonfinite.skip_nonfinite`); `metrics["nonfinite"]` counts it.
    * `jit=False` returns the pure function (no jit, no shardings); `donate` donates the state's buffers;
      `keep_unused` keeps arguments the step does not read (frozen heads in stage 1) as compiled parameters,
      so `memory_analysis()` counts everything a device holds.
    """
    recipe = get_recipe(train_cfg.stage)
    grad_fn = make_grad_fn(graphdef, model_cfg, train_cfg)

    def train_step(state: TrainState, frozen, batch, rng):
        metrics, grads = grad_fn(state.params, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates),
                       param_norm=optax.tree.norm(state.params), **learning_rates(recipe, train_cfg.optim, state.step))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    step = skip_nonfinite(train_step, max_update_ratio) if guard_nonfinite else train_step
    if not jit:
        return step
    donate_argnums = (0,) if donate else ()
    if shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums, keep_unused=keep_unused)
    sh = shardings
    return jax.jit(_in_context(step, sh), in_shardings=(sh.state, sh.frozen, sh.batch, sh.replicated),
                   out_shardings=(sh.state, sh.replicated), donate_argnums=donate_argnums, keep_unused=keep_unused)


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


# ------------------------------------------------------------------------------------------------
# Sharded training (tpo_jax.sharding): state created in its shards, step jitted with explicit shardings
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class TrainShardings:
    """Shardings of the train-step arguments and the abstract arrays they describe.

    `abstract_state` / `abstract_frozen` are ShapeDtypeStruct trees carrying their sharding (restore
    targets for a checkpoint loader).
    """

    state: Any  # TrainState of NamedSharding
    frozen: Any
    batch: Any  # NamedSharding, a prefix for the whole batch dict
    replicated: Any  # NamedSharding for the rng and the metrics
    abstract_state: Any = None
    abstract_frozen: Any = None
    mesh: Any = None
    rules: Any = None


def cast_frozen(frozen, model_cfg: TPOConfig):
    """The frozen params in the config's `frozen_param_dtype` (unchanged when it is None)."""
    return _cast_floating(frozen, model_cfg.frozen_param_dtype)


def _cast_floating(tree, dtype):
    if dtype is None:
        return tree
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _with_sharding(abstract, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def train_shardings(model_cfg: TPOConfig, train_cfg: TrainConfig, mesh, rules, seed: int = 0, *,
                    frozen_dtype: str | None = None):
    """Shapes and shardings of the train state, without allocating anything: (graphdef, tx, shardings).

    Shapes come from `nnx.eval_shape`; each array's sharding from its logical axes and `rules`
    (`tpo_jax.sharding.tree_shardings`). `frozen_dtype` as in `init_sharded`.
    """
    train_cfg.validate()
    frozen_dtype = frozen_dtype or model_cfg.frozen_param_dtype
    recipe = get_recipe(train_cfg.stage)
    graphdef, abs_params, abs_frozen = split_model(abstract_model(model_cfg, seed), recipe)
    abs_frozen = jax.eval_shape(lambda f: _cast_floating(f, frozen_dtype), abs_frozen)
    tx = make_optimizer(recipe, abs_params, train_cfg.optim)
    abs_state = jax.eval_shape(lambda p: _new_state(tx, p), abs_params)
    state_sh, frozen_sh = tree_shardings(abs_state, mesh, rules), tree_shardings(abs_frozen, mesh, rules)
    shardings = TrainShardings(
        state=state_sh, frozen=frozen_sh, batch=batch_sharding(mesh), replicated=replicated(mesh),
        abstract_state=_with_sharding(abs_state, state_sh), abstract_frozen=_with_sharding(abs_frozen, frozen_sh),
        mesh=mesh, rules=tuple(rules))
    return graphdef, tx, shardings


def _new_state(tx, params) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def init_sharded(model_cfg: TPOConfig, train_cfg: TrainConfig, mesh, rules, seed: int = 0, *,
                 frozen_dtype: str | None = None):
    """Build the model directly in its shards: (graphdef, state, frozen, tx, shardings).

    The model is built inside `jax.jit(..., out_shardings=...)` (shardings from `train_shardings`),
    so each device computes only its own shard and nothing is materialised whole. `frozen_dtype`
    (e.g. "bfloat16"; default: the config's `frozen_param_dtype`) stores the frozen floating params in
    that dtype; trainable params keep the config's `param_dtype`. Values equal those of `init_train_state(TPOModel(model_cfg, rngs=nnx.Rngs(seed)))`.
    """
    frozen_dtype = frozen_dtype or model_cfg.frozen_param_dtype
    graphdef, tx, sh = train_shardings(model_cfg, train_cfg, mesh, rules, seed, frozen_dtype=frozen_dtype)
    recipe = get_recipe(train_cfg.stage)

    def build():
        _, params, frozen = split_model(TPOModel(model_cfg, rngs=nnx.Rngs(seed)), recipe)
        return _new_state(tx, params), _cast_floating(frozen, frozen_dtype)

    state, frozen = jax.jit(build, out_shardings=(sh.state, sh.frozen))()
    return graphdef, state, frozen, tx, sh


def _in_context(fn, shardings: TrainShardings):
    def wrapped(*args):
        with activation_sharding(shardings.mesh, shardings.rules):
            return fn(*args)
    return wrapped


def make_sharded_grad_fn(graphdef, model_cfg: TPOConfig, train_cfg: TrainConfig, shardings: TrainShardings):
    """Jitted `grad_fn(params, frozen, batch, rng) -> (metrics, grads)` with grads sharded as the params."""
    grad_fn = make_grad_fn(graphdef, model_cfg, train_cfg)
    sh = shardings
    return jax.jit(_in_context(grad_fn, sh), in_shardings=(sh.state.params, sh.frozen, sh.batch, sh.replicated),
                   out_shardings=(sh.replicated, sh.state.params))

"""The tiny model with all three heads memorises one fixed batch of 8 synthetic examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpo_jax.data.synthetic import synthetic_batch
from tpo_jax import config as C
from tpo_jax.model import TPOModel
from tpo_jax.train.optim import OptimConfig
from tpo_jax.train.step import TrainConfig, init_train_state, make_train_step

STEPS = 140


@pytest.mark.slow
def test_tiny_model_overfits_one_batch():
    cfg = C.get_config("tiny")
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 4, seed=1).items()}
    # logits at the label rows only (equal to full logits: test_train_step), ~2x faster here
    train_cfg = TrainConfig(stage="stage3", dropout=False, lm_rows=32,
                            optim=OptimConfig(total_steps=STEPS, warmup_ratio=0.05, lr_scale=100.0))
    graphdef, state, frozen, tx = init_train_state(TPOModel(cfg, rngs=nnx.Rngs(0)), train_cfg)
    step = make_train_step(graphdef, tx, cfg, train_cfg)
    history = []
    for i in range(STEPS):
        state, metrics = step(state, frozen, batch, jax.random.key(i))
        history.append({k: float(v) for k, v in metrics.items()})
    first, last = history[0], history[-1]
    assert all(np.isfinite(h["loss/total"]) for h in history)
    assert first["count/lm_dropped"] == 0
    assert last["loss/total"] <= 0.1 * first["loss/total"], (first["loss/total"], last["loss/total"])
    assert last["region/l1"] < 0.05, last["region/l1"]
    assert last["temporal/loss_span"] < 0.05, last["temporal/loss_span"]
    assert last["loss/mask"] < 0.1 * first["loss/mask"], (first["loss/mask"], last["loss/mask"])

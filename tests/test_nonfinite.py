"""The non-finite guard (train/nonfinite.py): an LR of inf / NaN, a NaN batch, a gradient overflow and an exploding
LR never reach the parameters or a checkpoint; the run's exit status and message say what happened."""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest

from tpo_jax.checkpoints.manager import CheckpointManager, abstract_like
from tpo_jax.cli.train import train_main
from tpo_jax.config import ConfigError
from tpo_jax.data.pipeline import make_train_iterator
from tpo_jax.overrides import apply_overrides
from tpo_jax.train import trainer as T
from tpo_jax.train import workdir as W
from tpo_jax.train.optim import make_optimizer
from tpo_jax.train.run_config import get_run_config
from tpo_jax.train.stages import get_recipe
from tpo_jax.train.step import TrainState, make_train_step
from tpo_jax.tree_paths import leaf_paths

BASE = ["stage1.steps=8", "checkpoint.every_steps=2", "checkpoint.keep=10", "data.batch_size=2", "devices=1",
        "eval.enabled=false"]


def _cfg(*extra):
    return apply_overrides(get_run_config("tiny"), BASE + list(extra))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """(trainer, graphdef, state, frozen, a good batch) of the tiny stage 1 at initialisation."""
    cfg = _cfg()
    trainer = T.Trainer(cfg, str(tmp_path_factory.mktemp("guard")), progress=False)
    graphdef, state, frozen, _, _ = trainer.build_stage("stage1")
    return trainer, graphdef, state, frozen, next(make_train_iterator(cfg.data, cfg.model, "stage1"))


def _guarded_step(trainer, graphdef, params, *, lr_scale=1.0, loss_weights=None):
    """A guarded, jitted stage-1 step whose optimizer uses `lr_scale` (not validated: inf and NaN get through)
    and whose loss uses `loss_weights`; with a fresh state at step 0."""
    train_cfg = trainer.cfg.train_config("stage1")
    optim = dataclasses.replace(train_cfg.optim, lr_scale=lr_scale)
    train_cfg = dataclasses.replace(train_cfg, optim=optim, loss_weights=loss_weights or train_cfg.loss_weights)
    tx = make_optimizer(get_recipe(train_cfg.stage), params, optim)
    state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params))
    step = make_train_step(graphdef, tx, trainer.cfg.model, train_cfg, guard_nonfinite=True, donate=False)
    return step, state


def _same(a, b):
    for (path, x), (_, y) in zip(leaf_paths(a), leaf_paths(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)


@pytest.mark.parametrize("lr_scale", [math.inf, math.nan])
def test_an_inf_or_nan_learning_rate_is_rejected(stage1, lr_scale):
    trainer, graphdef, state0, frozen, batch = stage1
    step, state = _guarded_step(trainer, graphdef, state0.params, lr_scale=lr_scale)
    for i in range(3):  # step 0 is warmup: LR = peak × 0 = NaN; then inf / NaN
        new, metrics = step(state, frozen, batch, jax.random.key(i))
        lrs = [float(v) for k, v in metrics.items() if k.startswith("lr/")]
        assert int(metrics["nonfinite"]) == 1 and not all(np.isfinite(lrs)), (i, lrs)
        assert np.isfinite(float(metrics["loss/total"]))  # the loss alone would have let this update through
        _same(new.params, state0.params)
        _same(new.opt_state, state.opt_state)
        state = new


def test_a_gradient_overflow_with_a_finite_loss_is_rejected(stage1):
    trainer, graphdef, state0, frozen, batch = stage1
    # the LM loss (~10) × 1e37 is finite in f32, its gradient's squared norm is not
    step, state = _guarded_step(trainer, graphdef, state0.params,
                                loss_weights={"lm": 1e37, "region": 1.0, "temporal": 1.0, "mask": 1.0})
    new, metrics = step(state, frozen, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss/total"])) and not np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["nonfinite"]) == 1
    _same(new.params, state0.params)
    _same(new.opt_state, state.opt_state)


def test_healthy_steps_pass_with_a_wide_margin(stage1):
    """The guard's explosion bound (max_update_ratio=1) against the update / params norm ratio of real steps."""
    trainer, graphdef, state0, frozen, batch = stage1
    step, state = _guarded_step(trainer, graphdef, state0.params)
    ratios = []
    for i in range(4):
        state, metrics = step(state, frozen, batch, jax.random.key(i))
        assert int(metrics["nonfinite"]) == 0
        ratios.append(float(metrics["update_norm"]) / max(float(metrics["param_norm"]), 1.0))
    assert ratios[0] == 0.0 and 0 < max(ratios) < 0.05, ratios  # warmup's first LR is 0, then small steps


def _checkpoint_values(workdir, cfg):
    """{step: [every saved param and optimizer-state array]} of the stage-1 checkpoints in `workdir`."""
    _, state, frozen, _, _ = T.Trainer(cfg, workdir, progress=False).build_stage("stage1")
    target = W.params_of_groups(abstract_like(state.params), abstract_like(frozen), W.trained_groups(cfg, "stage1"))
    out = {}
    with CheckpointManager(os.path.join(workdir, "stage1", "checkpoints")) as m:
        for s in m.all_steps():
            got = m.restore(s, params=target, state={"step": abstract_like(state.step),
                                                     "opt_state": abstract_like(state.opt_state)})
            out[s] = [np.asarray(x) for x in jax.tree.leaves((got["params"], got["state"]))]
    return out


def _history(workdir):
    with open(os.path.join(workdir, "stage1", "history.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_an_exploding_lr_stops_the_run_and_no_checkpoint_holds_it(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    args = [a for o in BASE + ["optim.lr=1e30", "max_nonfinite=2"] for a in ("--set", o)]
    assert train_main(["--workdir", workdir, "--stages", "1", "--no-progress"] + args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tpo-train: training stopped: stage1: 3 steps had a non-finite loss, "
                                               "gradient, LR or update, or an update above max_update_ratio"), err
    assert "the last at step 4" in err[0] and "Last checkpoint: step 2" in err[0]
    history = _history(workdir)
    assert [h["nonfinite_total"] for h in history] == [0, 1, 2, 3]  # step 1 is warmup's LR 0, then 1e30 / 6 ...
    assert all(h["update_norm"] > 1e20 * h["param_norm"] for h in history[1:])
    saved = _checkpoint_values(workdir, _cfg("optim.lr=1e30", "max_nonfinite=2"))
    assert list(saved) == [2]
    assert all(np.isfinite(a).all() and np.abs(a).max() < 100 for a in saved[2])


def test_a_run_with_skipped_steps_finishes_with_exit_status_3(tmp_path, capsys, monkeypatch):
    original = T.make_train_iterator

    class OneNaNBatch:  # the 3rd batch has NaN frames
        def __init__(self, *args):
            self.it, self.n = original(*args), 0

        def __next__(self):
            batch, self.n = next(self.it), self.n + 1
            return dict(batch, frames=np.full_like(batch["frames"], np.nan)) if self.n == 3 else batch

        def get_state(self):
            return self.it.get_state()

    monkeypatch.setattr(T, "make_train_iterator", OneNaNBatch)
    workdir = str(tmp_path / "run")
    args = [a for o in BASE for a in ("--set", o)]
    assert train_main(["--workdir", workdir, "--stages", "1", "--no-progress"] + args) == 3
    out = capsys.readouterr()
    assert "stage1: warning: 1 step(s) were skipped" in out.out
    assert "tpo-train: finished, but 1 step(s) were skipped" in out.err and "exit status 3" in out.err
    assert [h["nonfinite_total"] for h in _history(workdir)] == [0, 0, 1, 1, 1, 1, 1, 1]
    saved = _checkpoint_values(workdir, _cfg())
    assert list(saved) == [2, 4, 6, 8]
    assert all(np.isfinite(a).all() for arrays in saved.values() for a in arrays)
    with CheckpointManager(os.path.join(workdir, "stage1", "checkpoints")) as m:
        assert m.read_json(8)["meta"]["nonfinite"] == 1


def test_non_finite_numbers_in_the_config_are_one_clear_error(tmp_path, capsys):
    for override, message in [
            ("optim.lr=nan", "config field 'optim.lr': cannot read 'nan' as a finite number"),
            ("stage1.lr_scale=inf", "config field 'stage1.lr_scale': cannot read 'inf' as a finite number"),
            ("max_update_ratio=0", "config field 'max_update_ratio': must be a finite number > 0")]:
        assert train_main(["--workdir", str(tmp_path / "w"), "--set", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"tpo-train: error: {message}" + err[0].split(message, 1)[1]] and message in err[0], err
    # each factor finite, their product not: the peak LR overflows
    with pytest.raises(ConfigError, match=r"config field 'stage1\.lr_scale': the peak learning rates of stage1 are "
                                          r"not finite numbers: .*inf"):
        _cfg("optim.lr_scale=1e200", "stage1.lr_scale=1e200")
    assert not os.path.exists(tmp_path / "w")

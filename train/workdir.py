"""A training run's work directory: which stage checkpoints it holds, whether they belong to this config,
and loading a stage's parameters back into a train state (`restore_params`) or a model's parameter tree
(`restore_groups`; `tpo_jax.train.load` loads a whole model for inference).

    WORKDIR/<stage>/checkpoints/   Orbax checkpoints (`tpo_jax.checkpoints.manager`) of each stage

A checkpoint of a stage holds the parameters of every group trained up to it (`trained_groups`), so the next
stage and evaluation load exactly those (`restore_params`); everything else keeps its initial value.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from tpo_jax.checkpoints.manager import CheckpointManager, abstract_like
from tpo_jax.config import ConfigError
from tpo_jax.train.run_config import STAGES, RunConfig, from_dict
from tpo_jax.train.stages import get_recipe, param_group
from tpo_jax.tree_paths import leaf_paths, nest, replace_by_path

# config sections a checkpoint depends on; the others (logging, eval, checkpoint cadence, mesh) may change
IDENTITY_FIELDS = ("model", "data", "optim", "seed", "init_from", "micro_batches", "dropout", "loss_weights")


def trained_groups(cfg: RunConfig, stage: str) -> frozenset[str]:
    """Parameter groups trained by `stage` or any stage before it, by the recipes `cfg` runs them with
    (what its checkpoint stores)."""
    out: set[str] = set()
    for name in STAGES[:STAGES.index(stage) + 1]:
        out |= get_recipe(cfg.stage(name).recipe).trainable_groups
    return frozenset(out)


def stage_identity(cfg_dict: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The part of a config that a checkpoint of `stage` depends on."""
    out = {k: cfg_dict[k] for k in IDENTITY_FIELDS}
    out.update({s: cfg_dict[s] for s in STAGES[:STAGES.index(stage) + 1]})
    return out


def with_defaults(cfg_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """A saved config with the fields added since it was written filled in at their defaults (as is, if it
    no longer parses: the diff then names what differs)."""
    try:
        return from_dict(RunConfig, cfg_dict).to_dict()
    except (ConfigError, TypeError, ValueError):
        return cfg_dict


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """`key: a != b` for every leaf where two JSON-like trees differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += config_diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} (checkpoint) != {b!r} (this run)"]


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


def open_manager(workdir: str, stage: str, cfg: RunConfig, read_only: bool = False) -> CheckpointManager:
    return CheckpointManager(os.path.join(stage_dir(workdir, stage), "checkpoints"), cfg.checkpoint,
                             read_only=read_only)


def existing_steps(workdir: str, stage: str, cfg: RunConfig) -> list[int]:
    if not os.path.isdir(os.path.join(stage_dir(workdir, stage), "checkpoints")):
        return []
    mngr = open_manager(workdir, stage, cfg, read_only=True)
    try:
        return mngr.all_steps()
    finally:
        mngr.close()


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON at `path`, atomically (numpy scalars and arrays allowed)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default, allow_nan=True)
    os.replace(tmp, path)


def check_workdir(cfg: RunConfig, workdir: str, stages: Sequence[str], resume: bool) -> dict[str, list[int]]:
    """One clear ConfigError when `workdir` cannot serve this run: not a directory, a checkpoint of another
    config, a stage with checkpoints but no `resume`, or a missing previous-stage checkpoint (a run with
    `init_from` may start at a later stage when the earlier one has no checkpoint at all). Returns the
    checkpoint steps of every stage that has some."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"work directory {workdir} is a file; --workdir takes a directory (a new one, or the "
                          f"work directory of an earlier tpo-train run)")
    current = cfg.to_dict()
    have = {}
    for stage in STAGES:
        steps = existing_steps(workdir, stage, cfg)
        if not steps:
            continue
        have[stage] = steps
        mngr = open_manager(workdir, stage, cfg, read_only=True)
        try:
            saved = with_defaults(mngr.read_json(steps[-1])["config"])
        finally:
            mngr.close()
        diff = config_diff(stage_identity(saved, stage), stage_identity(current, stage))
        if diff:
            raise ConfigError(
                f"work directory {workdir} holds a {stage} checkpoint (step {steps[-1]}) of another config: "
                + "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
                + ". Use a new --workdir, or the checkpoint's config.")
        if stage in stages and not resume:
            raise ConfigError(f"work directory {workdir} already holds {stage} checkpoints (steps {steps}); pass "
                              f"--resume to continue them, or use a new --workdir")
    first = min(STAGES.index(s) for s in stages)
    if first > 0:
        prev = STAGES[first - 1]
        steps = existing_steps(workdir, prev, cfg)
        need = cfg.stage(prev).steps
        if not steps and cfg.init_from:
            pass  # no earlier stage here: the stage starts from the init_from weights (e.g. a released TPO model)
        elif need not in steps:
            have = f"it has steps {steps}" if steps else "there is none"
            raise ConfigError(
                f"{STAGES[first]} starts from the final {prev} checkpoint (step {need}) in "
                f"{os.path.join(stage_dir(workdir, prev), 'checkpoints')}, but {have}; run --stages "
                f"{prev[-1]} first (add --resume to finish a stopped one), or --stages all")
    return have


def group_of(path: tuple[str, ...]) -> str | None:
    try:
        return param_group(path)
    except KeyError:
        return None


def params_of_groups(params, frozen, groups) -> dict:
    """Nested dict (by model path) of the leaves of `params` and `frozen` in parameter `groups`."""
    flat = {p: x for tree in (params, frozen) for p, x in leaf_paths(tree) if group_of(p) in groups}
    return nest(flat)


def restore_groups(mngr: CheckpointManager, step: int, params, frozen, groups, **items):
    """Load the parameters of `groups` saved at `step` into the trees `params` / `frozen` (each array straight
    into the sharding it has there), and the other checkpoint `items` given as abstract targets.
    Returns (params, frozen, everything restored)."""
    target = params_of_groups(abstract_like(params), abstract_like(frozen), groups)
    got = mngr.restore(step, params=target, **items)
    return replace_by_path(params, got["params"]), replace_by_path(frozen, got["params"]), got


def restore_params(mngr: CheckpointManager, step: int, state, frozen, groups, *, opt_state: bool = False):
    """Load the parameters of `groups` saved at `step` into `state.params` / `frozen` (`restore_groups`); with
    `opt_state` also the step counter and optimizer state (a resume). Returns (state, frozen, meta of the
    checkpoint)."""
    items = {}
    if opt_state:
        items["state"] = {"step": abstract_like(state.step), "opt_state": abstract_like(state.opt_state)}
    params, frozen, got = restore_groups(mngr, step, state.params, frozen, groups, **items)
    state = state.replace(params=params)
    if opt_state:
        state = state.replace(step=got["state"]["step"], opt_state=got["state"]["opt_state"])
    return state, frozen, got.get("meta")


def find_checkpoint(workdir: str, run: RunConfig, stage: str | None = None, step: int | None = None):
    """(stage, step) of the checkpoint to load from a work directory: default the last stage that has one, and
    its latest step; a ConfigError that lists what there is when the asked one is missing."""
    have = [s for s in STAGES if existing_steps(workdir, s, run)]
    if not have:
        raise ConfigError(f"no checkpoint in the work directory {workdir} (looked in <stage>/checkpoints for "
                          f"{list(STAGES)})")
    stage = stage or have[-1]
    steps = existing_steps(workdir, stage, run) if stage in STAGES else []
    if not steps or (step is not None and step not in steps):
        raise ConfigError(f"no {stage} checkpoint{'' if step is None else f' of step {step}'} in {workdir}; "
                          f"have {', '.join(f'{s} {existing_steps(workdir, s, run)}' for s in have)}")
    return stage, steps[-1] if step is None else step

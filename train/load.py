"""Loading trained weights: a whole TPO model for inference (from a `tpo-train` work directory or a `tpo-convert
videochat` output), a stage checkpoint into the trainer's state (`restore_checkpoint`), and `tpo-eval`
(`evaluate_checkpoint`).

    source = resolve_checkpoint("runs/tiny", ["model.dtype=bfloat16"], stage="stage2")  # checks; loads nothing
    model = source.load()                                                                 # a TPOModel
    source.cfg, source.info                      # the model config; {"kind", "path", ("stage", "step")}

* A work directory (`config.json` + `<stage>/checkpoints`) is loaded as `tpo-eval` loads it: the model is
  initialised with the run's seed, its `init_from` weights are read over it, and the parameter groups trained
  up to the stage are restored
  (`tpo_jax.train.workdir.restore_groups`); default: the last stage that has a checkpoint, its latest step.
* A converted directory (`conversion.json` + `params/`) is restored whole (`load_params`); a converted
  Hugging Face LLM alone is refused.
* `overrides` are model-config `KEY=VALUE`s (with or without the `model.` prefix) that keep the weights
  (`dtype=bfloat16`); a change of any other model field is the error "… holds a model of another config:
  <field>: <checkpoint> (checkpoint) != <asked> (this run)".

Every error is a `ConfigError` that names the directory, the stage / step or the field.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

from flax import nnx

from tpo_jax.attention import check_config as check_attention
from tpo_jax.config import ConfigError, TPOConfig
from tpo_jax.model import TPOModel
from tpo_jax.overrides import apply_overrides
from tpo_jax.train import init_from
from tpo_jax.train.run_config import STAGES, RunConfig, load_run_config
from tpo_jax.train.trainer import Trainer
from tpo_jax.train.workdir import (config_diff, find_checkpoint, open_manager, restore_groups, restore_params,
                                   stage_identity, trained_groups, with_defaults)


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """A checked checkpoint directory: the model config it holds, what it is, and how to load it."""
    cfg: TPOConfig
    info: dict[str, Any]  # {"kind": "workdir" | "converted", "path", and for a work directory "stage", "step"}
    loader: Callable[[], TPOModel] = dataclasses.field(repr=False)

    def load(self) -> TPOModel:
        """The model with the checkpoint's weights."""
        return self.loader()


def _model_diff(saved: dict, wanted: dict, prefix: str) -> list[str]:
    """Differences of two model config dicts that matter for the weights (the compute dtype does not)."""
    strip = lambda d: {k: v for k, v in d.items() if k != "dtype"}  # noqa: E731
    return config_diff(strip(saved), strip(wanted), prefix)


def _check_same(where: str, saved: dict, wanted: dict, prefix: str) -> None:
    diff = _model_diff(saved, wanted, prefix)
    if diff:
        raise ConfigError(f"{where} holds a model of another config: " + "; ".join(diff[:6])
                          + (f"; and {len(diff) - 6} more" if len(diff) > 6 else ""))


def resolve_checkpoint(path: str, overrides: Sequence[str] = (), stage: str | None = None,
                       step: int | None = None) -> CheckpointSource:
    """Check a checkpoint directory (module docstring) and return its `CheckpointSource`; the weights are read
    by `CheckpointSource.load`."""
    if os.path.isfile(os.path.join(path, "conversion.json")):
        return _converted(path, [o.removeprefix("model.") for o in overrides])
    if os.path.isfile(os.path.join(path, "config.json")):
        run = apply_overrides(load_run_config(os.path.join(path, "config.json")),
                              [o if o.startswith("model.") else f"model.{o}" for o in overrides])
        stage, step = find_checkpoint(path, run, stage, step)
        return CheckpointSource(run.model, {"kind": "workdir", "path": path, "stage": stage, "step": step},
                                lambda: _load_workdir(path, run, stage, step))
    raise ConfigError(f"{path}: neither a tpo-train work directory (config.json) nor a converted checkpoint "
                      f"(conversion.json)")


def load_model(path: str, overrides: Sequence[str] = (), stage: str | None = None,
               step: int | None = None) -> tuple[TPOModel, dict[str, Any]]:
    """(model, info) of a checkpoint directory: `resolve_checkpoint(...).load()` and its `info`."""
    source = resolve_checkpoint(path, overrides, stage, step)
    check_attention(source.cfg)
    return source.load(), source.info


def _converted(path: str, overrides: Sequence[str]) -> CheckpointSource:
    from tpo_jax.checkpoints.configs import to_dict  # noqa: PLC0415
    from tpo_jax.checkpoints.configs import model_config, read_report  # noqa: PLC0415
    report = read_report(path)
    if report.get("format") != "videochat":
        raise ConfigError(f"{path} is a converted {report.get('format')!r} checkpoint (an LLM only); a whole TPO "
                          f"model comes from tpo-convert videochat or a tpo-train work directory")
    saved = model_config(report)
    cfg = apply_overrides(saved, list(overrides))
    _check_same(f"the converted checkpoint {path}", to_dict(saved), to_dict(cfg), "")
    return CheckpointSource(cfg, {"kind": "converted", "path": path}, lambda: _load_converted(path, cfg))


def _load_converted(path: str, cfg: TPOConfig) -> TPOModel:
    from tpo_jax.checkpoints.orbax_io import load_params  # noqa: PLC0415
    from tpo_jax.model import abstract_model  # noqa: PLC0415
    graphdef, abstract = nnx.split(abstract_model(cfg))
    return nnx.merge(graphdef, load_params(path, abstract))


def _load_workdir(path: str, run: RunConfig, stage: str, step: int) -> TPOModel:
    """As `tpo-eval`: the model initialised with the run's seed, the groups trained up to `stage` restored."""
    with open_manager(path, stage, run, read_only=True) as mngr:
        saved = with_defaults(mngr.read_json(step)["config"])["model"]
        _check_same(f"the {stage} checkpoint (step {step}) in {path}", saved, run.to_dict()["model"], "model.")
        model = TPOModel(run.model, rngs=nnx.Rngs(run.seed))
        params = nnx.state(model, nnx.Param)
        if run.init_from:  # the pretrained weights the run started from, under what it trained
            (params,) = init_from.load_init(init_from.prepare(run.init_from, params), params)
        params, _, _ = restore_groups(mngr, step, params, {}, trained_groups(run, stage))
        nnx.update(model, params)
    return model


def export_params(path: str, stage: str | None = None, step: int | None = None):
    """A `tpo_jax.checkpoints.export.ParamSet` of a work directory's model (`resolve_checkpoint`: its init and
    `init_from` weights under the groups trained up to `stage`), with the extras (SAM2, unused modules) of the
    converted VideoChat-TPO checkpoints among its `init_from` sources, so `export_videochat` writes the
    released key set. The model is loaded on this host (one process reads a checkpoint written by any number)."""
    from tpo_jax.checkpoints.export import ParamSet  # noqa: PLC0415
    from tpo_jax.checkpoints.orbax_io import load_extras  # noqa: PLC0415
    source = resolve_checkpoint(path, stage=stage, step=step)
    if source.info["kind"] != "workdir":
        raise ConfigError(f"{path} is a converted checkpoint; tpo-convert exports it directly")
    model = source.load()
    run = load_run_config(os.path.join(path, "config.json"))
    extras: dict = {}
    for s in init_from.resolve_sources(run.init_from):
        if s.kind == "videochat":
            for group, arrays in load_extras(s.params_dir.parent).items():
                extras.setdefault(group, {}).update(arrays)
    return ParamSet.from_state(nnx.state(model, nnx.Param), source.cfg, extras)


def restore_checkpoint(cfg: RunConfig, workdir: str, *, stage: str | None = None, step: int | None = None,
                       trainer: Trainer | None = None):
    """(stage, step, graphdef, params, frozen) of a stage's checkpoint in `workdir` (default: the last stage that
    has one, its latest step), placed on the trainer's mesh; `nnx.merge(graphdef, params, frozen)` is the model.
    The checkpoint must come from the same config (`cfg`, e.g. `load_run_config(WORKDIR/config.json)`)."""
    trainer = trainer or Trainer(cfg, workdir, progress=False)
    stage, step = find_checkpoint(workdir, cfg, stage, step)
    graphdef, state, frozen, _, _ = trainer.build_stage(stage)
    with open_manager(workdir, stage, cfg, read_only=True) as mngr:
        saved = with_defaults(mngr.read_json(step)["config"])
        diff = config_diff(stage_identity(saved, stage), stage_identity(cfg.to_dict(), stage))
        if diff:
            raise ConfigError(f"the {stage} checkpoint (step {step}) in {workdir} was trained with another config: "
                              + "; ".join(diff[:8]))
        state, frozen, _ = restore_params(mngr, step, state, frozen, trained_groups(cfg, stage))
    return stage, step, graphdef, state.params, frozen


def evaluate_checkpoint(cfg: RunConfig, workdir: str, *, stage: str | None = None, step: int | None = None,
                        init: bool = False, accumulator=None, mode: str = "both") -> dict[str, Any]:
    """`tpo-eval`: metrics of a stage's checkpoint (`restore_checkpoint`), or of the freshly initialised model
    (`init`): teacher-forced, of the generated answers (`gen/...`), or both (`mode`, as
    `tpo_jax.train.evaluate.evaluate`). An empty `tpo_jax.train.metric_accumulator.MetricAccumulator` passed as
    `accumulator` keeps the teacher-forced per-example predictions."""
    trainer = Trainer(cfg, workdir, progress=False)
    if init:
        graphdef, state, frozen, _, _ = trainer.build_stage(STAGES[0])
        return {"stage": None, "step": 0,
                "metrics": trainer.evaluate(graphdef, state.params, frozen, accumulator, mode)}
    stage, step, graphdef, params, frozen = restore_checkpoint(cfg, workdir, stage=stage, step=step, trainer=trainer)
    return {"stage": stage, "step": step, "metrics": trainer.evaluate(graphdef, params, frozen, accumulator, mode)}


__all__ = ["CheckpointSource", "evaluate_checkpoint", "export_params", "load_model", "resolve_checkpoint",
           "restore_checkpoint"]

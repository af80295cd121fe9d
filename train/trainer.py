"""The training job: evaluation before, stages 1 → 2 → 3 with checkpoints, evaluation after, reports.

    summary = run(get_run_config("tiny"), "runs/tiny")                 # what `tpo-train` does
    summary = run(cfg, workdir, stages=("stage2",), resume=True)

Work directory (`tpo_jax.train.workdir` checks it and loads stage checkpoints back):

    WORKDIR/config.json               the resolved run config
    WORKDIR/init_from.json            with `init_from`: what was loaded from which source, what was initialised
    WORKDIR/metrics.json              {"before", "after", "improvement", "stages": {stage: metrics}}, and
                                      "during" (a list) with eval.every_steps; with eval.generate the final
                                      evaluation ("after", and its stage) also scores generated answers
                                      (the `gen/...` keys, tpo_jax.train.evaluate_generate)
    WORKDIR/<stage>/checkpoints/      Orbax checkpoints (tpo_jax.checkpoints.manager) of each stage
    WORKDIR/<stage>/history.jsonl     per-step training metrics
    WORKDIR/tensorboard/              TensorBoard scalars (every loss term, LRs, grad norm, tokens/s, TFLOP/s and MFU, evals)
    WORKDIR/curves.png, metrics.png   training curves; before/after metrics
    WORKDIR/profile/<stage>/          with `profile_steps`: a jax.profiler trace of those steps

Each stage starts from the model initialised with `cfg.seed` (built once on the host and put into its shards
on the mesh `cfg.mesh` with the rules `cfg.sharding`; with `cfg.sharded_init` created directly in its shards by
`tpo_jax.train.step.init_sharded`) with the pretrained weights of `cfg.init_from` read over it
(`tpo_jax.train.init_from`; checked and read before anything is written), loads the previous stage's final
checkpoint (every parameter trained so far; with `init_from`, a stage whose previous stage has no checkpoint
here starts from those weights), and trains its recipe. A checkpoint holds the parameters of every group
trained up to this stage, the optimizer state and step, the data-iterator state and the config: `resume=True` continues
a stage exactly where it stopped (same batches, same dropout keys, bit-identical losses on CPU).
SIGTERM or Ctrl-C finishes the current step, saves, and returns (a second Ctrl-C aborts at once); `resume=True`
skips stages that are finished and evaluated, and returns at once when all are. A step with a non-finite loss, gradient,
LR or update, or an update above `cfg.max_update_ratio` × the params' norm, keeps the old parameters
(`tpo_jax.train.nonfinite`); more than `cfg.max_nonfinite` of them stop the run, and a run that finishes with some
reports them (`summary["skipped_steps"]`; `tpo-train` exits with status 3).
Only process 0 writes files and logs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax.data.pipeline import eval_batches, make_train_iterator
from tpo_jax import sharding as S
from tpo_jax.attention import check_config as check_attention
from tpo_jax.config import ConfigError
from tpo_jax.train import chips, flops, report
from tpo_jax.train.distributed import is_main_process
from tpo_jax.train.evaluate import evaluate, make_predict_fn
from tpo_jax.train.evaluate_generate import short as short_generated
from tpo_jax.train.gc_schedule import GcSchedule
from tpo_jax.train import init_from
from tpo_jax.train.metrics import improvement
from tpo_jax.train.nonfinite import NonFiniteError
from tpo_jax.train.run_config import STAGES, RunConfig
from tpo_jax.train.stages import get_recipe
from tpo_jax.model import TPOModel
from tpo_jax.train.optim import make_optimizer
from tpo_jax.train.step import (TrainShardings, TrainState, cast_frozen, init_sharded, make_train_step,
                                split_model)
from tpo_jax.train.workdir import (check_workdir, existing_steps, open_manager, params_of_groups, restore_params,
                                   stage_dir, trained_groups, write_json)

log = logging.getLogger("tpo.train")

EVAL_TASKS = ("mc", "mc_cloze", "temporal", "region", "mask")


class TrainingError(RuntimeError):
    """The run cannot go on (stopped by non-finite losses, a broken work directory, ...)."""


# --- compiled functions, shared by the runs of one process --------------------------------------------------------------

# A training process (a test session, a notebook) often builds the same stage many times: the jitted step and
# predict function are kept per (kind, model config, train config, mesh, rules), so each is traced and compiled
# once. Configs hold dicts (not hashable), so their repr is the key.
_COMPILED: dict[tuple, Any] = {}
_REJECTED = "a non-finite loss, gradient, LR or update, or an update above max_update_ratio × the params' norm"


def _cached(key: tuple, build):
    if key not in _COMPILED:
        _COMPILED[key] = build()
    return _COMPILED[key]


def _mesh_key(mesh) -> tuple:
    return tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat)


# --- the run -------------------------------------------------------------------------------------------------------

class Trainer:
    """One training job over a work directory (see the module docstring)."""

    def __init__(self, cfg: RunConfig, workdir: str, *, progress: bool = True):
        self.cfg = cfg.validate()
        self.workdir = os.path.abspath(workdir)
        self.progress = progress
        self.main = is_main_process()
        devices = jax.devices()
        if cfg.devices:
            if cfg.devices > len(devices):
                raise ConfigError(f"config field 'devices': {cfg.devices} devices asked, {len(devices)} available")
            devices = devices[:cfg.devices]
        self.mesh = S.make_mesh(cfg.mesh, devices)
        self.rules = S.get_rules(cfg.sharding)
        check_attention(cfg.model, devices[0].platform)
        self.stop_requested: str | None = None
        self.writer = None
        self._eval_batches = None
        self._init_plan: init_from.InitPlan | None = None
        self._prebuilt: tuple[str, Any] | None = None  # a stage built (weights loaded) before anything was written
        self.metrics_path = os.path.join(self.workdir, "metrics.json")

    # files and logs (process 0 only)
    def _log(self, msg: str) -> None:
        if self.main:
            log.info(msg)
            print(msg, flush=True)

    def _scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():  # TensorBoard tags allow [A-Za-z0-9_./-]: "r1@0.5" → "r1_0.5"
                self.writer.add_scalar(f"{prefix}/{k}".replace("@", "_"), float(v), step)

    def _load_metrics(self) -> dict:
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                return json.load(f)
        return {}

    def _save_metrics(self, metrics: dict) -> None:
        if self.main:
            write_json(self.metrics_path, metrics)

    def global_offset(self, stage: str) -> int:
        return sum(self.cfg.stage(s).steps for s in STAGES[:STAGES.index(stage)])

    # evaluation
    def eval_batches(self) -> list[dict]:
        if self._eval_batches is None:
            per_task = eval_batches(self.cfg.data, self.cfg.model, split=self.cfg.eval.split,
                                    num_examples=self.cfg.eval.examples, tasks=EVAL_TASKS)
            self._eval_batches = [b for task in EVAL_TASKS for b in per_task.get(task, [])]
        return self._eval_batches

    def evaluate(self, graphdef, params, frozen, accumulator=None, mode: str = "teacher") -> dict[str, float]:
        """Metrics of the validation batches: teacher-forced, generated (`gen/...`) or both (`mode`)."""
        full_graphdef, full_state = nnx.split(nnx.merge(graphdef, params, frozen))
        key = ("predict", repr(self.cfg.model), _mesh_key(self.mesh), tuple(self.rules))
        predict = _cached(key, lambda: make_predict_fn(full_graphdef, self.mesh, self.rules,
                                                        fill_hole_area=self.cfg.model.sam2.fill_hole_area))
        return evaluate(predict, full_state, self.eval_batches(), place=lambda b: S.shard_batch(b, self.mesh),
                        accumulator=accumulator, mode=mode)

    # model construction
    def full_model(self):
        """(graphdef, state) of the whole freshly initialised model (built once per process and config)."""
        key = ("init", repr(self.cfg.model), self.cfg.seed)
        return _cached(key, lambda: nnx.split(TPOModel(self.cfg.model, rngs=nnx.Rngs(self.cfg.seed))))

    def compiled_train_step(self, graphdef, tx, stage: str, shardings: TrainShardings):
        """The jitted, sharded, non-finite-guarded train step of `stage` (compiled once per process and config)."""
        train_cfg = self.cfg.train_config(stage)
        key = ("train", repr(self.cfg.model), repr(train_cfg), _mesh_key(shardings.mesh), tuple(shardings.rules),
               self.cfg.max_update_ratio)
        return _cached(key, lambda: make_train_step(graphdef, tx, self.cfg.model, train_cfg, shardings=shardings,
                                                    guard_nonfinite=True, max_update_ratio=self.cfg.max_update_ratio))

    def model_flops(self, stage: str, step_fn, args) -> float:
        """Model FLOPs of one global step of `stage` (`tpo_jax.train.flops`: the matmuls, attention included,
        with no remat recomputation), counted from the jaxpr of `step_fn(*args)` (the trace its first call reuses)
        or, when a stack uses remat or another attention kernel, from the step traced without them."""
        model_cfg, train_cfg, batch = self.cfg.model, self.cfg.train_config(stage), args[2]
        key = ("flops", repr(model_cfg), repr(train_cfg), tuple((k, v.shape) for k, v in sorted(batch.items())))
        return _cached(key, lambda: flops.step_flops_from(lambda: step_fn.trace(*args).jaxpr, model_cfg, train_cfg,
                                                          batch).matmul)

    def init_plan(self) -> init_from.InitPlan:
        """Which `cfg.init_from` source gives each parameter (checked once, metadata only; empty without
        sources)."""
        if self._init_plan is None:
            from tpo_jax.model import abstract_model  # noqa: PLC0415
            params = nnx.state(abstract_model(self.cfg.model, self.cfg.seed), nnx.Param)
            self._init_plan = init_from.prepare(self.cfg.init_from, params)
        return self._init_plan

    def build_stage(self, stage: str):
        """(graphdef, state, frozen, tx, shardings) of `stage` at initialisation, placed on the mesh: the
        `cfg.seed` initialisation with the `cfg.init_from` weights loaded over it (`tpo_jax.train.init_from`).

        Default: the model is built eagerly on the host once (fast for small models on CPU) and put into
        its shards; with `cfg.sharded_init` each device creates its own shards (`tpo_jax.train.step.init_sharded`,
        for models that do not fit one host's memory). The pretrained weights are then read straight into the
        shards (and storage dtypes) of the parameters they replace."""
        if self._prebuilt is not None and self._prebuilt[0] == stage:
            built, self._prebuilt = self._prebuilt[1], None
            return built
        graphdef, state, frozen, tx, sh = self._build_initial(stage)
        if self.cfg.init_from:
            params, frozen = init_from.load_init(self.init_plan(), state.params, frozen)
            state = state.replace(params=params)
        return graphdef, state, frozen, tx, sh

    def _build_initial(self, stage: str):
        train_cfg = self.cfg.train_config(stage)
        if self.cfg.sharded_init:
            return init_sharded(self.cfg.model, train_cfg, self.mesh, self.rules, self.cfg.seed)
        graphdef, full = self.full_model()
        graphdef, params, frozen = split_model(nnx.merge(graphdef, full), get_recipe(train_cfg.stage))
        frozen = cast_frozen(frozen, self.cfg.model)
        tx = make_optimizer(get_recipe(train_cfg.stage), params, train_cfg.optim)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        abs_state, abs_frozen = jax.eval_shape(lambda t: t, state), jax.eval_shape(lambda t: t, frozen)
        state_sh = S.tree_shardings(abs_state, self.mesh, self.rules)
        frozen_sh = S.tree_shardings(abs_frozen, self.mesh, self.rules)
        # copies: the state is donated to the train step, the cached initial model must survive
        state = jax.device_put(state, state_sh, may_alias=False)
        frozen = jax.device_put(frozen, frozen_sh, may_alias=False)
        sh = TrainShardings(state=state_sh, frozen=frozen_sh, batch=S.batch_sharding(self.mesh),
                            replicated=S.replicated(self.mesh), mesh=self.mesh, rules=tuple(self.rules))
        return graphdef, state, frozen, tx, sh

    def init_stage(self, stage: str):
        """`build_stage` with the previous stage's final parameters loaded (with `init_from` and no checkpoint of
        the previous stage in the work directory, the stage starts from the `init_from` weights)."""
        graphdef, state, frozen, tx, sh = self.build_stage(stage)
        index = STAGES.index(stage)
        prev = STAGES[index - 1] if index > 0 else None
        if prev and (not self.cfg.init_from or existing_steps(self.workdir, prev, self.cfg)):
            with open_manager(self.workdir, prev, self.cfg, read_only=True) as mngr:
                state, frozen, _ = restore_params(mngr, self.cfg.stage(prev).steps, state, frozen,
                                                  trained_groups(self.cfg, prev))
        return graphdef, state, frozen, tx, sh

    # one stage
    def train_stage(self, stage: str, *, stop_after: int | None = None) -> dict[str, Any]:
        cfg, run = self.cfg, self.cfg.stage(stage)
        data_index, data_count = S.data_shard_for_process(self.mesh)
        # the data first: a bad source fails before the model is built
        it = make_train_iterator(cfg.data_config(stage), cfg.model, run.recipe, data_index, data_count)
        graphdef, state, frozen, tx, sh = self.init_stage(stage)
        groups = trained_groups(cfg, stage)
        mngr = open_manager(self.workdir, stage, cfg)
        start, nonfinite, data_state = 0, 0, None
        latest = mngr.latest_step()
        if latest is not None:
            state, frozen, meta = restore_params(mngr, latest, state, frozen, groups, opt_state=True)
            start, nonfinite, data_state = latest, int(meta["nonfinite"]), meta["data_state"]
            self._log(f"{stage}: resumed from step {latest}")
        history_path = os.path.join(stage_dir(self.workdir, stage), "history.jsonl")
        if self.main:
            os.makedirs(stage_dir(self.workdir, stage), exist_ok=True)
            report.truncate_history(history_path, start)
        result = {"stage": stage, "start": start, "steps": run.steps, "losses": [], "stopped": None, "evals": []}
        if start >= run.steps:
            mngr.close()
            if hasattr(it, "close"):
                it.close()
            result.update(state=state, frozen=frozen, graphdef=graphdef, step=start)
            return result
        if data_state is not None:
            it.set_state(data_state)
        step_fn = self.compiled_train_step(graphdef, tx, stage, sh)
        base_key = jax.random.fold_in(jax.random.key(cfg.seed), STAGES.index(stage))
        offset = self.global_offset(stage)

        def save(step, data_state_now, force=False):
            params = params_of_groups(state.params, frozen, groups)
            copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (the state is donated to the next step)
            return mngr.save(step, params=copy(params),
                             state={"step": jnp.copy(state.step), "opt_state": copy(state.opt_state)},
                             meta={"stage": stage, "step": step, "data_state": data_state_now,
                                   "nonfinite": nonfinite, "time": time.time()},
                             config=cfg.to_dict(), force=force)

        try:
            batch = next(it)  # first: bad data fails here, before a progress bar is drawn
        except BaseException:
            if hasattr(it, "close"):
                it.close()
            mngr.close()
            raise
        flops_per_step = self.model_flops(stage, step_fn, (state, frozen, S.shard_batch(batch, self.mesh),
                                                           jax.random.fold_in(base_key, start)))
        steplog = report.StepLog(stage, history_path, start=start, total=run.steps, offset=offset,
                                 log_every=cfg.log_every, lm_rows=cfg.lm_rows, main=self.main, progress=self.progress,
                                 scalars=self._scalars, flops_per_step=flops_per_step, devices=self.mesh.devices.size,
                                 peak_flops=chips.peak_flops_per_device(self.mesh.devices.flat[0].device_kind,
                                                                        cfg.peak_tflops))
        profile = Profile(cfg.profile_steps, os.path.join(self.workdir, "profile", stage), self._log)
        t_last, compile_s, trained = time.perf_counter(), None, 0
        gc_schedule = GcSchedule().start()  # collected on a step schedule, not mid-step (train/gc_schedule.py)
        try:
            for step in range(start, run.steps):
                gc_schedule.step()
                data_state_now = it.get_state()  # after this step's batch: what a resume must continue from
                tokens = int(np.sum(batch["attention_mask"])) * data_count
                rng = jax.random.fold_in(base_key, step)
                profile.before(step + 1)
                state, metrics = step_fn(state, frozen, S.shard_batch(batch, self.mesh), rng)
                if step + 1 < run.steps:
                    batch = next(it)  # prepared while the step runs
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                profile.after(step + 1)
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                if compile_s is None:
                    compile_s = dt
                trained += 1
                nonfinite += int(metrics.pop("nonfinite"))
                steplog.step(step + 1, metrics, tokens, dt, nonfinite)
                result["losses"].append(metrics["loss/total"])
                if nonfinite > cfg.max_nonfinite:
                    mngr.wait()
                    raise NonFiniteError(
                        f"{stage}: {nonfinite} steps had {_REJECTED} (more than max_nonfinite={cfg.max_nonfinite}), "
                        f"the last at step {step + 1}; their updates were skipped and no checkpoint holds them. Last "
                        f"checkpoint: {_step_text(mngr.latest_step())}. Lower the learning rate ({stage}.lr_scale, "
                        f"optim.lr) or check the data.")
                last = step + 1 == run.steps
                stop = self.stop_requested or (stop_after is not None and trained >= stop_after and not last)
                mngr.check()  # a background save that failed stops the run here, at its first step after
                if last or stop or mngr.should_save(step + 1):
                    save(step + 1, data_state_now, force=True)
                if cfg.eval.enabled and cfg.eval.every_steps and (step + 1) % cfg.eval.every_steps == 0 and not last:
                    values = self.evaluate(graphdef, state.params, frozen)
                    self._scalars("eval", values, offset + step + 1)
                    result["evals"].append({"stage": stage, "step": step + 1, "global_step": offset + step + 1,
                                            "metrics": values})
                    if steplog.bar is None:
                        self._log(f"{stage} step {step + 1}: {report.short(values)}")
                if stop:
                    result["stopped"] = self.stop_requested or f"stop_after={stop_after}"
                    result["step"] = step + 1
                    break
            else:
                result["step"] = run.steps
        finally:
            profile.stop()
            gc_schedule.stop()
            steplog.close()
            skipped_records = dict(getattr(it, "bad_by_kind", {}))
            if hasattr(it, "close"):
                it.close()
            mngr.close()  # waits for the last save
        result.update(state=state, frozen=frozen, graphdef=graphdef, compile_s=compile_s, trained=trained,
                      skipped_steps=nonfinite, skipped_records=skipped_records)
        if skipped_records:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(skipped_records.items()))
            self._log(f"{stage}: skipped {sum(skipped_records.values())} bad record(s) of "
                      f"{getattr(it, 'seen', '?')} read, by kind: {kinds} (each logged with its id and reason)")
        if nonfinite:
            self._log(f"{stage}: warning: {nonfinite} step(s) were skipped ({_REJECTED}); their batches trained "
                      f"nothing (history.jsonl: nonfinite_total)")
        return result

    # the job
    def run(self, stages: Sequence[str] = STAGES, *, resume: bool = False,
            stop_after: int | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        stages = sorted(set(stages), key=STAGES.index)
        for s in stages:
            self.cfg.stage(s)
        for a, b in zip(stages, stages[1:]):
            if STAGES.index(b) != STAGES.index(a) + 1:
                raise ConfigError(f"stages {stages}: stages run in order without gaps (each starts from the previous "
                                  f"one's checkpoint)")
        have = check_workdir(self.cfg, self.workdir, stages, resume)
        metrics = self._load_metrics() if resume else {}
        finished = [s for s in stages if self._finished(s, have, metrics)] if resume else []
        if finished == stages:
            steps = ", ".join(f"{s} at step {self.cfg.stage(s).steps}" for s in stages)
            self._log(f"tpo-train: the run in {self.workdir} is complete ({steps}, the final steps); nothing to do. "
                      f"Metrics: metrics.json; tpo-eval --workdir {self.workdir} evaluates a checkpoint; to train "
                      f"longer, use a new --workdir.")
            return {"workdir": self.workdir, "stages": {}, "complete": True, "metrics": metrics,
                    "wall_s": time.perf_counter() - t0}
        if self.cfg.init_from:
            # the pretrained weights are checked and read before anything is written: a bad source leaves the work
            # directory as it was
            before = "before" not in metrics and self.cfg.eval.enabled
            if before:
                self.eval_batches()  # the data first, as below
            self._log(init_from.format_report(self.init_plan().report))
            first = STAGES[0] if before else stages[0]
            self._prebuilt = (first, self.build_stage(first))
        if self.main:
            os.makedirs(self.workdir, exist_ok=True)
            write_json(os.path.join(self.workdir, "config.json"), self.cfg.to_dict())
            if self.cfg.init_from:
                init_from.write_report(self.workdir, self._init_plan.report)
            from tensorboardX import SummaryWriter  # noqa: PLC0415
            self.writer = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
        summary: dict[str, Any] = {"workdir": self.workdir, "stages": {}}
        previous = self._install_signals()
        try:
            if "before" not in metrics and self.cfg.eval.enabled:
                self.eval_batches()  # the data first: a bad source fails before the model is built
                graphdef, state, frozen, _, _ = self.build_stage(STAGES[0])
                t = time.perf_counter()
                metrics["before"] = self.evaluate(graphdef, state.params, frozen)
                self._log(f"evaluation before training: {report.short(metrics['before'])} ({time.perf_counter() - t:.1f} s)")
                self._scalars("eval", metrics["before"], 0)
                self._save_metrics(metrics)
                del graphdef, state, frozen
            trained = 0
            for stage in stages:
                left = None if stop_after is None else stop_after - trained
                if left is not None and left <= 0:
                    summary["stopped"] = f"stop_after={stop_after}"
                    break
                if self.stop_requested:  # before any step of this stage: the finished stages are saved
                    summary["stopped"] = self.stop_requested
                    self._log(f"stopped ({self.stop_requested}) before {stage}; continue with --resume")
                    break
                if stage in finished:
                    self._log(f"{stage}: complete (step {self.cfg.stage(stage).steps}, evaluated), skipped")
                    continue
                res = self.train_stage(stage, stop_after=left)
                trained += res.get("trained", 0)
                summary["stages"][stage] = {k: res.get(k) for k in ("start", "step", "steps", "compile_s", "stopped",
                                                                        "skipped_steps", "skipped_records")}
                summary["stages"][stage]["losses"] = res["losses"]
                if res["evals"]:
                    during = [e for e in metrics.get("during", []) if e["stage"] != stage or e["step"] <= res["start"]]
                    metrics["during"] = during + res["evals"]
                    self._save_metrics(metrics)
                if res["stopped"]:
                    summary["stopped"] = res["stopped"]
                    self._log(f"{stage}: stopped at step {res['step']} of {res['steps']} ({res['stopped']}); "
                              f"checkpoint saved, continue with --resume")
                    break
                if not self.cfg.eval.enabled:
                    continue
                t = time.perf_counter()
                after = self.evaluate(res["graphdef"], res["state"].params, res["frozen"])
                self._log(f"evaluation after {stage}: {report.short(after)} ({time.perf_counter() - t:.1f} s)")
                if self.cfg.eval.generate and stage == stages[-1]:  # the final evaluation: generated answers too
                    t = time.perf_counter()
                    generated = self.evaluate(res["graphdef"], res["state"].params, res["frozen"], mode="generate")
                    after.update(generated)
                    self._log(f"evaluation after {stage}, generated answers: {short_generated(generated)} "
                              f"({time.perf_counter() - t:.1f} s)")
                metrics.setdefault("stages", {})[stage] = after
                metrics["after"] = after
                metrics["improvement"] = improvement(metrics["before"], after)
                self._scalars("eval", after, self.global_offset(stage) + res["steps"])
                self._save_metrics(metrics)
        finally:
            self._prebuilt = None
            self._restore_signals(previous)
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        summary["wall_s"] = time.perf_counter() - t0
        summary["metrics"] = metrics
        summary["skipped_steps"] = sum(v.get("skipped_steps") or 0 for v in summary["stages"].values())
        if self.main and not summary.get("stopped") and ("after" in metrics or not self.cfg.eval.enabled):
            compile_s = {s: v.get("compile_s") for s, v in summary["stages"].items()}
            self._log(report.write_reports(self.workdir, metrics, {s: self.global_offset(s) for s in STAGES},
                                           summary["wall_s"], compile_s))
        return summary

    def _finished(self, stage: str, have: Mapping[str, list[int]], metrics: Mapping) -> bool:
        """Whether `stage` has its final checkpoint and (with evaluation on) its metrics in metrics.json."""
        done = self.cfg.stage(stage).steps in have.get(stage, [])
        return done and (not self.cfg.eval.enabled or stage in metrics.get("stages", {}))

    # SIGTERM and Ctrl-C: finish the step, save, return; a second Ctrl-C aborts at once
    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if signum == signal.SIGINT and self.stop_requested == "SIGINT":
                raise KeyboardInterrupt
            self.stop_requested = self.stop_requested or name
            if signum == signal.SIGINT and self.main:
                print("\ntpo-train: Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort "
                      "without saving)", file=sys.stderr, flush=True)

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signals(previous) -> None:
        if previous is not None and threading.current_thread() is threading.main_thread():
            for sig, old in previous.items():
                signal.signal(sig, old)


class Profile:
    """A `jax.profiler` trace of the steps `window` = (first, last) of a stage, written to `log_dir`."""

    def __init__(self, window: Sequence[int], log_dir: str, note):
        self.window, self.log_dir, self.note, self.active = tuple(window), log_dir, note, False

    def before(self, step: int) -> None:
        if self.window and step == self.window[0]:
            os.makedirs(self.log_dir, exist_ok=True)
            jax.profiler.start_trace(self.log_dir)
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step >= self.window[1]:
            self.stop()
            self.note(f"profile of steps {self.window[0]}..{step}: {self.log_dir}")

    def stop(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


def _step_text(step: int | None) -> str:
    return "none yet" if step is None else f"step {step}"


def run(cfg: RunConfig, workdir: str, *, stages: Sequence[str] = STAGES, resume: bool = False,
        stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the job (see the module docstring); returns a summary with the per-step losses of this call."""
    return Trainer(cfg, workdir, progress=progress).run(stages, resume=resume, stop_after=stop_after)

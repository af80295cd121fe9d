"""The training job: exact resume, outputs, stage chaining, non-finite steps, SIGTERM, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tpo_jax.checkpoints.manager import CheckpointManager, abstract_like
from tpo_jax.tree_paths import leaf_paths
from tpo_jax.config import ConfigError
from tpo_jax import sharding as S
from tpo_jax.data.pipeline import make_train_iterator
from tpo_jax.train import trainer as T
from tpo_jax.train.load import evaluate_checkpoint
from tpo_jax.train import workdir as W
from tpo_jax.cli.train import eval_main, train_main
from tpo_jax.train.nonfinite import NonFiniteError
from tpo_jax.overrides import apply_overrides
from tpo_jax.train.run_config import get_run_config, load_run_config
from tpo_jax.train.stages import get_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["stage1.steps=20", "checkpoint.every_steps=5", "checkpoint.keep=2", "data.batch_size=2", "eval.examples=2",
        "devices=1", "log_every=1"]


def _cfg(*extra):
    return apply_overrides(get_run_config("tiny"), BASE + list(extra))


def _losses(summary):
    return np.asarray(summary["stages"]["stage1"]["losses"])


def _history(workdir, stage="stage1"):
    with open(os.path.join(workdir, stage, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


FULL = ["peak_tflops=0.5", "profile_steps=[3,4]"]  # the full run also logs MFU and profiles two steps


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    return workdir, T.run(_cfg(*FULL), workdir, stages=["stage1"], progress=False)


def test_resume_is_exact(full_run, tmp_path):
    workdir, full = full_run
    first = T.run(_cfg(), str(tmp_path), stages=["stage1"], stop_after=10, progress=False)
    assert first["stopped"] == "stop_after=10" and first["stages"]["stage1"]["step"] == 10
    with CheckpointManager(tmp_path / "stage1" / "checkpoints") as m:
        assert m.all_steps() == [5, 10]
    second = T.run(_cfg(), str(tmp_path), stages=["stage1"], resume=True, progress=False)
    assert second["stages"]["stage1"]["start"] == 10
    full_losses = _losses(full)
    assert len(full_losses) == 20 and np.all(np.isfinite(full_losses))
    np.testing.assert_array_equal(_losses(first), full_losses[:10])
    np.testing.assert_array_equal(_losses(second), full_losses[10:])  # bit-identical after the resume
    assert [h["loss/total"] for h in _history(str(tmp_path))] == [h["loss/total"] for h in _history(workdir)]


def test_run_outputs(full_run):
    workdir, summary = full_run
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    keys = {"rec/acc@0.5", "rec/miou", "temporal/r1@0.3", "temporal/r1@0.5", "temporal/r1@0.7", "temporal/miou",
            "highlight/hit@1", "highlight/map", "mc/acc", "mask/l1",
            "track/jf", "track/j", "track/f", "track/auc", "track/precision@20", "track/norm_precision@0.2"}
    assert keys <= set(metrics["before"]) and keys <= set(metrics["after"]) and keys <= set(metrics["improvement"])
    assert metrics["stages"]["stage1"] == metrics["after"]
    assert metrics["before"]["track/count"] == 2 and all(0 <= metrics[w]["track/jf"] <= 1 for w in ("before", "after"))
    for name in ("curves.png", "metrics.png"):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    history = _history(workdir)
    assert [h["step"] for h in history] == list(range(1, 21))
    for key in ("loss/total", "loss/lm", "grad_norm", "lr/lora", "tokens_per_s"):
        assert all(np.isfinite(h[key]) for h in history), key
    assert history[-1]["lr/lora"] < max(h["lr/lora"] for h in history)  # warmup then cosine decay
    events = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(workdir, "tensorboard")) for f in fs]
    blob = b"".join(open(p, "rb").read() for p in events)
    for tag in (b"train/loss/total", b"train/lr/lora", b"train/grad_norm", b"train/tokens_per_s", b"eval/rec/acc_0.5", b"eval/temporal/r1_0.7"):
        assert tag in blob, tag
    with CheckpointManager(os.path.join(workdir, "stage1", "checkpoints")) as m:
        assert m.all_steps() == [15, 20]  # every 5 steps, the last 2 kept
        meta = m.read_json(20)
        assert meta["config"] == _cfg(*FULL).to_dict() and meta["meta"]["nonfinite"] == 0
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f) == _cfg(*FULL).to_dict()


def test_logged_mfu_is_recomputable(full_run):
    # model FLOPs per step counted independently from the stage's step (tpo_jax.train.flops), then each logged
    # MFU recomputed by hand from the same record's tokens/s: flops · (tokens/s / tokens) / devices / peak
    from tpo_jax.train.flops import step_flops
    workdir, _ = full_run
    cfg = _cfg(*FULL)
    it = make_train_iterator(cfg.data_config("stage1"), cfg.model, get_recipe("stage1"), 0, 1)
    batch = next(it)
    it.close()
    flops = step_flops(cfg.model, cfg.train_config("stage1"), batch).matmul
    for h in _history(workdir):
        assert h["model_tflops_per_step"] * 1e12 == pytest.approx(flops, rel=1e-9)
        steps_per_s = h["tokens_per_s"] / h["tokens"]
        assert h["tflops_per_s_per_device"] == pytest.approx(flops * steps_per_s / 1 / 1e12, rel=1e-9)
        assert h["mfu"] == pytest.approx(flops * steps_per_s / 1 / 0.5e12, rel=1e-9)
        assert 0 < h["mfu"]
    profile = os.path.join(workdir, "profile", "stage1")
    traces = [f for _, _, fs in os.walk(profile) for f in fs if f.endswith((".xplane.pb", ".trace.json.gz"))]
    assert traces, os.listdir(profile)


def test_tpo_eval_matches_the_run(full_run):
    workdir, _ = full_run
    out = evaluate_checkpoint(_cfg(), workdir)
    with open(os.path.join(workdir, "metrics.json")) as f:
        after = json.load(f)["after"]
    assert out["stage"] == "stage1" and out["step"] == 20
    assert out["metrics"] == pytest.approx(after, nan_ok=True)


def test_next_stage_starts_from_the_previous_checkpoint(full_run):
    workdir, _ = full_run
    cfg = _cfg()
    trainer = T.Trainer(cfg, workdir, progress=False)
    _, init_state, init_frozen, _, _ = trainer.build_stage("stage2")
    _, state, frozen, _, _ = trainer.init_stage("stage2")
    groups = W.trained_groups(cfg, "stage1")  # the run's stage-1 recipe: LoRA and, from scratch, the LLM base
    assert groups == set(get_recipe(cfg.stage1.recipe).learning_rates)
    with CheckpointManager(os.path.join(workdir, "stage1", "checkpoints")) as m:
        target = W.params_of_groups(abstract_like(init_state.params), abstract_like(init_frozen), groups)
        saved = dict(leaf_paths(m.restore(20, params=target)["params"]))
    init = dict(leaf_paths(init_state.params)) | dict(leaf_paths(init_frozen))
    now = dict(leaf_paths(state.params)) | dict(leaf_paths(frozen))
    assert {p for p in now if W.group_of(p) in groups} == set(saved)
    for path, value in now.items():
        if path in saved:  # the trained stage-1 values (in stage 2 the LLM base is frozen, LoRA trains on)
            np.testing.assert_array_equal(value, saved[path])
        else:  # heads, tokens, vision, ...: still at initialisation
            np.testing.assert_array_equal(value, init[path])
    for group in groups:
        assert any(not np.array_equal(saved[p], init[p]) for p in saved if W.group_of(p) == group), group


def test_nonfinite_update_is_skipped(full_run, tmp_path):
    cfg = _cfg()
    trainer = T.Trainer(cfg, str(tmp_path), progress=False)
    graphdef, state, frozen, tx, sh = trainer.build_stage("stage1")
    step = trainer.compiled_train_step(graphdef, tx, "stage1", sh)
    it = make_train_iterator(cfg.data, cfg.model, "stage1")
    good = next(it)
    bad = dict(good, frames=np.full_like(good["frames"], np.nan))
    before = [np.array(x) for _, x in leaf_paths(state.params)]
    state, metrics = step(state, frozen, S.shard_batch(bad, trainer.mesh), jax.random.key(0))
    assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss/total"]))
    assert int(state.step) == 1
    for a, (_, b) in zip(before, leaf_paths(state.params)):
        np.testing.assert_array_equal(a, b)
    for i in (1, 2):  # the skipped step did not advance the optimizer: its first update has LR 0 (warmup)
        state, metrics = step(state, frozen, S.shard_batch(good, trainer.mesh), jax.random.key(i))
        assert int(metrics["nonfinite"]) == 0 and np.isfinite(float(metrics["loss/total"]))
    assert any(not np.array_equal(a, b) for a, (_, b) in zip(before, leaf_paths(state.params)))


def test_too_many_nonfinite_steps_stop_the_run(full_run, tmp_path, monkeypatch):
    original = T.make_train_iterator

    class Poisoned:  # batches 3, 4, 5, ... have NaN frames
        def __init__(self, *args):
            self.it, self.n = original(*args), 0

        def __next__(self):
            batch, self.n = next(self.it), self.n + 1
            return dict(batch, frames=np.full_like(batch["frames"], np.nan)) if self.n >= 3 else batch

        def get_state(self):
            return self.it.get_state()

    monkeypatch.setattr(T, "make_train_iterator", Poisoned)
    with pytest.raises(NonFiniteError, match=r"stage1: 3 steps had a non-finite loss.*max_nonfinite=2.*at step 5"):
        T.run(_cfg("max_nonfinite=2", "eval.enabled=false"), str(tmp_path), stages=["stage1"], progress=False)


def test_bad_input_gives_one_clear_error(full_run, tmp_path, capsys):
    workdir, _ = full_run
    with pytest.raises(ConfigError, match=r"unknown override key 'optim\.lrr'.*fields: lr, lr_scale"):
        _cfg("optim.lrr=1e-4")
    assert train_main(["--workdir", str(tmp_path), "--set", "optim.lrr=1e-4"]) == 2
    assert "unknown override key 'optim.lrr'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"holds a stage1 checkpoint \(step 20\) of another config: "
                                          r"model\.llm\.num_layers: 2 \(checkpoint\) != 3 \(this run\)"):
        T.run(_cfg("model.llm.num_layers=3"), workdir, stages=["stage1"], resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"already holds stage1 checkpoints \(steps \[15, 20\]\); pass --resume"):
        T.run(_cfg(), workdir, stages=["stage1"], progress=False)
    with pytest.raises(ConfigError, match=r"stage2 starts from the final stage1 checkpoint \(step 20\) in .*there is "
                                          r"none; run --stages 1 first"):
        T.run(_cfg(), str(tmp_path), stages=["stage2"], progress=False)
    with pytest.raises(ConfigError, match="stages run in order without gaps"):
        T.run(_cfg(), str(tmp_path), stages=["stage1", "stage3"], progress=False)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f))
    cmd = [sys.executable, "-m", "tpo_jax.cli.train", "--workdir", str(tmp_path), "--stages", "1", "--no-progress",
           "--compilation-cache", "none",
           "--set", "stage1.steps=10000", "--set", "data.batch_size=2", "--set", "eval.enabled=false",
           "--set", "checkpoint.every_steps=10000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = tmp_path / "stage1" / "history.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    done = len(history.read_text().splitlines())
    assert "stopped (SIGTERM)" in out and f"stopped at step {done} of 10000" in out
    with CheckpointManager(tmp_path / "stage1" / "checkpoints") as m:
        assert m.all_steps() == [done]
        assert m.read_json(done)["meta"]["data_state"]["grain"]["next_index"] == 2 * done


def _cli_sets(*extra):
    return [a for item in BASE + list(extra) for a in ("--set", item)]


def test_ctrl_c_saves_and_resume_is_exact(full_run, tmp_path, monkeypatch, capfd):
    """Ctrl-C (SIGINT, raised here while batch 8 is read, i.e. during step 7) finishes the step, saves it and
    prints how to resume; the resumed run's losses are bit-identical to the uninterrupted run's."""
    original = T.make_train_iterator

    class CtrlC:
        def __init__(self, *args, at=8, times=1):
            self.it, self.n, self.at, self.times = original(*args), 0, at, times

        def __next__(self):
            self.n += 1
            if self.n == self.at:
                for _ in range(self.times):
                    signal.raise_signal(signal.SIGINT)
            return next(self.it)

        def get_state(self):
            return self.it.get_state()

        def set_state(self, state):
            self.it.set_state(state)

    args = ["--workdir", str(tmp_path), "--stages", "1", "--no-progress", "--compilation-cache", "none", *_cli_sets()]
    monkeypatch.setattr(T, "make_train_iterator", CtrlC)
    assert train_main(args) == 130
    out, err = capfd.readouterr()
    assert "Ctrl-C: finishing this step and saving a checkpoint" in err and "Traceback" not in err
    assert "stage1: stopped at step 7 of 20 (SIGINT); checkpoint saved, continue with --resume" in out
    assert f"tpo-train: stopped (SIGINT); resume with --resume --workdir {tmp_path}" in out
    with CheckpointManager(tmp_path / "stage1" / "checkpoints") as m:
        assert m.latest_step() == 7 and m.read_json(7)["meta"]["step"] == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    monkeypatch.setattr(T, "make_train_iterator", original)
    assert train_main(args + ["--resume"]) == 0
    assert [h["loss/total"] for h in _history(str(tmp_path))] == [h["loss/total"] for h in _history(full_run[0])]
    # a second Ctrl-C aborts at once: no checkpoint of the interrupted step, one line, exit 130
    monkeypatch.setattr(T, "make_train_iterator", lambda *a: CtrlC(*a, at=4, times=2))
    assert train_main(["--workdir", str(tmp_path / "again"), *args[2:]]) == 130
    err = capfd.readouterr().err
    assert "tpo-train: interrupted; nothing saved since the last checkpoint" in err and "Traceback" not in err
    with CheckpointManager(tmp_path / "again" / "stage1" / "checkpoints") as m:
        assert m.all_steps() == []


def test_resume_of_a_finished_run_does_nothing(full_run, capfd):
    workdir, _ = full_run
    files = {os.path.join(r, f) for r, _, fs in os.walk(workdir) for f in fs}
    metrics = open(os.path.join(workdir, "metrics.json"), "rb").read()
    t0 = time.perf_counter()
    assert train_main(["--workdir", workdir, "--stages", "1", "--resume", "--compilation-cache", "none",
                       *_cli_sets()]) == 0
    assert time.perf_counter() - t0 < 5
    assert "is complete (stage1 at step 20, the final steps); nothing to do" in capfd.readouterr().out
    assert open(os.path.join(workdir, "metrics.json"), "rb").read() == metrics
    assert {os.path.join(r, f) for r, _, fs in os.walk(workdir) for f in fs} == files  # no new TensorBoard file


def test_tpo_eval_cli(full_run, tmp_path, capsys):
    workdir, _ = full_run
    out_file = tmp_path / "eval.json"
    assert eval_main(["--workdir", workdir, "--compilation-cache", "none", "--output", str(out_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out_file.read_text())
    with open(os.path.join(workdir, "metrics.json")) as f:
        assert printed["step"] == 20 and printed["metrics"] == pytest.approx(json.load(f)["after"], nan_ok=True)
    assert eval_main(["--workdir", workdir, "--compilation-cache", "none", "--stage", "stage1", "--step", "7"]) == 2
    assert "no stage1 checkpoint of step 7" in capsys.readouterr().err


def test_run_config_overrides_and_json_round_trip(tmp_path):
    cfg = _cfg("optim.lr=1e-3", "model.llm.num_layers=3", "data.synthetic.num_objects=1,1", "loss_weights.region=2",
               "dropout=true", "optim.lr=none")
    assert cfg.optim.lr is None and cfg.model.llm.num_layers == 3 and cfg.dropout is True
    assert cfg.data.synthetic.num_objects == (1, 1) and cfg.loss_weights["region"] == 2.0
    # optim.lr rescales a stage's recipe so its fastest group peaks at that LR, ratios kept
    s2 = _cfg("optim.lr=1e-3").train_config("stage2").optim
    assert s2.lr_scale == pytest.approx(1e-3 / 2e-4) and s2.total_steps == _cfg().stage2.steps
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_run_config(str(path)) == cfg
    # a stage's loss_weights replace those entries of the run's loss_weights in that stage only
    staged = _cfg("loss_weights.region=2", 'stage3.loss_weights={"region": 3, "mask": 0.5}')
    assert staged.train_config("stage3").loss_weights == {"lm": 1.0, "region": 3.0, "temporal": 1.0, "mask": 0.5}
    assert staged.train_config("stage2").loss_weights == {"lm": 1.0, "region": 2.0, "temporal": 1.0, "mask": 1.0}
    path.write_text(json.dumps(staged.to_dict()))
    assert load_run_config(str(path)) == staged
    # a config file's NaN / Infinity (Python's json reads them) is an error, as the same override is
    for field, value in (("lr_scale", float("inf")), ("lr", float("nan"))):
        path.write_text(json.dumps(dict(cfg.to_dict(), optim=dict(cfg.to_dict()["optim"], **{field: value}))))
        with pytest.raises(ConfigError, match=rf"'optim\.{field}': must be a finite number, got (inf|nan)"):
            load_run_config(str(path))
    for bad, msg in [("model.llm.num_layers=two", r"'model\.llm\.num_layers': cannot read 'two' as an integer"),
                     ("stage2.recipe=stage9", r"'stage2\.recipe': unknown recipe 'stage9'"),
                     ("model.vit=1", r"'model\.vit' is a section"),
                     ("data.batch_size=3", r"'micro_batches'|data\.batch_size"),
                     ("loss_weights.boxes=1", r"'loss_weights' has no entry 'boxes'"),
                     ('stage2.loss_weights={"boxes": 1}', r"'stage2\.loss_weights': unknown term\(s\) \['boxes'\]"),
                     ('stage2.loss_weights={"region": -1}', r"'stage2\.loss_weights': must be >= 0"),
                     # batch 2 in micro-batches of 1: the temporal criterion's groups of 8 rows would straddle them
                     ("micro_batches=2", r"'model\.heads\.temporal\.criterion_group': 8 must divide the micro-batch size 1")]:
        with pytest.raises(ConfigError, match=msg):
            _cfg(bad, "micro_batches=2") if bad.startswith("data.batch_size") else _cfg(bad)


def test_saved_config_without_newer_fields_matches_at_defaults():
    """A checkpoint's config written before a field existed matches a run that leaves the field at its default."""
    cfg = _cfg()
    saved = cfg.to_dict()
    del saved["stage1"]["loss_weights"], saved["stage3"]["group_lr_scale"]  # both None (the default) here
    current = cfg.to_dict()
    assert W.config_diff(W.stage_identity(saved, "stage3"), W.stage_identity(current, "stage3"))  # raw: differs
    assert W.config_diff(W.stage_identity(W.with_defaults(saved), "stage3"), W.stage_identity(current, "stage3")) == []
    changed = _cfg('stage1.loss_weights={"region": 3}').to_dict()
    assert W.config_diff(W.stage_identity(W.with_defaults(saved), "stage3"), W.stage_identity(changed, "stage3")) == [
        "stage1.loss_weights: None (checkpoint) != {'region': 3} (this run)"]


def test_end_of_run_report(tmp_path):
    """The summary compares window means, not two single steps; the table and metrics.png show every stage."""
    from tpo_jax.train import report

    rng = np.random.default_rng(0)
    history = [{"stage": s, "step": i + 1, "global_step": off + i + 1, "loss/total": base - i / 100 + rng.normal(0, .3)}
               for s, off, base in (("stage1", 0, 5.0), ("stage2", 300, 3.0)) for i in range(300)]
    first, last, n = report.loss_window(history, "stage2")
    y = np.asarray([h["loss/total"] for h in history if h["stage"] == "stage2"])
    assert n == 50 and first == pytest.approx(y[:50].mean()) and last == pytest.approx(y[-50:].mean())
    assert report.loss_window(history[:20], "stage1")[2] == 5  # a quarter of a short stage
    for stage in ("stage1", "stage2"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "history.jsonl").write_text(
            "".join(json.dumps(h) + "\n" for h in history if h["stage"] == stage))
    before = {"rec/acc@0.5": 0.0, "mask/l1": 1.2, "mask/count": 8}
    stages = {"stage1": {"rec/acc@0.5": 0.1, "mask/l1": 1.3, "mask/count": 8},
              "stage2": {"rec/acc@0.5": 0.25, "mask/l1": 0.4, "mask/count": 8}}
    text = report.write_reports(str(tmp_path), {"before": before, "stages": stages, "after": stages["stage2"]},
                                {"stage1": 0, "stage2": 300, "stage3": 600}, 12.0)
    assert f"stage2: 300 steps, loss {first:.3f} -> {last:.3f} (mean of the first and of the last 50" in text
    assert "metric                 before   stage1   stage2  better by" in text
    assert "mask/l1                 1.200    1.300    0.400     +0.800" in text  # lower is better: + means it fell
    for name in ("curves.png", "metrics.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""What `tpo-train` reports: per step (`StepLog`: history.jsonl, TensorBoard scalars, the progress bar) and at
the end (the training curves `curves.png`, the metrics before training and after each stage `metrics.png`, and
the text summary).

    write_reports(workdir, metrics, stage_starts, wall_s)    # reads WORKDIR/<stage>/history.jsonl
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from tpo_jax.data.records import DataError
from tpo_jax.train.metrics import HIGHER_IS_BETTER

CURVES = ("loss/total", "loss/lm", "loss/region", "loss/temporal", "loss/mask", "grad_norm")
SMOOTH = 20  # moving-average window of the curves, in logged steps
WINDOW = 50  # the summary's loss: mean of the first and of the last WINDOW logged steps of a stage
UNITS = {"acc@0.5": "accuracy", "acc": "accuracy", "miou": "mean IoU", "r1@0.3": "recall@1", "r1@0.5": "recall@1",
         "r1@0.7": "recall@1", "hit@1": "hit rate", "map": "mAP", "l1": "L1 distance", "jf": "J&F", "j": "J (mask IoU)",
         "f": "F (boundary)", "auc": "success AUC", "precision@20": "precision@20px"}


log = logging.getLogger("tpo.train")


class StepLog:
    """The per-step record of one stage: a line of `history_path` and TensorBoard scalars (through `scalars`) every
    `log_every` steps and at the last, the progress bar, and a one-time warning when label tokens fell beyond
    `lm_rows`. Only the main process (`main`) writes.

    Speed: `tokens_per_s`, `steps_per_s` and, given `flops_per_step` (model FLOPs of one global step,
    `tpo_jax.train.flops`), `tflops_per_s_per_device` = flops_per_step / dt / devices and, given the per-device
    `peak_flops`, `mfu` = that / peak. `tokens` (the batch's unmasked tokens) and `model_tflops_per_step` are
    logged with them, so each figure can be recomputed from the record."""

    def __init__(self, stage: str, history_path: str, *, start: int, total: int, offset: int, log_every: int,
                 lm_rows: int, main: bool, progress: bool, scalars: Callable[[str, Mapping, int], None],
                 flops_per_step: float | None = None, devices: int = 1, peak_flops: float | None = None):
        self.stage, self.total, self.offset, self.log_every, self.lm_rows = stage, total, offset, log_every, lm_rows
        self.scalars, self.warned = scalars, False
        self.flops_per_step, self.devices, self.peak_flops = flops_per_step, devices, peak_flops
        self.file = open(history_path, "a") if main else None
        self.bar = None
        if main and progress:
            from tqdm import tqdm  # noqa: PLC0415
            self.bar = tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True, leave=True)

    def speed(self, tokens: int, dt: float) -> dict[str, float]:
        out = {"tokens": float(tokens), "tokens_per_s": tokens / dt, "steps_per_s": 1.0 / dt}
        if self.flops_per_step:
            per_device = self.flops_per_step / dt / self.devices
            out.update(model_tflops_per_step=self.flops_per_step / 1e12, tflops_per_s_per_device=per_device / 1e12)
            if self.peak_flops:
                out["mfu"] = per_device / self.peak_flops
        return out

    def step(self, step: int, metrics: Mapping[str, float], tokens: int, dt: float, nonfinite_total: int) -> None:
        if metrics.get("count/lm_dropped", 0) > 0 and not self.warned:
            self.warned = True
            log.warning("%s step %d: %d label tokens lay beyond lm_rows=%d label positions of their sample and were "
                        "left out of the LM loss (count/lm_dropped in history.jsonl); raise lm_rows (0: every "
                        "position)", self.stage, step, int(metrics["count/lm_dropped"]), self.lm_rows)
        speed = self.speed(tokens, dt)
        record = {"stage": self.stage, "step": step, "global_step": self.offset + step, **metrics, **speed,
                  "nonfinite_total": nonfinite_total}
        if self.file is not None and (step % self.log_every == 0 or step == self.total):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            self.scalars("train", {k: v for k, v in record.items() if k not in ("stage", "step", "global_step")
                                   and not k.startswith("count/")}, self.offset + step)
        if self.bar is not None:
            self.bar.update(1)
            postfix = {"loss": f"{metrics['loss/total']:.4f}", "tok_s": f"{speed['tokens_per_s']:,.0f}"}
            if "mfu" in speed:
                postfix["mfu"] = f"{speed['mfu']:.1%}"
            elif "tflops_per_s_per_device" in speed:
                postfix["tflop_s"] = f"{speed['tflops_per_s_per_device']:.3g}"
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def read_jsonl(path: str) -> list[dict]:
    """The records of an append-only JSONL log. A torn last line (a process killed or a disk filled mid-write)
    is dropped; a bad line before it is a `DataError` naming the file and line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    out = []
    for k, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as e:
            if k == len(lines) - 1:
                log.warning("%s:%d: dropping a torn last line (%s)", path, i, e)
                break
            raise DataError(f"{path}:{i}: not a JSON record ({e}); only the last line of an append-only log may be "
                            f"torn") from None
        out.append(record)
    return out


def truncate_history(path: str, step: int) -> None:
    """Drop history lines after `step` (a resumed stage re-logs the steps after its checkpoint) and a torn
    last line; the file is replaced atomically."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


def short(m: Mapping[str, float]) -> str:
    """The headline metrics on one line."""
    keys = ("rec/acc@0.5", "temporal/r1@0.5", "highlight/hit@1", "mc/acc", "mc_cloze/acc", "mask/l1", "track/jf",
            "track/auc")
    return ", ".join(f"{k} {m[k]:.3f}" for k in keys if k in m)


def _pyplot():
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if len(y) < 3 or n <= 1:
        return y
    n = min(n, len(y))
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:n] / np.arange(1, n)
    return np.concatenate([head, (c[n:] - c[:-n]) / n])


def read_history(workdir: str, stages: Sequence[str]) -> list[dict]:
    """The logged steps of `stages` (WORKDIR/<stage>/history.jsonl), in order."""
    out = []
    for stage in stages:
        path = os.path.join(workdir, stage, "history.jsonl")
        if os.path.exists(path):
            out += read_jsonl(path)
    return out


def loss_window(history: Sequence[Mapping], stage: str, key: str = "loss/total", window: int = WINDOW):
    """(mean of the first `window` logged values of `key` in `stage`, mean of the last `window`, the window used:
    a quarter of the stage when it has fewer than 4 × `window` logged steps), or None without history."""
    y = np.asarray([h[key] for h in history if h["stage"] == stage and key in h and np.isfinite(h[key])])
    if not len(y):
        return None
    n = max(1, min(window, len(y) // 4))
    return float(y[:n].mean()), float(y[-n:].mean()), n


def plot_curves(history: Sequence[Mapping], path: str, stage_starts: Mapping[str, int] | None = None) -> None:
    """Loss terms and gradient norm against the global step: each logged step (grey) and a moving average of
    `SMOOTH` logged steps within each stage (blue); dashed lines mark where each stage starts."""
    plt = _pyplot()
    keys = [k for k in CURVES if any(k in h for h in history)]
    cols = 3
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.1 * rows + 0.6), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for stage in dict.fromkeys(h["stage"] for h in history):
            pts = [(h["global_step"], h[key]) for h in history
                   if h["stage"] == stage and key in h and np.isfinite(h[key])]
            if pts:
                x, y = map(np.asarray, zip(*pts))
                ax.plot(x, y, color="0.75", linewidth=0.7, label="each logged step")
                ax.plot(x, _smooth(y, SMOOTH), color="C0", linewidth=1.5, label=f"moving average ({SMOOTH} steps)")
        for name, start in (stage_starts or {}).items():
            ax.axvline(start, color="C3", linestyle="--", linewidth=0.8, label="stage start")
            ax.text(start, 1.0, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7, va="top", color="C3")
        title = key
        if key == "loss/total":
            title += "\n(weighted sum: weights and task mixture change per stage)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("global step", fontsize=8)
        ax.set_ylabel("gradient norm" if key == "grad_norm" else "loss", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metric_names(metrics: Mapping[str, float]) -> list[str]:
    return [k for k in metrics if k.rsplit("/", 1)[-1] in HIGHER_IS_BETTER]


def _columns(before: Mapping[str, float], stages: Mapping[str, Mapping[str, float]]):
    return [("before", before)] + [(f"after {s}", m) for s, m in stages.items()]


def plot_metrics(before: Mapping[str, float], stages: Mapping[str, Mapping[str, float]], path: str) -> None:
    """One panel per evaluation metric: its value before training and after each stage (`stages`, in order)."""
    plt = _pyplot()
    columns = _columns(before, stages)
    keys = [k for k in metric_names(before) if all(k in m for _, m in columns)]
    cols = 5
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.9 * rows), squeeze=False)
    colours = ["0.6"] + [f"C{i}" for i in range(len(columns) - 1)]
    for ax, key in zip(axes.flat, keys):
        vals = [float(m[key]) for _, m in columns]
        ax.bar(range(len(vals)), vals, color=colours)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(vals)), [n.replace("after ", "") for n, _ in columns], fontsize=7)
        name = key.rsplit("/", 1)[-1]
        better = "higher" if HIGHER_IS_BETTER[name] > 0 else "lower"
        ax.set_title(f"{key} ({better} is better)", fontsize=8)
        ax.set_ylabel(UNITS.get(name, "value"), fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylim(0, max(max(vals) * 1.2, 1e-6))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("validation metrics before training and after each stage", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metrics_table(before: Mapping[str, float], stages: Mapping[str, Mapping[str, float]]) -> str:
    """Aligned text table: metric, before, after each stage, and the change from before to the last stage,
    signed so that + is better (a lower-is-better metric that fell shows +)."""
    columns = _columns(before, stages)
    names = [n.replace("after ", "") for n, _ in columns]
    keys = [k for k in metric_names(before) if all(k in m for _, m in columns)]
    width = max([20] + [len(k) + 1 for k in keys])
    lines = [f"{'metric':<{width}}" + "".join(f"{n:>9}" for n in names) + f"{'better by':>11}"]
    for key in keys:
        sign = HIGHER_IS_BETTER[key.rsplit("/", 1)[-1]]
        vals = [float(m[key]) for _, m in columns]
        lines.append(f"{key:<{width}}" + "".join(f"{v:>9.3f}" for v in vals) + f"{sign * (vals[-1] - vals[0]):>+11.3f}")
    lines.append("(better by: last column minus before, + = improved; mask/l1 is lower-is-better, so + means it fell)")
    return "\n".join(lines)


GENERATED = ("rec/acc@0.5", "rec/miou", "temporal/r1@0.5", "temporal/miou", "highlight/hit@1", "mc/acc", "mask/l1")


def generation_table(after: Mapping[str, float]) -> str:
    """Aligned text table of the final evaluation: each headline metric teacher-forced and from the generated
    answers (`gen/<key>`), and the fraction of examples that emitted the task's token (`gen/<task>/emitted`)."""
    lines = ["teacher-forced vs generated answers (final evaluation; generated: greedy, heads at the emitted task "
             "tokens)", f"{'metric':<20}{'teacher':>9}{'generated':>11}{'emitted':>9}"]
    for key in GENERATED:
        if f"gen/{key}" not in after:
            continue
        task = "temporal" if key.startswith("highlight/") else key.split("/")[0]
        emitted = float(after.get(f"gen/{task}/emitted", float("nan")))
        lines.append(f"{key:<20}{float(after.get(key, float('nan'))):>9.3f}{float(after[f'gen/{key}']):>11.3f}"
                     f"{emitted:>9.3f}")
    return "\n".join(lines)


def write_reports(workdir: str, metrics: Mapping, stage_starts: Mapping[str, int], wall_s: float,
                  compile_s: Mapping[str, float] | None = None) -> str:
    """curves.png and (with evaluation) metrics.png in `workdir`; returns the end-of-run summary text.
    `stage_starts`: the global step where each stage of the run starts, in order; `metrics`: the run's
    metrics.json."""
    history = read_history(workdir, list(stage_starts))
    stages = {s: m for s, m in metrics.get("stages", {}).items() if s in stage_starts}
    plot_curves(history, os.path.join(workdir, "curves.png"),
                {s: g for s, g in stage_starts.items() if any(h["stage"] == s for h in history)})
    if "before" in metrics:
        plot_metrics(metrics["before"], stages, os.path.join(workdir, "metrics.png"))
    lines = [f"tpo-train: {workdir}  ({wall_s:.0f} s)"]
    for stage in stage_starts:
        steps = [h["step"] for h in history if h["stage"] == stage]
        win = loss_window(history, stage)
        if not steps or win is None:
            continue
        comp = f", first step (compile) {compile_s[stage]:.0f} s" if (compile_s or {}).get(stage) else ""
        lines.append(f"  {stage}: {steps[-1]} steps, loss {win[0]:.3f} -> {win[1]:.3f} (mean of the first and of "
                     f"the last {win[2]} logged steps){comp}")
    if "before" in metrics:
        lines.append(metrics_table(metrics["before"], stages))
        if any(k.startswith("gen/") for k in metrics.get("after", {})):
            lines.append(generation_table(metrics["after"]))
        lines.append(f"metrics: {os.path.join(workdir, 'metrics.json')}; plots: curves.png, metrics.png")
    else:
        lines.append(f"evaluation off (eval.enabled=false): tpo-eval --workdir {workdir} scores the checkpoint; "
                     f"plot: curves.png")
    lines.append(f"tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
    return "\n".join(lines)

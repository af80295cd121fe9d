"""End-of-run outputs: PNG of the training curves, PNG of the before/after metrics, a text summary."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from tpo_jax.train.metrics import HIGHER_IS_BETTER

CURVES = ("loss/total", "loss/lm", "loss/region", "loss/temporal", "loss/mask", "grad_norm")


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


def plot_curves(history: Sequence[Mapping], path: str, stage_starts: Mapping[str, int] | None = None) -> None:
    """Loss terms and gradient norm against the global step (raw and moving average); dashed lines
    mark where each stage starts."""
    plt = _pyplot()
    keys = [k for k in CURVES if any(k in h for h in history)]
    cols = 3
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(h["global_step"], h[key]) for h in history if key in h and np.isfinite(h[key])]
        if pts:
            x, y = map(np.asarray, zip(*pts))
            ax.plot(x, y, color="0.75", linewidth=0.7)
            ax.plot(x, _smooth(y, 20), color="C0", linewidth=1.5)
        for name, start in (stage_starts or {}).items():
            ax.axvline(start, color="C3", linestyle="--", linewidth=0.8)
            ax.text(start, 1.0, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7, va="top", color="C3")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metric_names(metrics: Mapping[str, float]) -> list[str]:
    return [k for k in metrics if k.rsplit("/", 1)[-1] in HIGHER_IS_BETTER]


def plot_metrics(before: Mapping[str, float], after: Mapping[str, float], path: str) -> None:
    """One small panel per evaluation metric with its value before and after training."""
    plt = _pyplot()
    keys = [k for k in metric_names(before) if k in after]
    cols = 5
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        vals = [float(before[key]), float(after[key])]
        ax.bar(["before", "after"], vals, color=["0.6", "C2"])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
        better = "higher" if HIGHER_IS_BETTER[key.rsplit("/", 1)[-1]] > 0 else "lower"
        ax.set_title(f"{key} ({better} better)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, max(max(vals) * 1.2, 1e-6))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metrics_table(before: Mapping[str, float], after: Mapping[str, float]) -> str:
    """Aligned text table: metric, before, after, change (signed so that + is better)."""
    lines = [f"{'metric':<20}{'before':>9}{'after':>9}{'better by':>11}"]
    for key in metric_names(before):
        if key not in after:
            continue
        sign = HIGHER_IS_BETTER[key.rsplit("/", 1)[-1]]
        b, a = float(before[key]), float(after[key])
        lines.append(f"{key:<20}{b:>9.3f}{a:>9.3f}{sign * (a - b):>+11.3f}")
    return "\n".join(lines)

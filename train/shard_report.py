"""What each sharding strategy costs per device, from an ahead-of-time compile (`tpo-shard-report`,
whose command line is `tpo_jax.cli.shard_report`).

For a model config, a training stage and a list of plans (`strategy:DATAxFSDPxTENSOR`), the train
step is lowered over abstract arrays (nothing is allocated) and compiled for fake CPU devices
(`--xla_force_host_platform_device_count`, set before JAX is imported). Per plan it reports, per
device:

* trainable / frozen parameter, optimizer-state and batch bytes: exact, from each array's shard shape;
* temp bytes (activations kept for the backward pass and scratch) from `compiled.memory_analysis()`;
* FLOPs from `compiled.cost_analysis()`;
* the number and result bytes of every all-gather, reduce-scatter, all-reduce, all-to-all and
  collective-permute in the compiled HLO text (static count: an op inside a loop counts once).

With `--layers A,B` the step is compiled with A and B LLM layers / ViT blocks instead of the full
depth, and temp bytes, FLOPs and collectives are extrapolated linearly per layer (parameter bytes
are always exact). Output: a Markdown table on stdout; with `--out PREFIX` also PREFIX.md, a bar chart
PREFIX.png and the numbers as PREFIX.json (rewritten after each plan).

    tpo-shard-report --config videochat_tpo_7b --stage stage3 --plans fsdp:1x8x1,tp:1x1x8 --layers 1,2
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from tpo_jax.train.hlo import COLLECTIVES, collective_stats

DEPTH_FIELDS = ("llm.num_layers", "vit.depth")  # per-layer extrapolation knobs


# ------------------------------------------------------------------------------------------------
# Pieces that need no JAX
# ------------------------------------------------------------------------------------------------

def parse_plan(text: str):
    """'fsdp:1x8x1' → ('fsdp', MeshConfig(1, 8, 1))."""
    from tpo_jax.config import ConfigError
    from tpo_jax.sharding import RULES, MeshConfig
    try:
        strategy, shape = text.split(":")
        data, fsdp, tensor = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        raise ConfigError(f"config field 'plans': {text!r} is not STRATEGY:DATAxFSDPxTENSOR, e.g. fsdp:1x8x1") from None
    if min(data, fsdp, tensor) < 1:
        raise ConfigError(f"config field 'plans': mesh sizes in {text!r} must be positive integers")
    if strategy not in RULES:
        raise ConfigError(f"config field 'plans': unknown strategy {strategy!r} in {text!r}; known: {sorted(RULES)}")
    return strategy, MeshConfig(data=data, fsdp=fsdp, tensor=tensor)


_UNIT = {"name": "GiB", "scale": 2**30}


def _gb(x: float) -> str:
    return f"{x / _UNIT['scale']:.2f}"


def _pick_unit(rows) -> str:
    big = max((r["peak"] for _, r in rows), default=0.0) >= 2**30
    _UNIT.update(name="GiB" if big else "MiB", scale=2**30 if big else 2**20)
    return _UNIT["name"]


def layer_slopes(measured: dict[tuple[int, ...], dict], base: tuple[int, ...]) -> list[dict]:
    """Per knob k: the change of every number in `measured` per added layer of knob k.

    `measured` holds the base depths and, for each knob k, the base with knob k raised."""
    out = []
    for k in range(len(base)):
        raised = next(d for d in measured if d != base and all(d[j] == base[j] for j in range(len(base)) if j != k))
        out.append(_zip_numbers(measured[raised], measured[base], lambda x, y, dk=raised[k] - base[k]: (x - y) / dk))
    return out


def extrapolate(measured: dict[tuple[int, ...], dict], base: tuple[int, ...], full: tuple[int, ...]) -> dict:
    """Linear per-layer extrapolation of every number in `measured[depths]` to the `full` depths."""
    out = _zip_numbers(measured[base], measured[base], lambda x, _: x)
    for k, slope in enumerate(layer_slopes(measured, base)):
        out = _zip_numbers(out, slope, lambda x, y, n=full[k] - base[k]: x + y * n)
    return out


# ------------------------------------------------------------------------------------------------
# Compile and measure (imports JAX)
# ------------------------------------------------------------------------------------------------

def abstract_batch(model_cfg, global_batch: int, seq_len: int) -> dict:
    """ShapeDtypeStructs of a training batch (the keys of `tpo_jax.losses`), batch dim `global_batch`."""
    import jax
    import numpy as np
    b, tmp, vit = global_batch, model_cfg.heads.temporal, model_cfg.vit
    lv, lq = vit.num_frames // vit.tubelet_size, tmp.max_text_len
    kr, ns = model_cfg.heads.region.max_slots, tmp.max_spans
    i32, f32, bool_ = np.int32, np.float32, np.bool_
    shapes = {
        "input_ids": ((b, seq_len), i32), "attention_mask": ((b, seq_len), i32), "labels": ((b, seq_len), i32),
        "visual_mask": ((b, seq_len), bool_), "frames": ((b, vit.num_frames, vit.img_size, vit.img_size, 3), f32),
        "region_boxes": ((b, kr, 4), f32), "region_valid": ((b, kr), bool_),
        "mask_boxes": ((b, 4), f32), "mask_valid": ((b,), bool_),
        "temporal_valid": ((b,), bool_), "spans": ((b, ns, 2), f32), "span_valid": ((b, ns), bool_),
        "saliency_labels": ((b, lv), f32), "saliency_pos": ((b, 2), i32), "saliency_neg": ((b, 2), i32),
        "vid_mask": ((b, lv), f32), "text_mask": ((b, lq), f32), "vid": ((b,), i32),
    }
    if tmp.feature_source == "batch":
        shapes.update(video_feats=((b, lv, tmp.vid_dim), f32), text_feats=((b, lq, tmp.txt_dim), f32))
    else:
        shapes.update(temporal_text_ids=((b, lq), i32))
    return {k: jax.ShapeDtypeStruct(s, np.dtype(d)) for k, (s, d) in shapes.items()}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def measure(model_cfg, train_cfg, strategy: str, mesh_cfg, *, batch_per_shard: int, seq_len: int,
            frozen_dtype: str | None = None) -> dict:
    """Compile the sharded train step for one plan over abstract arrays and return its numbers."""
    import jax

    from tpo_jax.sharding import get_rules, make_mesh, shard_bytes
    from tpo_jax.train.step import make_train_step, train_shardings

    n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
    if n > jax.device_count():
        raise ValueError(f"plan {strategy}:{mesh_cfg} needs {n} devices, JAX has {jax.device_count()}; "
                         f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before importing jax")
    mesh = make_mesh(mesh_cfg, jax.devices()[:n])
    rules = get_rules(strategy)
    graphdef, tx, sh = train_shardings(model_cfg, train_cfg, mesh, rules, frozen_dtype=frozen_dtype)
    global_batch = batch_per_shard * mesh.shape["data"] * mesh.shape["fsdp"]
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh.batch)
             for k, v in abstract_batch(model_cfg, global_batch, seq_len).items()}
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sh.replicated)
    step = make_train_step(graphdef, tx, model_cfg, train_cfg, shardings=sh)
    t0 = time.perf_counter()
    compiled = step.lower(sh.abstract_state, sh.abstract_frozen, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state = sh.abstract_state
    params = shard_bytes(state.params, sh.state.params)[0]
    opt = shard_bytes(state.opt_state, sh.state.opt_state)[0]
    frozen = shard_bytes(sh.abstract_frozen, sh.frozen)[0]
    batch_bytes = shard_bytes(batch, jax.tree.map(lambda _: sh.batch, batch))[0]
    temp = float(mem.temp_size_in_bytes)
    peak = params + opt + frozen + batch_bytes + temp
    return {
        "devices": n, "global_batch": global_batch, "compile_s": compile_s,
        "params": params, "opt": opt, "frozen": frozen, "batch": batch_bytes,
        "temp": temp, "peak": peak, "flops": _flops(compiled), "xla_argument_bytes": mem.argument_size_in_bytes,
        "collectives": collective_stats(compiled.as_text()),
    }


def _depths(cfg) -> tuple[int, ...]:
    return (cfg.llm.num_layers, cfg.vit.depth)


def measure_plan(model_cfg, train_cfg, strategy, mesh_cfg, *, layers: tuple[int, int] | None, **kw) -> dict:
    """`measure` at full depth, or extrapolated from reduced depths (exact bytes stay exact).

    Extrapolation: one compile at depths (A, A) with the train config as given, and three with the head
    losses off at (A, A), (B, A), (A, B) (LLM layers, ViT blocks): the per-layer slopes come from the
    cheaper head-less compiles (the heads add the same constant to both ends of each slope), and
    value(full) = value(A, A) + Σ_k slope_k · (full_k − A).
    """
    from tpo_jax.config import replace
    if layers is None:
        return dict(measure(model_cfg, train_cfg, strategy, mesh_cfg, **kw), extrapolated=False)
    lo, hi = layers
    full = _depths(model_cfg)
    base = (lo,) * len(full)
    no_heads = dataclasses.replace(train_cfg, heads=())
    keys = ("temp", "flops", "collectives")
    compile_s = 0.0

    def run_at(depths, cfg_train):
        nonlocal compile_s
        m = measure(replace(model_cfg, **dict(zip(DEPTH_FIELDS, depths))), cfg_train, strategy, mesh_cfg, **kw)
        compile_s += m["compile_s"]
        return m

    first = run_at(base, train_cfg)
    measured = {base: {k: first[k] for k in keys}}
    if train_cfg.heads != ():
        slopes_base = run_at(base, no_heads)
        slopes_base = {k: slopes_base[k] for k in keys}
    else:
        slopes_base = measured[base]
    slope_points = {base: slopes_base}
    for k in range(len(full)):
        depths = tuple(hi if j == k else lo for j in range(len(full)))
        slope_points[depths] = {key: v for key, v in run_at(depths, no_heads).items() if key in keys}
    ext = extrapolate(slope_points, base, full)
    slopes = {field: {key: slope[key] for key in ("temp", "flops")}
              for field, slope in zip(DEPTH_FIELDS, layer_slopes(slope_points, base))}
    delta = _sub(ext, slopes_base)
    ext = _add(measured[base], delta)
    exact = measure_exact_bytes(model_cfg, train_cfg, strategy, mesh_cfg, kw.get("frozen_dtype"))
    args = exact["params"] + exact["opt"] + exact["frozen"] + first["batch"]
    collectives = {k: {f: max(0.0, v[f]) for f in v} for k, v in ext["collectives"].items()}
    return dict(devices=first["devices"], global_batch=first["global_batch"], batch=first["batch"], **exact,
                temp=ext["temp"], flops=ext["flops"], collectives=collectives, peak=ext["temp"] + args,
                compile_s=compile_s, extrapolated=True, layers=(lo, hi), per_layer=slopes)


def _zip_numbers(a, b, op):
    if isinstance(a, dict):
        return {k: _zip_numbers(a[k], b[k], op) for k in a}
    return op(float(a), float(b))


def _sub(a, b):
    return _zip_numbers(a, b, lambda x, y: x - y)


def _add(a, b):
    return _zip_numbers(a, b, lambda x, y: x + y)


def measure_exact_bytes(model_cfg, train_cfg, strategy, mesh_cfg, frozen_dtype) -> dict:
    """Per-device parameter / optimizer / frozen bytes of the full model from shard shapes only."""
    import jax

    from tpo_jax.sharding import get_rules, make_mesh, shard_bytes
    from tpo_jax.train.step import train_shardings
    mesh = make_mesh(mesh_cfg, jax.devices()[:mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor])
    _, _, sh = train_shardings(model_cfg, train_cfg, mesh, get_rules(strategy), frozen_dtype=frozen_dtype)
    return {"params": shard_bytes(sh.abstract_state.params, sh.state.params)[0],
            "opt": shard_bytes(sh.abstract_state.opt_state, sh.state.opt_state)[0],
            "frozen": shard_bytes(sh.abstract_frozen, sh.frozen)[0]}


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

def to_markdown(rows: Sequence[tuple[str, dict]], header: str = "") -> str:
    u = _pick_unit(rows)
    lines = [header, ""] if header else []
    lines += [f"Per device, in {u} (2^{30 if u == 'GiB' else 20} bytes). *peak* = params + frozen + optimizer + "
              "batch + temp (the state is donated, so updates reuse its buffers); temp from XLA:CPU's buffer "
              "assignment. *batch* = examples per step.",
              "",
              "| plan | devices | batch | trainable params | frozen params | optimizer | batch arrays | "
              "temp | peak | GFLOP/device |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['devices']} | {r['global_batch']} | {_gb(r['params'])} | {_gb(r['frozen'])} | "
                     f"{_gb(r['opt'])} | {_gb(r['batch'])} | {_gb(r['temp'])} | {_gb(r['peak'])} | "
                     f"{r['flops'] / 1e9:,.0f} |")
    lines += ["", f"Collectives per device per step (count / {u} of results):", "",
              "| plan | " + " | ".join(COLLECTIVES) + " |", "|---|" + "---|" * len(COLLECTIVES)]
    for name, r in rows:
        cells = [f"{r['collectives'][k]['count']:.0f} / {_gb(r['collectives'][k]['bytes'])}" for k in COLLECTIVES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [r for _, r in rows if r.get("extrapolated")]
    if notes:
        lo, hi = notes[0]["layers"]
        lines += ["", f"Temp bytes, FLOPs and collectives are extrapolated linearly per layer: measured with {lo} LLM "
                      f"layer(s) and {lo} ViT block(s), plus per-layer slopes from compiles with {hi} LLM layers or "
                      f"{hi} ViT blocks (head losses off in the slope compiles). Parameter, optimizer and batch "
                      f"bytes are exact for the full model."]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[tuple[str, dict]], path: str, title: str = "", budget_gb: float | None = 80.0) -> None:
    """Stacked bars per plan: memory per device and collective bytes, each in GiB or, when every bar is under
    1 GiB, in MiB. The `budget_gb` GB line is drawn when the tallest bar reaches a tenth of it (else its value
    is named in the title, so small models' bars stay readable)."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n, _ in rows]

    def unit(values):
        return ("GiB", 2**30) if max(values, default=0.0) >= 2**30 else ("MiB", 2**20)

    fig, (ax_mem, ax_col) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows) + 4), 4.5))
    mem_parts = (("params", "trainable params"), ("frozen", "frozen params"), ("opt", "optimizer"),
                 ("batch", "batch"), ("temp", "temp (activations)"))
    mem_unit, mem_scale = unit([sum(r[k] for k, _ in mem_parts) for _, r in rows])
    bottom = [0.0] * len(rows)
    for key, label in mem_parts:
        vals = [r[key] / mem_scale for _, r in rows]
        ax_mem.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    mem_title = "memory per device"
    if budget_gb:
        budget = budget_gb * 1e9 / mem_scale
        if max(bottom, default=0.0) >= 0.1 * budget:
            ax_mem.axhline(budget, color="k", ls="--", lw=1, label=f"{budget_gb:.0f} GB GPU")
        else:
            mem_title += f" (far below {budget_gb:.0f} GB, a GPU's memory)"
    ax_mem.set_ylim(0, 1.4 * max(max(bottom, default=0.0), 1e-9))  # room for the legend above the bars
    ax_mem.set_ylabel(f"{mem_unit} per device")
    ax_mem.set_title(mem_title, fontsize=10)
    ax_mem.legend(fontsize=7)
    col_unit, col_scale = unit([sum(r["collectives"][k]["bytes"] for k in COLLECTIVES) for _, r in rows])
    bottom = [0.0] * len(rows)
    for kind in COLLECTIVES:
        vals = [r["collectives"][kind]["bytes"] / col_scale for _, r in rows]
        ax_col.bar(names, vals, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax_col.set_ylim(0, 1.4 * max(max(bottom, default=0.0), 1e-9))
    ax_col.set_ylabel(f"{col_unit} of collective results per device per step")
    ax_col.set_title("collectives", fontsize=10)
    ax_col.legend(fontsize=7, loc="upper left")
    for ax in (ax_mem, ax_col):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title.replace("`", ""), 110)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

DEFAULT_PLANS = "dp:8x1x1,fsdp:1x8x1,tp:1x1x8,fsdp_tp:1x4x2"

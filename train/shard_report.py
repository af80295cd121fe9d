"""What each sharding plan costs per device, from an ahead-of-time compile (`tpo-shard-report`,
whose command line is `tpo_jax.cli.shard_report`).

For a model config, a training stage and a list of plans (`strategy:DATAxFSDPxTENSOR`), the real train step
(full depth, the config's stacks with their scan and remat policy, its dtype policy, the micro-batches) is
lowered over abstract arrays (nothing is allocated) and compiled, either

* for a TPU topology (`--topology v5p:2x2x2`), by libtpu on this machine: no TPU needed
  (`tpo_jax.train.topology`), and the memory is what the chip would hold; or
* for fake XLA:CPU devices (no `--topology`): XLA:CPU's buffer assignment and fusion, labelled as such.

Per plan, per device:

* trainable / frozen parameter, optimizer-state and batch bytes, exact from each array's shard shape; the
  arguments as the device lays them out (TPU tiles pad small dims), the temp buffers (activations kept for the
  backward pass, scratch) and the peak = arguments + outputs + temp − what the donated state reuses, from
  `compiled.memory_analysis()`;
* model FLOPs (no remat recomputation; the MFU numerator) and executed FLOPs (with it), counted from the jaxpr
  (`tpo_jax.train.flops`); XLA's own count beside them sees each loop body once;
* every all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute per step, count and
  result bytes, loop bodies times their trips (`tpo_jax.train.hlo`);
* with a chip (the topology's, or `--chip` for CPU figures): whether the peak fits its HBM, and a roofline
  step time and MFU (`estimate`).

`search` compiles the candidate plans for a global batch (mesh shapes, strategies, remat policies,
micro-batches) and ranks those that fit. Output: a Markdown table on stdout; with `--out PREFIX` also
PREFIX.md, a bar chart PREFIX.png and the numbers as PREFIX.json (rewritten after each plan).

    tpo-shard-report --config videochat_tpo_7b --stage stage3 --topology v5p:2x2x2 --plans fsdp:1x8x1 \
        --batch-per-shard 16 --micro-batches 2
    tpo-shard-report --config videochat_tpo_7b --topology v5p:2x2x2 --search --global-batch 128
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from typing import Iterator, Mapping, Sequence

from tpo_jax.train.hlo import COLLECTIVES

REMAT_ORDER = ("none", "dots_with_no_batch_dims_saveable", "full")  # least recomputation first
_HBM_NEED_RE = re.compile(r"memory required for HLO temporaries \(([0-9.]+)([KMGT])\)")


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


def plan_name(strategy: str, mesh_cfg) -> str:
    return f"{strategy}:{mesh_cfg.data}x{mesh_cfg.fsdp}x{mesh_cfg.tensor}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_plans(chips: int, global_batch: int, strategies: Sequence[str], max_tensor: int = 8) -> Iterator[tuple]:
    """(strategy, MeshConfig, examples per data×fsdp shard) for every mesh data × fsdp × tensor = `chips` whose
    batch shards divide `global_batch`, `tensor` ≤ `max_tensor` (the 7B LLM has 8 KV heads). Each shape gets the
    strategy that uses its axes: dp (data only), fsdp (no tensor), tp (no fsdp), fsdp_tp."""
    from tpo_jax.sharding import MeshConfig
    for tensor in (t for t in _divisors(chips) if t <= max_tensor):
        for data in _divisors(chips // tensor):
            fsdp = chips // tensor // data
            strategy = ("dp" if fsdp == 1 else "fsdp") if tensor == 1 else ("tp" if fsdp == 1 else "fsdp_tp")
            if strategy not in strategies or global_batch % (data * fsdp):
                continue
            yield strategy, MeshConfig(data=data, fsdp=fsdp, tensor=tensor), global_batch // (data * fsdp)


def hbm_needed(error: str) -> float | None:
    """The temp bytes a TPU compile said it needed, from its out-of-memory message."""
    m = _HBM_NEED_RE.search(error)
    if not m:
        return None
    return float(m.group(1)) * 2 ** (10 * "KMGT".index(m.group(2)) + 10)


_UNIT = {"name": "GiB", "scale": 2**30}


def _gb(x: float) -> str:
    return f"{x / _UNIT['scale']:.2f}"


def _flop_text(x: float) -> str:
    return f"{x / 1e12:,.2f} T" if x >= 1e11 else f"{x / 1e9:,.3g} G"


def _time_text(x: float) -> str:
    return f"{x:.3g} s" if x >= 1 else f"{x * 1e3:.3g} ms"


def _pick_unit(rows) -> str:
    big = max((r.get("peak", 0.0) for _, r in rows), default=0.0) >= 2**30
    _UNIT.update(name="GiB" if big else "MiB", scale=2**30 if big else 2**20)
    return _UNIT["name"]


# ------------------------------------------------------------------------------------------------
# Compile and measure (imports JAX)
# ------------------------------------------------------------------------------------------------

def abstract_batch(model_cfg, global_batch: int, seq_len: int) -> dict:
    """ShapeDtypeStructs of a training batch (the keys of `tpo_jax.losses`), batch dim `global_batch`."""
    import jax
    import numpy as np
    b, tmp = global_batch, model_cfg.heads.temporal
    lv, lq = model_cfg.num_clips, tmp.max_text_len
    frames, size = model_cfg.num_frames, model_cfg.frame_size
    if seq_len <= model_cfg.num_visual_tokens:
        from tpo_jax.config import ConfigError
        raise ConfigError(f"config field 'seq_len': {seq_len} tokens do not hold the {model_cfg.num_visual_tokens} "
                          f"visual rows of one sample ({model_cfg.arch}); give a longer --seq-len")
    kr, ns = model_cfg.heads.region.max_slots, tmp.max_spans
    i32, f32, bool_ = np.int32, np.float32, np.bool_
    shapes = {
        "input_ids": ((b, seq_len), i32), "attention_mask": ((b, seq_len), i32), "labels": ((b, seq_len), i32),
        "visual_mask": ((b, seq_len), bool_), "frames": ((b, frames, size, size, 3), f32),
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


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"xla_flops": float(cost.get("flops", float("nan"))),
            "xla_seconds": float(cost.get("optimal_seconds", float("nan")))}


def estimate(r: dict, chip) -> dict:
    """Step time and MFU of one measured plan on `chip` (a `tpo_jax.train.chips.Chip`), and whether it fits.

    * compute_s: executed FLOPs per chip (remat recomputation included) at the chip's peak bf16 FLOP/s;
    * comm_s: the bytes of every collective's results per step (loop trips counted) over the chip's
      bidirectional inter-chip bandwidth;
    * step_s = max(compute_s, comm_s) (communication overlapped with compute) and mfu = model FLOPs per
      chip / (step_s · peak). This is a roofline bound: it assumes the MXUs run at peak and collectives
      overlap perfectly, so a real step is slower and its MFU lower.
    * xla_mfu: the same from XLA's own `optimal_seconds`, only when that estimate is meaningful (positive, and
      no while loop in the program: XLA costs a loop body once, so a scanned stack looks one layer deep).
    """
    comm_bytes = sum(v["bytes"] for v in r["collectives_per_step"].values())
    compute_s = r["flops"] / chip.peak_flops
    comm_s = comm_bytes / chip.ici_bandwidth
    step_s = max(compute_s, comm_s)
    trusted = r["xla_seconds"] > 0 and r["while_loops"] == 0
    return {"chip": chip.name, "hbm": chip.hbm_bytes, "fits": r["peak"] <= chip.hbm_bytes,
            "compute_s": compute_s, "comm_s": comm_s, "step_s": step_s,
            "mfu": r["model_flops"] / (step_s * chip.peak_flops) if step_s > 0 else float("nan"),
            "xla_trusted": trusted,
            "xla_mfu": r["model_flops"] / (r["xla_seconds"] * chip.peak_flops) if trusted else None}


def measure(model_cfg, train_cfg, strategy: str, mesh_cfg, *, batch_per_shard: int, seq_len: int,
            frozen_dtype: str | None = None, devices=None, chip=None,
            compiler_options: Mapping[str, str] | None = None) -> dict:
    """Compile the sharded train step for one plan over abstract arrays and return its numbers, per device.

    `devices`: the devices to build the mesh from (a TPU topology's, `tpo_jax.train.topology`; default: JAX's
    own, fake CPU devices). `chip`: add the step-time / MFU estimate and the fit against its HBM (`estimate`).
    `compiler_options`: XLA debug options for this compile (`Lowered.compile(compiler_options=...)`), e.g.
    `{"xla_disable_hlo_passes": "all-gather-simplifier"}` around a compiler crash.
    """
    import jax

    from tpo_jax.sharding import get_rules, make_mesh, shard_bytes
    from tpo_jax.train import flops as F
    from tpo_jax.train import hlo as H
    from tpo_jax.train.step import make_train_step, train_shardings

    devices = list(jax.devices() if devices is None else devices)
    n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
    if n > len(devices):
        raise ValueError(f"plan {strategy}:{mesh_cfg} needs {n} devices, there are {len(devices)}; "
                         f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before importing jax")
    mesh = make_mesh(mesh_cfg, devices[:n])
    rules = get_rules(strategy)
    graphdef, tx, sh = train_shardings(model_cfg, train_cfg, mesh, rules, frozen_dtype=frozen_dtype)
    global_batch = batch_per_shard * mesh.shape["data"] * mesh.shape["fsdp"]
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh.batch)
             for k, v in abstract_batch(model_cfg, global_batch, seq_len).items()}
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sh.replicated)
    # keep_unused: a frozen head the stage does not read still sits in device memory, so it is an argument
    step = make_train_step(graphdef, tx, model_cfg, train_cfg, shardings=sh, keep_unused=True)
    t0 = time.perf_counter()
    traced = step.trace(sh.abstract_state, sh.abstract_frozen, batch, rng)
    compiled = traced.lower().compile(compiler_options=dict(compiler_options) if compiler_options else None)
    compile_s = time.perf_counter() - t0
    model, executed = (F.step_flops_from(traced.jaxpr, model_cfg, train_cfg, batch, model=m) for m in (True, False))
    mem = compiled.memory_analysis()
    state = sh.abstract_state
    text = compiled.as_text()
    argument, output, alias = (float(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias"))
    temp = float(mem.temp_size_in_bytes)
    r = {
        "devices": n, "global_batch": global_batch, "compile_s": compile_s,
        "platform": devices[0].platform, "device_kind": devices[0].device_kind,
        "params": shard_bytes(state.params, sh.state.params)[0], "opt": shard_bytes(state.opt_state, sh.state.opt_state)[0],
        "frozen": shard_bytes(sh.abstract_frozen, sh.frozen)[0],
        "batch": shard_bytes(batch, jax.tree.map(lambda _: sh.batch, batch))[0],
        # the arguments as laid out on the device (TPU tiles pad small dims), the temp buffers, and the peak:
        # arguments + outputs + temp - what the donated state's outputs reuse
        "argument": argument, "temp": temp, "peak": argument + output + temp - alias,
        "model_flops": model.matmul / n, "flops": executed.matmul / n, **_cost(compiled),
        "while_loops": H.while_loops(text), "unknown_trip_loops": len(H.multipliers(text)[1]),
        "collectives": H.collective_stats(text), "collectives_per_step": H.collective_stats(text, per_step=True),
    }
    if chip is not None:
        r.update(estimate(r, chip))
    return r


def with_remat(model_cfg, policy: str):
    """`model_cfg` with every stack it builds (`TPOConfig.stacks`) at remat `policy`."""
    from tpo_jax.config import replace
    return replace(model_cfg, **{f"{s}.stack.remat_policy": policy for s in model_cfg.stacks})


def try_measure(model_cfg, train_cfg, strategy, mesh_cfg, **kw) -> dict:
    """`measure`, with a compile that fails (a TPU compile that runs out of HBM) recorded instead of raised."""
    try:
        return measure(model_cfg, train_cfg, strategy, mesh_cfg, **kw)
    except Exception as e:  # noqa: BLE001 (XLA raises its own types; every failure is a row of the report)
        text = f"{type(e).__name__}: {e}".strip()
        return {"error": text.splitlines()[0][:400], "fits": False, "temp_needed": hbm_needed(text)}


def search(model_cfg, train_cfg, *, chips: int, global_batch: int, seq_len: int, strategies: Sequence[str],
           remats: Sequence[str] = REMAT_ORDER, max_tensor: int = 8, devices=None, chip=None, frozen_dtype=None,
           done: dict | None = None, on_row=None, around=None, plans: Sequence[str] | None = None,
           compiler_options: Mapping[str, str] | None = None) -> list[tuple[str, dict]]:
    """Compile candidate plans for `global_batch` on `chips` devices and return every row, best first.

    Per mesh (`candidate_plans`) and remat policy (least recomputation first), micro-batches go up from
    `train_cfg.micro_batches` (1, or a count an earlier report showed is needed) until
    the step fits the chip's HBM: each compile that does not fit says how much temp it needed, and the next try
    takes the micro-batch count that would bring it under (more micro-batches only shrink the activations and
    add weight gathers). A policy that fits without micro-batching ends the mesh: more recomputation would only
    be slower. `done` (name → row, e.g. an earlier JSON) skips compiles already made; `on_row(name, row)` is
    called after each, and `around(name)` (a context manager, e.g. one capturing XLA's log) around each compile.
    `plans` (names as `plan_name` writes them, e.g. "fsdp:1x8x1") keeps only those meshes. Rows that fit rank by
    estimated MFU.
    """
    done = dict(done or {})
    around = around or (lambda name: contextlib.nullcontext())
    rows: list[tuple[str, dict]] = []
    hbm = chip.hbm_bytes if chip else float("inf")
    for strategy, mesh_cfg, per_shard in candidate_plans(chips, global_batch, strategies, max_tensor):
        if plans is not None and plan_name(strategy, mesh_cfg) not in plans:
            continue
        for policy in remats:
            micro_options = [m for m in _divisors(per_shard * mesh_cfg.data * mesh_cfg.fsdp)
                             if (per_shard * mesh_cfg.data * mesh_cfg.fsdp) // m >= mesh_cfg.data * mesh_cfg.fsdp]
            micro = next((m for m in micro_options if m >= train_cfg.micro_batches), None)
            while micro is not None:
                name = f"{plan_name(strategy, mesh_cfg)} remat={policy} micro={micro}"
                if name in done:
                    r = done[name]
                else:
                    t_cfg = dataclasses.replace(train_cfg, micro_batches=micro)
                    with around(name):
                        r = try_measure(with_remat(model_cfg, policy), t_cfg, strategy, mesh_cfg,
                                        batch_per_shard=per_shard, seq_len=seq_len, frozen_dtype=frozen_dtype,
                                        devices=devices, chip=chip, compiler_options=compiler_options)
                    r.update(plan=plan_name(strategy, mesh_cfg), remat=policy, micro_batches=micro)
                rows.append((name, r))
                if on_row:
                    on_row(name, r)
                fits = r["fits"] = "error" not in r and r["peak"] <= hbm
                if fits:
                    break
                need = r.get("temp_needed") or r.get("temp")
                room = hbm - (r.get("argument") or 0.0)
                bigger = [m for m in micro_options if m > micro]
                if need and room > 0:
                    bigger = [m for m in bigger if m >= micro * need / room] or bigger[-1:]
                micro = bigger[0] if bigger else None
            if micro == 1:
                break
    return rank(rows)


def rank(rows: Sequence[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Rows that fit first, by estimated MFU (best first), then the rest in their order."""
    fit = [(n, r) for n, r in rows if r.get("fits") and "error" not in r]
    rest = [(n, r) for n, r in rows if not (r.get("fits") and "error" not in r)]
    return sorted(fit, key=lambda nr: -nr[1].get("mfu", 0.0)) + rest


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

def to_markdown(rows: Sequence[tuple[str, dict]], header: str = "") -> str:
    ok = [(n, r) for n, r in rows if "error" not in r]
    u = _pick_unit(ok)
    chip = next((r["chip"] for _, r in ok if r.get("chip")), None)
    where = ("compiled by libtpu for the TPU topology" if any(r["platform"] == "tpu" for _, r in ok)
             else "XLA:CPU figures (fake CPU devices; a TPU's buffers and fusions differ)")
    lines = [header, ""] if header else []
    lines += [f"Per device, in {u} (2^{30 if u == 'GiB' else 20} bytes); {where}. *args* = the arguments as laid "
              "out on the device (parameters, frozen weights, optimizer state, batch); *peak* = args + outputs + temp "
              "− what the donated state reuses. FLOPs per device per step: *model* (the MFU numerator, no remat) "
              "and *executed* (with recomputation)." + (
                  f" *step* and *MFU*: a roofline estimate on {chip} (executed FLOPs at peak, collectives over ICI, "
                  "overlapped): an upper bound on a real step's MFU." if chip else ""),
              "",
              "| plan | batch | trainable | frozen | optimizer | batch arrays | args | temp | peak | fits | "
              "model FLOP | executed FLOP | step | MFU |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        if "error" in r:
            need = f" (needs {r['temp_needed'] / 2**30:.1f} GiB of temp)" if r.get("temp_needed") else ""
            lines.append(f"| {name} | | | | | | | | | no | | | | {r['error'][:120]}{need} |")
            continue
        fits = "" if "fits" not in r else ("yes" if r["fits"] else "**no**")
        est = (f"{_time_text(r['step_s'])} | {r['mfu']:.1%}" if "step_s" in r else " | ")
        lines.append(f"| {name} | {r['global_batch']} | {_gb(r['params'])} | {_gb(r['frozen'])} | {_gb(r['opt'])} | "
                     f"{_gb(r['batch'])} | {_gb(r['argument'])} | {_gb(r['temp'])} | {_gb(r['peak'])} | {fits} | "
                     f"{_flop_text(r['model_flops'])} | {_flop_text(r['flops'])} | {est} |")
    lines += ["", f"Collectives per device per step, loop bodies × trips (count / {u} of results):", "",
              "| plan | " + " | ".join(COLLECTIVES) + " |", "|---|" + "---|" * len(COLLECTIVES)]
    for name, r in ok:
        cells = [f"{r['collectives_per_step'][k]['count']:.0f} / {_gb(r['collectives_per_step'][k]['bytes'])}"
                 for k in COLLECTIVES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    xla = [(n, r) for n, r in ok if r.get("xla_seconds") is not None]
    if xla:
        lines += ["", "XLA's own estimates: its FLOPs count a loop body once, and its `optimal_seconds` is only "
                      "trusted for a program without loops:", ""]
        for name, r in xla:
            if r.get("xla_trusted"):
                verdict = f"{_time_text(r['xla_seconds'])}, MFU {r['xla_mfu']:.1%}"
            elif r["xla_seconds"] <= 0 and not r["while_loops"]:
                verdict = f"{r['xla_seconds']:.3g} (no estimate)"
            else:
                loops = f"{r['while_loops']} while loop(s)" + (
                    f", {r['unknown_trip_loops']} with a data-dependent trip count" if r["unknown_trip_loops"] else "")
                verdict = f"{r['xla_seconds']:.3g} s, not trusted ({loops})"
            lines.append(f"* {name}: {_flop_text(r['xla_flops'])}FLOP; optimal_seconds {verdict}")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[tuple[str, dict]], path: str, title: str = "", hbm_bytes: float | None = None) -> None:
    """Per plan: stacked memory per device (with the chip's HBM as a dashed line when given), collective bytes
    per step, and, when the rows carry an estimate, the estimated MFU. GiB, or MiB when every bar is under
    1 GiB. Rows that failed to compile are left out (the table lists them)."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(n, r) for n, r in rows if "error" not in r]
    names = [n.replace(" ", "\n") for n, _ in rows]
    with_mfu = any("mfu" in r for _, r in rows)

    def unit(values):
        return ("GiB", 2**30) if max(values, default=0.0) >= 2**30 else ("MiB", 2**20)

    fig, axes = plt.subplots(1, 3 if with_mfu else 2, figsize=(max(8, (3.2 if with_mfu else 2.2) * len(rows) + 4), 4.8))
    ax_mem, ax_col = axes[0], axes[1]
    mem_parts = (("argument", "arguments (params, frozen, optimizer, batch)"), ("temp", "temp (activations)"))
    mem_unit, mem_scale = unit([r["peak"] for _, r in rows])
    bottom = [0.0] * len(rows)
    for key, label in mem_parts:
        vals = [r[key] / mem_scale for _, r in rows]
        ax_mem.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    top = max(bottom, default=0.0)
    if hbm_bytes:
        ax_mem.axhline(hbm_bytes / mem_scale, color="k", ls="--", lw=1, label=f"HBM {hbm_bytes / 2**30:.0f} GiB")
        top = max(top, hbm_bytes / mem_scale)
    ax_mem.set_ylim(0, 1.4 * max(top, 1e-9))  # room for the legend above the bars
    ax_mem.set_ylabel(f"{mem_unit} per device")
    ax_mem.set_title("memory per device", fontsize=10)
    ax_mem.legend(fontsize=7)
    col_unit, col_scale = unit([sum(r["collectives_per_step"][k]["bytes"] for k in COLLECTIVES) for _, r in rows])
    bottom = [0.0] * len(rows)
    for kind in COLLECTIVES:
        vals = [r["collectives_per_step"][kind]["bytes"] / col_scale for _, r in rows]
        ax_col.bar(names, vals, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax_col.set_ylim(0, 1.4 * max(max(bottom, default=0.0), 1e-9))
    ax_col.set_ylabel(f"{col_unit} of collective results per device per step")
    ax_col.set_title("collectives", fontsize=10)
    ax_col.legend(fontsize=7, loc="upper left")
    if with_mfu:
        ax_mfu = axes[2]
        ax_mfu.bar(names, [100 * r.get("mfu", 0.0) for _, r in rows],
                   color=["tab:green" if r.get("fits") else "tab:red" for _, r in rows])
        ax_mfu.set_ylabel("estimated MFU, % (roofline bound)")
        ax_mfu.set_title("MFU estimate (green: fits in HBM)", fontsize=10)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title.replace("`", ""), 110)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

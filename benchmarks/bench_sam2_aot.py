"""Per-chip memory, FLOPs and compile time of SAM2 video propagation in bf16 on a TPU slice, compiled ahead of time.

`Sam2Video.propagate` of the released SAM2 (`tpo_jax.sam2.config.sam2_hiera_l_v1()`: Hiera-L, 1024-px frames) as the
7B preset holds it (`videochat_tpo_7b().sam2`: bf16 compute), with bf16 parameters (the preset's frozen-param dtype),
for one video of T frames (frame 0 prompted, frames 1…T−1 one `lax.scan`), is traced, lowered and compiled by libtpu
for the chips of a TPU topology (default `v5p:2x2x2`, 8 chips) on this CPU machine; no TPU is needed
(`pip install -e ".[tpu-aot]"`, DEVELOPERS.md). The model is built with `nnx.eval_shape`: nothing is allocated.

Parameter placements:

* `replicated`: every chip holds all of SAM2;
* a strategy of `tpo_jax.sharding` (`fsdp`, `tp`, `fsdp_tp`): each array's logical axes resolved by that strategy's
  rules on its default mesh (`fsdp`: 1×8×1, as the 7B trainer runs), with `tpo_jax.sharding.tree_shardings`, the
  helper the trainer and the shard report use; the program is traced inside `activation_sharding` as the trainer's.

Inputs: frames (1, T, 1024, 1024, 3) float32 (normalised, as `tpo_jax.generate.track` feeds them) and the sparse
prompt (1, 3, 256) float32, both replicated: one video has no batch dim to split, and the scan takes one frame per
step on every chip. Outputs (masks (1, T, 256, 256) f32, IoU, object scores) come back replicated.

Per configuration it prints and writes (`--out`, JSON, rewritten after each one): per-chip argument / output / temp
/ alias / generated-code bytes from `compiled.memory_analysis()` (peak = argument + output + temp − alias), FLOPs per
chip from `compiled.cost_analysis()`, trace / lower / compile seconds, the exact per-chip parameter bytes (from shard
shapes) and, per logical axis name, how many parameter arrays / bytes the rules split on it.

FLOPs: XLA counts a while-loop body once, so the `lax.scan` over frames 1…T−1 is counted once, whatever T is. With
`--frames 1` in the list (no scan: frame 0 alone) the script derives per-frame FLOPs: prompted frame = F(T=1),
tracked frame = F(T) − F(T=1), per frame of a T clip = (F(1) + (T−1)·(F(T) − F(1))) / T.

    JAX_PLATFORMS=cpu python benchmarks/bench_sam2_aot.py --out /tmp/sam2_aot.json          # replicated, fsdp; T 8
    JAX_PLATFORMS=cpu python benchmarks/bench_sam2_aot.py --frames 1,8,16 --placements replicated,fsdp \\
        --out /tmp/sam2_aot.json --resume

The persistent compilation cache is not used: a compile-only TPU client cannot read it back (jax 0.10.2 / libtpu
0.0.42.1, see bench_compile.py); `--resume` keeps the finished rows of `--out` and compiles only the missing ones.
`--trunk-stages 1,1,2,1` (with `--global-att-blocks`) builds a shallower Hiera for slopes only: rows say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tpo_jax.train.topology import prepare_environment  # noqa: E402  (no JAX import)
from bench_compile import _version, lower_and_compile  # noqa: E402  (AOT phases, memory_analysis / cost_analysis)

GiB, MiB = 2**30, 2**20
DEFAULT_MESH = {"fsdp": (1, -1, 1), "tp": (1, 1, -1), "fsdp_tp": (1, -1, 2), "dp": (-1, 1, 1)}


def sam2_config(trunk_stages=None, global_att_blocks=None):
    """The 7B preset's SAM2 with bf16 params (and optionally a shallower trunk, for slopes only)."""
    from tpo_jax.config import videochat_tpo_7b
    tpo = videochat_tpo_7b()
    cfg = dataclasses.replace(tpo.sam2, param_dtype=tpo.frozen_param_dtype or "bfloat16")
    if trunk_stages:
        trunk = dataclasses.replace(cfg.trunk, stages=tuple(trunk_stages),
                                    global_att_blocks=tuple(global_att_blocks or ()))
        cfg = dataclasses.replace(cfg, trunk=trunk)
    return cfg.validate(), tpo.heads.mask


def axis_report(abstract_state, shardings) -> dict:
    """Per logical axis name: arrays / bytes whose dim of that name is split (and on which mesh axes), or not."""
    import jax
    import numpy as np

    from tpo_jax.sharding import _is_variable, variable_axes
    report: dict = {}
    vars_ = jax.tree.leaves(abstract_state, is_leaf=_is_variable)
    shs = jax.tree.leaves(shardings, is_leaf=_is_variable)
    for var, sh in zip(vars_, shs):
        value = var.get_value()
        spec = tuple(sh.get_value().spec) if _is_variable(sh) else ()
        axes = variable_axes(var) or (None,) * len(value.shape)
        nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
        for i, name in enumerate(axes):
            key = "None" if name is None else name
            mesh_axes = spec[i] if i < len(spec) else None
            r = report.setdefault(key, {"arrays": 0, "split_arrays": 0, "split_bytes": 0, "bytes": 0, "mesh_axes": []})
            r["arrays"] += 1
            r["bytes"] += nbytes
            if mesh_axes is not None:
                r["split_arrays"] += 1
                r["split_bytes"] += nbytes
                m = mesh_axes if isinstance(mesh_axes, str) else "+".join(mesh_axes)
                if m not in r["mesh_axes"]:
                    r["mesh_axes"].append(m)
    return report


def run_one(spec: dict, devices) -> dict:
    """Trace, lower and compile one (placement, T); the result dict (status 'error' on failure)."""
    result = dict(spec, status="error", phase="setup")
    try:
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec

        from tpo_jax.sam2.video import Sam2Video
        from tpo_jax.sharding import (MeshConfig, activation_sharding, get_rules, make_mesh, shard_bytes,
                                      tree_shardings)
        from tpo_jax.train.hlo import while_loops

        t0 = time.perf_counter()
        cfg, prompt_cfg = sam2_config(spec["trunk_stages"], spec["global_att_blocks"])
        placement = spec["placement"]
        mesh = make_mesh(MeshConfig(*DEFAULT_MESH.get(placement, (1, -1, 1))), devices)
        repl = NamedSharding(mesh, PartitionSpec())
        abstract = nnx.eval_shape(lambda: Sam2Video(cfg, rngs=nnx.Rngs(0), prompt_cfg=prompt_cfg))
        graphdef, state = nnx.split(abstract)
        rules = () if placement == "replicated" else get_rules(placement)
        state_sh = tree_shardings(state, mesh, rules)  # no rules: every array replicated
        abs_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
        s, T = cfg.image_size, spec["frames"]
        frames = jax.ShapeDtypeStruct((1, T, s, s, 3), jnp.float32, sharding=repl)
        prompt = jax.ShapeDtypeStruct((1, 3, cfg.hidden_dim), jnp.float32, sharding=repl)
        per_dev, total = shard_bytes(state, state_sh)
        result.update(
            mesh=dict(mesh.shape), devices=int(mesh.devices.size), device_kind=devices[0].device_kind,
            image_size=s, trunk_stages=list(cfg.trunk.stages), global_att_blocks=list(cfg.trunk.global_att_blocks),
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, memory_storage_dtype=cfg.memory_storage_dtype,
            num_maskmem=cfg.memory.tokens.num_maskmem, max_obj_ptrs=cfg.memory.tokens.max_obj_ptrs,
            param_count=sum(math.prod(x.shape) for x in jax.tree.leaves(state)),
            param_bytes_total=total, param_bytes_per_device=per_dev,
            input_bytes=4 * (math.prod(frames.shape) + math.prod(prompt.shape)),
            axes=axis_report(state, state_sh))

        def propagate(st, fr, pr):
            with activation_sharding(mesh, rules):
                out = nnx.merge(graphdef, st).propagate(fr, pr)
            return out

        fn = jax.jit(propagate, in_shardings=(state_sh, repl, repl), out_shardings=repl)
        result["setup_s"] = time.perf_counter() - t0

        result["phase"] = "trace"
        t0 = time.perf_counter()
        traced = fn.trace(abs_state, frames, prompt)
        result["trace_s"] = time.perf_counter() - t0
        _, compiled = lower_and_compile(traced, result)
        hlo = compiled.as_text()
        result["hlo_while_loops"] = while_loops(hlo)
        result["hlo_chars"] = len(hlo)
        result["status"] = "ok"
        del result["phase"]
    except Exception as e:  # recorded, not raised: the table shows it
        result["error"] = f"{type(e).__name__}: {e}"[:4000]
        result["traceback"] = traceback.format_exc()[-6000:]
    try:
        import resource
        result["host_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    except (ImportError, OSError):
        pass
    return result


def _key(spec: dict) -> str:
    return json.dumps({k: spec[k] for k in ("topology", "placement", "frames", "trunk_stages", "global_att_blocks")},
                      sort_keys=True)


def per_frame_flops(rows: list[dict]) -> dict:
    """{(placement, T): (prompted, tracked, per frame)} GFLOP per chip, where T=1 and T>1 rows of a placement exist."""
    out = {}
    ok = [r for r in rows if r["status"] == "ok" and "flops" in r.get("cost", {})]
    for r in ok:
        if r["frames"] <= 1:
            continue
        one = [o for o in ok if o["frames"] == 1 and o["placement"] == r["placement"]
               and o["trunk_stages"] == r["trunk_stages"]]
        if not one:
            continue
        f1, ft, T = one[0]["cost"]["flops"], r["cost"]["flops"], r["frames"]
        out[(r["placement"], T)] = (f1 / 1e9, (ft - f1) / 1e9, (f1 + (T - 1) * (ft - f1)) / T / 1e9)
    return out


def to_markdown(meta: dict, rows: list[dict]) -> str:
    def gib(x):
        return "" if x is None else f"{x / GiB:.2f}"

    def sec(x):
        return "" if x is None else f"{x:.1f}"

    reduced = any(r.get("trunk_stages") and list(r["trunk_stages"]) != [2, 6, 36, 4] for r in rows)
    lines = [f"SAM2 Hiera-L `Sam2Video.propagate`, bf16 compute and params, one 1024-px video, TPU {meta['topology']} "
             f"({meta.get('devices', '?')} × {meta.get('device_kind', '?')}), compiled ahead of time by libtpu "
             f"{meta.get('libtpu')}; jax {meta['jax']}." + (" REDUCED-DEPTH TRUNK (slopes only)." if reduced else ""),
             "",
             "Memory per chip in GiB from `memory_analysis()` (peak = args + out + temp − alias); params = exact "
             "per-chip parameter bytes; GFLOP/chip from `cost_analysis()` (* = the scan body counted once).",
             "",
             "| params | mesh | T | status | params GiB | args | out | temp | peak | GFLOP/chip | trace s | lower s | "
             "compile s | host RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.get("memory", {})
        mesh = "×".join(str(v) for v in r["mesh"].values()) if r.get("mesh") else ""
        flops = r.get("cost", {}).get("flops")
        gf = "" if flops is None else f"{flops / 1e9:,.0f}{'*' if r.get('hlo_while_loops') else ''}"
        status = r["status"] + (f" in {r['phase']}" if r["status"] != "ok" and r.get("phase") else "")
        lines.append(f"| {r['placement']} | {mesh} | {r['frames']} | {status} | {gib(r.get('param_bytes_per_device'))} | "
                     f"{gib(m.get('argument'))} | {gib(m.get('output'))} | {gib(m.get('temp'))} | {gib(m.get('peak'))} | "
                     f"{gf} | {sec(r.get('trace_s'))} | {sec(r.get('lower_s'))} | {sec(r.get('compile_s'))} | "
                     f"{'' if r.get('host_rss_gib') is None else format(r['host_rss_gib'], '.1f')} |")
    pf = per_frame_flops(rows)
    if pf:
        lines += ["", "| params | T | GFLOP/chip prompted frame | tracked frame | per frame of the clip |",
                  "|---|---|---|---|---|"]
        for (placement, T), (a, b, c) in sorted(pf.items()):
            lines.append(f"| {placement} | {T} | {a:,.0f} | {b:,.0f} | {c:,.0f} |")
    sharded = [r for r in rows if r["status"] == "ok" and r["placement"] != "replicated" and r.get("axes")]
    if sharded:
        r = sharded[0]
        lines += ["", f"Logical axes under `{r['placement']}` rules (mesh {'×'.join(str(v) for v in r['mesh'].values())}): "
                      "arrays with a dim of that name, how many of them that dim splits, onto which mesh axes.",
                  "", "| logical axis | arrays | split | bytes split / bytes (MiB) | mesh axes |", "|---|---|---|---|---|"]
        for name, a in sorted(r["axes"].items(), key=lambda kv: -kv[1]["bytes"]):
            lines.append(f"| {name} | {a['arrays']} | {a['split_arrays']} | {a['split_bytes'] / MiB:,.1f} / "
                         f"{a['bytes'] / MiB:,.1f} | {', '.join(a['mesh_axes']) or '—'} |")
    for r in rows:
        if r["status"] != "ok":
            lines += ["", f"* {r['placement']}, T={r['frames']}: {r.get('error')}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5p:2x2x2")
    p.add_argument("--placements", default="replicated,fsdp",
                   help="comma list: replicated and/or strategies of tpo_jax.sharding (fsdp, tp, fsdp_tp)")
    p.add_argument("--frames", default="8", help="comma list of clip lengths T (1: frame 0 alone, no scan)")
    p.add_argument("--trunk-stages", default="", help="e.g. 1,1,2,1: a shallower Hiera (slopes only)")
    p.add_argument("--global-att-blocks", default="", help="with --trunk-stages: its global-attention blocks")
    p.add_argument("--out", default=None, help="JSON of every number, rewritten after each configuration")
    p.add_argument("--resume", action="store_true", help="keep the ok rows of --out, compile the missing ones")
    args = p.parse_args(argv)

    prepare_environment(args.topology)
    os.environ["JAX_PLATFORMS"] = "cpu"
    from tpo_jax.train.topology import topology_devices
    devices = topology_devices(args.topology)
    import jax
    meta = {"topology": args.topology, "devices": len(devices), "device_kind": devices[0].device_kind,
            "jax": jax.__version__, "jaxlib": _version("jaxlib"), "libtpu": _version("libtpu"),
            "flax": _version("flax"), "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count()}
    csv = lambda s, f=str: [f(v.strip()) for v in s.split(",") if v.strip()]  # noqa: E731
    stages, gblocks = csv(args.trunk_stages, int) or None, csv(args.global_att_blocks, int) or None
    specs = [{"topology": args.topology, "placement": pl, "frames": T, "trunk_stages": stages,
              "global_att_blocks": gblocks} for pl in csv(args.placements) for T in csv(args.frames, int)]
    done = {}
    if args.resume and args.out and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        if all(old.get("meta", {}).get(k) == meta[k] for k in ("jax", "libtpu")):
            done = {_key(r): r for r in old.get("results", []) if r.get("status") == "ok"}
    rows = []
    for spec in specs:
        if _key(spec) in done:
            rows.append(dict(done[_key(spec)], resumed=True))
            continue
        print(f"[bench_sam2_aot] {spec['placement']} T={spec['frames']} ...", file=sys.stderr, flush=True)
        r = run_one(spec, devices)
        r["trunk_stages"], r["global_att_blocks"] = spec["trunk_stages"], spec["global_att_blocks"]
        rows.append(r)
        print(f"[bench_sam2_aot]   {r['status']} compile {r.get('compile_s', float('nan')):.1f} s, "
              f"peak {r.get('memory', {}).get('peak', 0) / GiB:.2f} GiB", file=sys.stderr, flush=True)
        if args.out:
            keep = [o for k, o in done.items() if k not in {_key(x) for x in rows}]
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "results": rows + keep}, f, indent=1)
    print(to_markdown(meta, rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

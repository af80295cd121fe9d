"""Trace, lower and compile time and per-device memory of the real stage-3 train step, per stack layout.

For a grid of (scanned vs unrolled stacks) × (remat policy of every stack) × (examples per device), the
sharded `train_step` of `tpo_jax.train.step` is traced, lowered and compiled over abstract arrays (nothing is
allocated) on one of two backends:

* `--backend cpu`: N fake XLA:CPU devices (`--xla_force_host_platform_device_count`);
* `--backend tpu`: the chips of a TPU topology (`--topology v5p:2x2x2`), compiled ahead of time by libtpu
  on this machine, no TPU needed (`pip install -e ".[tpu-aot]"`; see DEVELOPERS.md).

    python benchmarks/bench_compile.py --backend cpu --out /tmp/compile_cpu.json      # the full grid, 7B
    python benchmarks/bench_compile.py --backend tpu --out /tmp/compile_tpu.json
    python benchmarks/bench_compile.py --backend tpu --scan off --remat none --per-device 1 \\
        --set llm.num_layers=2 --set vit.depth=1 --set qformer.num_layers=2 --seq 128 --frames 4   # quick check

Each configuration runs in its own subprocess (`--timeout-s` each): a slow or crashing compile is killed and
recorded as such, and every measurement starts from a fresh process, so its phase times hold no earlier work.
Per configuration it records:

* setup_s (abstract model and shardings), trace_s (`jit(...).trace`: Python → jaxpr), lower_s (→ StableHLO),
  compile_s (XLA), total_s (their sum), and the worker's peak host RSS;
* `compiled.memory_analysis()` per device: argument, output, alias, temp, generated code, and
  peak = argument + output + temp - alias; on TPU, the chip's HBM and whether peak fits;
* exact per-device bytes of the train state, frozen params and batch (from shard shapes);
* size of the program: StableHLO text, optimized-HLO text, HLO instruction and while-loop counts;
* `compiled.cost_analysis()` FLOPs per device. XLA counts a while-loop body once, so with scanned stacks
  (or micro_batches > 1, or the heads' matching loops) the figure undercounts; rows whose program has a while
  loop are flagged (`flops_undercounted`, `*` in the table).

On the CPU backend XLA:CPU's faster code-generation flags are used (`--no-fast-compile`: its defaults); they
change neither the HLO nor its buffer assignment, only how long the compile takes.

With `--cache-dir`, JAX's persistent compilation cache is used there (every compile is written, however short
or small); a row served from it is marked `cache_hit` and its compile_s is a cache load, not a compile. The
TPU backend cannot read that cache back (jax 0.10.2 / libtpu 0.0.42.1), so it is left off there; `--resume`
keeps the finished results of `--out` and runs only the missing configurations, on either backend.

Prints a Markdown table and writes every number to `--out` (JSON, rewritten after each configuration).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from tpo_jax.train.hlo import while_loops
from tpo_jax.train.topology import aot_environment, parse_topology, topology_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STACKS = ("llm", "vit", "qformer")
GiB = 2**30
# XLA:CPU flags that only change LLVM code generation (same HLO, same buffer assignment), compile ~2-3x faster;
# the same as tpo-shard-report's default
FAST_CPU_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0")
MEMORY_FIELDS = (("argument", "argument_size_in_bytes"), ("output", "output_size_in_bytes"),
                 ("alias", "alias_size_in_bytes"), ("temp", "temp_size_in_bytes"),
                 ("generated_code", "generated_code_size_in_bytes"),
                 ("host_argument", "host_argument_size_in_bytes"), ("host_output", "host_output_size_in_bytes"),
                 ("host_alias", "host_alias_size_in_bytes"), ("host_temp", "host_temp_size_in_bytes"))
# jax 0.10.2 + libtpu 0.0.42.1: a compile-only TPU client writes cache entries but cannot read them back
# ("INVALID_ARGUMENT: PjRtCompiler must be constructed with a Client to call DeserializeLoadedExecutable"),
# so every run recompiles and the entries only fill the disk: the cache is left off for --backend tpu
TPU_CACHE_NOTE = ("persistent compilation cache not used: a compile-only TPU client cannot load cached executables "
                  "(jax 0.10.2 / libtpu 0.0.42.1); use --resume to reuse earlier results instead")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\S", re.MULTILINE)


# ------------------------------------------------------------------------------------------------
# Environment of a worker (set before it imports JAX)
# ------------------------------------------------------------------------------------------------

def worker_env(spec: dict) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"  # the host backend; TPU devices come from the topology, compile-only
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).split()
    if spec["backend"] == "cpu":
        flags.append(f"--xla_force_host_platform_device_count={spec['devices']}")
        if spec["fast_cpu_compile"]:
            flags += [f for f in FAST_CPU_FLAGS if f.split("=")[0] not in " ".join(flags)]
    else:  # libtpu, compile-only: the slice is named, not looked for (tpo_jax.train.topology)
        for key, value in aot_environment(spec["topology"]).items():
            env.setdefault(key, value)
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    return env


# ------------------------------------------------------------------------------------------------
# Worker: one configuration, in a fresh process
# ------------------------------------------------------------------------------------------------

def _overrides(spec: dict) -> list[str]:
    items = []
    for stack in STACKS:
        items += [f"{stack}.stack.scan_layers={'true' if spec['scan'] else 'false'}",
                  f"{stack}.stack.remat_policy={spec['remat']}"]
    items.append(f"vit.num_frames={spec['frames']}")
    return items + list(spec["set"])


def lower_and_compile(traced, result: dict):
    """Lower and compile a traced function, recording in `result` the phase reached (`phase`: a failure names it),
    `lower_s`, `compile_s`, `total_s` (with the caller's `trace_s`), and the compiled program's `memory` and `cost`.
    Returns (lowered, compiled)."""
    result["phase"] = "lower"
    t0 = time.perf_counter()
    lowered = traced.lower()
    result["lower_s"] = time.perf_counter() - t0
    result["phase"] = "compile"
    t0 = time.perf_counter()
    compiled = lowered.compile()
    result["compile_s"] = time.perf_counter() - t0
    result["total_s"] = result["trace_s"] + result["lower_s"] + result["compile_s"]
    result["phase"] = "analyse"
    result["memory"] = _memory(compiled)
    result["cost"] = _cost(compiled)
    return lowered, compiled


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    if isinstance(mem, (list, tuple)):
        mem = mem[0] if mem else None
    if mem is None:
        return {}
    out = {name: int(getattr(mem, attr)) for name, attr in MEMORY_FIELDS if hasattr(mem, attr)}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    keep = {"flops": "flops", "bytes accessed": "bytes_accessed", "transcendentals": "transcendentals",
            "optimal_seconds": "optimal_seconds"}
    out = {new: float(cost[old]) for old, new in keep.items() if old in cost}
    if out.get("optimal_seconds", 0.0) < 0:  # XLA:CPU: -1, not estimated
        del out["optimal_seconds"]
    return out


def run_worker(spec: dict) -> dict:
    """Measure one configuration; the result dict (also on failure, with status 'error')."""
    result = {"status": "error", "phase": "import"}
    t_start = time.perf_counter()
    try:
        import jax

        from tpo_jax import config as C
        from tpo_jax.overrides import apply_overrides
        from tpo_jax.sharding import MeshConfig, get_rules, make_mesh, shard_bytes
        from tpo_jax.train.optim import OptimConfig
        from tpo_jax.train.shard_report import abstract_batch
        from tpo_jax.train.step import TrainConfig, make_train_step, train_shardings

        cache_events = {"hits": 0, "misses": 0}
        if spec["cache_dir"] and spec["backend"] == "tpu":
            result["cache_note"] = TPU_CACHE_NOTE
        elif spec["cache_dir"]:
            jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

            def listener(event, **_):
                if event == "/jax/compilation_cache/cache_hits":
                    cache_events["hits"] += 1
                elif event == "/jax/compilation_cache/cache_misses":
                    cache_events["misses"] += 1
            jax.monitoring.register_event_listener(listener)
        result["import_s"] = time.perf_counter() - t_start

        result["phase"] = "setup"
        t0 = time.perf_counter()
        model_cfg = apply_overrides(C.get_config(spec["config"]), _overrides(spec))
        train_cfg = TrainConfig(stage=spec["stage"], micro_batches=spec["micro_batches"],
                                optim=OptimConfig()).validate()
        if spec["backend"] == "tpu":
            devices = topology_devices(spec["topology"])
        else:
            devices = jax.devices()[:spec["devices"]]
        data, fsdp, tensor = spec["mesh"] or DEFAULT_MESH.get(spec["strategy"], (1, -1, 1))
        mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices)
        rules = get_rules(spec["strategy"])
        graphdef, tx, sh = train_shardings(model_cfg, train_cfg, mesh, rules,
                                           frozen_dtype=model_cfg.frozen_param_dtype)
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        global_batch = spec["per_device"] * shards
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh.batch)
                 for k, v in abstract_batch(model_cfg, global_batch, spec["seq"]).items()}
        key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
        rng = jax.ShapeDtypeStruct((), key_dtype, sharding=sh.replicated)
        step = make_train_step(graphdef, tx, model_cfg, train_cfg, shardings=sh)
        result["setup_s"] = time.perf_counter() - t0
        result.update(
            devices=int(mesh.devices.size), mesh=dict(mesh.shape), device_kind=devices[0].device_kind,
            platform=devices[0].platform, global_batch=global_batch,
            dtypes={"compute": model_cfg.dtype, "params": model_cfg.param_dtype,
                    "frozen": model_cfg.frozen_param_dtype or model_cfg.param_dtype},
            depth={"llm": model_cfg.llm.num_layers, "vit": model_cfg.vit.depth,
                   "qformer": model_cfg.qformer.num_layers},
            stacks={s: {"scan_layers": getattr(model_cfg, s).stack.scan_layers,
                        "remat_policy": getattr(model_cfg, s).stack.remat_policy,
                        "attention": getattr(model_cfg, s).stack.attention} for s in STACKS},
            state_bytes=shard_bytes(sh.abstract_state, sh.state)[0],
            frozen_bytes=shard_bytes(sh.abstract_frozen, sh.frozen)[0],
            batch_bytes=shard_bytes(batch, jax.tree.map(lambda _: sh.batch, batch))[0])

        result["default_backend"] = jax.default_backend()
        result["phase"] = "trace"
        t0 = time.perf_counter()
        traced = step.trace(sh.abstract_state, sh.abstract_frozen, batch, rng)
        result["trace_s"] = time.perf_counter() - t0
        result["jaxpr_eqns"] = len(traced.jaxpr.eqns)  # top level only: a scan or remat is one equation

        lowered, compiled = lower_and_compile(traced, result)
        result["stablehlo_chars"] = len(lowered.as_text())
        hlo = compiled.as_text()
        result.update(hlo_chars=len(hlo), hlo_ops=len(_INSTR_RE.findall(hlo)),
                      hlo_while_loops=while_loops(hlo))
        result["flops_undercounted"] = result["hlo_while_loops"] > 0
        if spec["cache_dir"] and spec["backend"] != "tpu":
            result["cache_hit"] = cache_events["hits"] > 0
        if spec["backend"] == "tpu":
            hbm = spec["hbm_gib"] * GiB
            result.update(hbm_bytes=hbm, fits=bool(result["memory"]) and result["memory"]["peak"] <= hbm)
        result["status"] = "ok"
        del result["phase"]
    except Exception as e:  # recorded, not raised: the parent prints it in the table
        result["error"] = f"{type(e).__name__}: {e}"[:4000]
        result["traceback"] = traceback.format_exc()[-6000:]
    try:
        import resource
        result["host_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    except (ImportError, OSError):
        pass
    result["wall_s"] = time.perf_counter() - t_start
    return result


# ------------------------------------------------------------------------------------------------
# Parent: the grid, one subprocess per configuration
# ------------------------------------------------------------------------------------------------

def _tail(path: str, n: int = 30) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def run_config(spec: dict, timeout_s: float) -> dict:
    """Run one configuration in a subprocess; its result, or a record of the timeout / crash."""
    with tempfile.TemporaryDirectory(prefix="bench_compile_") as tmp:
        spec = dict(spec, result_path=os.path.join(tmp, "result.json"))
        spec_path = os.path.join(tmp, "spec.json")
        log_path = os.path.join(tmp, "log.txt")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path],
                                    env=worker_env(spec), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=REPO)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group
                proc.wait()
                rc = None
            except BaseException:  # Ctrl-C: the worker is in its own session, so end it here
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        wall = time.perf_counter() - t0
        log_lines = _tail(log_path, 10_000)
        remat_notes = sum("Involuntary full rematerialization" in line for line in log_lines)
        if rc is None:
            return {"status": "timeout", "wall_s": wall, "timeout_s": timeout_s, "log_tail": log_lines[-30:]}
        try:
            with open(spec["result_path"]) as f:
                result = json.load(f)
        except (OSError, ValueError):
            why = " (SIGKILL: out of host memory?)" if rc == -signal.SIGKILL else ""
            return {"status": "crashed", "returncode": rc, "error": f"worker exited with {rc}{why}", "wall_s": wall,
                    "log_tail": log_lines[-30:]}
        result["process_wall_s"] = wall
        result["xla_involuntary_remat_warnings"] = remat_notes
        if result["status"] != "ok":
            result["log_tail"] = log_lines[-30:]
        return result


def _gib(x) -> str:
    return "" if x is None else f"{x / GiB:.2f}"


def _s(x) -> str:
    return "" if x is None else f"{x:.1f}"


def to_markdown(meta: dict, rows: list[dict]) -> str:
    tpu = meta["backend"] == "tpu"
    where = (f"TPU {meta['topology']} ({meta['devices'] or '?'} × {meta.get('device_kind') or '?'}, compiled ahead of "
             f"time by libtpu {meta.get('libtpu') or '?'}), HBM {meta['hbm_gib']:g} GiB/chip"
             if tpu else f"{meta['devices']} fake XLA:CPU devices"
             f"{' (fast codegen flags)' if meta['fast_cpu_compile'] else ''}")
    sets = " ".join(meta["set"])
    mesh = "x".join(map(str, meta["mesh"])) if meta["mesh"] else "(default)"
    lines = [f"`{meta['config']}` {meta['stage']} train step, {where}, {meta['strategy']} mesh {mesh}, "
             f"seq {meta['seq']}, {meta['frames']} frames, "
             f"micro_batches {meta['micro_batches']}{', ' + sets if sets else ''}; jax {meta['jax']}.",
             "",
             "Times in s. Memory per device in GiB from `compiled.memory_analysis()`: peak = args + out + temp - "
             "alias" + ("" if tpu else " (XLA:CPU's buffer assignment, not a TPU's)") +
             ". GFLOP/device from `cost_analysis()`; * = the program has while loops (scanned stacks, "
             "micro-batches, the heads' matching loops), whose body XLA counts once: an undercount.",
             "",
             "| scan | remat | ex/dev | status | trace | lower | compile | total | args | out | alias | temp | "
             "code MiB | peak |" + (" fits |" if tpu else "") + " HLO ops | while | GFLOP | host RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if tpu else "") + "---|---|---|---|"]
    for r in rows:
        m = r.get("memory", {})
        status = r["status"] + (" (cached)" if r.get("cache_hit") else "") + (" (resumed)" if r.get("resumed") else "")
        if r["status"] != "ok" and r.get("phase"):
            status += f" in {r['phase']}"
        flops = r.get("cost", {}).get("flops")
        gflop = "" if flops is None else f"{flops / 1e9:,.0f}{'*' if r.get('flops_undercounted') else ''}"
        code = "" if "generated_code" not in m else f"{m['generated_code'] / 2**20:.1f}"
        fits = ""
        if tpu and m:
            fits = f" {'yes' if r.get('fits') else 'NO'} |"
        elif tpu:
            fits = " |"
        lines.append(
            f"| {'on' if r['scan'] else 'off'} | {r['remat']} | {r['per_device']} | {status} | "
            f"{_s(r.get('trace_s'))} | {_s(r.get('lower_s'))} | {_s(r.get('compile_s'))} | {_s(r.get('total_s'))} | "
            f"{_gib(m.get('argument'))} | "
            f"{_gib(m.get('output'))} | {_gib(m.get('alias'))} | {_gib(m.get('temp'))} | {code} | "
            f"{_gib(m.get('peak'))} |{fits} {r.get('hlo_ops', '')} | {r.get('hlo_while_loops', '')} | {gflop} | "
            f"{'' if r.get('host_rss_gib') is None else format(r['host_rss_gib'], '.1f')} |")
    auto = sorted({s for r in rows for s, st in r.get("stacks", {}).items() if st["attention"] == "auto"})
    if tpu and auto:
        lines += ["", f"Attention `auto` ({', '.join(auto)}) picks its implementation by the platform of the "
                      "step's mesh (`tpo_jax.sharding.target_platform`): these TPU rows compiled the splash kernel "
                      "for the ViT and the LLM, and einsum for the Q-Former (its attention dropout is on in training)."]
    if any(r.get("cache_hit") for r in rows):
        lines += ["", "(cached): the executable came from the persistent compilation cache; its compile time is "
                      "a cache load."]
    errors = [r for r in rows if r["status"] != "ok"]
    for r in errors:
        what = r.get("error") or (f"killed after {r['timeout_s']:.0f} s" if r["status"] == "timeout"
                                  else f"worker exited with {r.get('returncode')}")
        lines += ["", f"* scan {'on' if r['scan'] else 'off'}, {r['remat']}, {r['per_device']}/device: {what}"]
    return "\n".join(lines) + "\n"


def _spec_key(spec: dict) -> str:
    """What makes two configurations the same measurement (not where the cache lives)."""
    return json.dumps({k: v for k, v in spec.items() if k not in ("cache_dir", "result_path")}, sort_keys=True)


def _previous_results(path: str | None, meta: dict) -> list[dict]:
    """The ok results of an earlier run in `path`, if it ran with the same jax, jaxlib and libtpu."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)
    if any(old.get("meta", {}).get(k) != meta[k] for k in ("jax", "jaxlib", "libtpu")):
        print(f"note: {path} was written with other jax/jaxlib/libtpu versions; not resuming from it", file=sys.stderr)
        return []
    return [r for r in old.get("results", []) + old.get("earlier_results", []) if r.get("status") == "ok"]


def _csv(text: str, cast=str) -> list:
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


# every device on the strategy's own axis (-1: the rest, `tpo_jax.sharding.MeshConfig`)
DEFAULT_MESH = {"dp": (-1, 1, 1), "fsdp": (1, -1, 1), "tp": (1, 1, -1), "fsdp_tp": (1, -1, 2)}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("cpu", "tpu"), default="cpu",
                   help="cpu: fake XLA:CPU devices; tpu: ahead-of-time compile for --topology with libtpu")
    p.add_argument("--topology", default="v5p:2x2x2", help="TPU topology name (--backend tpu)")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="HBM per TPU chip in GiB (default: the chip's, tpo_jax.train.chips)")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (--backend cpu)")
    p.add_argument("--config", default="videochat_tpo_7b", help="model preset")
    p.add_argument("--stage", default="stage3", help="training stage recipe")
    p.add_argument("--scan", choices=("both", "on", "off"), default="both",
                   help="scanned (on) and/or unrolled (off) layer stacks, for all three stacks")
    p.add_argument("--remat", default="none,dots_with_no_batch_dims_saveable,full",
                   help="comma list of remat policies, each applied to all three stacks")
    p.add_argument("--per-device", default="1,4,16", help="comma list of examples per data×fsdp shard")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--seq", type=int, default=512, help="sequence length")
    p.add_argument("--frames", type=int, default=16, help="video frames (vit.num_frames)")
    p.add_argument("--strategy", default="fsdp", help="sharding strategy (tpo_jax.sharding.RULES)")
    p.add_argument("--mesh", default=None,
                   help="DATAxFSDPxTENSOR (default: every device on the strategy's axis, e.g. fsdp 1x8x1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model-config override (tpo_jax.overrides), repeatable; applied after the grid's stack "
                        "fields, e.g. llm.num_layers=2")
    p.add_argument("--out", default=None, help="JSON path (rewritten after every configuration)")
    p.add_argument("--cache-dir", default=None, help="JAX persistent compilation cache directory")
    p.add_argument("--resume", action="store_true",
                   help="keep the ok results of --out whose configuration (and jax/libtpu versions) match; "
                        "compile only the rest")
    p.add_argument("--timeout-s", type=float, default=7200.0, help="limit per configuration (subprocess killed)")
    p.add_argument("--no-fast-compile", action="store_true",
                   help="cpu: XLA:CPU's default codegen flags (slower compiles; same HLO and buffer assignment)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        with open(args.worker) as f:
            spec = json.load(f)
        result = run_worker(spec)
        with open(spec["result_path"], "w") as f:
            json.dump(result, f, indent=1)
        if result["status"] != "ok":
            print(result.get("traceback", result.get("error")), file=sys.stderr)
        return 0 if result["status"] == "ok" else 1

    from tpo_jax.config import REMAT_POLICIES
    from tpo_jax.sharding import RULES
    remats = _csv(args.remat)
    bad = [r for r in remats if r not in REMAT_POLICIES]
    if bad:
        p.error(f"--remat: unknown polic{'y' if len(bad) == 1 else 'ies'} {bad}; known: {list(REMAT_POLICIES)}")
    if args.strategy not in RULES:
        p.error(f"--strategy: unknown {args.strategy!r}; known: {sorted(RULES)}")
    per_device = _csv(args.per_device, int)
    scans = {"both": [True, False], "on": [True], "off": [False]}[args.scan]
    if args.backend == "tpu":
        try:
            chip, _ = parse_topology(args.topology)
        except ValueError as e:
            p.error(str(e))
        hbm_gib = args.hbm_gib if args.hbm_gib is not None else chip.hbm_bytes / GiB
    else:
        hbm_gib = None
    mesh = None
    if args.mesh:
        try:
            mesh = [int(v) for v in args.mesh.lower().split("x")]
        except ValueError:
            mesh = []
        if len(mesh) != 3:
            p.error(f"--mesh: {args.mesh!r} is not DATAxFSDPxTENSOR, e.g. 1x8x1")

    meta = {"backend": args.backend, "topology": args.topology if args.backend == "tpu" else None,
            "hbm_gib": hbm_gib, "devices": args.devices if args.backend == "cpu" else None, "device_kind": None,
            "config": args.config, "stage": args.stage, "seq": args.seq,
            "frames": args.frames, "micro_batches": args.micro_batches, "strategy": args.strategy,
            "mesh": mesh, "set": args.set, "cache_dir": args.cache_dir, "timeout_s": args.timeout_s,
            "fast_cpu_compile": not args.no_fast_compile, "jax": _version("jax"), "jaxlib": _version("jaxlib"),
            "libtpu": _version("libtpu") if args.backend == "tpu" else None,
            "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.backend == "tpu" and args.cache_dir:
        print(f"note: {TPU_CACHE_NOTE}", file=sys.stderr)
    previous = _previous_results(args.out, meta) if args.resume else []
    rows = []
    for scan, remat, pd in itertools.product(scans, remats, per_device):
        spec = {"backend": args.backend, "topology": args.topology, "hbm_gib": hbm_gib, "devices": args.devices,
                "config": args.config, "stage": args.stage, "scan": scan, "remat": remat, "per_device": pd,
                "micro_batches": args.micro_batches, "seq": args.seq, "frames": args.frames,
                "strategy": args.strategy, "mesh": mesh, "set": args.set, "cache_dir": args.cache_dir,
                "fast_cpu_compile": not args.no_fast_compile}
        label = f"scan {'on' if scan else 'off'}, remat {remat}, {pd}/device"
        key = _spec_key(spec)
        r = next((dict(old, resumed=True) for old in previous if _spec_key(old.get("spec", {})) == key), None)
        if r is None:
            print(f"[{label}] ...", file=sys.stderr, flush=True)
            r = run_config(spec, args.timeout_s)
        else:
            print(f"[{label}] from {args.out} (--resume)", file=sys.stderr, flush=True)
        r.update(scan=scan, remat=remat, per_device=pd, spec=spec)
        rows.append(r)
        if r.get("device_kind") and meta["device_kind"] is None:
            meta.update(devices=r["devices"], device_kind=r["device_kind"],
                        mesh=[r["mesh"][a] for a in ("data", "fsdp", "tensor")])
        if r["status"] == "ok":
            m = r["memory"]
            print(f"[{label}] trace {r['trace_s']:.1f} s, lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s"
                  f"{' (cache hit)' if r.get('cache_hit') else ''}; peak {m['peak'] / GiB:.2f} GiB/device "
                  f"(temp {m['temp'] / GiB:.2f})", file=sys.stderr, flush=True)
        else:
            print(f"[{label}] {r['status']}: {r.get('error') or ''}", file=sys.stderr, flush=True)
            for line in r.get("log_tail", [])[-8:]:
                print(f"    {line}", file=sys.stderr)
        if args.out:
            keys = {_spec_key(row["spec"]) for row in rows}
            earlier = [old for old in previous if _spec_key(old.get("spec", {})) not in keys]
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "results": rows, **({"earlier_results": earlier} if earlier else {})},
                          f, indent=1)
    print(to_markdown(meta, rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`tpo-shard-report`: per-device memory, FLOPs, collectives and an MFU estimate of each sharding plan, from
an ahead-of-time compile of the train step for a TPU topology (libtpu, no TPU needed) or fake CPU devices
(the measuring lives in `tpo_jax.train.shard_report`).

    tpo-shard-report --config videochat_tpo_7b --topology v5p:2x2x2 --plans fsdp:1x8x1 --batch-per-shard 16
    tpo-shard-report --config videochat_tpo_7b --topology v5p:2x2x2 --search --global-batch 128 --out report
    tpo-shard-report --config tiny --plans dp:8x1x1,fsdp:1x8x1            # XLA:CPU figures, 8 fake devices

JAX is imported only after the device setup is in the environment (fake-device count, or libtpu's settings).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import re
import sys
import tempfile
from typing import Sequence

from tpo_jax.cli.common import add_debug_flag, guarded
from tpo_jax.train.shard_report import (REMAT_ORDER, measure, parse_plan, plan_name, plot, rank, search,
                                        to_markdown)

DEFAULT_PLANS = "dp:8x1x1,fsdp:1x8x1,tp:1x1x8,fsdp_tp:1x4x2"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpo-shard-report", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="model preset (tiny, videochat_tpo_7b)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="dotted model-config override, e.g. llm.stack.remat_policy=full (repeatable)")
    p.add_argument("--stage", default="stage3", help="training stage recipe")
    p.add_argument("--topology", default=None,
                   help="compile for this TPU topology with libtpu (v4 / v5e / v5p / v6e names JAX accepts, e.g. "
                        "v5p:2x2x2, v5e:16x16, v6e:8x8; pip install -e '.[tpu-aot]'); default: fake CPU devices")
    p.add_argument("--chip", default=None, help="without --topology: estimate step time and MFU for this chip "
                                                "(tpo_jax.train.chips: v4, v5e, v5p, v6e, a100, h100, h200, b200)")
    p.add_argument("--plans", default=None, help="comma list of STRATEGY:DATAxFSDPxTENSOR (default: "
                                                 f"{DEFAULT_PLANS} on CPU, fsdp over every chip of a topology); "
                                                 "with --search: only these meshes (default: every candidate)")
    p.add_argument("--batch-per-shard", type=int, default=1, help="examples per data×fsdp shard")
    p.add_argument("--micro-batches", type=int, default=1, help="gradient-accumulation steps; with --search, the "
                                                                 "fewest tried (default 1)")
    p.add_argument("--search", action="store_true",
                   help="compile the candidate plans for --global-batch and rank those that fit")
    p.add_argument("--global-batch", type=int, default=128, help="--search: examples per step (paper: 128)")
    p.add_argument("--strategies", default="fsdp,fsdp_tp,tp,dp", help="--search: strategies to try")
    p.add_argument("--remat", default=",".join(REMAT_ORDER), help="--search: remat policies, least recomputation first")
    p.add_argument("--max-tensor", type=int, default=8, help="--search: largest tensor-parallel size")
    p.add_argument("--devices", type=int, default=8, help="--search without --topology: fake CPU devices")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default=None, help="compute dtype override (e.g. bfloat16)")
    p.add_argument("--frozen-dtype", default=None,
                   help="storage dtype of frozen params (e.g. bfloat16; default: the config's frozen_param_dtype)")
    p.add_argument("--xla-option", action="append", default=[], metavar="KEY=VALUE",
                   help="XLA debug option for every compile (repeatable), e.g. "
                        "xla_disable_hlo_passes=all-gather-simplifier around a libtpu crash (docs/sharding.md)")
    p.add_argument("--no-fast-compile", action="store_true",
                   help="compile with XLA:CPU's default codegen flags (slower; same HLO-level buffers)")
    p.add_argument("--out", default=None,
                   help="write PREFIX.md, PREFIX.png and PREFIX.json; a --search reuses the plans PREFIX.json holds")
    add_debug_flag(p)
    return p


def _set_device_flags(count: int, fast: bool) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    extra = [f"--xla_force_host_platform_device_count={count}"]
    if fast:
        extra += [f for f in ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0")
                  if f.split("=")[0] not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags.strip()] + extra).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


REMAT = "Involuntary full rematerialization"


@contextlib.contextmanager
def xla_notes(plan: str, debug: bool = False):
    """XLA's compile-time log (C++, on file descriptor 2) of one plan, captured: its involuntary-rematerialisation
    warnings become one line naming the plan; any other line is passed on. `debug`: XLA's log as it is."""
    if debug:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines()
    remat = [line for line in lines if REMAT in line]
    for line in lines:
        if REMAT not in line:
            print(line, file=sys.stderr)
    if remat:
        print(f"[{plan}] note: XLA had to gather {len(remat)} array(s) whole to change their sharding (\"{REMAT}\" "
              f"of a reshape); --debug shows its messages", file=sys.stderr)


def _config(args):
    from tpo_jax import config as C
    from tpo_jax.overrides import apply_overrides
    from tpo_jax.train.optim import OptimConfig
    from tpo_jax.train.step import TrainConfig
    overrides = list(args.set) + ([f"dtype={args.dtype}"] if args.dtype else [])
    model_cfg = apply_overrides(C.get_config(args.config), overrides)
    train_cfg = TrainConfig(stage=args.stage, micro_batches=args.micro_batches, optim=OptimConfig()).validate()
    stack_of = {s: functools.reduce(getattr, s.split("."), model_cfg).stack for s in model_cfg.stacks}
    stacks = ", ".join(f"{s} {'scanned' if st.scan_layers else 'unrolled'}" + (
        "" if args.search else f" remat {st.remat_policy}") for s, st in stack_of.items())
    stacks += " (remat per plan)" if args.search else ""
    header = (f"`{args.config}`{' ' + ' '.join(overrides) if overrides else ''}, {args.stage}, seq_len {args.seq_len}; "
              f"compute dtype {model_cfg.dtype}, trainable params {model_cfg.param_dtype}, frozen params "
              f"{args.frozen_dtype or model_cfg.frozen_param_dtype or model_cfg.param_dtype}, AdamW moments "
              f"{model_cfg.param_dtype}; {stacks}")
    return model_cfg, train_cfg, header


def run(args: argparse.Namespace, devices=None, chip=None) -> tuple[str, list[tuple[str, dict]]]:
    """Measure every plan of `args` (JAX already set up; `devices`: a topology's, default JAX's); return
    (markdown, rows). With `args.out`, the Markdown, chart and JSON are rewritten after every plan."""
    import jax
    devices = jax.devices() if devices is None else devices
    model_cfg, train_cfg, header = _config(args)
    options = _xla_options(args)
    where = f"TPU {args.topology}" if args.topology else f"{len(devices or [])} fake CPU devices"
    header += f"; {where}" + "".join(f"; XLA option {k}={v}" for k, v in options.items())
    rows: list[tuple[str, dict]] = []

    def record(name, r):
        rows.append((name, r))
        status = r["error"][:100] if "error" in r else f"compile {r['compile_s']:.0f} s"
        print(f"[{name}] {status}", file=sys.stderr)
        if args.out:
            write(args.out, to_markdown(rows, header), rows, header, chip, _identity(args))

    if args.search:
        header += f"; search for global batch {args.global_batch}"
        done = _previous(args.out, _identity(args))
        ranked = search(model_cfg, train_cfg, chips=len(devices), global_batch=args.global_batch,
                        seq_len=args.seq_len, strategies=args.strategies.split(","), remats=args.remat.split(","),
                        max_tensor=args.max_tensor, devices=devices, chip=chip, frozen_dtype=args.frozen_dtype,
                        done=done, on_row=record, around=lambda name: xla_notes(name, getattr(args, "debug", False)),
                        plans=getattr(args, "search_plans", None), compiler_options=options)
        seen = {name for name, _ in ranked}  # an earlier, differently restricted search's rows stay in the report
        rows[:] = rank(ranked + [(name, r) for name, r in done.items() if name not in seen])
        if args.out:
            write(args.out, to_markdown(rows, header), rows, header, chip, _identity(args))
        return to_markdown(rows, header), rows
    for plan in args.plans.split(","):
        strategy, mesh_cfg = parse_plan(plan)
        with xla_notes(plan, getattr(args, "debug", False)):
            r = measure(model_cfg, train_cfg, strategy, mesh_cfg, batch_per_shard=args.batch_per_shard,
                        seq_len=args.seq_len, frozen_dtype=args.frozen_dtype, devices=devices, chip=chip,
                        compiler_options=options)
        record(plan, r)
    return to_markdown(rows, header), rows


IDENTITY = ("config", "set", "stage", "topology", "chip", "seq_len", "dtype", "frozen_dtype", "global_batch",
            "strategies", "max_tensor", "devices", "xla_option")


def _xla_options(args) -> dict[str, str]:
    """`--xla-option KEY=VALUE` as a dict (one ConfigError for a malformed entry)."""
    from tpo_jax.config import ConfigError
    options = {}
    for item in getattr(args, "xla_option", []):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"config field 'xla_option': {item!r} is not KEY=VALUE, e.g. "
                              f"xla_disable_hlo_passes=all-gather-simplifier")
        options[key.strip()] = value.strip()
    return options


def _identity(args) -> dict:
    """What a report's numbers depend on: an earlier PREFIX.json with the same is reused by a search."""
    # xla_option only where set: the reports written before it existed stay reusable
    return {k: getattr(args, k, None) for k in IDENTITY if k != "xla_option" or getattr(args, k, None)}


def _previous(prefix: str | None, identity: dict) -> dict:
    """The rows of an earlier PREFIX.json written with the same `identity` (config, stage, topology, ...)."""
    import json
    if not prefix or not os.path.exists(prefix + ".json"):
        return {}
    with open(prefix + ".json") as f:
        old = json.load(f)
    return old.get("rows", {}) if old.get("identity") == json.loads(json.dumps(identity)) else {}


def write(prefix: str, markdown: str, rows, header: str = "", chip=None, identity: dict | None = None) -> None:
    """PREFIX.md, PREFIX.png and PREFIX.json."""
    import json
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".md", "w") as f:
        f.write(markdown)
    with open(prefix + ".json", "w") as f:
        json.dump({"header": header, "identity": identity, "rows": {name: r for name, r in rows}}, f, indent=1,
                  default=float)
    plot(rows, prefix + ".png", title=markdown.splitlines()[0][:200], hbm_bytes=chip.hbm_bytes if chip else None)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return guarded("tpo-shard-report", lambda: _main(args), args.debug)


def _main(args) -> int:
    from tpo_jax.config import ConfigError
    from tpo_jax.train import chips as CH
    from tpo_jax.train import topology as T
    _xla_options(args)  # a malformed entry fails before anything compiles
    if args.search and args.plans:
        args.search_plans = [plan_name(*parse_plan(p)) for p in args.plans.split(",")]
    if args.topology:
        chip, _ = T.parse_topology(args.topology)
        T.prepare_environment(args.topology)  # before libtpu loads
        plans = args.plans or f"fsdp:1x{T.chip_count(args.topology)}x1"
        if not args.search:
            for p in plans.split(","):
                T.check_mesh_size(parse_plan(p)[1], T.chip_count(args.topology), "plans")
    else:
        if args.chip is not None and args.chip not in CH.CHIPS:
            raise ConfigError(f"config field 'chip': unknown chip {args.chip!r}; known: {', '.join(CH.CHIPS)}")
        chip = CH.CHIPS.get(args.chip)
        plans = args.plans or DEFAULT_PLANS
    args.plans = plans
    for p in plans.split(","):
        parse_plan(p)
    # fake CPU devices: as many as the largest plan (or the search) needs, before anything imports JAX
    need = args.devices if args.search else max(
        math.prod(int(v) for v in re.findall(r"\d+", p.partition(":")[2])) for p in plans.split(","))
    if not args.topology and "jax" not in sys.modules:
        _set_device_flags(need, fast=not args.no_fast_compile)
    import jax
    if args.topology:
        devices = T.topology_devices(args.topology)
    else:
        if jax.device_count() < need:
            raise ConfigError(f"the plans need {need} devices but JAX already started with {jax.device_count()}; "
                              f"run tpo-shard-report in a fresh process")
        devices = jax.devices()[:need] if args.search else jax.devices()
    markdown, _ = run(args, devices=devices, chip=chip)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`tpo-shard-report`: per-device memory, FLOPs and collectives of each sharding plan, from an
ahead-of-time compile of the train step (the measuring lives in `tpo_jax.train.shard_report`).

    tpo-shard-report --config videochat_tpo_7b --stage stage3 --plans fsdp:1x8x1,tp:1x1x8 --layers 1,2

JAX is imported only after the fake-device count for the plans is set (XLA_FLAGS).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
import time
from typing import Sequence

from tpo_jax.cli.common import add_debug_flag, guarded
from tpo_jax.train.shard_report import DEFAULT_PLANS, measure_plan, parse_plan, plot, to_markdown


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpo-shard-report", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="model preset (tiny, videochat_tpo_7b)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="dotted model-config override, e.g. llm.num_layers=4 (repeatable)")
    p.add_argument("--stage", default="stage3", help="training stage recipe")
    p.add_argument("--plans", default=DEFAULT_PLANS, help="comma list of STRATEGY:DATAxFSDPxTENSOR")
    p.add_argument("--batch-per-shard", type=int, default=1, help="examples per data×fsdp shard")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default=None, help="compute dtype override (e.g. bfloat16)")
    p.add_argument("--frozen-dtype", default=None,
                   help="storage dtype of frozen params (e.g. bfloat16; default: the config's frozen_param_dtype)")
    p.add_argument("--layers", default=None, help="'A,B': compile A and B layers and extrapolate per layer")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--no-fast-compile", action="store_true",
                   help="compile with XLA:CPU's default codegen flags (slower; same HLO-level buffers)")
    p.add_argument("--out", default=None, help="write PREFIX.md, PREFIX.png and PREFIX.json")
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


def run(args: argparse.Namespace) -> tuple[str, list[tuple[str, dict]]]:
    """Measure every plan of `args` (JAX already imported with enough devices); return (markdown, rows).

    With `args.out`, the Markdown, chart and a JSON of the numbers are rewritten after every plan."""
    from tpo_jax import config as C
    from tpo_jax.overrides import apply_overrides
    from tpo_jax.train.optim import OptimConfig
    from tpo_jax.train.step import TrainConfig

    overrides = list(args.set) + ([f"dtype={args.dtype}"] if args.dtype else [])
    model_cfg = apply_overrides(C.get_config(args.config), overrides)
    train_cfg = TrainConfig(stage=args.stage, micro_batches=args.micro_batches, optim=OptimConfig()).validate()
    layers = tuple(int(v) for v in args.layers.split(",")) if args.layers else None
    header = (f"`{args.config}`{' ' + ' '.join(overrides) if overrides else ''}, {args.stage}, seq_len {args.seq_len}, "
              f"{args.batch_per_shard} example(s) per data×fsdp shard; compute dtype {model_cfg.dtype}, trainable "
              f"params {model_cfg.param_dtype}, frozen params {args.frozen_dtype or model_cfg.frozen_param_dtype or model_cfg.param_dtype}, "
              f"AdamW moments {model_cfg.param_dtype}")
    rows = []
    for plan in args.plans.split(","):
        strategy, mesh_cfg = parse_plan(plan)
        t0 = time.perf_counter()
        with xla_notes(plan, getattr(args, "debug", False)):
            r = measure_plan(model_cfg, train_cfg, strategy, mesh_cfg, layers=layers,
                             batch_per_shard=args.batch_per_shard, seq_len=args.seq_len,
                             frozen_dtype=args.frozen_dtype)
        print(f"[{plan}] done in {time.perf_counter() - t0:.0f} s (compile {r['compile_s']:.0f} s)", file=sys.stderr)
        rows.append((plan, r))
        if args.out:
            write(args.out, to_markdown(rows, header), rows)
    return to_markdown(rows, header), rows


def write(prefix: str, markdown: str, rows) -> None:
    """PREFIX.md, PREFIX.png and PREFIX.json."""
    import json
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".md", "w") as f:
        f.write(markdown)
    with open(prefix + ".json", "w") as f:
        json.dump({name: r for name, r in rows}, f, indent=1, default=float)
    plot(rows, prefix + ".png", title=markdown.splitlines()[0][:160])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return guarded("tpo-shard-report", lambda: _main(args), args.debug)


def _main(args) -> int:
    from tpo_jax.config import ConfigError
    # device count from the plan strings, before anything imports JAX (parse_plan validates them later)
    shapes = [re.findall(r"\d+", p.partition(":")[2]) for p in args.plans.split(",")]
    need = max([math.prod(int(v) for v in s) for s in shapes if s] or [1])
    if "jax" not in sys.modules:
        _set_device_flags(need, fast=not args.no_fast_compile)
    import jax
    for p in args.plans.split(","):
        parse_plan(p)
    if jax.device_count() < need:
        raise ConfigError(f"the plans need {need} devices but JAX already started with {jax.device_count()}; "
                          f"run tpo-shard-report in a fresh process")
    markdown, _ = run(args)
    print(markdown)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())

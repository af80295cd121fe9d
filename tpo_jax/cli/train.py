"""`tpo-train` and `tpo-eval`.

    tpo-train                                   # tiny model, synthetic data, stages 1-3, ./runs/tiny
    tpo-train --workdir runs/a --stages 2 --resume --set stage2.steps=500 --set optim.lr=1e-3
    tpo-train --set model.llm.num_layers=4 --set data.batch_size=16 --stages all
    tpo-train --config videochat_tpo_7b --init-from ckpt/videochat_tpo --workdir runs/7b   # from the released model
    tpo-eval --workdir runs/a                   # metrics of the latest checkpoint of the last stage
    tpo-eval --workdir runs/a --stage stage1 --step 100
    tpo-eval --workdir runs/a --mode teacher     # teacher-forced only (default both: + generated answers, gen/...)

Compiled steps are kept in a persistent XLA cache (`--compilation-cache`, default
~/.cache/tpo-jax/xla), so a second run or a `--resume` does not compile again. Exit status: 0 done
(or stopped by SIGTERM / --stop-after with a checkpoint saved), 130 interrupted by Ctrl-C (the first saves a
checkpoint at the end of the current step, a second aborts at once), 2 bad input (a config field, the work
directory, the data; one line that names it), 1 training failure (non-finite losses). --debug shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tpo_jax.cli.common import add_debug_flag, guarded

FAST_CPU_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0")
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
                             "tpo-jax", "xla")


def set_fast_cpu_compile() -> None:
    """Add the fast-compile XLA:CPU flags to XLA_FLAGS (before JAX starts; they only affect XLA:CPU)."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in FAST_CPU_FLAGS if f.split("=")[0] not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def _common(p: argparse.ArgumentParser) -> None:
    add_debug_flag(p)
    p.add_argument("--config", default="tiny", help="run preset (tpo_jax.train.run_config.RUN_PRESETS)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. optim.lr=1e-4, model.llm.num_layers=4, data.batch_size=16 "
                        "(repeatable)")
    p.add_argument("--workdir", default=os.path.join("runs", "tiny"), help="checkpoints, metrics, logs, plots")
    p.add_argument("--fast-cpu-compile", action="store_true",
                   help="XLA:CPU flags that compile ~2x faster but run the step ~1.5x slower (short runs)")
    p.add_argument("--compilation-cache", default=DEFAULT_CACHE, metavar="DIR",
                   help="persistent XLA compilation cache ('none' to disable); a second run skips compiling")


def _parse_stages(text: str) -> list[str]:
    from tpo_jax.train.run_config import STAGES  # noqa: PLC0415
    if text.strip().lower() == "all":
        return list(STAGES)
    out = []
    for part in text.split(","):
        name = part.strip()
        name = f"stage{name}" if name.isdigit() else name
        if name not in STAGES:
            raise argparse.ArgumentTypeError(f"unknown stage {part!r}; use 1, 2, 3, a comma list, or all")
        out.append(name)
    return out


def _parse_profile(text: str) -> tuple[int, int]:
    try:
        first, last = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIRST:LAST, e.g. 10:12") from None
    if not 1 <= first <= last:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= FIRST <= LAST")
    return first, last


def _setup(args, workdir_config: bool = False) -> "RunConfig":  # noqa: F821
    """The run config: the preset (or, with `workdir_config`, the work directory's config.json) + overrides."""
    if args.fast_cpu_compile:
        set_fast_cpu_compile()
    if args.compilation_cache.lower() != "none":
        import jax  # noqa: PLC0415
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from tpo_jax.train.distributed import initialize  # noqa: PLC0415
    initialize()  # multi-process runs: jax.distributed from the TPO_* environment (no-op for one process)
    import logging  # noqa: PLC0415
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on read-only managers etc.
    from tpo_jax.overrides import apply_overrides  # noqa: PLC0415
    from tpo_jax.train.run_config import check_required, get_run_config, load_run_config  # noqa: PLC0415
    saved = os.path.join(args.workdir, "config.json")
    from_workdir = workdir_config and os.path.exists(saved)
    base = load_run_config(saved) if from_workdir else get_run_config(args.config)
    cfg = apply_overrides(base, args.overrides)
    if getattr(args, "init_from", None):
        import dataclasses  # noqa: PLC0415
        cfg = dataclasses.replace(cfg, init_from=tuple(args.init_from)).validate()
    if getattr(args, "profile", None):
        import dataclasses  # noqa: PLC0415
        cfg = dataclasses.replace(cfg, profile_steps=args.profile).validate()
    # a preset's settings without a default (videochat_tpo_7b: init_from) must come from --set / --init-from
    return cfg if from_workdir else check_required(cfg, args.config)


def train_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpo-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--stages", type=_parse_stages, default="all", help="1, 2, 3, a list like 2,3, or all")
    p.add_argument("--resume", action="store_true", help="continue the stages' latest checkpoints in --workdir")
    p.add_argument("--init-from", action="append", default=[], metavar="PATH",
                   help="start from pretrained weights: a tpo-convert output (VideoChat-TPO or Hugging Face LLM) or "
                        "an earlier work directory; repeatable, later sources override earlier ones (config field "
                        "init_from; see docs/training.md)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop (with a checkpoint) after N training steps of this invocation")
    p.add_argument("--profile", type=_parse_profile, default=None, metavar="FIRST:LAST",
                   help="write a jax.profiler trace of steps FIRST..LAST of each trained stage to WORKDIR/profile/<stage> "
                        "(config field profile_steps; open it with TensorBoard's profile plugin or Perfetto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if isinstance(args.stages, str):
        args.stages = _parse_stages(args.stages)
    hint = f"resume with --resume --workdir {args.workdir}"

    def body() -> int:
        cfg = _setup(args)
        from tpo_jax.train.trainer import run  # noqa: PLC0415
        summary = run(cfg, args.workdir, stages=args.stages, resume=args.resume, stop_after=args.stop_after,
                      progress=not args.no_progress)
        if summary.get("stopped"):
            print(f"tpo-train: stopped ({summary['stopped']}); {hint}")
            return 130 if summary["stopped"] == "SIGINT" else 0
        if summary.get("skipped_steps"):
            print(f"tpo-train: finished, but {summary['skipped_steps']} step(s) were skipped (a non-finite or exploding "
                  f"update; their batches trained nothing, no checkpoint holds their state): see history.jsonl "
                  f"(nonfinite_total); exit status 3", file=sys.stderr)
            return 3
        return 0

    return guarded("tpo-train", body, args.debug, interrupted=f"nothing saved since the last checkpoint; {hint}")


def eval_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpo-eval", description="Evaluate a tpo-train checkpoint on the validation split "
                                "(REC Acc@0.5 / mIoU, temporal R1@{0.3,0.5,0.7} / mIoU, highlight HIT@1 / mAP, "
                                "multiple-choice accuracy in letter and cloze form, mask prompt L1, and the tracking metrics of SAM2 "
                                "propagation from the predicted prompt: DAVIS J&F, success AUC, precision).")
    _common(p)
    p.add_argument("--stage", default=None, help="stage whose checkpoint to evaluate (default: the last one present)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--init", action="store_true", help="evaluate the freshly initialised model instead")
    p.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--mode", choices=("teacher", "generate", "both"), default="both",
                   help="score teacher-forced predictions, the model's generated answers (greedy, heads at the task "
                        "tokens it emits; keys gen/...), or both (default)")
    args = p.parse_args(argv)

    def body() -> int:
        cfg = _setup(args, workdir_config=True)
        from tpo_jax.train.load import evaluate_checkpoint  # noqa: PLC0415
        result = evaluate_checkpoint(cfg, args.workdir, stage=args.stage, step=args.step, init=args.init,
                                     mode=args.mode)
        text = json.dumps(result, indent=1)
        print(text)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text + "\n")
        return 0

    return guarded("tpo-eval", body, args.debug)


if __name__ == "__main__":
    sys.exit(train_main())

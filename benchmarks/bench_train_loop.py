"""Per-step time of the training loop (data pipeline + jitted step + metrics fetch) under CPython's
automatic garbage collector vs `tpo_jax.train.gc_schedule.GcSchedule`.

    python benchmarks/bench_train_loop.py                       # tiny, stage 3, 80 steps, both modes
    python benchmarks/bench_train_loop.py --stage stage2 --steps 120

Each mode builds a fresh model and iterator, runs `--steps` steps (the first 3 are dropped: compile),
and prints one JSON line: median and mean step time and how many steps took over twice the median.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

import jax
import numpy as np
from flax import nnx

from tpo_jax.data.pipeline import DataConfig, make_train_iterator
from tpo_jax.model import TPOModel
from tpo_jax.train.gc_schedule import GcSchedule
from tpo_jax.train.optim import OptimConfig
from tpo_jax.train.run_config import tiny_train_model
from tpo_jax.train.step import TrainConfig, init_train_state, make_train_step


def run(mode: str, stage: str, steps: int, batch: int, lm_rows: int) -> dict:
    cfg = tiny_train_model()
    train_cfg = TrainConfig(stage=stage, dropout=False, optim=OptimConfig(total_steps=1000), lm_rows=lm_rows)
    graphdef, state, frozen, tx = init_train_state(TPOModel(cfg, rngs=nnx.Rngs(0)), train_cfg)
    step = make_train_step(graphdef, tx, cfg, train_cfg)
    it = make_train_iterator(DataConfig(batch_size=batch, seq_len=128), cfg, stage)
    schedule = GcSchedule().start() if mode == "schedule" else None
    times = []
    try:
        for i in range(steps):
            t0 = time.perf_counter()
            if schedule is not None:
                schedule.step()
            state, metrics = step(state, frozen, next(it), jax.random.key(i))
            jax.device_get(metrics)
            times.append(time.perf_counter() - t0)
    finally:
        if schedule is not None:
            schedule.stop()
        gc.collect()
    t = np.asarray(times[3:])
    return {"bench": "train_loop", "gc": mode, "stage": stage, "batch": batch, "lm_rows": lm_rows,
            "median_s": round(float(np.median(t)), 4), "mean_s": round(float(t.mean()), 4),
            "steps_over_2x_median": int((t > 2 * np.median(t)).sum()), "steps": len(t)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="stage3")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lm-rows", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["auto", "schedule"], choices=["auto", "schedule"])
    args = p.parse_args()
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__}
    for mode in args.modes:
        print(json.dumps(dict(run(mode, args.stage, args.steps, args.batch, args.lm_rows), machine=machine)),
              flush=True)


if __name__ == "__main__":
    main()

"""Train-step time and tokens/s per stage, for the tiny and a small config, with each head's share.

    python benchmarks/bench_train_step.py                      # tiny and small, stages 1-3
    python benchmarks/bench_train_step.py --configs tiny --steps 5
    python benchmarks/bench_train_step.py --configs tiny --seq-len 128 --lm-rows 0 16 --no-share   # label-row logits

Per config and stage it times the jitted `train_step` (median of `--steps` after 2 warm-up steps)
on a synthetic batch mixing the three tasks and conversation. The head shares come from stage 3
(everything trainable): the step with no head loss (t_none) and with exactly one head's loss
(t_k) are timed with `--share-steps` steps each; share_k = (t_k - t_none) / t_all, where t_all has
all three. `--lm-rows` times each stage once per value of `TrainConfig.lm_rows` (0: logits at every
position; N: only at the first N label positions of each sample). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

# XLA:CPU's new fusion emitters compile this step ~2.5x slower and run it ~2x slower (measured on the
# tiny stage-3 step: 70 s → 29 s compile, 0.54 s → 0.24 s per step); the classic emitters are used on CPU.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax.data.synthetic import synthetic_batch
from tpo_jax import config as C
from tpo_jax.model import TPOModel
from tpo_jax.train.step import TrainConfig, init_train_state, make_train_step


def small() -> C.TPOConfig:
    """Between tiny and 7B: 8 frames of 64², ViT 128×4, Q-Former 128×2 with 32 queries, LLM 256×4."""
    return C.replace(C.tiny(), **{
        "vit.img_size": 64, "vit.patch_size": 16, "vit.num_frames": 8, "vit.ckpt_num_frames": 4,
        "vit.width": 128, "vit.depth": 4, "vit.num_heads": 4, "vit.mlp_dim": 512,
        "qformer.hidden_size": 128, "qformer.num_heads": 4, "qformer.intermediate_size": 512,
        "qformer.encoder_width": 128, "qformer.num_query_tokens": 16, "qformer.num_extra_query_tokens": 16,
        "llm.hidden_size": 256, "llm.num_layers": 4, "llm.num_heads": 8, "llm.num_kv_heads": 2,
        "llm.intermediate_size": 688, "lora.rank": 16, "lora.alpha": 32.0, "loc_hidden": 256,
        "heads.region.hidden": 256, "heads.temporal.hidden_dim": 64, "heads.temporal.ffn_dim": 128,
        "heads.temporal.num_queries": 10, "heads.temporal.num_dummies": 45, "heads.temporal.total_prompts": 10,
        "heads.temporal.txt_dim": 256, "heads.temporal.vid_dim": 130, "heads.mask.prompt_dim": 256,
        "heads.mask.sam_image_size": 1024,
    }).validate()


CONFIGS = {"tiny": lambda: C.get_config("tiny"), "small": small}
SEQ_LEN = {"tiny": 64, "small": 96}


def time_step(cfg, batch, train_cfg, steps):
    graphdef, state, frozen, tx = init_train_state(TPOModel(cfg, rngs=nnx.Rngs(0)), train_cfg)
    step = make_train_step(graphdef, tx, cfg, train_cfg)
    t0 = time.perf_counter()
    for i in range(2):
        state, metrics = step(state, frozen, batch, jax.random.key(i))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, batch, jax.random.key(i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s, float(metrics["loss/total"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--stages", nargs="+", default=["stage1", "stage2", "stage3"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--share-steps", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sample (0: the config's default)")
    p.add_argument("--lm-rows", type=int, nargs="+", default=[0], help="TrainConfig.lm_rows values to time")
    p.add_argument("--no-share", action="store_true", help="skip the per-head share measurement")
    args = p.parse_args()
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
               "jax": jax.__version__, "xla_flags": os.environ["XLA_FLAGS"]}
    for name in args.configs:
        cfg = CONFIGS[name]()
        seq_len = args.seq_len or SEQ_LEN[name]
        batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, args.batch, seq_len=seq_len).items()}
        tokens = int(batch["attention_mask"].sum())
        for stage in args.stages:
            for rows in args.lm_rows:
                step_s, compile_s, loss = time_step(cfg, batch, TrainConfig(stage=stage, lm_rows=rows), args.steps)
                print(json.dumps({"bench": "train_step", "config": name, "stage": stage, "batch": args.batch,
                                  "seq_len": seq_len, "lm_rows": rows, "step_s": round(step_s, 4),
                                  "tokens_per_s": round(tokens / step_s, 1),
                                  "padded_tokens_per_s": round(args.batch * seq_len / step_s, 1),
                                  "compile_s": round(compile_s, 1), "loss": round(loss, 4), "machine": machine}),
                      flush=True)
        if args.no_share:
            continue
        all_heads = ("region", "temporal", "mask")
        t = {k: time_step(cfg, batch, TrainConfig(stage="stage3", heads=h), args.share_steps)[0]
             for k, h in [("all", all_heads), ("none", ())] + [(h, (h,)) for h in all_heads]}
        print(json.dumps({"bench": "train_step_head_share", "config": name, "stage": "stage3",
                          "step_s": {k: round(v, 4) for k, v in t.items()},
                          "share": {h: round((t[h] - t["none"]) / t["all"], 3) for h in all_heads},
                          "machine": machine}), flush=True)


if __name__ == "__main__":
    main()

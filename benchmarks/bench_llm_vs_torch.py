"""Forward+backward throughput of our Mistral decoder vs the PyTorch `transformers` decoder.

Same config, same process, alternating timed rounds; prints one JSON line with both figures.

    python benchmarks/bench_llm_vs_torch.py                # 4 layers, hidden 512, seq 512, batch 4
    python benchmarks/bench_llm_vs_torch.py --rounds 5 --steps 3 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

# PyTorch's OpenMP workers spin for a while after each op; interleaved with JAX that steals the cores
# from XLA's threads (measured: JAX 4.9 s/step with spinning, 4.5 s without; PyTorch unchanged).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

from tpo_jax.config import LLMConfig
from tpo_jax.llm import MistralDecoder
from mistral_args import add_mistral_args, llm_config  # noqa: E402  (benchmarks/)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mistral_args(p)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4, help="alternating timed rounds per framework")
    p.add_argument("--steps", type=int, default=2, help="steps per round")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p.parse_args()


def jax_step_fn(cfg: LLMConfig, dtype):
    model = MistralDecoder(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss_fn(params, ids):
        logits = nnx.merge(graphdef, params)(ids).logits
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))

    def step(ids):
        loss, grads = grad_fn(params, ids)
        jax.block_until_ready(grads)
        return float(loss)

    return step


def torch_step_fn(cfg: LLMConfig, dtype):
    hf_cfg = transformers.MistralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, rope_theta=cfg.rope_theta, sliding_window=None,
        tie_word_embeddings=False, attn_implementation="sdpa")
    model = transformers.MistralForCausalLM(hf_cfg).to(getattr(torch, dtype)).train()

    def step(ids):
        model.zero_grad(set_to_none=True)
        t_ids = torch.from_numpy(ids)
        out = model(input_ids=t_ids, labels=t_ids)
        out.loss.backward()
        return float(out.loss.detach())

    return step


def main():
    args = parse_args()
    cfg = llm_config(args)
    cfg.validate()
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int64)
    steps = {"jax": jax_step_fn(cfg, jnp.dtype(args.dtype)), "torch": torch_step_fn(cfg, args.dtype)}
    inputs = {"jax": jnp.asarray(ids, jnp.int32), "torch": ids}
    for name, fn in steps.items():  # compile / warm up
        fn(inputs[name])
        fn(inputs[name])
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn(inputs[name])
            times[name].append((time.perf_counter() - t0) / args.steps)
    tokens = args.batch * args.seq
    step_s = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "bench": "llm_fwd_bwd", "config": vars(args),
        "jax_tokens_per_s": round(tokens / step_s["jax"], 1),
        "torch_tokens_per_s": round(tokens / step_s["torch"], 1),
        "jax_step_s": round(step_s["jax"], 4), "torch_step_s": round(step_s["torch"], 4),
        "ratio_jax_over_torch": round(step_s["torch"] / step_s["jax"], 3),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax_backend": jax.default_backend(),
                    "torch_threads": torch.get_num_threads(), "jax": jax.__version__, "torch": torch.__version__},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Greedy decoding throughput: our `tpo_jax.generate` against `transformers` `generate`, same Mistral, same process.

Our side is a TPO model whose LLM is the benchmarked Mistral (LoRA off), fed text-only prompts, so the work is
the LLM's prefill + KV-cache decode (the compiled `lax.while_loop`); the PyTorch side is `MistralForCausalLM` with
the same weights (written by `export_hf`; eager attention, DynamicCache). Both decode exactly `--new-tokens`
tokens (no stop id), float32.
Prints one JSON line per (implementation, batch size): median seconds of `--rounds` timed calls (rounds alternate
between the two), new tokens per second, and for ours the first call's time (compile included).

    python benchmarks/bench_generate.py                      # 4 layers, hidden 512, prompt 128, 128 new, batch 1 and 8
    python benchmarks/bench_generate.py --batches 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_llm_vs_torch.py

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from tpo_jax import config as C
from tpo_jax.checkpoints.export import ParamSet, export_hf
from tpo_jax.generate import GenerationConfig, GenerationRequest, Generator
from tpo_jax.model import TPOModel
from mistral_args import add_mistral_args, llm_config  # noqa: E402  (benchmarks/)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mistral_args(p)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args()


def build(args):
    """Our TPO model with the benchmarked LLM, and the same LLM in transformers (exported with `export_hf`)."""
    llm = llm_config(args, max_position=4096)
    cfg = C.replace(C.tiny(), llm=llm, **{"lora.enabled": False, "heads.temporal.txt_dim": args.hidden}).validate()
    model = TPOModel(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ParamSet.from_state(nnx.state(model, nnx.Param), cfg), os.path.join(tmp, "hf"))
        hf = transformers.MistralForCausalLM.from_pretrained(os.path.join(tmp, "hf"), attn_implementation="eager")
    return model, hf.float().eval()


def main():
    args = parse_args()
    model, hf = build(args)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, stop_ids=(), buckets=(args.prompt,))
    generator = Generator(model, gen)
    rng = np.random.default_rng(0)
    env = {"device": jax.devices()[0].device_kind, "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
           "torch": torch.__version__, "transformers": transformers.__version__, "layers": args.layers,
           "hidden": args.hidden, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "dtype": "float32"}
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = rng.integers(3, 32000, (batch, args.prompt)).astype(np.int32)
        requests = [GenerationRequest(row) for row in ids]

        def ours():
            out = generator.decode(requests)
            jax.block_until_ready(out.tokens)
            return np.asarray(out.tokens)

        def theirs():
            with torch.no_grad():
                out = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.ones_like(
                    torch.tensor(ids)), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
            return out[:, args.prompt:].numpy()

        t0 = time.perf_counter()
        a = ours()
        first = time.perf_counter() - t0
        b = theirs()
        same = float((a == b).mean())  # greedy ids of the two (float32 ties aside, 1.0)
        times = {"tpo_jax": [], "transformers": []}
        for _ in range(args.rounds):
            for name, fn in (("tpo_jax", ours), ("transformers", theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            sec = statistics.median(ts)
            row = {"impl": name, "batch": batch, "seconds": round(sec, 4),
                   "tokens_per_s": round(batch * args.new_tokens / sec, 1), "same_ids": same, **env}
            if name == "tpo_jax":
                row["first_call_s"] = round(first, 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    main()

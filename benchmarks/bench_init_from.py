"""Host memory of loading pretrained weights onto 8 devices (`init_from`): does a process ever hold more than one
device shard of a tensor beyond the arrays it has placed?

A Hugging Face-style Mistral checkpoint with large tensors (default: hidden 2048, MLP 5632, 2 layers, vocabulary
32,000: 262 MB embedding and lm_head in float32) is written with NumPy and converted by `tpo-convert hf` twice:
per layer, and stacked. Each case then runs in a fresh process with 8 fake XLA:CPU devices and FSDP over all 8:
the tiny TPO model with this LLM takes the checkpoint through `tpo_jax.train.init_from` (plan, then
`load_init` into abstract arrays carrying the train state's shardings). A thread samples the process's RSS every
2 ms. The devices are host memory here, so the loaded shards themselves add their bytes to RSS; what the loader
holds on top of them is

    transient = peak RSS during the load - RSS after it

which is compared with the largest device shard of one tensor and with the largest whole tensor. The worker runs
with glibc's mmap threshold at 128 KiB, so every large block is unmapped when freed and RSS follows the live
bytes; the load is run once before the measured one (imports, thread pools and TensorStore contexts excluded).

Cases: `stacked` (Orbax restores each array into its shards), `per_layer` (the model scans its layers: every
stacked parameter is read across layouts, shard by shard), and each with the base vocabulary (the 7 task-token
rows appended: embedding and lm_head read in row blocks for the mean, then shard by shard) or the full one.

    python benchmarks/bench_init_from.py                     # all four cases
    python benchmarks/bench_init_from.py --hidden 1024 --out /tmp/init_from.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2 ** 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_source(directory: str, hidden: int, mlp: int, layers: int, vocab: int, heads: int, kv_heads: int) -> None:
    """A Mistral checkpoint (model.safetensors + config.json) of random float32 tensors."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    head_dim = hidden // heads

    def w(*shape):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, hidden), "lm_head.weight": w(vocab, hidden),
         "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
                  p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
                  p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
                  p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
                  p + "mlp.gate_proj.weight": w(mlp, hidden), p + "mlp.up_proj.weight": w(mlp, hidden),
                  p + "mlp.down_proj.weight": w(hidden, mlp),
                  p + "input_layernorm.weight": np.ones(hidden, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(hidden, np.float32)})
    os.makedirs(directory, exist_ok=True)
    save_file(t, os.path.join(directory, "model.safetensors"))
    config = {"model_type": "mistral", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": mlp,
              "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096, "sliding_window": None,
              "tie_word_embeddings": False}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)


def worker(spec: dict) -> dict:
    """One load in this (fresh) process; returns its memory figures."""
    import jax
    import numpy as np
    from flax import nnx

    from tpo_jax import config as C
    from tpo_jax.checkpoints.orbax_io import flatten
    from tpo_jax.model import abstract_model
    from tpo_jax.sharding import MeshConfig, get_rules, make_mesh, tree_shardings
    from tpo_jax.train import init_from

    llm = {f"llm.{k}": v for k, v in spec["llm"].items()}
    cfg = C.replace(C.get_config("tiny"), **llm, **{"llm.stack.scan_layers": spec["scan"],
                                                    "heads.temporal.txt_dim": spec["llm"]["hidden_size"]})
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    params = nnx.state(abstract_model(cfg), nnx.Param)
    shardings = tree_shardings(params, mesh, get_rules("fsdp"))
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}
    flat_sh = {".".join(map(str, p)): (s.get_value() if hasattr(s, "get_value") else s)
               for p, s in nnx.to_flat_state(shardings)}
    target = {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flat_sh[p]) for p, v in flat.items()}
    plan = init_from.prepare([spec["source"]], target)
    loaded = [p for paths in plan.direct.values() for p in paths] + list(plan.extend)
    item = np.dtype(np.float32).itemsize
    largest = max(int(np.prod(target[p].shape)) * item for p in loaded)
    largest_shard = max(int(np.prod(target[p].sharding.shard_shape(target[p].shape))) * item for p in loaded)
    total = sum(int(np.prod(target[p].shape)) * item for p in loaded)

    (warm,) = init_from.load_init(plan, target)  # imports, thread pools, TensorStore contexts: not measured
    jax.block_until_ready(jax.tree.leaves(warm))
    del warm
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(_rss())
            time.sleep(0.002)

    before = _rss()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    (out,) = init_from.load_init(plan, target)
    out = flatten(out)
    leaves = [out[p] for p in loaded]
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    after = _rss()
    peak = max(samples + [after])
    return {"case": spec["case"], "tensors": len(loaded), "loaded_mib": total / MiB,
            "largest_tensor_mib": largest / MiB, "largest_shard_mib": largest_shard / MiB,
            "rss_before_mib": before / MiB, "rss_after_mib": after / MiB, "rss_peak_mib": peak / MiB,
            "held_mib": (after - before) / MiB, "transient_mib": (peak - after) / MiB, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        with open(args.worker) as f:
            spec = json.load(f)
        print("RESULT " + json.dumps(worker(spec)), flush=True)
        return

    from tpo_jax.checkpoints.convert import convert_hf

    llm = {"hidden_size": args.hidden, "intermediate_size": args.mlp, "num_layers": args.layers,
           "num_heads": args.heads, "num_kv_heads": args.kv_heads, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
           "max_position": 4096}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab, name in ((32000, "base vocabulary (+7 rows)"), (32007, "full vocabulary")):
            src = os.path.join(tmp, f"hf_{vocab}")
            write_source(src, args.hidden, args.mlp, args.layers, vocab, args.heads, args.kv_heads)
            for scan, layout in ((True, "stacked"), (False, "per_layer")):
                conv = os.path.join(tmp, f"conv_{vocab}_{layout}")
                convert_hf(src, conv, scan_layers=scan)
                spec = {"case": f"{layout}, {name}", "source": conv, "llm": llm, "scan": True}
                spec_path = os.path.join(tmp, "spec.json")
                with open(spec_path, "w") as f:
                    json.dump(spec, f)
                # large blocks are mmap-ed and unmapped when freed, so RSS follows the live bytes (glibc would
                # otherwise keep freed memory and hide a transient, or count it as held)
                env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
                           MALLOC_MMAP_THRESHOLD_="131072", MALLOC_ARENA_MAX="2",
                           PYTHONPATH=os.pathsep.join(x for x in (REPO, os.environ.get("PYTHONPATH", "")) if x))
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec_path], env=env,
                                      capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    raise SystemExit(f"{spec['case']} failed:\n{proc.stderr[-3000:]}")
                results.append(json.loads(line[-1][len("RESULT "):]))
                r = results[-1]
                print(f"{r['case']}: {r['tensors']} tensors, {r['loaded_mib']:.0f} MiB loaded in {r['seconds']:.1f} s; "
                      f"RSS +{r['held_mib']:.0f} MiB held, transient {r['transient_mib']:.1f} MiB (largest shard "
                      f"{r['largest_shard_mib']:.1f} MiB, largest tensor {r['largest_tensor_mib']:.0f} MiB)", flush=True)
    print("\n| case | loaded MiB | held MiB | transient MiB | largest shard MiB | largest tensor MiB | s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['loaded_mib']:.0f} | {r['held_mib']:.0f} | {r['transient_mib']:.1f} | "
              f"{r['largest_shard_mib']:.1f} | {r['largest_tensor_mib']:.0f} | {r['seconds']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

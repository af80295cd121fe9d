"""Streaming conversion benchmark: a synthetic Mistral-shaped Hugging Face checkpoint (>= 2 GB, bf16) is
converted with `tpo_jax.checkpoints.convert.convert_hf` in a fresh subprocess; reports wall time, GB/s and the
subprocess's peak RSS (resource.getrusage ru_maxrss), checked against 2 × largest tensor + 1 GB.

    python benchmarks/bench_convert.py                      # 4 layers, hidden 4096 (Mistral-7B widths): 2.3 GB
    python benchmarks/bench_convert.py --layers 8 --export  # bigger, and time export_hf back to safetensors too

The synthetic checkpoint is written to --workdir (default /tmp/tpo_bench_convert) with the streaming
safetensors writer, so generating it needs about one tensor of memory as well. It is deleted afterwards
unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tpo_jax.checkpoints.safetensors_writer import ShardedWriter  # noqa: E402

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})

def hwm():  # peak RSS of this process image (Linux VmHWM), not inherited from the parent
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

t0 = time.perf_counter()
from tpo_jax.checkpoints.convert import convert_hf
from tpo_jax.checkpoints.export import export_hf
imports = time.perf_counter() - t0
rss_after_imports = hwm()
t = time.perf_counter()
import tpo_jax.checkpoints.orbax_io as oio
_write = oio.write_streaming
oio.write_streaming = lambda *a, **k: _write(*a, **{{**k, "compression": {compression!r}}})
import tpo_jax.checkpoints.convert as cv
cv.write_streaming = oio.write_streaming
convert_hf({src!r}, {out!r}, dtype={dtype!r}, budget_bytes={budget})
convert_s = time.perf_counter() - t
rss_convert = hwm()
export_s = None
if {export!r}:
    t = time.perf_counter()
    export_hf({out!r}, {exp!r})
    export_s = time.perf_counter() - t
print("RESULT " + json.dumps(dict(imports=imports, rss_after_imports=rss_after_imports, convert_s=convert_s,
                                  rss_convert=rss_convert, export_s=export_s, peak=hwm(),
                                  ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def mistral_entries(layers: int, hidden: int, inter: int, vocab: int, heads: int, kv_heads: int):
    hd = hidden // heads
    bf16 = np.dtype(ml_dtypes.bfloat16)
    out = [("model.embed_tokens.weight", bf16, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", bf16, (hidden,)),
                (p + "post_attention_layernorm.weight", bf16, (hidden,)),
                (p + "self_attn.q_proj.weight", bf16, (heads * hd, hidden)),
                (p + "self_attn.k_proj.weight", bf16, (kv_heads * hd, hidden)),
                (p + "self_attn.v_proj.weight", bf16, (kv_heads * hd, hidden)),
                (p + "self_attn.o_proj.weight", bf16, (hidden, heads * hd)),
                (p + "mlp.gate_proj.weight", bf16, (inter, hidden)), (p + "mlp.up_proj.weight", bf16, (inter, hidden)),
                (p + "mlp.down_proj.weight", bf16, (hidden, inter))]
    return out + [("model.norm.weight", bf16, (hidden,)), ("lm_head.weight", bf16, (vocab, hidden))]


def write_source(directory: Path, args) -> tuple[int, int]:
    directory.mkdir(parents=True, exist_ok=True)
    entries = mistral_entries(args.layers, args.hidden, args.inter, args.vocab, args.heads, args.kv_heads)
    writer = ShardedWriter(directory, entries, max_shard_bytes=int(1e9))
    rng = np.random.default_rng(0)
    total = largest = 0
    for key, dtype, shape in entries:
        n = int(np.prod(shape))
        # N(0, 0.02²) like initialised weights: as (in)compressible as real bf16 weights
        writer.write(key, (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype))
        total += n * dtype.itemsize
        largest = max(largest, n * dtype.itemsize)
    writer.close()
    (directory / "config.json").write_text(json.dumps({
        "model_type": "mistral", "vocab_size": args.vocab, "hidden_size": args.hidden,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "intermediate_size": args.inter, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 32768,
        "sliding_window": None, "tie_word_embeddings": False}))
    return total, largest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16"])
    ap.add_argument("--budget-mb", type=int, default=256)
    ap.add_argument("--export", action="store_true", help="also time export_hf back to safetensors")
    ap.add_argument("--workdir", default="/tmp/tpo_bench_convert")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--compression", action="store_true", help="Orbax zstd compression on (default off)")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    work = Path(args.workdir)
    if args.generate_only:
        print("GENERATED " + json.dumps(write_source(work / "src", args)))
        return
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    # generate in a subprocess so this (parent) process stays small: a child's ru_maxrss starts from the
    # parent's RSS at fork time on Linux
    gen = subprocess.run([sys.executable, __file__, "--generate-only"] + sys.argv[1:], capture_output=True,
                         text=True, check=True)
    total, largest = json.loads(next(ln for ln in gen.stdout.splitlines() if ln.startswith("GENERATED "))[10:])
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB "
          f"(written in {time.perf_counter() - t:.1f} s)")
    code = CHILD.format(root=str(ROOT), src=str(work / "src"), out=str(work / "out"), exp=str(work / "exp"),
                        dtype=args.dtype, budget=args.budget_mb * 2 ** 20, export=args.export,
                        compression=args.compression)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        raise SystemExit(f"conversion subprocess failed ({proc.returncode})")
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    peak = res["peak"]
    # the largest tensor as written: with --dtype float32 a bf16 source tensor doubles
    largest = max(largest, largest * 2 if args.dtype == "float32" else largest)
    bound = 2 * largest + 1e9
    out_bytes = sum(f.stat().st_size for f in (work / "out").rglob("*") if f.is_file())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"command: python benchmarks/bench_convert.py --layers {args.layers} --hidden {args.hidden} "
          f"--dtype {args.dtype} --budget-mb {args.budget_mb}{' --export' if args.export else ''}"
          f"{' --compression' if args.compression else ''}")
    print(f"convert : {res['convert_s']:.1f} s, {total / 1e9 / res['convert_s']:.2f} GB/s "
          f"(subprocess wall {wall:.1f} s incl. {res['imports']:.1f} s imports); Orbax output {out_bytes / 1e9:.2f} GB")
    if res["export_s"] is not None:
        print(f"export  : {res['export_s']:.1f} s, {total / 1e9 / res['export_s']:.2f} GB/s")
    print(f"peak RSS: {peak / 1e9:.2f} GB (VmHWM; ru_maxrss {res['ru_maxrss'] / 1e9:.2f} GB; after imports "
          f"{res['rss_after_imports'] / 1e9:.2f} GB, after convert {res['rss_convert'] / 1e9:.2f} GB); "
          f"bound 2 x largest + 1 GB = {bound / 1e9:.2f} GB -> "
          f"{'OK' if peak < bound else 'EXCEEDED'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if peak >= bound:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

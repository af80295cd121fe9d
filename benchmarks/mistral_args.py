"""The benchmarked Mistral's shape on the command line, shared by the LLM-vs-PyTorch benchmarks."""

from __future__ import annotations

import argparse


def add_mistral_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--layers/--hidden/--heads/--kv-heads/--intermediate/--vocab, default the 4-layer, 512-wide Mistral, and how
    its layer stack runs (--scan, --remat, --attention; default unrolled, no remat, einsum)."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1792)
    p.add_argument("--vocab", type=int, default=32007)
    p.add_argument("--scan", action="store_true", help="scanned decoder layers (llm.stack.scan_layers)")
    p.add_argument("--remat", default="none", help="remat policy of the decoder layers (llm.stack.remat_policy)")
    p.add_argument("--attention", default="einsum", help="attention implementation (llm.stack.attention)")
    return p


def llm_config(args, **extra):
    """The `LLMConfig` of those arguments."""
    from tpo_jax.config import LLMConfig, StackConfig
    stack = StackConfig(scan_layers=args.scan, remat_policy=args.remat, attention=args.attention)
    return LLMConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                     num_kv_heads=args.kv_heads, intermediate_size=args.intermediate, stack=stack, **extra)

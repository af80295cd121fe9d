"""The benchmarked Mistral's shape on the command line, shared by the LLM-vs-PyTorch benchmarks."""

from __future__ import annotations

import argparse


def add_mistral_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--layers/--hidden/--heads/--kv-heads/--intermediate/--vocab, default the 4-layer, 512-wide Mistral."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1792)
    p.add_argument("--vocab", type=int, default=32007)
    return p


def llm_config(args, **extra):
    """The `LLMConfig` of those arguments."""
    from tpo_jax.config import LLMConfig
    return LLMConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                     num_kv_heads=args.kv_heads, intermediate_size=args.intermediate, **extra)

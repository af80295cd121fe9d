"""What each accelerator can do: peak dense bf16 FLOP/s, HBM capacity and bandwidth, inter-chip bandwidth.

The figures are the vendors' published per-chip numbers (Cloud TPU system-architecture pages; NVIDIA
datasheets, dense, without sparsity). They are the denominators of MFU (`tpo_jax.train.trainer` logs it,
`tpo-shard-report --topology` estimates it) and the capacity a plan must fit in.

A chip is found by a JAX `device_kind` ("TPU v5 lite", "NVIDIA H100 80GB HBM3") or by the generation
prefix of a TPU topology name ("v5p:4x4x4" → v5p). A CPU has no entry: its peak is whatever the run
config says (`peak_tflops`).
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: float  # HBM capacity per chip
    hbm_bandwidth: float  # bytes/s per chip
    ici_bandwidth: float  # bidirectional inter-chip bytes/s per chip (NVLink for GPUs)


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", 275e12, 32 * GiB, 1.2e12, 300e9),
    Chip("v5e", 197e12, 16 * GiB, 819e9, 400e9),
    Chip("v5p", 459e12, 95 * GiB, 2.765e12, 1.2e12),
    Chip("v6e", 918e12, 32 * GiB, 1.638e12, 800e9),
    Chip("a100", 312e12, 80 * GiB, 2.039e12, 600e9),
    Chip("h100", 989e12, 80 * GiB, 3.35e12, 900e9),
    Chip("h200", 989e12, 141 * GiB, 4.8e12, 900e9),
    Chip("b200", 2.25e15, 180 * GiB, 8e12, 1.8e12),
)}

# topology-name prefixes JAX accepts, and the chip each names
TOPOLOGY_PREFIXES = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5p": "v5p", "v6e": "v6e"}


def chip_for_device_kind(kind: str) -> Chip | None:
    """The chip of a JAX `device.device_kind`, or None (a CPU, or a kind not in the table)."""
    k = kind.lower()
    if k.startswith("tpu"):
        if "v6" in k:
            return CHIPS["v6e"]
        if "v5" in k:
            return CHIPS["v5e"] if ("lite" in k or "v5e" in k) else CHIPS["v5p"]
        if "v4" in k:
            return CHIPS["v4"]
        return None
    for name in ("b200", "h200", "h100", "a100"):
        if name in k:
            return CHIPS[name]
    return None


def chip_for_topology(topology: str) -> Chip:
    """The chip of a TPU topology name such as 'v5p:4x4x4' (ValueError for an unknown generation)."""
    gen = topology.split(":", 1)[0].lower()
    if gen not in TOPOLOGY_PREFIXES:
        raise ValueError(f"unknown TPU generation {gen!r} in topology {topology!r}; "
                         f"known: {', '.join(sorted(TOPOLOGY_PREFIXES))}")
    return CHIPS[TOPOLOGY_PREFIXES[gen]]


def peak_flops_per_device(device_kind: str, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `peak_tflops` (× 1e12) when given, else the table's, else None."""
    if peak_tflops:
        return float(peak_tflops) * 1e12
    chip = chip_for_device_kind(device_kind)
    return chip.peak_flops if chip else None

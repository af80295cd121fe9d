"""TPU topologies on a machine without a TPU: compile-only devices through libtpu (ahead-of-time compiles).

With the `tpu-aot` extra installed (`pip install -e ".[tpu-aot]"`: `jax[tpu]` at the project's jax version,
which brings libtpu), `jax.experimental.topologies.get_topology_desc("v5p:4x4x4", "tpu").devices` are the
chips of a real TPU slice: a mesh of them shards, lowers and compiles the train step for that slice,
and `memory_analysis()` is what the chip would hold. Nothing runs; no TPU is needed.

    prepare_environment("v5p:2x2x2")        # before JAX starts: env vars that keep libtpu quiet
    devices = topology_devices("v5p:2x2x2") # 8 compile-only TPU v5p devices (one clear error otherwise)
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

from tpo_jax.config import ConfigError
from tpo_jax.train.chips import TOPOLOGY_PREFIXES, Chip, chip_for_topology

_NAME_RE = re.compile(r"^(?P<gen>[a-z0-9]+):(?P<dims>\d+(?:x\d+){1,2})$")
INSTALL_HINT = 'pip install -e ".[tpu-aot]"  (jax[tpu] at the project\'s jax version; brings libtpu)'


def parse_topology(name: str, field: str = "topology") -> tuple[Chip, tuple[int, ...]]:
    """'v5p:4x4x4' → (the v5p chip, (4, 4, 4)); one ConfigError naming `field` for anything else."""
    m = _NAME_RE.match(name.strip().lower())
    if not m:
        raise ConfigError(f"config field '{field}': {name!r} is not a TPU topology name GEN:AxB[xC], "
                          f"e.g. v5p:2x2x2, v5e:4x4, v6e:8x8, v4:2x2x2")
    if m.group("gen") not in TOPOLOGY_PREFIXES:
        raise ConfigError(f"config field '{field}': unknown TPU generation {m.group('gen')!r} in {name!r}; "
                          f"known: {', '.join(sorted(TOPOLOGY_PREFIXES))}")
    dims = tuple(int(d) for d in m.group("dims").split("x"))
    if min(dims) < 1:
        raise ConfigError(f"config field '{field}': {name!r} has a zero dimension")
    return chip_for_topology(m.group("gen")), dims


def chip_count(name: str) -> int:
    return math.prod(parse_topology(name)[1])


def accelerator_type(name: str) -> str:
    """libtpu's accelerator-type name ('v5p:2x2x2' → 'v5p-16': v4 and v5p count TensorCores, two per chip)."""
    chip, dims = parse_topology(name)
    chips = math.prod(dims)
    if chip.name in ("v4", "v5p"):
        return f"{chip.name}-{2 * chips}"
    return f"{'v5litepod' if chip.name == 'v5e' else chip.name}-{chips}"


def aot_environment(name: str) -> dict[str, str]:
    """Environment variables for a compile-only libtpu: with no TPU attached it looks for one and logs errors;
    these name the slice instead. Set before libtpu loads (`prepare_environment`)."""
    return {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # a compile-only client claims no chip: let processes share libtpu
            "TPU_ACCELERATOR_TYPE": accelerator_type(name)}


def prepare_environment(name: str) -> None:
    for key, value in aot_environment(name).items():
        os.environ.setdefault(key, value)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str, field: str = "topology") -> list:
    """The compile-only devices of TPU topology `name`; one ConfigError for a bad name, a missing libtpu, or
    a topology libtpu rejects."""
    parse_topology(name, field)
    if not libtpu_available():
        raise ConfigError(f"config field '{field}': compiling for TPU topology {name!r} needs libtpu, which is not "
                          f"installed; {INSTALL_HINT}")
    from jax.experimental import topologies  # noqa: PLC0415
    try:
        return list(topologies.get_topology_desc(name, "tpu").devices)
    except Exception as e:  # libtpu's own message (an unsupported shape, a version mismatch)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config field '{field}': libtpu cannot make topology {name!r}: {first}") from None


def check_mesh_size(mesh_cfg, chips: int, where: str) -> None:
    """A plan's data × fsdp × tensor must use every chip of the topology."""
    n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
    if n != chips:
        raise ConfigError(f"config field '{where}': mesh {mesh_cfg.data}x{mesh_cfg.fsdp}x{mesh_cfg.tensor} = {n} "
                          f"chips, but the topology has {chips}; make data x fsdp x tensor = {chips}")

"""Multi-process (multi-host) setup: `jax.distributed` from a config or the environment, and helpers
so that only process 0 logs and writes.

The same code runs on a TPU pod, a GPU cluster and several CPU processes on one machine:

* TPU pods, SLURM, Open MPI, Kubernetes: `DistributedConfig(auto=True)` (or `TPO_DISTRIBUTED_AUTO=1`)
  lets `jax.distributed.initialize()` detect the cluster.
* Anywhere else: coordinator address, process count and this process's id, from the config or the
  environment (`TPO_COORDINATOR_ADDRESS=host:port`, `TPO_NUM_PROCESSES`, `TPO_PROCESS_ID`,
  optional `TPO_LOCAL_DEVICE_IDS=0,1`).
* CPU processes use gloo collectives (`jax_cpu_collectives_implementation`).

`initialize` must run before anything else touches JAX devices. With one process it does nothing.
Each process then feeds its own rows of the global batch
(`tpo_jax.sharding.data_shard_for_process`, `shard_batch`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping

import jax

from tpo_jax.config import ConfigError
from tpo_jax.config_fields import check_field

ENV_PREFIX = "TPO_"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None
    auto: bool = False  # let JAX detect the cluster (TPU pod, SLURM, Open MPI, ...)
    cpu_collectives: str = "gloo"
    initialization_timeout: int = 300  # seconds

    def validate(self, prefix: str = "distributed.") -> "DistributedConfig":
        check_field(isinstance(self.num_processes, int) and self.num_processes >= 1, prefix + "num_processes",
                    f"must be a positive integer, got {self.num_processes!r}")
        check_field(isinstance(self.process_id, int) and 0 <= self.process_id < self.num_processes,
                    prefix + "process_id", f"must be in [0, {self.num_processes}), got {self.process_id!r}")
        if self.num_processes > 1 and not self.auto:
            addr = self.coordinator_address or ""
            check_field(":" in addr and addr.rsplit(":", 1)[1].isdigit(), prefix + "coordinator_address",
                        f"{self.num_processes} processes need the coordinator as 'host:port', got {addr!r}")
        check_field(self.cpu_collectives in ("gloo", "mpi"), prefix + "cpu_collectives",
                    f"{self.cpu_collectives!r} is not one of ['gloo', 'mpi']")
        return self


def config_from_env(env: Mapping[str, str] | None = None) -> DistributedConfig:
    """A `DistributedConfig` from TPO_* environment variables (defaults: one process)."""
    env = os.environ if env is None else env

    def get(name, cast, default):
        key = ENV_PREFIX + name
        if key not in env or env[key] == "":
            return default
        try:
            return cast(env[key])
        except ValueError:
            raise ConfigError(f"environment variable {key}: cannot parse {env[key]!r}") from None

    ids = get("LOCAL_DEVICE_IDS", lambda s: tuple(int(v) for v in s.split(",")), None)
    return DistributedConfig(
        coordinator_address=get("COORDINATOR_ADDRESS", str, None), num_processes=get("NUM_PROCESSES", int, 1),
        process_id=get("PROCESS_ID", int, 0), local_device_ids=ids,
        auto=get("DISTRIBUTED_AUTO", lambda s: s.lower() in ("1", "true", "yes"), False),
        cpu_collectives=get("CPU_COLLECTIVES", str, "gloo"))


_initialized = False


def initialize(cfg_or_env: DistributedConfig | Mapping[str, str] | None = None) -> bool:
    """Start `jax.distributed` for this process; True when running multi-process.

    `cfg_or_env`: a DistributedConfig, a mapping of TPO_* variables, or None (the process environment).
    """
    global _initialized
    cfg = cfg_or_env if isinstance(cfg_or_env, DistributedConfig) else config_from_env(cfg_or_env)
    cfg.validate()
    if _initialized:
        return True
    if cfg.num_processes == 1 and not cfg.auto:
        return False
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    if cfg.auto:
        jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout)
    else:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id, local_device_ids=cfg.local_device_ids,
                                   initialization_timeout=cfg.initialization_timeout)
    _initialized = True
    quiet_other_processes()
    return True


def is_main_process() -> bool:
    """True on process 0, the one that logs, writes checkpoints and reports metrics."""
    return jax.process_index() == 0


def quiet_other_processes(level: int = logging.WARNING) -> None:
    """Raise the log level of every process except 0, so each message appears once."""
    if is_main_process():
        return
    logging.getLogger().setLevel(level)
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def sync(tag: str) -> None:
    """Barrier: wait until every process reaches `tag` (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(tag)


def shutdown() -> None:
    global _initialized
    if _initialized:
        jax.distributed.shutdown()
        _initialized = False

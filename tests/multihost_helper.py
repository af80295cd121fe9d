"""Running the worker processes of a multi-process test on localhost (no tests here)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(script: str, args: list[list[str]], log_dir, timeout: float = 900) -> list[tuple[int, str, str]]:
    """Start `tests/<script>` once per entry of `args` (each process's arguments), wait for all, and return
    (exit code, stdout, stderr) of each. Output goes to files in `log_dir`, not pipes: a worker blocked on a
    full pipe would stall every worker at their next barrier. The workers set their own XLA flags."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    logs = [(open(os.path.join(log_dir, f"worker{i}.out"), "w+"), open(os.path.join(log_dir, f"worker{i}.err"), "w+"))
            for i in range(len(args))]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, script), *a], stdout=out, stderr=err, text=True,
                              env=env) for a, (out, err) in zip(args, logs)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, (out, err) in zip(procs, logs):
        out.seek(0)
        err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return results


def check_exit(results) -> None:
    """Every worker exited 0; else the stderr tail of each."""
    codes = [code for code, _, _ in results]
    assert codes == [0] * len(results), "\n".join(f"--- process {i} (exit {code}):\n{err[-2500:]}"
                                                  for i, (code, _, err) in enumerate(results))


def worker_arguments(parser) -> None:
    """The arguments every worker takes: its process id, the process count and the coordinator's port."""
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)


def join_localhost(args, devices: int) -> None:
    """In a worker, before anything imports JAX: `devices` fake CPU devices with the suite's compile flags and
    full-precision matmuls, the repository importable, and `jax.distributed` joined on localhost."""
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                               "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0")
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(HERE))

    import jax
    jax.config.update("jax_default_matmul_precision", "highest")

    from tpo_jax.train.distributed import DistributedConfig, initialize
    initialize(DistributedConfig(coordinator_address=f"localhost:{args.port}", num_processes=args.num_processes,
                                 process_id=args.process_id, initialization_timeout=60))

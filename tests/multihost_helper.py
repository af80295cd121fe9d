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

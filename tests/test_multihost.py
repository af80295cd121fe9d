"""Multi-process training on localhost: 2 processes × 4 CPU devices with `jax.distributed` (gloo),
FSDP over all 8 devices, per-host batch rows; the losses equal a single-process, single-device run."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpo_jax.data.synthetic import synthetic_batch
from tpo_jax.model import TPOModel
from tpo_jax.train.distributed import DistributedConfig, config_from_env
from tpo_jax.config import ConfigError
from tpo_jax.train.step import init_train_state, make_train_step

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multihost_worker  # noqa: E402

STEPS, BATCH = 3, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _reference_losses():
    cfg, train_cfg = multihost_worker.settings()
    graphdef, state, frozen, tx = init_train_state(TPOModel(cfg, rngs=nnx.Rngs(0)), train_cfg)
    step = make_train_step(graphdef, tx, cfg, train_cfg)
    batch = synthetic_batch(cfg, BATCH, seed=0, tasks=multihost_worker.BATCH_TASKS)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, frozen, batch, jax.random.key(i))
        losses.append(float(metrics["loss/total"]))
    return losses


@pytest.mark.slow
def test_two_processes_fsdp_match_single_process():
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), "--process-id", str(i),
                               "--num-processes", "2", "--port", str(port), "--devices", "4",
                               "--steps", str(STEPS), "--batch", str(BATCH)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    try:
        reference = _reference_losses()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    result = json.loads([line for line in outs[0][0].splitlines() if line.startswith("{")][-1])
    assert result["devices"] == 8 and result["processes"] == 2 and result["local_rows"] == BATCH // 2
    assert not [line for line in outs[1][0].splitlines() if line.startswith("{")], "only process 0 reports"
    np.testing.assert_allclose(result["losses"], reference, rtol=1e-5, atol=1e-6)
    assert reference[-1] < reference[0]  # the steps did train


def test_distributed_config_from_env_and_errors():
    cfg = config_from_env({"TPO_COORDINATOR_ADDRESS": "10.0.0.1:1234", "TPO_NUM_PROCESSES": "4",
                           "TPO_PROCESS_ID": "3", "TPO_LOCAL_DEVICE_IDS": "0,1"})
    assert cfg == DistributedConfig("10.0.0.1:1234", 4, 3, (0, 1))
    assert config_from_env({}).num_processes == 1
    with pytest.raises(ConfigError, match="'distributed.process_id'"):
        DistributedConfig("h:1", num_processes=2, process_id=2).validate()
    with pytest.raises(ConfigError, match="'distributed.coordinator_address'"):
        DistributedConfig(None, num_processes=2, process_id=0).validate()
    with pytest.raises(ConfigError, match="TPO_NUM_PROCESSES"):
        config_from_env({"TPO_NUM_PROCESSES": "two"})

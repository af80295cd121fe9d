"""Multi-process training on localhost: 2 processes × 4 CPU devices with `jax.distributed` (gloo),
FSDP over all 8 devices, per-host batch rows; the losses equal a single-process, single-device run."""

import json
import os
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
from multihost_helper import check_exit, free_port, run_workers  # noqa: E402

STEPS, BATCH = 3, 8


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
def test_two_processes_fsdp_match_single_process(tmp_path):
    port = free_port()
    args = [["--process-id", str(i), "--num-processes", "2", "--port", str(port), "--devices", "4",
             "--steps", str(STEPS), "--batch", str(BATCH)] for i in range(2)]
    outs = run_workers("multihost_worker.py", args, tmp_path, timeout=600)
    check_exit(outs)
    reference = _reference_losses()
    outs = [(out, err) for _, out, err in outs]
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

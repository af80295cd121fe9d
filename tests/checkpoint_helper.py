"""Subprocess side of tests/test_checkpointing.py (run with its own device count).

    python tests/checkpoint_helper.py write DIR STEP          save `example_state()` at STEP
    python tests/checkpoint_helper.py read DIR STEP           restore it onto all devices, check, print JSON
    python tests/checkpoint_helper.py kill DIR MEGABYTES      save step 1, start saving step 2 (a state of
                                                              MEGABYTES) and SIGKILL this process mid-save
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from tpo_jax.checkpoints.manager import CheckpointConfig, CheckpointManager, abstract_like  # noqa: E402
from tpo_jax.train.step import TrainState  # noqa: E402


class Net(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(16, 64, rngs=rngs)
        self.b = nnx.Linear(64, 8, rngs=rngs)


def example_state(seed: int = 0):
    """A TrainState (nnx.State params + AdamW state after one update), deterministic in `seed`."""
    params = nnx.state(Net(nnx.Rngs(seed)), nnx.Param)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return TrainState(step=jnp.asarray(3, jnp.int32), params=optax.apply_updates(params, updates),
                      opt_state=opt_state)


def shardings(state, mesh):
    """Rows of every matrix split over the mesh axis "x"; vectors and scalars replicated."""
    def one(x):
        spec = P("x") if np.ndim(x) == 2 and x.shape[0] % mesh.size == 0 else P()
        return NamedSharding(mesh, spec)
    return jax.tree.map(one, state)


def flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mesh():
    return jax.make_mesh((jax.device_count(),), ("x",))


def write(directory, step):
    state = example_state()
    state = jax.device_put(state, shardings(state, mesh()))
    with CheckpointManager(directory, CheckpointConfig(every_steps=1, keep=3)) as m:
        m.save(step, params={"params": state.params}, state={"step": state.step, "opt_state": state.opt_state},
               meta={"step": step, "devices": jax.device_count()}, config={"name": "example"}, force=True)


def read(directory, step):
    expected = example_state()
    target = abstract_like(expected, shardings(expected, mesh()))
    with CheckpointManager(directory, read_only=True) as m:
        got = m.restore(step, params={"params": target.params},
                        state={"step": target.step, "opt_state": target.opt_state})
    state = TrainState(step=got["state"]["step"], params=got["params"]["params"], opt_state=got["state"]["opt_state"])
    same = all(np.array_equal(a, b) for a, b in zip(flat(state).values(), flat(expected).values()))
    kernel = state.params["a"]["kernel"][...]
    print(json.dumps({"equal": same and flat(state).keys() == flat(expected).keys(),
                      "devices": jax.device_count(), "kernel_devices": len(kernel.sharding.device_set),
                      "meta": got["meta"]}))


def kill(directory, megabytes):
    m = CheckpointManager(directory, CheckpointConfig(every_steps=1, keep=3, async_save=True))
    small = {"w": jnp.arange(1000, dtype=jnp.float32)}
    m.save(1, params=small, state={"step": jnp.asarray(1)}, meta={"step": 1}, config={}, force=True)
    m.wait()
    n = int(megabytes) * 2 ** 20 // 4
    big = {"w": jnp.ones((n,), jnp.float32), "v": jnp.full((n,), 2.0, jnp.float32)}
    m.save(2, params=big, state={"step": jnp.asarray(2)}, meta={"step": 2}, config={}, force=True)
    deadline = time.time() + 30
    while not glob.glob(os.path.join(directory, "2.*tmp*")) and time.time() < deadline:
        time.sleep(0.001)
    print(json.dumps({"tmp": [os.path.basename(p) for p in glob.glob(os.path.join(directory, "*"))]}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    mode, directory, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"write": write, "read": read, "kill": kill}[mode](directory, arg)

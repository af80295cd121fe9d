"""tpo_jax.checkpoints.manager: exact round trip, keep-last-K, a save killed midway, other device counts."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from tpo_jax.checkpoints.manager import (CheckpointConfig, CheckpointError, CheckpointManager, abstract_like, dict_to_tree,
                                 tree_to_dict)

sys.path.insert(0, os.path.dirname(__file__))
import checkpoint_helper as H  # noqa: E402

HELPER = os.path.join(os.path.dirname(__file__), "checkpoint_helper.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_helper(*args, devices: int, check=True):
    # the parent's XLA flags (same numerics for `example_state`) with another device count
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, HELPER, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"helper {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _last_json(text):
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_tree_dict_round_trip_and_errors():
    state = H.example_state()
    nested = tree_to_dict(state)
    assert set(nested) == {"step", "params", "opt_state"}
    assert nested["params"]["a"]["kernel"].shape == (16, 64)  # the nnx Variable's `value` is not in the path
    back = dict_to_tree(state, nested)
    for a, b in zip(H.flat(back).values(), H.flat(state).values()):
        np.testing.assert_array_equal(a, b)
    del nested["params"]["b"]["bias"]
    with pytest.raises(CheckpointError, match="params/b/bias"):
        dict_to_tree(state, nested)


def test_save_restore_exact_and_keep_last(tmp_path):
    state = H.example_state()
    cfg = CheckpointConfig(every_steps=2, keep=2, async_save=True)
    with CheckpointManager(tmp_path, cfg) as m:
        for step in range(1, 6):
            m.save(step, params={"p": state.params}, state={"step": state.step, "opt_state": state.opt_state},
                   meta={"step": step, "data_state": {"grain": {"next_index": 8 * step}}}, config={"seed": 0},
                   force=step == 5)
        m.wait()
        assert m.all_steps() == [4, 5]  # every 2nd step plus the forced one; the last 2 kept
    target = abstract_like(state)
    with CheckpointManager(tmp_path, cfg) as m:
        got = m.restore(params={"p": target.params}, state={"step": target.step, "opt_state": target.opt_state})
        assert got["step"] == 5 and got["meta"]["data_state"] == {"grain": {"next_index": 40}}
        assert got["config"] == {"seed": 0}
        restored = H.TrainState(step=got["state"]["step"], params=got["params"]["p"],
                                opt_state=got["state"]["opt_state"])
        for (k, a), b in zip(H.flat(restored).items(), H.flat(state).values()):
            np.testing.assert_array_equal(a, b, err_msg=k)
            assert a.dtype == b.dtype
        with pytest.raises(CheckpointError, match="no checkpoint of step 3"):
            m.restore(3)


def test_save_killed_midway_leaves_previous_checkpoint(tmp_path):
    d = str(tmp_path / "ckpt")
    proc = _run_helper("kill", d, 128, devices=1, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    report = _last_json(proc.stdout)
    assert any(name.startswith("2.") and "tmp" in name for name in report["tmp"]), report  # killed mid-save
    with CheckpointManager(d, CheckpointConfig(every_steps=1)) as m:
        assert m.all_steps() == [1] and m.latest_step() == 1
        got = m.restore(params={"w": jax.ShapeDtypeStruct((1000,), np.float32)})
        np.testing.assert_array_equal(got["params"]["w"], np.arange(1000, dtype=np.float32))
        # the directory stays usable: step 2 can be written again
        m.save(2, params={"w": np.zeros(3, np.float32)}, state={"step": np.asarray(2)}, meta={}, config={},
               force=True)
        m.wait()
        assert m.all_steps() == [1, 2]
    assert not [p for p in os.listdir(d) if "tmp" in p]


def _mesh8():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    return jax.make_mesh((8,), ("x",))


def test_restore_8_devices_onto_1(tmp_path):
    d = str(tmp_path / "ckpt")
    state = H.example_state()
    state = jax.device_put(state, H.shardings(state, _mesh8()))
    assert len(state.params["a"]["kernel"][...].sharding.device_set) == 8
    with CheckpointManager(d, CheckpointConfig(every_steps=1)) as m:
        m.save(7, params={"params": state.params}, state={"step": state.step, "opt_state": state.opt_state},
               meta={"devices": 8}, config={}, force=True)
    out = _last_json(_run_helper("read", d, 7, devices=1).stdout)
    assert out == {"equal": True, "devices": 1, "kernel_devices": 1, "meta": {"devices": 8}}


def test_restore_1_device_onto_8(tmp_path):
    d = str(tmp_path / "ckpt")
    _run_helper("write", d, 5, devices=1)
    expected = H.example_state()
    target = abstract_like(expected, H.shardings(expected, _mesh8()))
    with CheckpointManager(d, read_only=True) as m:
        got = m.restore(5, params={"params": target.params}, state={"step": target.step, "opt_state": target.opt_state})
    assert got["meta"] == {"step": 5, "devices": 1}
    kernel = got["params"]["params"]["a"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 8 and kernel.sharding.spec == jax.sharding.PartitionSpec("x")
    restored = H.TrainState(step=got["state"]["step"], params=got["params"]["params"], opt_state=got["state"]["opt_state"])
    for (k, a), b in zip(H.flat(restored).items(), H.flat(expected).values()):
        np.testing.assert_array_equal(a, b, err_msg=k)

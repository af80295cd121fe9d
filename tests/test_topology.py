"""TPU topologies through libtpu (tpo_jax.train.topology): names, errors, and an ahead-of-time compile of the
tiny train step whose per-chip argument bytes are checked against the project's own shard-shape count."""

import jax
import pytest

from tpo_jax import config as C
from tpo_jax.config import ConfigError
from tpo_jax.sharding import MeshConfig, get_rules, make_mesh, shard_bytes
from tpo_jax.train import hlo as H
from tpo_jax.train import topology as T
from tpo_jax.train.optim import OptimConfig
from tpo_jax.train.shard_report import abstract_batch
from tpo_jax.train.step import TrainConfig, make_train_step, train_shardings


def test_topology_names_and_errors(monkeypatch):
    chip, dims = T.parse_topology("v5p:4x4x4")
    assert chip.name == "v5p" and dims == (4, 4, 4) and T.chip_count("v6e:8x8") == 64
    assert T.accelerator_type("v5p:2x2x2") == "v5p-16"  # v5p counts TensorCores, two per chip
    assert T.accelerator_type("v5e:16x16") == "v5litepod-256" and T.accelerator_type("v6e:8x8") == "v6e-64"
    with pytest.raises(ConfigError, match="config field 'topology': 'v5p-8' is not a TPU topology name"):
        T.parse_topology("v5p-8")
    with pytest.raises(ConfigError, match="unknown TPU generation 'v9'"):
        T.parse_topology("v9:2x2")
    with pytest.raises(ConfigError, match=r"config field 'plans': mesh 1x4x1 = 4 chips, but the topology has 8"):
        T.check_mesh_size(MeshConfig(1, 4, 1), 8, "plans")
    monkeypatch.setattr(T, "libtpu_available", lambda: False)
    with pytest.raises(ConfigError, match=r"needs libtpu, which is not installed; pip install -e \"\.\[tpu-aot\]\""):
        T.topology_devices("v5e:2x2")


@pytest.mark.skipif(not T.libtpu_available(), reason="libtpu not installed (pip install -e '.[tpu-aot]')")
def test_tiny_step_compiles_for_a_tpu_topology():
    T.prepare_environment("v5e:2x2")
    devices = T.topology_devices("v5e:2x2")
    assert len(devices) == 4 and devices[0].platform == "tpu"
    mesh = make_mesh(MeshConfig(1, 4, 1), devices)
    cfg = C.get_config("tiny")
    train_cfg = TrainConfig(stage="stage1", optim=OptimConfig()).validate()
    graphdef, tx, sh = train_shardings(cfg, train_cfg, mesh, get_rules("fsdp"))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh.batch) for k, v in abstract_batch(cfg, 4, 64).items()}
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sh.replicated)
    step = make_train_step(graphdef, tx, cfg, train_cfg, shardings=sh, keep_unused=True)
    compiled = step.lower(sh.abstract_state, sh.abstract_frozen, batch, rng).compile()
    xla_argument = compiled.memory_analysis().argument_size_in_bytes

    # ours: every argument's shard shape (trainable params + AdamW moments + step, frozen params, the batch)
    ours = (shard_bytes(sh.abstract_state, sh.state)[0] + shard_bytes(sh.abstract_frozen, sh.frozen)[0]
            + shard_bytes(batch, jax.tree.map(lambda _: sh.batch, batch))[0])
    params = H.entry_parameters(compiled.as_text())
    n_leaves = len(jax.tree.leaves((sh.abstract_state, sh.abstract_frozen, batch))) + 1  # + the rng key
    assert len(params) == n_leaves
    rng_bytes = 8  # a threefry key: u32[2]
    assert sum(p["bytes"] for p in params) == ours + rng_bytes  # the same shard shapes, array by array in bytes
    # on the chip, TPU tiles pad each array's minor dims; with that padding the count is XLA's to the byte
    assert sum(p["device_bytes"] for p in params) == xla_argument
    assert ours < xla_argument < 1.5 * ours


@pytest.mark.parametrize("argv, names", [
    (["--topology", "v9:2x2"], ["config field 'topology'", "unknown TPU generation 'v9'"]),
    (["--topology", "v5p-8"], ["config field 'topology'", "'v5p-8' is not a TPU topology name"]),
    (["--topology", "v5e:2x2", "--plans", "fsdp:1x8x1"], ["config field 'plans'", "8 chips, but the topology has 4"]),
    (["--chip", "v7"], ["config field 'chip'", "unknown chip 'v7'"]),
    (["--xla-option", "xla_disable_hlo_passes"], ["config field 'xla_option'", "is not KEY=VALUE"]),
])
def test_shard_report_bad_topology_gives_one_line(argv, names, capfd):
    from tpo_jax.cli.shard_report import main
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tpo-shard-report: error: "), err
    for name in names:
        assert name in err[0], (name, err[0])


def test_shard_report_without_libtpu_says_how_to_install(monkeypatch, capfd):
    from tpo_jax.cli.shard_report import main
    monkeypatch.setattr(T, "libtpu_available", lambda: False)
    assert main(["--topology", "v5e:2x2", "--plans", "fsdp:1x4x1"]) == 2
    err = capfd.readouterr().err.strip()
    assert "needs libtpu, which is not installed" in err and "tpu-aot" in err and len(err.splitlines()) == 1

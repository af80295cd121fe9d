"""FLOPs counted from the jaxpr (tpo_jax.train.flops) against hand counts and XLA's own cost analysis."""

import jax
import jax.numpy as jnp
import pytest

from tpo_jax import config as C
from tpo_jax.sharding import MeshConfig, get_rules, make_mesh
from tpo_jax.train import chips
from tpo_jax.train.flops import count_fn, model_flops_config, step_flops
from tpo_jax.train.optim import OptimConfig
from tpo_jax.train.shard_report import abstract_batch
from tpo_jax.train.step import TrainConfig, make_train_step, train_shardings

f32 = jnp.float32


def _sds(*shape):
    return jax.ShapeDtypeStruct(shape, f32)


def test_matmul_and_conv_counts_by_hand():
    # (8×32) @ (32×16), then a batched einsum 4×(8×16)·(16×5): 2·M·N·K each
    def f(x, w, v):
        return jnp.einsum("bik,bkj->bij", jnp.broadcast_to(x @ w, (4, 8, 16)), v)
    c = count_fn(f, _sds(8, 32), _sds(32, 16), _sds(4, 16, 5))
    assert c.matmul == 2 * 8 * 16 * 32 + 2 * 4 * 8 * 5 * 16

    # a 3-D tubelet convolution, NDHWC: out 2×(2×4×4)×6, kernel 2×4×4 over 3 channels → 2·out·(2·4·4·3)
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (2, 4, 4), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    c = count_fn(conv, _sds(2, 4, 16, 16, 3), _sds(2, 4, 4, 3, 6))
    assert c.matmul == 2 * (2 * 2 * 4 * 4 * 6) * (2 * 4 * 4 * 3)


def test_scan_counts_every_trip_and_grad_skips_frozen_weights():
    def layer(h, w):
        return jnp.tanh(h @ w)

    def scanned(ws, x):
        return jax.lax.scan(lambda h, w: (layer(h, w), None), x, ws)[0].sum()

    def unrolled(ws, x):
        for i in range(ws.shape[0]):
            x = layer(x, ws[i])
        return x.sum()

    ws, x = _sds(6, 64, 64), _sds(16, 64)
    fwd = 6 * 2 * 16 * 64 * 64
    assert count_fn(scanned, ws, x).matmul == count_fn(unrolled, ws, x).matmul == fwd
    # trainable weights: forward + input grad + weight grad = 3x; unrolled, autodiff skips the input grad of
    # the first layer (x is not differentiated); scanned, every trip runs the same transposed body
    assert count_fn(jax.grad(unrolled), ws, x).matmul == 3 * fwd - 2 * 16 * 64 * 64
    assert count_fn(jax.grad(scanned), ws, x).matmul == 3 * fwd
    # frozen weights, gradient w.r.t. the input only: 2x
    assert count_fn(jax.grad(scanned, argnums=1), ws, x).matmul == 2 * fwd


def _small():
    return C.replace(C.get_config("tiny"), **{
        "llm.hidden_size": 256, "llm.intermediate_size": 512, "llm.num_heads": 8, "llm.num_kv_heads": 4,
        "vit.width": 128, "vit.mlp_dim": 256, "vit.num_heads": 4, "qformer.hidden_size": 128,
        "qformer.encoder_width": 128, "qformer.intermediate_size": 256, "qformer.num_heads": 4,
        "heads.temporal.txt_dim": 256, "heads.temporal.vid_dim": 130})


def _xla_flops(model_cfg, train_cfg, batch):
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    graphdef, tx, sh = train_shardings(model_cfg, train_cfg, mesh, get_rules("fsdp"))
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype)
    compiled = make_train_step(graphdef, tx, model_cfg, train_cfg).lower(
        sh.abstract_state, sh.abstract_frozen, batch, rng).compile()
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_train_step_count_agrees_with_xla(name):
    # unrolled stacks, no remat: XLA's cost analysis then counts every layer (no while loop hides one)
    model_cfg = C.get_config("tiny") if name == "tiny" else _small()
    assert not any(getattr(model_cfg, s).stack.scan_layers for s in ("llm", "vit", "qformer"))
    # the tiny model with every head's loss (stage 3); the small one, 4x wider, on the LM-only step (stage 1)
    train_cfg = TrainConfig(stage="stage3" if name == "tiny" else "stage1", optim=OptimConfig()).validate()
    batch = abstract_batch(model_cfg, 2, 96)
    ours = step_flops(model_cfg, train_cfg, batch)
    xla = _xla_flops(model_cfg, train_cfg, batch)
    assert ours.total == pytest.approx(xla["flops"], rel=0.05)
    assert ours.matmul == pytest.approx(xla["flops"], rel=0.10)  # the matmuls are >90% of the work
    assert ours.transcendental == pytest.approx(xla["transcendentals"], rel=0.05)


def test_model_flops_ignore_remat_and_attention_kernel():
    base = C.get_config("tiny")
    train_cfg = TrainConfig(stage="stage1", optim=OptimConfig()).validate()
    batch = abstract_batch(base, 2, 64)
    changes = {}
    for s in ("llm", "vit", "qformer"):
        changes.update({f"{s}.stack.remat_policy": "full", f"{s}.stack.attention": "xla"})
    remat = C.replace(base, **changes)
    assert model_flops_config(remat) != remat
    model = step_flops(base, train_cfg, batch)
    assert step_flops(remat, train_cfg, batch).matmul == model.matmul
    # executed (remat full): the forward of every remat'd layer with a backward pass runs again. In stage 1 that
    # is the LLM's decoder layers only (nothing below the LoRA trains), a small part next to the lm_head here
    executed = step_flops(remat, train_cfg, batch, model=False).matmul
    assert model.matmul < executed < 1.5 * model.matmul
    # scanned stacks run one transposed body every trip, so the first layer's input gradient is computed even
    # where nothing below it trains: at most one layer's worth more
    scanned = C.replace(remat, **{f"{s}.stack.scan_layers": True for s in ("llm", "vit", "qformer")})
    extra = step_flops(scanned, train_cfg, batch).matmul - model.matmul
    assert 0 <= extra < 0.01 * model.matmul


def test_chip_table():
    assert chips.chip_for_device_kind("TPU v5 lite").name == "v5e"
    assert chips.chip_for_device_kind("TPU v5").name == "v5p"
    assert chips.chip_for_device_kind("TPU v4").name == "v4"
    assert chips.chip_for_device_kind("TPU v6 lite").name == "v6e"
    assert chips.chip_for_device_kind("NVIDIA H100 80GB HBM3").peak_flops == 989e12
    assert chips.chip_for_device_kind("cpu") is None
    assert chips.peak_flops_per_device("cpu") is None
    assert chips.peak_flops_per_device("cpu", 0.25) == 0.25e12
    assert chips.chip_for_topology("v5p:4x4x4").peak_flops == 459e12
    with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
        chips.chip_for_topology("v9:2x2")

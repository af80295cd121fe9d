"""Sharding over the 8 fake CPU devices: every strategy gives the single-device loss and gradients,
parameter shardings follow the rules, FSDP divides the state memory, and bad meshes/rules fail clearly."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tpo_jax.data.synthetic import synthetic_batch
from tpo_jax import config as C
from tpo_jax import sharding as S
from tpo_jax.model import abstract_model, stack_layouts
from tpo_jax.stack import stack_params, unstack_params
from tpo_jax.cli import shard_report as report_cli
from tpo_jax.train import chips as CH
from tpo_jax.train import shard_report as R
from tpo_jax.lora import LoRALinear
from tpo_jax.model import TPOModel
from tpo_jax.train.optim import OptimConfig
from tpo_jax.train.stages import get_recipe
from tpo_jax.train.step import (TrainConfig, init_sharded, init_train_state, make_grad_fn, make_sharded_grad_fn,
                        make_train_step, split_model, train_shardings)

CFG = C.get_config("tiny")
# region + mask heads: every trunk module (ViT, Q-Former, LoRA) and two heads get gradients, and the step
# compiles in seconds (the temporal head's in-graph matcher is what makes the full step slow to compile)
TC = TrainConfig(stage="stage3", heads=("region", "mask"), dropout=False)
TASKS = ("region", "mask", "conversation")
MESHES = {"dp": (8, 1, 1), "fsdp": (1, 8, 1), "tp": (1, 1, 8), "fsdp_tp": (1, 4, 2)}

# Expected mesh specs, written out by hand from the rules (tiny shapes in comments).
Q, K, O = ("llm", "layers", 0, "self_attn", "q_proj"), ("llm", "layers", 0, "self_attn", "k_proj"), \
    ("llm", "layers", 0, "self_attn", "o_proj")
DOWN = ("llm", "layers", 0, "mlp", "down_proj")
EMBED, HEAD = ("llm", "embed_tokens", "embedding"), ("llm", "lm_head", "kernel")
EXPECTED = {
    "fsdp": {
        Q + ("kernel",): ("fsdp", None),  # (64, 64) embed, q_heads
        Q + ("lora_b",): (None, "fsdp"),  # (4, 64) lora_rank, q_heads: falls back to the head dim
        EMBED: (None, "fsdp"),  # (32007, 64): vocab does not divide, embed does
        HEAD: ("fsdp", None),
        DOWN + ("lora_a",): ("fsdp", None),  # (128, 4) mlp, lora_rank
        ("vision", "blocks", 0, "attn", "qkv"): ("fsdp", None),
        ("qformer", "layers", 0, "crossattention", "key", "kernel"): ("fsdp", None),  # vit_embed, heads
        ("box_token",): ("fsdp",),
        ("llm", "norm", "scale"): (None,),
        ("sam2", "sam_prompt_encoder", "point_embeddings"): (None, None),
    },
    "tp": {
        Q + ("kernel",): (None, "tensor"),
        K + ("kernel",): (None, "tensor"),  # (64, 32): 2 kv heads × 16 cut into 8 column blocks of 4
        O + ("kernel",): ("tensor", None),
        O + ("lora_a",): ("tensor", None),
        DOWN + ("kernel",): ("tensor", None),
        EMBED: (None, None),  # 32007 rows do not split 8 ways: replicated
        HEAD: (None, None),
        ("vision", "blocks", 0, "attn", "qkv"): (None, "tensor"),
        ("box_token",): (None,),
    },
    "fsdp_tp": {
        Q + ("kernel",): ("fsdp", "tensor"),
        Q + ("lora_a",): ("fsdp", None),
        Q + ("lora_b",): (None, "tensor"),
        O + ("kernel",): ("tensor", "fsdp"),
        DOWN + ("lora_a",): ("tensor", None),
        EMBED: (None, "fsdp"),
        HEAD: ("fsdp", None),
        ("box_token",): ("fsdp",),
    },
}


def _padded(spec, ndim):
    spec = tuple(spec)
    return spec + (None,) * (ndim - len(spec))


def _flat(tree):
    return {p: v.get_value() for p, v in nnx.to_flat_state(tree)}


@pytest.fixture(scope="module")
def batch_np():
    return synthetic_batch(CFG, 8, seed=0, tasks=TASKS)


@pytest.fixture(scope="module")
def reference(batch_np):
    """Single-device loss and gradients, with random LoRA B (B = 0 would zero the LoRA-A gradients)."""
    model = TPOModel(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, m in nnx.iter_graph(model):
        if isinstance(m, LoRALinear):
            m.lora_b[...] = jnp.asarray(rng.normal(0, 0.02, m.lora_b.shape), jnp.float32)
    graphdef, params, frozen = split_model(model, get_recipe(TC.stage))
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    metrics, grads = jax.jit(make_grad_fn(graphdef, CFG, TC))(params, frozen, batch, jax.random.key(0))
    return graphdef, params, frozen, jax.tree.map(np.asarray, metrics), _flat(grads)


@pytest.mark.parametrize("strategy", list(MESHES))
def test_strategy_matches_single_device(strategy, reference, batch_np):
    graphdef, params, frozen, ref_metrics, ref_grads = reference
    mesh = S.make_mesh(S.MeshConfig(*MESHES[strategy]))
    _, _, sh = train_shardings(CFG, TC, mesh, S.get_rules(strategy))
    params, frozen = jax.device_put(params, sh.state.params), jax.device_put(frozen, sh.frozen)

    # shardings read back from the arrays
    arrays = {**_flat(params), **_flat(frozen)}
    for path, want in EXPECTED.get(strategy, {}).items():
        assert _padded(arrays[path].sharding.spec, arrays[path].ndim) == want, (strategy, path)
    for path, x in arrays.items():
        spec = _padded(x.sharding.spec, x.ndim)
        if strategy == "dp":
            assert spec == (None,) * x.ndim, path
        used = [a for s in spec if s for a in ((s,) if isinstance(s, str) else s)]
        assert len(used) == len(set(used)), (path, spec)
        for dim, s in zip(x.shape, spec):  # every split dim divides evenly
            assert s is None or dim % math.prod(mesh.shape[a] for a in ((s,) if isinstance(s, str) else s)) == 0

    batch = S.shard_batch(batch_np, mesh)
    metrics, grads = make_sharded_grad_fn(graphdef, CFG, TC, sh)(params, frozen, batch, jax.random.key(0))
    for key in ("loss/total", "loss/lm", "loss/region", "loss/mask"):
        np.testing.assert_allclose(float(metrics[key]), ref_metrics[key], rtol=1e-5, err_msg=key)
    got = {p: np.asarray(v) for p, v in _flat(grads).items()}
    assert got.keys() == ref_grads.keys()
    for path, g in _flat(grads).items():  # gradients come back sharded like the params
        assert g.sharding.spec == arrays[path].sharding.spec, path
    top = max(np.abs(v).max() for v in ref_grads.values())
    # relative per leaf, each leaf's scale floored at 1% of the largest entry (leaves whose exact gradient
    # is zero hold only float32 rounding noise), as in test_train_step
    worst = max(np.abs(got[k] - ref_grads[k]).max() / max(np.abs(ref_grads[k]).max(), 1e-2 * top) for k in got)
    assert worst <= 1e-5, (strategy, worst)


def test_scanned_model_sharded_matches_unrolled_single_device(reference, batch_np):
    """All three stacks scanned (parameters with a leading `layers` axis, never split), fsdp × tensor over 8
    devices: the loss and gradients of the unrolled single-device reference."""
    graphdef, params, frozen, ref_metrics, ref_grads = reference
    scfg = C.replace(CFG, **{f"{s}.stack.scan_layers": True for s in ("llm", "vit", "qformer")})
    layouts = stack_layouts(scfg)
    mesh = S.make_mesh(S.MeshConfig(*MESHES["fsdp_tp"]))
    sgraphdef, _, sh = train_shardings(scfg, TC, mesh, S.get_rules("fsdp_tp"))

    def stacked(tree, target):
        values = stack_params({".".join(map(str, p)): np.asarray(v) for p, v in _flat(tree).items()}, layouts)
        flat = nnx.to_flat_state(target)
        return nnx.from_flat_state([(p, v.replace(jnp.asarray(values[".".join(map(str, p))])))
                                    for p, v in flat])

    params = jax.device_put(stacked(params, sh.abstract_state.params), sh.state.params)
    frozen = jax.device_put(stacked(frozen, sh.abstract_frozen), sh.frozen)
    q = _flat(params)[("llm", "layers", "self_attn", "q_proj", "lora_a")]
    assert q.shape[0] == CFG.llm.num_layers and q.sharding.spec[0] is None  # the layer axis stays whole
    metrics, grads = make_sharded_grad_fn(sgraphdef, scfg, TC, sh)(params, frozen, S.shard_batch(batch_np, mesh),
                                                                   jax.random.key(0))
    for key in ("loss/total", "loss/lm", "loss/region", "loss/mask"):
        np.testing.assert_allclose(float(metrics[key]), ref_metrics[key], rtol=1e-5, err_msg=key)
    got = unstack_params({".".join(map(str, p)): np.asarray(v) for p, v in _flat(grads).items()}, layouts)
    ref = {".".join(map(str, p)): v for p, v in ref_grads.items()}
    assert got.keys() == ref.keys()
    top = max(np.abs(v).max() for v in ref.values())
    worst = max(np.abs(got[k] - ref[k]).max() / max(np.abs(ref[k]).max(), 1e-2 * top) for k in got)
    assert worst <= 1e-5, worst


def test_init_sharded_builds_the_eager_values_in_their_shards():
    # fewer layers than tiny: the jitted init compiles in proportion to the number of parameters
    cfg = C.replace(CFG, **{"llm.num_layers": 1, "vit.depth": 1, "qformer.num_layers": 1,
                            **{f"heads.temporal.{k}_layers": 1 for k in ("enc", "dec", "t2v", "dummy")}})
    mesh = S.make_mesh(S.MeshConfig(1, 4, 2))
    graphdef, state, frozen, tx, sh = init_sharded(cfg, TC, mesh, S.get_rules("fsdp_tp"), seed=0)
    _, ref_state, ref_frozen, _ = init_train_state(TPOModel(cfg, rngs=nnx.Rngs(0)), TC)
    for got_tree, ref_tree in ((state.params, ref_state.params), (frozen, ref_frozen)):
        got, ref = _flat(got_tree), _flat(ref_tree)
        assert got.keys() == ref.keys()
        for path in ref:
            np.testing.assert_allclose(np.asarray(got[path]), np.asarray(ref[path]), rtol=0, atol=1e-6, err_msg=path)
    q = _flat(state.params)[Q + ("lora_a",)]
    assert q.sharding.spec == P("fsdp", None) and q.addressable_shards[0].data.shape == (16, 4)
    # AdamW moments are sharded like their parameter; every array's shards are the rule's shards
    def names(keypath):
        return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in keypath)
    moments = [x for kp, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
               if names(kp)[-len(Q) - 2:-1] == Q + ("lora_a",)]
    assert len(moments) == 2 and all(m.sharding.spec == P("fsdp", None) for m in moments)
    for tree, shardings in ((state, sh.state), (frozen, sh.frozen)):
        for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
            assert x.sharding == s
    # frozen params may be stored in bfloat16; trainable ones keep float32
    _, _, sh16 = train_shardings(cfg, TC, mesh, S.get_rules("fsdp_tp"), frozen_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(sh16.abstract_frozen)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(sh16.abstract_state.params)} == {jnp.dtype("float32")}


@pytest.mark.slow
def test_sharded_train_step_matches_unsharded(batch_np):
    train_cfg = TrainConfig(stage="stage3", heads=("region", "mask"), dropout=True,
                            optim=OptimConfig(total_steps=10, warmup_ratio=0.0, lr_scale=50.0))
    mesh = S.make_mesh(S.MeshConfig(1, 4, 2))
    graphdef, state, frozen, tx, sh = init_sharded(CFG, train_cfg, mesh, S.get_rules("fsdp_tp"), seed=0)
    g2, ref_state, ref_frozen, tx2 = init_train_state(TPOModel(CFG, rngs=nnx.Rngs(0)), train_cfg)
    step = make_train_step(graphdef, tx, CFG, train_cfg, shardings=sh)
    ref_step = make_train_step(g2, tx2, CFG, train_cfg)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    for i in range(2):
        state, metrics = step(state, frozen, S.shard_batch(batch_np, mesh), jax.random.key(i))
        ref_state, ref_metrics = ref_step(ref_state, ref_frozen, batch, jax.random.key(i))
        np.testing.assert_allclose(float(metrics["loss/total"]), float(ref_metrics["loss/total"]), rtol=1e-5)
    got, ref = _flat(state.params), _flat(ref_state.params)
    for path in ref:
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(ref[path]), rtol=0, atol=1e-5, err_msg=path)
    assert _flat(state.params)[Q + ("lora_b",)].sharding.spec == P(None, "tensor")


def test_fsdp_divides_parameter_and_optimizer_memory():
    cfg = C.replace(CFG, **{"llm.hidden_size": 512, "llm.intermediate_size": 1024, "heads.temporal.txt_dim": 512})
    mesh = S.make_mesh(S.MeshConfig(1, 8, 1))
    _, _, sh = train_shardings(cfg, TrainConfig(stage="stage3"), mesh, S.get_rules("fsdp"))
    per_device = total = 0
    for abstract, shardings in ((sh.abstract_state, sh.state), (sh.abstract_frozen, sh.frozen)):
        d, t = S.shard_bytes(abstract, shardings)
        per_device, total = per_device + d, total + t
    # independent count of the whole: every parameter once, AdamW's two float32 moments per trainable one
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(sh.abstract_state.params))
    n_frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(sh.abstract_frozen))
    assert 0 <= total - 4 * (3 * n_params + n_frozen) < 1024  # + step and optimizer counters
    assert per_device <= total / 8 * 1.15, (per_device, total)
    # the same count from the addressable shards of real arrays (a smaller model, allocated)
    _, _, sh_tiny = train_shardings(CFG, TC, mesh, S.get_rules("fsdp"))
    params = jax.device_put(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sh_tiny.abstract_state.params),
                            sh_tiny.state.params)
    dev0 = jax.devices()[0]
    on_dev0 = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == dev0)
    assert on_dev0 == S.shard_bytes(sh_tiny.abstract_state.params, sh_tiny.state.params)[0]


def test_mesh_and_rules_errors_name_the_field():
    assert S.MeshConfig(2, -1, 2).resolve(8) == (2, 2, 2)
    with pytest.raises(C.ConfigError, match="config field 'mesh'.*1×4×1 = 4 devices, but 8"):
        S.make_mesh(S.MeshConfig(1, 4, 1))
    with pytest.raises(C.ConfigError, match="config field 'mesh.fsdp'.*do not divide"):
        S.make_mesh(S.MeshConfig(3, -1, 1))
    with pytest.raises(C.ConfigError, match="config field 'mesh.tensor'"):
        S.MeshConfig(1, -1, 0).resolve(8)
    mesh = S.make_mesh(S.MeshConfig(1, 8, 1))
    bad = S.get_rules("fsdp") + (("mlp", "model"),)
    with pytest.raises(C.ConfigError, match=r"config field 'sharding.rules\[\d+\]'.*unknown mesh axis 'model'"):
        S.tree_shardings(nnx.state(abstract_model(CFG)), mesh, bad)
    with pytest.raises(C.ConfigError, match="config field 'sharding.strategy'"):
        S.get_rules("zero3")


def test_logical_to_mesh_fallbacks():
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("mlp", "fsdp"), ("norm", None), ("norm", "fsdp"))
    mesh = S.make_mesh(S.MeshConfig(1, 4, 2))
    assert S.logical_to_mesh(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert S.logical_to_mesh(("embed", "mlp"), rules, (8, 3), mesh) == P("fsdp", None)  # 3 % 2, fsdp used
    assert S.logical_to_mesh(("lora_rank", "mlp"), rules, (4, 6), mesh) == P(None, "tensor")
    assert S.logical_to_mesh((None, "mlp"), rules, (4, 12), mesh) == P(None, "tensor")
    assert S.logical_to_mesh(("mlp",), rules, (4,), mesh) == P("tensor")
    assert S.logical_to_mesh(("mlp",), rules, (5,), mesh) == P(None)  # neither 2 nor 4 divides 5
    assert S.logical_to_mesh(("norm",), rules, (8,), mesh) == P(None)  # pinned replicated
    assert S.logical_to_mesh(("batch", "length"), S.get_rules("fsdp"), (8, 3), mesh) == P(("data", "fsdp"), None)


def test_every_parameter_has_logical_axes():
    for name in ("tiny", "videochat_tpo_7b"):
        state = nnx.state(abstract_model(C.get_config(name)))
        flat = nnx.to_flat_state(state)
        assert len(flat) > 400
        for path, var in flat:
            axes = S.variable_axes(var)
            assert axes is not None and len(axes) == len(var.get_value().shape), (name, path, axes)


def test_shard_batch_and_activation_constraints(batch_np):
    mesh = S.make_mesh(S.MeshConfig(2, 2, 2))
    assert S.data_shard_for_process(mesh) == (0, 1)
    batch = S.shard_batch(batch_np, mesh)
    for k, v in batch_np.items():
        np.testing.assert_array_equal(np.asarray(batch[k]), v)
        assert batch[k].sharding.spec == P(("data", "fsdp")) and batch[k].addressable_shards[0].data.shape[0] == 2
    with pytest.raises(ValueError, match="batch key 'x'"):
        S.shard_batch({"x": np.zeros((6, 2))}, mesh)

    x = jnp.ones((8, 4, 16))
    assert S.constrain(x, "batch", "length", "act_embed") is x  # no context: untouched
    rules = (("batch", ("data", "fsdp")), ("act_embed", "tensor"))
    with S.activation_sharding(mesh, rules):
        y = jax.jit(lambda a: S.constrain(a * 2, "batch", "length", "act_embed"))(x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4, 16)))


def test_plan_names():
    with pytest.raises(C.ConfigError, match="'plans'"):
        R.parse_plan("fsdp:1x8")
    assert R.parse_plan("fsdp_tp:1x4x2") == ("fsdp_tp", S.MeshConfig(1, 4, 2))


def test_search_raises_micro_batches_until_a_plan_fits(monkeypatch):
    chip = dataclasses.replace(CH.CHIPS["v5p"], hbm_bytes=100.0)
    calls = []
    temp_of = {"none": 400.0, "dots_with_no_batch_dims_saveable": 150.0, "full": 60.0}
    mfu_of = {"none": 0.6, "dots_with_no_batch_dims_saveable": 0.5, "full": 0.4}

    def fake_measure(model_cfg, train_cfg, strategy, mesh_cfg, **kw):
        policy, micro = model_cfg.llm.stack.remat_policy, train_cfg.micro_batches
        calls.append((R.plan_name(strategy, mesh_cfg), kw["batch_per_shard"], policy, micro))
        temp = temp_of[policy] / micro
        if 20 + temp > 100:  # what a TPU compile says when the temp does not fit
            return {"error": "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm", "temp_needed": temp}
        return {"argument": 20.0, "temp": temp, "peak": 20.0 + temp, "mfu": mfu_of[policy] / (1 + 0.01 * micro)}

    monkeypatch.setattr(R, "try_measure", fake_measure)
    rows = R.search(C.get_config("tiny"), TrainConfig(stage="stage1", optim=OptimConfig()), chips=2, global_batch=8,
                    seq_len=64, strategies=("fsdp",), chip=chip)
    # one fsdp mesh (1x2x1, 4 examples per shard); none needs 400 of 100: 4 micro-batches, still 100 + 20: no more
    # micro-batch counts (8 / 8 would leave a shard empty); dots needs 150: 2 fits; full fits at once, ends the mesh
    assert calls == [("fsdp:1x2x1", 4, "none", 1), ("fsdp:1x2x1", 4, "none", 4),
                     ("fsdp:1x2x1", 4, "dots_with_no_batch_dims_saveable", 1),
                     ("fsdp:1x2x1", 4, "dots_with_no_batch_dims_saveable", 2), ("fsdp:1x2x1", 4, "full", 1)]
    assert [n for n, r in rows if r["fits"]] == ["fsdp:1x2x1 remat=dots_with_no_batch_dims_saveable micro=2",
                                                 "fsdp:1x2x1 remat=full micro=1"]  # best estimated MFU first
    # every data x fsdp x tensor = 8 with tensor <= 8, named by the axes it uses; pure fsdp first
    assert [(R.plan_name(st, m), n) for st, m, n in R.candidate_plans(8, 128, ("fsdp", "fsdp_tp", "tp", "dp"))] == [
        ("fsdp:1x8x1", 16), ("fsdp:2x4x1", 16), ("fsdp:4x2x1", 16), ("dp:8x1x1", 16), ("fsdp_tp:1x4x2", 32),
        ("fsdp_tp:2x2x2", 32), ("tp:4x1x2", 32), ("fsdp_tp:1x2x4", 64), ("tp:2x1x4", 64), ("tp:1x1x8", 128)]
    assert R.hbm_needed("the total memory required for HLO temporaries (182.91G) exceeds") == 182.91 * 2**30
    # `plans` keeps only the named meshes of the 8-chip candidates; `remats` only the named policies
    calls.clear()
    R.search(C.get_config("tiny"), TrainConfig(stage="stage1", optim=OptimConfig()), chips=8, global_batch=16,
             seq_len=64, strategies=("fsdp", "dp"), remats=("full",), chip=chip, plans=["fsdp:2x4x1"])
    assert calls == [("fsdp:2x4x1", 2, "full", 1)]
    # the first micro-batch count tried is the config's (2 here, which fits: 1 is never compiled)
    calls.clear()
    R.search(C.get_config("tiny"), TrainConfig(stage="stage1", micro_batches=2, optim=OptimConfig()), chips=2,
             global_batch=8, seq_len=64, strategies=("fsdp",), remats=("dots_with_no_batch_dims_saveable",), chip=chip)
    assert calls == [("fsdp:1x2x1", 4, "dots_with_no_batch_dims_saveable", 2)]


def test_search_resumes_only_its_own_report(tmp_path):
    args = report_cli._parser().parse_args(["--config", "videochat_tpo_7b", "--topology", "v5p:2x2x2", "--search"])
    prefix = str(tmp_path / "s")
    rows = [("fsdp:1x8x1 remat=none micro=1", {"error": "RESOURCE_EXHAUSTED: ...", "fits": False})]
    report_cli.write(prefix, "table", rows, "header", CH.CHIPS["v5p"], report_cli._identity(args))
    assert report_cli._previous(prefix, report_cli._identity(args)) == dict(rows)
    other = report_cli._parser().parse_args(["--config", "videochat_tpo_7b", "--topology", "v5p:2x2x2", "--search",
                                             "--stage", "stage2"])
    assert report_cli._previous(prefix, report_cli._identity(other)) == {}


@pytest.mark.slow
def test_shard_report_end_to_end(tmp_path):
    args = report_cli._parser().parse_args([
        "--config", "tiny", "--stage", "stage1", "--plans", "dp:8x1x1,fsdp:1x8x1", "--seq-len", "64",
        "--set", "llm.num_layers=1", "--set", "vit.depth=1", "--chip", "v5e", "--out", str(tmp_path / "r")])
    markdown, rows = report_cli.run(args, chip=CH.CHIPS["v5e"])
    (dp, r_dp), (fsdp, r_fsdp) = rows
    assert "| dp:8x1x1 | 8 |" in markdown and "| fsdp:1x8x1 |" in markdown and "XLA:CPU figures" in markdown
    # dp: replicated state, gradients summed with all-reduce, no parameter all-gathers
    col_dp, col_fsdp = r_dp["collectives_per_step"], r_fsdp["collectives_per_step"]
    assert col_dp["all-gather"]["count"] == 0 and col_dp["all-reduce"]["count"] >= 1
    # ... one float32 gradient per trainable parameter (plus a few metric scalars)
    assert r_dp["params"] <= col_dp["all-reduce"]["bytes"] <= r_dp["params"] + 1024
    assert col_fsdp["all-gather"]["count"] > 0
    # (tiny's stage-1 state is dominated by the LoRA B of the lm_head, (4, 32007), which splits neither way)
    assert r_fsdp["params"] + r_fsdp["frozen"] + r_fsdp["opt"] < (r_dp["params"] + r_dp["frozen"] + r_dp["opt"]) / 4
    # the tiny SAM2's small convs / norms (unnamed dims, or widths 8 does not divide) stay replicated: ~1/6.7 here;
    # at the 7B preset's sizes SAM2's params shard to 1/7.96 (docs/benchmarks.md, SAM2 AOT section)
    assert r_fsdp["frozen"] * 6 < r_dp["frozen"]
    # per-device model FLOPs: 1 example per device either way, the same model: equal
    assert 0 < r_dp["model_flops"] == pytest.approx(r_fsdp["model_flops"], rel=1e-6)
    # the estimate: compute-bound at v5e's peak, the MFU bound is model / executed FLOPs (no remat here: 1)
    assert r_dp["compute_s"] == pytest.approx(r_dp["flops"] / 197e12)
    assert r_dp["mfu"] == pytest.approx(r_dp["model_flops"] / (max(r_dp["compute_s"], r_dp["comm_s"]) * 197e12))
    assert (tmp_path / "r.png").stat().st_size > 10_000 and (tmp_path / "r.json").exists()


def test_llava_ov_7b_every_parameter_placed_by_fsdp():
    """llava_ov_tpo_7b on fsdp=8: every parameter has logical axes, every array but the norms (pinned replicated,
    as in videochat_tpo_7b) is split over fsdp, SigLIP tower / projector / image_newline included; per chip 1/8."""
    cfg = C.get_config("llava_ov_tpo_7b")
    state = nnx.state(abstract_model(cfg), nnx.Param)
    mesh = S.make_mesh(S.MeshConfig(1, 8, 1))
    rules = S.get_rules("fsdp")
    shardings = _flat(S.tree_shardings(state, mesh, rules))
    variables = dict(nnx.to_flat_state(state))
    names = {n for n, _ in rules}
    replicated = []
    for path, var in variables.items():
        axes, shape = S.variable_axes(var), var.get_value().shape
        assert axes is not None and len(axes) == len(shape), (path, axes)
        spec = shardings[path].spec
        if "fsdp" not in jax.tree.leaves(tuple(spec)):
            replicated.append((path, shape, axes))
            # what stays whole: norms (the rules pin none of their names), and SAM2's few unnamed / small arrays
            assert "norm" in axes or path[0] == "sam2" or math.prod(shape) < 4096 or \
                not (set(axes) & names), (path, shape, axes, spec)
    assert not [r for r in replicated if r[0][0] == "vision" and "norm" not in r[2]]
    assert not [r for r in replicated if r[0][0] == "llm" and "norm" not in r[2]]
    want = {("vision", "vision_tower", "patch_embed", "kernel"): P(None, None, None, "fsdp"),
            ("vision", "vision_tower", "position_embedding"): P(None, "fsdp"),
            ("vision", "vision_tower", "layers", "attn", "q_proj", "kernel"): P(None, "fsdp", None),
            ("vision", "vision_tower", "layers", "fc2", "kernel"): P(None, None, "fsdp"),
            ("vision", "projector", "linear_1", "kernel"): P("fsdp", None),
            ("vision", "projector", "linear_2", "kernel"): P(None, "fsdp"),
            ("vision", "image_newline"): P("fsdp"),
            ("llm", "embed_tokens", "embedding"): P(None, "fsdp")}
    for path, spec in want.items():
        assert _padded(shardings[path].spec, len(spec)) == tuple(spec), (path, shardings[path].spec)
    per_device, total = S.shard_bytes(state, S.tree_shardings(state, mesh, rules))
    assert total == 4 * sum(math.prod(x.shape) for x in _flat(state).values())
    assert total / 8 <= per_device <= total / 8 * 1.002, (per_device, total)


def test_shard_report_batch_of_a_llava_ov_model():
    cfg = C.get_config("llava_ov_tpo_tiny")
    batch = R.abstract_batch(cfg, 2, 64)
    assert batch["frames"].shape == (2, 4, 32, 32, 3) and batch["saliency_labels"].shape == (2, 4)
    with pytest.raises(C.ConfigError, match="'seq_len'.*17 visual rows"):
        R.abstract_batch(cfg, 2, 16)
    policy = R.with_remat(cfg, "full")
    assert policy.llava_ov.siglip.stack.remat_policy == "full" and policy.llm.stack.remat_policy == "full"

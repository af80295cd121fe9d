"""The pure train step: exact gradient accumulation, per-head gradient routing, frozen params, stages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpo_jax.data.synthetic import synthetic_batch
from tpo_jax import config as C
from tpo_jax.lora import LoRALinear
from tpo_jax.model import TPOModel
from tpo_jax.train.optim import OptimConfig, learning_rates, make_optimizer
from tpo_jax.train.stages import RECIPES, StageRecipe, get_recipe, param_group
from tpo_jax.train.step import TrainConfig, init_train_state, make_grad_fn, make_train_step, split_model

CFG = C.get_config("tiny")


def _model(seed=0, random_lora_b=True, cfg=CFG):
    model = TPOModel(cfg, rngs=nnx.Rngs(seed))
    if random_lora_b:  # B starts at zero, which would zero the LoRA-A gradients
        rng = np.random.default_rng(seed)
        for _, m in nnx.iter_graph(model):
            if isinstance(m, LoRALinear):
                m.lora_b[...] = jnp.asarray(rng.normal(0, 0.02, m.lora_b.shape), jnp.float32)
    return model


def _batch(n=8, tasks=("region", "temporal", "mask", "conversation"), seed=0):
    return {k: jnp.asarray(v) for k, v in synthetic_batch(CFG, n, seed=seed, tasks=tasks).items()}


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def batch8():
    return _batch(8)


def test_grad_accumulation_equals_big_batch(batch8):
    # exact when the temporal criterion's row groups fit the micro-batches of 2 (tpo_jax.heads.temporal.batch)
    model_cfg = C.replace(CFG, **{"heads.temporal.criterion_group": 2})
    model = _model(cfg=model_cfg)
    rng = jax.random.key(0)
    out = {}
    for n in (1, 4):
        cfg = TrainConfig(stage="stage3", micro_batches=n, dropout=False)
        graphdef, params, frozen = split_model(model, get_recipe("stage3"))
        out[n] = jax.jit(make_grad_fn(graphdef, model_cfg, cfg))(params, frozen, batch8, rng)
    (m1, g1), (m4, g4) = out[1], out[4]
    assert float(m1["count/temporal"]) == 2 and float(m1["count/region"]) == 2
    for key in ("loss/total", "loss/lm", "loss/region", "loss/temporal", "loss/mask"):
        np.testing.assert_allclose(float(m4[key]), float(m1[key]), rtol=1e-5, err_msg=key)
    f1, f4 = _flat(g1), _flat(g4)
    assert f1.keys() == f4.keys()
    top = max(np.abs(v).max() for v in f1.values())
    # relative per leaf; leaves whose gradient is zero in exact arithmetic (attention key biases and the
    # saliency_proj1 bias: softmax / ranking losses are shift-invariant) hold only float32 rounding noise
    # (~1e-8 of the largest gradient entry), so each leaf's scale is floored at 1% of that entry
    worst = max(np.abs(f4[k] - f1[k]).max() / max(np.abs(f1[k]).max(), 1e-2 * top) for k in f1)
    assert worst <= 1e-5, worst
    total = np.sqrt(sum(np.sum((f4[k] - f1[k]) ** 2) for k in f1) / sum(np.sum(f1[k] ** 2) for k in f1))
    assert total <= 1e-5, total



def test_lm_logits_at_label_rows_equal_full_logits(batch8):
    """lm_rows > 0 (logits only at label positions) gives the full-logits loss and gradients."""
    model = _model()
    graphdef, params, frozen = split_model(model, get_recipe("stage3"))
    out = {}
    for rows in (0, 16):
        cfg = TrainConfig(stage="stage3", dropout=False, lm_rows=rows)
        out[rows] = jax.jit(make_grad_fn(graphdef, CFG, cfg))(params, frozen, batch8, jax.random.key(0))
    (m0, g0), (m16, g16) = out[0], out[16]
    assert float(m16["count/lm_dropped"]) == 0 and float(m0["count/lm"]) > 8
    for key in ("loss/total", "loss/lm"):
        np.testing.assert_allclose(float(m16[key]), float(m0[key]), rtol=1e-6, err_msg=key)
    f0, f16 = _flat(g0), _flat(g16)
    top = max(np.abs(v).max() for v in f0.values())
    worst = max(np.abs(f16[k] - f0[k]).max() / max(np.abs(f0[k]).max(), 1e-2 * top) for k in f0)
    assert worst <= 1e-5, worst


def test_label_rows_pick_label_positions_in_order_and_count_the_rest():
    from tpo_jax.losses import IGNORE, label_rows
    x = IGNORE
    labels = jnp.asarray([[x, x, 5, 6, 7, x],    # shifted targets at positions 1, 2, 3
                          [x, x, x, x, x, x],    # none
                          [x, 1, 2, 3, 4, 9]])   # positions 0..4: two beyond num_rows=3
    rows, targets, dropped = label_rows(labels, 3)
    np.testing.assert_array_equal(np.asarray(rows)[0], [1, 2, 3])
    np.testing.assert_array_equal(np.asarray(targets), [[5, 6, 7], [x, x, x], [1, 2, 3]])
    np.testing.assert_array_equal(np.asarray(rows)[2], [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(dropped), [0, 0, 2])


def _grads_for(head):
    weights = {"lm": 0.0, "region": 0.0, "temporal": 0.0, "mask": 0.0, head: 1.0}
    cfg = TrainConfig(stage="stage3", dropout=False, loss_weights=weights)
    graphdef, params, frozen = split_model(_model(), get_recipe("stage3"))
    tasks = (head, "conversation")
    metrics, grads = jax.jit(make_grad_fn(graphdef, CFG, cfg))(params, frozen, _batch(4, tasks), jax.random.key(0))
    return metrics, nnx.to_pure_dict(grads)


@pytest.mark.parametrize("head, token", [("region", "box_token"), ("temporal", "temporal_token"),
                                         ("mask", "track_token")])
def test_each_head_loss_routes_gradients(head, token):
    metrics, grads = _grads_for(head)
    assert float(metrics[f"loss/{head}"]) > 0
    lora = [np.abs(v).max() for k, v in _flat(grads).items() if "lora_" in k]
    assert lora and max(lora) > 0, "no gradient reached the LoRA weights"
    assert np.abs(grads[token]).max() > 0, f"{token} got no gradient"
    for other in {"box_token", "temporal_token", "track_token"} - {token}:
        assert not np.asarray(grads[other]).any(), f"{other} got a gradient from the {head} loss"


def test_batch_without_task_examples_gives_the_lm_loss():
    cfg = TrainConfig(stage="stage3", dropout=False)
    graphdef, params, frozen = split_model(_model(), get_recipe("stage3"))
    metrics, grads = jax.jit(make_grad_fn(graphdef, CFG, cfg))(params, frozen, _batch(4, ("conversation",)),
                                                              jax.random.key(0))
    for head in ("region", "temporal", "mask"):
        assert float(metrics[f"count/{head}"]) == 0
        assert float(metrics[f"loss/{head}"]) == 0.0
    assert np.isfinite(float(metrics["loss/total"]))
    assert float(metrics["loss/total"]) == float(metrics["loss/lm"]) > 0
    assert all(np.isfinite(v).all() for v in _flat(grads).values())


def test_frozen_params_are_bit_identical_and_have_no_optimizer_state():
    model = _model()
    cfg = TrainConfig(stage="stage2_region", dropout=True,
                      optim=OptimConfig(total_steps=10, warmup_ratio=0.0, lr_scale=100.0))
    graphdef, state, frozen, tx = init_train_state(model, cfg)
    frozen_before = _flat(frozen)
    params_before = _flat(state.params)
    groups = {param_group(p) for p, _ in nnx.to_flat_state(state.params)}
    assert groups == {"lora", "region_head", "box_token"}
    # optimizer state: exactly two moments per trainable value, nothing for frozen params
    n_trainable = sum(v.size for v in params_before.values())
    n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert n_opt == 2 * n_trainable
    step = make_train_step(graphdef, tx, CFG, cfg)
    batch = _batch(4, ("region", "conversation"))
    for i in range(3):
        state, metrics = step(state, frozen, batch, jax.random.key(i))
    assert int(state.step) == 3
    for k, v in _flat(frozen).items():
        np.testing.assert_array_equal(v, frozen_before[k], err_msg=k)
    changed = [k for k, v in _flat(state.params).items() if not np.array_equal(v, params_before[k])]
    assert any("box_token" in k for k in changed) and any("lora_" in k for k in changed)
    assert any("region_head" in k for k in changed)


def test_stage_recipes():
    assert set(RECIPES["stage1"].learning_rates) == {"lora"} and RECIPES["stage1"].heads == ()
    # the LLM base trains only in the from-scratch stage 1; every TPO recipe keeps it frozen
    assert RECIPES["stage1_scratch"].learning_rates == {"lora": 2e-5, "llm": 2e-5}
    assert [n for n, r in RECIPES.items() if "llm" in r.learning_rates] == ["stage1_scratch"]
    assert not [n for n, r in RECIPES.items() if "llm_embed" in r.learning_rates]
    _, params, _ = split_model(_model(random_lora_b=False), RECIPES["stage1_scratch"])
    trained = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert "llm/layers/0/self_attn/q_proj/kernel" in trained and "llm/lm_head/kernel" in trained
    assert "llm/layers/0/self_attn/q_proj/lora_a" in trained and "llm/embed_tokens/embedding" not in trained
    with pytest.raises(ValueError, match="'sam2'.*stay frozen"):
        StageRecipe("bad", {"lora": 1e-4, "sam2": 1e-4}, ())
    assert RECIPES["stage2_temporal"].learning_rates == {"lora": 2e-5, "temporal_head": 1e-4, "temporal_token": 2e-4}
    s3 = RECIPES["stage3"]
    assert {"vision", "connector"} <= set(s3.learning_rates) and "sam2" not in s3.learning_rates
    assert set(s3.learning_rates.values()) == {2e-5}
    with pytest.raises(ValueError, match="unknown stage 'stage4'"):
        get_recipe("stage4")
    # every parameter of the model belongs to a group; SAM2 is frozen in every stage
    model = _model(random_lora_b=False)
    for name, recipe in RECIPES.items():
        _, params, frozen = split_model(model, recipe)
        assert all(param_group(p) != "sam2" for p, _ in nnx.to_flat_state(params)), name
        assert any(param_group(p) == "sam2" for p, _ in nnx.to_flat_state(frozen)), name


def test_group_lr_scale_multiplies_one_groups_learning_rate():
    """AdamW's first update is -peak_lr · g / (|g| + eps) (moments bias-corrected; no decay on 1-D leaves)."""
    cfg = OptimConfig(total_steps=10, warmup_ratio=0.0, lr_scale=3.0, eps=1e-12, grad_clip=0.0,
                      group_lr_scale={"region_head": 10.0})
    params = {"region_head": {"bias": jnp.zeros(4)}, "box_token": jnp.zeros(4), "lora_b": jnp.zeros(4)}
    grads = jax.tree.map(lambda p: jnp.asarray([0.5, -2.0, 1e-3, -7.0]), params)
    recipe = get_recipe("stage2_region")
    tx = make_optimizer(recipe, params, cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    sign = np.sign(np.asarray(grads["box_token"]))
    np.testing.assert_allclose(updates["region_head"]["bias"], -1e-4 * 3.0 * 10.0 * sign, rtol=1e-5)
    np.testing.assert_allclose(updates["box_token"], -1e-4 * 3.0 * sign, rtol=1e-5)
    np.testing.assert_allclose(updates["lora_b"], -2e-5 * 3.0 * sign, rtol=1e-5)
    logged = learning_rates(recipe, cfg, 0)
    assert float(logged["lr/region_head"]) == pytest.approx(3e-3) and float(logged["lr/lora"]) == pytest.approx(6e-5)
    with pytest.raises(C.ConfigError, match=r"'optim\.group_lr_scale': unknown group\(s\) \['heads'\]"):
        OptimConfig(group_lr_scale={"heads": 2.0}).validate()


def test_bad_train_config_names_the_field():
    with pytest.raises(C.ConfigError, match="'train.micro_batches'"):
        TrainConfig(micro_batches=0).validate()
    with pytest.raises(C.ConfigError, match="'train.loss_weights'"):
        TrainConfig(loss_weights={"lm": 1.0, "boxes": 1.0}).validate()


def test_bf16_compute_keeps_float32_trainable_params():
    cfg = C.replace(CFG, dtype="bfloat16")
    train_cfg = TrainConfig(stage="stage2_region", dropout=False, optim=OptimConfig(total_steps=4))
    graphdef, state, frozen, tx = init_train_state(TPOModel(cfg, rngs=nnx.Rngs(0)), train_cfg)
    step = make_train_step(graphdef, tx, cfg, train_cfg)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 2, tasks=("region",)).items()}
    state, metrics = step(state, frozen, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss/total"])) and float(metrics["loss/region"]) > 0
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}

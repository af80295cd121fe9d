"""Layer stacks: scanned and unrolled layouts give the same numbers, every remat policy gives the gradients of
no remat, the stacked KV cache decodes like the full forward, and bad stack settings name their field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpo_jax import config as C
from tpo_jax.checkpoints.orbax_io import _flat_state
from tpo_jax.data.synthetic import synthetic_batch
from tpo_jax.llm import KVCache, MistralDecoder, llm_stack_layouts
from tpo_jax.lora import LoRALinear
from tpo_jax.model import TPOModel, stack_layouts
from tpo_jax.qformer import QFormer, qformer_stack_layouts
from tpo_jax.stack import unstack_params
from tpo_jax.losses import loss_counts, total_loss
from tpo_jax.model import HEADS
from tpo_jax.train.stages import RECIPES, get_recipe, param_group
from tpo_jax.train.step import TrainConfig, make_grad_fn, split_model
from tpo_jax.vit import UMTViT, vit_stack_layouts

from stack_helper import scanned_copy

TINY = C.get_config("tiny")
SCAN = {"stack.scan_layers": True}
ALL_SCAN = {f"{s}.stack.scan_layers": True for s in ("llm", "vit", "qformer")}


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _values(module) -> dict[str, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in _flat_state(nnx.state(module, nnx.Param))[0].items()}


def _randomise_lora(module, seed=0):
    """LoRA B starts at zero, which would hide the adapter path and zero the A gradients."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_graph(module):
        if isinstance(m, LoRALinear):
            m.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, m.lora_b.shape), m.lora_b[...].dtype)
    return module


def _assert_close(a, b, tol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()), rtol=0, err_msg=what)


def _assert_grads_close(g_unrolled: dict, g_scanned: dict, layouts, tol):
    g_scanned = unstack_params(g_scanned, layouts)
    assert g_scanned.keys() == g_unrolled.keys()
    top = max(np.abs(v).max() for v in g_unrolled.values())
    for path, g in g_unrolled.items():
        np.testing.assert_allclose(np.asarray(g_scanned[path]), g, atol=tol * top, rtol=0, err_msg=path)


def _grads(module, loss):
    grads = nnx.jit(nnx.grad(loss))(module)
    return {p: np.asarray(v.get_value()) for p, v in _flat_state(grads)[0].items()}


# ------------------------------------------------------------------------------------------------ per stack

def test_llm_scan_equals_unrolled():
    cfg = C.replace(TINY.llm, num_layers=3, sliding_window=4)
    lora = C.LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
    unrolled = _randomise_lora(MistralDecoder(cfg, lora, rngs=nnx.Rngs(0)))
    scfg = C.replace(cfg, **SCAN)
    scanned = scanned_copy(unrolled, lambda: MistralDecoder(scfg, lora, rngs=nnx.Rngs(1)),
                            llm_stack_layouts(scfg, ""))
    assert scanned.layers.self_attn.q_proj.kernel.shape == (3, 64, 64)
    ids = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
    mask = jnp.ones((2, 9), jnp.int32).at[1, :2].set(0)
    a, b = unrolled(ids, attention_mask=mask), scanned(ids, attention_mask=mask)
    _assert_close(b.logits, a.logits, 1e-5, "logits")
    _assert_close(b.hidden, a.hidden, 1e-5, "hidden")

    def loss(m):
        return jnp.mean(m(ids, attention_mask=mask).logits ** 2)

    _assert_grads_close(_grads(unrolled, loss), _grads(scanned, loss), llm_stack_layouts(scfg, ""), 1e-5)


def test_vit_scan_equals_unrolled():
    cfg = C.replace(TINY.vit, depth=3)
    unrolled = UMTViT(cfg, rngs=nnx.Rngs(0))
    scfg = C.replace(cfg, **SCAN)
    scanned = scanned_copy(unrolled, lambda: UMTViT(scfg, rngs=nnx.Rngs(1)), vit_stack_layouts(scfg, ""))
    frames = jax.random.normal(jax.random.key(1), (2, cfg.num_frames, cfg.img_size, cfg.img_size, 3))
    _assert_close(scanned(frames), unrolled(frames), 1e-5, "features")

    def loss(m):
        return jnp.mean(m(frames) ** 2)

    _assert_grads_close(_grads(unrolled, loss), _grads(scanned, loss), vit_stack_layouts(scfg, ""), 1e-5)


def test_qformer_scan_equals_unrolled():
    cfg = C.replace(TINY.qformer, num_layers=4, hidden_dropout=0.0, attention_dropout=0.0)
    unrolled = QFormer(cfg, llm_hidden=16, rngs=nnx.Rngs(0))
    scfg = C.replace(cfg, **SCAN)
    layouts = qformer_stack_layouts(scfg, "")
    scanned = scanned_copy(unrolled, lambda: QFormer(scfg, llm_hidden=16, rngs=nnx.Rngs(1)), layouts)
    assert scanned.layer_groups[0].crossattention is not None and scanned.layer_groups[1].crossattention is None
    assert scanned.layer_groups[0].attention.query.kernel.shape == (2, 32, 32)
    vision = jax.random.normal(jax.random.key(2), (2, 12, cfg.encoder_width))
    vmask = jnp.ones((2, 12), bool).at[0, -3:].set(False)
    text = jax.random.randint(jax.random.key(3), (2, 5), 0, 100)
    tmask = jnp.ones((2, 5), jnp.int32).at[1, -2:].set(0)
    a = unrolled(vision, vmask, text, tmask)
    _assert_close(scanned(vision, vmask, text, tmask), a, 1e-5, "queries")

    def loss(m):
        return jnp.mean(m(vision, vmask, text, tmask) ** 2)

    _assert_grads_close(_grads(unrolled, loss), _grads(scanned, loss), layouts, 1e-5)


# ------------------------------------------------------------------------------------------------ whole model

TERMS = ("lm", "region", "temporal", "mask")


@pytest.fixture(scope="module")
def tpo_pair():
    cfg = C.replace(TINY, **{"qformer.hidden_dropout": 0.0, "qformer.attention_dropout": 0.0})
    unrolled = _randomise_lora(TPOModel(cfg, rngs=nnx.Rngs(0)))
    scfg = C.replace(cfg, **ALL_SCAN)
    scanned = scanned_copy(unrolled, lambda: TPOModel(scfg, rngs=nnx.Rngs(1)), stack_layouts(scfg))
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 4, seed=0).items()}
    return cfg, unrolled, scfg, scanned, batch


def _term_gradients(model, cfg, batch):
    """Every loss term and its gradient with respect to EVERY parameter, in one compiled program: the
    gradient of any stage recipe's loss is a weighted sum of these, restricted to its trainable groups."""
    graphdef, params = nnx.split(model, nnx.Param)
    counts = loss_counts(batch, cfg, HEADS)

    def terms(params):
        _, metrics = total_loss(nnx.merge(graphdef, params), batch, counts, {}, HEADS)
        return jnp.stack([metrics[f"loss/{t}"] for t in TERMS])

    values, jac = jax.jit(lambda p: (terms(p), jax.jacrev(terms)(p)))(params)
    flat = {path: np.asarray(v.get_value()) for path, v in _flat_state(jac)[0].items()}
    return np.asarray(values), flat


def test_tpo_losses_and_gradients_scan_equal_unrolled_for_every_stage(tpo_pair):
    """Loss terms and the gradient of each term for every parameter; then, for every stage recipe, its
    loss (the terms of its heads) and the gradient of each of its trainable parameters. (The real sharded
    stage-3 gradient function of the scanned model: tests/test_sharding.py.)"""
    cfg, unrolled, scfg, scanned, batch = tpo_pair
    values_u, jac_u = _term_gradients(unrolled, cfg, batch)
    values_s, jac_s = _term_gradients(scanned, scfg, batch)
    assert np.all(values_u > 0), values_u  # every term is on in this batch
    np.testing.assert_allclose(values_s, values_u, rtol=1e-5)
    layouts = stack_layouts(scfg)
    per_term = [unstack_params({p: g[t] for p, g in jac_s.items()}, layouts) for t in range(len(TERMS))]
    jac_s = {p: np.stack([terms[p] for terms in per_term]) for p in per_term[0]}
    assert jac_s.keys() == jac_u.keys()
    for stage, recipe in RECIPES.items():
        weights = np.array([1.0] + [float(t in recipe.heads) for t in TERMS[1:]])
        trained = {p: np.tensordot(weights, g, axes=1) for p, g in jac_u.items()
                   if param_group(tuple(p.split("."))) in recipe.trainable_groups}
        assert trained, f"stage {stage} trains nothing"
        top = max(np.abs(g).max() for g in trained.values())
        for path, g in trained.items():
            np.testing.assert_allclose(np.tensordot(weights, jac_s[path], axes=1), g, atol=1e-5 * top, rtol=0,
                                       err_msg=f"{stage}: {path}")


def test_tpo_forward_heads_scan_equals_unrolled(tpo_pair):
    cfg, unrolled, scfg, scanned, batch = tpo_pair
    kw = dict(visual_mask=batch["visual_mask"], frames=batch["frames"], attention_mask=batch["attention_mask"],
              track_boxes=batch.get("track_boxes"), heads=("region", "temporal", "mask"), head_inputs=batch)

    a, b = (nnx.jit(lambda m: m(batch["input_ids"], **kw))(m) for m in (unrolled, scanned))
    _assert_close(b.logits, a.logits, 1e-5, "logits")
    _assert_close(b.hidden, a.hidden, 1e-5, "hidden")
    for la, lb in zip(jax.tree.leaves(a.heads), jax.tree.leaves(b.heads)):
        if jnp.issubdtype(la.dtype, jnp.floating):
            _assert_close(lb, la, 1e-5, "head outputs")
        else:
            np.testing.assert_array_equal(np.asarray(lb), np.asarray(la))


# ------------------------------------------------------------------------------------------------ remat

def _lm_step_gradients(model_cfg, params, frozen, graphdef, batch, eager=False):
    """Stage 3 with the LM loss alone: gradients reach the LLM's LoRA, the Q-Former and the ViT. `eager`: op by
    op (`jax.disable_jit`), so no compiler fuses or reorders anything."""
    train_cfg = TrainConfig(stage="stage3", heads=(), dropout=False)
    grad_fn = make_grad_fn(graphdef, model_cfg, train_cfg)
    if eager:
        with jax.disable_jit():
            return grad_fn(params, frozen, batch, jax.random.key(0))
    return jax.jit(grad_fn)(params, frozen, batch, jax.random.key(0))


def test_remat_policies_equal_no_remat():
    """Every policy's loss and gradients equal the no-remat step's to 1e-6 relative when the step runs op by op
    (no compiler in the way; in fact to the bit). Compiled, XLA fuses the recomputed forward differently (its
    vectorised exp/log and reduction order round differently), so f32 results move by ~1e-6 relative; there the
    bound is 1e-6 or the rounding floor, measured as the difference between the scanned and the unrolled
    no-remat step (the same math, compiled differently), whichever is larger."""
    cfgs = {scan: C.replace(TINY, **{f"{s}.stack.scan_layers": scan for s in ("llm", "vit", "qformer")},
                            **{"qformer.hidden_dropout": 0.0, "qformer.attention_dropout": 0.0})
            for scan in (True, False)}
    unrolled = _randomise_lora(TPOModel(cfgs[False], rngs=nnx.Rngs(0)))
    models = {False: unrolled, True: scanned_copy(unrolled, lambda: TPOModel(cfgs[True], rngs=nnx.Rngs(1)),
                                                   stack_layouts(cfgs[True]))}
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfgs[False], 4, seed=1).items()}

    def run(scan, policy, eager=False):
        save = ("query_proj", "mlp_hidden") if policy == "custom" else ()
        cfg = C.replace(cfgs[scan], **{f"{s}.stack.remat_policy": policy for s in ("llm", "vit", "qformer")},
                        **{f"{s}.stack.remat_save": save for s in ("llm", "vit", "qformer")})
        _, params, frozen = split_model(models[scan], get_recipe("stage3"))
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: TPOModel(cfg, rngs=nnx.Rngs(0))))
        metrics, grads = _lm_step_gradients(cfg, params, frozen, graphdef, batch, eager)
        grads = {p: np.asarray(v.get_value()) for p, v in _flat_state(grads)[0].items()}
        if scan:
            grads = unstack_params(grads, stack_layouts(cfg))
        return float(metrics["loss/total"]), np.concatenate([np.ravel(grads[p]) for p in sorted(grads)])

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    policies = [p for p in C.REMAT_POLICIES if p != "none"]
    loss_e, g_e = run(True, "none", eager=True)
    for policy in policies:
        loss, g = run(True, policy, eager=True)
        np.testing.assert_allclose(loss, loss_e, rtol=1e-6, err_msg=policy)
        assert rel(g, g_e) <= 1e-6, (policy, rel(g, g_e))
    loss0, g0 = run(True, "none")
    loss_u, g_u = run(False, "none")
    floor = rel(g_u, g0)
    bound = max(1e-6, 1.5 * floor)
    # compiled: the policies with their own code paths on the scanned stacks (the dots_* policies differ from
    # them only in what XLA is told to save); the unrolled stacks run the same remat-wrapped step (one policy)
    for scan, policies in ((True, ["full", "custom"]), (False, ["full"])):
        base = g0 if scan else g_u
        for policy in policies:
            loss, g = run(scan, policy)
            np.testing.assert_allclose(loss, loss0, rtol=1e-6, err_msg=policy)
            assert rel(g, base) <= bound, (scan, policy, rel(g, base), floor)


def test_remat_full_needs_less_temporary_memory():
    """`full` keeps less for the backward pass than no remat (what remat is for), in XLA's buffer assignment."""
    cfg = C.replace(TINY.llm, num_layers=4, **SCAN)
    ids = jnp.zeros((4, 256), jnp.int32)
    temp = {}
    for policy in ("none", "full"):
        model = MistralDecoder(C.replace(cfg, **{"stack.remat_policy": policy}), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state):
            return jnp.mean(nnx.merge(graphdef, state)(ids, logits=False).hidden ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(state).compile()
        temp[policy] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.8 * temp["none"], temp


# ------------------------------------------------------------------------------------------------ KV cache

def test_stacked_kv_cache_decoding_equals_full_forward():
    cfg = C.replace(TINY.llm, num_layers=3, **SCAN)
    model = _randomise_lora(MistralDecoder(cfg, C.LoRAConfig(rank=4, alpha=8.0, dropout=0.0), rngs=nnx.Rngs(0)))
    ids = jax.random.randint(jax.random.key(4), (2, 8), 0, cfg.vocab_size)
    full = model(ids).logits
    cache = KVCache.init(cfg, batch=2, max_len=12)
    assert cache.keys.shape == (3, 2, 12, cfg.num_kv_heads, cfg.resolved_head_dim)
    out = model(ids[:, :5], cache=cache)
    steps = [out.logits]
    for t in range(5, 8):
        out = model(ids[:, t:t + 1], cache=out.cache)
        steps.append(out.logits)
    assert int(out.cache.length) == 8
    _assert_close(jnp.concatenate(steps, axis=1), full, 1e-5, "cached logits")


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("field, value, fragment", [
    ("llm.stack.remat_policy", "dots", "config field 'llm.stack.remat_policy'"),
    ("vit.stack.attention", "flash", "config field 'vit.stack.attention'"),
    ("qformer.stack.remat_save", ("query_proj",), "config field 'qformer.stack.remat_save'"),
    ("llm.stack.scan_layers", "yes", "config field 'llm.stack.scan_layers'"),
])
def test_bad_stack_settings_name_the_field(field, value, fragment):
    with pytest.raises(C.ConfigError, match=fragment.replace(".", r"\.")):
        C.replace(TINY, **{field: value}).validate()


def test_remat_save_names_must_exist():
    with pytest.raises(C.ConfigError, match="unknown activation name"):
        C.replace(TINY, **{"llm.stack.remat_policy": "custom", "llm.stack.remat_save": ("nope",)}).validate()


def test_scanned_qformer_needs_whole_groups():
    with pytest.raises(C.ConfigError, match=r"qformer\.stack\.scan_layers"):
        C.replace(TINY, **{"qformer.num_layers": 3, "qformer.stack.scan_layers": True}).validate()


@pytest.mark.parametrize("field, value", [("llm.stack.attention", "cudnn"), ("vit.stack.attention", "splash")])
def test_attention_the_backend_cannot_run_names_the_field(field, value):
    from tpo_jax.attention import check_config

    cfg = C.replace(TINY, **{field: value}).validate()  # a valid name: the backend decides
    with pytest.raises(C.ConfigError, match=rf"config field '{field}': attention implementation '{value}' needs"):
        check_config(cfg, backend="cpu")
    check_config(C.replace(TINY, **{field: "auto"}), backend="cpu")

"""Region head (`loc_decoder`) and mask head (`track_embed`, `track_embed_decode2`, SAM2 box prompt) tests."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from tpo_jax.config import MaskHeadConfig, RegionHeadConfig
from tpo_jax.heads.mask import MaskHead, SAM2PromptEncoder, mask_loss_terms
from tpo_jax.heads.region import RegionHead, region_loss_terms


# ------------------------------------------------------------------------------------------- SAM2 box prompt

def _numpy_box_prompt(boxes, g, point_emb, nap, image_size=1024, bf16=False):
    """Independent float64 evaluation of MODEL-SPEC §7.1 with explicit loops."""
    boxes = np.asarray(boxes, np.float64)
    g = np.asarray(g, np.float64)
    point_emb = np.asarray(point_emb, np.float64)
    nap = np.asarray(nap, np.float64).reshape(-1)
    out = np.zeros((boxes.shape[0], 3, point_emb.shape[1]))
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        for row, ((cx, cy), label) in enumerate((((x0, y0), 2), ((x1, y1), 3))):
            px, py = image_size * cx + 0.5, image_size * cy + 0.5
            if bf16:
                px = float(np.float64(px).astype(ml_dtypes.bfloat16))
                py = float(np.float64(py).astype(ml_dtypes.bfloat16))
            ux, uy = px / image_size, py / image_size
            vx, vy = 2 * ux - 1, 2 * uy - 1
            half = g.shape[1]
            for j in range(half):
                a = 2 * math.pi * (vx * g[0, j] + vy * g[1, j])
                out[i, row, j] = math.sin(a)
                out[i, row, half + j] = math.cos(a)
            out[i, row] += point_emb[label]
        out[i, 2] = nap  # padding point (label −1): zero + not_a_point_embed
    return out


def _encoder(emulate=False, seed=0):
    cfg = MaskHeadConfig(prompt_dim=256, sam_image_size=1024, emulate_bf16_points=emulate)
    return SAM2PromptEncoder(cfg, rngs=nnx.Rngs(seed))


def _random_boxes(rng, n):
    a = rng.uniform(0, 1, (n, 2, 2))
    lo, hi = a.min(1), a.max(1)
    return np.concatenate([lo, hi], axis=-1).astype(np.float32)  # (n, 4) xyxy


def _params(enc):
    return (np.asarray(enc.pe_layer.positional_encoding_gaussian_matrix[...]),
            np.asarray(enc.point_embeddings[...]), np.asarray(enc.not_a_point_embed[...]))


def test_box_prompt_matches_numpy_formula():
    enc = _encoder(seed=3)
    boxes = _random_boxes(np.random.default_rng(0), 16)
    got = np.asarray(enc.box_prompt(jnp.asarray(boxes)))
    assert got.shape == (16, 3, 256) and got.dtype == np.float32
    ref = _numpy_box_prompt(boxes, *_params(enc))
    assert np.max(np.abs(got - ref)) <= 1e-5
    # leading dims are free
    got2 = np.asarray(enc.box_prompt(jnp.asarray(boxes).reshape(4, 4, 4)))
    np.testing.assert_array_equal(got2.reshape(16, 3, 256), got)


def test_box_prompt_bf16_points():
    enc32, enc16 = _encoder(False, seed=5), _encoder(True, seed=5)
    boxes = _random_boxes(np.random.default_rng(1), 16)
    boxes[0] = [0.1, 0.2, 0.6123, 0.9876]  # x1·1024 + 0.5 ≈ 627.5 ∈ [512, 1024): 4-px bf16 steps
    got16 = np.asarray(enc16.box_prompt(jnp.asarray(boxes)))
    got32 = np.asarray(enc32.box_prompt(jnp.asarray(boxes)))
    params = _params(enc16)
    ref16 = _numpy_box_prompt(boxes, *params, bf16=True)
    assert np.max(np.abs(got16 - ref16)) <= 1e-5
    # the quantised coordinates really change the embedding of that corner
    assert np.max(np.abs(got16[0, 1] - got32[0, 1])) > 1e-2
    ref32 = _numpy_box_prompt(boxes[:1], *params, bf16=False)
    assert np.max(np.abs(got16[0, 1] - ref32[0, 1])) > 1e-2
    # padding row unaffected
    np.testing.assert_array_equal(got16[:, 2], got32[:, 2])


def test_box_prompt_matches_transformers_sam2():
    """transformers' Sam2PromptEncoder: `_embed_points(1024·c, labels (2, 3), pad=True)` and `_embed_boxes`
    (pixel coords + 0.5, padding point (0, 0) label −1, divide by image_size) are exactly MODEL-SPEC §7.1."""
    torch = pytest.importorskip("torch")
    sam2 = pytest.importorskip("transformers.models.sam2.modeling_sam2")
    from transformers import Sam2PromptEncoderConfig

    torch.manual_seed(0)
    tenc = sam2.Sam2PromptEncoder(Sam2PromptEncoderConfig(hidden_size=256, image_size=1024)).eval()
    enc = _encoder(seed=0)
    enc.pe_layer.positional_encoding_gaussian_matrix[...] = jnp.asarray(
        tenc.shared_embedding.positional_embedding.numpy())
    enc.point_embeddings[...] = jnp.asarray(tenc.point_embed.weight.detach().numpy())
    enc.not_a_point_embed[...] = jnp.asarray(tenc.not_a_point_embed.weight.detach().numpy())

    boxes = _random_boxes(np.random.default_rng(2), 8)
    ours = np.asarray(enc.box_prompt(jnp.asarray(boxes)))
    pix = torch.from_numpy(boxes) * 1024.0
    with torch.no_grad():
        pts = tenc._embed_points(pix.view(8, 1, 2, 2), torch.tensor([[[2, 3]]] * 8), pad=True)[:, 0].numpy()
        bxs = tenc._embed_boxes(pix.view(8, 1, 4))[:, 0].numpy()
    assert np.max(np.abs(ours - pts)) <= 1e-5
    assert np.max(np.abs(ours - bxs)) <= 1e-5


# ------------------------------------------------------------------------------------------------ region loss

def _region(pred, target, **kw):
    cfg = RegionHeadConfig(**kw)
    return region_loss_terms(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), cfg)


def test_region_loss_hand_values():
    pred = [[[0, 0, 2, 2], [0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1]]]
    target = [[[1, 1, 3, 3], [0.1, 0.2, 0.5, 0.6], [2, 0, 3, 1]]]
    t = _region(pred, target)
    assert all(v.shape == (1, 3) for v in t.values())
    # case 0: inter 1, union 7, enclosing 9 → GIoU = 1/7 − 2/9 = −5/63; L1 = 1
    # case 1: identical → 0
    # case 2: disjoint, union 2, enclosing 3 → GIoU = −1/3; L1 = mean(2, 0, 2, 0) = 1
    np.testing.assert_allclose(t["l1"][0], [1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(t["giou"][0], [68 / 63, 0.0, 4 / 3], atol=1e-6)
    np.testing.assert_allclose(t["loss_region"][0], [2 + 0.2 * 68 / 63, 0.0, 2 + 0.2 * 4 / 3], atol=1e-6)
    np.testing.assert_allclose(t["mse"][0], [1.0, 0.0, 2.0], atol=1e-6)
    tm = _region(pred, target, loss="mse")
    np.testing.assert_allclose(tm["loss_region"][0], [1.0, 0.0, 2.0], atol=1e-6)


def test_region_loss_degenerate_prediction():
    pred = jnp.asarray([[[0.5, 0.5, 0.2, 0.8], [0.2, 0.3, 0.6, 0.1], [0.1, 0.1, 0.3, 0.3]]], jnp.float32)
    target = jnp.asarray([[[0.1, 0.1, 0.4, 0.4]] * 3], jnp.float32)
    cfg = RegionHeadConfig()
    t = region_loss_terms(pred, target, cfg)
    np.testing.assert_allclose(t["giou"][0, :2], [2.0, 2.0])
    np.testing.assert_allclose(t["l1"][0, 0], 0.35, atol=1e-6)  # mean(0.4, 0.4, 0.2, 0.4)
    np.testing.assert_allclose(t["loss_region"][0, 0], 2 * 0.35 + 0.2 * 2.0, atol=1e-6)

    g_giou = jax.jit(jax.grad(lambda p: region_loss_terms(p, target, cfg)["giou"].sum()))(pred)
    assert np.all(np.isfinite(g_giou))
    np.testing.assert_array_equal(g_giou[0, :2], 0.0)
    assert np.any(g_giou[0, 2] != 0)
    g = jax.jit(jax.grad(lambda p: region_loss_terms(p, target, cfg)["loss_region"].sum()))(pred)
    assert np.all(np.isfinite(g))
    # invalid rows: only the L1 part, 2 · sign(p − g) / 4
    np.testing.assert_allclose(g[0, :2], 0.5 * np.sign(pred - target)[0, :2], atol=1e-6)

    # a zero-size (valid, x1 == x0) prediction and a zero-size target stay finite too
    p0 = jnp.asarray([[[0.3, 0.3, 0.3, 0.3]]], jnp.float32)
    g0 = jax.grad(lambda p: region_loss_terms(p, p0, cfg)["loss_region"].sum())(p0)
    assert np.all(np.isfinite(g0))


def test_region_head_forward_and_grad():
    head = RegionHead(32, RegionHeadConfig(hidden=16), rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(1), (2, 3, 32))
    out = head(h)
    assert out.shape == (2, 3, 4)
    target = jnp.tile(jnp.asarray([0.2, 0.2, 0.6, 0.7]), (2, 3, 1))

    def loss(h):
        return region_loss_terms(head(h), target, head.cfg)["loss_region"].mean()

    gh = jax.jit(jax.grad(loss))(h)
    assert np.all(np.isfinite(gh)) and np.any(gh != 0)


# -------------------------------------------------------------------------------------------------- mask loss

def test_mask_loss_hand_values():
    pred_prompt = jnp.zeros((2, 3, 4))
    target_prompt = jnp.ones((2, 3, 4)).at[1].set(-0.5)
    pred_box = jnp.asarray([[0, 0, 1, 1], [0.2, 0.2, 0.4, 0.4]], jnp.float32)
    gt_box = jnp.asarray([[0.5, 0, 1, 1], [0.2, 0.2, 0.4, 0.4]], jnp.float32)
    t = mask_loss_terms(pred_prompt, target_prompt, pred_box, gt_box, MaskHeadConfig(prompt_dim=4))
    np.testing.assert_allclose(t["sam_l1"], [1.0, 0.5], atol=1e-7)
    np.testing.assert_allclose(t["box_l1"], [0.125, 0.0], atol=1e-7)
    np.testing.assert_allclose(t["loss_mask"], [1.125, 0.5], atol=1e-7)
    t2 = mask_loss_terms(pred_prompt, target_prompt, pred_box, gt_box, MaskHeadConfig(prompt_dim=4, box_weight=2.0))
    np.testing.assert_allclose(t2["loss_mask"], [1.25, 0.5], atol=1e-7)


def test_mask_head_grad():
    cfg = MaskHeadConfig(prompt_dim=16, num_prompt_tokens=3)
    head = MaskHead(24, cfg, rngs=nnx.Rngs(0))
    enc = SAM2PromptEncoder(cfg, rngs=nnx.Rngs(1))
    h = jax.random.normal(jax.random.key(2), (3, 24))
    gt = jnp.asarray([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.35, 0.9]], jnp.float32)
    prompt, box = head(h)
    assert prompt.shape == (3, 3, 16) and box.shape == (3, 4)

    def loss(h):
        p, b = head(h)
        target = jax.lax.stop_gradient(enc.box_prompt(gt))
        return mask_loss_terms(p, target, b, gt, cfg)["loss_mask"].mean()

    gh = jax.jit(jax.grad(loss))(h)
    assert np.all(np.isfinite(gh)) and np.any(gh != 0)


# ------------------------------------------------------------------------------------- 7B checkpoint shapes

def _shapes(module):
    state = nnx.state(module, nnx.Param)
    out = {}
    for path, leaf in nnx.to_flat_state(state):
        out[".".join(str(p) for p in path)] = tuple(leaf.get_value().shape)
    return out


def test_param_names_and_shapes_7b():
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    region = nnx.eval_shape(lambda: RegionHead(4096, RegionHeadConfig(hidden=2048), rngs=nnx.Rngs(0), **kw))
    mask = nnx.eval_shape(lambda: MaskHead(4096, MaskHeadConfig(), rngs=nnx.Rngs(0), **kw))
    enc = nnx.eval_shape(lambda: SAM2PromptEncoder(MaskHeadConfig(), rngs=nnx.Rngs(0)))
    assert _shapes(region) == {
        "loc_decoder.layers.0.kernel": (4096, 2048), "loc_decoder.layers.0.bias": (2048,),
        "loc_decoder.layers.1.kernel": (2048, 4), "loc_decoder.layers.1.bias": (4,)}
    assert _shapes(mask) == {
        "track_embed.layers.0.kernel": (4096, 4096), "track_embed.layers.0.bias": (4096,),
        "track_embed.layers.1.kernel": (4096, 768), "track_embed.layers.1.bias": (768,),
        "track_embed_decode2.layers.0.kernel": (4096, 4096), "track_embed_decode2.layers.0.bias": (4096,),
        "track_embed_decode2.layers.1.kernel": (4096, 4), "track_embed_decode2.layers.1.bias": (4,)}
    assert _shapes(enc) == {
        "pe_layer.positional_encoding_gaussian_matrix": (2, 128), "point_embeddings": (4, 256),
        "not_a_point_embed": (1, 256)}
    # every parameter carries logical axis names, one per dim
    for m in (region, mask, enc):
        for _, leaf in nnx.to_flat_state(nnx.state(m, nnx.Param)):
            axes = leaf.get_metadata()["out_sharding"]
            assert len(axes) == len(leaf.get_value().shape)

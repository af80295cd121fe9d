"""LLaVA-OV vision side (`tpo_jax.llava_ov`) against transformers' LlavaOnevisionForConditionalGeneration, f32.

A tiny random HF model (SigLIP 20 px / patch 4: a 5 × 5 grid, hidden 32, 2 layers; Qwen2 width 40; pinpoints up
to 4 × 4 tiles, anyres_max_9) is built locally; its weights reach our modules only through the conversion table
`checkpoints/tables/llava_ov_vision.py`. Compared: the tower's features (hidden_states[-1], before
post_layernorm), the projector, the packed anyres images (`get_image_features`' pooler output: unpadding of rows
and of columns, the anyres_max_9 downscale) and the pooled video features (`get_video_features`), plus the
bit-exact round trip of the weights and the host-side geometry (pinpoint choice, resize box, unpadding).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution as hf_select
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches, unpad_image

from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.tables import llava_ov_vision as table
from tpo_jax.config import ConfigError
from tpo_jax.llava_ov import siglip, visual_tokens as vt
from tpo_jax.llava_ov.vision import LlavaOVVision, tiny, with_scan

TOL = 1e-4
CFG = tiny(llm_hidden=40)
S, G = CFG.siglip.image_size, CFG.siglip.grid
IMAGE_SIZES = [(30, 52), (52, 30), (75, 61), (80, 80)]  # crop rows; crop columns; crop + downscale; downscale


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, patch_size=4,
                           image_size=S, num_hidden_layers=2, num_attention_heads=2, vision_use_head=False),
        text_config=dict(model_type="qwen2", hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=128),
        image_token_index=120, video_token_index=121,
        image_grid_pinpoints=[list(p) for p in CFG.anyres.pinpoints])
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert config.vision_aspect_ratio == "anyres_max_9" and config.vision_config.hidden_act == "gelu_pytorch_tanh"
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name or "lm_head" in name:
                continue
            scale_like = ("layer_norm" in name or "layernorm" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen) if scale_like
                    else 0.2 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def state_dict(hf):
    return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


def _load(cfg, sd, **kw):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlavaOVVision(cfg, rngs=nnx.Rngs(0))))
    layouts = siglip.siglip_stack_layouts(cfg.siglip, "vision_tower")
    state, extras = table.load_state_dict(state, sd, layouts=layouts,
                                          post_layernorm=cfg.siglip.post_layernorm, **kw)
    return nnx.merge(graphdef, state), extras


@pytest.fixture(scope="module")
def ours(state_dict):
    return _load(CFG, state_dict)[0]


def _pixels(n, seed):
    return np.random.default_rng(seed).standard_normal((n, S, S, 3), dtype=np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


# ------------------------------------------------------------------------------------------------ tower, projector

def test_tower_features_are_last_layer_before_post_layernorm(hf, ours, state_dict):
    px = _pixels(3, 0)
    with torch.no_grad():
        out = hf.model.vision_tower(_nchw(px), output_hidden_states=True)
    expected, post = out.hidden_states[-1].numpy(), out.last_hidden_state.numpy()
    assert len(out.hidden_states) == CFG.siglip.num_layers + 1
    got = np.asarray(ours.vision_tower(jnp.asarray(px)))
    diff = _max_diff(got, expected)
    print(f"SigLIP hidden_states[-1]: max |diff| = {diff:.3e}")
    assert got.shape == (3, G * G, 32) and diff <= TOL
    assert _max_diff(post, expected) > 0.1  # post_layernorm really changes them: we compare the right tensor
    cfg = tiny(llm_hidden=40, post_layernorm=True)
    with_post, extras = _load(cfg, state_dict)
    assert extras == {}
    diff = _max_diff(with_post.vision_tower(jnp.asarray(px)), post)
    print(f"SigLIP last_hidden_state (post_layernorm=True): max |diff| = {diff:.3e}")
    assert diff <= TOL


def test_scanned_tower_matches(hf, state_dict):
    px = _pixels(2, 1)
    scanned, _ = _load(with_scan(CFG), state_dict)
    assert scanned.vision_tower.layers.fc1.kernel.shape == (2, 32, 48)
    with torch.no_grad():
        expected = hf.model.vision_tower(_nchw(px), output_hidden_states=True).hidden_states[-1].numpy()
    assert _max_diff(scanned.vision_tower(jnp.asarray(px)), expected) <= TOL


def test_projector_matches(hf, ours):
    x = np.random.default_rng(2).standard_normal((2, 7, 32), dtype=np.float32)
    with torch.no_grad():
        expected = hf.model.multi_modal_projector(torch.from_numpy(x)).numpy()
    diff = _max_diff(ours.projector(jnp.asarray(x)), expected)
    print(f"projector: max |diff| = {diff:.3e}")
    assert diff <= TOL


# ------------------------------------------------------------------------------------------------ images

def _anyres_batch(sizes, seed):
    """Random tiles per image: HF pixel_values (B, max patches, C, S, S) and ours (B, 1 + budget, S, S, C)."""
    counts = [image_size_to_num_patches(list(s), [list(p) for p in CFG.anyres.pinpoints], S) for s in sizes]
    ours = np.zeros((len(sizes), 1 + CFG.anyres.tile_budget, S, S, 3), np.float32)
    for i, n in enumerate(counts):
        ours[i, :n] = _pixels(n, seed + i)
    theirs = torch.from_numpy(np.ascontiguousarray(np.moveaxis(ours[:, :max(counts)], -1, -3)))
    return ours, theirs, counts


def test_packed_anyres_images_match_hf(hf, ours):
    tiles, pixel_values, counts = _anyres_batch(IMAGE_SIZES, seed=10)
    with torch.no_grad():
        expected = hf.model.get_image_features(pixel_values, torch.tensor(IMAGE_SIZES)).pooler_output
    plan = vt.stack_plans([vt.image_plan(s, CFG.anyres) for s in IMAGE_SIZES])
    got, valid = jax.jit(lambda m, t, p: m.encode_images(t, p))(ours, jnp.asarray(tiles), plan)
    assert got.shape == (4, CFG.anyres.token_budget, 40)
    for i, size in enumerate(IMAGE_SIZES):
        n = int(plan.length[i])
        assert n == expected[i].shape[0] and int(np.sum(valid[i])) == n
        diff = _max_diff(got[i, :n], expected[i].numpy())
        print(f"image {size} ({counts[i] - 1} tiles, {n} tokens): max |diff| = {diff:.3e}")
        assert diff <= TOL
        assert not np.any(np.asarray(got[i, n:]))


def test_untiled_image_plan_matches_multi_image_path(hf, ours):
    """`batch_num_images > 1`: each image is its base tile only, + one newline."""
    px = _pixels(2, 20)
    sizes = [(30, 52), (52, 30)]
    with torch.no_grad():
        expected = hf.model.get_image_features(_nchw(px), torch.tensor(sizes),
                                               batch_num_images=torch.tensor([2])).pooler_output
    tiles = np.zeros((2, 1 + CFG.anyres.tile_budget, S, S, 3), np.float32)
    tiles[:, 0] = px
    plan = vt.stack_plans([vt.image_plan(s, CFG.anyres, tiled=False) for s in sizes])
    got, _ = ours.encode_images(jnp.asarray(tiles), plan)
    for i in range(2):
        assert expected[i].shape[0] == G * G + 1 == int(plan.length[i])
        assert _max_diff(got[i, :G * G + 1], expected[i].numpy()) <= TOL


# ------------------------------------------------------------------------------------------------ video

def test_video_features_match_hf(hf, ours):
    frames = np.random.default_rng(30).standard_normal((2, 3, S, S, 3), dtype=np.float32)
    with torch.no_grad():
        expected = hf.model.get_video_features(torch.from_numpy(np.moveaxis(frames, -1, -3).copy())).pooler_output
    p = CFG.anyres.pooled_grid
    got, valid = jax.jit(lambda m, f: m.encode_video(f))(ours, jnp.asarray(frames))
    assert got.shape == expected.shape == (2, 3 * p * p + 1, 40) and bool(np.all(valid))
    diff = _max_diff(got, expected.numpy())
    print(f"video (3 frames, 5×5 → {p}×{p} pooled): max |diff| = {diff:.3e}")
    assert diff <= TOL


def test_video_frame_budget(hf, ours):
    """Frames padded to a budget of 4: the valid prefix + newline equal HF on the real frames alone."""
    rng = np.random.default_rng(31)
    frames = np.zeros((2, 4, S, S, 3), np.float32)
    n = [3, 2]
    for b in range(2):
        frames[b, :n[b]] = rng.standard_normal((n[b], S, S, 3), dtype=np.float32)
    got, valid = ours.encode_video(jnp.asarray(frames), jnp.asarray(n))
    pp = CFG.anyres.pooled_grid ** 2
    for b in range(2):
        with torch.no_grad():
            expected = hf.model.get_video_features(
                torch.from_numpy(np.moveaxis(frames[b:b + 1, :n[b]], -1, -3).copy())).pooler_output[0].numpy()
        k = n[b] * pp + 1
        assert int(np.sum(valid[b])) == k and bool(np.all(valid[b, :k]))
        assert _max_diff(got[b, :k], expected) <= TOL
        assert not np.any(np.asarray(got[b, k:]))


# ------------------------------------------------------------------------------------------------ conversion

def test_round_trip_bit_exact_and_complete(state_dict):
    vision = {k: v for k, v in state_dict.items() if table.is_vision_key(k)}
    rest = set(state_dict) - set(vision)
    assert all(k.startswith(("model.language_model.", "lm_head.")) for k in rest)  # coverage: nothing else
    for cfg in (CFG, with_scan(CFG)):
        model, extras = _load(cfg, state_dict)
        assert set(extras) == {"unused/model.vision_tower.post_layernorm.weight",
                               "unused/model.vision_tower.post_layernorm.bias"}
        layouts = siglip.siglip_stack_layouts(cfg.siglip, "vision_tower")
        back = table.export_state_dict(nnx.state(model, nnx.Param), extras, layouts=layouts)
        assert set(back) == set(vision)
        for k, v in vision.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
            assert np.array_equal(back[k].view(np.uint32), v.view(np.uint32)), k


@pytest.mark.parametrize("layout", ["transformers4", "release", "saved5"])
def test_other_key_layouts(state_dict, ours, layout):
    tower, top = table.LAYOUTS[layout]
    renamed = {}
    for k, v in state_dict.items():
        if k.startswith("model.vision_tower."):
            renamed[tower + k[len("model.vision_tower."):]] = v
        elif table.is_vision_key(k):
            renamed[top + k[len("model."):]] = v
    assert table.detect_layout(renamed) == layout
    model, _ = _load(CFG, renamed)
    a = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    b = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)
    assert set(table.export_state_dict(nnx.state(model, nnx.Param), layout=layout, post_layernorm=False,
                                       extras=_load(CFG, renamed)[1])) == set(renamed)


def test_conversion_errors_name_the_key(state_dict):
    missing = {k: v for k, v in state_dict.items() if not k.endswith("layers.1.mlp.fc2.bias")}
    with pytest.raises(ConversionError, match="layers.1.fc2.bias"):
        _load(CFG, missing)
    extra = {**state_dict, "model.vision_tower.head.probe": np.zeros((1, 1, 32), np.float32)}
    with pytest.raises(ConversionError, match="head.probe"):
        _load(CFG, extra)
    with pytest.raises(ConversionError, match="patch-embedding"):
        table.detect_layout(["model.language_model.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------------ host side

def test_host_geometry_matches_transformers():
    rng = np.random.default_rng(40)
    pins = [list(p) for p in vt.AnyresConfig().pinpoints]
    for _ in range(300):
        size = (int(rng.integers(10, 3000)), int(rng.integers(10, 3000)))
        best = vt.select_best_resolution(size, pins)
        assert best == tuple(hf_select(size, pins))
        assert vt.fit_size(size, best) == tuple(get_patch_output_size(np.zeros((*size, 3)), best, "channels_last"))
        rows, cols = best[0] // 384, best[1] // 384
        t, l, h, w = vt.unpadded_window(size, (rows * 27, cols * 27))
        ref = unpad_image(torch.arange(rows * 27 * cols * 27.0).reshape(1, rows * 27, cols * 27), list(size))
        assert ref.shape[1:] == (h, w) and float(ref[0, 0, 0]) == t * cols * 27 + l


def test_tile_image_layout():
    size = (30, 52)
    tiles, n = vt.tile_image(np.ones((*size, 3), np.float32), CFG.anyres, pad_value=-1.0)
    assert n == image_size_to_num_patches(list(size), [list(p) for p in CFG.anyres.pinpoints], S) - 1 == 6
    assert tiles.shape == (1 + CFG.anyres.tile_budget, S, S, 3) and not np.any(tiles[1 + n:])
    np.testing.assert_allclose(tiles[0], 1.0, atol=1e-5)
    canvas = tiles[1:1 + n].reshape(2, 3, S, S, 3).transpose(0, 2, 1, 3, 4).reshape(2 * S, 3 * S, 3)
    nh, nw = vt.fit_size(size, (2 * S, 3 * S))  # (35, 60): 2 padded rows above, 3 below
    top = (2 * S - nh) // 2
    np.testing.assert_allclose(canvas[top:top + nh], 1.0, atol=1e-5)
    assert np.all(canvas[:top] == -1.0) and np.all(canvas[top + nh:] == -1.0)


def test_budgets_and_validation():
    full = vt.AnyresConfig()
    assert (full.grid, full.tile_budget, full.pooled_grid) == (27, 36, 14)
    assert full.token_budget == vt.max_image_tokens(full) == 8829
    assert vt.image_plan((384, 384), full).length == 729 + 27 * 28
    assert math.isclose(vt.bilinear_matrix(27, 14).sum(1).max(), 1.0, rel_tol=1e-6)
    small = vt.AnyresConfig(image_size=20, patch_size=4, pinpoints=((80, 80),), image_tokens=100)
    with pytest.raises(ValueError, match=r"265 tokens.*100 slots \(anyres.image_tokens\)"):
        vt.image_plan((80, 80), small)
    with pytest.raises(ConfigError, match="image_tokens"):
        small.validate()
    with pytest.raises(ConfigError, match="max_tiles"):
        vt.tiny(max_tiles=3)
    with pytest.raises(ConfigError, match="num_heads"):
        siglip.tiny(num_heads=3)
    with pytest.raises(ConfigError, match="pinpoints"):
        vt.tiny(pinpoints=((30, 20),))
    with pytest.raises(ValueError, match=r"\(B, 20, 20, 3\)"):
        LlavaOVVision(CFG, rngs=nnx.Rngs(0)).vision_tower(jnp.zeros((1, 24, 24, 3)))


def test_presets():
    so = siglip.so400m_patch14_384()
    assert (so.hidden_size, so.intermediate_size, so.num_heads, so.num_layers, so.patch_size, so.image_size,
            so.grid, so.norm_eps, so.post_layernorm) == (1152, 4304, 16, 26, 14, 384, 27, 1e-6, False)
    hf_defaults = LlavaOnevisionConfig().vision_config
    assert (hf_defaults.hidden_size, hf_defaults.intermediate_size, hf_defaults.num_attention_heads,
            hf_defaults.num_hidden_layers, hf_defaults.patch_size, hf_defaults.image_size) == \
        (so.hidden_size, so.intermediate_size, so.num_heads, so.num_layers, so.patch_size, so.image_size)
    assert [list(p) for p in vt.AnyresConfig().pinpoints] == LlavaOnevisionConfig().image_grid_pinpoints

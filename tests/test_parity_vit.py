"""Numeric parity of the UMT ViT (`tpo_jax.vit`) with PyTorch, and of its fixed position tables with §1.3.

Blocks are compared with `transformers`' VideoMAELayer (same pre-norm block: LN → MHA with q/v bias and no
k bias → residual → LN → fc1 → exact GELU → fc2 → residual). The full encoder is compared with a PyTorch composition of
Conv3d patch embedding + position table (built with transformers' sinusoid table and `F.interpolate`) + those
layers + LayerNorm(1e-12). Everything runs in float32 with full-precision matmuls (see conftest.py).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import VideoMAEConfig
from transformers.models.videomae.modeling_videomae import VideoMAELayer, get_sinusoid_encoding_table

from tpo_jax.config import StackConfig, ViTConfig, tiny
from tpo_jax.vit import UMTViT, ViTBlock, position_table, sinusoid_table, vit_stack_layouts

from stack_helper import scanned_copy

TOL = 1e-4


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------------------------------------------
# PyTorch reference modules and weight copying
# ------------------------------------------------------------------------------------------------------------------

def _torch_layer(cfg: ViTConfig, seed: int) -> VideoMAELayer:
    hf = VideoMAEConfig(hidden_size=cfg.width, num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
                        qkv_bias=True, layer_norm_eps=cfg.norm_eps, hidden_act="gelu", hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    assert hf.qv_bias
    layer = VideoMAELayer(hf).eval()
    assert layer.attention.attention.key.bias is None  # k bias fixed at zero, as in UMT
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("layernorm") and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))  # non-trivial LN scales
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))  # non-zero biases too
    return layer


def _t2j(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.detach().numpy())


def _copy_layer(layer: VideoMAELayer, block: ViTBlock) -> None:
    """VideoMAELayer → ViTBlock (the same mapping a checkpoint converter does for `blocks.N.*`)."""
    sa, out = layer.attention.attention, layer.attention.output
    qkv_weight = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight], 0)  # (3w, w), rows [q | k | v]
    block.attn.qkv[...] = _t2j(qkv_weight.T)
    block.attn.q_bias[...] = _t2j(sa.query.bias)
    block.attn.v_bias[...] = _t2j(sa.value.bias)
    block.attn.proj.kernel[...] = _t2j(out.dense.weight.T)
    block.attn.proj.bias[...] = _t2j(out.dense.bias)
    for ours, theirs in ((block.norm1, layer.layernorm_before), (block.norm2, layer.layernorm_after)):
        ours.scale[...] = _t2j(theirs.weight)
        ours.bias[...] = _t2j(theirs.bias)
    block.fc1.kernel[...] = _t2j(layer.intermediate.dense.weight.T)
    block.fc1.bias[...] = _t2j(layer.intermediate.dense.bias)
    block.fc2.kernel[...] = _t2j(layer.output.dense.weight.T)
    block.fc2.bias[...] = _t2j(layer.output.dense.bias)


def _torch_positions(cfg: ViTConfig, num_frames: int) -> torch.Tensor:
    """(1, T·tpf, width), computed independently of tpo_jax: HF sinusoid table + F.interpolate(linear)."""
    tpf, width = cfg.tokens_per_frame, cfg.width
    if num_frames == 1:
        return get_sinusoid_encoding_table(tpf, width)
    t_ckpt = cfg.ckpt_num_frames
    base = get_sinusoid_encoding_table(t_ckpt * tpf, width)[0].reshape(t_ckpt, tpf * width)
    interp = F.interpolate(base.T[None], size=num_frames, mode="linear", align_corners=False)[0]  # (tpf·w, T)
    return interp.T.reshape(1, num_frames * tpf, width)


class TorchUMT(torch.nn.Module):
    """PyTorch composition of the UMT encoder: Conv3d patches → + positions → layers → LayerNorm(outer eps)."""

    def __init__(self, cfg: ViTConfig, seed: int):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.patch = torch.nn.Conv3d(cfg.in_chans, cfg.width, kernel_size=(1, p, p), stride=(1, p, p))
        self.layers = torch.nn.ModuleList([_torch_layer(cfg, seed + i) for i in range(cfg.depth)])
        self.norm = torch.nn.LayerNorm(cfg.width, eps=cfg.outer_norm_eps)
        gen = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for prm in (self.patch.weight, self.patch.bias, self.norm.bias):
                prm.copy_(0.2 * torch.randn(prm.shape, generator=gen))
            self.norm.weight.copy_(1.0 + 0.2 * torch.randn(self.norm.weight.shape, generator=gen))
        self.eval()

    def forward(self, frames_bthwc: torch.Tensor) -> torch.Tensor:
        x = frames_bthwc.permute(0, 4, 1, 2, 3)  # (B, C, T, H, W), the reference's layout
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, T·g·g, width), n = tpf·t + g·h + w
        x = x + _torch_positions(self.cfg, frames_bthwc.shape[1])
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def copy_into(self, model: UMTViT) -> None:
        # Conv3d weight (O, I, T, kh, kw) → Flax conv layout (T, kh, kw, I, O) (MODEL-SPEC §9.3).
        model.patch_embed.kernel[...] = _t2j(self.patch.weight.permute(2, 3, 4, 1, 0))
        model.patch_embed.bias[...] = _t2j(self.patch.bias)
        for layer, block in zip(self.layers, model.blocks):
            _copy_layer(layer, block)
        model.outer_norm.scale[...] = _t2j(self.norm.weight)
        model.outer_norm.bias[...] = _t2j(self.norm.bias)


@pytest.fixture(scope="module")
def cfg() -> ViTConfig:
    return tiny().vit  # img 32, patch 8 (16 tokens/frame), 4 frames from 2 ckpt frames, width 32, 2 heads, 2 blocks


@pytest.fixture(scope="module")
def models(cfg):
    torch.manual_seed(0)
    ref = TorchUMT(cfg, seed=0)
    model = UMTViT(cfg, rngs=nnx.Rngs(0))
    ref.copy_into(model)
    return ref, model


def _frames(cfg: ViTConfig, t: int, seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, t, cfg.img_size, cfg.img_size, cfg.in_chans),
                                                       dtype=np.float32)


# ------------------------------------------------------------------------------------------------------------------
# 1. Blocks and the full stack vs PyTorch
# ------------------------------------------------------------------------------------------------------------------

def test_each_block_matches_videomae_layer(cfg, models):
    ref, model = models
    assert len(model.blocks) == cfg.depth == 2
    x = np.random.default_rng(1).standard_normal((2, cfg.num_frames * cfg.tokens_per_frame, cfg.width),
                                                 dtype=np.float32)
    for i, (layer, block) in enumerate(zip(ref.layers, model.blocks)):
        with torch.no_grad():
            expected = layer(torch.from_numpy(x)).numpy()
        got = np.asarray(block(jnp.asarray(x)))
        diff = _max_diff(got, expected)
        print(f"block {i}: max |diff| = {diff:.3e}")
        assert diff <= TOL, f"block {i}: max |diff| {diff}"


def test_full_video_stack_matches_torch(cfg, models):
    ref, model = models
    frames = _frames(cfg, cfg.num_frames, seed=2)
    with torch.no_grad():
        expected = ref(torch.from_numpy(frames)).numpy()
    got = np.asarray(model(jnp.asarray(frames)))
    assert got.shape == (2, cfg.num_frames * cfg.tokens_per_frame, cfg.width)
    diff = _max_diff(got, expected)
    print(f"video stack: max |diff| = {diff:.3e}")
    assert diff <= TOL


def test_scanned_stack_matches_torch(cfg, models):
    """The same weights stacked on a `layers` axis and run under lax.scan (vit.stack.scan_layers)."""
    ref, model = models
    scfg = dataclasses.replace(cfg, stack=StackConfig(scan_layers=True))
    scanned = scanned_copy(model, lambda: UMTViT(scfg, rngs=nnx.Rngs(1)), vit_stack_layouts(scfg, ""))
    frames = _frames(cfg, cfg.num_frames, seed=2)
    with torch.no_grad():
        expected = ref(torch.from_numpy(frames)).numpy()
    assert _max_diff(np.asarray(scanned(jnp.asarray(frames))), expected) <= TOL


def test_patch_embed_token_order(cfg, models):
    """Token n = tpf·t + grid·h + w equals the Conv3d output at (t, h, w)."""
    ref, model = models
    frames = _frames(cfg, cfg.num_frames, seed=3, batch=1)
    with torch.no_grad():
        conv = ref.patch(torch.from_numpy(frames).permute(0, 4, 1, 2, 3))[0].numpy()  # (width, T, g, g)
    got = np.asarray(model.patch_embed(jnp.asarray(frames)))[0]
    g = cfg.grid
    for t, h, w in [(0, 0, 0), (1, 2, 3), (cfg.num_frames - 1, g - 1, 0)]:
        n = cfg.tokens_per_frame * t + g * h + w
        assert _max_diff(got[n], conv[:, t, h, w]) <= TOL


# ------------------------------------------------------------------------------------------------------------------
# 2. Position tables (NumPy, real shapes)
# ------------------------------------------------------------------------------------------------------------------

REAL = ViTConfig()  # 224 px / 16 → 196 tokens per frame, width 1024, 16 frames from 4 checkpoint frames


def _formula_table(n_position: int, dim: int) -> np.ndarray:
    table = np.zeros((n_position, dim), np.float64)
    for j in range(dim):
        theta = np.arange(n_position) / 10000.0 ** (2 * (j // 2) / dim)
        table[:, j] = np.sin(theta) if j % 2 == 0 else np.cos(theta)
    return table.astype(np.float32)


def _formula_video_table(t_ckpt: int, t_out: int, tpf: int, dim: int) -> np.ndarray:
    base = _formula_table(t_ckpt * tpf, dim).astype(np.float64).reshape(t_ckpt, tpf, dim)
    out = np.zeros((t_out, tpf, dim), np.float64)
    for i in range(t_out):
        s = max(0.0, (i + 0.5) * (t_ckpt / t_out) - 0.5)
        t0 = int(np.floor(s))
        t1 = min(t0 + 1, t_ckpt - 1)
        lam = s - t0
        out[i] = (1.0 - lam) * base[t0] + lam * base[t1]
    return out.reshape(1, t_out * tpf, dim)


def test_sinusoid_table_matches_formula_and_hf():
    ours = sinusoid_table(REAL.tokens_per_frame, REAL.width)
    assert ours.dtype == np.float32 and ours.shape == (196, 1024)
    assert _max_diff(ours, _formula_table(196, 1024)) <= 1e-6
    assert _max_diff(ours, get_sinusoid_encoding_table(196, 1024)[0].numpy()) <= 1e-6


def test_video_position_table_matches_formula():
    tpf, dim = REAL.tokens_per_frame, REAL.width
    table = position_table(REAL, REAL.num_frames)
    assert table.shape == (1, 16 * 196, 1024) and table.dtype == np.float32
    diff = _max_diff(table, _formula_video_table(4, 16, tpf, dim))
    print(f"video position table vs formula: max |diff| = {diff:.3e}")
    assert diff <= 1e-6
    assert _max_diff(table, _torch_positions(REAL, REAL.num_frames).numpy()) <= 1e-6  # F.interpolate

    frames = table.reshape(16, tpf, dim).astype(np.float64)
    base = sinusoid_table(4 * tpf, dim).reshape(4, tpf, dim).astype(np.float64)
    for i in (0, 1):
        assert _max_diff(frames[i], base[0]) <= 1e-6
    for i in (14, 15):
        assert _max_diff(frames[i], base[3]) <= 1e-6
    assert _max_diff(frames[2], 0.875 * base[0] + 0.125 * base[1]) <= 1e-6
    # Interior λ pattern .125/.375/.625/.875 between consecutive checkpoint frames.
    assert _max_diff(frames[9], 0.125 * base[1] + 0.875 * base[2]) <= 1e-6
    assert _max_diff(frames[10], 0.875 * base[2] + 0.125 * base[3]) <= 1e-6


def test_image_position_table_is_plain_table_and_video_frame0():
    tpf, dim = REAL.tokens_per_frame, REAL.width
    image = position_table(REAL, 1)
    assert image.shape == (1, tpf, dim)
    assert np.array_equal(image[0], sinusoid_table(tpf, dim))
    video = position_table(REAL, REAL.num_frames)
    assert _max_diff(video[0, :tpf], image[0]) <= 1e-6


def test_position_table_rejects_other_frame_counts():
    with pytest.raises(ValueError, match=r"8 frames.*16 frames.*1 frame"):
        position_table(REAL, 8)


def test_position_table_is_cached_and_read_only():
    a = position_table(REAL, REAL.num_frames)
    assert a is position_table(REAL, REAL.num_frames)
    with pytest.raises(ValueError):
        a[0, 0, 0] = 1.0


def test_tubelet_positions_count_tubelets():
    cfg = dataclasses.replace(REAL, img_size=32, width=16, tubelet_size=2, num_frames=8, ckpt_num_frames=4)
    table = position_table(cfg, 8)
    assert table.shape == (1, 4 * cfg.tokens_per_frame, 16)  # 4 tubelets, interpolated from 2 ckpt tubelets
    assert _max_diff(table, _formula_video_table(2, 4, cfg.tokens_per_frame, 16)) <= 1e-6
    with pytest.raises(ValueError, match="tubelet_size 2"):
        position_table(cfg, 1)


# ------------------------------------------------------------------------------------------------------------------
# 3. Image path
# ------------------------------------------------------------------------------------------------------------------

def test_image_path_matches_torch(cfg, models):
    ref, model = models
    frames = _frames(cfg, 1, seed=4)
    with torch.no_grad():
        expected = ref(torch.from_numpy(frames)).numpy()
    got = np.asarray(model(jnp.asarray(frames)))
    assert got.shape == (2, cfg.tokens_per_frame, cfg.width)
    diff = _max_diff(got, expected)
    print(f"image stack: max |diff| = {diff:.3e}")
    assert diff <= TOL


# ------------------------------------------------------------------------------------------------------------------
# 4. Input validation
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, pattern", [
    ((2, 4, 16, 32, 3), r"\(B, T, 32, 32, 3\).*got \(2, 4, 16, 32, 3\)"),
    ((2, 4, 32, 32, 1), r"channels last.*got \(2, 4, 32, 32, 1\)"),
    ((2, 3, 32, 32, 3), r"T = 4 or 1.*got T = 3"),
    ((4, 32, 32, 3), r"got \(4, 32, 32, 3\)"),
])
def test_bad_input_shape_raises(cfg, models, shape, pattern):
    _, model = models
    with pytest.raises(ValueError, match=pattern):
        model(jnp.zeros(shape, jnp.float32))

"""SAM2 memory path (tpo_jax.sam2.{memory_encoder, memory_attention, rope, pointers}) against upstream SAM2.

Reference: the upstream `sam2` package (facebookresearch/sam2, pip `sam2==1.1.0`; its MemoryEncoder,
MemoryAttention, RoPEAttention and MLP are the v1 modules, and the v1 settings come from
`configs/sam2/sam2_hiera_l.yaml`). The SAM2Base-owned parameters (maskmem_tpos_enc, no_mem_*, no_obj_ptr,
obj_ptr_proj, mask_downsample) sit in a torch module with the same state-dict names, and their formulas are
written here from `SAM2Base._forward_sam_heads` / `_prepare_memory_conditioned_features`. Weights go through
our conversion table (checkpoints/tables/sam2_memory.py). f32, tiny random configs, tolerance 1e-4.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from tpo_jax.checkpoints.convert import abstract_params, param_shapes
from tpo_jax.checkpoints.mapping import Meta, build_export_plan, build_plan
from tpo_jax.checkpoints.tables.sam2_memory import is_memory_key, memory_path
from tpo_jax.checkpoints.tables.sam2_memory import memory_attention as memory_attention_rules
from tpo_jax.checkpoints.tables.sam2_memory import memory_encoder as memory_encoder_rules
from tpo_jax.sam2.memory_attention import MemoryAttention
from tpo_jax.sam2.memory_config import (MemoryAttentionConfig, MemoryEncoderConfig, MemoryTokensConfig,
                                        Sam2MemoryConfig)
from tpo_jax.sam2.memory_encoder import MemoryEncoder, encode_new_memory
from tpo_jax.sam2.pointers import MemoryTokens
from tpo_jax.sam2.rope import axial_positions

try:  # upstream SAM2: `pip download sam2==1.1.0 --no-deps`, install with SAM2_BUILD_CUDA=0 (+ hydra-core, iopath)
    from sam2.modeling import position_encoding as up_pe
    from sam2.modeling.memory_attention import MemoryAttention as UpMemoryAttention, MemoryAttentionLayer
    from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder as UpMemoryEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine
    from sam2.modeling.sam.transformer import RoPEAttention as UpRoPEAttention
    from sam2.modeling.sam2_utils import MLP as UpMLP
    HAVE_UPSTREAM = True
except ImportError:
    HAVE_UPSTREAM = False
needs_upstream = pytest.mark.skipif(not HAVE_UPSTREAM, reason="upstream SAM2 (pip sam2) not installed; the "
                                    "transformers Sam2Video cross-checks below still run")

TOL = 1e-4
# the release index shipped with the package (a copy of the released checkpoint's key names)
INDEX = Path(__file__).resolve().parents[1] / "tpo_jax/assets/videochat_tpo/model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------- both sides

class MemoryPath(nnx.Module):
    """Our three memory modules under the names the table maps to."""

    def __init__(self, cfg: Sam2MemoryConfig, rngs: nnx.Rngs | None):
        self.memory_encoder = MemoryEncoder(cfg.encoder, rngs=rngs)
        self.memory_attention = MemoryAttention(cfg.attention, rngs=rngs)
        self.memory_tokens = MemoryTokens(cfg.tokens, rngs=rngs)


class TorchMemoryPath(nn.Module):
    """Upstream modules built as `sam2_hiera_l.yaml` builds them (sizes from `cfg`), plus the SAM2Base
    parameters of the memory path, with the upstream state-dict names."""

    def __init__(self, cfg: Sam2MemoryConfig, grid_wh: tuple[int, int]):
        super().__init__()
        e, a, t = cfg.encoder, cfg.attention, cfg.tokens
        self.memory_encoder = UpMemoryEncoder(
            out_dim=e.out_dim, in_dim=e.in_dim,
            mask_downsampler=MaskDownSampler(embed_dim=e.in_dim, kernel_size=e.mask_kernel, stride=e.mask_stride,
                                             padding=e.mask_padding, total_stride=e.mask_total_stride),
            fuser=Fuser(CXBlock(e.in_dim, kernel_size=e.fuser_kernel, padding=e.fuser_kernel // 2,
                                layer_scale_init_value=e.layer_scale_init, use_dwconv=True), e.fuser_layers),
            position_encoding=PositionEmbeddingSine(num_pos_feats=e.out_dim, normalize=True, scale=None,
                                                    temperature=int(e.pos_temperature)))
        rope = dict(rope_theta=a.rope_theta, feat_sizes=list(grid_wh), embedding_dim=a.d_model,
                    num_heads=a.num_heads, downsample_rate=a.downsample_rate, dropout=a.dropout)
        layer = MemoryAttentionLayer(
            activation="relu", dim_feedforward=a.ffn_dim, dropout=a.dropout, pos_enc_at_attn=False,
            self_attention=UpRoPEAttention(**rope), d_model=a.d_model, pos_enc_at_cross_attn_keys=True,
            pos_enc_at_cross_attn_queries=False,
            cross_attention=UpRoPEAttention(rope_k_repeat=True, kv_in_dim=a.kv_dim, **rope))
        self.memory_attention = UpMemoryAttention(d_model=a.d_model, pos_enc_at_input=True, layer=layer,
                                                  num_layers=a.num_layers)
        c, m = t.hidden_dim, t.mem_dim
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(t.num_maskmem, 1, 1, m))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, c))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, c))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, c))
        self.obj_ptr_proj = UpMLP(c, c, c, t.obj_ptr_mlp_layers)
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)


def _randomize(module: nn.Module, seed: int) -> None:
    """Random values everywhere (also LayerNorm weights and the 1e-6 layer scales, so every path counts)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            fan = p.shape[1] * int(np.prod(p.shape[2:])) if p.ndim >= 2 else 4
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan))
    module.eval()


def _state_dict(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def convert(sd: dict[str, np.ndarray], model: nnx.Module, rules) -> dict[str, np.ndarray]:
    """Torch state dict -> our params through the table (plan checked against the model's shapes); loads them."""
    target = param_shapes(nnx.state(model, nnx.Param))
    plan = build_plan({k: Meta(v.shape, v.dtype, "torch") for k, v in sd.items()}, rules, target, where="torch")
    out = {}
    for job in plan.params:
        for path, arr in zip(job.dst, job.rule.op.forward([sd[k] for k in job.src])):
            out[path] = np.asarray(arr)
    assert set(out) == set(target)
    state = nnx.state(model, nnx.Param)
    flat = [(p, v.replace(jnp.asarray(out[".".join(map(str, p))]))) for p, v in nnx.to_flat_state(state)]
    nnx.update(model, nnx.from_flat_state(flat))
    return out


def export(ours: dict[str, np.ndarray], rules) -> dict[str, np.ndarray]:
    plan = build_export_plan({k: v.shape for k, v in ours.items()}, {}, rules, where="ours")
    out = {}
    for job in plan.params:
        for key, arr in zip(job.src, job.rule.op.inverse([ours[p] for p in job.dst])):
            out[key] = np.asarray(arr)
    return out


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32)))


def _nchw(x) -> torch.Tensor:
    return _t(np.asarray(x)).permute(0, 3, 1, 2)


def _max_diff(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))


@pytest.fixture(scope="module")
def tiny():
    """(cfg, torch reference, our model) for a 4×6 grid (H 4, W 6), weights through the converter."""
    cfg = Sam2MemoryConfig.tiny()
    ref = TorchMemoryPath(cfg, grid_wh=(6, 4))
    _randomize(ref, 0)
    ours = MemoryPath(cfg, nnx.Rngs(0))
    convert(_state_dict(ref), ours, memory_path(cfg.encoder.mask_layers))
    return cfg, ref, ours


# ------------------------------------------------------------------------------------------ memory encoder

@needs_upstream
def test_memory_encoder_matches_upstream(tiny):
    cfg, ref, ours = tiny
    rng = np.random.default_rng(1)
    b, h, w, s = 2, 4, 6, cfg.encoder.mask_total_stride
    pix = rng.normal(size=(b, h, w, cfg.encoder.in_dim)).astype(np.float32)
    logits = (4 * rng.normal(size=(b, s * h, s * w, 1))).astype(np.float32)
    binarize = np.array([True, False])
    # SAM2Base._encode_new_memory at eval: (logits > 0) for a mask from points, else sigmoid; ·20 − 10
    lt = _nchw(logits)
    probs = torch.where(torch.from_numpy(binarize)[:, None, None, None], (lt > 0).float(), torch.sigmoid(lt))
    with torch.no_grad():
        out = ref.memory_encoder(_nchw(pix), probs * 20.0 - 10.0, skip_mask_sigmoid=True)
    feats, pos = encode_new_memory(ours.memory_encoder, jnp.asarray(pix), jnp.asarray(logits), binarize)
    ref_feats = out["vision_features"].permute(0, 2, 3, 1).numpy()
    ref_pos = out["vision_pos_enc"][0].permute(0, 2, 3, 1).numpy()
    assert feats.shape == ref_feats.shape == (b, h, w, cfg.encoder.out_dim)
    assert _max_diff(feats, ref_feats) < TOL, _max_diff(feats, ref_feats)
    assert _max_diff(pos, ref_pos) < 1e-5
    # the plain encoder call with the sigmoid inside (skip_mask_sigmoid=False) as well
    with torch.no_grad():
        out2 = ref.memory_encoder(_nchw(pix), lt)["vision_features"].permute(0, 2, 3, 1).numpy()
    feats2, _ = ours.memory_encoder(jnp.asarray(pix), jnp.asarray(logits), skip_mask_sigmoid=False)
    assert _max_diff(feats2, out2) < TOL


# ---------------------------------------------------------------------------------------- memory attention

def _bank(cfg, rng, b, h, w, n_frames, n_ptrs):
    m, c = cfg.tokens.mem_dim, cfg.tokens.hidden_dim
    feats = rng.normal(size=(b, n_frames, h, w, m)).astype(np.float32)
    pos = rng.normal(size=(b, n_frames, h, w, m)).astype(np.float32)
    ptrs = rng.normal(size=(b, n_ptrs, c)).astype(np.float32)
    return feats, pos, ptrs


def _reference_attention(ref, cfg, curr, curr_pos, feats, pos, t_pos, ptrs):
    """Upstream `_prepare_memory_conditioned_features` step 2 for ONE example (batch 1): the bank of the given
    frames and pointers (no padding), then MemoryAttention. Returns (H, W, C)."""
    h, w, c = curr.shape
    m, n = cfg.tokens.mem_dim, cfg.tokens.num_maskmem
    mem, mem_pos = [], []
    for f in range(feats.shape[0]):
        mem.append(_t(feats[f]).reshape(h * w, 1, m))
        tpos = ref.maskmem_tpos_enc[n - t_pos[f] - 1]  # (1, 1, M)
        mem_pos.append(_t(pos[f]).reshape(h * w, 1, m) + tpos)
    n_ptr_tokens = 0
    if len(ptrs):
        p = _t(ptrs)[:, None, :]  # (P, B=1, C)
        p = p.reshape(-1, 1, c // m, m).permute(0, 2, 1, 3).flatten(0, 1)
        mem.append(p)
        mem_pos.append(torch.zeros_like(p))
        n_ptr_tokens = p.shape[0]
    with torch.no_grad():
        out = ref.memory_attention(curr=[_t(curr).reshape(h * w, 1, c)], curr_pos=[_t(curr_pos).reshape(h * w, 1, c)],
                                   memory=torch.cat(mem), memory_pos=torch.cat(mem_pos),
                                   num_obj_ptr_tokens=n_ptr_tokens)
    return out.reshape(h, w, c).numpy()


@needs_upstream
def test_memory_attention_matches_upstream_unpadded(tiny):
    """A full bank (every slot valid, no mask) against upstream on the same tokens."""
    cfg, ref, ours = tiny
    rng = np.random.default_rng(2)
    h, w, c = 4, 6, cfg.attention.d_model
    curr = rng.normal(size=(1, h, w, c)).astype(np.float32)
    curr_pos = rng.normal(size=(1, h, w, c)).astype(np.float32)
    feats, pos, ptrs = _bank(cfg, rng, 1, h, w, 2, 3)
    t_pos = np.array([0, 2])
    mem, mem_pos, valid, n_excl = ours.memory_tokens.memory_bank(
        jnp.asarray(feats), jnp.asarray(pos), jnp.asarray(t_pos)[None], jnp.ones((1, 2), bool), jnp.asarray(ptrs),
        jnp.ones((1, 3), bool))
    got = ours.memory_attention(jnp.asarray(curr), jnp.asarray(curr_pos), mem, mem_pos, num_k_exclude_rope=n_excl)
    want = _reference_attention(ref, cfg, curr[0], curr_pos[0], feats[0], pos[0], t_pos, ptrs[0])
    assert _max_diff(got[0], want) < TOL, _max_diff(got[0], want)
    # the same bank with an all-true validity mask gives the same result
    got_masked = ours.memory_attention(jnp.asarray(curr), jnp.asarray(curr_pos), mem, mem_pos,
                                       memory_valid=valid, num_k_exclude_rope=n_excl)
    assert _max_diff(got_masked, got) < 1e-6


@needs_upstream
def test_padded_bank_equals_upstream_on_valid_slots(tiny):
    """Fixed-size bank (3 frame slots, 4 pointer slots) with garbage in the invalid slots, per example a
    different subset valid: equals upstream run on only the valid frames/pointers."""
    cfg, ref, ours = tiny
    rng = np.random.default_rng(3)
    b, h, w, c = 2, 4, 6, cfg.attention.d_model
    curr = rng.normal(size=(b, h, w, c)).astype(np.float32)
    curr_pos = rng.normal(size=(b, h, w, c)).astype(np.float32)
    feats, pos, ptrs = _bank(cfg, rng, b, h, w, 3, 4)
    feats *= 1 + 99 * rng.random(size=(b, 3, 1, 1, 1)).astype(np.float32)  # garbage scale in some slots
    t_pos = np.array([[0, 1, 2], [0, 2, 1]])
    frame_valid = np.array([[True, False, True], [True, True, True]])
    ptr_valid = np.array([[True, False, True, False], [False, False, False, True]])
    graphdef, state = nnx.split(ours.memory_attention)  # used functionally: a pure jitted function of the state
    attend = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a[:4], memory_valid=a[4],
                                                            num_k_exclude_rope=4 * cfg.tokens.tokens_per_ptr))
    mem, mem_pos, valid, n_excl = ours.memory_tokens.memory_bank(
        jnp.asarray(feats), jnp.asarray(pos), jnp.asarray(t_pos), jnp.asarray(frame_valid), jnp.asarray(ptrs),
        jnp.asarray(ptr_valid))
    assert n_excl == 4 * cfg.tokens.tokens_per_ptr
    got = np.asarray(attend(state, jnp.asarray(curr), jnp.asarray(curr_pos), mem, mem_pos, valid))
    for i in range(b):
        fv, pv = frame_valid[i], ptr_valid[i]
        want = _reference_attention(ref, cfg, curr[i], curr_pos[i], feats[i][fv], pos[i][fv], t_pos[i][fv],
                                    ptrs[i][pv])
        assert _max_diff(got[i], want) < TOL, (i, _max_diff(got[i], want))


@needs_upstream
def test_invalid_slots_do_not_matter_even_nan(tiny):
    """Whatever the invalid slots hold (NaN, inf, huge), the output is bit-identical to zeros there."""
    cfg, _, ours = tiny
    rng = np.random.default_rng(8)
    h, w, c = 4, 6, cfg.attention.d_model
    curr = jnp.asarray(rng.normal(size=(1, h, w, c)).astype(np.float32))
    feats, pos, ptrs = _bank(cfg, rng, 1, h, w, 2, 2)
    frame_valid, ptr_valid = np.array([[True, False]]), np.array([[False, True]])
    outs = []
    for fill in (0.0, np.nan, np.inf, 1e30):
        f, p, q = feats.copy(), pos.copy(), ptrs.copy()
        f[0, 1], p[0, 1], q[0, 0] = fill, fill, fill
        mem, mem_pos, valid, n = ours.memory_tokens.memory_bank(
            jnp.asarray(f), jnp.asarray(p), jnp.zeros((1, 2), jnp.int32), jnp.asarray(frame_valid), jnp.asarray(q),
            jnp.asarray(ptr_valid))
        outs.append(np.asarray(ours.memory_attention(curr, curr, mem, mem_pos, memory_valid=valid,
                                                     num_k_exclude_rope=n)))
    assert np.isfinite(outs[0]).all()
    for o in outs[1:]:
        assert o.tobytes() == outs[0].tobytes()


@needs_upstream
def test_memory_attention_rejects_bank_not_whole_frames(tiny):
    cfg, _, ours = tiny
    x = jnp.zeros((1, 4, 6, cfg.attention.d_model))
    mem = jnp.zeros((1, 25, cfg.attention.kv_dim))
    with pytest.raises(ValueError, match="whole number"):
        ours.memory_attention(x, x, mem, mem, num_k_exclude_rope=0)


# --------------------------------------------------------------------------------- object pointers, tokens

@needs_upstream
def test_object_pointer_and_tokens_match_upstream_formulas(tiny):
    cfg, ref, ours = tiny
    rng = np.random.default_rng(4)
    tok = rng.normal(size=(4, cfg.tokens.hidden_dim)).astype(np.float32)
    scores = np.array([[3.0], [-2.0], [0.0], [0.5]], np.float32)
    with torch.no_grad():  # SAM2Base._forward_sam_heads, pred_obj_scores + fixed_no_obj_ptr, not soft
        ptr = ref.obj_ptr_proj(_t(tok))
        lam = (_t(scores) > 0).float()
        want = lam * ptr + (1 - lam) * ref.no_obj_ptr
    got = ours.memory_tokens.object_pointer(jnp.asarray(tok), jnp.asarray(scores))
    assert _max_diff(got, want.numpy()) < TOL
    assert _max_diff(got[1], ref.no_obj_ptr[0].detach().numpy()) == 0.0  # no object: exactly no_obj_ptr
    # temporal encoding of memory frame t_pos: maskmem_tpos_enc[num_maskmem - t_pos - 1]
    n = cfg.tokens.num_maskmem
    for t_pos in range(n):
        assert _max_diff(ours.memory_tokens.temporal_encoding(jnp.asarray(t_pos)),
                         ref.maskmem_tpos_enc[n - t_pos - 1, 0, 0].detach().numpy()) == 0.0
    # initial conditioning frame: features + no_mem_embed (directly_add_no_mem_embed)
    feat = rng.normal(size=(1, 4, 6, cfg.tokens.hidden_dim)).astype(np.float32)
    assert _max_diff(ours.memory_tokens.no_memory(jnp.asarray(feat)),
                     feat + ref.no_mem_embed.detach().numpy()[0]) < 1e-6
    # mask input -> mask prompt (Conv2d k4 s4)
    mask = (rng.random(size=(2, 16, 24, 1)) > 0.5).astype(np.float32)
    with torch.no_grad():
        want = ref.mask_downsample(_nchw(mask)).permute(0, 2, 3, 1).numpy()
    assert _max_diff(ours.memory_tokens.downsample_mask_input(jnp.asarray(mask)), want) < TOL


# ----------------------------------------------------------------------------------------------- RoPE grid

def test_bf16_rope_grid_reproduces_the_release_cells():
    """MODEL-SPEC §7.4: arange(1024) in bf16 on the 32×32 grid -> 512 cells at a wrong (x, y)."""
    x32, y32 = axial_positions(32, 32, "float32")
    xb, yb = axial_positions(32, 32, "bfloat16")
    n = np.arange(1024)
    assert np.array_equal(x32, n % 32) and np.array_equal(y32, n // 32)
    wrong = (xb != x32) | (yb != y32)
    assert int(wrong.sum()) == 512
    assert not wrong[:257].any()  # every index up to 256 is exact in bf16
    assert (xb[257], yb[257]) == (0, 8) and (x32[257], y32[257]) == (1, 8)
    assert (xb[1023], yb[1023]) == (0, 32)
    # the same cells as TPO's torch code: t = arange(1024, bf16); t % 32, floor(t / 32)
    t = torch.arange(1024, dtype=torch.bfloat16)
    assert np.array_equal(xb, (t % 32).float().numpy())
    assert np.array_equal(yb, torch.div(t, 32, rounding_mode="floor").float().numpy())
    assert np.array_equal(xb, np.mod(n.astype(ml_dtypes.bfloat16).astype(np.float32), 32))


@needs_upstream
def test_bf16_rope_option_matches_patched_upstream(monkeypatch):
    """Memory attention with rope_grid_dtype='bfloat16' on a 32×32 grid equals upstream with `init_t_xy`
    building its flat index in bf16 (the release's copy); the default f32 grid differs from it."""
    cfg = Sam2MemoryConfig.tiny(num_layers=1)

    def init_t_xy_bf16(end_x, end_y):
        t = torch.arange(end_x * end_y, dtype=torch.bfloat16)
        return (t % end_x).float(), torch.div(t, end_x, rounding_mode="floor").float()

    monkeypatch.setattr(up_pe, "init_t_xy", init_t_xy_bf16)
    ref = TorchMemoryPath(cfg, grid_wh=(32, 32))  # RoPE tables are built at construction, now in bf16
    _randomize(ref, 5)
    rules = memory_path(cfg.encoder.mask_layers)
    ours_bf16 = MemoryPath(Sam2MemoryConfig.tiny(num_layers=1, rope_grid_dtype="bfloat16"), nnx.Rngs(0))
    ours_f32 = MemoryPath(cfg, nnx.Rngs(0))
    convert(_state_dict(ref), ours_bf16, rules)
    convert(_state_dict(ref), ours_f32, rules)
    rng = np.random.default_rng(6)
    h = w = 32
    c = cfg.attention.d_model
    curr = rng.normal(size=(1, h, w, c)).astype(np.float32)
    curr_pos = rng.normal(size=(1, h, w, c)).astype(np.float32)
    feats, pos, ptrs = _bank(cfg, rng, 1, h, w, 1, 1)
    want = _reference_attention(ref, cfg, curr[0], curr_pos[0], feats[0], pos[0], np.array([0]), ptrs[0])
    outs = []
    for model in (ours_bf16, ours_f32):
        mem, mem_pos, _, n_excl = model.memory_tokens.memory_bank(
            jnp.asarray(feats), jnp.asarray(pos), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool),
            jnp.asarray(ptrs), jnp.ones((1, 1), bool))
        outs.append(np.asarray(model.memory_attention(jnp.asarray(curr), jnp.asarray(curr_pos), mem, mem_pos,
                                                      num_k_exclude_rope=n_excl))[0])
    assert _max_diff(outs[0], want) < TOL, _max_diff(outs[0], want)
    assert _max_diff(outs[1], want) > 1e-3  # the upstream f32 grid is a different function


# ------------------------------------------------------------------------------ release keys and shapes

def _release_memory_keys() -> list[str]:
    names = json.loads(INDEX.read_text())["weight_map"]
    return sorted(k[len("sam."):] for k in names if k.startswith("sam.") and is_memory_key(k[len("sam."):]))


# MODEL-SPEC §9.2 shapes of the release (PyTorch layout)
SPEC_SHAPES = {"maskmem_tpos_enc": (7, 1, 1, 64), "no_mem_embed": (1, 1, 256), "no_mem_pos_enc": (1, 1, 256),
               "no_obj_ptr": (1, 256), "mask_downsample.weight": (1, 1, 4, 4), "mask_downsample.bias": (1,),
               "memory_encoder.fuser.layers.0.dwconv.weight": (256, 1, 7, 7),
               "memory_attention.layers.0.cross_attn_image.k_proj.weight": (256, 64),
               "memory_attention.layers.3.linear1.weight": (2048, 256),
               "memory_encoder.mask_downsampler.encoder.9.weight": (256, 64, 3, 3),
               "memory_encoder.mask_downsampler.encoder.12.weight": (256, 256, 1, 1),
               "memory_encoder.out_proj.weight": (64, 256, 1, 1), "obj_ptr_proj.layers.2.weight": (256, 256)}


def test_release_keys_map_with_hiera_l_shapes_and_round_trip_bit_exact():
    """Every memory-path key of the release <-> our release-size modules (built shape-only): the export plan of
    our parameters names exactly the release's 158 keys; the plan from those keys fits every parameter; a
    random state dict goes torch -> ours -> torch bit-exactly."""
    cfg = Sam2MemoryConfig.release()
    keys = _release_memory_keys()
    assert len(keys) == 158
    target = param_shapes(abstract_params(lambda: MemoryPath(cfg, None)))
    rules = memory_path(cfg.encoder.mask_layers)
    exported = build_export_plan(target, {}, rules, where="ours")
    shapes = {k: s for job in exported.params for k, s in zip(job.src, job.src_shapes)}
    assert sorted(shapes) == keys  # our parameters name the release's keys, one for one
    for k, s in SPEC_SHAPES.items():
        assert shapes[k] == s, k
    if HAVE_UPSTREAM:  # and upstream's modules built with the sam2_hiera_l.yaml values have the same shapes
        up = {k: tuple(v.shape) for k, v in TorchMemoryPath(cfg, grid_wh=(64, 64)).state_dict().items()}
        assert up == shapes
    plan = build_plan({f"sam.{k}": Meta(s, np.dtype(np.float32), "index") for k, s in shapes.items()},
                      memory_path(cfg.encoder.mask_layers, src="sam.", dst="sam2."),
                      {f"sam2.{p}": s for p, s in target.items()}, where="release")
    assert plan.summary()["mapped_keys"] == 158 and not plan.extras and not plan.dropped
    g = np.random.default_rng(7)
    sd = {k: g.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    plan = build_plan({k: Meta(v.shape, v.dtype, "torch") for k, v in sd.items()}, rules, target, where="torch")
    ours = {}
    for job in plan.params:
        for p, arr in zip(job.dst, job.rule.op.forward([sd[k] for k in job.src])):
            assert tuple(arr.shape) == target[p]
            ours[p] = np.ascontiguousarray(arr)
    assert set(ours) == set(target)
    back = export(ours, rules)
    assert sorted(back) == keys
    for k in keys:
        assert back[k].shape == sd[k].shape and back[k].dtype == sd[k].dtype, k
        assert back[k].tobytes() == np.ascontiguousarray(sd[k]).tobytes(), k


# ------------------------------------------------------------------- transformers Sam2Video cross-check

# transformers 5.x Sam2Video names -> upstream SAM2 names (the release's), for its memory modules
_HF_RENAMES = [
    (r"memory_encoder\.mask_downsampler\.layers\.(\d+)\.conv\.", lambda m: f"memory_encoder.mask_downsampler.encoder.{3 * int(m[1])}."),
    (r"memory_encoder\.mask_downsampler\.layers\.(\d+)\.layer_norm\.",
     lambda m: f"memory_encoder.mask_downsampler.encoder.{3 * int(m[1]) + 1}."),
    (r"memory_encoder\.feature_projection\.", lambda m: "memory_encoder.pix_feat_proj."),
    (r"memory_encoder\.projection\.", lambda m: "memory_encoder.out_proj."),
    (r"memory_encoder\.memory_fuser\.layers\.(\d+)\.depthwise_conv\.", lambda m: f"memory_encoder.fuser.layers.{m[1]}.dwconv."),
    (r"memory_encoder\.memory_fuser\.layers\.(\d+)\.layer_norm\.", lambda m: f"memory_encoder.fuser.layers.{m[1]}.norm."),
    (r"memory_encoder\.memory_fuser\.layers\.(\d+)\.pointwise_conv(\d)\.", lambda m: f"memory_encoder.fuser.layers.{m[1]}.pwconv{m[2]}."),
    (r"memory_encoder\.memory_fuser\.layers\.(\d+)\.scale$", lambda m: f"memory_encoder.fuser.layers.{m[1]}.gamma"),
    (r"\.o_proj\.", lambda m: ".out_proj."),
    (r"\.layers\.(\d+)\.layer_norm(\d)\.", lambda m: f".layers.{m[1]}.norm{m[2]}."),
    (r"memory_attention\.layer_norm\.", lambda m: "memory_attention.norm."),
]


def _hf_to_upstream(sd: dict[str, np.ndarray], n_mask_layers: int) -> dict[str, np.ndarray]:
    import re
    out = {}
    for k, v in sd.items():
        k = k.replace("memory_encoder.mask_downsampler.final_conv.",
                      f"memory_encoder.mask_downsampler.encoder.{3 * n_mask_layers}.")
        for pat, fn in _HF_RENAMES:
            k = re.sub(pat, fn, k)
        out[k] = v
    return out


def test_memory_modules_match_transformers_sam2video():
    """transformers' Sam2VideoMemoryEncoder / Sam2VideoMemoryAttention (its cross-attention kv dim is fixed at
    64, so d 128, memory 64 here), weights renamed to upstream names and converted by our table."""
    from transformers import Sam2VideoConfig
    from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoMemoryAttention, Sam2VideoMemoryEncoder

    d, m, h, w = 128, 64, 4, 4
    enc_cfg = MemoryEncoderConfig(in_dim=d, out_dim=m, mask_total_stride=4)
    att_cfg = MemoryAttentionConfig(d_model=d, num_layers=2, num_heads=2, ffn_dim=96, kv_dim=m, dropout=0.0,
                                    rope_feat_sizes=(w, h))
    cfg = Sam2MemoryConfig(enc_cfg, att_cfg, MemoryTokensConfig(hidden_dim=d, mem_dim=m, num_maskmem=3)).validate()
    hf_cfg = Sam2VideoConfig(
        memory_attention_hidden_size=d, memory_attention_num_layers=2, memory_attention_num_attention_heads=2,
        memory_attention_feed_forward_hidden_size=96, memory_attention_rope_feat_sizes=[w, h],
        memory_encoder_hidden_size=d, memory_encoder_output_channels=m, mask_downsampler_embed_dim=d,
        mask_downsampler_total_stride=4, memory_fuser_embed_dim=d, memory_fuser_intermediate_dim=4 * d)
    hf = nn.Module()
    hf.memory_encoder = Sam2VideoMemoryEncoder(hf_cfg)
    hf.memory_attention = Sam2VideoMemoryAttention(hf_cfg)
    _randomize(hf, 11)
    sd = _hf_to_upstream(_state_dict(hf), cfg.encoder.mask_layers)
    ours = MemoryPath(cfg, nnx.Rngs(0))
    rules = memory_encoder_rules(cfg.encoder.mask_layers) + memory_attention_rules()
    target = param_shapes(nnx.state(ours, nnx.Param))
    plan = build_plan({k: Meta(v.shape, v.dtype, "hf") for k, v in sd.items()}, rules,
                      {p: s for p, s in target.items() if not p.startswith("memory_tokens.")}, where="hf")
    values = {p: arr for job in plan.params for p, arr in zip(job.dst, job.rule.op.forward([sd[k] for k in job.src]))}
    flat = [(p, v.replace(jnp.asarray(values.get(".".join(map(str, p)), v.get_value()))))
            for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))]
    nnx.update(ours, nnx.from_flat_state(flat))

    rng = np.random.default_rng(12)
    pix = rng.normal(size=(2, h, w, d)).astype(np.float32)
    mask = rng.normal(size=(2, 4 * h, 4 * w, 1)).astype(np.float32)
    with torch.no_grad():
        want_f, want_p = hf.memory_encoder(_nchw(pix), _nchw(mask))  # no sigmoid inside (the caller applies it)
    got_f, got_p = ours.memory_encoder(jnp.asarray(pix), jnp.asarray(mask), skip_mask_sigmoid=True)
    assert _max_diff(got_f, want_f.permute(0, 2, 3, 1).numpy()) < TOL
    assert _max_diff(got_p, want_p.permute(0, 2, 3, 1).numpy()) < 1e-5

    curr = rng.normal(size=(1, h, w, d)).astype(np.float32)
    curr_pos = rng.normal(size=(1, h, w, d)).astype(np.float32)
    n_ptr_tokens = 2 * (d // m)
    mem = rng.normal(size=(1, 2 * h * w + n_ptr_tokens, m)).astype(np.float32)
    mem_pos = rng.normal(size=mem.shape).astype(np.float32)
    with torch.no_grad():
        want = hf.memory_attention(_t(curr).reshape(1, h * w, d).transpose(0, 1),
                                   _t(mem).transpose(0, 1), _t(curr_pos).reshape(1, h * w, d).transpose(0, 1),
                                   _t(mem_pos).transpose(0, 1), num_object_pointer_tokens=n_ptr_tokens)
    got = ours.memory_attention(jnp.asarray(curr), jnp.asarray(curr_pos), jnp.asarray(mem), jnp.asarray(mem_pos),
                                num_k_exclude_rope=n_ptr_tokens)
    want = want.reshape(h * w, d).numpy().reshape(h, w, d)
    assert _max_diff(got[0], want) < TOL, _max_diff(got[0], want)


def test_dropout_rng_and_bf16_compute_run():
    """Training mode (an rng: residual, FFN and attention-probability dropout) changes the output and stays
    finite; bf16 compute stays near the f32 result. No reference: smoke test of the two non-parity modes."""
    cfg = Sam2MemoryConfig.tiny(dropout=0.1)
    rng = np.random.default_rng(9)
    h, w, c, m = 4, 4, cfg.attention.d_model, cfg.attention.kv_dim
    curr = jnp.asarray(rng.normal(size=(2, h, w, c)).astype(np.float32))
    mem = jnp.asarray(rng.normal(size=(2, h * w + 8, m)).astype(np.float32))
    f32 = MemoryAttention(cfg.attention, rngs=nnx.Rngs(0))
    base = f32(curr, curr, mem, mem, num_k_exclude_rope=8)
    drop = f32(curr, curr, mem, mem, num_k_exclude_rope=8, rng=jax.random.key(1))
    assert np.isfinite(np.asarray(drop)).all() and float(jnp.abs(drop - base).max()) > 1e-3
    bf16 = MemoryAttention(cfg.attention, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    low = bf16(curr.astype(jnp.bfloat16), curr.astype(jnp.bfloat16), mem.astype(jnp.bfloat16),
               mem.astype(jnp.bfloat16), num_k_exclude_rope=8)
    assert low.dtype == jnp.bfloat16 and _max_diff(low.astype(jnp.float32), base) < 0.1
    enc = MemoryEncoder(cfg.encoder, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    feats, pos = encode_new_memory(enc, curr.astype(jnp.bfloat16), jnp.zeros((2, 4 * h, 4 * w, 1), jnp.bfloat16))
    assert feats.dtype == pos.dtype == jnp.bfloat16 and feats.shape == (2, h, w, cfg.encoder.out_dim)

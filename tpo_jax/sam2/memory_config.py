"""Configuration of the SAM2 memory path: memory encoder, memory attention, memory tokens / object pointers.

`Sam2MemoryConfig.release()` holds the values of the SAM2 inside the released VideoChat-TPO (upstream SAM 2 v1,
`sam2_hiera_l.yaml` + video-predictor overrides, MODEL-SPEC §7); `Sam2MemoryConfig.tiny()` is a small preset
for tests. The image-path config (`tpo_jax/sam2/config.py`) composes these three dataclasses into the whole
SAM2 config.
"""

from __future__ import annotations

import dataclasses
import math

ROPE_GRID_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MemoryEncoderConfig:
    """Upstream `MemoryEncoder` (mask downsampler, pix_feat_proj, CXBlock fuser, out_proj, sine position)."""

    in_dim: int = 256                  # channels of the stride-16 image features (neck d_model)
    out_dim: int = 64                  # memory channels (`out_proj`; `mem_dim` of SAM2Base)
    mask_kernel: int = 3               # mask downsampler: conv k3 s2 p1, repeated to total stride 16
    mask_stride: int = 2
    mask_padding: int = 1
    mask_total_stride: int = 16
    fuser_layers: int = 2              # CXBlocks
    fuser_kernel: int = 7              # depthwise conv k7 p3
    fuser_expansion: int = 4           # pwconv1: dim -> 4·dim
    layer_scale_init: float = 1e-6     # CXBlock gamma (learned; only its init value)
    pos_temperature: float = 10000.0   # PositionEmbeddingSine(num_pos_feats=out_dim, normalize=True)
    sigmoid_scale: float = 20.0        # mask for memory = sigmoid(logits)·scale + bias (SAM2Base)
    sigmoid_bias: float = -10.0

    @property
    def mask_layers(self) -> int:
        return int(round(math.log(self.mask_total_stride, self.mask_stride)))

    def mask_channels(self) -> list[int]:
        """Channels after each downsampling conv: 1 -> s² -> s⁴ ... (4, 16, 64, 256 in the release)."""
        return [self.mask_stride ** (2 * (i + 1)) for i in range(self.mask_layers)]

    def validate(self) -> None:
        if self.mask_stride ** self.mask_layers != self.mask_total_stride:
            raise ValueError(f"memory_encoder: mask_total_stride {self.mask_total_stride} is not a power of "
                             f"mask_stride {self.mask_stride}")


@dataclasses.dataclass(frozen=True)
class MemoryAttentionConfig:
    """Upstream `MemoryAttention`: pre-norm layers of RoPE self-attention, RoPE cross-attention to the memory
    bank, ReLU FFN; final LayerNorm. Positional flags fixed as in the release: 0.1·curr_pos added at the input,
    no position added to self-attention q/k, memory position added to cross-attention keys only."""

    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 1
    downsample_rate: int = 1           # attention internal dim = d_model // downsample_rate
    ffn_dim: int = 2048
    kv_dim: int = 64                   # cross-attention keys/values come from the 64-d memory bank
    dropout: float = 0.1               # residual, FFN and attention-probability dropout (training only)
    rope_theta: float = 10000.0
    # The grid the release builds its RoPE table for at construction (MODEL-SPEC §7). At run time the table
    # always follows the (H, W) of the features (upstream recomputes it when the token count differs:
    # at 1024-px input the stride-16 grid is 64×64).
    rope_feat_sizes: tuple[int, int] = (32, 32)
    # "float32": upstream SAM2. "bfloat16": the released TPO copy builds the flat index arange(H·W) in bf16, so
    # indices above 256 are rounded before the (x, y) split (MODEL-SPEC §7.4, §10.2 item 18); for parity only.
    rope_grid_dtype: str = "float32"
    pos_enc_at_input: bool = True
    attention_impl: str = "einsum"     # see tpo_jax.attention

    @property
    def internal_dim(self) -> int:
        return self.d_model // self.downsample_rate

    @property
    def head_dim(self) -> int:
        return self.internal_dim // self.num_heads

    def validate(self) -> None:
        if self.rope_grid_dtype not in ROPE_GRID_DTYPES:
            raise ValueError(f"memory_attention.rope_grid_dtype: expected one of {ROPE_GRID_DTYPES}, "
                             f"got {self.rope_grid_dtype!r}")
        if self.internal_dim % self.num_heads or self.head_dim % 4:
            raise ValueError(f"memory_attention: head dim {self.internal_dim}/{self.num_heads} must be a "
                             "multiple of 4 (axial RoPE: x and y pairs)")


@dataclasses.dataclass(frozen=True)
class MemoryTokensConfig:
    """The memory-related parameters SAM2Base owns itself (object pointers, temporal encodings, no-mem tokens)."""

    hidden_dim: int = 256              # SAM token / image feature width
    mem_dim: int = 64                  # memory width (= MemoryEncoderConfig.out_dim)
    num_maskmem: int = 7               # conditioning frame + up to 6 previous frames
    max_obj_ptrs: int = 16             # object pointers in the bank (each split into hidden/mem tokens)
    obj_ptr_mlp_layers: int = 3        # use_mlp_for_obj_ptr_proj: MLP(256, 256, 256, 3), ReLU between
    fixed_no_obj_ptr: bool = True
    soft_no_obj_ptr: bool = False
    mask_downsample_stride: int = 4    # `mask_downsample`: Conv2d(1, 1, k4, s4) for mask inputs

    @property
    def tokens_per_ptr(self) -> int:
        return self.hidden_dim // self.mem_dim

    def validate(self) -> None:
        if self.hidden_dim % self.mem_dim:
            raise ValueError(f"memory tokens: hidden_dim {self.hidden_dim} must be a multiple of mem_dim "
                             f"{self.mem_dim} (object pointers are split into hidden/mem tokens)")


@dataclasses.dataclass(frozen=True)
class Sam2MemoryConfig:
    encoder: MemoryEncoderConfig = MemoryEncoderConfig()
    attention: MemoryAttentionConfig = MemoryAttentionConfig()
    tokens: MemoryTokensConfig = MemoryTokensConfig()

    def validate(self) -> "Sam2MemoryConfig":
        self.encoder.validate()
        self.attention.validate()
        self.tokens.validate()
        e, a, t = self.encoder, self.attention, self.tokens
        if not (e.in_dim == a.d_model == t.hidden_dim):
            raise ValueError(f"memory path: encoder.in_dim {e.in_dim}, attention.d_model {a.d_model} and "
                             f"tokens.hidden_dim {t.hidden_dim} must be equal")
        if not (e.out_dim == a.kv_dim == t.mem_dim):
            raise ValueError(f"memory path: encoder.out_dim {e.out_dim}, attention.kv_dim {a.kv_dim} and "
                             f"tokens.mem_dim {t.mem_dim} must be equal")
        return self

    @classmethod
    def release(cls, **attention_overrides) -> "Sam2MemoryConfig":
        """SAM 2 v1 Hiera-L as inside VideoChat-TPO (the dataclass defaults)."""
        return cls(attention=dataclasses.replace(MemoryAttentionConfig(), **attention_overrides)).validate()

    @classmethod
    def tiny(cls, **attention_overrides) -> "Sam2MemoryConfig":
        """A few thousand parameters: d 32, memory 8, 2 layers, 2 heads, mask stride 4 (2 convs)."""
        enc = MemoryEncoderConfig(in_dim=32, out_dim=8, mask_total_stride=4, fuser_layers=2)
        att = MemoryAttentionConfig(d_model=32, num_layers=2, num_heads=2, ffn_dim=64, kv_dim=8,
                                    rope_feat_sizes=(4, 4), dropout=0.0)
        att = dataclasses.replace(att, **attention_overrides)
        tok = MemoryTokensConfig(hidden_dim=32, mem_dim=8, num_maskmem=3, max_obj_ptrs=4)
        return cls(enc, att, tok).validate()

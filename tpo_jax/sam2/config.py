"""Configuration of the SAM2 image path: Hiera trunk, FPN neck, prompt encoder, mask decoder (MODEL-SPEC §7).

`sam2_hiera_l_v1()` is the released model (upstream SAM 2 v1 `sam2_hiera_l.yaml`, as inside VideoChat-TPO);
`tiny()` is a small random model for tests. The memory path (memory attention / encoder, object pointers) has
its own dataclasses in `tpo_jax.sam2.memory_config`; `Sam2Config.memory` holds them, with the video-predictor
settings (`multimask_output_for_tracking`, `memory_storage_dtype`, `fill_hole_area`) beside them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tpo_jax.config_fields import DTYPES, check_field, check_positive
from tpo_jax.sam2.memory_config import Sam2MemoryConfig


@dataclass(frozen=True)
class HieraConfig:
    """Hiera image-encoder trunk (upstream `sam2.modeling.backbones.hieradet.Hiera`)."""

    embed_dim: int = 144  # width of stage 1; each later stage multiplies it by dim_mul
    num_heads: int = 2  # heads of stage 1; each later stage multiplies them by head_mul
    stages: tuple[int, ...] = (2, 6, 36, 4)  # blocks per stage
    global_att_blocks: tuple[int, ...] = (23, 33, 43)  # block indices with global (unwindowed) attention
    window_spec: tuple[int, ...] = (8, 4, 16, 8)  # attention window per stage
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)  # background pos-embed, bicubic-resized
    q_pool: int = 3  # number of stage transitions with query pooling
    q_stride: tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    mlp_ratio: float = 4.0
    in_chans: int = 3
    patch_kernel: int = 7
    patch_stride: int = 4
    patch_padding: int = 3
    norm_eps: float = 1e-6

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_ends(self) -> tuple[int, ...]:
        return tuple(sum(self.stages[:i + 1]) - 1 for i in range(len(self.stages)))

    @property
    def q_pool_blocks(self) -> tuple[int, ...]:
        return tuple(e + 1 for e in self.stage_ends[:-1])[: self.q_pool]

    def block_specs(self) -> list[tuple[int, int, int, int, bool]]:
        """Per block: (dim, dim_out, num_heads, window_size, q_pool), exactly as upstream builds them.

        A stage's first block (the one that pools queries and widens the channels) still uses the previous
        stage's window size; 0 = global attention.
        """
        specs, dim, heads, stage = [], self.embed_dim, self.num_heads, 0
        for i in range(self.depth):
            dim_out = dim
            window = 0 if i in self.global_att_blocks else self.window_spec[stage]
            if i - 1 in self.stage_ends:
                dim_out = int(dim * self.dim_mul)
                heads = int(heads * self.head_mul)
                stage += 1
            specs.append((dim, dim_out, heads, window, i in self.q_pool_blocks))
            dim = dim_out
        return specs

    @property
    def channel_list(self) -> tuple[int, ...]:
        """Output widths of the stages, lowest resolution first (the order the neck lists them)."""
        specs = self.block_specs()
        return tuple(specs[e][1] for e in self.stage_ends[::-1])

    def validate(self, prefix: str = "sam2.trunk.") -> None:
        check_positive(self, prefix, "embed_dim", "num_heads", "in_chans", "patch_kernel", "patch_stride")
        check_field(len(self.stages) > 0 and all(isinstance(s, int) and s > 0 for s in self.stages),
                    prefix + "stages", f"must be positive block counts, got {self.stages}")
        check_field(len(self.window_spec) == len(self.stages), prefix + "window_spec",
                    f"needs one window per stage ({len(self.stages)}), got {self.window_spec}")
        check_field(all(isinstance(w, int) and w > 0 for w in self.window_spec), prefix + "window_spec",
                    f"windows must be positive, got {self.window_spec}")
        check_field(0 <= self.q_pool <= len(self.stages) - 1, prefix + "q_pool",
                    f"must be in [0, {len(self.stages) - 1}], got {self.q_pool}")
        check_field(all(0 <= b < self.depth for b in self.global_att_blocks), prefix + "global_att_blocks",
                    f"block indices must be in [0, {self.depth}), got {self.global_att_blocks}")
        check_field(len(self.window_pos_embed_bkg_spatial_size) == 2
                    and all(s > 0 for s in self.window_pos_embed_bkg_spatial_size),
                    prefix + "window_pos_embed_bkg_spatial_size", "must be two positive sizes")
        for d, _, h, _, _ in self.block_specs():
            check_field(d % h == 0, prefix + "num_heads", f"heads {h} must divide the width {d} of every block")


@dataclass(frozen=True)
class NeckConfig:
    """FPN neck (upstream `FpnNeck`): 1×1 lateral convs to d_model, top-down fusion at the listed levels."""

    d_model: int = 256
    backbone_channel_list: tuple[int, ...] = (1152, 576, 288, 144)  # lowest resolution first
    fpn_top_down_levels: tuple[int, ...] = (2, 3)  # levels (0 = highest resolution) that add the coarser level
    fpn_interp_model: str = "nearest"
    fuse_type: str = "sum"
    scalp: int = 1  # drop this many lowest-resolution levels from the output
    pe_temperature: float = 10000.0

    def validate(self, prefix: str = "sam2.neck.") -> None:
        check_positive(self, prefix, "d_model")
        check_field(self.d_model % 2 == 0, prefix + "d_model", "must be even (sine position encoding)")
        check_field(self.fpn_interp_model == "nearest", prefix + "fpn_interp_model",
                    f"only 'nearest' is implemented (the released model's), got {self.fpn_interp_model!r}")
        check_field(self.fuse_type in ("sum", "avg"), prefix + "fuse_type", f"'sum' or 'avg', got {self.fuse_type!r}")
        n = len(self.backbone_channel_list)
        check_field(all(0 <= lv < n for lv in self.fpn_top_down_levels), prefix + "fpn_top_down_levels",
                    f"levels must be in [0, {n}), got {self.fpn_top_down_levels}")
        check_field(0 <= self.scalp < n, prefix + "scalp", f"must be in [0, {n}), got {self.scalp}")


@dataclass(frozen=True)
class MaskDecoderConfig:
    """SAM mask decoder (upstream `MaskDecoder` + `TwoWayTransformer`, as `SAM2Base._build_sam_heads` builds it)."""

    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    use_high_res_features: bool = True
    iou_prediction_use_sigmoid: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    use_multimask_token_for_obj_ptr: bool = True
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98

    def validate(self, dim: int, prefix: str = "sam2.mask_decoder.") -> None:
        check_positive(self, prefix, "depth", "num_heads", "mlp_dim", "attention_downsample_rate",
                       "num_multimask_outputs", "iou_head_depth", "iou_head_hidden_dim")
        check_field(dim % self.num_heads == 0 and (dim // self.attention_downsample_rate) % self.num_heads == 0,
                    prefix + "num_heads", f"{self.num_heads} must divide {dim} and "
                    f"{dim // self.attention_downsample_rate} (the downsampled attention width)")
        check_field(dim % 8 == 0, prefix + "dim", f"the transformer width {dim} must be a multiple of 8")


@dataclass(frozen=True)
class Sam2Config:
    """The whole SAM2: image path and memory path. `hidden_dim` (= neck.d_model) is the prompt / transformer
    width."""

    trunk: HieraConfig = field(default_factory=HieraConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    image_size: int = 1024
    backbone_stride: int = 16  # stride of the lowest-resolution level the decoder uses
    mask_in_chans: int = 16  # prompt encoder's mask_downscaling width
    directly_add_no_mem_embed: bool = True  # image features of an unconditioned frame get `no_mem_embed` added
    multimask_output_in_sam: bool = True
    multimask_min_pt_num: int = 0
    multimask_max_pt_num: int = 1
    memory: Sam2MemoryConfig = field(default_factory=Sam2MemoryConfig)
    multimask_output_for_tracking: bool = True  # tracked frames (no prompt) pick the best of the 3 masks
    # The video predictor stores each frame's memory features in bfloat16 (`_run_single_frame_inference`), also
    # in a float32 model; "float32" keeps them in the compute dtype.
    memory_storage_dtype: str = "bfloat16"
    # Background regions of at most this many low-resolution pixels (8-connected) become foreground in the
    # returned masks (`fill_holes_in_mask_scores`; host-side post-processing, never fed back into memory). 0: off.
    fill_hole_area: int = 8
    dtype: str = "float32"  # compute dtype (bfloat16 for inference); norms / softmax stay float32
    param_dtype: str = "float32"

    @property
    def hidden_dim(self) -> int:
        return self.neck.d_model

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // self.backbone_stride

    def validate(self) -> "Sam2Config":
        self.trunk.validate()
        self.neck.validate()
        self.mask_decoder.validate(self.hidden_dim)
        check_positive(self, "sam2.", "image_size", "backbone_stride", "mask_in_chans")
        check_field(self.mask_in_chans % 4 == 0, "sam2.mask_in_chans", f"must be a multiple of 4, got {self.mask_in_chans}")
        check_field(tuple(self.neck.backbone_channel_list) == self.trunk.channel_list, "sam2.neck.backbone_channel_list",
                    f"{tuple(self.neck.backbone_channel_list)} must equal the trunk's stage widths "
                    f"{self.trunk.channel_list} (lowest resolution first)")
        n_levels = len(self.trunk.stages)
        top = self.trunk.patch_stride * self.trunk.q_stride[0] ** self.trunk.q_pool
        check_field(self.image_size % top == 0, "sam2.image_size",
                    f"{self.image_size} must be a multiple of the coarsest stride {top}")
        levels_out = n_levels - self.neck.scalp
        stride_lowest_out = self.trunk.patch_stride * self.trunk.q_stride[0] ** min(levels_out - 1, self.trunk.q_pool)
        check_field(self.backbone_stride == stride_lowest_out, "sam2.backbone_stride",
                    f"{self.backbone_stride} must be the stride of the lowest-resolution output level "
                    f"{stride_lowest_out}")
        grid = self.image_size // self.trunk.patch_stride
        check_field(grid % self.trunk.window_spec[0] == 0, "sam2.trunk.window_spec",
                    f"the first window {self.trunk.window_spec[0]} must divide the patch grid {grid}")
        if self.mask_decoder.use_high_res_features:
            check_field(levels_out >= 3, "sam2.neck.scalp", "high-resolution features need 3 output levels")
        for name in ("dtype", "param_dtype", "memory_storage_dtype"):
            check_field(getattr(self, name) in DTYPES, f"sam2.{name}",
                        f"{getattr(self, name)!r} is not one of {list(DTYPES)}")
        self.memory.validate()
        check_field(self.memory.encoder.in_dim == self.hidden_dim, "sam2.memory.encoder.in_dim",
                    f"{self.memory.encoder.in_dim} must equal the neck width {self.hidden_dim}")
        check_field(self.memory.encoder.mask_total_stride == self.backbone_stride,
                    "sam2.memory.encoder.mask_total_stride",
                    f"{self.memory.encoder.mask_total_stride} must equal backbone_stride {self.backbone_stride} "
                    "(image-size masks are downsampled onto the memory grid)")
        check_field(self.memory.tokens.num_maskmem >= 2, "sam2.memory.tokens.num_maskmem",
                    "video propagation needs the conditioning frame and at least one previous frame")
        check_field(self.memory.tokens.max_obj_ptrs >= 1, "sam2.memory.tokens.max_obj_ptrs", "must be at least 1")
        check_field(isinstance(self.fill_hole_area, int) and self.fill_hole_area >= 0, "sam2.fill_hole_area",
                    f"must be a non-negative pixel count, got {self.fill_hole_area!r}")
        return self


def sam2_hiera_l_v1() -> Sam2Config:
    """Upstream SAM 2 v1 Hiera-L (`sam2_hiera_l.yaml`, the model inside VideoChat-TPO, MODEL-SPEC §7)."""
    return Sam2Config().validate()


def tiny() -> Sam2Config:
    """A small random model with the released structure (4 stages, q-pooling, global blocks, windows that pad)."""
    return Sam2Config(
        trunk=HieraConfig(embed_dim=8, num_heads=1, stages=(1, 2, 3, 2), global_att_blocks=(4,),
                          window_spec=(4, 4, 2, 3), window_pos_embed_bkg_spatial_size=(3, 3)),
        neck=NeckConfig(d_model=32, backbone_channel_list=(64, 32, 16, 8)),
        mask_decoder=MaskDecoderConfig(num_heads=2, mlp_dim=64, iou_head_hidden_dim=32),
        image_size=64, mask_in_chans=8,
        memory=_tiny_memory(),
    ).validate()


def _tiny_memory() -> Sam2MemoryConfig:
    """`Sam2MemoryConfig.tiny()` with the release's mask downsampler (4 convs of stride 2 = backbone stride 16)."""
    m = Sam2MemoryConfig.tiny()
    return dataclasses.replace(m, encoder=dataclasses.replace(m.encoder, mask_total_stride=16)).validate()

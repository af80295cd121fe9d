"""Typed configuration for the TPO model, with the `tiny` and `videochat_tpo_7b` presets (and the LLM-only
presets `qwen2_7b_llm`, `qwen2_tiny_llm`).

Every config is a frozen dataclass. `validate()` checks the fields and raises one
`ConfigError` naming the offending field (as a dotted path from the root config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from tpo_jax.config_fields import DTYPES, ConfigError, check_field, check_positive
from tpo_jax.llava_ov.visual_tokens import AnyresConfig
from tpo_jax.sam2.config import Sam2Config, tiny as sam2_tiny

# Token ids of the released tokenizer's 7 added tokens (MODEL-SPEC §4.1).
BOX_BEGIN_ID = 32000
TIME_BEGIN_ID = 32001
TEMP_ID = 32002
BOXES_ID = 32003
TRACK_BEGIN_ID = 32004
TRACKING_ID = 32005
TRACK_BOX_ID = 32006
NUM_ADDED_TOKENS = 7

@dataclass(frozen=True)
class TaskTokenIds:
    """Ids of the 7 TPO task tokens in the model's vocabulary. Defaults: the released Mistral tokenizer's
    (MODEL-SPEC §4.1); LLaVA-OV-TPO's Qwen2 tokenizer adds them after `<video>` (`LlavaOVTokenizer.added_token_ids`)."""

    box_begin: int = BOX_BEGIN_ID
    time_begin: int = TIME_BEGIN_ID
    temp: int = TEMP_ID
    boxes: int = BOXES_ID
    track_begin: int = TRACK_BEGIN_ID
    tracking: int = TRACKING_ID
    track_box: int = TRACK_BOX_ID

    @property
    def begin_tokens(self) -> tuple[int, int, int]:
        """`<box_begin>`, `<time_begin>`, `<track_begin>`: what the LLM emits before a task placeholder."""
        return self.box_begin, self.time_begin, self.track_begin

    @property
    def placeholders(self) -> tuple[int, int, int]:
        """`<boxes>`, `<temp>`, `<tracking>`: the rows whose hidden states feed the region / temporal / mask heads."""
        return self.boxes, self.temp, self.tracking

    def by_token(self) -> dict[str, int]:
        """Token string → id, in `tpo_jax.tokenizer.ADDED_TOKENS` order."""
        names = ("<box_begin>", "<time_begin>", "<temp>", "<boxes>", "<track_begin>", "<tracking>", "<track_box>")
        return dict(zip(names, dataclasses.astuple(self)))

    def validate(self, vocab_size: int, prefix: str = "task_tokens.") -> None:
        ids = dataclasses.astuple(self)
        for f, v in zip(dataclasses.fields(self), ids):
            check_field(isinstance(v, int) and 0 <= v < vocab_size, prefix + f.name,
                        f"{v!r} is not a token id of the vocabulary (0 … {vocab_size - 1}, llm.vocab_size)")
        seen: dict[int, str] = {}
        for f, v in zip(dataclasses.fields(self), ids):
            check_field(v not in seen, prefix + f.name, f"{v} is also {prefix}{seen.get(v)}: the 7 ids must differ")
            seen[v] = f.name


REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "custom")
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "splash")
# activations the layers tag with `jax.ad_checkpoint.checkpoint_name` (what remat_policy "custom" may save)
CHECKPOINT_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out", "out_proj",
                    "mlp_hidden", "mlp_out")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@dataclass(frozen=True)
class StackConfig:
    """How a layer stack runs (the same numbers either way; see `tpo_jax.stack`).

    scan_layers: parameters stacked on a leading `layers` axis and the stack run under `lax.scan` (one
    compiled layer body), or a Python loop over separate layers (for debugging).
    remat_policy: what the backward pass keeps of each layer's activations (`tpo_jax.stack.REMAT_POLICIES`):
    "none" keeps everything, "full" recomputes the whole layer, "dots_saveable" /
    "dots_with_no_batch_dims_saveable" keep matmul outputs, "custom" keeps the activations named in
    `remat_save` (`CHECKPOINT_NAMES`).
    attention: "einsum" (reference, materialises the scores), "xla" / "cudnn" (`jax.nn.dot_product_attention`),
    "splash" (TPU Pallas kernel) or "auto" (by backend; `tpo_jax.attention`).
    """

    scan_layers: bool = False
    remat_policy: str = "none"
    remat_save: tuple[str, ...] = ()
    attention: str = "einsum"

    def validate(self, prefix: str) -> None:
        check_field(isinstance(self.scan_layers, bool), prefix + "scan_layers",
                    f"must be true or false, got {self.scan_layers!r}")
        check_field(self.remat_policy in REMAT_POLICIES, prefix + "remat_policy",
                    f"{self.remat_policy!r} is not one of {list(REMAT_POLICIES)}")
        unknown = sorted(set(self.remat_save) - set(CHECKPOINT_NAMES))
        check_field(not unknown, prefix + "remat_save",
                    f"unknown activation name(s) {unknown}; known: {list(CHECKPOINT_NAMES)}")
        check_field(self.remat_policy == "custom" or not self.remat_save, prefix + "remat_save",
                    f"names activations to save, which only remat_policy 'custom' uses (got "
                    f"remat_policy {self.remat_policy!r})")
        check_field(self.attention in ATTENTION_IMPLS, prefix + "attention",
                    f"{self.attention!r} is not one of {list(ATTENTION_IMPLS)}")


@dataclass(frozen=True)
class ViTConfig:
    """UMT video ViT (MODEL-SPEC §1)."""

    img_size: int = 224
    patch_size: int = 16
    tubelet_size: int = 1
    in_chans: int = 3
    num_frames: int = 16
    ckpt_num_frames: int = 4  # frames of the pretraining position table, interpolated to num_frames
    width: int = 1024
    depth: int = 23  # blocks actually built (encoder_depth 24 + return_index -2 + 1)
    num_heads: int = 16
    mlp_dim: int = 4096
    norm_eps: float = 1e-6
    outer_norm: bool = True  # `vision_layernorm` applied to the encoder output
    outer_norm_eps: float = 1e-12
    stack: StackConfig = field(default_factory=StackConfig)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return self.grid * self.grid

    def validate(self, prefix: str = "vit.") -> None:
        check_positive(self, prefix, "img_size", "patch_size", "tubelet_size", "in_chans", "num_frames",
                  "ckpt_num_frames", "width", "depth", "num_heads", "mlp_dim")
        check_field(self.img_size % self.patch_size == 0, prefix + "patch_size",
               f"{self.patch_size} must divide img_size {self.img_size}")
        check_field(self.width % self.num_heads == 0, prefix + "num_heads",
               f"{self.num_heads} must divide width {self.width}")
        check_field(self.num_frames % self.tubelet_size == 0, prefix + "tubelet_size",
               f"{self.tubelet_size} must divide num_frames {self.num_frames}")
        self.stack.validate(prefix + "stack.")


@dataclass(frozen=True)
class QFormerConfig:
    """BERT-style Q-Former with learned queries (MODEL-SPEC §2)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    norm_eps: float = 1e-12
    vocab_size: int = 30523
    max_position: int = 512
    cross_attention_freq: int = 2  # cross-attention in layers with index % freq == 0
    encoder_width: int = 1024  # width of the vision features it attends to
    num_query_tokens: int = 32
    num_extra_query_tokens: int = 64
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    stack: StackConfig = field(default_factory=StackConfig)

    @property
    def num_queries(self) -> int:
        return self.num_query_tokens + self.num_extra_query_tokens

    def validate(self, prefix: str = "qformer.") -> None:
        check_positive(self, prefix, "hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
                  "max_position", "cross_attention_freq", "encoder_width", "num_query_tokens")
        check_field(self.num_extra_query_tokens >= 0, prefix + "num_extra_query_tokens", "must be >= 0")
        check_field(self.hidden_size % self.num_heads == 0, prefix + "num_heads",
               f"{self.num_heads} must divide hidden_size {self.hidden_size}")
        for name in ("hidden_dropout", "attention_dropout"):
            check_field(0.0 <= getattr(self, name) < 1.0, prefix + name, "must be in [0, 1)")
        self.stack.validate(prefix + "stack.")
        check_field(not self.stack.scan_layers or self.num_layers % self.cross_attention_freq == 0,
                    prefix + "stack.scan_layers",
                    f"a scanned Q-Former repeats groups of cross_attention_freq = {self.cross_attention_freq} "
                    f"layers, which must divide num_layers {self.num_layers}")


@dataclass(frozen=True)
class SiglipConfig:
    """SigLIP vision tower of LLaVA-OneVision (`tpo_jax.llava_ov.siglip`). Defaults: SO400M/14 at 384 px as
    LLaVA-OV-7B builds it (`tpo_jax.llava_ov.siglip.so400m_patch14_384`)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 384
    in_chans: int = 3
    norm_eps: float = 1e-6
    post_layernorm: bool = False  # LLaVA-OV reads the last layer before post_layernorm (module docstring)
    stack: StackConfig = field(default_factory=StackConfig)

    @property
    def grid(self) -> int:
        """Patches per side (27 for 384 / 14; the last 6 pixel rows and columns are not covered)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self, prefix: str = "siglip.") -> None:
        check_positive(self, prefix, "hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size",
                       "image_size", "in_chans")
        check_field(self.hidden_size % self.num_heads == 0, prefix + "num_heads",
                    f"{self.num_heads} must divide hidden_size {self.hidden_size}")
        check_field(self.patch_size <= self.image_size, prefix + "patch_size",
                    f"{self.patch_size} is larger than image_size {self.image_size}")
        check_field(self.norm_eps > 0, prefix + "norm_eps", f"must be positive, got {self.norm_eps}")
        check_field(isinstance(self.post_layernorm, bool), prefix + "post_layernorm",
                    f"must be true or false, got {self.post_layernorm!r}")
        self.stack.validate(prefix + "stack.")


@dataclass(frozen=True)
class LoRAConfig:
    """PEFT-style LoRA on the LLM's linear layers (MODEL-SPEC §3.2)."""

    enabled: bool = True
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self, prefix: str = "lora.") -> None:
        if not self.enabled:
            return
        check_positive(self, prefix, "rank")
        check_field(0.0 <= self.dropout < 1.0, prefix + "dropout", "must be in [0, 1)")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        check_field(not unknown, prefix + "targets", f"unknown target(s) {unknown}; known: {list(LORA_TARGETS)}")


@dataclass(frozen=True)
class LLMConfig:
    """Mistral-family decoder (MODEL-SPEC §3); Llama and Qwen2 are configurations of it.

    attention_bias: q_proj / k_proj / v_proj carry a bias (Qwen2; o_proj never has one). With LoRA on such a
    projection the bias belongs to the base Linear, as in PEFT.
    tie_embeddings: logits come from the token embedding table (no lm_head), as in small Qwen2 models.
    """

    vocab_size: int = 32007
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int = 14336
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    max_position: int = 32768
    sliding_window: int | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    stack: StackConfig = field(default_factory=StackConfig)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self, prefix: str = "llm.") -> None:
        check_positive(self, prefix, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "intermediate_size", "max_position")
        if self.head_dim is None:
            check_field(self.hidden_size % self.num_heads == 0, prefix + "num_heads",
                   f"{self.num_heads} must divide hidden_size {self.hidden_size} (or set head_dim)")
        else:
            check_positive(self, prefix, "head_dim")
        check_field(self.resolved_head_dim % 2 == 0, prefix + "head_dim", "must be even for rotary embeddings")
        check_field(self.num_heads % self.num_kv_heads == 0, prefix + "num_kv_heads",
               f"{self.num_kv_heads} must divide num_heads {self.num_heads}")
        check_field(self.rope_theta > 0, prefix + "rope_theta", "must be positive")
        check_field(self.rms_norm_eps > 0, prefix + "rms_norm_eps", "must be positive")
        if self.sliding_window is not None:
            check_positive(self, prefix, "sliding_window")
        for name in ("tie_embeddings", "attention_bias"):
            check_field(isinstance(getattr(self, name), bool), prefix + name,
                        f"must be true or false, got {getattr(self, name)!r}")
        self.stack.validate(prefix + "stack.")


@dataclass(frozen=True)
class RegionHeadConfig:
    """Region head: `loc_decoder` MLP hidden → box (MODEL-SPEC §5.1, §5.3.1)."""

    hidden: int = 2048
    loss: str = "l1_giou"  # "l1_giou": 2·L1 + GIoU/5 as released; "mse": as the paper states
    l1_weight: float = 2.0
    giou_weight: float = 0.2
    max_slots: int = 1  # `<boxes>` tokens per sample that carry a target

    def validate(self, prefix: str = "heads.region.") -> None:
        check_positive(self, prefix, "hidden", "max_slots")
        check_field(self.loss in ("l1_giou", "mse"), prefix + "loss", f"{self.loss!r} is not one of ['l1_giou', 'mse']")


@dataclass(frozen=True)
class TemporalHeadConfig:
    """CG-DETR temporal grounding head (MODEL-SPEC §6)."""

    hidden_dim: int = 256
    num_heads: int = 8
    ffn_dim: int = 1024
    dropout: float = 0.1
    input_dropout: float = 0.5
    enc_layers: int = 3
    dec_layers: int = 3
    t2v_layers: int = 2
    dummy_layers: int = 2  # depth of the encoder that makes the dummy tokens (txtproj_encoder)
    moment_layers: int = 1  # depth of the moment-token encoder (transformer.mcls_encoder; training only)
    sent_layers: int = 1  # depth of the sentence-token encoder (scls_encoder; training only)
    # attention heads of the text-side encoders (txtproj_encoder, scls_encoder): the released model builds them
    # with 8 heads whatever `num_heads` is
    txtproj_num_heads: int = 8
    num_queries: int = 10
    num_dummies: int = 45
    total_prompts: int = 10  # global saliency tokens
    num_prompts: int = 1
    txt_dim: int = 4096  # text feature width (the LLM hidden size when features come from the model)
    vid_dim: int = 770  # clip feature width incl. the 2 TEF channels
    max_text_len: int = 100
    max_spans: int = 4  # ground-truth spans per sample (padded)
    feature_source: str = "batch"  # "batch": precomputed features; "model": pooled ViT clips + LLM text embeddings
    # matcher costs and loss weights (MODEL-SPEC §6.1, §6.6)
    cost_span: float = 10.0
    cost_giou: float = 1.0
    cost_class: float = 4.0
    w_span: float = 10.0
    w_giou: float = 1.0
    w_label: float = 4.0
    w_saliency: float = 4.0
    w_wattn: float = 1.0
    w_ms_align: float = 1.0
    w_distill: float = 1.0
    w_orthogonal_dummy: float = 1.0  # the reference weighs loss_orthogonal_dummy with lw_distill
    eos_coef: float = 0.1
    saliency_margin: float = 0.2
    aux_loss: bool = True
    loss_scale: float = 0.05  # TPO multiplies the weighted CG-DETR loss by this
    # rows of a batch form groups of this many consecutive rows; each group is one criterion batch of the
    # reference (negative query pairs and the moment–sentence contrast stay inside a group). Gradient
    # accumulation is exact when it divides the micro-batch size (tpo_jax.heads.temporal.batch)
    criterion_group: int = 8

    def validate(self, prefix: str = "heads.temporal.") -> None:
        check_positive(self, prefix, "hidden_dim", "num_heads", "ffn_dim", "enc_layers", "dec_layers", "t2v_layers", "dummy_layers",
                  "num_queries", "num_dummies", "total_prompts", "num_prompts", "txt_dim", "vid_dim",
                  "max_text_len", "max_spans", "moment_layers", "sent_layers", "txtproj_num_heads",
                  "criterion_group")
        for name in ("num_heads", "txtproj_num_heads"):
            check_field(self.hidden_dim % getattr(self, name) == 0, prefix + name,
                        f"{getattr(self, name)} must divide hidden_dim {self.hidden_dim}")
        check_field(self.max_spans <= self.num_queries, prefix + "max_spans",
               f"{self.max_spans} targets cannot be matched to {self.num_queries} queries")
        check_field(self.feature_source in ("batch", "model"), prefix + "feature_source",
               f"{self.feature_source!r} is not one of ['batch', 'model']")
        for name in ("dropout", "input_dropout"):
            check_field(0.0 <= getattr(self, name) < 1.0, prefix + name, "must be in [0, 1)")


@dataclass(frozen=True)
class MaskHeadConfig:
    """Mask head: `track_embed` → SAM2 sparse prompt (3, 256), `track_embed_decode2` → box (MODEL-SPEC §5, §7.1)."""

    prompt_dim: int = 256  # SAM2 prompt embedding width
    num_prompt_tokens: int = 3
    sam_image_size: int = 1024
    emulate_bf16_points: bool = False  # TPO's bf16 point coordinates (MODEL-SPEC §7.1, §10.18)
    box_weight: float = 1.0

    def validate(self, prefix: str = "heads.mask.") -> None:
        check_positive(self, prefix, "prompt_dim", "num_prompt_tokens", "sam_image_size")
        check_field(self.prompt_dim % 2 == 0, prefix + "prompt_dim", "must be even (sin/cos halves)")


@dataclass(frozen=True)
class HeadsConfig:
    region: RegionHeadConfig = field(default_factory=RegionHeadConfig)
    temporal: TemporalHeadConfig = field(default_factory=TemporalHeadConfig)
    mask: MaskHeadConfig = field(default_factory=MaskHeadConfig)

    def validate(self) -> None:
        self.region.validate()
        self.temporal.validate()
        self.mask.validate()


def check_tiles_match_tower(siglip: SiglipConfig, anyres: AnyresConfig, prefix: str) -> None:
    """A tile of the anyres tiling is one tower input: the same image size and patch size."""
    same = (anyres.image_size, anyres.patch_size) == (siglip.image_size, siglip.patch_size)
    check_field(same, prefix + "anyres.image_size",
                f"tiles of {anyres.image_size} px / patch {anyres.patch_size} do not match the tower's "
                f"{siglip.image_size} px / patch {siglip.patch_size}")


# llava-hf/llava-onevision-qwen2-7b-ov-hf config.json: image_token_index / video_token_index
LLAVA_OV_IMAGE_TOKEN_ID, LLAVA_OV_VIDEO_TOKEN_ID = 151646, 151647
# LLaVA-OV-TPO's task tokens: the Qwen2 tokenizer of LLaVA-OV-7B with TPO's 7 tokens added after <video>
LLAVA_OV_TASK_TOKENS = TaskTokenIds(*range(151648, 151655))


@dataclass(frozen=True)
class LlavaOVVisualConfig:
    """The vision side of TPO on LLaVA-OneVision (`TPOConfig.llava_ov`): SigLIP tower → 2-layer GELU projector →
    frames pooled 2×2 (`tpo_jax.llava_ov.vision`). TPO's inputs are videos: every sample's `num_frames` frames
    (an image is repeated, as on the VideoChat path) become `num_frames · p² + 1` rows at `<video>` tokens
    (p = ⌈grid / 2⌉). `anyres` is the base model's image tiling (the `<image>` path of `tpo_jax.llava_ov.model`,
    converted weights and tokenizer checks); its tile size must be the tower's."""

    siglip: SiglipConfig = field(default_factory=SiglipConfig)
    anyres: AnyresConfig = field(default_factory=AnyresConfig)
    num_frames: int = 32
    image_token_id: int = LLAVA_OV_IMAGE_TOKEN_ID
    video_token_id: int = LLAVA_OV_VIDEO_TOKEN_ID
    # directory of the Qwen2 tokenizer (a llava-hf LLaVA-OV checkpoint directory); "": the tiny one shipped in the
    # package (`LlavaOVTokenizer.tiny()`, which only the tiny preset's ids match)
    tokenizer: str = ""

    @property
    def pooled_grid(self) -> int:
        return -(-self.siglip.grid // 2)

    @property
    def num_video_tokens(self) -> int:
        return self.num_frames * self.pooled_grid ** 2 + 1

    def validate(self, vocab_size: int, prefix: str = "llava_ov.") -> None:
        self.siglip.validate(prefix + "siglip.")
        self.anyres.validate(prefix + "anyres.")
        check_positive(self, prefix, "num_frames")
        check_tiles_match_tower(self.siglip, self.anyres, prefix)
        for name in ("image_token_id", "video_token_id"):
            v = getattr(self, name)
            check_field(isinstance(v, int) and 0 <= v < vocab_size, prefix + name,
                        f"{v!r} is not a token id of the vocabulary (0 … {vocab_size - 1})")
        check_field(self.image_token_id != self.video_token_id, prefix + "video_token_id",
                    f"{self.video_token_id} is also image_token_id")


@dataclass(frozen=True)
class TPOConfig:
    """The assembled model: vision side → LLM (+ task tokens) → task heads. Two architectures (`arch`):

    "videochat" (VideoChat-TPO): UMT ViT (`vit`) → Q-Former (`qformer`) → project_up → Mistral (`llm`);
    "llava_ov" (LLaVA-OV-TPO, when `llava_ov` is set): SigLIP → 2-layer projector → pooled frames (`llava_ov`)
    → Qwen2 (`llm` with attention_bias). `vit` / `qformer` are then unused. Both share the task tokens
    (`task_tokens`: their ids in the vocabulary), heads, losses, stages and trainer.
    """

    vit: ViTConfig = field(default_factory=ViTConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    sam2: Sam2Config = field(default_factory=lambda: Sam2Config())  # frozen SAM2: masks and tracks (§7)
    loc_hidden: int = 2048  # hidden width of loc_encoder / loc_decoder
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters (trainable ones always train from these)
    # storage dtype of the parameters a stage freezes (None: param_dtype); read by tpo-train, tpo-shard-report
    # and tpo-convert's default output dtype
    frozen_param_dtype: str | None = None
    task_tokens: TaskTokenIds = field(default_factory=TaskTokenIds)
    llava_ov: LlavaOVVisualConfig | None = None  # set: arch "llava_ov"

    @property
    def arch(self) -> str:
        return "videochat" if self.llava_ov is None else "llava_ov"

    @property
    def num_visual_tokens(self) -> int:
        """Visual rows of one sample's prompt: the Q-Former queries, or LLaVA-OV's pooled frames + newline."""
        return self.qformer.num_queries if self.llava_ov is None else self.llava_ov.num_video_tokens

    @property
    def stacks(self) -> tuple[str, ...]:
        """Dotted names of the layer stacks this architecture builds (each a config with a `stack` StackConfig)."""
        return ("llm", "vit", "qformer") if self.llava_ov is None else ("llm", "llava_ov.siglip")

    @property
    def num_frames(self) -> int:
        """Frames of one sample (an image is repeated to this many)."""
        return self.vit.num_frames if self.llava_ov is None else self.llava_ov.num_frames

    @property
    def frame_size(self) -> int:
        """Side of a frame in pixels, as the vision encoder takes it."""
        return self.vit.img_size if self.llava_ov is None else self.llava_ov.siglip.image_size

    @property
    def num_clips(self) -> int:
        """Temporal positions of a video for the temporal head (frames / tubelet; LLaVA-OV: frames)."""
        return self.vit.num_frames // self.vit.tubelet_size if self.llava_ov is None else self.llava_ov.num_frames

    @property
    def vision_width(self) -> int:
        """Width of the vision encoder's features (what feature_source 'model' pools into clip features)."""
        return self.vit.width if self.llava_ov is None else self.llava_ov.siglip.hidden_size

    def validate(self) -> "TPOConfig":
        self.vit.validate()
        self.qformer.validate()
        self.llm.validate()
        self.lora.validate()
        self.heads.validate()
        self.sam2.validate()
        check_positive(self, "", "loc_hidden")
        mask = self.heads.mask
        check_field(mask.prompt_dim == self.sam2.hidden_dim, "heads.mask.prompt_dim",
                    f"{mask.prompt_dim} must equal SAM2's prompt width sam2.neck.d_model {self.sam2.hidden_dim}")
        check_field(mask.sam_image_size == self.sam2.image_size, "heads.mask.sam_image_size",
                    f"{mask.sam_image_size} must equal sam2.image_size {self.sam2.image_size}")
        check_field(self.frozen_param_dtype is None or self.frozen_param_dtype in DTYPES, "frozen_param_dtype",
                    f"{self.frozen_param_dtype!r} is not one of {list(DTYPES)} (or null: param_dtype)")
        for name in ("dtype", "param_dtype"):
            check_field(getattr(self, name) in DTYPES, name, f"{getattr(self, name)!r} is not one of {list(DTYPES)}")
        if self.llava_ov is None:
            check_field(self.qformer.encoder_width == self.vit.width, "qformer.encoder_width",
                        f"{self.qformer.encoder_width} must equal vit.width {self.vit.width}")
        else:
            check_field(isinstance(self.llava_ov, LlavaOVVisualConfig), "llava_ov",
                        f"must be a LlavaOVVisualConfig section or null, got {self.llava_ov!r}")
            self.llava_ov.validate(self.llm.vocab_size)
        tmp = self.heads.temporal
        if tmp.feature_source == "model":
            encoder = "vit.width" if self.llava_ov is None else "llava_ov.siglip.hidden_size"
            check_field(tmp.txt_dim == self.llm.hidden_size, "heads.temporal.txt_dim",
                   f"{tmp.txt_dim} must equal llm.hidden_size {self.llm.hidden_size} with feature_source 'model'")
            check_field(tmp.vid_dim == self.vision_width + 2, "heads.temporal.vid_dim",
                   f"{tmp.vid_dim} must equal {encoder} + 2 = {self.vision_width + 2} with feature_source 'model'")
        check_field(isinstance(self.task_tokens, TaskTokenIds), "task_tokens",
                    f"must be a TaskTokenIds section, got {self.task_tokens!r}")
        self.task_tokens.validate(self.llm.vocab_size)
        return self


def tiny() -> TPOConfig:
    """A model small enough to run a forward pass in seconds on a CPU (real vocabulary size)."""
    return TPOConfig(
        vit=ViTConfig(img_size=32, patch_size=8, num_frames=4, ckpt_num_frames=2, width=32, depth=2,
                      num_heads=2, mlp_dim=64),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=30523,
                              max_position=64, encoder_width=32, num_query_tokens=4, num_extra_query_tokens=4),
        llm=LLMConfig(vocab_size=32007, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position=2048),
        lora=LoRAConfig(rank=4, alpha=8.0),
        heads=HeadsConfig(
            region=RegionHeadConfig(hidden=32),
            temporal=TemporalHeadConfig(hidden_dim=32, num_heads=4, ffn_dim=64, num_queries=4, num_dummies=5,
                                        total_prompts=4, txt_dim=64, vid_dim=34, max_text_len=16, max_spans=2,
                                        feature_source="model"),
            mask=MaskHeadConfig(prompt_dim=32, sam_image_size=64),
        ),
        sam2=sam2_tiny(),
        loc_hidden=32,
    )


def videochat_tpo_7b() -> TPOConfig:
    """The released VideoChat-TPO shapes (UMT ViT-L 23 blocks, BERT-base Q-Former, Mistral-7B, LoRA r16), as a
    pod runs them: scanned stacks with full remat, bf16 compute, float32 parameters with the frozen ones stored
    in bf16, and attention picked by backend. (v5p, 16 examples per chip: 14.9 GiB per chip with full remat,
    183 GiB without; docs/benchmarks.md, "Compiling the 7B train step".)"""
    stack = StackConfig(scan_layers=True, remat_policy="full", attention="auto")
    return TPOConfig(vit=ViTConfig(stack=stack), qformer=QFormerConfig(stack=stack), llm=LLMConfig(stack=stack),
                     sam2=dataclasses.replace(Sam2Config(), dtype="bfloat16"),
                     dtype="bfloat16", frozen_param_dtype="bfloat16")


def qwen2_7b_llm(vocab_size: int = 152_128, stack: StackConfig | None = None) -> LLMConfig:
    """Qwen2-7B as LLaVA-OneVision-7B uses it (the text config of llava-hf/llava-onevision-qwen2-7b-ov-hf, from
    Qwen/Qwen2-7B-Instruct): 28 layers, hidden 3584, 28 query / 4 key-value heads of 128, SwiGLU 18944, bias on
    q/k/v, RoPE θ 1e6, RMSNorm eps 1e-6, 32768 positions, untied lm_head, no sliding window (Qwen2 turns it off:
    `use_sliding_window` false). vocab_size: 152128 is Qwen2-7B-Instruct's 152064 plus `<image>` and `<video>`,
    padded to a multiple of 64 by the Hugging Face conversion; the lmms-lab original keeps 152064."""
    return LLMConfig(vocab_size=vocab_size, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                     intermediate_size=18944, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position=32768,
                     sliding_window=None, tie_embeddings=False, attention_bias=True,
                     stack=stack or StackConfig())


def qwen2_tiny_llm(vocab_size: int = 151, stack: StackConfig | None = None) -> LLMConfig:
    """A Qwen2-shaped decoder small enough for CPU tests: the 7B's options (q/k/v bias, θ 1e6, eps 1e-6, GQA 2:1)
    at 2 layers, hidden 64, 4 heads of 16."""
    return LLMConfig(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position=2048,
                     attention_bias=True, stack=stack or StackConfig())


def llava_ov_tpo_7b() -> TPOConfig:
    """TPO on LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf config.json): SigLIP SO400M/14 @ 384 with
    26 layers, Qwen2-7B (`qwen2_7b_llm`: hidden 3584, vocab 152128), `<image>` 151646, `<video>` 151647 and TPO's 7
    task tokens at 151648..151654 (`LLAVA_OV_TASK_TOKENS`). 32 frames → 32 × 14² + 1 = 6273 video rows. The heads
    are VideoChat-TPO's at Qwen2's width; the temporal head reads the model's own features (pooled SigLIP frames
    and the LLM's query embeddings: txt_dim 3584, vid_dim 1154), as no precomputed features exist for this model.
    SAM2 Hiera-L, LoRA r16, and the pod settings of `videochat_tpo_7b` (scanned stacks, full remat, bf16 compute,
    frozen parameters stored in bf16)."""
    stack = StackConfig(scan_layers=True, remat_policy="full", attention="auto")
    siglip = dataclasses.replace(SiglipConfig(), stack=stack)
    return TPOConfig(llm=qwen2_7b_llm(stack=stack), llava_ov=LlavaOVVisualConfig(siglip=siglip),
                     task_tokens=LLAVA_OV_TASK_TOKENS,
                     heads=HeadsConfig(temporal=TemporalHeadConfig(txt_dim=3584, vid_dim=1154, feature_source="model")),
                     sam2=dataclasses.replace(Sam2Config(), dtype="bfloat16"),
                     dtype="bfloat16", frozen_param_dtype="bfloat16")


def llava_ov_tpo_tiny() -> TPOConfig:
    """`tiny` on the LLaVA-OV architecture: a 2-layer SigLIP (32 px, 8 px patches: 4 × 4 grid, pooled to 2 × 2), a
    2-layer Qwen2-shaped decoder (`qwen2_tiny_llm`) with the shipped tiny tokenizer's ids (`LlavaOVTokenizer.tiny()`:
    400 rows, `<image>` 387, `<video>` 388, task tokens 389..395), 4 frames (17 video rows); heads and SAM2 as `tiny`."""
    siglip = SiglipConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=8, image_size=32)
    anyres = AnyresConfig(image_size=32, patch_size=8, pinpoints=((32, 32), (32, 64), (64, 32), (64, 64)))
    return dataclasses.replace(
        tiny(), llm=qwen2_tiny_llm(vocab_size=400), task_tokens=TaskTokenIds(*range(389, 396)),
        llava_ov=LlavaOVVisualConfig(siglip=siglip, anyres=anyres, num_frames=4, image_token_id=387, video_token_id=388))


PRESETS: dict[str, Callable[[], TPOConfig]] = {"tiny": tiny, "videochat_tpo_7b": videochat_tpo_7b,
                                               "llava_ov_tpo_tiny": llava_ov_tpo_tiny, "llava_ov_tpo_7b": llava_ov_tpo_7b}


def get_config(name: str) -> TPOConfig:
    """Return the validated preset `name`."""
    if name not in PRESETS:
        raise ConfigError(f"config field 'preset': unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]().validate()


def replace(cfg: Any, _prefix: str = "", **changes: Any) -> Any:
    """`dataclasses.replace` that also accepts dotted names: replace(cfg, **{"llm.num_layers": 4})."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if not any(f.name == head for f in dataclasses.fields(cfg)):
            raise ConfigError(f"config field '{_prefix}{key}': {type(cfg).__name__} has no field {head!r}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        flat[head] = replace(flat.get(head, getattr(cfg, head)), f"{_prefix}{head}.", **sub)
    return dataclasses.replace(cfg, **flat)

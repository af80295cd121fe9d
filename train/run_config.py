"""The config of a training run (`tpo-train`): model, data, optimizer, the three stages, checkpoints,
evaluation, mesh; presets; and the dotted `key=value` overrides of `tpo_jax.overrides`.

    cfg = get_run_config("tiny")                              # the default run
    cfg = apply_overrides(cfg, ["optim.lr=1e-4", "model.llm.num_layers=4", "stage2.steps=50"])

Stages run in the order stage1 → stage2 → stage3; each starts from the previous one's final
checkpoint. A stage's optimizer has `steps` total steps (warmup + cosine over them) and the peak LRs
of its recipe (`tpo_jax.train.stages`) times `optim.lr_scale × stageN.lr_scale`, or, with `optim.lr` set,
peak LRs rescaled so the stage's fastest group gets `optim.lr` (ratios between groups kept).

The `tiny` preset trains a from-scratch model, so its LRs are far above the paper's (which fine-tune
pretrained weights): see docs/training.md for the choices. The `videochat_tpo_7b` preset is the paper's recipe
(`videochat_tpo_7b_run`) and needs `init_from` set (`check_required`, which `tpo-train` applies to its preset).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import math
import types
import typing
from typing import Any, Mapping

from tpo_jax.data.pipeline import DataConfig
from tpo_jax.checkpoints.manager import CheckpointConfig
from tpo_jax import config as C
from tpo_jax.config import ConfigError
from tpo_jax.config_fields import check_field, check_positive
from tpo_jax.sharding import MeshConfig, get_rules
from tpo_jax.train.nonfinite import MAX_UPDATE_RATIO
from tpo_jax.train.optim import OptimConfig
from tpo_jax.train.stages import RECIPES, get_recipe
from tpo_jax.train.step import DEFAULT_LOSS_WEIGHTS, TrainConfig

STAGES = ("stage1", "stage2", "stage3")


@dataclasses.dataclass(frozen=True)
class StageRun:
    """One stage of the run: a `tpo_jax.train.stages` recipe trained for `steps` steps."""

    recipe: str
    steps: int = 100
    lr_scale: float = 1.0  # multiplies the recipe's LRs (on top of optim.lr_scale)
    data_weights: Mapping[str, float] | None = None  # task mixture of this stage; None: data.weights / the default
    loss_weights: Mapping[str, float] | None = None  # entries replacing the run's loss_weights in this stage
    group_lr_scale: Mapping[str, float] | None = None  # parameter group → factor on its LR in this stage

    def validate(self, prefix: str) -> None:
        check_field(isinstance(self.recipe, str), prefix + "recipe", f"must be a recipe name, got {self.recipe!r}")
        check_field(self.recipe in RECIPES, prefix + "recipe",
                    f"unknown recipe {self.recipe!r}; known: {sorted(RECIPES)}")
        check_positive(self, prefix, "steps")
        check_field(self.lr_scale > 0, prefix + "lr_scale", f"must be positive, got {self.lr_scale!r}")
        if self.data_weights is not None:
            DataConfig(weights=dict(self.data_weights)).validate(prefix + "data_")
        if self.loss_weights is not None:
            TrainConfig(loss_weights=dict(self.loss_weights)).validate(prefix)
        if self.group_lr_scale is not None:
            OptimConfig(group_lr_scale=dict(self.group_lr_scale)).validate(prefix)


@dataclasses.dataclass(frozen=True)
class RunOptim:
    """`tpo_jax.train.optim.OptimConfig` without `total_steps` and `group_lr_scale` (each stage sets them), plus `lr`."""

    lr: float | None = None  # peak LR of each stage's fastest group; None: the recipe's LRs × lr_scale
    # the rest mirror OptimConfig and take its defaults (one source: the released run's values)
    lr_scale: float = OptimConfig.lr_scale
    warmup_ratio: float = OptimConfig.warmup_ratio
    min_lr_ratio: float = OptimConfig.min_lr_ratio
    weight_decay: float = OptimConfig.weight_decay
    b1: float = OptimConfig.b1
    b2: float = OptimConfig.b2
    eps: float = OptimConfig.eps
    grad_clip: float = OptimConfig.grad_clip

    def for_stage(self, stage: StageRun) -> OptimConfig:
        scale = self.lr_scale * stage.lr_scale
        if self.lr is not None:
            scale = self.lr / max(get_recipe(stage.recipe).learning_rates.values())
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(OptimConfig)
                  if f.name not in ("total_steps", "lr_scale", "group_lr_scale")}
        return OptimConfig(total_steps=stage.steps, lr_scale=scale, group_lr_scale=dict(stage.group_lr_scale or {}),
                           **fields)

    def validate(self, prefix: str = "optim.") -> None:
        check_field(self.lr is None or self.lr > 0, prefix + "lr", f"must be positive or None, got {self.lr!r}")
        check_field(self.lr_scale > 0, prefix + "lr_scale", f"must be positive, got {self.lr_scale!r}")
        OptimConfig(warmup_ratio=self.warmup_ratio, min_lr_ratio=self.min_lr_ratio).validate(prefix)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    enabled: bool = True  # evaluate before training and after each stage
    examples: int = 64  # per task (mc, temporal, region, mask), rounded up to whole batches
    split: str = "validation"
    every_steps: int = 0  # also evaluate every N steps inside a stage (0: only before / after each stage)
    generate: bool = True  # the final evaluation also scores generated answers (gen/... keys; evaluate_generate)

    def validate(self, prefix: str = "eval.") -> None:
        check_positive(self, prefix, "examples")
        check_field(isinstance(self.generate, bool), prefix + "generate",
                    f"must be true or false, got {self.generate!r}")
        check_field(isinstance(self.every_steps, int) and self.every_steps >= 0, prefix + "every_steps",
                    f"must be an integer >= 0, got {self.every_steps!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: C.TPOConfig
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: RunOptim = dataclasses.field(default_factory=RunOptim)
    stage1: StageRun = StageRun("stage1")
    stage2: StageRun = StageRun("stage2")
    stage3: StageRun = StageRun("stage3")
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sharding: str = "fsdp"  # rules table of tpo_jax.sharding
    devices: int = 0  # train on the first N devices (0: all)
    sharded_init: bool = False  # create the model directly in its shards (big models) instead of on the host
    seed: int = 0  # model init and dropout
    # pretrained weights the run starts from, merged in order (later sources win): converted VideoChat-TPO or
    # Hugging Face LLM directories (tpo-convert) or earlier tpo-train work directories; what none covers keeps
    # its `seed` initialisation (tpo_jax.train.init_from)
    init_from: tuple[str, ...] = ()
    micro_batches: int = 1
    dropout: bool = True
    loss_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    lm_rows: int = 0  # LM logits only at the first N label positions per sample (0: every position); tpo_jax.train.step
    log_every: int = 1  # TensorBoard / history every N steps
    max_nonfinite: int = 10  # stop the run when more steps than this were rejected (tpo_jax.train.nonfinite)
    max_update_ratio: float = MAX_UPDATE_RATIO  # a step whose ‖update‖ exceeds this × ‖params‖ is rejected
    # peak FLOP/s of one device in TFLOP/s, the denominator of the logged MFU; 0: the chip's (tpo_jax.train.chips),
    # and no MFU where the device has no entry (a CPU)
    peak_tflops: float = 0.0
    # (first, last): write a jax.profiler trace of these steps of each trained stage to WORKDIR/profile/<stage>
    profile_steps: tuple[int, ...] = ()

    def stage(self, name: str) -> StageRun:
        check_field(name in STAGES, "stages", f"unknown stage {name!r}; known: {list(STAGES)}")
        return getattr(self, name)

    def data_config(self, name: str) -> DataConfig:
        """The data config of stage `name` (its own task weights, if set)."""
        weights = self.stage(name).data_weights
        return self.data if weights is None else dataclasses.replace(self.data, weights=dict(weights))

    def train_config(self, name: str) -> TrainConfig:
        stage = self.stage(name)
        weights = {**self.loss_weights, **(stage.loss_weights or {})}
        return TrainConfig(stage=stage.recipe, micro_batches=self.micro_batches, dropout=self.dropout,
                           loss_weights=weights, optim=self.optim.for_stage(stage),
                           lm_rows=self.lm_rows)

    def validate(self) -> "RunConfig":
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        for name in STAGES:
            self.stage(name).validate(f"{name}.")
            train_cfg = self.train_config(name)
            train_cfg.validate()
            peaks = {g: train_cfg.optim.peak_lr(g, lr) for g, lr in get_recipe(train_cfg.stage).learning_rates.items()}
            check_field(all(math.isfinite(v) for v in peaks.values()), f"{name}.lr_scale",
                        f"the peak learning rates of {name} are not finite numbers: {peaks} (optim.lr, optim.lr_scale, "
                        f"{name}.lr_scale and {name}.group_lr_scale multiply)")
        self.checkpoint.validate()
        self.eval.validate()
        get_rules(self.sharding)
        check_field(isinstance(self.init_from, tuple) and all(isinstance(p, str) and p for p in self.init_from),
                    "init_from", f"must be a list of directory paths, got {self.init_from!r}")
        check_positive(self, "", "micro_batches", "log_every")
        check_field(isinstance(self.max_update_ratio, (int, float)) and not isinstance(self.max_update_ratio, bool)
                    and math.isfinite(self.max_update_ratio) and self.max_update_ratio > 0, "max_update_ratio",
                    f"must be a finite number > 0, got {self.max_update_ratio!r}")
        check_field(isinstance(self.peak_tflops, (int, float)) and not isinstance(self.peak_tflops, bool)
                    and self.peak_tflops >= 0, "peak_tflops", f"must be a number >= 0, got {self.peak_tflops!r}")
        p = self.profile_steps
        check_field(p == () or (isinstance(p, tuple) and len(p) == 2 and all(isinstance(v, int) for v in p)
                                and 1 <= p[0] <= p[1]), "profile_steps",
                    f"must be empty or [first, last] step numbers with 1 <= first <= last, got {p!r}")
        for name in ("devices", "max_nonfinite", "seed"):
            v = getattr(self, name)
            check_field(isinstance(v, int) and v >= 0, name, f"must be an integer >= 0, got {v!r}")
        check_field(self.data.batch_size % self.micro_batches == 0, "micro_batches",
                    f"{self.micro_batches} must divide data.batch_size {self.data.batch_size}")
        micro, group = self.data.batch_size // self.micro_batches, self.model.heads.temporal.criterion_group
        check_field(self.micro_batches == 1 or micro % group == 0, "model.heads.temporal.criterion_group",
                    f"{group} must divide the micro-batch size {micro} (data.batch_size / micro_batches), or the temporal "
                    f"criterion's row groups straddle micro-batches and gradient accumulation is not exact")
        least = shortest_example(self.model)
        check_field(self.data.seq_len > least, "data.seq_len",
                    f"{self.data.seq_len} is too short: the prompt alone ({self.model.num_visual_tokens} visual tokens "
                    f"and the {self.model.arch} template, an empty question and answer) takes {least} tokens; each "
                    f"example must fit (the tiny run uses 128, llava_ov_tpo_tiny 256)")
        return self

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@functools.lru_cache(maxsize=None)
def shortest_example(model: C.TPOConfig) -> int:
    """Tokens of the shortest possible example of `model` (either architecture): the video prompt with an empty
    question and answer (`tpo_jax.data.conversation.tokenize_dialogue`; arch "llava_ov": the ChatML prompt with the
    default system message, through `model_tokenizer(model)`). Where that tokenizer cannot be loaded here (e.g. the
    7B preset before `model.llava_ov.tokenizer` is set), a lower bound: the visual rows, the chat tokens, and one
    token for each text piece between them."""
    from tpo_jax.data.conversation import chatml_prompt_texts, tokenize_dialogue  # noqa: PLC0415
    from tpo_jax.tokenizer import MultimodalTokenizer, TokenizerError  # noqa: PLC0415
    if model.arch == "videochat":
        tok = MultimodalTokenizer(num_visual_tokens=model.num_visual_tokens)
    else:
        from tpo_jax.model_tokenizer import model_tokenizer  # noqa: PLC0415
        try:
            tok = model_tokenizer(model)
        except TokenizerError:
            import re  # noqa: PLC0415
            from tpo_jax.llava_ov.tokenizer import IM_END, IM_START, VIDEO_TOKEN  # noqa: PLC0415
            (text,) = chatml_prompt_texts([""])
            pieces = [p for p in re.split("(" + "|".join(map(re.escape, (IM_START, IM_END, VIDEO_TOKEN))) + ")", text)
                      if p]
            return len(pieces) - 1 + model.num_visual_tokens + 1  # <video> → its rows; the answer's <|im_end|>
    ((prompt, _, answer),) = tokenize_dialogue(tok, [("", "")], is_video=True, frame_times=None,
                                               num_visual_tokens=model.num_visual_tokens)
    return len(prompt) + len(answer)


# --- presets -------------------------------------------------------------------------------------------------------

def tiny_train_model() -> C.TPOConfig:
    """The model of the default run: the `tiny` preset with 32 visual tokens (16 + 16 Q-Former queries, not
    4 + 4) and dropout off in every module (the synthetic data is endless, and the short CPU run learns
    faster without it).

    With 8 visual tokens the box never reached the `<boxes>` hidden state in a CPU-sized run: region-only
    stage-3 training sat at the mean-box loss for 600 steps; with 32 it learned (docs/training.md,
    "The default run"; `experiments/probe_region_info.py`).
    """
    cfg = C.tiny()
    return C.replace(cfg, **{"qformer.num_query_tokens": 16, "qformer.num_extra_query_tokens": 16,
                             "qformer.hidden_dropout": 0.0, "qformer.attention_dropout": 0.0, "lora.dropout": 0.0,
                             "heads.temporal.dropout": 0.0, "heads.temporal.input_dropout": 0.0}).validate()


def tiny_run() -> RunConfig:
    """The default `tpo-train`: the tiny model from scratch on the synthetic data, ~8.5 min on a 2-core CPU.

    The released model starts TPO from a pretrained video-chat MLLM; this one starts from random weights,
    so stage 1 is longer, mostly conversation and multiple choice, and trains the LLM base too
    (`stage1_scratch`, input embeddings excepted): it stands in for that pretraining (teaching the LLM to
    answer questions about the clip and to copy an option's letter) while it learns the task prompts.
    Stage 3 trains on a region-heavy mixture with the region loss × 3: the box has to travel from the
    visual tokens through the LLM to `<boxes>`, the slowest pathway to learn. LoRA moves at a tenth of
    the LR in stage 2, so the heads learn to read task-token states that stay put instead of undoing
    stage 1. The temporal loss × 2 keeps more of the temporal grounding stage 2 learned, and the LM loss × 2 with a quarter of
    conversation keeps the answers stage 1 learned (docs/training.md, "The default run").
    """
    return RunConfig(
        model=tiny_train_model(),
        data=DataConfig(batch_size=16, seq_len=128),
        optim=RunOptim(warmup_ratio=0.1),
        stage1=StageRun("stage1_scratch", steps=800, lr_scale=100.0,
                        data_weights={"conversation": 0.4, "mc": 0.3, "temporal": 0.1, "region": 0.1, "mask": 0.1}),
        stage2=StageRun("stage2", steps=400, lr_scale=30.0, group_lr_scale={"lora": 0.1}),
        stage3=StageRun("stage3", steps=600, lr_scale=30.0, loss_weights={"region": 3.0, "temporal": 2.0, "lm": 2.0},
                        data_weights={"conversation": 0.25, "mc": 0.1, "temporal": 0.15, "region": 0.35,
                                      "mask": 0.15}),
        checkpoint=CheckpointConfig(every_steps=100, keep=2),
        eval=EvalConfig(examples=256),
        dropout=False,
        lm_rows=16,  # synthetic answers have at most 9 label tokens; logits at 16 rows, not 128 (~2-7x faster steps)
    )


# --- the paper's recipe (PAPER.md §3, Tab.17 / Tab.18) --------------------------------------------------------------

#: The paper's total (global) batch size, every stage (Tab.17 / the stage-1 and stage-3 prose; see
#: `videochat_tpo_7b_run`). `data.batch_size` is PER HOST (`tpo_jax.data.pipeline.DataConfig`): with N hosts feeding
#: the batch, set `data.batch_size = PAPER_GLOBAL_BATCH // N` (N must divide 128).
PAPER_GLOBAL_BATCH = 128

#: Where the preset looks for the built datasets (placeholders: override `data.source`). Each entry of
#: `PAPER_DATASETS` is one `tpo-build-data records --data-dir {PAPER_DATA_ROOT}/<entry> --inputs <entry>.json
#: --model-config videochat_tpo_7b` build, whose dataset directory is `<data-dir>/tpo_records/1.1.0` (the builder
#: `tpo_jax.data.builders.TpoRecords`, version `tpo_jax.data.record_codec.VERSION`).
PAPER_DATA_ROOT = "data/tfds"
PAPER_DATASETS = {  # directory → the paper's datasets it holds (Tab.1 / Tab.18), as records of one task
    "temporal_grounding": "temporal: DiDeMo, QuerYD, HiREST, ActivityNet Captions, TACoS, Ego4D-NLQ, QVHighlights",
    "spatial_grounding": "region: AS-V2, Visual Genome, RefCOCO, RefCOCO+, RefCOCOg",
    "segmentation": "mask: MeViS, SA-V (SAMv2)",
    "conversation": "conversation: VideoChat2-IT, ShareGPT-4o, LLaVA-Hound-DPO, ShareGPT4V, and the temporal-reasoning "
                    "YouCook2 / ActivityNet dialogues",
}
PAPER_DATA_BUILD = "tpo_records/1.1.0"  # <builder name>/<version> below a --data-dir


def paper_data_dirs(root: str = PAPER_DATA_ROOT) -> tuple[str, ...]:
    """The dataset directories of `PAPER_DATASETS` under `root` (they need not exist until training reads them)."""
    return tuple(f"{root}/{name}/{PAPER_DATA_BUILD}" for name in PAPER_DATASETS)


#: Examples each stage sees per task of this project: Tab.18's data volume × Tab.17's epochs. They are the stages'
#: task mixtures (`StageRun.data_weights`, normalised by the pipeline) and, over `PAPER_GLOBAL_BATCH`, their steps.
PAPER_STAGE_EXAMPLES: dict[str, dict[str, int]] = {
    # stage 1, task assignment: 50K per task, 1 epoch (LM loss only: the LLM learns to emit the task tokens)
    "stage1": {"temporal": 50_000, "region": 50_000, "mask": 50_000},
    # stage 2, vision-task training: temporal 116.5K × 25 epochs, region 540.0K × 1, mask 114.6K × 3
    "stage2": {"temporal": 116_500 * 25, "region": 540_000 * 1, "mask": 114_600 * 3},
    # stage 3, multi-task with conversation, 3 epochs: temporal 7.5K (QVHighlights), region 400K, mask 116.5K,
    # conversation 3M + 40K temporal-reasoning dialogues (Tab.1 lists YouCook2 / ActivityNet under conversation)
    "stage3": {"temporal": 7_500 * 3, "region": 400_000 * 3, "mask": 116_500 * 3, "conversation": 3_040_000 * 3},
}


def paper_steps(stage: str, global_batch: int = PAPER_GLOBAL_BATCH) -> int:
    """Steps of `stage` that show it `PAPER_STAGE_EXAMPLES[stage]` examples at `global_batch` (rounded up):
    stage1 150,000 / 128 = 1,171.9 → 1,172; stage2 (2,912,500 + 540,000 + 343,800) = 3,796,300 / 128 = 29,658.6
    → 29,659; stage3 3,564,000 × 3 = 10,692,000 / 128 = 83,531.25 → 83,532."""
    return -(-sum(PAPER_STAGE_EXAMPLES[stage].values()) // global_batch)


def _paper_weights(stage: str) -> dict[str, float]:
    return {task: float(n) for task, n in PAPER_STAGE_EXAMPLES[stage].items()}


def videochat_tpo_7b_run() -> RunConfig:
    """VideoChat-TPO's training recipe (PAPER.md §3.1 Tab.17, §3.2, §4.2 Tab.18) on the 7B model. One setting
    is required and has no default: `init_from`, the pretrained weights (the paper starts stage 1 from its base
    model, the pretrained video-chat MLLM VideoChat2 with Mistral-7B, PAPER.md §1.2); `tpo-train --config
    videochat_tpo_7b` refuses to start without it (`check_required`). The data directories are placeholders
    (`paper_data_dirs`).

        tpo-train --config videochat_tpo_7b --workdir runs/tpo7b --init-from /ckpt/videochat2_7b \\
            --set 'data.source=["/data/tfds/temporal_grounding/tpo_records/1.1.0", ...]'

    From Tab.17 (all three stages): AdamW, cosine decay, warmup ratio 0.2, weight decay 0.02, 224² input,
    16 frames (`model.vit.num_frames`, the only clip length the released position table fits, MODEL-SPEC §10.13),
    LoRA rank 16 / alpha 32, bf16 (`C.videochat_tpo_7b()`: scanned stacks, full remat, bf16 compute), SAM2 frozen.
    Not in the paper, from the released run's training arguments (MODEL-SPEC §0): AdamW β (0.9, 0.999), ε 1e-5,
    cosine down to 5 % of the peak (`min_lr_ratio` 0.05), gradient clipping at global norm 1.0.

    Per stage: the recipe of `tpo_jax.train.stages` (what trains, peak LR), the data (Tab.18 × epochs), the steps:
    * stage 1, task assignment: `stage1`, LoRA 2e-5 (LM loss only); temporal, region, mask 50K each, 1 epoch;
      1,172 steps.
    * stage 2, vision tasks: `stage2`, LoRA 2e-5, temporal head 1e-4 and token 2e-4, region head and box token
      1e-4, mask adapter and track token 1e-4; temporal 116.5K × 25 epochs, region 540K × 1, mask 114.6K × 3;
      29,659 steps.
    * stage 3, multi-task: `stage3`, LoRA, vision encoder, connector, every head and token 2e-5; conversation
      3.04M, region 400K, mask 116.5K, temporal 7.5K, × 3 epochs; 83,532 steps.

    The recipes' LRs are Tab.17's, so no stage sets `lr_scale` / `group_lr_scale`. Each stage's task mixture
    (`data_weights`) is the number of examples of each task it sees, and its steps are those examples over the
    global batch of 128 (`PAPER_STAGE_EXAMPLES`, `paper_steps`). `data.batch_size` is per host; the preset's 128
    is one host (one v5p-8, 4 chips, 32 examples per chip; `PAPER_GLOBAL_BATCH`): with N hosts set
    `data.batch_size` to 128 / N to keep the paper's global batch.

    Deviations and assumptions (PAPER.md §3.1 lists the paper's own inconsistencies):
    * Stage 2 trains the three heads together (the `stage2` recipe, each head at its own LRs) in one stage with
      one batch size; the paper trains each head and its token separately ("respectively"), temporal at batch
      64 for 25 epochs, region at 128 for 1 epoch, mask at 128 for 3 epochs. The mixture keeps each head's number
      of training examples (temporal 77 %, region 14 %, mask 9 % of each batch); the separate recipes
      (`stage2_temporal`, `stage2_region`, `stage2_mask`) remain for runs that want them one at a time.
    * Stage-2 region and mask LRs follow the table (1e-4); the prose says 2e-5: to follow the prose set
      `stage2.group_lr_scale={"region_head": 0.2, "box_token": 0.2, "mask_adapter": 0.2, "track_token": 0.2,
      "loc_encoder": 0.2}`. The `<track_box>` encoder (`loc_encoder`) is not in Tab.17; it trains with the mask
      path (1e-4 in stage 2, 2e-5 in stage 3), as the recipes have it.
    * Stage-3 batch: the prose says 128, Tab.17 says 256. The preset uses 128 everywhere (the prose, the stage-1
      setting, and the released run's training arguments: 32 GPUs × 2 × 2 accumulation = 128, MODEL-SPEC §0);
      a run has one batch size for all stages (`data` is one section). At 256, stage 3 would be 41,766 steps.
    * Stage 3's "w/o Con." column (task data only, 1 epoch; presumably Tab.12's row 5) is not run: a run has
      three stages, and stage 3 here is Tab.17's "Stage 3" (task data + conversation, 3 epochs).
    * Every stage reads the same `data.source` (a run has one `data` section, part of its checkpoints' identity),
      so a task's examples come from all its datasets in every stage: stage 1's temporal examples are not only
      DiDeMo / QuerYD, stage 3's not only QVHighlights. The example counts per task are the paper's.
    * Task data and conversation only: no `mc` (MVBench-style) training records; the in-loop evaluation
      (`eval`) reads `validation_<task>` splits of mc, temporal, region and mask from `data.source` (build them,
      or set `eval.enabled=false` and score checkpoints with `tpo-eval` later).
    * Not in the paper: sequence length 1024 tokens (96 visual tokens + prompt; the longest templated task
      example is 251 tokens, docs/data_pipeline.md; conversations longer than 1024 drop trailing turns). The
      7B step was compiled for a v5p at seq 512 and 16 examples per chip (14.9 GiB per chip with full remat,
      docs/benchmarks.md); seq 1024 at 32 per chip is not measured — `micro_batches=2` halves the activations.
    * Dropout on, at the model config's (released) rates; loss weights 1 (the paper gives none, PAPER.md §2.4).
    """
    return RunConfig(
        model=C.videochat_tpo_7b(),
        data=DataConfig(source=paper_data_dirs(), batch_size=PAPER_GLOBAL_BATCH, seq_len=1024),
        # Tab.17: warmup ratio 0.2, weight decay 0.02; min_lr_ratio 0.05 and the rest (β, ε, clipping) are the
        # released run's (OptimConfig's defaults)
        optim=RunOptim(warmup_ratio=0.2, weight_decay=0.02, min_lr_ratio=0.05),
        # peak LRs: the recipes' own, which are Tab.17's (no lr_scale / group_lr_scale)
        stage1=StageRun("stage1", steps=paper_steps("stage1"), data_weights=_paper_weights("stage1")),
        stage2=StageRun("stage2", steps=paper_steps("stage2"), data_weights=_paper_weights("stage2")),
        stage3=StageRun("stage3", steps=paper_steps("stage3"), data_weights=_paper_weights("stage3")),
        checkpoint=CheckpointConfig(every_steps=500, keep=2),
        sharded_init=True,
    )


def llava_ov_tpo_tiny_run() -> RunConfig:
    """`tiny_run` on the LLaVA-OV architecture: the `llava_ov_tpo_tiny` model with 4 px SigLIP patches (an 8 × 8
    grid pooled to 4 × 4: 4 frames × 16 + 1 = 65 video rows, about the 32 visual tokens `tiny_run` found the region
    box needs, docs/training.md) and dropout off, the same stages, data mixtures and learning rates, and 288-token
    examples (the ChatML prompt with the system message and the tiny Qwen2 tokenizer's shorter pieces is longer
    than the Mistral one: the longest synthetic temporal example has 263 tokens)."""
    base = tiny_run()
    model = C.replace(C.llava_ov_tpo_tiny(), **{
        "llava_ov.siglip.patch_size": 4, "llava_ov.anyres.patch_size": 4, "lora.dropout": 0.0,
        "heads.temporal.dropout": 0.0, "heads.temporal.input_dropout": 0.0}).validate()
    return dataclasses.replace(base, model=model, data=dataclasses.replace(base.data, seq_len=288))


def llava_ov_tpo_7b_run() -> RunConfig:
    """`videochat_tpo_7b_run`'s recipe (stages, data, steps, optimiser) on the `llava_ov_tpo_7b` model (PAPER.md
    §1.3: the paper gives no separate recipe for LLaVA-OV-TPO). Required: `init_from` (a `tpo-convert llava_ov`
    directory of LLaVA-OneVision-7B) and `model.llava_ov.tokenizer` (that checkpoint's directory, for the Qwen2
    tokenizer). 32 frames give 6,273 video rows, so examples are 8,192 tokens long."""
    base = videochat_tpo_7b_run()
    return dataclasses.replace(base, model=C.llava_ov_tpo_7b(), data=dataclasses.replace(base.data, seq_len=8192))


RUN_PRESETS = {"tiny": tiny_run, "videochat_tpo_7b": videochat_tpo_7b_run, "llava_ov_tpo_tiny": llava_ov_tpo_tiny_run,
               "llava_ov_tpo_7b": llava_ov_tpo_7b_run}

#: Settings a run preset cannot default. Its config validates without them (tests and tools read the preset), but
#: `tpo-train` / `tpo-eval --config <preset>` refuse to start until they are set (`check_required`).
REQUIRED_SETTINGS: dict[str, tuple[str, ...]] = {"videochat_tpo_7b": ("init_from",),
                                                  "llava_ov_tpo_7b": ("init_from", "model.llava_ov.tokenizer")}
_REQUIRED_HINTS = {
    "init_from": "the pretrained weights to start from, e.g. --init-from /ckpt/videochat_tpo (or "
                 "--set 'init_from=[...]'): tpo-convert output directories (a Hugging Face Mistral-7B, the "
                 "released VideoChat-TPO) or an earlier tpo-train work directory",
    "model.llava_ov.tokenizer": "the directory of the LLaVA-OV checkpoint's Qwen2 tokenizer (tokenizer.json), e.g. "
                                "--set model.llava_ov.tokenizer=/ckpt/llava-onevision-qwen2-7b-ov-hf",
}


def check_required(cfg: RunConfig, preset: str) -> RunConfig:
    """`cfg` (preset `preset` with the user's overrides) if every setting `REQUIRED_SETTINGS[preset]` is set,
    else one ConfigError naming the first missing one."""
    for name in REQUIRED_SETTINGS.get(preset, ()):
        value = functools.reduce(getattr, name.split("."), cfg)
        entries = value if isinstance(value, (tuple, list)) else (value,)
        check_field(bool(value) and all(isinstance(v, str) and v.strip() for v in entries), name,
                    f"the {preset!r} run preset needs it set: {_REQUIRED_HINTS.get(name, 'no default')} "
                    f"(got {value!r})")
    return cfg


def get_run_config(name: str = "tiny") -> RunConfig:
    if name not in RUN_PRESETS:
        raise ConfigError(f"config field 'preset': unknown run preset {name!r}; known: {sorted(RUN_PRESETS)}")
    return RUN_PRESETS[name]().validate()


# --- from JSON -----------------------------------------------------------------------------------------------------

def _convert(tp, value, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config field '{key}': expected a section (dict), got {value!r}")
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            if isinstance(value, list) and typing.get_origin(arg) is tuple:
                return _convert(arg, value, key)
            if not isinstance(value, list) and typing.get_origin(arg) is not tuple:
                return _convert(arg, value, key)
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, key) for v in value)
        return tuple(_convert(a, v, key) for a, v in zip(args, value)) if args else tuple(value)
    if origin in (dict, Mapping, collections.abc.Mapping):
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):  # JSON's NaN / Infinity
        raise ConfigError(f"config field '{key}': must be a finite number, got {value!r}")
    return value


def from_dict(cls, d: Mapping[str, Any], prefix: str = ""):
    """Rebuild the dataclass `cls` from `to_dict` output (unknown keys are errors)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"config field '{prefix}{unknown[0]}': {cls.__name__} has no such field")
    return cls(**{k: _convert(hints[k], v, prefix + k) for k, v in d.items()})


def load_run_config(path: str) -> RunConfig:
    """The RunConfig saved as JSON (a work directory's config.json)."""
    with open(path) as f:
        return from_dict(RunConfig, json.load(f)).validate()

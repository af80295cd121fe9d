"""The config of a training run (`tpo-train`): model, data, optimizer, the three stages, checkpoints,
evaluation, mesh; presets; and the dotted `key=value` overrides of `tpo_jax.overrides`.

    cfg = get_run_config("tiny")                              # the default run
    cfg = apply_overrides(cfg, ["optim.lr=1e-4", "model.llm.num_layers=4", "stage2.steps=50"])

Stages run in the order stage1 → stage2 → stage3; each starts from the previous one's final
checkpoint. A stage's optimizer has `steps` total steps (warmup + cosine over them) and the peak LRs
of its recipe (`tpo_jax.train.stages`) times `optim.lr_scale × stageN.lr_scale`, or, with `optim.lr` set,
peak LRs rescaled so the stage's fastest group gets `optim.lr` (ratios between groups kept).

The `tiny` preset trains a from-scratch model, so its LRs are far above the paper's (which fine-tune
pretrained weights): see docs/training.md for the choices.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import types
import typing
from typing import Any, Mapping

from tpo_jax.data.pipeline import DataConfig
from tpo_jax.checkpoints.manager import CheckpointConfig
from tpo_jax import config as C
from tpo_jax.config import ConfigError, check_field, check_positive
from tpo_jax.sharding import MeshConfig, get_rules
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
    micro_batches: int = 1
    dropout: bool = True
    loss_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    lm_rows: int = 0  # LM logits only at the first N label positions per sample (0: every position); tpo_jax.train.step
    log_every: int = 1  # TensorBoard / history every N steps
    max_nonfinite: int = 10  # stop the run when more steps than this had a non-finite loss or gradient

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
            self.train_config(name).validate()
        self.checkpoint.validate()
        self.eval.validate()
        get_rules(self.sharding)
        check_positive(self, "", "micro_batches", "log_every")
        for name in ("devices", "max_nonfinite", "seed"):
            v = getattr(self, name)
            check_field(isinstance(v, int) and v >= 0, name, f"must be an integer >= 0, got {v!r}")
        check_field(self.data.batch_size % self.micro_batches == 0, "micro_batches",
                    f"{self.micro_batches} must divide data.batch_size {self.data.batch_size}")
        micro, group = self.data.batch_size // self.micro_batches, self.model.heads.temporal.criterion_group
        check_field(self.micro_batches == 1 or micro % group == 0, "model.heads.temporal.criterion_group",
                    f"{group} must divide the micro-batch size {micro} (data.batch_size / micro_batches), or the temporal "
                    f"criterion's row groups straddle micro-batches and gradient accumulation is not exact")
        least = shortest_example(self.model.num_visual_tokens)
        check_field(self.data.seq_len > least, "data.seq_len",
                    f"{self.data.seq_len} is too short: the prompt alone ({self.model.num_visual_tokens} visual tokens "
                    f"and the template, an empty question and answer) takes {least} tokens; each example must fit "
                    f"(the tiny run uses 128)")
        return self

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@functools.lru_cache(maxsize=None)
def shortest_example(num_visual_tokens: int) -> int:
    """Tokens of the shortest possible example: the video prompt with an empty question and answer."""
    from tpo_jax.data.conversation import tokenize_dialogue  # noqa: PLC0415
    from tpo_jax.tokenizer import MultimodalTokenizer  # noqa: PLC0415
    tok = MultimodalTokenizer(num_visual_tokens=num_visual_tokens)
    ((prompt, _, answer),) = tokenize_dialogue(tok, [("", "")], is_video=True, frame_times=None)
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


def paper_run() -> RunConfig:
    """The paper's recipe shapes (Table 17 LRs, dropout on) on the 7B model; data and steps to be set."""
    return RunConfig(model=C.videochat_tpo_7b(), data=DataConfig(batch_size=8, seq_len=1024),
                     stage1=StageRun("stage1", steps=1000), stage2=StageRun("stage2", steps=1000),
                     stage3=StageRun("stage3", steps=1000), checkpoint=CheckpointConfig(every_steps=500, keep=2),
                     sharded_init=True)


RUN_PRESETS = {"tiny": tiny_run, "videochat_tpo_7b": paper_run}


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

"""The three TPO training stages (PAPER.md §3, Table 17) as named recipes.

A recipe says which parameter groups train, at which peak learning rate, and which head losses
are on. Every parameter of the model belongs to exactly one group (`param_group`); groups not in
a recipe are frozen: they are split off before the optimizer is built, so they get no optimizer
state and stay bit-identical. The SAM2 weights (`sam2`) are frozen in every recipe; the TPO recipes
keep the LLM base weights (`llm`, and its input embeddings `llm_embed`) frozen too (LoRA trains
instead). Only `stage1_scratch` trains the LLM base: it is for an LLM that starts from random weights
(the tiny default run), where stage 1 stands in for the language-model pretraining the released model
starts from. It leaves the input embeddings at their initialisation: the temporal head reads them as
query-text features, and with them trained in stage 1 the default run's temporal R1@0.5 ended at 0.23
instead of 0.52 (docs/training.md, "How the default got here (MC)").

| recipe           | trains (peak LR)                                                               | head losses      |
|------------------|--------------------------------------------------------------------------------|------------------|
| stage1           | LoRA 2e-5                                                                      | none (LM only)   |
| stage1_scratch   | LoRA 2e-5, LLM base (not its input embeddings) 2e-5                            | none (LM only)   |
| stage2_region    | LoRA 2e-5, region head 1e-4, box token 1e-4                                    | region           |
| stage2_temporal  | LoRA 2e-5, temporal head 1e-4, temporal token 2e-4                             | temporal         |
| stage2_mask      | LoRA 2e-5, mask adapter + loc_encoder 1e-4, track token 1e-4                   | mask             |
| stage2           | the three stage-2 recipes at once, each head with its own LRs                  | all              |
| stage3           | LoRA, vision encoder, connector, all heads and tokens, loc_encoder, all 2e-5   | all              |

The groups of both architectures: `vision` is the UMT ViT or the SigLIP tower (`vision.vision_tower`); `connector`
is the Q-Former with `project_up`, or LLaVA-OV's projector and `image_newline` (`vision.projector`,
`vision.image_newline`).

Stage-2 region/mask LRs follow Table 17 (1e-4); the paper's prose says 2e-5 — pass
`lr_scale` or edit the recipe to follow the prose.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

GROUPS = ("lora", "llm", "llm_embed", "vision", "connector", "loc_encoder", "box_token", "temporal_token", "track_token",
          "region_head", "temporal_head", "mask_adapter", "sam2")
ALWAYS_FROZEN = ("sam2",)


def param_group(path: tuple) -> str:
    """The group of the parameter at `path` (a tuple of attribute names / indices from the model root)."""
    keys = [str(p) for p in path]
    top = keys[0]
    if keys[-1] in ("lora_a", "lora_b"):
        return "lora"
    if top == "llm" and len(keys) > 1 and keys[1] == "embed_tokens":
        return "llm_embed"
    if top == "vision" and len(keys) > 1 and keys[1] in ("projector", "image_newline"):
        return "connector"  # LLaVA-OV: the projector and newline row connect the tower to the LLM
    return {
        "llm": "llm", "vision": "vision", "qformer": "connector", "loc_encoder": "loc_encoder",
        "box_token": "box_token", "temporal_token": "temporal_token", "track_token": "track_token",
        "region_head": "region_head", "temporal_head": "temporal_head", "mask_head": "mask_adapter",
        "sam2": "sam2",
    }.get(top) or _unknown(path)


def _unknown(path):
    raise KeyError(f"parameter {'.'.join(map(str, path))} belongs to no training group; add it to "
                   f"tpo_jax.train.stages.param_group")


@dataclasses.dataclass(frozen=True)
class StageRecipe:
    name: str
    learning_rates: Mapping[str, float]  # group → peak LR; groups not listed are frozen
    heads: tuple[str, ...]  # head losses that are on

    def __post_init__(self):
        unknown = set(self.learning_rates) - set(GROUPS)
        if unknown:
            raise ValueError(f"stage {self.name!r}: unknown parameter group(s) {sorted(unknown)}; known: {GROUPS}")
        frozen_trained = set(self.learning_rates) & set(ALWAYS_FROZEN)
        if frozen_trained:
            raise ValueError(f"stage {self.name!r}: {sorted(frozen_trained)} stay frozen in every stage")

    @property
    def trainable_groups(self) -> frozenset[str]:
        return frozenset(self.learning_rates)

    def scaled(self, lr_scale: float) -> "StageRecipe":
        return dataclasses.replace(self, learning_rates={g: lr * lr_scale for g, lr in self.learning_rates.items()})


_REGION = {"region_head": 1e-4, "box_token": 1e-4}
_TEMPORAL = {"temporal_head": 1e-4, "temporal_token": 2e-4}
_MASK = {"mask_adapter": 1e-4, "track_token": 1e-4, "loc_encoder": 1e-4}
_STAGE3 = ("lora", "vision", "connector", "loc_encoder", "box_token", "temporal_token", "track_token",
           "region_head", "temporal_head", "mask_adapter")

RECIPES: dict[str, StageRecipe] = {
    "stage1": StageRecipe("stage1", {"lora": 2e-5}, ()),
    "stage1_scratch": StageRecipe("stage1_scratch", {"lora": 2e-5, "llm": 2e-5}, ()),
    "stage2_region": StageRecipe("stage2_region", {"lora": 2e-5, **_REGION}, ("region",)),
    "stage2_temporal": StageRecipe("stage2_temporal", {"lora": 2e-5, **_TEMPORAL}, ("temporal",)),
    "stage2_mask": StageRecipe("stage2_mask", {"lora": 2e-5, **_MASK}, ("mask",)),
    "stage2": StageRecipe("stage2", {"lora": 2e-5, **_REGION, **_TEMPORAL, **_MASK},
                          ("region", "temporal", "mask")),
    "stage3": StageRecipe("stage3", {g: 2e-5 for g in _STAGE3}, ("region", "temporal", "mask")),
}


def get_recipe(name: str) -> StageRecipe:
    if name not in RECIPES:
        raise ValueError(f"config field 'train.stage': unknown stage {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]

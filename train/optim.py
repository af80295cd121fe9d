"""AdamW with warmup + cosine decay, global-norm clipping and per-group learning rates.

Defaults follow the released run (MODEL-SPEC §0; PAPER Table 17): AdamW β = (0.9, 0.999), ε = 1e-5,
weight decay 0.02 (not on biases, norm scales or 1-D vectors), warmup ratio 0.2, cosine decay to
5 % of the peak, gradient clipping at global norm 1.0.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import optax

from tpo_jax.config_fields import check_field, check_positive
from tpo_jax.train.stages import GROUPS, StageRecipe, param_group
from tpo_jax.tree_paths import keypath_to_path


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    total_steps: int = 1000
    warmup_ratio: float = 0.2
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.02
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-5
    grad_clip: float = 1.0  # global norm; <= 0 disables clipping
    lr_scale: float = 1.0  # multiplies every group's peak LR
    group_lr_scale: Mapping[str, float] = dataclasses.field(default_factory=dict)  # group → extra LR factor

    def peak_lr(self, group: str, recipe_lr: float) -> float:
        """The peak LR of `group` whose recipe LR is `recipe_lr`."""
        return recipe_lr * self.lr_scale * self.group_lr_scale.get(group, 1.0)

    def validate(self, prefix: str = "optim.") -> None:
        check_positive(self, prefix, "total_steps")
        unknown = sorted(set(self.group_lr_scale) - set(GROUPS))
        check_field(not unknown, prefix + "group_lr_scale", f"unknown group(s) {unknown}; known: {list(GROUPS)}")
        check_field(all(v > 0 for v in self.group_lr_scale.values()), prefix + "group_lr_scale",
                    f"must be positive, got {dict(self.group_lr_scale)}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            check_field(0.0 <= getattr(self, name) <= 1.0, prefix + name, f"must be in [0, 1], got {getattr(self, name)!r}")


def schedule(peak: float, cfg: OptimConfig) -> optax.Schedule:
    warmup = int(round(cfg.warmup_ratio * cfg.total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(cfg.total_steps, warmup + 1),
        end_value=peak * cfg.min_lr_ratio)


def _decays(path, leaf) -> bool:
    return getattr(leaf, "ndim", 0) >= 2 and str(path[-1]) not in ("bias", "scale")


def decay_mask(params):
    """True for the leaves that get weight decay: matrices and embeddings, not biases, norms or vectors."""
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: _decays(keypath_to_path(kp), leaf), params)


def group_labels(params):
    """A pytree like `params` (an nnx.State of trainable params) holding each leaf's group name."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: param_group(keypath_to_path(kp)), params)


def make_optimizer(recipe: StageRecipe, params, cfg: OptimConfig) -> optax.GradientTransformation:
    """The optimizer for the trainable `params` of `recipe` (frozen groups must already be split off)."""
    labels = group_labels(params)
    present = set(jax.tree.leaves(labels))
    missing = present - recipe.trainable_groups
    if missing:
        raise ValueError(f"stage {recipe.name!r}: trainable params of frozen group(s) {sorted(missing)}")
    transforms = {
        group: optax.adamw(schedule(cfg.peak_lr(group, lr), cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask)
        for group, lr in recipe.learning_rates.items() if group in present
    }
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*chain, optax.multi_transform(transforms, labels))


def learning_rates(recipe: StageRecipe, cfg: OptimConfig, step) -> dict[str, jax.Array]:
    """Current LR of every trainable group (for logging)."""
    return {f"lr/{g}": schedule(cfg.peak_lr(g, lr), cfg)(step) for g, lr in recipe.learning_rates.items()}

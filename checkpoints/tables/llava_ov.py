"""A whole LLaVA-OneVision checkpoint <-> `tpo_jax.llava_ov.model.LlavaOV` (vision side + Qwen2 decoder).

The table is the two component tables side by side: `llava_ov_vision.vision(…, dst="vision.")` for the SigLIP
tower, projector and image_newline, and `llm.hf_llm(attention_bias=…, layout=…)` for the decoder (`llm.*`).
One layout name picks both spellings:

    layout          vision keys (llava_ov_vision)        decoder keys (llm.HF_LAYOUTS)
    transformers5   model.vision_tower.…, model.…        model.language_model.…, lm_head.…   (5.25 state_dict)
    transformers4   model.vision_tower.vision_model.…    model.language_model.…, lm_head.…   (4.52 – 4.57)
    release         vision_tower.vision_model.…, …       language_model.model.…, language_model.lm_head.…
                                                         (the llava-hf Hub safetensors)
    saved5          vision_tower.…, …                    language_model.model.…, language_model.lm_head.…
                                                         (what 5.25 `save_pretrained` writes)

Every key of a checkpoint is mapped, kept as an extra (SigLIP's `post_layernorm`, which LLaVA-OV does not read)
or dropped (recomputed buffers); any other key is an error that names it. Every op only moves bytes, so
export reproduces the checkpoint bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
from flax import nnx

from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.mapping import Meta, Rule, build_export_plan, build_plan
from tpo_jax.checkpoints.sources import TensorSource, open_source
from tpo_jax.checkpoints.tables import llava_ov_vision, llm
from tpo_jax.config import LLMConfig, SiglipConfig
from tpo_jax.llava_ov.model import LlavaOV, LlavaOVConfig, stack_layouts
from tpo_jax.stack import stack_params, unstack_params, unstack_shapes

# layout -> (llava_ov_vision layout, llm.HF_LAYOUTS layout)
LAYOUTS: dict[str, tuple[str, str]] = {
    "transformers5": ("transformers5", "llava"),
    "transformers4": ("transformers4", "llava"),
    "release": ("release", "llava_legacy"),
    "saved5": ("saved5", "llava_legacy"),
}


def _layouts(layout: str) -> tuple[str, str]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LLaVA-OV key layout {layout!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


def base_rules(siglip: SiglipConfig, llm_cfg: LLMConfig, layout: str = "transformers5") -> list[Rule]:
    """Every key of a LLaVA-OV checkpoint in `layout` -> `vision.*` (tower, projector, image_newline) and `llm.*`:
    the paths of `LlavaOV` and of a `TPOModel` of arch "llava_ov" alike (import direction)."""
    v, d = _layouts(layout)
    return (llava_ov_vision.vision(v, dst="vision.", post_layernorm=siglip.post_layernorm)
            + llm.hf_llm(tie=llm_cfg.tie_embeddings, attention_bias=llm_cfg.attention_bias, layout=d))


def base_export_rules(siglip: SiglipConfig, llm_cfg: LLMConfig, layout: str = "transformers5", *,
                      lora_modules=(), scaling: float = 1.0) -> list[Rule]:
    """`vision.*` and `llm.*` -> the keys of `layout`; adapters of `lora_modules` (kept LoRA of a trained model)
    are merged into their weights (W + scaling·B·A)."""
    v, d = _layouts(layout)
    return (llava_ov_vision.vision(v, dst="vision.", post_layernorm=siglip.post_layernorm)
            + llm.hf_llm_export(tie=llm_cfg.tie_embeddings, lora_modules=tuple(lora_modules), merged=True,
                                scaling=scaling, layout=d))


def rules(cfg: LlavaOVConfig, layout: str = "transformers5") -> list[Rule]:
    """Every key of a LLaVA-OV checkpoint in `layout` -> `LlavaOV(cfg)` parameters (import direction)."""
    return base_rules(cfg.siglip, cfg.llm, layout)


def export_rules(cfg: LlavaOVConfig, layout: str = "transformers5") -> list[Rule]:
    """Our parameters -> the keys of `layout` (LoRA, if any, merged into the weights)."""
    return base_export_rules(cfg.siglip, cfg.llm, layout)


def detect_layout(keys) -> str:
    """The layout of a checkpoint from its keys (the vision tower's spelling decides; ConversionError if none)."""
    return llava_ov_vision.detect_layout(keys)


def _flat(state: nnx.State) -> dict[str, nnx.Variable]:
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _source(checkpoint) -> TensorSource:
    if isinstance(checkpoint, TensorSource):
        return checkpoint
    if isinstance(checkpoint, (str, Path)):
        return open_source(checkpoint)
    arrays = dict(checkpoint)
    meta = {k: Meta(tuple(np.shape(x)), np.asarray(x).dtype, "<state dict>") for k, x in arrays.items()}

    class _Dict:
        def read(self, key):
            return np.asarray(arrays[key])

    return TensorSource(meta, {"<state dict>": _Dict()}, "<state dict>")


def load_state_dict(cfg: LlavaOVConfig, checkpoint, *, state: nnx.State | None = None,
                    layout: str | None = None) -> tuple[nnx.State, dict[str, np.ndarray], dict]:
    """(the nnx.Param state of `LlavaOV(cfg)` filled from `checkpoint`, the extras, the plan summary).

    `checkpoint`: a path (file, index or directory, as `open_source` reads it), a `TensorSource` or a mapping
    of PyTorch names to arrays. Tensors are read one at a time and keep their dtype. `state` defaults to the
    abstract parameter state of `LlavaOV(cfg)`. Unmapped / missing keys and shape mismatches raise
    ConversionError naming the key."""
    source = _source(checkpoint)
    layout = layout or detect_layout(source.meta)
    if state is None:
        state = nnx.state(nnx.eval_shape(lambda: LlavaOV(cfg, rngs=None)), nnx.Param)
    flat = _flat(state)
    layouts = stack_layouts(cfg)
    target = unstack_shapes({p: tuple(v.get_value().shape) for p, v in flat.items()}, layouts)
    plan = build_plan(source.meta, rules(cfg, layout), target, where=source.description)
    values: dict[str, np.ndarray] = {}
    for job in plan.params:
        outs = job.rule.op.forward([source.read(k) for k in job.src])
        values.update({p: np.ascontiguousarray(x) for p, x in zip(job.dst, outs)})
    values = stack_params(values, layouts)
    extras = {job.dst[0]: source.read(job.src[0]) for job in plan.extras}
    new = nnx.from_flat_state([(p, v.replace(values[".".join(map(str, p))])) for p, v in nnx.to_flat_state(state)])
    return new, extras, plan.summary()


def export_state_dict(cfg: LlavaOVConfig, state: nnx.State, extras: Mapping[str, np.ndarray] | None = None, *,
                      layout: str = "transformers5") -> dict[str, np.ndarray]:
    """Inverse of `load_state_dict`: our parameters (+ the kept extras) as the PyTorch keys of `layout`."""
    flat = unstack_params({p: np.asarray(v.get_value()) for p, v in _flat(state).items()}, stack_layouts(cfg))
    extras = dict(extras or {})
    plan = build_export_plan({p: x.shape for p, x in flat.items()}, {p: np.shape(x) for p, x in extras.items()},
                             export_rules(cfg, layout), where="<LlavaOV>")
    out: dict[str, np.ndarray] = {}
    for job in plan.params + plan.extras:
        tree = flat if job.rule.kind == "param" else extras
        for k, x in zip(job.src, job.rule.op.inverse([np.asarray(tree[p]) for p in job.dst])):
            if k in out:
                raise ConversionError("a PyTorch key is produced twice", file="<LlavaOV>", key=k)
            out[k] = np.ascontiguousarray(x)
    return out


__all__ = ["LAYOUTS", "base_rules", "base_export_rules", "rules", "export_rules", "detect_layout", "load_state_dict",
           "export_state_dict"]

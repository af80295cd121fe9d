"""LLaVA-OneVision vision side <-> `tpo_jax.llava_ov.vision.LlavaOVVision` (SigLIP tower, projector, image_newline).

Key names of transformers 5.25 `LlavaOnevisionForConditionalGeneration.state_dict()` (layout "transformers5";
T = `model.vision_tower.`, M = `model.`):

    T embeddings.patch_embedding.weight (O, I, p, p)  -> vision_tower.patch_embed.kernel (p, p, I, O)  (Conv2d)
    T embeddings.patch_embedding.bias                 -> vision_tower.patch_embed.bias
    T embeddings.position_embedding.weight (N, D)     -> vision_tower.position_embedding (N, D)
    T encoder.layers.{i}.layer_norm{1,2}.{weight,bias} -> vision_tower.layers.{i}.layer_norm{1,2}.{scale,bias}
    T encoder.layers.{i}.self_attn.{q,k,v,out}_proj   -> vision_tower.layers.{i}.attn.{q,k,v,out}_proj  (Linear)
    T encoder.layers.{i}.mlp.fc{1,2}                  -> vision_tower.layers.{i}.fc{1,2}                (Linear)
    T post_layernorm.{weight,bias}                    -> extra `unused/…` (LLaVA-OV reads the last layer before it;
                                                         mapped to vision_tower.post_layernorm when the tower
                                                         builds one, `SiglipConfig.post_layernorm`)
    M multi_modal_projector.linear_{1,2}              -> projector.linear_{1,2}                         (Linear)
    M image_newline (D,)                              -> image_newline

The same tensors under other spellings (`LAYOUTS`, `detect_layout`): "transformers4" (T =
`model.vision_tower.vision_model.`, M = `model.`, transformers 4.52–4.57), "release" (T =
`vision_tower.vision_model.`, M = ``: the llava-hf Hub safetensors, saved by transformers 4.4x) and "saved5"
(T = `vision_tower.`, M = ``: what transformers 5.25 `save_pretrained` writes). Language-model keys are not this
table's (`is_vision_key` tells them apart). Every op only moves bytes, so export is bit-exact; `dst` prefixes our
side (e.g. "vision." when the assembled model nests the module).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
from flax import nnx

from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.mapping import Meta, Rule, build_export_plan, build_plan, drop, extra, linear, norm, rule
from tpo_jax.checkpoints.ops import Permute
from tpo_jax.stack import stack_params, unstack_params, unstack_shapes

CONV2D = Permute((2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)

# layout name -> (tower prefix, top-level prefix of the projector and image_newline)
LAYOUTS: dict[str, tuple[str, str]] = {
    "transformers5": ("model.vision_tower.", "model."),
    "transformers4": ("model.vision_tower.vision_model.", "model."),
    "release": ("vision_tower.vision_model.", ""),
    "saved5": ("vision_tower.", ""),
}


def _prefixes(layout: str) -> tuple[str, str]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LLaVA-OV key layout {layout!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


def siglip(*, src: str = "model.vision_tower.", dst: str = "vision_tower.", post_layernorm: bool = False) -> list[Rule]:
    """SigLIP tower keys under `src` -> our tower under `dst`."""
    b, o = f"{src}encoder.layers.{{i}}.", f"{dst}layers.{{i}}."
    rules = [rule(f"{src}embeddings.patch_embedding.weight", f"{dst}patch_embed.kernel", CONV2D),
             rule(f"{src}embeddings.patch_embedding.bias", f"{dst}patch_embed.bias"),
             rule(f"{src}embeddings.position_embedding.weight", f"{dst}position_embedding"),
             drop(f"{src}embeddings.position_ids", "buffer arange(grid²), recomputed")]
    rules += norm(f"{b}layer_norm1", f"{o}layer_norm1") + norm(f"{b}layer_norm2", f"{o}layer_norm2")
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += linear(f"{b}self_attn.{p}", f"{o}attn.{p}")
    rules += linear(f"{b}mlp.fc1", f"{o}fc1") + linear(f"{b}mlp.fc2", f"{o}fc2")
    if post_layernorm:
        rules += norm(f"{src}post_layernorm", f"{dst}post_layernorm")
    else:
        rules += [extra(f"{src}post_layernorm.{leaf}", f"unused/{src}post_layernorm.{leaf}",
                        "LLaVA-OV takes hidden_states[-1], before post_layernorm") for leaf in ("weight", "bias")]
    return rules


def projector(*, src: str = "model.", dst: str = "") -> list[Rule]:
    """`multi_modal_projector.linear_{1,2}` and `image_newline` under `src` -> `projector.*`, `image_newline`."""
    return (linear(f"{src}multi_modal_projector.linear_1", f"{dst}projector.linear_1")
            + linear(f"{src}multi_modal_projector.linear_2", f"{dst}projector.linear_2")
            + [rule(f"{src}image_newline", f"{dst}image_newline")])


def vision(layout: str = "transformers5", *, dst: str = "", post_layernorm: bool = False) -> list[Rule]:
    """Every vision-side key of a LLaVA-OV checkpoint in `layout` (see `LAYOUTS`)."""
    tower, top = _prefixes(layout)
    return siglip(src=tower, dst=f"{dst}vision_tower.", post_layernorm=post_layernorm) + projector(src=top, dst=dst)


def is_vision_key(key: str, layout: str = "transformers5") -> bool:
    tower, top = _prefixes(layout)
    return key.startswith((tower, f"{top}multi_modal_projector.")) or key == f"{top}image_newline"


def detect_layout(keys: Iterable[str]) -> str:
    """The layout whose patch-embedding key is among `keys` (ConversionError if none is)."""
    keys = set(keys)
    for name, (tower, _) in LAYOUTS.items():
        if f"{tower}embeddings.patch_embedding.weight" in keys:
            return name
    raise ConversionError("no LLaVA-OV vision tower found: none of the known patch-embedding keys "
                          f"({[t + 'embeddings.patch_embedding.weight' for t, _ in LAYOUTS.values()]}) is present")


# ------------------------------------------------------------------------------------------- state-dict helpers

def _flat(state: nnx.State) -> dict[str, nnx.Variable]:
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def load_state_dict(state: nnx.State, state_dict: Mapping[str, np.ndarray], *, layout: str | None = None,
                    dst: str = "", post_layernorm: bool = False, layouts=(),
                    where: str = "<state dict>") -> tuple[nnx.State, dict[str, np.ndarray]]:
    """(the nnx.Param `state` of a `LlavaOVVision` with every parameter taken from `state_dict`, the extras).

    `state_dict`: PyTorch names and layouts; keys outside the vision side (the language model) are ignored.
    `layout` defaults to `detect_layout`. `layouts`: the `StackLayout`s of a scanned tower
    (`siglip.siglip_stack_layouts(cfg, dst + "vision_tower")`). Missing / unexpected vision keys and shape
    mismatches raise ConversionError naming the key. Values keep the dtype of `state_dict`."""
    layout = layout or detect_layout(state_dict)
    flat = _flat(state)
    keys = {k: v for k, v in state_dict.items() if is_vision_key(k, layout)}
    source = {k: Meta(tuple(np.shape(v)), np.asarray(v).dtype, where) for k, v in keys.items()}
    target = unstack_shapes({p: tuple(v.get_value().shape) for p, v in flat.items()}, layouts)
    plan = build_plan(source, vision(layout, dst=dst, post_layernorm=post_layernorm), target, where=where)
    values: dict[str, np.ndarray] = {}
    for job in plan.params:
        outs = job.rule.op.forward([np.asarray(keys[k]) for k in job.src])
        values.update({p: np.ascontiguousarray(x) for p, x in zip(job.dst, outs)})
    values = stack_params(values, layouts)
    extras = {job.dst[0]: np.asarray(keys[job.src[0]]) for job in plan.extras}
    new = nnx.from_flat_state([(p, v.replace(values[".".join(map(str, p))])) for p, v in nnx.to_flat_state(state)])
    return new, extras


def export_state_dict(state: nnx.State, extras: Mapping[str, np.ndarray] | None = None, *,
                      layout: str = "transformers5", dst: str = "", post_layernorm: bool = False, layouts=(),
                      where: str = "<model>") -> dict[str, np.ndarray]:
    """Inverse of `load_state_dict`: our parameters (+ the kept extras) as PyTorch keys of `layout`, bit-exact."""
    flat = unstack_params({p: np.asarray(v.get_value()) for p, v in _flat(state).items()}, layouts)
    extras = dict(extras or {})
    plan = build_export_plan({p: x.shape for p, x in flat.items()}, {p: np.shape(x) for p, x in extras.items()},
                             vision(layout, dst=dst, post_layernorm=post_layernorm), where=where)
    out: dict[str, np.ndarray] = {}
    for job in plan.params + plan.extras:
        tree = flat if job.rule.kind == "param" else extras
        xs = job.rule.op.inverse([np.asarray(tree[p]) for p in job.dst])
        for k, x in zip(job.src, xs):
            if k in out:
                raise ConversionError("a PyTorch key is produced twice", file=where, key=k)
            out[k] = np.ascontiguousarray(x)
    return out


__all__ = ["LAYOUTS", "CONV2D", "siglip", "projector", "vision", "is_vision_key", "detect_layout",
           "load_state_dict", "export_state_dict"]

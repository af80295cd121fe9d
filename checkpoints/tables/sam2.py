"""SAM2 image path (MODEL-SPEC §7, §9.2): upstream SAM2 state-dict names (the release's `sam.*` keys without
`sam.`) -> `tpo_jax.sam2.image.Sam2Image`. 742 keys in the release: 594 image encoder (586 trunk + 8 neck), 131 mask
decoder, 17 prompt encoder. `src` / `dst` prefix both sides (e.g. src="sam.", dst="sam2.").

    image_encoder.trunk.patch_embed.proj              -> <same>.{kernel (7,7,3,C), bias}       (Conv2d)
    image_encoder.trunk.pos_embed (1, C, 7, 7)        -> image_encoder.trunk.pos_embed (1, 7, 7, C)
    image_encoder.trunk.pos_embed_window (1, C, 8, 8) -> image_encoder.trunk.pos_embed_window (1, 8, 8, C)
    image_encoder.trunk.blocks.{i}.{norm1,norm2}      -> <same>.{scale,bias}
    image_encoder.trunk.blocks.{i}.{attn.qkv,attn.proj,proj,mlp.layers.{j}} -> <same>  (Linear, transposed)
    image_encoder.neck.convs.{i}.conv                 -> <same>                            (1×1 Conv2d)
    sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix -> <same>
    sam_prompt_encoder.point_embeddings.{0..3}.weight (1, P) -> sam_prompt_encoder.point_embeddings (4, P)
    sam_prompt_encoder.{not_a_point_embed,no_mask_embed}.weight -> sam_prompt_encoder.<name> (1, P)
    sam_prompt_encoder.mask_downscaling.{0,3,6}       -> sam_prompt_encoder.mask_downscaling.conv{1,2,3} (Conv2d)
    sam_prompt_encoder.mask_downscaling.{1,4}         -> sam_prompt_encoder.mask_downscaling.norm{1,2}   (LN2d)
    sam_mask_decoder.{iou_token,mask_tokens,obj_score_token}.weight -> sam_mask_decoder.<name> (rows, d)
    sam_mask_decoder.transformer.layers.{i}.<attn>.{q,k,v,out}_proj, .mlp.layers.{j}, .norm{1..4},
    sam_mask_decoder.transformer.final_attn_token_to_image.*, .norm_final_attn -> <same>
    sam_mask_decoder.output_upscaling.{0,3} (I, O, 2, 2) -> sam_mask_decoder.upscale_conv{1,2} (2, 2, I, O)
    sam_mask_decoder.output_upscaling.1               -> sam_mask_decoder.upscale_norm     (LayerNorm2d)
    sam_mask_decoder.{conv_s0,conv_s1}                -> <same>                            (1×1 Conv2d)
    sam_mask_decoder.{output_hypernetworks_mlps.{i},iou_prediction_head,pred_obj_score_head}.layers.{j} -> <same>

Conv2d weight (O, I, kh, kw) -> kernel (kh, kw, I, O); ConvTranspose2d weight (I, O, kh, kw) -> (kh, kw, I, O).
Every op only moves bytes, so export is bit-exact. `no_mem_embed` (used by the image predictor) belongs to the
memory table (`sam2_memory`); `whole()` is both tables, the 900 `sam.*` keys of the release.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from flax import nnx

from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.mapping import Meta, Rule, build_export_plan, build_plan, linear, norm, rule
from tpo_jax.checkpoints.ops import COPY, Permute, Stack
from tpo_jax.checkpoints.tables.sam2_memory import is_memory_key, memory_path

CONV2D = Permute((2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)
CONV_T2D = Permute((2, 3, 0, 1))  # ConvTranspose2d (I, O, kh, kw) -> (kh, kw, I, O)
CHANNELS_LAST = Permute((0, 2, 3, 1))  # (1, C, h, w) -> (1, h, w, C)

# The keys of the release this table handles (after stripping `sam.`).
IMAGE_PREFIXES = ("image_encoder.", "sam_mask_decoder.", "sam_prompt_encoder.")


def is_image_key(name: str) -> bool:
    """True for an upstream SAM2 key (no `sam.` prefix) of the image path."""
    return name.startswith(IMAGE_PREFIXES)


def conv(src: str, dst: str, op=CONV2D) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}.kernel", op), rule(f"{src}.bias", f"{dst}.bias")]


def image_encoder(*, src: str = "", dst: str = "") -> list[Rule]:
    s, d = f"{src}image_encoder.trunk.", f"{dst}image_encoder.trunk."
    b, db = f"{s}blocks.{{i}}.", f"{d}blocks.{{i}}."
    rules = conv(f"{s}patch_embed.proj", f"{d}patch_embed.proj")
    rules += [rule(f"{s}pos_embed", f"{d}pos_embed", CHANNELS_LAST),
              rule(f"{s}pos_embed_window", f"{d}pos_embed_window", CHANNELS_LAST)]
    rules += norm(f"{b}norm1", f"{db}norm1") + norm(f"{b}norm2", f"{db}norm2")
    rules += linear(f"{b}attn.qkv", f"{db}attn.qkv") + linear(f"{b}attn.proj", f"{db}attn.proj")
    rules += linear(f"{b}proj", f"{db}proj") + linear(f"{b}mlp.layers.{{j}}", f"{db}mlp.layers.{{j}}")
    rules += conv(f"{src}image_encoder.neck.convs.{{i}}.conv", f"{dst}image_encoder.neck.convs.{{i}}.conv")
    return rules


def prompt_encoder(*, src: str = "", dst: str = "") -> list[Rule]:
    s, d = f"{src}sam_prompt_encoder.", f"{dst}sam_prompt_encoder."
    rules = [rule(f"{s}pe_layer.positional_encoding_gaussian_matrix", f"{d}pe_layer.positional_encoding_gaussian_matrix"),
             rule(tuple(f"{s}point_embeddings.{k}.weight" for k in range(4)), f"{d}point_embeddings", Stack(4)),
             rule(f"{s}not_a_point_embed.weight", f"{d}not_a_point_embed"),
             rule(f"{s}no_mask_embed.weight", f"{d}no_mask_embed")]
    for k, name in ((0, "conv1"), (3, "conv2"), (6, "conv3")):
        rules += conv(f"{s}mask_downscaling.{k}", f"{d}mask_downscaling.{name}")
    for k, name in ((1, "norm1"), (4, "norm2")):
        rules += norm(f"{s}mask_downscaling.{k}", f"{d}mask_downscaling.{name}")
    return rules


def mask_decoder(*, src: str = "", dst: str = "") -> list[Rule]:
    s, d = f"{src}sam_mask_decoder.", f"{dst}sam_mask_decoder."
    rules = [rule(f"{s}{t}.weight", f"{d}{t}") for t in ("iou_token", "mask_tokens", "obj_score_token")]
    t, dt = f"{s}transformer.", f"{d}transformer."
    for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rules += linear(f"{t}layers.{{i}}.{attn}.{p}", f"{dt}layers.{{i}}.{attn}.{p}")
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += linear(f"{t}final_attn_token_to_image.{p}", f"{dt}final_attn_token_to_image.{p}")
    rules += linear(f"{t}layers.{{i}}.mlp.layers.{{j}}", f"{dt}layers.{{i}}.mlp.layers.{{j}}")
    for k in range(1, 5):
        rules += norm(f"{t}layers.{{i}}.norm{k}", f"{dt}layers.{{i}}.norm{k}")
    rules += norm(f"{t}norm_final_attn", f"{dt}norm_final_attn")
    rules += conv(f"{s}output_upscaling.0", f"{d}upscale_conv1", CONV_T2D)
    rules += norm(f"{s}output_upscaling.1", f"{d}upscale_norm")
    rules += conv(f"{s}output_upscaling.3", f"{d}upscale_conv2", CONV_T2D)
    rules += conv(f"{s}conv_s0", f"{d}conv_s0") + conv(f"{s}conv_s1", f"{d}conv_s1")
    rules += linear(f"{s}output_hypernetworks_mlps.{{i}}.layers.{{j}}", f"{d}output_hypernetworks_mlps.{{i}}.layers.{{j}}")
    rules += linear(f"{s}iou_prediction_head.layers.{{j}}", f"{d}iou_prediction_head.layers.{{j}}")
    rules += linear(f"{s}pred_obj_score_head.layers.{{j}}", f"{d}pred_obj_score_head.layers.{{j}}")
    rules += linear(f"{s}pred_obj_score_head", f"{d}pred_obj_score_head")  # pred_obj_scores_mlp=False
    return rules


def image_path(*, src: str = "", dst: str = "") -> list[Rule]:
    """Every image-path key of an upstream SAM2 state dict (`is_image_key`)."""
    return image_encoder(src=src, dst=dst) + prompt_encoder(src=src, dst=dst) + mask_decoder(src=src, dst=dst)


def whole(mask_layers: int = 4, *, src: str = "", dst: str = "") -> list[Rule]:
    """Every key of an upstream SAM2 state dict: image path + memory path (`tpo_jax.sam2.video.Sam2Video`);
    `mask_layers`: convs of the memory encoder's mask downsampler (4 in the release)."""
    return image_path(src=src, dst=dst) + memory_path(mask_layers, src=src, dst=dst)


def _mask_layers(paths) -> int | None:
    """Mask-downsampler convs of a `Sam2Video` param tree (None for a `Sam2Image`: no memory path)."""
    convs = {p.split(".")[3] for p in paths if p.startswith("memory_encoder.mask_downsampler.convs.")}
    return len(convs) if convs else None


# ------------------------------------------------------------------------------------------- state-dict helpers

def _flat_params(state: nnx.State) -> dict[str, nnx.Variable]:
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _rules(paths, src: str) -> tuple[list[Rule], Callable[[str], bool]]:
    n = _mask_layers(paths)
    if n is None:
        return image_path(src=src), is_image_key
    return whole(n, src=src), lambda k: is_image_key(k) or is_memory_key(k)


def load_state_dict(state: nnx.State, state_dict: Mapping[str, np.ndarray], *, src: str = "",
                    where: str = "<state dict>") -> nnx.State:
    """The nnx.Param `state` of a `Sam2Video` or `Sam2Image` (real or from `nnx.eval_shape`) with every parameter
    taken from `state_dict` (upstream names with prefix `src`, arrays in PyTorch layout). For a `Sam2Image` the
    memory-path keys are ignored; a missing or unexpected key of the model's part, or a shape that does not fit,
    raises ConversionError naming it. Values keep the dtype of `state_dict`."""
    flat = _flat_params(state)
    rules, wanted = _rules(flat, src)
    keys = {k: v for k, v in state_dict.items() if k.startswith(src) and wanted(k[len(src):])}
    source = {k: Meta(tuple(np.shape(v)), np.asarray(v).dtype, where) for k, v in keys.items()}
    target = {p: tuple(v.get_value().shape) for p, v in flat.items()}
    plan = build_plan(source, rules, target, where=where)
    values: dict[str, np.ndarray] = {}
    for job in plan.params:
        outs = job.rule.op.forward([np.asarray(keys[k]) for k in job.src])
        values.update({p: np.ascontiguousarray(x) for p, x in zip(job.dst, outs)})
    return nnx.from_flat_state([(p, v.replace(values[".".join(map(str, p))]))
                                for p, v in nnx.to_flat_state(state)])


def export_state_dict(state: nnx.State, *, src: str = "", where: str = "<model>") -> dict[str, np.ndarray]:
    """Inverse of `load_state_dict`: the parameters as upstream SAM2 keys (prefix `src`), PyTorch layout,
    bit-exact."""
    flat = {p: np.asarray(v.get_value()) for p, v in _flat_params(state).items()}
    rules, _ = _rules(flat, src)
    plan = build_export_plan({p: x.shape for p, x in flat.items()}, {}, rules, where=where)
    out: dict[str, np.ndarray] = {}
    for job in plan.params:
        xs = job.rule.op.inverse([flat[p] for p in job.dst])
        out.update({k: np.ascontiguousarray(x) for k, x in zip(job.src, xs)})
    if len(out) != sum(len(j.src) for j in plan.params):
        raise ConversionError("an upstream key is produced twice", file=where)
    return out


__all__ = ["whole", "image_path", "image_encoder", "prompt_encoder", "mask_decoder", "is_image_key", "load_state_dict",
           "export_state_dict", "CONV2D", "CONV_T2D", "COPY"]

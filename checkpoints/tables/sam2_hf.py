"""transformers SAM2 state-dict names (`Sam2VideoModel` / `Sam2Model`, transformers 5.x) -> upstream SAM2 names
(facebookresearch/sam2 `sam2_hiera_l.yaml` naming, the names `checkpoints/tables/sam2.py` maps into our
`Sam2Video`). `src` prefixes the transformers side, `dst` the upstream side.

    vision_encoder.backbone.patch_embed.projection       -> image_encoder.trunk.patch_embed.proj
    vision_encoder.backbone.{pos_embed,pos_embed_window} -> image_encoder.trunk.<same>
    vision_encoder.backbone.blocks.{i}.layer_norm{1,2}   -> image_encoder.trunk.blocks.{i}.norm{1,2}
    vision_encoder.backbone.blocks.{i}.{attn.qkv,attn.proj,proj} -> image_encoder.trunk.blocks.{i}.<same>
    vision_encoder.backbone.blocks.{i}.mlp.proj_{in,out} -> image_encoder.trunk.blocks.{i}.mlp.layers.{0,1}
    vision_encoder.neck.convs.{i}                        -> image_encoder.neck.convs.{i}.conv
    shared_image_embedding.positional_embedding,
      prompt_encoder.shared_embedding.positional_embedding -> sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
                                                            (two buffers holding one tensor; must be equal)
    prompt_encoder.point_embed.weight (4, P)             -> sam_prompt_encoder.point_embeddings.{0..3}.weight (1, P)
    prompt_encoder.{not_a_point_embed,no_mask_embed}     -> sam_prompt_encoder.<same>
    prompt_encoder.mask_embed.{conv1,layer_norm1,conv2,layer_norm2,conv3} -> sam_prompt_encoder.mask_downscaling.{0,1,3,4,6}
    mask_decoder.transformer.{layers.{i},final_attn_token_to_image}.*.o_proj -> <same>.out_proj ({q,k,v}_proj: same)
    mask_decoder.transformer.layers.{i}.layer_norm{k}    -> sam_mask_decoder.transformer.layers.{i}.norm{k}
    mask_decoder.transformer.layer_norm_final_attn       -> sam_mask_decoder.transformer.norm_final_attn
    mask_decoder.{upscale_conv1,upscale_layer_norm,upscale_conv2} -> sam_mask_decoder.output_upscaling.{0,1,3}
    <feed-forward>.{proj_in, layers.{k}, proj_out}       -> <MLP>.layers.{0, k+1, n-1}   (n layers)
      (mask decoder transformer MLPs and Hiera MLPs n=2; output_hypernetworks_mlps.{i}, iou_prediction_head,
       pred_obj_score_head, object_pointer_proj -> obj_ptr_proj n=3 / iou_head_depth)
    memory_encoder.mask_downsampler.layers.{i}.{conv,layer_norm} -> memory_encoder.mask_downsampler.encoder.{3i,3i+1}
    memory_encoder.mask_downsampler.final_conv           -> memory_encoder.mask_downsampler.encoder.{3n}
    memory_encoder.{feature_projection,projection}       -> memory_encoder.{pix_feat_proj,out_proj}
    memory_encoder.memory_fuser.layers.{i}.{depthwise_conv,layer_norm,pointwise_conv1,pointwise_conv2,scale}
                                                         -> memory_encoder.fuser.layers.{i}.{dwconv,norm,pwconv1,pwconv2,gamma}
    memory_attention.layers.{i}.*.o_proj, .layer_norm{k} -> memory_attention.layers.{i}.*.out_proj, .norm{k}
    memory_attention.layer_norm                          -> memory_attention.norm
    no_memory_embedding, no_memory_positional_encoding   -> no_mem_embed, no_mem_pos_enc
    memory_temporal_positional_encoding, no_object_pointer -> maskmem_tpos_enc, no_obj_ptr
    mask_downsample                                      -> mask_downsample

Every tensor keeps its PyTorch layout here (the layout changes happen in the upstream -> ours table), so the
whole chain transformers -> upstream -> ours -> upstream -> transformers is bit-exact. SAM 2.1 parameters
(`temporal_positional_encoding_projection_layer.*` = upstream `obj_ptr_tpos_proj.*`,
`occlusion_spatial_embedding_parameter` = `no_obj_embed_spatial`) have no rule: `Sam2Video` is SAM 2 v1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from flax import nnx

from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.mapping import Meta, Rule, build_export_plan, build_plan, rule
from tpo_jax.checkpoints.ops import Op, Split
from tpo_jax.checkpoints.tables import sam2 as upstream

# SAM 2.1 parameters, by naming (`Sam2Video` implements SAM 2 v1 only)
V21_UPSTREAM = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.")
V21_HF = ("occlusion_spatial_embedding_parameter", "temporal_positional_encoding_projection_layer.")


def v21_keys(keys: Iterable[str], prefix: str = "") -> list[str]:
    """The SAM 2.1-only keys among `keys` (either naming, after `prefix`)."""
    marks = V21_UPSTREAM + V21_HF
    return sorted(k for k in keys if k.startswith(prefix) and k[len(prefix):].startswith(marks))


def refuse_v21(keys: Iterable[str], *, file: str, prefix: str = "") -> None:
    """One ConversionError naming the SAM 2.1 keys, if there are any."""
    found = v21_keys(keys, prefix)
    if found:
        raise ConversionError(f"SAM 2.1 checkpoint: {found} belong to SAM 2.1 (no_obj_embed_spatial / "
                              "obj_ptr_tpos_proj: occlusion embedding, temporal encoding of object pointers), "
                              "which is not supported; Sam2Video is SAM 2 v1 (use a sam2_hiera_*.pt v1 "
                              "checkpoint, or a transformers config with enable_occlusion_spatial_embedding and "
                              "enable_temporal_pos_encoding_for_object_pointers off)", file=file, key=found[0])


@dataclass(frozen=True)
class Tied(Op):
    """`n` source keys holding the same tensor -> one; forward refuses copies that differ, inverse writes all."""

    n: int = 2
    name = "tied"

    def shapes(self, src):
        if any(tuple(s) != tuple(src[0]) for s in src):
            raise ValueError(f"expected {self.n} copies of one tensor, got shapes {[tuple(s) for s in src]}")
        return [tuple(src[0])]

    def inverse_shapes(self, dst):
        return [tuple(dst[0])] * self.n

    def forward(self, xs):
        if any(not np.array_equal(x, xs[0]) for x in xs[1:]):
            raise ValueError(f"the {self.n} copies of this tensor differ")
        return [xs[0]]

    def inverse(self, ys):
        return [ys[0]] * self.n


def wb(src: str, dst: str) -> list[Rule]:
    """`src.{weight,bias}` -> `dst.{weight,bias}`, unchanged."""
    return [rule(f"{src}.weight", f"{dst}.weight"), rule(f"{src}.bias", f"{dst}.bias")]


def ffn(src: str, dst: str, layers: int) -> list[Rule]:
    """transformers feed-forward (proj_in, layers.{k}, proj_out) -> upstream MLP layers.{0..n-1}."""
    rules = wb(f"{src}.proj_in", f"{dst}.layers.0") + wb(f"{src}.proj_out", f"{dst}.layers.{layers - 1}")
    for k in range(layers - 2):
        rules += wb(f"{src}.layers.{k}", f"{dst}.layers.{k + 1}")
    return rules


def _attention(src: str, dst: str) -> list[Rule]:
    rules = [r for p in ("q_proj", "k_proj", "v_proj") for r in wb(f"{src}.{p}", f"{dst}.{p}")]
    return rules + wb(f"{src}.o_proj", f"{dst}.out_proj")


def image_encoder(*, src: str = "", dst: str = "") -> list[Rule]:
    s, d = f"{src}vision_encoder.backbone.", f"{dst}image_encoder.trunk."
    b, db = f"{s}blocks.{{i}}", f"{d}blocks.{{i}}"
    rules = wb(f"{s}patch_embed.projection", f"{d}patch_embed.proj")
    rules += [rule(f"{s}pos_embed", f"{d}pos_embed"), rule(f"{s}pos_embed_window", f"{d}pos_embed_window")]
    rules += wb(f"{b}.layer_norm1", f"{db}.norm1") + wb(f"{b}.layer_norm2", f"{db}.norm2")
    rules += wb(f"{b}.attn.qkv", f"{db}.attn.qkv") + wb(f"{b}.attn.proj", f"{db}.attn.proj") + wb(f"{b}.proj", f"{db}.proj")
    rules += ffn(f"{b}.mlp", f"{db}.mlp", 2)
    return rules + wb(f"{src}vision_encoder.neck.convs.{{i}}", f"{dst}image_encoder.neck.convs.{{i}}.conv")


def prompt_encoder(*, src: str = "", dst: str = "") -> list[Rule]:
    s, d = f"{src}prompt_encoder.", f"{dst}sam_prompt_encoder."
    rules = [rule((f"{src}shared_image_embedding.positional_embedding", f"{s}shared_embedding.positional_embedding"),
                  f"{d}pe_layer.positional_encoding_gaussian_matrix", Tied(2)),
             rule(f"{s}point_embed.weight", tuple(f"{d}point_embeddings.{k}.weight" for k in range(4)), Split(4)),
             rule(f"{s}not_a_point_embed.weight", f"{d}not_a_point_embed.weight"),
             rule(f"{s}no_mask_embed.weight", f"{d}no_mask_embed.weight")]
    for name, k in (("conv1", 0), ("layer_norm1", 1), ("conv2", 3), ("layer_norm2", 4), ("conv3", 6)):
        rules += wb(f"{s}mask_embed.{name}", f"{d}mask_downscaling.{k}")
    return rules


def mask_decoder(iou_head_depth: int = 3, *, src: str = "", dst: str = "") -> list[Rule]:
    s, d = f"{src}mask_decoder.", f"{dst}sam_mask_decoder."
    rules = [rule(f"{s}{t}.weight", f"{d}{t}.weight") for t in ("iou_token", "mask_tokens", "obj_score_token")]
    t, dt = f"{s}transformer.", f"{d}transformer."
    for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
        rules += _attention(f"{t}layers.{{i}}.{attn}", f"{dt}layers.{{i}}.{attn}")
    rules += _attention(f"{t}final_attn_token_to_image", f"{dt}final_attn_token_to_image")
    rules += ffn(f"{t}layers.{{i}}.mlp", f"{dt}layers.{{i}}.mlp", 2)
    for k in range(1, 5):
        rules += wb(f"{t}layers.{{i}}.layer_norm{k}", f"{dt}layers.{{i}}.norm{k}")
    rules += wb(f"{t}layer_norm_final_attn", f"{dt}norm_final_attn")
    rules += wb(f"{s}upscale_conv1", f"{d}output_upscaling.0") + wb(f"{s}upscale_layer_norm", f"{d}output_upscaling.1")
    rules += wb(f"{s}upscale_conv2", f"{d}output_upscaling.3")
    rules += wb(f"{s}conv_s0", f"{d}conv_s0") + wb(f"{s}conv_s1", f"{d}conv_s1")
    rules += ffn(f"{s}output_hypernetworks_mlps.{{i}}", f"{d}output_hypernetworks_mlps.{{i}}", 3)
    rules += ffn(f"{s}iou_prediction_head", f"{d}iou_prediction_head", iou_head_depth)
    return rules + ffn(f"{s}pred_obj_score_head", f"{d}pred_obj_score_head", 3)


def memory_path(mask_layers: int = 4, obj_ptr_layers: int = 3, *, src: str = "", dst: str = "") -> list[Rule]:
    s, d = f"{src}memory_encoder.", f"{dst}memory_encoder."
    rules: list[Rule] = []
    for i in range(mask_layers):
        rules += wb(f"{s}mask_downsampler.layers.{i}.conv", f"{d}mask_downsampler.encoder.{3 * i}")
        rules += wb(f"{s}mask_downsampler.layers.{i}.layer_norm", f"{d}mask_downsampler.encoder.{3 * i + 1}")
    rules += wb(f"{s}mask_downsampler.final_conv", f"{d}mask_downsampler.encoder.{3 * mask_layers}")
    rules += wb(f"{s}feature_projection", f"{d}pix_feat_proj") + wb(f"{s}projection", f"{d}out_proj")
    f, g = f"{s}memory_fuser.layers.{{i}}", f"{d}fuser.layers.{{i}}"
    rules += wb(f"{f}.depthwise_conv", f"{g}.dwconv") + wb(f"{f}.layer_norm", f"{g}.norm")
    rules += wb(f"{f}.pointwise_conv1", f"{g}.pwconv1") + wb(f"{f}.pointwise_conv2", f"{g}.pwconv2")
    rules.append(rule(f"{f}.scale", f"{g}.gamma"))
    a, da = f"{src}memory_attention.", f"{dst}memory_attention."
    for attn in ("self_attn", "cross_attn_image"):
        rules += _attention(f"{a}layers.{{i}}.{attn}", f"{da}layers.{{i}}.{attn}")
    rules += wb(f"{a}layers.{{i}}.linear1", f"{da}layers.{{i}}.linear1")
    rules += wb(f"{a}layers.{{i}}.linear2", f"{da}layers.{{i}}.linear2")
    for k in (1, 2, 3):
        rules += wb(f"{a}layers.{{i}}.layer_norm{k}", f"{da}layers.{{i}}.norm{k}")
    rules += wb(f"{a}layer_norm", f"{da}norm")
    rules += [rule(f"{src}{h}", f"{dst}{u}") for h, u in (
        ("no_memory_embedding", "no_mem_embed"), ("no_memory_positional_encoding", "no_mem_pos_enc"),
        ("memory_temporal_positional_encoding", "maskmem_tpos_enc"), ("no_object_pointer", "no_obj_ptr"))]
    rules += wb(f"{src}mask_downsample", f"{dst}mask_downsample")
    return rules + ffn(f"{src}object_pointer_proj", f"{dst}obj_ptr_proj", obj_ptr_layers)


def whole(mask_layers: int = 4, iou_head_depth: int = 3, obj_ptr_layers: int = 3, *, src: str = "",
          dst: str = "") -> list[Rule]:
    """Every key of a transformers `Sam2VideoModel` (v1 flags) -> its upstream name; a `Sam2Model` holds the
    image-path part plus `no_memory_embedding`."""
    return (image_encoder(src=src, dst=dst) + prompt_encoder(src=src, dst=dst)
            + mask_decoder(iou_head_depth, src=src, dst=dst)
            + memory_path(mask_layers, obj_ptr_layers, src=src, dst=dst))


# ------------------------------------------------------------------------------------------- state-dict helpers

def _count(keys: Iterable[str], prefix: str) -> int:
    """Number of distinct `{k}` in keys `prefix{k}.…` (0 if none)."""
    found = {k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)}
    return len({f for f in found if f.isdigit()})


def rules_for(upstream_keys: Iterable[str]) -> list[Rule]:
    """`whole()` sized by an upstream key set (mask-downsampler convs, IoU-head and pointer-MLP depths)."""
    keys = list(upstream_keys)
    n_enc = _count(keys, "memory_encoder.mask_downsampler.encoder.")
    return whole(mask_layers=max((n_enc - 1) // 2, 1) if n_enc else 4,
                 iou_head_depth=_count(keys, "sam_mask_decoder.iou_prediction_head.layers.") or 3,
                 obj_ptr_layers=_count(keys, "obj_ptr_proj.layers.") or 3)


def upstream_shapes(state: nnx.State) -> dict[str, tuple[int, ...]]:
    """The upstream key -> PyTorch shape that a `Sam2Video` / `Sam2Image` param state (real or abstract)
    expects (the export plan of `checkpoints/tables/sam2.py`)."""
    flat = {p: tuple(v.get_value().shape) for p, v in upstream._flat_params(state).items()}
    rules, _ = upstream._rules(flat, "")
    plan = build_export_plan(flat, {}, rules, where="<model>")
    return {k: tuple(s) for job in plan.params for k, s in zip(job.src, job.src_shapes)}


def hf_plan(source: Mapping[str, Meta], target: Mapping[str, tuple[int, ...]], *, where: str):
    """Header-only plan transformers keys (`source`) -> upstream keys (`target`: upstream key -> shape, e.g.
    `upstream_shapes`). Keys the target has no place for because the model has no memory path (a `Sam2Image`:
    the memory keys of a `Sam2VideoModel`, `no_memory_embedding` of a `Sam2Model`) are ignored; SAM 2.1 keys
    and anything else unknown, missing or misshapen raise ConversionError."""
    refuse_v21(source, file=where)
    rules = rules_for(target)
    video = any(upstream.is_memory_key(k) for k in target)
    if not video:
        from tpo_jax.checkpoints.mapping import match_key
        keep = {}
        for k, m in source.items():
            found = match_key(rules, k)
            if found is not None and all(upstream.is_memory_key(t.fill(found[1])) for t in found[0]._dst_t):
                continue
            keep[k] = m
        source = keep
    return build_plan(source, rules, target, where=where)


def hf_to_upstream(state_dict: Mapping[str, np.ndarray], target: Mapping[str, tuple[int, ...]], *,
                   where: str = "<state dict>") -> dict[str, np.ndarray]:
    """A transformers SAM2 state dict -> the same tensors under upstream names (PyTorch layout, bit-exact)."""
    plan = hf_plan({k: Meta(tuple(np.shape(v)), np.asarray(v).dtype, where) for k, v in state_dict.items()},
                   target, where=where)
    out: dict[str, np.ndarray] = {}
    for job in plan.params:
        try:
            ys = job.rule.op.forward([np.asarray(state_dict[k]) for k in job.src])
        except ValueError as e:
            raise ConversionError(str(e), file=where, key=job.src[0]) from None
        out.update(zip(job.dst, ys))
    return out


def upstream_to_hf(state_dict: Mapping[str, np.ndarray], *, where: str = "<state dict>") -> dict[str, np.ndarray]:
    """Inverse of `hf_to_upstream`: upstream names -> transformers names, bit-exact."""
    plan = build_export_plan({k: np.shape(v) for k, v in state_dict.items()}, {}, rules_for(state_dict), where=where)
    out: dict[str, np.ndarray] = {}
    for job in plan.params:
        out.update(zip(job.src, job.rule.op.inverse([np.asarray(state_dict[k]) for k in job.dst])))
    return out


def load_state_dict(state: nnx.State, state_dict: Mapping[str, np.ndarray], *,
                    where: str = "<state dict>") -> nnx.State:
    """The nnx.Param `state` of a `Sam2Video` (or `Sam2Image`) with every parameter taken from a transformers
    `Sam2VideoModel` (or `Sam2Model`) state dict."""
    return upstream.load_state_dict(state, hf_to_upstream(state_dict, upstream_shapes(state), where=where),
                                    where=where)


def export_state_dict(state: nnx.State, *, where: str = "<model>") -> dict[str, np.ndarray]:
    """The parameters of a `Sam2Video` as a transformers `Sam2VideoModel` state dict, bit-exact (both copies of
    the prompt encoder's Gaussian matrix; no SAM 2.1 tensors)."""
    return upstream_to_hf(upstream.export_state_dict(state, where=where), where=where)


__all__ = ["whole", "image_encoder", "prompt_encoder", "mask_decoder", "memory_path", "rules_for", "Tied",
           "v21_keys", "refuse_v21", "upstream_shapes", "hf_plan", "hf_to_upstream", "upstream_to_hf",
           "load_state_dict", "export_state_dict"]

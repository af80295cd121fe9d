"""CG-DETR `cg_model.*` <-> `temporal_head.*` (MODEL-SPEC §6, §9.2; see also tpo_jax/heads/temporal/model.py).

    input_{txt,vid}_proj.{j}.LayerNorm          -> temporal_head.input_{txt,vid}_proj.{j}.norm
    input_{txt,vid}_proj.{j}.net.1              -> temporal_head.input_{txt,vid}_proj.{j}.linear      (net.0 = Dropout)
    token_type_embeddings.weight, query_embed.weight -> ….token_type_embeddings.embedding, ….query_embed.embedding
    {dummy,global,moment,sent}_rep_{token,pos}  -> same names                                          (as is)
    {P}.layers.{i}.self_attn.in_proj_weight (3d, d) -> {P}.layers.{i}.self_attn.{q,k,v}_proj.kernel   (split in
    {P}.layers.{i}.self_attn.in_proj_bias (3d,)     -> {P}.layers.{i}.self_attn.{q,k,v}_proj.bias      thirds)
        P in {txtproj_encoder, scls_encoder, transformer.encoder, transformer.mcls_encoder}
    {P}.layers.{i}.{self_attn.out_proj, linear1, linear2}, norm1, norm2, activation.weight (PReLU slope)
        P in {txtproj_encoder, scls_encoder, transformer.encoder, transformer.mcls_encoder,
              transformer.t2v_encoder, transformer.decoder}
    transformer.decoder.layers.{i}.{sa_*, ca_*}_proj, cross_attn.out_proj, norm3 (ca_qpos_proj: layer 0 only)
    transformer.decoder.{norm, query_scale, ref_point_head, ref_anchor_head, bbox_embed}
    class_embed, span_embed.layers.{j}, saliency_proj{1,2}

The moment / sentence tokens and encoders (scls_encoder, transformer.mcls_encoder) are training-only: their
outputs feed `loss_ms_align` and `loss_distill`. Kept as extras (group `unused`; modules no path uses):
txt_proj_linear.*, txt_position_embed.*.
"""

from __future__ import annotations

from tpo_jax.checkpoints.mapping import Rule, extra, linear, norm, rule
from tpo_jax.checkpoints.ops import Split

_C, _O = "cg_model.", "temporal_head."
_DECODER_PROJ = ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                 "ca_qcontent_proj", "ca_qpos_proj", "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj",
                 "ca_qpos_sine_proj")
_TOKENS = ("dummy_rep_token", "dummy_rep_pos", "global_rep_token", "global_rep_pos", "moment_rep_token",
           "moment_rep_pos", "sent_rep_token", "sent_rep_pos")
_STD_ENCODERS = ("txtproj_encoder", "scls_encoder", "transformer.encoder", "transformer.mcls_encoder")
_UNUSED = ("txt_proj_linear.{rest}", "txt_position_embed.{rest}")


def _layer_common(p: str) -> list[Rule]:
    s, o = f"{_C}{p}.layers.{{i}}.", f"{_O}{p}.layers.{{i}}."
    return [*linear(f"{s}self_attn.out_proj", f"{o}self_attn.out_proj"), *linear(f"{s}linear1", f"{o}linear1"),
            *linear(f"{s}linear2", f"{o}linear2"), *norm(f"{s}norm1", f"{o}norm1"), *norm(f"{s}norm2", f"{o}norm2"),
            rule(f"{s}activation.weight", f"{o}activation.weight")]


def cgdetr() -> list[Rule]:
    rules: list[Rule] = []
    for m in ("input_txt_proj", "input_vid_proj"):
        rules += norm(f"{_C}{m}.{{j}}.LayerNorm", f"{_O}{m}.{{j}}.norm")
        rules += linear(f"{_C}{m}.{{j}}.net.1", f"{_O}{m}.{{j}}.linear")
    rules += [rule(f"{_C}token_type_embeddings.weight", f"{_O}token_type_embeddings.embedding"),
              rule(f"{_C}query_embed.weight", f"{_O}query_embed.embedding")]
    rules += [rule(f"{_C}{n}", f"{_O}{n}") for n in _TOKENS]
    for p in _STD_ENCODERS:
        s, o = f"{_C}{p}.layers.{{i}}.self_attn.", f"{_O}{p}.layers.{{i}}.self_attn."
        rules += [rule(f"{s}in_proj_weight", tuple(f"{o}{x}_proj.kernel" for x in "qkv"), Split(3, transpose=True)),
                  rule(f"{s}in_proj_bias", tuple(f"{o}{x}_proj.bias" for x in "qkv"), Split(3))]
    for p in (*_STD_ENCODERS, "transformer.t2v_encoder", "transformer.decoder"):
        rules += _layer_common(p)
    d, od = f"{_C}transformer.decoder.", f"{_O}transformer.decoder."
    for name in _DECODER_PROJ:
        rules += linear(f"{d}layers.{{i}}.{name}", f"{od}layers.{{i}}.{name}")
    rules += linear(f"{d}layers.{{i}}.cross_attn.out_proj", f"{od}layers.{{i}}.cross_attn.out_proj")
    rules += norm(f"{d}layers.{{i}}.norm3", f"{od}layers.{{i}}.norm3")
    rules += norm(f"{d}norm", f"{od}norm")
    for mlp in ("query_scale", "ref_point_head", "ref_anchor_head", "bbox_embed"):
        rules += linear(f"{d}{mlp}.layers.{{j}}", f"{od}{mlp}.layers.{{j}}")
    rules += linear(f"{_C}class_embed", f"{_O}class_embed")
    rules += linear(f"{_C}span_embed.layers.{{j}}", f"{_O}span_embed.layers.{{j}}")
    rules += linear(f"{_C}saliency_proj1", f"{_O}saliency_proj1") + linear(f"{_C}saliency_proj2", f"{_O}saliency_proj2")
    for n in _UNUSED:
        rules.append(extra(f"{_C}{n}", f"unused/{_C}{n}", "CG-DETR module no path uses"))
    return rules

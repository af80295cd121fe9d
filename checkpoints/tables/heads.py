"""Task tokens, box encoder, region / mask heads and SAM2 (MODEL-SPEC §5.1, §7, §9.2).

    {box,temporal,track}_token (1, 1, D)          -> {box,temporal,track}_token (D,)
    loc_encoder.{0,2}                              -> loc_encoder.layers.{0,1}                (Linear, transposed)
    loc_decoder.{0,2}                              -> region_head.loc_decoder.layers.{0,1}
    track_embed.layers.{j}                         -> mask_head.track_embed.layers.{j}
    track_embed_decode2.layers.{j}                 -> mask_head.track_embed_decode2.layers.{j}
    sam.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix -> sam2.pe_layer.<same>    (as is)
    sam.sam_prompt_encoder.point_embeddings.{0..3}.weight (1, P) each   -> sam2.point_embeddings (4, P) (stacked)
    sam.sam_prompt_encoder.not_a_point_embed.weight                     -> sam2.not_a_point_embed

SAM2: our model holds only the sparse-prompt part of SAM2's prompt encoder (the regression target of the mask
head). Every other `sam.*` tensor (Hiera image encoder, FPN neck, mask decoder, memory attention / encoder,
object-pointer MLP, the dense-prompt `no_mask_embed` / `mask_downscaling`, ...; 893 of the 900) is kept unchanged
in the extras tree as `sam2/<name without "sam.">`, i.e. upstream SAM2 state-dict names in PyTorch layout, so a
SAM2 port can convert them later without the original file and an export can write them back bit-exactly.

Kept as extras (group `unused`, built by the reference but used by no inference path or loss here):
`temporal_embed.*` and `action_embed.*` (dead `generate_temporal` path) and `cg_criterion.empty_weight`
(the constant [1, eos_coef] of the CG-DETR label loss, which our loss computes itself).
"""

from __future__ import annotations

from tpo_jax.checkpoints.mapping import Rule, extra, linear, rule
from tpo_jax.checkpoints.ops import SQUEEZE2, Stack

_PE = "sam.sam_prompt_encoder."


def tokens_and_heads() -> list[Rule]:
    rules = [rule(t, t, SQUEEZE2) for t in ("box_token", "temporal_token", "track_token")]
    rules += linear("loc_encoder.0", "loc_encoder.layers.0") + linear("loc_encoder.2", "loc_encoder.layers.1")
    rules += linear("loc_decoder.0", "region_head.loc_decoder.layers.0")
    rules += linear("loc_decoder.2", "region_head.loc_decoder.layers.1")
    rules += linear("track_embed.layers.{j}", "mask_head.track_embed.layers.{j}")
    rules += linear("track_embed_decode2.layers.{j}", "mask_head.track_embed_decode2.layers.{j}")
    for name in ("temporal_embed", "action_embed"):
        rules.append(extra(f"{name}.{{rest}}", f"unused/{name}.{{rest}}",
                           "only in the reference's dead generate_temporal path"))
    rules.append(extra("cg_criterion.empty_weight", "unused/cg_criterion.empty_weight",
                       "loss constant [1, eos_coef], recomputed by the temporal loss"))
    return rules


def sam2() -> list[Rule]:
    return [
        rule(f"{_PE}pe_layer.positional_encoding_gaussian_matrix", "sam2.pe_layer.positional_encoding_gaussian_matrix"),
        rule(tuple(f"{_PE}point_embeddings.{k}.weight" for k in range(4)), "sam2.point_embeddings", Stack(4)),
        rule(f"{_PE}not_a_point_embed.weight", "sam2.not_a_point_embed"),
        extra("sam.{rest}", "sam2/{rest}", "SAM2 module our model has no module for (kept for a SAM2 port)"),
    ]

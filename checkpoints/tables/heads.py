"""Task tokens, box encoder, region / mask heads (MODEL-SPEC §5.1, §9.2); SAM2 (`sam.*`) is in `sam2`.

    {box,temporal,track}_token (1, 1, D)          -> {box,temporal,track}_token (D,)
    loc_encoder.{0,2}                              -> loc_encoder.layers.{0,1}                (Linear, transposed)
    loc_decoder.{0,2}                              -> region_head.loc_decoder.layers.{0,1}
    track_embed.layers.{j}                         -> mask_head.track_embed.layers.{j}
    track_embed_decode2.layers.{j}                 -> mask_head.track_embed_decode2.layers.{j}

Kept as extras (group `unused`, built by the reference but used by no inference path or loss here):
`temporal_embed.*` and `action_embed.*` (dead `generate_temporal` path) and `cg_criterion.empty_weight`
(the constant [1, eos_coef] of the CG-DETR label loss, which our loss computes itself).
"""

from __future__ import annotations

from tpo_jax.checkpoints.mapping import Rule, extra, linear, rule
from tpo_jax.checkpoints.ops import SQUEEZE2



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

"""UMT ViT, Q-Former and the visual projections <-> `vision.*`, `qformer.*` (MODEL-SPEC §1, §2, §9.2).

    vision_encoder.encoder.patch_embed.proj.weight (O, I, 1, p, p) -> vision.patch_embed.kernel (1, p, p, I, O)
    vision_encoder.encoder.patch_embed.proj.bias                  -> vision.patch_embed.bias
    vision_encoder.encoder.blocks.{i}.norm{1,2}.{weight,bias}     -> vision.blocks.{i}.norm{1,2}.{scale,bias}
    vision_encoder.encoder.blocks.{i}.attn.qkv.weight (3w, w)     -> vision.blocks.{i}.attn.qkv (w, 3w)  (transposed;
        rows [q | k | v] stay fused, as our attention keeps one qkv kernel)
    vision_encoder.encoder.blocks.{i}.attn.{q,v}_bias             -> vision.blocks.{i}.attn.{q,v}_bias  (k bias is 0)
    vision_encoder.encoder.blocks.{i}.attn.proj.*                 -> vision.blocks.{i}.attn.proj.*
    vision_encoder.encoder.blocks.{i}.mlp.fc{1,2}.*               -> vision.blocks.{i}.fc{1,2}.*
    vision_layernorm.{weight,bias}                                -> vision.outer_norm.{scale,bias}

    qformer.bert.embeddings.{word,position}_embeddings.weight     -> qformer.embeddings.<same>.embedding
    qformer.bert.embeddings.LayerNorm                              -> qformer.embeddings.norm
    qformer.bert.encoder.layer.{i}.{A}.self.{query,key,value}     -> qformer.layers.{i}.{A}.{query,key,value}
    qformer.bert.encoder.layer.{i}.{A}.output.{dense,LayerNorm}   -> qformer.layers.{i}.{A}.output.{dense,norm}
        A in {attention, crossattention}
    qformer.bert.encoder.layer.{i}.{F}.dense                      -> qformer.layers.{i}.{F}.dense
    qformer.bert.encoder.layer.{i}.{O}.LayerNorm                  -> qformer.layers.{i}.{O}.norm
        F in {intermediate, intermediate_query, output, output_query}, O in {output, output_query}
    query_tokens, extra_query_tokens                               -> qformer.query_tokens, qformer.extra_query_tokens
    project_up                                                     -> qformer.project_up

Kept as extras (group `unused`): `qformer.bert.embeddings.position_ids` (int64 buffer), `project_down` and
`merge_proj` (built by the reference but used by no forward path).
"""

from __future__ import annotations

from tpo_jax.checkpoints.mapping import Rule, extra, linear, norm, rule
from tpo_jax.checkpoints.ops import CONV3D, T

_V = "vision_encoder.encoder."
_Q = "qformer.bert."


def vit() -> list[Rule]:
    b, o = f"{_V}blocks.{{i}}.", "vision.blocks.{i}."
    return [
        rule(f"{_V}patch_embed.proj.weight", "vision.patch_embed.kernel", CONV3D),
        rule(f"{_V}patch_embed.proj.bias", "vision.patch_embed.bias"),
        *norm(f"{b}norm1", f"{o}norm1"),
        *norm(f"{b}norm2", f"{o}norm2"),
        rule(f"{b}attn.qkv.weight", f"{o}attn.qkv", T),
        rule(f"{b}attn.q_bias", f"{o}attn.q_bias"),
        rule(f"{b}attn.v_bias", f"{o}attn.v_bias"),
        *linear(f"{b}attn.proj", f"{o}attn.proj"),
        *linear(f"{b}mlp.fc1", f"{o}fc1"),
        *linear(f"{b}mlp.fc2", f"{o}fc2"),
        *norm("vision_layernorm", "vision.outer_norm"),
    ]


def qformer() -> list[Rule]:
    e, l, o = f"{_Q}embeddings.", f"{_Q}encoder.layer.{{i}}.", "qformer.layers.{i}."
    rules = [
        rule(f"{e}word_embeddings.weight", "qformer.embeddings.word_embeddings.embedding"),
        rule(f"{e}position_embeddings.weight", "qformer.embeddings.position_embeddings.embedding"),
        *norm(f"{e}LayerNorm", "qformer.embeddings.norm"),
        extra(f"{e}position_ids", f"unused/{e}position_ids", "buffer arange(512), not a parameter"),
    ]
    for a in ("attention", "crossattention"):
        for p in ("query", "key", "value"):
            rules += linear(f"{l}{a}.self.{p}", f"{o}{a}.{p}")
        rules += linear(f"{l}{a}.output.dense", f"{o}{a}.output.dense")
        rules += norm(f"{l}{a}.output.LayerNorm", f"{o}{a}.output.norm")
    for f in ("intermediate", "intermediate_query", "output", "output_query"):
        rules += linear(f"{l}{f}.dense", f"{o}{f}.dense")
    for f in ("output", "output_query"):
        rules += norm(f"{l}{f}.LayerNorm", f"{o}{f}.norm")
    rules += [
        rule("query_tokens", "qformer.query_tokens"),
        rule("extra_query_tokens", "qformer.extra_query_tokens"),
        *linear("project_up", "qformer.project_up"),
    ]
    for name in ("project_down", "merge_proj"):
        for leaf in ("weight", "bias"):
            rules.append(extra(f"{name}.{leaf}", f"unused/{name}.{leaf}", "built but used by no forward path"))
    return rules

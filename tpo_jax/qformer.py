"""Q-Former: the BERT-style bridge from vision features to LLM input rows (MODEL-SPEC §2).

Learned query vectors (`query_tokens` then `extra_query_tokens`, 32 + 64 in the released model) run
through a post-norm BERT encoder. Its layers run as a `tpo_jax.stack` of groups of `cross_attention_freq`
layers (the repeating unit); scanned (`stack.scan_layers`), member m of every group is stacked as
`layer_groups.{m}.*` (leading axis num_layers / freq, see `qformer_stack_layouts`); unrolled, the tree below. Every layer has bidirectional self-attention over
[queries; optional instruction text]; layers whose index is a multiple of `cross_attention_freq`
also let the queries cross-attend to the vision features. Query positions and text positions use
separate feed-forward weights (`intermediate_query`/`output_query` vs `intermediate`/`output`).
`encode` returns the query outputs of the last layer, (B, num_queries, hidden); `__call__` also
applies `project_up` (hidden → LLM width).

Parameter tree (logical axis names in brackets):

    query_tokens                        (1, nq, hidden)          [None, None, embed]
    extra_query_tokens                  (1, nq_extra, hidden)    [None, None, embed]
    embeddings.word_embeddings.embedding      (vocab, hidden)    [vocab, embed]
    embeddings.position_embeddings.embedding  (max_pos, hidden)  [None, embed]
    embeddings.norm.{scale,bias}
    layers.{i}.attention.{query,key,value}.{kernel,bias}          [embed, heads]
    layers.{i}.attention.output.dense.{kernel,bias}               [heads, embed]
    layers.{i}.attention.output.norm.{scale,bias}                 [norm]
    layers.{i}.crossattention.query.{kernel,bias}                 [embed, heads]     (i % freq == 0)
    layers.{i}.crossattention.{key,value}.{kernel,bias}           [vit_embed, heads] (i % freq == 0)
    layers.{i}.crossattention.output.{dense,norm}                                    (i % freq == 0)
    layers.{i}.intermediate.dense / intermediate_query.dense      [embed, mlp]
    layers.{i}.output.dense / output_query.dense                  [mlp, embed]
    layers.{i}.output.norm / output_query.norm                    [norm]
    project_up.{kernel,bias}                                      [embed, mlp]       (if llm_hidden)

Checkpoint mapping (released VideoChat-TPO keys; Linear `weight` (out, in) → `kernel` (in, out) transposed,
Embedding `weight` → `embedding`, LayerNorm `weight` → `scale`, every `bias` → `bias`):

    qformer.bert.embeddings.word_embeddings.weight          → embeddings.word_embeddings.embedding
    qformer.bert.embeddings.position_embeddings.weight      → embeddings.position_embeddings.embedding
    qformer.bert.embeddings.LayerNorm.{weight,bias}         → embeddings.norm.{scale,bias}
    qformer.bert.embeddings.position_ids                    → (dropped)
    qformer.bert.encoder.layer.{i}.{A}.self.{query,key,value}.{weight,bias}
                                                            → layers.{i}.{A}.{query,key,value}.{kernel,bias}
    qformer.bert.encoder.layer.{i}.{A}.output.dense.{weight,bias}
                                                            → layers.{i}.{A}.output.dense.{kernel,bias}
    qformer.bert.encoder.layer.{i}.{A}.output.LayerNorm.{weight,bias}
                                                            → layers.{i}.{A}.output.norm.{scale,bias}
        with A ∈ {attention, crossattention}
    qformer.bert.encoder.layer.{i}.{F}.dense.{weight,bias}  → layers.{i}.{F}.dense.{kernel,bias}
        with F ∈ {intermediate, intermediate_query, output, output_query}
    qformer.bert.encoder.layer.{i}.{O}.LayerNorm.{weight,bias}
                                                            → layers.{i}.{O}.norm.{scale,bias}
        with O ∈ {output, output_query}
    query_tokens, extra_query_tokens                        → query_tokens, extra_query_tokens
    project_up.{weight,bias}                                → project_up.{kernel,bias}

So the rule is: strip `qformer.bert.`, `encoder.layer.` → `layers.`, drop the `.self` segment,
`LayerNorm` → `norm`, and rename the leaf as above.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax import layers
from tpo_jax.attention import AttentionMask, attention
from tpo_jax.config import QFormerConfig
from tpo_jax.layers import Embed, LayerNorm, Linear
from tpo_jax.sharding import constrain
from tpo_jax.stack import StackLayout, build_stack, name, run_stack

ACT = ("batch", "length", "act_embed")  # logical axes of the residual stream

_query_init = nnx.initializers.normal(stddev=0.02)


class AddNorm(nnx.Module):
    """BERT's post-norm output block: LayerNorm(dropout(dense(x)) + residual)."""

    def __init__(self, in_features: int, out_features: int, *, eps: float, dropout_rate: float,
                 axes: layers.Axes, dtype, param_dtype, rngs: nnx.Rngs):
        self.dropout_rate = dropout_rate
        self.dense = Linear(in_features, out_features, axes=axes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = LayerNorm(out_features, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, residual: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        return self.norm(layers.dropout(self.dense(x), self.dropout_rate, rng) + residual)


class Intermediate(nnx.Module):
    """First half of the BERT feed-forward: GELU(dense(x)), hidden → intermediate."""

    def __init__(self, cfg: QFormerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.gelu(self.dense(x))


class QFormerAttention(nnx.Module):
    """Multi-head attention + AddNorm. Self-attention, or cross-attention with keys/values of width `kv_width`."""

    def __init__(self, cfg: QFormerConfig, *, kv_width: int | None = None, dtype, param_dtype, rngs: nnx.Rngs):
        hidden = cfg.hidden_size
        cross = kv_width is not None
        kv_width = hidden if kv_width is None else kv_width
        kv_axes = ("vit_embed", "heads") if cross else ("embed", "heads")
        self.num_heads = cfg.num_heads
        self.head_dim = hidden // cfg.num_heads
        self.dropout_rate = cfg.attention_dropout
        self.implementation = cfg.stack.attention
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = Linear(hidden, hidden, axes=("embed", "heads"), **kw)
        self.key = Linear(kv_width, hidden, axes=kv_axes, **kw)
        self.value = Linear(kv_width, hidden, axes=kv_axes, **kw)
        self.output = AddNorm(hidden, hidden, eps=cfg.norm_eps, dropout_rate=cfg.hidden_dropout,
                              axes=("heads", "embed"), **kw)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, key_valid: jax.Array | None = None,
                 rng: jax.Array | None = None) -> jax.Array:
        """x: (B, L, hidden); context: (B, S, kv_width) for cross-attention, None for self-attention;
        key_valid: (B, S) bool, True = may attend (None: every key)."""
        context = x if context is None else context
        attn_rng, out_rng = layers.split_rng(rng, 2)
        q, k, v = (name(proj(inp), tag) for proj, inp, tag in ((self.query, x, "query_proj"),
                                                                 (self.key, context, "key_proj"),
                                                                 (self.value, context, "value_proj")))
        # attention dropout is einsum's alone: training with it on runs einsum, whatever `stack.attention` says
        impl = "einsum" if (attn_rng is not None and self.dropout_rate > 0) else self.implementation
        mask = None if key_valid is None else AttentionMask(key_valid=key_valid)
        out = attention(self._heads(q), self._heads(k), self._heads(v), mask, scale=self.head_dim ** -0.5,
                        dropout_rate=self.dropout_rate, rng=attn_rng, implementation=impl)
        return self.output(name(out, "attention_out").reshape(x.shape), x, out_rng)


class QFormerLayer(nnx.Module):
    """One post-norm BERT layer with optional cross-attention and separate query / text feed-forwards."""

    def __init__(self, cfg: QFormerConfig, has_cross_attention: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ffn_out = dict(eps=cfg.norm_eps, dropout_rate=cfg.hidden_dropout, axes=("mlp", "embed"), **kw)
        self.attention = QFormerAttention(cfg, **kw)
        self.crossattention = (QFormerAttention(cfg, kv_width=cfg.encoder_width, **kw)
                               if has_cross_attention else None)
        self.intermediate = Intermediate(cfg, **kw)
        self.output = AddNorm(cfg.intermediate_size, cfg.hidden_size, **ffn_out)
        self.intermediate_query = Intermediate(cfg, **kw)
        self.output_query = AddNorm(cfg.intermediate_size, cfg.hidden_size, **ffn_out)

    def __call__(self, x: jax.Array, num_queries: int, vision: jax.Array, self_mask: jax.Array | None,
                 cross_mask: jax.Array | None, rng: jax.Array | None = None) -> jax.Array:
        """x: (B, num_queries + L_text, hidden) → same shape. Only the queries see the vision features."""
        self_rng, cross_rng, query_rng, text_rng = layers.split_rng(rng, 4)
        h = self.attention(x, key_valid=self_mask, rng=self_rng)
        queries, text = h[:, :num_queries], h[:, num_queries:]
        if self.crossattention is not None:
            queries = self.crossattention(queries, vision, cross_mask, rng=cross_rng)
        out = self.output_query(self.intermediate_query(queries), queries, query_rng)
        if text.shape[1] > 0:
            text = self.output(self.intermediate(text), text, text_rng)
            out = jnp.concatenate([out, text], axis=1)
        return out


class QFormerEmbeddings(nnx.Module):
    """[queries; word + position embeddings of the text] → LayerNorm → dropout. Queries get no positions."""

    def __init__(self, cfg: QFormerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout_rate = cfg.hidden_dropout
        self.word_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), **kw)
        self.position_embeddings = Embed(cfg.max_position, cfg.hidden_size, axes=(None, "embed"), **kw)
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)

    def __call__(self, queries: jax.Array, text_ids: jax.Array | None = None,
                 rng: jax.Array | None = None) -> jax.Array:
        x = queries
        if text_ids is not None:
            positions = jnp.arange(text_ids.shape[1])
            text = self.word_embeddings(text_ids) + self.position_embeddings(positions)[None]
            x = jnp.concatenate([queries, text.astype(queries.dtype)], axis=1)
        return layers.dropout(self.norm(x), self.dropout_rate, rng)


class QFormer(nnx.Module):
    """Learned queries + BERT encoder with cross-attention to vision features, and `project_up` to the LLM."""

    def __init__(self, cfg: QFormerConfig, llm_hidden: int | None = None, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = cfg.hidden_size
        self.query_tokens = layers.param(rngs, _query_init, (1, cfg.num_query_tokens, hidden),
                                         (None, None, "embed"), param_dtype)
        self.extra_query_tokens = layers.param(rngs, _query_init, (1, cfg.num_extra_query_tokens, hidden),
                                               (None, None, "embed"), param_dtype)
        self.embeddings = QFormerEmbeddings(cfg, **kw)
        freq = cfg.cross_attention_freq
        if cfg.stack.scan_layers:  # member m of each group of `freq` layers, stacked over the groups
            self.layer_groups = nnx.List([
                build_stack(lambda r, m=m: QFormerLayer(cfg, m == 0, dtype=dtype, param_dtype=param_dtype, rngs=r),
                            cfg.num_layers // freq, scan=True, rngs=rngs) for m in range(freq)])
        else:
            self.layers = nnx.List([QFormerLayer(cfg, i % freq == 0, **kw) for i in range(cfg.num_layers)])
        self.project_up = (Linear(hidden, llm_hidden, axes=("embed", "mlp"), **kw)
                           if llm_hidden is not None else None)

    def _check_inputs(self, vision, vision_mask, text_ids, text_mask) -> None:
        cfg = self.cfg
        if vision.ndim != 3 or vision.shape[-1] != cfg.encoder_width:
            raise ValueError(f"QFormer: vision features must have shape (batch, tokens, {cfg.encoder_width}) "
                             f"(qformer.encoder_width), got {tuple(vision.shape)}")
        batch, tokens = vision.shape[:2]
        if vision_mask is not None and tuple(vision_mask.shape) != (batch, tokens):
            raise ValueError(f"QFormer: vision_mask must have shape {(batch, tokens)}, "
                             f"got {tuple(vision_mask.shape)}")
        if text_ids is None:
            if text_mask is not None:
                raise ValueError("QFormer: text_mask given without text_ids")
            return
        if text_ids.ndim != 2 or text_ids.shape[0] != batch:
            raise ValueError(f"QFormer: text_ids must have shape ({batch}, text_len), got {tuple(text_ids.shape)}")
        if text_ids.shape[1] > cfg.max_position:
            raise ValueError(f"QFormer: text length {text_ids.shape[1]} exceeds qformer.max_position "
                             f"{cfg.max_position} (text_ids shape {tuple(text_ids.shape)})")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text_ids.shape):
            raise ValueError(f"QFormer: text_mask must have the shape of text_ids {tuple(text_ids.shape)}, "
                             f"got {tuple(text_mask.shape)}")

    def encode(self, vision: jax.Array, vision_mask: jax.Array | None = None, text_ids: jax.Array | None = None,
               text_mask: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
        """Query outputs of the last layer, (B, num_queries, hidden).

        vision: (B, N, encoder_width) features; vision_mask: (B, N), 1/True = valid (None: all valid).
        text_ids: (B, L) optional instruction tokens (any padding side); text_mask: (B, L), 1 = valid.
        rng: dropout key, None = deterministic.
        """
        self._check_inputs(vision, vision_mask, text_ids, text_mask)
        batch = vision.shape[0]
        nq = self.cfg.num_queries
        queries = jnp.concatenate([self.query_tokens[...], self.extra_query_tokens[...]], axis=1)
        queries = jnp.broadcast_to(queries.astype(self.dtype), (batch, nq, queries.shape[-1]))

        self_mask = None  # (B, S) key validity
        if text_ids is not None and text_mask is not None:
            self_mask = jnp.concatenate([jnp.ones((batch, nq), bool), text_mask.astype(bool)], axis=1)
        cross_mask = None if vision_mask is None else vision_mask.astype(bool)

        cfg, freq = self.cfg, self.cfg.cross_attention_freq
        steps = cfg.num_layers // freq
        emb_rng, layer_rng = layers.split_rng(rng, 2)
        layer_rngs = None if layer_rng is None else jax.random.split(layer_rng, (steps, freq))
        x = self.embeddings(queries, text_ids, emb_rng)
        vision = vision.astype(self.dtype)

        def body(group, x, rngs):
            for m, layer in enumerate(group):
                x = constrain(layer(x, nq, vision, self_mask, cross_mask, None if rngs is None else rngs[m]), *ACT)
            return x, None

        if cfg.stack.scan_layers:
            groups = tuple(self.layer_groups)
        else:
            groups = [tuple(self.layers[g * freq:(g + 1) * freq]) for g in range(steps)]
            if cfg.num_layers % freq:  # a last, shorter group
                groups.append(tuple(self.layers[steps * freq:]))
                steps += 1
                layer_rngs = None if layer_rng is None else jax.random.split(layer_rng, (steps, freq))
        x, _ = run_stack(body, groups, x, layer_rngs, cfg=cfg.stack, length=steps)
        return x[:, :nq]

    def __call__(self, vision: jax.Array, vision_mask: jax.Array | None = None, text_ids: jax.Array | None = None,
                 text_mask: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
        """`project_up(encode(...))`: (B, num_queries, llm_hidden)."""
        if self.project_up is None:
            raise ValueError("QFormer was built without llm_hidden, so it has no project_up; call encode() instead")
        return self.project_up(self.encode(vision, vision_mask, text_ids, text_mask, rng))


def qformer_stack_layouts(cfg: QFormerConfig, prefix: str = "qformer") -> list[StackLayout]:
    """Scanned Q-Former: member m of the repeating group of `cross_attention_freq` layers,
    `{prefix}.layer_groups.{m}.<rest>` (leading axis num_layers / freq), index g ↔ `{prefix}.layers.{g·freq+m}.<rest>`."""
    pre = f"{prefix}." if prefix else ""
    if not cfg.stack.scan_layers:
        return []
    freq = cfg.cross_attention_freq
    return [StackLayout(f"{pre}layer_groups.{m}.", f"{pre}layers.{{i}}.", cfg.num_layers // freq, m, freq)
            for m in range(freq)]

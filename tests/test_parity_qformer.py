"""Numeric parity of `tpo_jax.qformer.QFormer` with transformers' InstructBLIP Q-Former (tiny, random, f32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

from tpo_jax.config import QFormerConfig, StackConfig
from tpo_jax.qformer import QFormer, qformer_stack_layouts

from stack_helper import scanned_copy

HIDDEN, LAYERS, HEADS, INTER, VIS, VOCAB, MAXPOS = 32, 4, 2, 64, 24, 100, 64
NQ, NQ_EXTRA, LLM_HIDDEN = 3, 5, 40
TOL = 1e-4


def _hf_model() -> InstructBlipQFormerModel:
    config = InstructBlipQFormerConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTER, hidden_act="gelu", max_position_embeddings=MAXPOS, layer_norm_eps=1e-12,
        cross_attention_frequency=2, encoder_hidden_size=VIS, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = InstructBlipQFormerModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def _jax_config() -> QFormerConfig:
    return QFormerConfig(hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, intermediate_size=INTER,
                         vocab_size=VOCAB, max_position=MAXPOS, cross_attention_freq=2, encoder_width=VIS,
                         num_query_tokens=NQ, num_extra_query_tokens=NQ_EXTRA)


def _hf_to_ours(hf_name: str) -> tuple[str, bool]:
    """HF parameter name → (our dotted path, transpose?). HF's names differ from the VideoChat checkpoint only in
    `attention.attention.*` (checkpoint: `attention.self.*`) and `embeddings.layernorm` (checkpoint: `LayerNorm`)."""
    path = hf_name.replace("encoder.layer.", "layers.")
    path = path.replace("attention.attention.", "attention.")  # drop HF's inner MHA module (checkpoint's `.self`)
    path = path.replace("embeddings.layernorm.", "embeddings.norm.").replace("LayerNorm.", "norm.")
    head, leaf = path.rsplit(".", 1)
    if head.endswith("norm"):
        return f"{head}.{'scale' if leaf == 'weight' else 'bias'}", False
    if head.endswith("_embeddings"):
        return f"{head}.embedding", False
    return f"{head}.{'kernel' if leaf == 'weight' else 'bias'}", leaf == "weight"


def _abstract_model() -> QFormer:
    """Our QFormer with shape-only parameters (no random init: every value is then loaded)."""
    return nnx.eval_shape(lambda: QFormer(_jax_config(), LLM_HIDDEN, rngs=nnx.Rngs(0)))


def _load(hf: InstructBlipQFormerModel, queries: np.ndarray) -> QFormer:
    """Copy HF's weights (plus the given queries and a random project_up) into a fresh QFormer."""
    graphdef, state = nnx.split(_abstract_model())
    flat = {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}
    values = {}
    for name, tensor in hf.named_parameters():
        path, transpose = _hf_to_ours(name)
        value = tensor.detach().numpy()
        values[path] = value.T if transpose else value
    values["query_tokens"], values["extra_query_tokens"] = queries[:, :NQ], queries[:, NQ:]
    rng = np.random.default_rng(1)
    for path in ("project_up.kernel", "project_up.bias"):
        values[path] = rng.normal(size=flat[path].shape).astype(np.float32)
    assert sorted(values) == sorted(flat), f"unmatched: {sorted(set(values) ^ set(flat))}"
    for path, value in values.items():
        assert flat[path].shape == value.shape, f"{path}: {value.shape} vs {flat[path].shape}"
        flat[path].set_value(jnp.asarray(value))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def models():
    hf = _hf_model()
    queries = np.random.default_rng(2).normal(size=(1, NQ + NQ_EXTRA, HIDDEN)).astype(np.float32)
    ours = _load(hf, queries)
    return hf, ours, queries


def _hf_encode(hf, queries, vision, vision_mask=None, text_ids=None, text_mask=None) -> np.ndarray:
    batch = vision.shape[0]
    q = torch.from_numpy(np.broadcast_to(queries, (batch,) + queries.shape[1:]).copy())
    attn_mask = None
    if text_ids is not None:
        attn_mask = torch.cat([torch.ones(batch, q.shape[1], dtype=torch.long), torch.from_numpy(text_mask)], 1)
    with torch.no_grad():
        out = hf(input_ids=None if text_ids is None else torch.from_numpy(text_ids), attention_mask=attn_mask,
                 query_embeds=q, encoder_hidden_states=torch.from_numpy(vision),
                 encoder_attention_mask=None if vision_mask is None else torch.from_numpy(vision_mask))
    return out.last_hidden_state[:, :q.shape[1]].numpy()


def _vision(batch=2, tokens=7, seed=3):
    return np.random.default_rng(seed).normal(size=(batch, tokens, VIS)).astype(np.float32)


def test_parity_without_text(models):
    hf, ours, queries = models
    vision = _vision()
    expected = _hf_encode(hf, queries, vision)
    got = np.asarray(ours.encode(jnp.asarray(vision)))
    assert got.shape == (2, NQ + NQ_EXTRA, HIDDEN)
    diff = np.abs(got - expected).max()
    print(f"max |diff| without text: {diff:.3e}")
    assert diff <= TOL


def test_parity_with_left_padded_text(models):
    hf, ours, queries = models
    vision = _vision()
    rng = np.random.default_rng(4)
    text_ids = rng.integers(1, VOCAB, size=(2, 6)).astype(np.int64)
    text_mask = np.ones((2, 6), np.int64)
    text_mask[1, :2] = 0  # second sample is 4 tokens long, left-padded
    text_ids[1, :2] = 0
    expected = _hf_encode(hf, queries, vision, text_ids=text_ids, text_mask=text_mask)
    got = np.asarray(ours.encode(jnp.asarray(vision), text_ids=jnp.asarray(text_ids),
                                 text_mask=jnp.asarray(text_mask)))
    diff = np.abs(got - expected).max()
    print(f"max |diff| with left-padded text: {diff:.3e}")
    assert diff <= TOL
    # The padding really is masked: changing the padded ids does not change the output.
    text_ids2 = text_ids.copy()
    text_ids2[1, :2] = 57
    got2 = np.asarray(ours.encode(jnp.asarray(vision), text_ids=jnp.asarray(text_ids2),
                                  text_mask=jnp.asarray(text_mask)))
    np.testing.assert_allclose(got2, got, atol=1e-6)


def test_parity_with_vision_mask(models):
    hf, ours, queries = models
    vision = _vision()
    vision_mask = np.ones((2, 7), np.int64)
    vision_mask[0, 5:] = 0
    expected = _hf_encode(hf, queries, vision, vision_mask=vision_mask)
    got = np.asarray(ours.encode(jnp.asarray(vision), vision_mask=jnp.asarray(vision_mask)))
    diff = np.abs(got - expected).max()
    print(f"max |diff| with vision mask: {diff:.3e}")
    assert diff <= TOL
    # Masked vision tokens have no influence.
    perturbed = vision.copy()
    perturbed[0, 5:] += 10.0
    got2 = np.asarray(ours.encode(jnp.asarray(perturbed), vision_mask=jnp.asarray(vision_mask)))
    np.testing.assert_allclose(got2, got, atol=1e-6)


def test_scanned_groups_match_hf(models):
    """The same weights as the scanned layout (qformer.stack.scan_layers: layer_groups of cross / no-cross
    members under lax.scan), with text and a vision mask."""
    hf, ours, queries = models
    scfg = dataclasses.replace(_jax_config(), stack=StackConfig(scan_layers=True))
    scanned = scanned_copy(ours, lambda: QFormer(scfg, LLM_HIDDEN, rngs=nnx.Rngs(0)), qformer_stack_layouts(scfg, ""))
    vision = _vision()
    vision_mask = np.ones((2, vision.shape[1]), np.int64)
    vision_mask[1, -2:] = 0
    text_ids = np.random.default_rng(5).integers(1, 100, (2, 5))
    text_mask = np.ones((2, 5), np.int64)
    text_mask[0, :2] = 0
    expected = _hf_encode(hf, queries, vision, vision_mask, text_ids, text_mask)
    got = np.asarray(scanned.encode(jnp.asarray(vision), jnp.asarray(vision_mask), jnp.asarray(text_ids),
                                    jnp.asarray(text_mask)))
    assert np.abs(got - expected).max() <= TOL


def test_call_applies_project_up(models):
    _, ours, _ = models
    vision = jnp.asarray(_vision())
    encoded = np.asarray(ours.encode(vision), np.float64)
    kernel = np.asarray(ours.project_up.kernel[...], np.float64)
    bias = np.asarray(ours.project_up.bias[...], np.float64)
    out = np.asarray(ours(vision))
    assert out.shape == (2, NQ + NQ_EXTRA, LLM_HIDDEN)
    np.testing.assert_allclose(out, encoded @ kernel + bias, atol=1e-4)


def test_dropout_only_with_rng(models):
    _, ours, _ = models
    vision = jnp.asarray(_vision())
    det = np.asarray(ours.encode(vision))
    np.testing.assert_array_equal(np.asarray(ours.encode(vision)), det)
    dropped = np.asarray(ours.encode(vision, rng=jax.random.key(0)))
    assert np.isfinite(dropped).all() and np.abs(dropped - det).max() > 1e-3


def test_wrong_vision_width_raises(models):
    _, ours, _ = models
    with pytest.raises(ValueError, match=r"\(batch, tokens, 24\).*got \(2, 7, 16\)"):
        ours.encode(jnp.zeros((2, 7, 16)))


def test_text_too_long_raises(models):
    _, ours, _ = models
    with pytest.raises(ValueError, match="exceeds qformer.max_position 64"):
        ours.encode(jnp.asarray(_vision()), text_ids=jnp.zeros((2, MAXPOS + 1), jnp.int32))


def test_param_axes_and_structure():
    model = _abstract_model()
    state = nnx.state(model, nnx.Param)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    for path, var in nnx.to_flat_state(state):
        spec = specs[path].get_value()
        assert len(spec) == var.ndim and any(name is not None for name in spec), f"{path}: axes {spec}"
    assert model.layers[0].crossattention is not None and model.layers[1].crossattention is None
    assert model.layers[0].crossattention.key.kernel.shape == (VIS, HIDDEN)
    assert model.query_tokens.shape == (1, NQ, HIDDEN) and model.extra_query_tokens.shape == (1, NQ_EXTRA, HIDDEN)

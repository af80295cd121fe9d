"""Our Mistral decoder against transformers.MistralForCausalLM (tiny, random, GQA), in float32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tpo_jax.config import LLMConfig, LoRAConfig, StackConfig
from tpo_jax.llm import KVCache, MistralDecoder, init_added_token_rows, llm_stack_layouts, mean_init_new_rows
from tpo_jax.lora import LoRALinear, merge_lora, unmerge_lora

from stack_helper import scanned_copy

CFG = LLMConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                rope_theta=1_000_000.0, rms_norm_eps=1e-5, max_position=256)
TOL = 1e-4


def torch_mistral(cfg: LLMConfig, seed: int = 0) -> transformers.MistralForCausalLM:
    torch.manual_seed(seed)
    hf_cfg = transformers.MistralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position, sliding_window=cfg.sliding_window, tie_word_embeddings=False,
        attn_implementation="eager")
    model = transformers.MistralForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mix-up of norms would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def _t(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy()


def copy_into(ours: MistralDecoder, hf: transformers.MistralForCausalLM) -> None:
    """Copy HF weights into our module (Linear kernel = W^T)."""
    sd = {k: _t(v) for k, v in hf.state_dict().items()}
    ours.embed_tokens.embedding[...] = jnp.asarray(sd["model.embed_tokens.weight"])
    ours.norm.scale[...] = jnp.asarray(sd["model.norm.weight"])
    ours.lm_head.kernel[...] = jnp.asarray(sd["lm_head.weight"].T)
    for i, layer in enumerate(ours.layers):
        p = f"model.layers.{i}."
        layer.input_layernorm.scale[...] = jnp.asarray(sd[p + "input_layernorm.weight"])
        layer.post_attention_layernorm.scale[...] = jnp.asarray(sd[p + "post_attention_layernorm.weight"])
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, name).kernel[...] = jnp.asarray(sd[p + f"self_attn.{name}.weight"].T)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, name).kernel[...] = jnp.asarray(sd[p + f"mlp.{name}.weight"].T)


def ours_from(hf, cfg=CFG, lora=None) -> MistralDecoder:
    model = MistralDecoder(cfg, lora, rngs=nnx.Rngs(1))
    copy_into(model, hf)
    return model


def hf_logits(hf, ids, attention_mask=None):
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(np.asarray(ids)),
                 attention_mask=None if attention_mask is None else torch.tensor(np.asarray(attention_mask)))
    return _t(out.logits)


@pytest.fixture(scope="module")
def hf_model():
    return torch_mistral(CFG)


def test_logits_match_transformers(hf_model):
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 17))
    ours = ours_from(hf_model)
    out = ours(jnp.asarray(ids))
    diff = np.abs(np.asarray(out.logits) - hf_logits(hf_model, ids)).max()
    assert diff <= TOL, diff
    # the hidden state is the output of the final norm, as HF's hidden_states[-1]
    with torch.no_grad():
        hs = _t(hf_model(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states[-1])
    assert np.abs(np.asarray(out.hidden) - hs).max() <= TOL


def test_padding_mask_matches_transformers(hf_model):
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # right padding on the second sample
    ours = ours_from(hf_model)
    ours_logits = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    ref = hf_logits(hf_model, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ours_logits[valid] - ref[valid]).max() <= TOL


def test_sliding_window_matches_transformers():
    cfg = LLMConfig(**{**CFG.__dict__, "sliding_window": 4})
    hf = torch_mistral(cfg, seed=3)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 13))
    ours = ours_from(hf, cfg)
    diff = np.abs(np.asarray(ours(jnp.asarray(ids)).logits) - hf_logits(hf, ids)).max()
    assert diff <= TOL, diff
    # and the window really changes the result (so the test can fail)
    full = ours_from(hf, CFG)
    assert np.abs(np.asarray(full(jnp.asarray(ids)).logits) - hf_logits(hf, ids)).max() > 1e-3


def _set_random_lora(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_graph(model):
        if isinstance(m, LoRALinear):
            m.lora_a[...] = jnp.asarray(rng.normal(0, 0.3, m.lora_a.shape), jnp.float32)
            m.lora_b[...] = jnp.asarray(rng.normal(0, 0.3, m.lora_b.shape), jnp.float32)


def test_lora_forward_equals_torch_on_merged_weights(hf_model):
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.1)
    ours = ours_from(hf_model, lora=lora)
    _set_random_lora(ours)
    n_lora = sum(isinstance(m, LoRALinear) for _, m in nnx.iter_graph(ours))
    assert n_lora == 7 * CFG.num_layers + 1  # the 8 targets, lm_head included

    # merge into a PyTorch copy: W' = W + s * B_t @ A_t, with A_t = lora_a^T, B_t = lora_b^T
    merged = torch_mistral(CFG)
    merged.load_state_dict(hf_model.state_dict())
    modules = dict(merged.named_modules())
    for path, m in nnx.iter_graph(ours):
        if not isinstance(m, LoRALinear):
            continue
        name = ".".join(str(p) for p in path).replace("layers.", "model.layers.")
        delta = lora.scaling * (np.asarray(m.lora_a[...]) @ np.asarray(m.lora_b[...])).T
        with torch.no_grad():
            modules[name].weight.add_(torch.tensor(delta))

    ids = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 11))
    ref = hf_logits(merged, ids)
    got = np.asarray(ours(jnp.asarray(ids)).logits)
    assert np.abs(got - ref).max() <= TOL
    assert np.abs(got - hf_logits(hf_model, ids)).max() > 1e-2  # LoRA changed the output

    # merging in JAX gives the same forward; unmerging restores the base kernels
    before = np.asarray(ours.layers[0].self_attn.q_proj.kernel[...])
    merge_lora(ours)
    assert np.abs(np.asarray(ours(jnp.asarray(ids)).logits) - ref).max() <= TOL
    unmerge_lora(ours)
    assert np.abs(np.asarray(ours.layers[0].self_attn.q_proj.kernel[...]) - before).max() <= 1e-6
    assert np.abs(np.asarray(ours(jnp.asarray(ids)).logits) - ref).max() <= TOL


def test_scanned_layers_with_lora_match_transformers():
    """The same weights stacked (llm.stack.scan_layers), with a sliding window, padding and random LoRA
    adapters: the merged PyTorch model's logits; merging the stacked adapters in JAX gives them too."""
    cfg = LLMConfig(**{**CFG.__dict__, "sliding_window": 5})
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
    hf = torch_mistral(cfg, seed=4)
    ours = ours_from(hf, cfg, lora=lora)
    _set_random_lora(ours, seed=2)
    merged = torch_mistral(cfg)
    merged.load_state_dict(hf.state_dict())
    modules = dict(merged.named_modules())
    for path, m in nnx.iter_graph(ours):
        if isinstance(m, LoRALinear):
            name = ".".join(str(p) for p in path).replace("layers.", "model.layers.")
            with torch.no_grad():
                modules[name].weight.add_(torch.tensor(lora.scaling * (np.asarray(m.lora_a[...])
                                                                       @ np.asarray(m.lora_b[...])).T))
    scfg = dataclasses.replace(cfg, stack=StackConfig(scan_layers=True))
    scanned = scanned_copy(ours, lambda: MistralDecoder(scfg, lora, rngs=nnx.Rngs(0)), llm_stack_layouts(scfg, ""))
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 12))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    ref = hf_logits(merged, ids, mask)
    valid = mask.astype(bool)
    got = np.asarray(scanned(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    assert np.abs(got - ref)[valid].max() <= TOL
    merge_lora(scanned)
    got = np.asarray(scanned(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    assert np.abs(got - ref)[valid].max() <= TOL


def test_lora_dropout_only_with_rng(hf_model):
    ours = ours_from(hf_model, lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.5))
    _set_random_lora(ours, seed=1)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (1, 9)))
    a = ours(ids).logits
    b = ours(ids, rng=jax.random.key(0)).logits
    c = ours(ids, rng=jax.random.key(0)).logits
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(b), np.asarray(c))


def test_kv_cache_decoding_equals_full_forward(hf_model):
    ours = ours_from(hf_model)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 13)))
    prompt, steps = 5, 8
    full = np.asarray(ours(ids).logits)

    graphdef, state = nnx.split(ours)

    @jax.jit
    def step(state, tokens, cache):
        return nnx.merge(graphdef, state)(tokens, cache=cache)

    cache = KVCache.init(CFG, batch=2, max_len=16)
    out = step(state, ids[:, :prompt], cache)
    got = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(prompt, prompt + steps):
        out = step(state, ids[:, t:t + 1], cache)
        got.append(np.asarray(out.logits))
        cache = out.cache
    assert int(cache.length) == prompt + steps
    diff = np.abs(np.concatenate(got, axis=1) - full).max()
    assert diff <= TOL, diff


def test_mean_init_of_added_rows():
    rng = np.random.default_rng(6)
    emb = rng.normal(size=(10, 4)).astype(np.float32)
    grown = mean_init_new_rows(emb, 17)
    np.testing.assert_array_equal(grown[:10], emb)
    np.testing.assert_allclose(grown[10:], np.repeat(emb.mean(0, keepdims=True), 7, 0), rtol=1e-6)
    head = rng.normal(size=(4, 10)).astype(np.float32)  # lm_head kernel (hidden, vocab)
    grown_head = np.asarray(mean_init_new_rows(jnp.asarray(head), 17, axis=1))
    np.testing.assert_allclose(grown_head[:, 10:], np.repeat(head.mean(1, keepdims=True), 7, 1), rtol=1e-6)


def test_added_token_rows_of_a_plain_llm(hf_model):
    """Starting from a plain LLM: the 7 new rows of embed_tokens and lm_head are the means of the old rows."""
    model = init_added_token_rows(ours_from(hf_model), num_added=7)
    sd = {k: _t(v) for k, v in hf_model.state_dict().items()}
    emb, head = sd["model.embed_tokens.weight"], sd["lm_head.weight"]
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...][:-7]), emb[:-7])
    np.testing.assert_allclose(np.asarray(model.embed_tokens.embedding[...][-7:]),
                               np.repeat(emb[:-7].mean(0, keepdims=True), 7, 0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(model.lm_head.kernel[...][:, -7:]).T,
                               np.repeat(head[:-7].mean(0, keepdims=True), 7, 0), rtol=1e-5, atol=1e-7)

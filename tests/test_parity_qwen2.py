"""Qwen2 as a configuration of our decoder (`LLMConfig.attention_bias`, `tie_embeddings`): a tiny random
transformers.Qwen2ForCausalLM (q/k/v bias, GQA, f32) through tpo-convert gives HF's logits, in both stack layouts,
with and without the KV cache, with PEFT LoRA on the biased projections; export back is bit-exact; the decoder
nested in LLaVA-OneVision (`model.language_model.*`, and the transformers-4 `language_model.model.*` layout)
maps through the same table."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file

from tpo_jax.checkpoints.convert import abstract_params, convert_hf, param_shapes
from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.export import export_hf
from tpo_jax.checkpoints.mapping import Meta, build_export_plan, build_plan
from tpo_jax.checkpoints.orbax_io import load_params
from tpo_jax.checkpoints.tables.llm import hf_llm, hf_llm_export
from tpo_jax.config import ConfigError, LLMConfig, LoRAConfig, StackConfig, qwen2_7b_llm, qwen2_tiny_llm
from tpo_jax.llm import KVCache, MistralDecoder

CFG = qwen2_tiny_llm()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
TOL = 1e-4
IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 13))


def hf_config(cfg: LLMConfig) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position, use_sliding_window=False,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="eager")


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial norm weights and q/k/v biases (HF starts them at 1 and 0), so a mix-up would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("_proj.bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def torch_qwen2(cfg: LLMConfig = CFG, seed: int = 0) -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return randomize(transformers.Qwen2ForCausalLM(hf_config(cfg)), seed)


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(ids))).logits.float().numpy()


def ours_from(out, cfg: LLMConfig = CFG, lora: LoRAConfig | None = None) -> MistralDecoder:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MistralDecoder(cfg, lora, rngs=None)))
    return nnx.merge(graphdef, load_params(out, state, prefix="llm"))


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def hf():
    return torch_qwen2()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, hf):
    path = tmp_path_factory.mktemp("qwen2")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, saved):
    """tpo-convert output of the saved model, per stack layout."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for scan in (False, True):
        out[scan] = root / f"scan{int(scan)}"
        report = convert_hf(saved, out[scan], llm_cfg=CFG, scan_layers=scan)
        assert report["summary"]["mapped_keys"] == 2 + CFG.num_layers * (9 + 3) + 1  # + q/k/v biases
    return out


def _cfg(scan: bool) -> LLMConfig:
    return dataclasses.replace(CFG, stack=StackConfig(scan_layers=scan))


def test_config_and_presets():
    big = qwen2_7b_llm()
    big.validate()
    assert (big.hidden_size, big.intermediate_size, big.num_layers, big.num_heads, big.num_kv_heads,
            big.resolved_head_dim, big.vocab_size) == (3584, 18944, 28, 28, 4, 128, 152128)
    assert big.attention_bias and not big.tie_embeddings and big.sliding_window is None
    assert (big.rope_theta, big.rms_norm_eps) == (1e6, 1e-6)
    with pytest.raises(ConfigError, match="llm.attention_bias"):
        dataclasses.replace(CFG, attention_bias=1).validate()
    with pytest.raises(ConfigError, match="llm.rms_norm_eps"):
        dataclasses.replace(CFG, rms_norm_eps=0.0).validate()
    # the biases exist only on q/k/v, with the kernels' output axis names; LoRA keeps them on the base Linear
    model = MistralDecoder(CFG, LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(0))
    attn = model.layers[0].self_attn
    assert [attn.q_proj.bias.out_sharding, attn.k_proj.bias.out_sharding, attn.v_proj.bias.out_sharding] == [
        ("q_heads",), ("kv_heads",), ("kv_heads",)]
    assert attn.o_proj.bias is None and model.layers[0].mlp.up_proj.bias is None
    assert MistralDecoder(dataclasses.replace(CFG, attention_bias=False), rngs=nnx.Rngs(0)).layers[0] \
        .self_attn.q_proj.bias is None


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_logits_and_kv_cache_match_transformers(hf, converted, scan):
    ours = ours_from(converted[scan], _cfg(scan))
    out = ours(jnp.asarray(IDS))
    diff = max_diff(out.logits, hf_logits(hf, IDS))
    print(f"Qwen2 ({'scanned' if scan else 'unrolled'}) via tpo-convert vs transformers: max |diff| = {diff:.2e}")
    assert diff <= TOL
    with torch.no_grad():
        hs = hf(input_ids=torch.tensor(IDS), output_hidden_states=True).hidden_states[-1].numpy()
    assert max_diff(out.hidden, hs) <= TOL

    # prefill 5 tokens, then 8 single-token steps through the cache == the full forward
    graphdef, state = nnx.split(ours)

    @jax.jit
    def step(state, tokens, cache):
        return nnx.merge(graphdef, state)(tokens, cache=cache)

    ids = jnp.asarray(IDS)
    out = step(state, ids[:, :5], KVCache.init(CFG, batch=2, max_len=16))
    got = [np.asarray(out.logits)]
    for t in range(5, 13):
        out = step(state, ids[:, t:t + 1], out.cache)
        got.append(np.asarray(out.logits))
    assert int(out.cache.length) == 13
    diff = max_diff(np.concatenate(got, axis=1), np.asarray(ours(ids).logits))
    print(f"Qwen2 ({'scanned' if scan else 'unrolled'}) KV-cache decoding vs full forward: max |diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_round_trip_is_bit_exact(tmp_path, hf, saved, converted, scan):
    original = load_file(str(saved / "model.safetensors"))
    assert "model.layers.1.self_attn.v_proj.bias" in original
    export_hf(converted[scan], tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    reloaded = transformers.Qwen2ForCausalLM(hf_config(CFG)).eval()
    reloaded.load_state_dict(back, strict=True)
    assert max_diff(hf_logits(reloaded, IDS), hf_logits(hf, IDS)) == 0.0


def test_tied_embeddings(tmp_path):
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    hf = torch_qwen2(cfg, seed=1)
    hf.save_pretrained(tmp_path / "src")
    original = load_file(str(tmp_path / "src" / "model.safetensors"))
    assert "lm_head.weight" not in original
    convert_hf(tmp_path / "src", tmp_path / "ours", llm_cfg=cfg)
    ours = ours_from(tmp_path / "ours", cfg)
    assert ours.lm_head is None
    diff = max_diff(ours(jnp.asarray(IDS)).logits, hf_logits(hf, IDS))
    print(f"Qwen2 (tied embeddings) vs transformers: max |diff| = {diff:.2e}")
    assert diff <= TOL
    export_hf(tmp_path / "ours", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original) and all(torch.equal(back[k], v) for k, v in original.items())


def test_bias_mismatch_names_the_key(tmp_path, saved):
    with pytest.raises(ConversionError, match="unexpected key") as e:
        convert_hf(saved, tmp_path / "x", llm_cfg=dataclasses.replace(CFG, attention_bias=False), dry_run=True)
    assert e.value.key.endswith("_proj.bias")
    (tmp_path / "nobias").mkdir()  # a bias-free (Mistral-like) checkpoint into the Qwen2 config
    save_file({k: v for k, v in load_file(str(saved / "model.safetensors")).items() if not k.endswith(".bias")},
              str(tmp_path / "nobias" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing key: no source tensor for parameter "
                                              r"'llm\.layers\.\d\.self_attn\.[qkv]_proj\.bias'"):
        convert_hf(tmp_path / "nobias", tmp_path / "y", llm_cfg=CFG, dry_run=True)


@pytest.mark.parametrize("mode", ["merge", "keep"])
def test_peft_lora_on_biased_projections(tmp_path, saved, mode):
    """PEFT LoRA on every target (q/k/v included, whose bias stays on the base layer) == peft's logits."""
    torch.manual_seed(2)
    model = peft.get_peft_model(torch_qwen2(), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path / "adapter")
    convert_hf(saved, tmp_path / "ours", adapter=tmp_path / "adapter", lora=mode, llm_cfg=CFG)
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=tuple(TARGETS)) if mode == "keep" else None
    ours = ours_from(tmp_path / "ours", CFG, lora)
    if mode == "keep":
        assert ours.layers[0].self_attn.k_proj.bias is not None and ours.layers[0].self_attn.k_proj.lora_a is not None
    ref = hf_logits(model, IDS)
    diff = max_diff(ours(jnp.asarray(IDS)).logits, ref)
    print(f"Qwen2 + PEFT LoRA ({mode}) vs peft: max |diff| = {diff:.2e}")
    assert diff <= TOL
    assert max_diff(ref, hf_logits(torch_qwen2(), IDS)) > 1e-2  # the adapter changes the model


def _apply(rules, sd: dict[str, np.ndarray], target) -> dict[str, np.ndarray]:
    """Run a key table on an in-memory state dict (what tpo-convert does file by file)."""
    meta = {k: Meta(tuple(v.shape), v.dtype, "state_dict") for k, v in sd.items()}
    out = {}
    for job in build_plan(meta, rules, target, where="state_dict").params:
        out.update(zip(job.dst, job.rule.op.forward([sd[k] for k in job.src])))
    return out


def _export(rules, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for job in build_export_plan({k: v.shape for k, v in params.items()}, {}, rules, where="ours").params:
        out.update(zip(job.src, job.rule.op.inverse([params[d] for d in job.dst])))
    return out


def test_llava_onevision_nesting():
    """The Qwen2 inside a (tiny) LlavaOnevisionForConditionalGeneration: its `model.language_model.*` + `lm_head.*`
    keys (transformers 5 names) and the transformers-4 `language_model.model.*` / `language_model.lm_head.*`
    names map through the same table; our decoder then gives the LLaVA model's text-only logits."""
    torch.manual_seed(3)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    llava = transformers.LlavaOnevisionForConditionalGeneration(transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=hf_config(CFG), image_token_index=CFG.vocab_size - 2,
        video_token_index=CFG.vocab_size - 1))
    randomize(llava, 3)
    sd = {k: v.numpy() for k, v in llava.state_dict().items()
          if k.startswith(("model.language_model.", "lm_head."))}
    assert "model.language_model.layers.0.self_attn.q_proj.bias" in sd and "lm_head.weight" in sd
    target = param_shapes(abstract_params(lambda: MistralDecoder(CFG, rngs=None)), "llm")
    params = _apply(hf_llm(tie=False, attention_bias=True, layout="llava"), sd, target)
    legacy = {k.replace("model.language_model.", "language_model.model.").replace("lm_head.", "language_model.lm_head.")
              : v for k, v in sd.items()}
    params_legacy = _apply(hf_llm(tie=False, attention_bias=True, layout="llava_legacy"), legacy, target)
    assert set(params) == set(target) == set(params_legacy)
    assert all(np.array_equal(params[k], params_legacy[k]) for k in params)

    back = _export(hf_llm_export(tie=False, lora_modules=(), merged=True, scaling=1.0, layout="llava"), params)
    assert set(back) == set(sd) and all(np.array_equal(back[k], v) and back[k].dtype == v.dtype
                                        for k, v in sd.items())

    graphdef, state = nnx.split(nnx.eval_shape(lambda: MistralDecoder(CFG, rngs=None)))
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        var.set_value(jnp.asarray(params["llm." + ".".join(map(str, path))]))
    ours = nnx.merge(graphdef, state)
    ids = np.minimum(IDS, CFG.vocab_size - 3)  # text only: no image / video placeholder tokens
    diff = max_diff(ours(jnp.asarray(ids)).logits, hf_logits(llava.eval(), ids))
    print(f"Qwen2 inside LLaVA-OneVision (text only) vs transformers: max |diff| = {diff:.2e}")
    assert diff <= TOL

"""Hugging Face Mistral (+ PEFT LoRA adapter) -> tpo-convert -> our logits equal transformers / peft (f32), and
export back (merged, or base + PEFT adapter) is bit-exact and loads in transformers / peft."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file

from tpo_jax.checkpoints.convert import convert_hf
from tpo_jax.checkpoints.export import ParamSet, export_hf
from tpo_jax.checkpoints.orbax_io import load_params, saved_arrays
from tpo_jax.cli.convert import main
from tpo_jax.config import LLMConfig, LoRAConfig
from tpo_jax.llm import MistralDecoder

CFG = LLMConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                rope_theta=1_000_000.0, rms_norm_eps=1e-5, max_position=256)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
TOL = 1e-4


def _hf_model(seed=0) -> transformers.MistralForCausalLM:
    torch.manual_seed(seed)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size, num_hidden_layers=CFG.num_layers,
        num_attention_heads=CFG.num_heads, num_key_value_heads=CFG.num_kv_heads,
        intermediate_size=CFG.intermediate_size, rope_theta=CFG.rope_theta, rms_norm_eps=CFG.rms_norm_eps,
        max_position_embeddings=CFG.max_position, sliding_window=None, tie_word_embeddings=False,
        attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def _logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def _ours(out, lora: LoRAConfig | None = None) -> MistralDecoder:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MistralDecoder(CFG, lora, rngs=None)))
    return nnx.merge(graphdef, load_params(out, state, prefix="llm"))


IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 13))


@pytest.fixture(scope="module")
def hf():
    return _hf_model()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, hf):
    root = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(root / "single")
    hf.save_pretrained(root / "sharded", max_shard_size="40KB")
    (root / "bin").mkdir()
    torch.save(hf.state_dict(), root / "bin" / "pytorch_model.bin")
    (root / "bin" / "config.json").write_text((root / "single" / "config.json").read_text())
    return root


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, hf):
    torch.manual_seed(1)
    model = peft.get_peft_model(_hf_model(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                             target_modules=TARGETS, init_lora_weights=False)).eval()
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_logits_match_transformers(tmp_path, hf, saved, layout):
    if layout == "sharded":
        assert (saved / "sharded" / "model.safetensors.index.json").exists()
    report = convert_hf(saved / layout, tmp_path / "out")
    assert report["summary"]["mapped_keys"] == 2 + 2 * 9 + 1
    diff = np.abs(np.asarray(_ours(tmp_path / "out")(jnp.asarray(IDS)).logits) - _logits(hf, IDS)).max()
    print(f"Mistral ({layout}) via tpo-convert vs transformers: max |diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact_and_loads(tmp_path, saved, dtype):
    src = saved / "single"
    original = load_file(str(src / "model.safetensors"))
    if dtype == "bfloat16":  # a bf16 source, kept as bf16
        from safetensors.torch import save_file
        src = tmp_path / "bf16"
        src.mkdir()
        original = {k: v.to(torch.bfloat16) for k, v in original.items()}
        save_file(original, str(src / "model.safetensors"), metadata={"format": "pt"})
        (src / "config.json").write_text((saved / "single" / "config.json").read_text())
    convert_hf(src, tmp_path / "ours")
    assert {d for _, d in saved_arrays(tmp_path / "ours" / "params").values()} == {
        np.dtype(np.float32) if dtype == "float32" else np.dtype(ml_dtypes.bfloat16)}
    files = export_hf(tmp_path / "ours", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original) and len(files) == 2
    for k, v in original.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    reloaded = transformers.MistralForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    ours = np.asarray(_ours(tmp_path / "ours")(jnp.asarray(IDS)).logits)
    assert np.abs(_logits(reloaded.eval(), IDS) - ours).max() <= TOL


def test_peft_adapter_merged(tmp_path, hf, saved, adapter):
    path, peft_model = adapter
    convert_hf(saved / "single", tmp_path / "merged", adapter=path, lora="merge")
    ref = _logits(peft_model, IDS)
    got = np.asarray(_ours(tmp_path / "merged")(jnp.asarray(IDS)).logits)
    diff = np.abs(got - ref).max()
    print(f"Mistral + PEFT adapter (merged) vs peft: max |diff| = {diff:.2e}")
    assert diff <= TOL
    assert np.abs(got - _logits(hf, IDS)).max() > 1e-2  # the adapter really changes the model
    # exported merged weights load in transformers and give the same logits
    export_hf(tmp_path / "merged", tmp_path / "hf_merged")
    reloaded = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf_merged", dtype=torch.float32).eval()
    assert np.abs(_logits(reloaded, IDS) - ref).max() <= TOL


def test_peft_adapter_kept_and_exported(tmp_path, hf, saved, adapter):
    path, peft_model = adapter
    convert_hf(saved / "single", tmp_path / "kept", adapter=path, lora="keep")
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=tuple(TARGETS))
    ours = _ours(tmp_path / "kept", lora)
    ref = _logits(peft_model, IDS)
    diff = np.abs(np.asarray(ours(jnp.asarray(IDS)).logits) - ref).max()
    print(f"Mistral + PEFT adapter (kept) vs peft: max |diff| = {diff:.2e}")
    assert diff <= TOL
    adapter_sd = load_file(str(path / "adapter_model.safetensors"))
    a = adapter_sd["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    np.testing.assert_array_equal(np.asarray(ours.layers[1].mlp.down_proj.lora_a[...]), a.numpy().T)
    # base + adapter export: the adapter file is bit-exact and peft loads it onto the exported base
    export_hf(tmp_path / "kept", tmp_path / "hf_peft", peft=True)
    back = load_file(str(tmp_path / "hf_peft" / "adapter" / "adapter_model.safetensors"))
    assert set(back) == set(adapter_sd)
    assert all(torch.equal(back[k], v) for k, v in adapter_sd.items())
    base = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf_peft", dtype=torch.float32)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in hf.state_dict().items())
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "hf_peft" / "adapter").eval()
    assert np.abs(_logits(reloaded, IDS) - ref).max() <= TOL
    # in-memory export of a model state (no Orbax checkpoint in between)
    state = nnx.state(ours, nnx.Param)
    ps = ParamSet({f"llm.{k}": v for k, v in ParamSet.from_state(state, None).params.items()}, (CFG, lora))
    export_hf(ps, tmp_path / "hf_mem")
    mem = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf_mem", dtype=torch.float32).eval()
    assert np.abs(_logits(mem, IDS) - ref).max() <= TOL


def test_cli_hf(tmp_path, saved, adapter, capsys):
    assert main(["hf", str(saved / "single"), str(tmp_path / "o"), "--adapter", str(adapter[0])]) == 0
    assert "mapped into the model" in capsys.readouterr().out
    assert main(["export-hf", str(tmp_path / "o"), str(tmp_path / "e"), "--dtype", "bfloat16"]) == 0
    assert load_file(str(tmp_path / "e" / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16

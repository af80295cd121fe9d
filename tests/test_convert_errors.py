"""Bad inputs get one clear ConversionError naming the file and key, and leave nothing at the output path;
sharded writes and strict restores."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.torch import load_file, save_file

from tpo_jax.checkpoints.convert import convert_hf
from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.export import export_hf
from tpo_jax.checkpoints.orbax_io import load_params
from tpo_jax.checkpoints.sources import SafetensorsFile, open_source
from tpo_jax.cli.convert import main
from tpo_jax.config import LLMConfig
from tpo_jax import sharding as tpo_sharding
from tpo_jax.llm import MistralDecoder

CFG = LLMConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
                max_position=128)
HF_CONFIG = {"model_type": "mistral", "vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
             "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": None}


def _state_dict(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, hd, kv, f, v = 32, 8, 2, 48, 97
    sd = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(2):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                   p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f)})
    return {k: torch.randn(s, generator=g) for k, s in sd.items()}


def _write(directory, sd):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    return directory


def _no_leftovers(parent, name="out"):
    assert not (parent / name).exists()
    assert not [p for p in os.listdir(parent) if p.startswith(f".{name}.tmp")]


def test_missing_key(tmp_path):
    sd = _state_dict()
    del sd["model.layers.1.mlp.up_proj.weight"]
    src = _write(tmp_path / "src", sd)
    with pytest.raises(ConversionError) as e:
        convert_hf(src, tmp_path / "out")
    assert e.value.key == "model.layers.1.mlp.up_proj.weight" and str(src) in e.value.file
    assert "missing key" in str(e.value) and "llm.layers.1.mlp.up_proj.kernel" in str(e.value)
    _no_leftovers(tmp_path)


def test_unexpected_key(tmp_path):
    sd = _state_dict()
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    src = _write(tmp_path / "src", sd)
    with pytest.raises(ConversionError, match="unexpected key") as e:
        convert_hf(src, tmp_path / "out")
    assert e.value.key == "model.layers.0.self_attn.q_proj.bias"
    assert e.value.file == str(src / "model.safetensors")
    _no_leftovers(tmp_path)


def test_key_of_a_layer_the_model_lacks(tmp_path):
    sd = _state_dict()
    sd["model.layers.2.input_layernorm.weight"] = torch.ones(32)
    src = _write(tmp_path / "src", sd)
    with pytest.raises(ConversionError, match="'llm.layers.2.input_layernorm.scale', which the model does not have"):
        convert_hf(src, tmp_path / "out")


def test_shape_mismatch(tmp_path):
    sd = _state_dict()
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(24, 32)
    src = _write(tmp_path / "src", sd)
    expected = r"shape mismatch: \[\(24, 32\)\] gives \(32, 24\) .*expects \(32, 16\)"
    with pytest.raises(ConversionError, match=expected) as e:
        convert_hf(src, tmp_path / "out")
    assert e.value.key == "model.layers.1.self_attn.k_proj.weight" and e.value.file.endswith("model.safetensors")
    _no_leftovers(tmp_path)


def test_truncated_safetensors(tmp_path):
    src = _write(tmp_path / "src", _state_dict())
    f = src / "model.safetensors"
    header = SafetensorsFile(f)
    last = max(header.entries, key=lambda k: header.entries[k][3])
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 10)
    with pytest.raises(ConversionError, match="file is truncated") as e:
        convert_hf(src, tmp_path / "out")
    assert e.value.file == str(f) and e.value.key == last
    _no_leftovers(tmp_path)
    with open(f, "r+b") as fh:  # cut inside the header
        fh.truncate(20)
    with pytest.raises(ConversionError, match="corrupt or truncated"):
        open_source(f)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_pickle_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "evil": _RunsCode()}, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(ConversionError, match="refusing to load.*would\\s+run code") as e:
        convert_hf(src, tmp_path / "out")
    assert e.value.file == str(src / "pytorch_model.bin") and "system" in str(e.value)
    assert not (tmp_path / "pwned_by_pickle").exists()
    _no_leftovers(tmp_path)


def test_missing_shard_and_index_entry(tmp_path):
    sd = _state_dict()
    src = tmp_path / "src"
    src.mkdir()
    keys = list(sd)
    save_file({k: sd[k] for k in keys[:10]}, str(src / "a.safetensors"))
    weight_map = {k: ("a.safetensors" if i < 10 else "b.safetensors") for i, k in enumerate(keys)}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(ConversionError, match="shard file .*b.safetensors.* is missing") as e:
        convert_hf(src, tmp_path / "out")
    assert e.value.key == keys[10]
    save_file({k: sd[k] for k in keys[10:-1]}, str(src / "b.safetensors"))
    with pytest.raises(ConversionError, match="that shard does not contain it") as e:
        convert_hf(src, tmp_path / "out")
    assert e.value.key == keys[-1] and e.value.file.endswith("index.json")


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    src = _write(tmp_path / "src", _state_dict())
    real_read = SafetensorsFile.read

    def flaky(self, key):
        if key == "model.layers.1.mlp.down_proj.weight":
            raise ConversionError("read failed", file=self.path, key=key)
        return real_read(self, key)

    monkeypatch.setattr(SafetensorsFile, "read", flaky)
    with pytest.raises(ConversionError, match="read failed"):
        convert_hf(src, tmp_path / "out")
    _no_leftovers(tmp_path)
    monkeypatch.setattr(SafetensorsFile, "read", real_read)
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="output already exists"):
        convert_hf(src, tmp_path / "out")


def _abstract_state():
    return nnx.state(nnx.eval_shape(lambda: MistralDecoder(CFG, None, rngs=None)), nnx.Param)


def test_sharded_write_and_restore(tmp_path):
    sd = _state_dict(1)
    src = _write(tmp_path / "src", sd)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    abstract = _abstract_state()
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(abstract)}
    shardings = {p: NamedSharding(mesh, P("fsdp") if v.get_value().shape[0] % 4 == 0 else P())
                 for p, v in flat.items()}
    convert_hf(src, tmp_path / "out", shardings=shardings)
    assert (tmp_path / "out" / "params" / "_sharding").exists()
    restored = load_params(tmp_path / "out", abstract, shardings, prefix="llm")
    q = restored["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
    assert q.sharding == shardings["layers.0.self_attn.q_proj.kernel"]
    np.testing.assert_array_equal(np.asarray(q), sd["model.layers.0.self_attn.q_proj.weight"].numpy().T)
    emb = restored["embed_tokens"]["embedding"].get_value()
    np.testing.assert_array_equal(np.asarray(emb), sd["model.embed_tokens.weight"].numpy())
    # a sharded-written checkpoint exports back bit-exactly too
    export_hf(tmp_path / "out", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_sharded_write_with_project_mesh(tmp_path):
    src = _write(tmp_path / "src", _state_dict(2))
    mesh = tpo_sharding.make_mesh(tpo_sharding.MeshConfig(data=2, fsdp=4, tensor=1))
    convert_hf(src, tmp_path / "out", mesh=mesh, rules="fsdp")
    abstract = _abstract_state()
    shardings = tpo_sharding.tree_shardings(abstract, mesh, tpo_sharding.get_rules("fsdp"))
    restored = load_params(tmp_path / "out", abstract, shardings, prefix="llm")
    w = restored["layers"][1]["mlp"]["down_proj"]["kernel"].get_value()
    np.testing.assert_array_equal(np.asarray(w), load_file(str(src / "model.safetensors"))[
        "model.layers.1.mlp.down_proj.weight"].numpy().T)


def test_strict_restore_names_the_missing_parameter(tmp_path):
    src = _write(tmp_path / "src", _state_dict())
    convert_hf(src, tmp_path / "out")
    big = nnx.state(nnx.eval_shape(lambda: MistralDecoder(
        LLMConfig(**{**CFG.__dict__, "num_layers": 3}), None, rngs=None)), nnx.Param)
    with pytest.raises(ConversionError, match="no array for parameter 'llm.layers.2.input_layernorm.scale'"):
        load_params(tmp_path / "out", big, prefix="llm")
    # non-strict: the missing layer keeps its abstract value, the rest is restored in the abstract dtype
    got = load_params(tmp_path / "out", big, prefix="llm", strict=False)
    assert isinstance(got["layers"][2]["input_layernorm"]["scale"].get_value(), jax.ShapeDtypeStruct)
    assert got["norm"]["scale"].get_value().dtype == np.float32
    small = nnx.state(nnx.eval_shape(lambda: MistralDecoder(
        LLMConfig(**{**CFG.__dict__, "num_layers": 1}), None, rngs=None)), nnx.Param)
    with pytest.raises(ConversionError, match="the model has no parameter for this checkpoint array") as e:
        load_params(tmp_path / "out", small, prefix="llm")
    assert e.value.key.startswith("llm.layers.1.")


def test_bad_adapter_config(tmp_path):
    src = _write(tmp_path / "src", _state_dict())
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                         "target_modules": ["q_proj"], "use_dora": True}))
    with pytest.raises(ConversionError, match="'use_dora' = True is not supported") as e:
        convert_hf(src, tmp_path / "out", adapter=ad)
    assert e.value.file.endswith("adapter_config.json")


def test_cli_reports_error(tmp_path, capsys):
    sd = _state_dict()
    del sd["lm_head.weight"]
    src = _write(tmp_path / "src", sd)
    assert main(["hf", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tpo-convert: error: ") and "key 'lm_head.weight'" in err and "missing key" in err

"""Bad inputs get one clear ConversionError naming the file and key, and leave nothing at the output path;
sharded writes and strict restores."""

import io
import json
import os
import struct

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


# ------------------------------------------------------------------------------------------------ hostile inputs
# Findings of the hostile-input audit (issue 26): paths confined to the checkpoint directory, regular files only,
# safetensors headers validated exactly as strictly as the `safetensors` library, one ConversionError each.

import random  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import fuzz_convert as fz  # noqa: E402  (tests/fuzz_convert.py: case generator, raw header builder)


def _np_state_dict(seed=0):
    return {k: v.numpy() for k, v in _state_dict(seed).items()}


def _crafted(tmp_path, mutate=None, *, pad=True):
    """src/model.safetensors built from the test model's header pairs and data, changed by `mutate`."""
    header, data = fz.safetensors_bytes(_np_state_dict())
    if mutate is not None:
        header, data = mutate(header, data)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(HF_CONFIG))
    (src / "model.safetensors").write_bytes(fz.encode(header, data, pad=pad))
    return src


def _entry(header, key):
    return next(v for k, v in header if k == key)


def _rejected(src, tmp_path, match, *, library=True):
    """convert_hf refuses `src` with one ConversionError naming its file, leaves nothing behind, and the
    safetensors library refuses the same bytes."""
    with pytest.raises(ConversionError, match=match) as e:
        convert_hf(src, tmp_path / "out")
    assert e.value.file == str(src / "model.safetensors"), e.value.file
    assert str(src / "model.safetensors") in str(e.value) and "\n" not in str(e.value)
    _no_leftovers(tmp_path)
    if library:
        assert not fz.library_accepts(src / "model.safetensors")
    return e.value


def _sharded_source(tmp_path, split=10):
    sd = _state_dict()
    src = tmp_path / "src"
    src.mkdir()
    keys = list(sd)
    save_file({k: sd[k] for k in keys[:split]}, str(src / "a.safetensors"))
    save_file({k: sd[k] for k in keys[split:]}, str(src / "b.safetensors"))
    weight_map = {k: ("a.safetensors" if i < split else "b.safetensors") for i, k in enumerate(keys)}
    (src / "config.json").write_text(json.dumps(HF_CONFIG))
    return src, weight_map


def _write_index(src, weight_map):
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_path_traversal_is_refused(tmp_path):
    src, weight_map = _sharded_source(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(src / "b.safetensors", outside / "b.safetensors")  # a valid file: only the path is wrong
    first_b = next(k for k, v in weight_map.items() if v == "b.safetensors")
    for bad in ("../outside/b.safetensors", "sub/../b.safetensors", "..\\outside\\b.safetensors"):
        _write_index(src, {k: (bad if v == "b.safetensors" else v) for k, v in weight_map.items()})
        with pytest.raises(ConversionError, match="contains '..'; index entries must name files inside") as e:
            convert_hf(src, tmp_path / "out")
        assert e.value.file == str(src / "model.safetensors.index.json") and e.value.key == first_b
        _no_leftovers(tmp_path)


def test_index_absolute_path_is_refused(tmp_path):
    src, weight_map = _sharded_source(tmp_path)
    target = tmp_path / "elsewhere.safetensors"
    shutil.copy(src / "b.safetensors", target)
    for bad in (str(target), str(src / "b.safetensors")):  # even one that points back inside
        _write_index(src, {k: (bad if v == "b.safetensors" else v) for k, v in weight_map.items()})
        with pytest.raises(ConversionError, match="is an absolute path") as e:
            convert_hf(src, tmp_path / "out")
        assert e.value.file.endswith("model.safetensors.index.json")
        _no_leftovers(tmp_path)


@pytest.mark.parametrize("name", [1, None, "", "a.safetensors\u0000x", ["a.safetensors"]])
def test_index_shard_name_that_is_not_a_file_name(tmp_path, name):
    src, weight_map = _sharded_source(tmp_path)
    key = next(iter(weight_map))
    _write_index(src, {**weight_map, key: name})
    with pytest.raises(ConversionError, match="the shard") as e:
        convert_hf(src, tmp_path / "out")
    assert e.value.key == key and e.value.file.endswith("index.json")


def test_symlink_escaping_the_checkpoint_directory(tmp_path):
    src, weight_map = _sharded_source(tmp_path)
    _write_index(src, weight_map)
    outside = tmp_path / "outside.safetensors"
    os.replace(src / "b.safetensors", outside)
    os.symlink(outside, src / "b.safetensors")
    with pytest.raises(ConversionError, match="outside the checkpoint directory") as e:
        convert_hf(src, tmp_path / "out")
    assert e.value.file == str(src / "b.safetensors") and str(outside) in str(e.value)
    _no_leftovers(tmp_path)
    # a single-file checkpoint whose model.safetensors is a relative symlink out of the directory
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text(json.dumps(HF_CONFIG))
    save_file(_state_dict(), str(tmp_path / "real.safetensors"))
    os.symlink("../real.safetensors", single / "model.safetensors")
    with pytest.raises(ConversionError, match="outside the checkpoint directory"):
        convert_hf(single, tmp_path / "out")
    _no_leftovers(tmp_path)
    # a symlink that stays inside is fine
    (src / "b.safetensors").unlink()
    (src / "blobs").mkdir()
    os.replace(outside, src / "blobs" / "b")
    os.symlink("blobs/b", src / "b.safetensors")
    convert_hf(src, tmp_path / "out")
    assert (tmp_path / "out" / "conversion.json").exists()


def test_hugging_face_cache_snapshot_symlinks_are_inside(tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    save_file(_state_dict(), str(repo / "blobs" / "f00d"))
    (repo / "blobs" / "beef").write_text(json.dumps(HF_CONFIG))
    os.symlink("../../blobs/f00d", snap / "model.safetensors")
    os.symlink("../../blobs/beef", snap / "config.json")
    convert_hf(snap, tmp_path / "out")
    assert (tmp_path / "out" / "params").is_dir()


def _finishes(fn, tmp_path, seconds=30.0):
    """fn() in a thread; fails (after unblocking any FIFO reader) if it is still running after `seconds`."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        fz._release_fifos(tmp_path)
        t.join(5)
        pytest.fail(f"still running after {seconds} s (blocked on a FIFO?)")
    return box


@pytest.mark.parametrize("where", ["model.safetensors", "shard", "index", "config.json", "pytorch_model.bin"])
def test_fifo_named_like_a_checkpoint_file_fails_at_once(tmp_path, where):
    if where == "shard":
        src, weight_map = _sharded_source(tmp_path)
        _write_index(src, weight_map)
        fifo = src / "b.safetensors"
        fifo.unlink()
    elif where == "index":
        src, _ = _sharded_source(tmp_path)
        fifo = src / "model.safetensors.index.json"
    else:
        src = _write(tmp_path / "src", _state_dict())
        if where == "pytorch_model.bin":
            (src / "model.safetensors").unlink()
        fifo = src / where
        if fifo.exists():
            fifo.unlink()
    os.mkfifo(fifo)
    start = time.perf_counter()
    box = _finishes(lambda: convert_hf(src, tmp_path / "out"), tmp_path)
    assert time.perf_counter() - start < 30
    e = box.get("error")
    assert isinstance(e, ConversionError), box
    assert e.file == str(fifo) and "not a regular file (a FIFO)" in str(e)
    _no_leftovers(tmp_path)


def test_directory_named_like_a_checkpoint_file(tmp_path):
    src = tmp_path / "src"
    (src / "model.safetensors").mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(HF_CONFIG))
    save_file(_state_dict(), str(src / "model.safetensors" / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"not a regular file \(a directory\)"):
        convert_hf(src, tmp_path / "out")
    shutil.rmtree(src / "model.safetensors")
    os.symlink(".", src / "model.safetensors")  # a loop through the directory itself
    with pytest.raises(ConversionError, match="not a regular file"):
        convert_hf(src, tmp_path / "out")
    _no_leftovers(tmp_path)


def test_overlapping_entries(tmp_path):
    def overlap(header, data):  # v_proj starts halfway into k_proj; the file shrinks by the same amount
        k = _entry(header, "model.layers.0.self_attn.k_proj.weight")
        kb, ke = k[2][1]
        half = (ke - kb) // 2
        for key, e in header[1:]:
            b, end = e[2][1]
            if b >= ke:
                e[2][1] = [b - half, end - half]
        return header, data[:ke] + data[ke + half:]

    src = _crafted(tmp_path, overlap)
    err = _rejected(src, tmp_path, "overlap tensor 'model.layers.0.self_attn.k_proj.weight'")
    assert err.key == "model.layers.0.self_attn.v_proj.weight"

    def same_offsets(header, data):  # two entries on the same bytes
        _entry(header, "model.layers.1.self_attn.v_proj.weight")[2][1] = \
            list(_entry(header, "model.layers.1.self_attn.k_proj.weight")[2][1])
        return header, data

    shutil.rmtree(tmp_path / "src")
    _rejected(_crafted(tmp_path, same_offsets), tmp_path, "overlap tensor|belong to no tensor")


@pytest.mark.parametrize("dim", [32.0, "32", -1, None, True, 2 ** 64, fz.Raw("-0"), fz.Raw("3.2e1")])
def test_non_integer_shape(tmp_path, dim):
    def mutate(header, data):
        _entry(header, "model.norm.weight")[1][1] = [dim]
        return header, data

    err = _rejected(_crafted(tmp_path, mutate), tmp_path, "shape must be a list of non-negative integers")
    assert err.key == "model.norm.weight"


def test_offsets_past_end_of_file(tmp_path):
    def past(header, data):
        b, e = _entry(header, "lm_head.weight")[2][1]
        _entry(header, "lm_head.weight")[2][1] = [b, e + 4]
        _entry(header, "lm_head.weight")[1][1] = [97, 32]
        return header, data

    _rejected(_crafted(tmp_path, past), tmp_path, "do not hold F32|file is truncated")

    def beyond(header, data):  # the last tensor moved past the end, the right size
        last = max((e for _, e in header[1:]), key=lambda e: e[2][1][1])
        b, e = last[2][1]
        last[2][1] = [b + 2 ** 40, e + 2 ** 40]
        return header, data

    shutil.rmtree(tmp_path / "src")
    _rejected(_crafted(tmp_path, beyond), tmp_path, "file is truncated: the tensor needs bytes")


def test_header_length_that_lies(tmp_path):
    src = _crafted(tmp_path)
    f = src / "model.safetensors"
    valid = f.read_bytes()
    n = struct.unpack("<Q", valid[:8])[0]
    for lie, match in ((len(valid), "does not fit in the file"), (2 ** 64 - 1, "exceeds the format's limit"),
                       (100_000_001, "exceeds the format's limit"), (n - 8, "not JSON"), (n + 8, "not JSON|not UTF-8"),
                       (0, "not JSON")):
        f.write_bytes(struct.pack("<Q", lie) + valid[8:])
        _rejected(src, tmp_path, match)


def test_wrong_byte_length_gap_and_trailing_bytes(tmp_path):
    def half(header, data):  # F16 over F32 bytes: the offsets hold twice what the shape needs
        _entry(header, "model.layers.0.mlp.up_proj.weight")[0][1] = "F16"
        return header, data

    err = _rejected(_crafted(tmp_path, half), tmp_path, r"do not hold F16 \[48, 32\] \(3072 bytes\)")
    assert err.key == "model.layers.0.mlp.up_proj.weight"
    shutil.rmtree(tmp_path / "src")

    def gap(header, data):
        first = _entry(header, "model.embed_tokens.weight")
        for _, e in header[1:]:
            e[2][1] = [e[2][1][0] + 4, e[2][1][1] + 4]
        assert first[2][1][0] == 4
        return header, b"\0" * 4 + data

    _rejected(_crafted(tmp_path, gap), tmp_path, "bytes 0..4 of the data section belong to no tensor")
    shutil.rmtree(tmp_path / "src")
    src = _crafted(tmp_path)
    with open(src / "model.safetensors", "ab") as fh:
        fh.write(b"\0" * 3)
    _rejected(src, tmp_path, "3 bytes after the last tensor's data")


def test_unknown_dtype_and_dtype_tpo_convert_cannot_read(tmp_path):
    def bad(header, data):
        _entry(header, "model.norm.weight")[0][1] = "f32"
        return header, data

    _rejected(_crafted(tmp_path, bad), tmp_path, "dtype 'f32' is not a safetensors dtype")
    shutil.rmtree(tmp_path / "src")

    def complex64(header, data):  # valid safetensors (the library opens it) that we cannot convert
        _entry(header, "model.norm.weight")[0][1] = "C64"
        _entry(header, "model.norm.weight")[1][1] = [16]
        return header, data

    src = _crafted(tmp_path, complex64)
    assert fz.library_accepts(src / "model.safetensors")
    _rejected(src, tmp_path, "dtype C64 is valid safetensors but tpo-convert cannot convert it", library=False)


# the header parser against the safetensors library, on the same bytes: each row is accepted by both or by neither
_E = '"dtype":"F32","shape":[2],"data_offsets":[0,8]'
_PARITY = [
    ("valid", '{"a":{%s}}' % _E, 8), ("extra field ignored", '{"a":{%s,"x":[1,{"y":null}]}}' % _E, 8),
    ("list form", '{"a":["F32",[2],[0,8]]}', 8), ("list form, 4 items", '{"a":["F32",[2],[0,8],1]}', 8),
    ("repeated tensor name, last wins", '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{%s}}' % _E, 8),
    ("repeated field", '{"a":{"dtype":"F32",%s}}' % _E, 8), ("float dim", '{"a":{"dtype":"F32","shape":[2.0],'
                                                                       '"data_offsets":[0,8]}}', 8),
    ("-0 dim", '{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', 0),
    ("2**64-1 dim, zero size", '{"a":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}}', 0),
    ("2**64 dim", '{"a":{"dtype":"F32","shape":[0,18446744073709551616],"data_offsets":[0,0]}}', 0),
    ("overflow before a zero", '{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', 0),
    ("metadata null", '{"__metadata__":null,"a":{%s}}' % _E, 8),
    ("metadata int", '{"__metadata__":{"x":1},"a":{%s}}' % _E, 8),
    ("metadata twice", '{"__metadata__":{},"__metadata__":{},"a":{%s}}' % _E, 8),
    ("trailing NUL in header", '{"a":{%s}}\u0000' % _E, 8), ("BOM", '\ufeff{"a":{%s}}' % _E, 8),
    ("lone surrogate", '{"a\\ud800":{%s}}' % _E, 8), ("surrogate pair", '{"a\\ud83d\\ude00":{%s}}' % _E, 8),
    ("zero-size entry after", '{"a":{%s},"b":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}}' % _E, 8),
    ("zero-size entry inside", '{"a":{%s},"b":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}' % _E, 8),
    ("three offsets", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', 8),
    ("F4, odd count", '{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', 2),
    ("F4, whole bytes", '{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}', 2),
    ("empty", "{}", 0), ("not an object", "[]", 0), ("NaN", '{"a":{%s,"x":NaN}}' % _E, 8),
    ("number out of range", '{"a":{%s,"x":1e400}}' % _E, 8), ("300 digits", '{"a":{%s,"x":%s}}' % (_E, "9" * 300), 8),
    ("nesting 127", '{"a":{%s,"x":%s}}' % (_E, "[" * 125 + "]" * 125), 8),
    ("nesting 128", '{"a":{%s,"x":%s}}' % (_E, "[" * 126 + "]" * 126), 8),
    ("gap", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', 12),
    ("offsets reversed", '{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}', 8),
]


@pytest.mark.parametrize("name,text,data_bytes", _PARITY, ids=[r[0] for r in _PARITY])
def test_header_validation_matches_the_safetensors_library(tmp_path, name, text, data_bytes):
    from tpo_jax.checkpoints.sources import parse_header

    raw = text.encode("utf-8")
    blob = struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes
    f = tmp_path / "x.safetensors"
    f.write_bytes(blob)
    try:
        parse_header(io.BytesIO(blob), len(blob))
        ours = True
    except ConversionError:
        ours = False
    assert ours == fz.library_accepts(f), name


def test_corrupt_pytorch_zip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(HF_CONFIG))
    torch.save(_state_dict(), src / "pytorch_model.bin")
    valid = (src / "pytorch_model.bin").read_bytes()
    for raw in (valid[: len(valid) // 2], valid[:4], b"", b"\x80\x02garbage" * 10):
        (src / "pytorch_model.bin").write_bytes(raw)
        with pytest.raises(ConversionError, match="cannot load PyTorch file") as e:
            convert_hf(src, tmp_path / "out")
        assert e.value.file == str(src / "pytorch_model.bin")
        _no_leftovers(tmp_path)


def test_cli_hostile_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    src, weight_map = _sharded_source(tmp_path)
    _write_index(src, {**weight_map, next(iter(weight_map)): "../../etc/passwd"})
    out = tmp_path / "deep" / "er" / "out"
    assert main(["hf", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tpo-convert: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(src / "model.safetensors.index.json") in err and "contains '..'" in err
    assert not (tmp_path / "deep").exists()


def test_failure_after_staging_removes_temp_dir_and_created_parents(tmp_path, monkeypatch):
    src = _write(tmp_path / "src", _state_dict())
    real_read = SafetensorsFile.read

    def fails(self, key):
        if key == "lm_head.weight":
            raise ConversionError("read failed", file=self.path, key=key)
        return real_read(self, key)

    monkeypatch.setattr(SafetensorsFile, "read", fails)
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(ConversionError, match="read failed"):
        convert_hf(src, out)
    assert not (tmp_path / "a").exists()  # the parents this call created are gone too
    monkeypatch.setattr(SafetensorsFile, "read", real_read)
    # --overwrite over a plain file: replaced, no temporary or moved-aside directory left
    (tmp_path / "out").write_text("not a checkpoint")
    convert_hf(src, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "conversion.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.")]


def test_output_that_would_replace_the_source(tmp_path):
    src = _write(tmp_path / "src", _state_dict())
    for out in (src, tmp_path):
        with pytest.raises(ConversionError, match="is or contains the source"):
            convert_hf(src, out, overwrite=True)
    assert (src / "model.safetensors").exists()


def test_fuzz_cases_fail_cleanly(tmp_path):
    """~100 generated hostile checkpoints: no exception but ConversionError, no hang, every rejection names its
    input, and the header verdict equals the safetensors library's wherever both read the same file."""
    counts = fz.run_all(fz.cases(random.Random(26), 100, tmp_path / "in"), tmp_path / "out", limit_s=60)
    assert counts["cases"] == 100
    assert counts["uncaught"] == 0 and counts["hangs"] == 0 and counts["unnamed"] == 0, counts["failures"]
    assert counts["parity_mismatch"] == 0, counts["failures"]
    assert counts["accepted"] > 5 and counts["rejected"] > 50 and counts["parity_checked"] > 30, counts
    assert counts["max_s"] < 60


def test_export_of_a_directory_whose_conversion_json_is_a_fifo(tmp_path):
    src = _write(tmp_path / "src", _state_dict())
    convert_hf(src, tmp_path / "conv")
    (tmp_path / "conv" / "conversion.json").unlink()
    os.mkfifo(tmp_path / "conv" / "conversion.json")
    box = _finishes(lambda: export_hf(tmp_path / "conv", tmp_path / "hf"), tmp_path)
    assert isinstance(box.get("error"), ConversionError), box
    assert "not a regular file (a FIFO)" in str(box["error"]) and not (tmp_path / "hf").exists()
    (tmp_path / "conv" / "conversion.json").unlink()
    with pytest.raises(ConversionError, match="no conversion.json"):
        export_hf(tmp_path / "conv", tmp_path / "hf")

"""Conversion with scanned layer stacks (`cfg.*.stack.scan_layers`): the key tables name layers
(`llm.layers.{i}.…`), the checkpoint holds one stacked array per parameter (`llm.layers.…`, leading `layers`
axis; the Q-Former in groups `qformer.layer_groups.{m}.…`). Checked here:

* the plan against synthetic stacked shapes (LLM + Q-Former groups) and hand-built expectations;
* streaming: a stacked array is assembled in one allocation, one source tensor at a time;
* the released-layout tiny checkpoint converted scanned equals the unrolled conversion slice by slice, and
  exports back bit-exactly; the same for Hugging Face + PEFT (keep / merge); loading across layouts;
* the released 7B key set maps completely with the scanned 7B preset (headers only).
"""

import json
import tracemalloc

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from tpo_jax import sharding as tpo_sharding
from tpo_jax.checkpoints.convert import (_per_layer, _Runner, abstract_params, convert_hf, convert_videochat,
                                         lazy_params, param_shapes)
from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.export import ParamSet, export_hf, export_videochat
from tpo_jax.checkpoints.mapping import Meta, build_plan, linear, rule
from tpo_jax.checkpoints.ops import T
from tpo_jax.checkpoints.orbax_io import ArrayReader, load_params, read_arrays, saved_arrays
from tpo_jax.checkpoints.stacking import locate, possible_layouts, slice_name, stacked_groups
from tpo_jax.config import LoRAConfig, get_config, replace
from tpo_jax.llm import MistralDecoder
from tpo_jax.model import TPOModel, stack_layouts
from tpo_jax.stack import StackLayout
from test_convert_helpers import exported_tensors, fake_videochat, real_keys, real_layout_tiny, source_shapes
from test_convert_hf import CFG as HF_CFG, IDS, TARGETS, TOL, _hf_model, _logits

SCAN = {"llm.stack.scan_layers": True, "vit.stack.scan_layers": True, "qformer.stack.scan_layers": True}
CFG = real_layout_tiny()
SCFG = replace(CFG, **SCAN)


# ------------------------------------------------------------------------------------------------ synthetic

LAYOUTS = [StackLayout("llm.layers.", "llm.layers.{i}.", 3),
           StackLayout("qformer.layer_groups.0.", "qformer.layers.{i}.", 2, 0, 2),
           StackLayout("qformer.layer_groups.1.", "qformer.layers.{i}.", 2, 1, 2)]
SHAPES = {"llm.norm.scale": (4,), "llm.layers.mlp.up_proj.kernel": (3, 4, 6),
          "qformer.layer_groups.0.attention.query.kernel": (2, 5, 5),
          "qformer.layer_groups.0.crossattention.query.kernel": (2, 5, 5),  # members m = 0 only
          "qformer.layer_groups.1.attention.query.kernel": (2, 5, 5)}
RULES = [rule("model.norm.weight", "llm.norm.scale"),
         rule("model.layers.{i}.mlp.up_proj.weight", "llm.layers.{i}.mlp.up_proj.kernel", T),
         *linear("bert.layer.{i}.attention.query", "qformer.layers.{i}.attention.query", bias=False),
         *linear("bert.layer.{i}.crossattention.query", "qformer.layers.{i}.crossattention.query", bias=False)]


class FakeSource:
    """A TensorSource over in-memory arrays that counts reads; each read returns a fresh copy (as a file read)."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.meta = {k: Meta(a.shape, a.dtype, "fake.safetensors") for k, a in arrays.items()}
        self.description = "fake"
        self.reads = {}

    def read(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return self.arrays[key].copy()


def _synthetic_source(seed=0):
    rng = np.random.default_rng(seed)
    keys = {"model.norm.weight": (4,), **{f"model.layers.{i}.mlp.up_proj.weight": (6, 4) for i in range(3)},
            **{f"bert.layer.{i}.attention.query.weight": (5, 5) for i in range(4)},
            **{f"bert.layer.{i}.crossattention.query.weight": (5, 5) for i in (0, 2)}}
    return FakeSource({k: rng.standard_normal(s).astype(np.float32) for k, s in keys.items()})


def test_plan_against_synthetic_stacked_shapes():
    per_layer = _per_layer(SHAPES, LAYOUTS)
    expected = {"llm.norm.scale": (4,), **{f"llm.layers.{i}.mlp.up_proj.kernel": (4, 6) for i in range(3)},
                **{f"qformer.layers.{i}.attention.query.kernel": (5, 5) for i in range(4)},
                "qformer.layers.0.crossattention.query.kernel": (5, 5),
                "qformer.layers.2.crossattention.query.kernel": (5, 5)}
    assert per_layer == expected
    # index g of group member m is layer g·freq + m, both ways
    assert locate(LAYOUTS, "qformer.layers.3.attention.query.kernel")[1:] == (
        "qformer.layer_groups.1.attention.query.kernel", 1)
    assert slice_name(LAYOUTS, "qformer.layers.2.crossattention.query.kernel") == \
        "qformer.layer_groups.0.crossattention.query.kernel[1]"
    assert slice_name(LAYOUTS, "llm.layers.2.mlp.up_proj.kernel") == "llm.layers.mlp.up_proj.kernel[2]"
    assert locate(LAYOUTS, "qformer.layers.4.attention.query.kernel") is None  # past the last group
    assert locate(LAYOUTS, "llm.layers.mlp.up_proj.kernel") is None  # a stacked path is not a layer
    assert stacked_groups(["llm.layers.mlp.up_proj.kernel", "llm.norm.scale"], LAYOUTS) == {
        "llm.layers.mlp.up_proj.kernel": [f"llm.layers.{i}.mlp.up_proj.kernel" for i in range(3)]}

    src = _synthetic_source()
    plan = build_plan(src.meta, RULES, per_layer, where="fake")
    params = lazy_params(plan, _Runner(src, None), LAYOUTS, None)
    assert set(params) == set(SHAPES)  # one array per stacked parameter
    for path, lazy in params.items():
        assert lazy.shape == SHAPES[path] and lazy.layers == (path != "llm.norm.scale")
    got = {p: lazy.load() for p, lazy in params.items()}
    for g in range(3):
        np.testing.assert_array_equal(got["llm.layers.mlp.up_proj.kernel"][g],
                                      src.arrays[f"model.layers.{g}.mlp.up_proj.weight"].T)
    for m in range(2):
        for g in range(2):
            np.testing.assert_array_equal(got[f"qformer.layer_groups.{m}.attention.query.kernel"][g],
                                          src.arrays[f"bert.layer.{2 * g + m}.attention.query.weight"].T)
    np.testing.assert_array_equal(got["qformer.layer_groups.0.crossattention.query.kernel"][1],
                                  src.arrays["bert.layer.2.crossattention.query.weight"].T)
    # a missing layer is one error naming the per-layer parameter and the source key it needs
    del src.meta["bert.layer.2.crossattention.query.weight"]
    with pytest.raises(ConversionError, match="qformer.layers.2.crossattention.query.kernel") as e:
        build_plan(src.meta, RULES, per_layer, where="fake")
    assert e.value.key == "bert.layer.2.crossattention.query.weight"
    # a stacked shape whose leading axis is not the layer count
    with pytest.raises(ConversionError, match="expected a leading axis of 3 layers"):
        _per_layer({"llm.layers.mlp.up_proj.kernel": (2, 4, 6)}, LAYOUTS)


def test_stacked_array_is_streamed_not_held_twice():
    """The loader of a stacked parameter allocates the stacked array once and holds one layer's source and
    transform besides: peak traced memory < stacked + 3 layers (holding it twice would be 2 x stacked)."""
    layers, shape = 8, (512, 256)
    rng = np.random.default_rng(0)
    src = FakeSource({f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal(shape).astype(np.float32)
                      for i in range(layers)})
    layouts = [StackLayout("llm.layers.", "llm.layers.{i}.", layers)]
    target = {f"llm.layers.{i}.mlp.up_proj.kernel": shape[::-1] for i in range(layers)}
    plan = build_plan(src.meta, RULES[1:2], target, where="fake")
    runner = _Runner(src, None)
    (path, lazy), = lazy_params(plan, runner, layouts, None).items()
    layer_bytes = int(np.prod(shape)) * 4
    stacked_bytes = layers * layer_bytes
    assert path == "llm.layers.mlp.up_proj.kernel" and lazy.shape == (layers, *shape[::-1])
    assert lazy.cost == stacked_bytes + 2 * layer_bytes  # stacked size + one layer's source and output
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = lazy.load()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    print(f"stacked {stacked_bytes / 2**20:.1f} MiB, one layer {layer_bytes / 2**20:.2f} MiB, "
          f"loader peak {peak / 2**20:.2f} MiB")
    assert stacked_bytes <= peak < stacked_bytes + 3 * layer_bytes
    assert src.reads == {k: 1 for k in src.arrays}  # every source tensor read exactly once
    for i in range(layers):
        np.testing.assert_array_equal(out[i], src.arrays[f"model.layers.{i}.mlp.up_proj.weight"].T)


# ------------------------------------------------------------------------------------------------ VideoChat

def _scanned_model_ready(cfg=SCFG) -> bool:
    shapes = param_shapes(abstract_params(lambda: TPOModel(cfg, rngs=None)))
    return "llm.layers.input_layernorm.scale" in shapes


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("videochat_src")
    return d, fake_videochat(d, CFG)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, source):
    if not _scanned_model_ready():
        pytest.skip("the model still builds unrolled stacks with scan_layers=True")
    root = tmp_path_factory.mktemp("conv")
    unrolled = convert_videochat(source[0], root / "unrolled", CFG)
    scanned = convert_videochat(source[0], root / "scanned", SCFG)
    return root / "unrolled", root / "scanned", unrolled, scanned


def test_scanned_conversion_equals_unrolled_slices(converted):
    u_dir, s_dir, u_report, s_report = converted
    u_saved, s_saved = saved_arrays(u_dir / "params"), saved_arrays(s_dir / "params")
    groups = stacked_groups(s_saved, stack_layouts(SCFG))
    # LLM 2 norms + 7 x (kernel, lora_a, lora_b); ViT block 13; Q-Former member 0 (with cross-attention) 32, member 1 22
    assert len(groups) == 23 + 13 + 32 + 22 and "llm.layers.self_attn.q_proj.lora_a" in groups
    assert len(s_saved) == s_report["summary"]["arrays_written"] < len(u_saved)
    covered = {p for layers in groups.values() for p in layers}
    assert covered | (set(s_saved) - set(groups)) == set(u_saved)
    u = read_arrays(u_dir / "params", list(u_saved))
    s = read_arrays(s_dir / "params", list(s_saved))
    reader = ArrayReader(s_dir / "params")
    for stacked, layers in groups.items():
        assert s[stacked].shape == (len(layers), *u[layers[0]].shape)
        for g, path in enumerate(layers):
            assert s[stacked].dtype == u[path].dtype and np.array_equal(s[stacked][g], u[path]), (stacked, g)
        last = len(layers) - 1  # one layer read alone from storage, which holds one chunk per layer
        assert np.array_equal(reader.read(stacked, last), u[layers[last]])
        assert reader.chunk_shape(stacked) == (1, *u[layers[0]].shape)
    for path in set(s_saved) - set(groups):
        assert np.array_equal(s[path], u[path]), path
    # the report names each slice; the Q-Former's layer 5 is index 2 of group member 1
    mapped = s_report["mapped"]
    assert mapped["lm.base_model.model.model.layers.3.self_attn.q_proj.base_layer.weight"] == [
        "llm.layers.self_attn.q_proj.kernel[3]"]
    assert mapped["qformer.bert.encoder.layer.5.attention.self.query.weight"] == [
        "qformer.layer_groups.1.attention.query.kernel[2]"]
    assert mapped["vision_encoder.encoder.blocks.22.attn.qkv.weight"] == ["vision.blocks.attn.qkv[22]"]
    assert set(mapped) == set(u_report["mapped"]) and s_report["extras"] == u_report["extras"]
    assert json.loads((s_dir / "conversion.json").read_text())["config"]["llm"]["stack"]["scan_layers"] is True


def test_scanned_export_videochat_is_bit_exact(tmp_path, source, converted):
    _, tensors = source
    files = export_videochat(converted[1], tmp_path / "back", max_shard_bytes=3_000_000)
    back = exported_tensors(files)
    assert set(back) == set(tensors) == set(real_keys())
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key


def _abstract(cfg):
    return nnx.state(nnx.eval_shape(lambda: TPOModel(cfg, rngs=None)), nnx.Param)


def _flat(state):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_load_across_layouts(converted):
    u_dir, s_dir, _, _ = converted
    scanned_abstract, unrolled_abstract = _abstract(SCFG), _abstract(CFG)
    direct = _flat(load_params(s_dir, scanned_abstract))
    stacked = _flat(load_params(u_dir, scanned_abstract))  # layouts from the checkpoint's conversion.json
    sliced = _flat(load_params(s_dir, unrolled_abstract))
    assert stacked.keys() == direct.keys()
    for p in direct:
        assert stacked[p].dtype == direct[p].dtype and np.array_equal(stacked[p], direct[p]), p
    layouts = stack_layouts(SCFG)
    for p, value in sliced.items():
        found = locate(layouts, p)
        want = direct[p] if found is None else direct[found[1]][found[2]]
        assert np.array_equal(value, want), p
    # explicit layouts (checkpoint path space), and a prefix: only the Q-Former, groups of 2 layers
    q_abs = nnx.state(nnx.eval_shape(lambda: TPOModel(SCFG, rngs=None)).qformer, nnx.Param)
    q = load_params(u_dir, q_abs, prefix="qformer", layouts=stack_layouts(SCFG))
    np.testing.assert_array_equal(np.asarray(q["layer_groups"][1]["output"]["dense"]["kernel"].get_value())[4],
                                  sliced["qformer.layers.9.output.dense.kernel"])


# ------------------------------------------------------------------------------------------------ Hugging Face

HF_SCAN = replace(HF_CFG, **{"stack.scan_layers": True})


def _ours(out, cfg, lora=None):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MistralDecoder(cfg, lora, rngs=None)))
    return nnx.merge(graphdef, load_params(out, state, prefix="llm"))


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    if "llm.layers.input_layernorm.scale" not in param_shapes(
            abstract_params(lambda: MistralDecoder(HF_SCAN, None, rngs=None)), "llm"):
        pytest.skip("the decoder still builds unrolled layers with scan_layers=True")
    root = tmp_path_factory.mktemp("hf_stacked")
    hf = _hf_model()
    hf.save_pretrained(root / "base")
    torch.manual_seed(1)
    adapted = peft.get_peft_model(_hf_model(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                               target_modules=TARGETS, init_lora_weights=False))
    adapted.eval().save_pretrained(root / "adapter")
    return root, hf, adapted


def test_hf_scanned_round_trip_and_logits(tmp_path, hf_saved):
    root, hf, _ = hf_saved
    report = convert_hf(root / "base", tmp_path / "ours", scan_layers=True)
    saved = saved_arrays(tmp_path / "ours" / "params")
    assert saved["llm.layers.self_attn.q_proj.kernel"][0] == (2, HF_CFG.hidden_size, HF_CFG.hidden_size)
    assert report["mapped"]["model.layers.1.mlp.down_proj.weight"] == ["llm.layers.mlp.down_proj.kernel[1]"]
    ours = _ours(tmp_path / "ours", HF_SCAN)
    assert np.abs(np.asarray(ours(jnp.asarray(IDS)).logits) - _logits(hf, IDS)).max() <= TOL
    export_hf(tmp_path / "ours", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    original = load_file(str(root / "base" / "model.safetensors"))
    assert set(back) == set(original) and all(torch.equal(back[k], v) for k, v in original.items())
    # an unrolled decoder restores the scanned checkpoint (layouts from its conversion.json)
    unrolled = _ours(tmp_path / "ours", HF_CFG)
    np.testing.assert_array_equal(np.asarray(unrolled.layers[1].mlp.down_proj.kernel[...]),
                                  original["model.layers.1.mlp.down_proj.weight"].numpy().T)
    # in-memory export of a scanned model's state (the ParamSet's config says where the stacks are)
    ps = ParamSet({f"llm.{k}": v for k, v in ParamSet.from_state(nnx.state(ours, nnx.Param), None).params.items()},
                  (HF_SCAN, None))
    assert ps.params["llm.layers.mlp.up_proj.kernel"].shape[0] == 2
    export_hf(ps, tmp_path / "mem")
    mem = load_file(str(tmp_path / "mem" / "model.safetensors"))
    assert set(mem) == set(original) and all(torch.equal(mem[k], v) for k, v in original.items())


def test_hf_scanned_peft_keep_and_merge(tmp_path, hf_saved):
    root, hf, adapted = hf_saved
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=tuple(TARGETS))
    convert_hf(root / "base", tmp_path / "kept", adapter=root / "adapter", lora="keep", scan_layers=True)
    assert saved_arrays(tmp_path / "kept" / "params")["llm.layers.mlp.up_proj.lora_a"][0] == (2, HF_CFG.hidden_size, 4)
    ref = _logits(adapted, IDS)
    assert np.abs(np.asarray(_ours(tmp_path / "kept", HF_SCAN, lora)(jnp.asarray(IDS)).logits) - ref).max() <= TOL
    export_hf(tmp_path / "kept", tmp_path / "peft", peft=True)
    adapter_sd = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    back = load_file(str(tmp_path / "peft" / "adapter" / "adapter_model.safetensors"))
    assert set(back) == set(adapter_sd) and all(torch.equal(back[k], v) for k, v in adapter_sd.items())
    base = load_file(str(tmp_path / "peft" / "model.safetensors"))
    assert all(torch.equal(base[k], v) for k, v in hf.state_dict().items())
    # merged: the stacked kernels are the unrolled conversion's merged kernels, bit for bit
    convert_hf(root / "base", tmp_path / "merged_s", adapter=root / "adapter", lora="merge", scan_layers=True)
    convert_hf(root / "base", tmp_path / "merged_u", adapter=root / "adapter", lora="merge")
    s = read_arrays(tmp_path / "merged_s" / "params", ["llm.layers.self_attn.k_proj.kernel"])
    u = read_arrays(tmp_path / "merged_u" / "params", [f"llm.layers.{i}.self_attn.k_proj.kernel" for i in range(2)])
    for i in range(2):
        assert np.array_equal(s["llm.layers.self_attn.k_proj.kernel"][i], u[f"llm.layers.{i}.self_attn.k_proj.kernel"])
    export_hf(tmp_path / "merged_s", tmp_path / "hf_s")
    export_hf(tmp_path / "merged_u", tmp_path / "hf_u")
    a = load_file(str(tmp_path / "hf_s" / "model.safetensors"))
    b = load_file(str(tmp_path / "hf_u" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_scanned_sharded_write_and_load_errors(tmp_path, hf_saved):
    root, _, _ = hf_saved
    mesh = tpo_sharding.make_mesh(tpo_sharding.MeshConfig(data=2, fsdp=4, tensor=1))
    convert_hf(root / "base", tmp_path / "out", mesh=mesh, rules="fsdp", scan_layers=True)
    abstract = nnx.state(nnx.eval_shape(lambda: MistralDecoder(HF_SCAN, None, rngs=None)), nnx.Param)
    shardings = tpo_sharding.tree_shardings(abstract, mesh, tpo_sharding.get_rules("fsdp"))
    restored = load_params(tmp_path / "out", abstract, shardings, prefix="llm")
    w = restored["layers"]["mlp"]["down_proj"]["kernel"].get_value()
    assert w.sharding == shardings["layers"]["mlp"]["down_proj"]["kernel"].get_value() and w.shape[0] == 2
    assert ArrayReader(tmp_path / "out" / "params").chunk_shape("llm.layers.mlp.down_proj.kernel")[0] == 1
    original = load_file(str(root / "base" / "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(w)[1], original["model.layers.1.mlp.down_proj.weight"].numpy().T)
    # stacked into an unrolled decoder with placement: each layer gets its own sharding
    flat_abs = nnx.state(nnx.eval_shape(lambda: MistralDecoder(HF_CFG, None, rngs=None)), nnx.Param)
    sh_u = tpo_sharding.tree_shardings(flat_abs, mesh, tpo_sharding.get_rules("fsdp"))
    layer = load_params(tmp_path / "out", flat_abs, sh_u, prefix="llm")["layers"][1]["mlp"]["down_proj"]["kernel"]
    assert layer.get_value().sharding == sh_u["layers"][1]["mlp"]["down_proj"]["kernel"].get_value()
    np.testing.assert_array_equal(np.asarray(layer.get_value()),
                                  original["model.layers.1.mlp.down_proj.weight"].numpy().T)
    # layer counts that do not fit: one error naming the parameter
    def state(n, scan):
        cfg = replace(HF_CFG, **{"num_layers": n, "stack.scan_layers": scan})
        return nnx.state(nnx.eval_shape(lambda: MistralDecoder(cfg, None, rngs=None)), nnx.Param)
    with pytest.raises(ConversionError, match="no array for parameter 'llm.layers.2.input_layernorm.scale'"):
        load_params(tmp_path / "out", state(3, False), prefix="llm")
    with pytest.raises(ConversionError, match="the model has no parameter for this checkpoint array") as e:
        load_params(tmp_path / "out", state(1, False), prefix="llm")
    assert e.value.key.endswith("[1]")
    convert_hf(root / "base", tmp_path / "unrolled")
    with pytest.raises(ConversionError, match="shape mismatch") as e:
        load_params(tmp_path / "unrolled", state(3, True), prefix="llm")
    assert e.value.key == "llm.layers.input_layernorm.scale"


# ------------------------------------------------------------------------------------------------ 7B key set

def test_released_keys_map_with_scanned_7b_preset(monkeypatch):
    """Every one of the 2,594 released keys is mapped or kept by a dry run with the scanned 7B preset; the
    source headers are faked (shapes only, from the unrolled preset through the inverse tables)."""
    from tpo_jax.checkpoints import convert as convert_mod
    from tpo_jax.checkpoints.sources import TensorSource

    cfg = get_config("videochat_tpo_7b")
    assert cfg.llm.stack.scan_layers and cfg.vit.stack.scan_layers and cfg.qformer.stack.scan_layers
    unrolled = replace(cfg, **{k: False for k in SCAN})
    shapes = source_shapes(unrolled)
    keys = real_keys()
    meta = {k: Meta(shapes.get(k, (2, 3)), np.dtype("int64") if k.endswith("position_ids") else np.dtype("float32"),
                    shard) for k, shard in keys.items()}
    monkeypatch.setattr(convert_mod, "open_source", lambda _: TensorSource(meta, {}, "released headers"))
    report = convert_videochat("released", "unused", cfg, dry_run=True)
    s = report["summary"]
    assert s["mapped_keys"] == 2573 and s["extra_keys"] == 21 and s["dropped_keys"] == 0
    assert s["mapped_keys"] + s["extra_keys"] == len(keys) == 2594
    layouts = possible_layouts(cfg)
    assert [lo.stacked for lo in layouts] == ["llm.layers.", "vision.blocks.", "qformer.layer_groups.0.",
                                              "qformer.layer_groups.1."]
    assert [lo.count for lo in layouts] == [32, 23, 6, 6]

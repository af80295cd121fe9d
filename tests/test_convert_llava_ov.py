"""`tpo-convert llava_ov`: a Hugging Face LLaVA-OneVision directory -> the base weights of a TPO model of arch
"llava_ov" (`checkpoints/llava_ov_convert.py`), started from with `init_from`, and exported back.

A tiny random transformers 5.25 `LlavaOnevisionForConditionalGeneration` with the shapes of `llava_ov_tpo_tiny`
(SigLIP 32 px / patch 8, hidden 32, 2 layers, 2 heads; Qwen2 hidden 64, 2 layers, 4 / 2 heads, vocab 400, `<image>`
387, `<video>` 388) is saved with `save_pretrained`, converted (unrolled and scanned), loaded into
`TPOModel(llava_ov_tpo_tiny)` through `init_from`, and its LLM logits on a 4-frame video prompt are compared with
HF's (f32, <= 1e-4): our model takes ImageNet-normalised frames, HF the SigLIP-normalised pixels of the same
frames (`pixel_values_videos`). Export back is bit-exact and complete; wrong inputs are one clear error.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from llava_ov_reference import hf_config as reference_config, random_hf_model
from safetensors.numpy import load_file, save_file
from transformers import LlavaOnevisionForConditionalGeneration

from tpo_jax.checkpoints.configs import hf_config_from_llava_ov, llava_ov_config_from_hf, read_report
from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.llava_ov_convert import convert_llava_ov, export_llava_ov, is_base_param
from tpo_jax.checkpoints.stacking import checkpoint_layouts
from tpo_jax.cli import convert as cli
from tpo_jax.config import ConfigError, get_config, replace
from tpo_jax.llava_ov.model import base_config
from tpo_jax.model import TPOModel
from tpo_jax.train import init_from as I
from tpo_jax.vit import IMAGENET_MEAN, IMAGENET_STD

TOL = 1e-4
CFG = get_config("llava_ov_tpo_tiny")
SCANNED = replace(CFG, **{"llm.stack.scan_layers": True, "llava_ov.siglip.stack.scan_layers": True}).validate()
V = CFG.llava_ov
VID = V.video_token_id
PROMPT = [5, 6, 7, 8] + [VID] * V.num_video_tokens + [10, 11, 12, 13, 14]


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def hf_config():
    return reference_config(base_config(CFG))


@pytest.fixture(scope="module")
def hf():
    return random_hf_model(base_config(CFG))


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_ov") / "hf"
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(saved, tmp_path_factory):
    """{"unrolled": dir, "scanned": dir}: the checkpoint converted for each layout of the model."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, cfg in (("unrolled", CFG), ("scanned", SCANNED)):
        out[name] = root / name
        convert_llava_ov(saved, out[name], cfg)
    return out


@pytest.fixture(scope="module")
def video():
    """A 4-frame video: ImageNet-normalised frames (ours) and the SigLIP-normalised pixels of the same frames (HF)."""
    s = V.siglip.image_size
    pixels = np.random.default_rng(0).uniform(0.0, 1.0, (1, V.num_frames, s, s, 3)).astype(np.float32)
    imagenet = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    siglip = (pixels - 0.5) / 0.5
    return dict(ours=imagenet.astype(np.float32),
                hf=torch.from_numpy(np.ascontiguousarray(np.moveaxis(siglip, -1, -3)).astype(np.float32)))


@pytest.fixture(scope="module")
def hf_logits(hf, video):
    with torch.no_grad():
        return hf(input_ids=torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                  pixel_values_videos=video["hf"]).logits.numpy()


def _init_model(cfg, source, seed=3):
    """TPOModel(cfg) started from `source` through init_from, as a run does; and the init report."""
    model = TPOModel(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    plan = I.prepare([str(source)], state)
    (new,) = I.load_init(plan, state)
    nnx.update(model, new)
    return model, plan.report


def _logits(model, frames):
    ids = np.asarray([PROMPT], np.int32)
    out = jax.jit(lambda m, i, f: m(i, visual_mask=i == VID, frames=f, attention_mask=jax.numpy.ones_like(i)))(
        model, ids, frames)
    return np.asarray(out.logits)


# ------------------------------------------------------------------------------------------------ numerics

@pytest.mark.parametrize("source, model_cfg", [("unrolled", CFG), ("scanned", SCANNED), ("unrolled", SCANNED)],
                         ids=["unrolled", "scanned", "unrolled-into-scanned"])
def test_init_from_gives_hf_logits(converted, video, hf_logits, source, model_cfg):
    model, report = _init_model(model_cfg, converted[source])
    logits = _logits(model, video["ours"])
    diff = _max_diff(logits, hf_logits)
    print(f"LLM logits, {source} checkpoint -> {'scanned' if model_cfg is SCANNED else 'unrolled'} model, "
          f"{len(PROMPT)} tokens ({V.num_video_tokens} video rows): max |diff| = {diff:.2e}")
    assert logits.shape == hf_logits.shape and diff <= TOL
    # the video rows matter: other frames give other logits after the video
    other = _logits(model, video["ours"][:, ::-1])
    assert _max_diff(other[:, -5:], logits[:, -5:]) > 1e-3
    # every base parameter is loaded; what the base model lacks (LoRA, task tokens, heads, SAM2) is initialised
    shapes = I.model_shapes(nnx.state(model, nnx.Param))
    base = [p for p in shapes if is_base_param(p)]
    assert report["loaded_tensors"] == len(base) and report["initialised_tensors"] == len(shapes) - len(base)
    assert {"box_token", "sam2", "region_head"} <= {p.split(".")[0] for p in shapes if not is_base_param(p)}


def test_report_covers_every_key(saved, converted):
    keys = set(load_file(saved / "model.safetensors"))
    for name, out in converted.items():
        report = read_report(out)
        assert report["format"] == "llava_ov" and report["layout"] == "saved5"
        named = [k for src in report["mapped"] for k in src.split(", ")] + list(report["extras"])
        named += [k for src in report["dropped"] for k in src.split(", ")]
        assert sorted(named) == sorted(keys), name  # every key exactly once: mapped, extra (with why) or dropped
        assert set(report["extras"]) == {"vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias"}
        assert all(e["why"] for e in report["extras"].values())
        s = report["summary"]
        assert s["mapped_keys"] + s["extra_keys"] + s["dropped_keys"] == len(keys)
    # the scanned output holds one stacked array per parameter of each stack
    stacked = read_report(converted["scanned"])["mapped"]["vision_tower.encoder.layers.1.mlp.fc1.weight"]
    assert stacked == ["vision.vision_tower.layers.fc1.kernel[1]"]
    assert any(lo.stacked.startswith("vision.vision_tower.") for lo in checkpoint_layouts(converted["scanned"]))


@pytest.mark.parametrize("source", ["unrolled", "scanned"])
def test_export_round_trip_bit_exact(saved, converted, tmp_path, source, video, hf_logits):
    files = export_llava_ov(converted[source], tmp_path / "back")
    want = load_file(saved / "model.safetensors")
    got = {}
    for f in files:
        if f.suffix == ".safetensors":
            got.update(load_file(f))
    assert sorted(got) == sorted(want)
    for k, x in want.items():
        assert got[k].dtype == x.dtype and got[k].shape == x.shape and got[k].tobytes() == x.tobytes(), k
    if source == "scanned":  # the exported directory is a working HF model again
        back = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
        with torch.no_grad():
            logits = back(input_ids=torch.tensor([PROMPT]), pixel_values_videos=video["hf"]).logits.numpy()
        assert _max_diff(logits, hf_logits) == 0.0


def test_export_of_a_trained_state_merges_lora(converted, tmp_path, saved):
    """A ParamSet of a model (LoRA kept, B non-zero) exports with W + s·B·A in the weights, in any layout."""
    from tpo_jax.checkpoints.export import ParamSet

    model, _ = _init_model(CFG, converted["unrolled"])
    state = nnx.state(model, nnx.Param)
    b = state["llm"]["layers"][0]["self_attn"]["q_proj"]["lora_b"]
    b.set_value(b.get_value() + 0.01)
    files = export_llava_ov(ParamSet.from_state(state, CFG), tmp_path / "t", layout="transformers5")
    got = load_file([f for f in files if f.suffix == ".safetensors"][0])
    src = load_file(saved / "model.safetensors")
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in got  # transformers5 names
    q = state["llm"]["layers"][0]["self_attn"]["q_proj"]
    merged = (np.asarray(q["kernel"].get_value()) + CFG.lora.scaling * np.asarray(q["lora_a"].get_value())
              @ np.asarray(q["lora_b"].get_value())).T
    np.testing.assert_allclose(got["model.language_model.layers.0.self_attn.q_proj.weight"], merged, atol=1e-6)
    assert _max_diff(got["model.language_model.layers.0.self_attn.q_proj.weight"],
                     src["language_model.model.layers.0.self_attn.q_proj.weight"]) > 1e-3
    np.testing.assert_array_equal(got["model.multi_modal_projector.linear_1.weight"],
                                  src["multi_modal_projector.linear_1.weight"])
    cfg_back = llava_ov_config_from_hf(json.loads((tmp_path / "t" / "config.json").read_text()))
    assert (cfg_back.siglip.num_layers, cfg_back.llm.hidden_size, cfg_back.video_token_id) == (2, 64, VID)


def test_generated_hf_config_reads_back():
    base = llava_ov_config_from_hf(hf_config_from_llava_ov(CFG))
    s, t = base.siglip, V.siglip
    assert (s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads, s.patch_size, s.image_size) == \
        (t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.patch_size, t.image_size)
    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
              "rms_norm_eps", "rope_theta", "tie_embeddings", "attention_bias", "max_position")
    assert [getattr(base.llm, f) for f in fields] == [getattr(CFG.llm, f) for f in fields]
    assert (base.image_token_id, base.video_token_id, base.anyres.pinpoints) == (387, 388, V.anyres.pinpoints)


def test_cli_converts_and_exports(saved, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["llava_ov", str(saved), str(out), "--preset", "llava_ov_tpo_tiny",
                     "--set", "llm.stack.scan_layers=true"]) == 0
    text = capsys.readouterr().out
    assert "mapped into the model" in text and "kept unchanged, extras: 2 keys" in text
    assert cli.main(["export-llava-ov", str(out), str(tmp_path / "back")]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == load_file(saved / "model.safetensors").keys()
    assert cli.main(["llava_ov", str(saved), str(tmp_path / "dry"), "--preset", "llava_ov_tpo_tiny",
                     "--dry-run"]) == 0
    assert not (tmp_path / "dry").exists()


# ------------------------------------------------------------------------------------------------ errors

def _fail(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tpo-convert: error:") and len(err.splitlines()) == 1, err
    return err


def test_wrong_checkpoints_are_one_clear_error(saved, tmp_path, capsys):
    # a VideoChat-TPO checkpoint (no config.json)
    vc = tmp_path / "videochat"
    vc.mkdir()
    save_file({"vision_encoder.encoder.patch_embed.proj.weight": np.zeros((4, 3, 1, 2, 2), np.float32),
               "llama_model.base_model.model.model.embed_tokens.weight": np.zeros((8, 4), np.float32)},
              str(vc / "model.safetensors"))
    err = _fail(capsys, ["llava_ov", str(vc), str(tmp_path / "o1"), "--preset", "llava_ov_tpo_tiny"])
    assert "no config.json" in err and "videochat/config.json" in err
    # ... with a LLaVA-OV config.json beside it: no LLaVA-OV vision tower among its keys
    (vc / "config.json").write_text((saved / "config.json").read_text())
    err = _fail(capsys, ["llava_ov", str(vc), str(tmp_path / "o2"), "--preset", "llava_ov_tpo_tiny"])
    assert "not a LLaVA-OneVision checkpoint" in err and "model.safetensors" in err
    # a Mistral / Qwen2 config.json
    (vc / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    err = _fail(capsys, ["llava_ov", str(vc), str(tmp_path / "o3"), "--preset", "llava_ov_tpo_tiny"])
    assert "'model_type' is 'qwen2'; expected 'llava_onevision'" in err
    # the right checkpoint for another model config: every differing field named on both sides
    err = _fail(capsys, ["llava_ov", str(saved), str(tmp_path / "o4"), "--preset", "llava_ov_tpo_tiny",
                         "--set", "llava_ov.siglip.num_layers=3"])
    assert "'vision_config.num_hidden_layers' is 2 but the model config's llava_ov.siglip.num_layers is 3" in err
    err = _fail(capsys, ["llava_ov", str(saved), str(tmp_path / "o5")])  # the 7B preset
    assert "'text_config.hidden_size' is 64 but the model config's llm.hidden_size is 3584" in err
    # a videochat model config
    with pytest.raises(ConversionError, match="arch 'videochat'"):
        convert_llava_ov(saved, tmp_path / "o6", get_config("tiny"))
    for i in range(1, 7):
        assert not (tmp_path / f"o{i}").exists()


def test_shape_mismatch_and_unknown_key_name_the_key(saved, tmp_path):
    src = load_file(saved / "model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((saved / "config.json").read_text())
    cut = dict(src)
    cut["multi_modal_projector.linear_2.weight"] = src["multi_modal_projector.linear_2.weight"][:, :16].copy()
    save_file(cut, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"multi_modal_projector\.linear_2\.weight.*shape mismatch") as e:
        convert_llava_ov(bad, tmp_path / "o", CFG)
    assert "model.safetensors" in str(e.value)
    extra = dict(src, **{"vision_tower.head.probe": np.zeros((1, 1, 32), np.float32)})
    save_file(extra, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"vision_tower\.head\.probe.*unexpected key"):
        convert_llava_ov(bad, tmp_path / "o", CFG)
    del src["language_model.model.norm.weight"]
    save_file(src, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"llm\.norm\.scale"):
        convert_llava_ov(bad, tmp_path / "o", CFG)
    assert not (tmp_path / "o").exists()


def test_init_from_rejects_a_llava_ov_checkpoint_for_a_videochat_model(converted):
    model = nnx.eval_shape(lambda: TPOModel(get_config("tiny"), rngs=nnx.Rngs(0)))
    with pytest.raises(ConfigError, match=r"init_from.*unrolled.*(llm\.|vision\.)"):
        I.prepare([str(converted["unrolled"])], nnx.state(model, nnx.Param))


def test_7b_dry_run_maps_every_key_into_the_stacked_model():
    """llava_ov_tpo_7b (scanned SigLIP and Qwen2) against the key set of llava-hf/llava-onevision-qwen2-7b-ov-hf
    ("release" names, bf16; metadata only): 26 × 16 + 5 SigLIP keys, projector 4 + image_newline, 28 × 12 + 3 Qwen2
    keys = 765, each mapped into a stacked parameter or kept (post_layernorm)."""
    from tpo_jax.checkpoints.convert import abstract_params, param_shapes
    from tpo_jax.checkpoints.mapping import Meta, build_export_plan
    from tpo_jax.checkpoints.sources import TensorSource
    from tpo_jax.checkpoints.tables import llava_ov as table
    from tpo_jax.model import stack_layouts
    from tpo_jax.stack import unstack_shapes

    cfg = get_config("llava_ov_tpo_7b")
    shapes = {p: s for p, s in param_shapes(abstract_params(lambda: TPOModel(cfg, rngs=None))).items()
              if is_base_param(p)}
    per_layer = unstack_shapes(shapes, stack_layouts(cfg))
    plan = build_export_plan(per_layer, {f"unused/vision_tower.vision_model.post_layernorm.{k}": (1152,)
                                         for k in ("weight", "bias")},
                             table.base_export_rules(cfg.llava_ov.siglip, cfg.llm, "release"), where="7b")
    meta = {k: Meta(s, np.dtype(np.float16), "model.safetensors")
            for j in plan.params + plan.extras for k, s in zip(j.src, j.src_shapes)}
    assert len(meta) == 26 * 16 + 5 + 5 + 28 * 12 + 3 == 765
    assert meta["language_model.model.embed_tokens.weight"].shape == (152128, 3584)
    assert meta["vision_tower.vision_model.embeddings.patch_embedding.weight"].shape == (1152, 3, 14, 14)
    report = convert_llava_ov(TensorSource(meta, {}, "<7b metadata>"), None, cfg, dry_run=True,
                              hf_config=hf_config_from_llava_ov(cfg))
    s = report["summary"]
    assert (s["mapped_keys"], s["extra_keys"], s["dropped_keys"]) == (763, 2, 0)
    assert report["layout"] == "release"
    with pytest.raises(ConversionError, match="'text_config.num_hidden_layers' is 28 but .* llm.num_layers is 2"):
        convert_llava_ov(TensorSource(meta, {}, "<7b metadata>"), None, CFG, dry_run=True,
                         hf_config=hf_config_from_llava_ov(cfg))

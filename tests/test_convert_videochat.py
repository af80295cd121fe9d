"""VideoChat-TPO checkpoint -> Orbax -> back, on a fake checkpoint with all 2,594 real key names.

The fake checkpoint has the released layer counts at tiny widths (shapes derived from our tiny model through
the inverse mapping); its LLM part is a real PEFT-wrapped transformers Mistral, so the converted LLM is checked
against peft's logits (LoRA kept) and the merged kernels against W + s·B·A computed with torch.
"""

import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from tpo_jax.checkpoints.configs import model_config, read_report
from tpo_jax.checkpoints.convert import convert_videochat
from tpo_jax.checkpoints.export import export_videochat
from tpo_jax.checkpoints.orbax_io import load_extras, read_arrays, saved_arrays
from tpo_jax.cli.convert import main
from test_convert_helpers import exported_tensors, fake_videochat, load_model, real_keys, real_layout_tiny, t2n

CFG = real_layout_tiny()
TOL = 1e-4


def _peft_mistral(cfg, seed=0):
    """transformers Mistral with cfg.llm's shapes, LoRA (cfg.lora) on all 8 targets, random non-zero B."""
    torch.manual_seed(seed)
    llm = cfg.llm
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        intermediate_size=llm.intermediate_size, rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_norm_eps,
        max_position_embeddings=llm.max_position, sliding_window=None, tie_word_embeddings=False,
        attn_implementation="eager"))
    lcfg = peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                           target_modules=list(cfg.lora.targets), init_lora_weights=False)
    model = peft.get_peft_model(hf, lcfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def peft_model():
    return _peft_mistral(CFG)


@pytest.fixture(scope="module")
def source(tmp_path_factory, peft_model):
    llm = {f"lm.{k}": v.detach().clone() for k, v in peft_model.state_dict().items()}
    d = tmp_path_factory.mktemp("videochat_src")
    tensors = fake_videochat(d, CFG, overrides=llm)
    return d, tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory, source):
    out = tmp_path_factory.mktemp("conv") / "ckpt"
    report = convert_videochat(source[0], out, CFG)
    return out, report


@pytest.fixture(scope="module")
def model(converted):
    return load_model(converted[0], CFG)


def test_every_real_key_is_mapped_or_kept(source, converted, model):
    _, tensors = source
    out, report = converted
    keys = real_keys()
    assert len(keys) == 2594 and set(tensors) == set(keys)
    mapped = {k for group in report["mapped"] for k in group.split(", ")}
    extras = set(report["extras"])
    assert not mapped & extras
    assert mapped | extras == set(keys)  # no unmapped key
    assert len(mapped) == 2573 and len(extras) == 21 and not report["dropped"]
    assert len({k for k in mapped if k.startswith("sam.")}) == 900  # the whole SAM2 is converted
    assert {e["path"].split("/")[0] for e in report["extras"].values()} == {"unused"}
    assert read_report(out)["summary"] == report["summary"]
    # `model` was loaded strictly: no missing and no unexpected parameter for the tiny model
    # spot checks of the transforms against the source tensors
    vb = "vision_encoder.encoder.blocks.3."
    np.testing.assert_array_equal(np.asarray(model.vision.blocks[3].attn.qkv[...]),
                                  t2n(tensors[vb + "attn.qkv.weight"]).T)
    np.testing.assert_array_equal(np.asarray(model.vision.patch_embed.kernel[...]),
                                  t2n(tensors["vision_encoder.encoder.patch_embed.proj.weight"])
                                  .transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(np.asarray(model.box_token[...]), t2n(tensors["box_token"])[0, 0])
    pe = "sam.sam_prompt_encoder.point_embeddings."
    np.testing.assert_array_equal(np.asarray(model.sam2.sam_prompt_encoder.point_embeddings[...]),
                                  np.concatenate([t2n(tensors[f"{pe}{k}.weight"]) for k in range(4)]))
    np.testing.assert_array_equal(np.asarray(model.sam2.image_encoder.trunk.pos_embed[...]),
                                  t2n(tensors["sam.image_encoder.trunk.pos_embed"]).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(model.sam2.memory_tokens.maskmem_tpos_enc[...]),
                                  t2n(tensors["sam.maskmem_tpos_enc"])[:, 0, 0])
    enc = "cg_model.transformer.encoder.layers.1.self_attn."
    w, b = t2n(tensors[enc + "in_proj_weight"]), t2n(tensors[enc + "in_proj_bias"])
    d = w.shape[1]
    attn = model.temporal_head.transformer.encoder.layers[1].self_attn
    np.testing.assert_array_equal(np.asarray(attn.k_proj.kernel[...]), w[d:2 * d].T)
    np.testing.assert_array_equal(np.asarray(attn.v_proj.bias[...]), b[2 * d:])
    np.testing.assert_array_equal(np.asarray(model.region_head.loc_decoder.layers[1].kernel[...]),
                                  t2n(tensors["loc_decoder.2.weight"]).T)
    extras = load_extras(out)
    assert extras["unused"]["qformer.bert.embeddings.position_ids"].dtype == np.int64


def test_round_trip_is_bit_exact(tmp_path, source, converted):
    _, tensors = source
    files = export_videochat(converted[0], tmp_path / "back", max_shard_bytes=3_000_000)
    back = exported_tensors(files)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(back) == set(tensors)
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype, key
        assert torch.equal(back[key], t), key


def _ids(n=11, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.llm.vocab_size, (2, n))


def test_llm_logits_match_peft(model, peft_model):
    ids = _ids()
    with torch.no_grad():
        ref = t2n(peft_model(input_ids=torch.tensor(ids)).logits)
    got = np.asarray(model.llm(jnp.asarray(ids)).logits)
    diff = np.abs(got - ref).max()
    print(f"videochat LLM (LoRA kept) vs peft: max |diff| = {diff:.2e}")
    assert diff <= TOL


def test_merged_lora_and_float32(tmp_path, source, peft_model):
    out = tmp_path / "merged"
    convert_videochat(source[0], out, CFG, lora="merge", dtype="float32")
    assert model_config(read_report(out)).lora.enabled is False
    saved = saved_arrays(out / "params")
    assert not [p for p in saved if "lora" in p] and {d for _, d in saved.values()} == {np.dtype(np.float32)}
    # merged kernels = (W + s·B·A)ᵀ, computed here with torch from the peft model's own tensors
    sd = peft_model.state_dict()
    mods = {"model.layers.5.mlp.up_proj": "llm.layers.5.mlp.up_proj.kernel",
            "model.layers.31.self_attn.k_proj": "llm.layers.31.self_attn.k_proj.kernel",
            "lm_head": "llm.lm_head.kernel"}
    got = read_arrays(out / "params", list(mods.values()))
    for mod, path in mods.items():
        q = f"base_model.model.{mod}."
        w = sd[q + "base_layer.weight"] + CFG.lora.scaling * (sd[q + "lora_B.default.weight"]
                                                             @ sd[q + "lora_A.default.weight"])
        np.testing.assert_allclose(got[path], t2n(w).T, rtol=1e-6, atol=1e-6, err_msg=path)
        assert np.abs(got[path] - t2n(sd[q + "base_layer.weight"]).T).max() > 1e-3  # the adapter is not zero
    # float32 output: bf16 tensors upcast exactly
    q = read_arrays(out / "params", ["qformer.query_tokens"])["qformer.query_tokens"]
    np.testing.assert_array_equal(q, t2n(source[1]["query_tokens"]))
    # export of a merged model: base_layer = merged weight, zero adapters of the configured rank
    files = export_videochat(out, tmp_path / "back", dtype="bfloat16")
    back = exported_tensors(files)
    p = "lm.base_model.model.model.layers.5.mlp.up_proj."
    assert back[p + "lora_A.default.weight"].shape == (CFG.lora.rank, CFG.llm.hidden_size)
    assert not back[p + "lora_B.default.weight"].float().any()
    assert back[p + "base_layer.weight"].dtype == torch.bfloat16
    merged_up = torch.from_numpy(got["llm.layers.5.mlp.up_proj.kernel"].T.copy()).to(torch.bfloat16)
    assert torch.equal(back[p + "base_layer.weight"], merged_up)
    assert back["qformer.bert.embeddings.position_ids"].dtype == torch.int64


def test_cli_dry_run_and_convert(tmp_path, source, capsys):
    sets = ["llm.num_layers=32", "vit.depth=23", "qformer.num_layers=12", "sam2.trunk.stages=[2,6,36,4]",
            "sam2.trunk.global_att_blocks=[23,33,43]", "sam2.trunk.window_spec=[8,4,16,8]",
            "sam2.trunk.window_pos_embed_bkg_spatial_size=[7,7]", "sam2.memory.attention.num_layers=4",
            "sam2.memory.tokens.num_maskmem=7", "sam2.memory.tokens.max_obj_ptrs=16"]
    args = ["videochat", str(source[0]), str(tmp_path / "cli"), "--preset", "tiny"]
    args += [a for kv in sets for a in ("--set", kv)]
    assert main(args + ["--dry-run", "--no-extras"]) == 0
    text = capsys.readouterr().out
    assert "2573 keys" in text and "dropped               : 21 keys" in text
    assert not (tmp_path / "cli").exists()
    # a wrong config is one clear error, exit status 2
    bad = ["videochat", str(source[0]), str(tmp_path / "cli"), "--preset", "tiny", "--dry-run"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "maps to parameter '" in err and "does the config match" in err


def test_7b_preset_expects_the_released_shapes():
    """The inverse mapping of the 7B preset gives exactly the mapped keys of the release, at the shapes
    MODEL-SPEC §9.2 lists for them."""
    from tpo_jax.config import get_config
    from test_convert_helpers import source_shapes

    shapes = source_shapes(get_config("videochat_tpo_7b"))
    keys = real_keys()
    assert set(shapes) <= set(keys) and len(shapes) == 2573 and {k for k in keys if k.startswith("sam.")} <= set(shapes)
    lm = "lm.base_model.model."
    spec = {  # MODEL-SPEC §9.2, PyTorch layout
        lm + "model.embed_tokens.weight": (32007, 4096), lm + "lm_head.base_layer.weight": (32007, 4096),
        lm + "lm_head.lora_B.default.weight": (32007, 16), lm + "model.layers.31.self_attn.k_proj.base_layer.weight":
        (1024, 4096), lm + "model.layers.0.mlp.down_proj.lora_A.default.weight": (16, 14336),
        "vision_encoder.encoder.patch_embed.proj.weight": (1024, 3, 1, 16, 16),
        "vision_encoder.encoder.blocks.22.attn.qkv.weight": (3072, 1024),
        "vision_encoder.encoder.blocks.0.mlp.fc1.weight": (4096, 1024),
        "qformer.bert.embeddings.word_embeddings.weight": (30523, 768),
        "qformer.bert.encoder.layer.10.crossattention.self.key.weight": (768, 1024),
        "query_tokens": (1, 32, 768), "extra_query_tokens": (1, 64, 768), "project_up.weight": (4096, 768),
        "box_token": (1, 1, 4096), "loc_encoder.0.weight": (2048, 4), "loc_decoder.2.weight": (4, 2048),
        "track_embed.layers.1.weight": (768, 4096), "track_embed_decode2.layers.1.weight": (4, 4096),
        "sam.sam_prompt_encoder.point_embeddings.3.weight": (1, 256),
        "sam.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
        # SAM2 v1 Hiera-L (MODEL-SPEC §7): 48 blocks up to width 1152, the memory path at 256 / 64
        "sam.image_encoder.trunk.blocks.47.mlp.layers.1.weight": (1152, 4608),
        "sam.image_encoder.trunk.pos_embed_window": (1, 144, 8, 8),
        "sam.image_encoder.neck.convs.0.conv.weight": (256, 1152, 1, 1),
        "sam.sam_mask_decoder.output_upscaling.0.weight": (256, 64, 2, 2),
        "sam.memory_attention.layers.3.cross_attn_image.k_proj.weight": (256, 64),
        "sam.memory_encoder.mask_downsampler.encoder.12.weight": (256, 256, 1, 1),
        "sam.maskmem_tpos_enc": (7, 1, 1, 64), "sam.no_obj_ptr": (1, 256),
        "cg_model.query_embed.weight": (10, 2), "cg_model.dummy_rep_token": (45, 256),
        "cg_model.input_vid_proj.0.LayerNorm.weight": (770,), "cg_model.input_txt_proj.0.net.1.weight": (256, 4096),
        "cg_model.transformer.encoder.layers.2.self_attn.in_proj_weight": (768, 256),
        "cg_model.transformer.decoder.layers.0.ca_qpos_proj.weight": (256, 256),
        "cg_model.transformer.decoder.ref_anchor_head.layers.1.weight": (1, 256),
        "cg_model.transformer.decoder.layers.2.activation.weight": (1,),
    }
    assert {k: shapes[k] for k in spec} == spec
    assert "cg_model.transformer.decoder.layers.1.ca_qpos_proj.weight" not in shapes  # layer 0 only

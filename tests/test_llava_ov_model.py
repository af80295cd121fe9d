"""The assembled LLaVA-OneVision base model (`tpo_jax.llava_ov.model.LlavaOV`) against transformers 5.25
`LlavaOnevisionForConditionalGeneration`, f32, tiny random weights built locally.

The HF model is built from our `tiny()` config (SigLIP 20 px / patch 4, 2 layers; Qwen2 hidden 64, 2 layers,
vocab 400 (the shipped tiny tokenizer's); pinpoints up to 4 × 4 tiles, anyres_max_9); its config.json is read back by
`checkpoints.configs.llava_ov_config_from_hf` and its weights reach our model only through
`checkpoints/tables/llava_ov.py`. A right-padded batch of two prompts: sample 0 holds an anyres image of 2 × 3
tiles (rows cut) and a 3-frame video (pooled 5 × 5 → 3 × 3) in a 4-frame budget; sample 1 an image of 4 × 4 tiles
(cut + anyres_max_9 downscale) and no video. Compared: the merged `inputs_embeds` HF hands its language model,
the logits, KV-cache greedy decoding, and the bit-exact conversion round trip in every key layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from llava_ov_reference import hf_config, random_hf_model
from safetensors.numpy import load_file, save_file
from transformers import Qwen2Config

from tpo_jax.checkpoints.configs import llava_ov_config_from_hf, llm_config_from_hf
from tpo_jax.checkpoints.convert import convert_hf
from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.tables import llava_ov as table
from tpo_jax.config import ConfigError
from tpo_jax.llava_ov import model as M
from tpo_jax.llava_ov import visual_tokens as vt
from tpo_jax.llm import KVCache

TOL = 1e-4
CFG = M.tiny()
S = CFG.siglip.image_size
SIZES = [(30, 52), (75, 61)]  # 2 × 3 tiles, rows cut; 4 × 4 tiles, cut + downscale
FRAMES = 3
IMG, VID = CFG.image_token_id, CFG.video_token_id
PROMPTS = [[5, 6, 7, 8, 9, IMG, 10, 11, 12, VID, 13, 14, 15, 16], [20, 21, 22, IMG, 23, 24, 25, 26, 27, 28]]


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def hf():
    return random_hf_model(CFG)


@pytest.fixture(scope="module")
def state_dict(hf):
    return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


def _build(cfg, sd, **kw):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: M.LlavaOV(cfg, rngs=None)))
    state, extras, summary = table.load_state_dict(cfg, sd, **kw)
    return nnx.merge(graphdef, state), extras, summary


@pytest.fixture(scope="module")
def ours(state_dict):
    return _build(CFG, state_dict)[0]


@pytest.fixture(scope="module")
def batch():
    """The two prompts, our inputs and HF's (same pixels)."""
    rng = np.random.default_rng(0)
    plans = [vt.image_plan(s, CFG.anyres) for s in SIZES]
    tiles = np.zeros((2, 1 + CFG.anyres.tile_budget, S, S, 3), np.float32)
    counts = []
    for b, size in enumerate(SIZES):
        n = 1 + (vt.select_best_resolution(size, CFG.anyres.pinpoints)[0] // S) * \
            (vt.select_best_resolution(size, CFG.anyres.pinpoints)[1] // S)
        tiles[b, :n] = rng.standard_normal((n, S, S, 3), dtype=np.float32)
        counts.append(n)
    videos = np.zeros((2, CFG.max_frames, S, S, 3), np.float32)
    videos[0, :FRAMES] = rng.standard_normal((FRAMES, S, S, 3), dtype=np.float32)
    num_frames = np.array([FRAMES, 0], np.int32)
    ids = [M.expand_placeholders(p, CFG, [int(plans[b].length)], int(num_frames[b])) for b, p in enumerate(PROMPTS)]
    length = max(map(len, ids))
    input_ids = np.zeros((2, length), np.int32)
    mask = np.zeros((2, length), bool)
    for b, row in enumerate(ids):
        input_ids[b, :len(row)], mask[b, :len(row)] = row, True
    image_plans = vt.stack_plans(plans)
    M.check_placeholders(input_ids, CFG, image_plans, num_frames)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))  # noqa: E731
    theirs = dict(input_ids=torch.from_numpy(input_ids.astype(np.int64)), attention_mask=torch.from_numpy(mask).long(),
                  pixel_values=nchw(tiles[:, :max(counts)]), image_sizes=torch.tensor(SIZES),
                  pixel_values_videos=nchw(videos[:1, :FRAMES]))
    mine = dict(input_ids=jnp.asarray(input_ids), images=jnp.asarray(tiles), image_plans=image_plans,
                videos=jnp.asarray(videos), num_frames=jnp.asarray(num_frames))
    return dict(ours=mine, hf=theirs, mask=mask, lengths=[len(r) for r in ids])


@pytest.fixture(scope="module")
def hf_out(hf, batch):
    """HF logits and the inputs_embeds its language model received (after merging)."""
    seen = {}
    hook = hf.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"].detach().numpy().copy()),
        with_kwargs=True)
    try:
        with torch.no_grad():
            logits = hf(**batch["hf"]).logits.numpy()
    finally:
        hook.remove()
    return dict(logits=logits, embeds=seen["embeds"])


def _forward(model, inputs, **kw):
    return jax.jit(lambda m, x: m(x.pop("input_ids"), **x, **kw))(model, dict(inputs))


# ------------------------------------------------------------------------------------------------ numerics

def test_merged_embeddings_match_hf(ours, batch, hf_out):
    got = np.asarray(jax.jit(lambda m, x: m.embed_inputs(x.pop("input_ids"), **x))(ours, dict(batch["ours"])))
    ids = np.asarray(batch["ours"]["input_ids"])
    assert got.shape == hf_out["embeds"].shape
    for name, tok in (("image", IMG), ("video", VID), ("text", None)):
        rows = np.isin(ids, [IMG, VID], invert=True) if tok is None else ids == tok
        diff = _max_diff(got[rows], hf_out["embeds"][rows])
        print(f"merged inputs_embeds, {name} rows ({int(rows.sum())}): max |diff| = {diff:.2e}")
        assert diff <= TOL
    # the image / video rows really hold visual features (not the placeholder's embedding)
    table_rows = np.asarray(ours.llm.embed_tokens.embedding[...])
    assert _max_diff(got[ids == IMG][0], table_rows[IMG]) > 0.1 and _max_diff(got[ids == VID][0], table_rows[VID]) > 0.1


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_logits_match_hf(ours, state_dict, batch, hf_out, scan):
    model = _build(M.with_scan(CFG), state_dict)[0] if scan else ours
    out = _forward(model, batch["ours"], attention_mask=jnp.asarray(batch["mask"]))
    for b, n in enumerate(batch["lengths"]):
        diff = _max_diff(out.logits[b, :n], hf_out["logits"][b, :n])
        kind = "image + video" if b == 0 else "image"
        print(f"logits ({'scanned' if scan else 'unrolled'}), sample {b} ({kind}, {n} tokens): max |diff| = {diff:.2e}")
        assert diff <= TOL


def test_kv_cache_greedy_decoding(hf, ours, batch):
    """Sample 0 (image + video): prefill + 4 greedy steps through the cache == the full forward over the grown
    sequence, and the same tokens as HF's greedy `generate`."""
    n, steps = batch["lengths"][0], 4
    x = {k: (v[:1, :n] if k == "input_ids" else jax.tree.map(lambda a: a[:1], v)) for k, v in batch["ours"].items()}
    graphdef, state = nnx.split(ours)

    @jax.jit
    def step(state, x, cache):
        return nnx.merge(graphdef, state)(x.pop("input_ids"), **x, cache=cache)

    out = step(state, x, KVCache.init(CFG.llm, batch=1, max_len=n + steps))
    tokens, logits = [], [np.asarray(out.logits[:, -1])]
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1][0])))
        out = step(state, {"input_ids": jnp.asarray([[tokens[-1]]])}, out.cache)
        logits.append(np.asarray(out.logits[:, -1]))
    assert int(out.cache.length) == n + steps
    full_ids = jnp.concatenate([x["input_ids"], jnp.asarray([tokens], jnp.int32)], 1)
    full = _forward(ours, {**x, "input_ids": full_ids})
    diff = _max_diff(np.concatenate(logits, 0), full.logits[0, n - 1:])
    print(f"KV-cache greedy decoding ({steps} tokens) vs full forward: max |diff| = {diff:.2e}")
    assert diff <= TOL
    assert list(np.argmax(np.asarray(full.logits[0, n - 1:-1]), -1)) == tokens
    h = {k: v[:1] for k, v in batch["hf"].items()}
    h["input_ids"], h["attention_mask"] = h["input_ids"][:, :n], h["attention_mask"][:, :n]
    with torch.no_grad():
        ref = hf.generate(**h, max_new_tokens=steps, do_sample=False)
    assert ref[0, n:].tolist() == tokens


# ------------------------------------------------------------------------------------------------ conversion

@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_round_trip_bit_exact_and_complete(state_dict, scan):
    cfg = M.with_scan(CFG) if scan else CFG
    model, extras, summary = _build(cfg, state_dict)
    assert summary["mapped_keys"] + summary["extra_keys"] + summary["dropped_keys"] == len(state_dict)
    assert summary["dropped_keys"] == 0 and set(extras) == {"unused/model.vision_tower.post_layernorm.weight",
                                                            "unused/model.vision_tower.post_layernorm.bias"}
    n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == (2 + 12 * CFG.llm.num_layers + 1 if not scan else 2 + 12 + 1) + \
        (3 + (16 if not scan else 0) * CFG.siglip.num_layers + (16 if scan else 0) + 5)
    back = table.export_state_dict(cfg, nnx.state(model, nnx.Param), extras)
    assert set(back) == set(state_dict)
    for k, v in state_dict.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert np.array_equal(back[k].view(np.uint32), v.view(np.uint32)), k


def _renamed(saved: dict, tower: str, lm: tuple[str, str]) -> dict:
    """saved5 names → another layout's: the tower prefix and the decoder prefixes."""
    out = {}
    for k, v in saved.items():
        if k.startswith("vision_tower."):
            k = tower + k[len("vision_tower."):]
        elif k.startswith("language_model.model."):
            k = lm[0] + k[len("language_model.model."):]
        elif k.startswith("language_model.lm_head."):
            k = lm[1] + k[len("language_model.lm_head."):]
        elif lm[0].startswith("model."):
            k = "model." + k  # the projector and image_newline sit under `model.` where the decoder does
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["saved5", "release", "transformers4"])
def test_saved_checkpoints_in_every_layout(tmp_path, hf, ours, layout):
    """`save_pretrained` (saved5 names) and its renamings to the llava-hf Hub (release) and transformers-4 names:
    read from safetensors files, equal parameters, and exported back bit-exact."""
    hf.save_pretrained(tmp_path / "saved5")
    saved = load_file(str(tmp_path / "saved5" / "model.safetensors"))
    assert "language_model.model.layers.0.self_attn.q_proj.bias" in saved and "vision_tower.post_layernorm.bias" in saved
    src = tmp_path / "saved5"
    if layout != "saved5":
        tower = "vision_tower.vision_model." if layout == "release" else "model.vision_tower.vision_model."
        lm = ("language_model.model.", "language_model.lm_head.") if layout == "release" else \
            ("model.language_model.", "lm_head.")
        saved = _renamed(saved, tower, lm)
        src = tmp_path / layout / "model.safetensors"
        src.parent.mkdir()
        save_file(saved, str(src), metadata={"format": "pt"})
    assert table.detect_layout(saved) == layout
    model, extras, _ = _build(CFG, src)
    a = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    b = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)
    back = table.export_state_dict(CFG, nnx.state(model, nnx.Param), extras, layout=layout)
    assert set(back) == set(saved) and all(np.array_equal(back[k], saved[k]) for k in saved)


def test_conversion_errors_name_the_key(state_dict):
    with pytest.raises(ConversionError, match="model.language_model.layers.0.mlp.extra_proj.weight"):
        _build(CFG, {**state_dict, "model.language_model.layers.0.mlp.extra_proj.weight": np.zeros((2, 2))})
    with pytest.raises(ConversionError, match=r"llm\.lm_head\.kernel") as e:
        _build(CFG, {k: v for k, v in state_dict.items() if k != "lm_head.weight"})
    assert e.value.key == "lm_head.weight"
    with pytest.raises(ConversionError, match="shape mismatch"):
        _build(dataclasses.replace(CFG, llm=dataclasses.replace(CFG.llm, vocab_size=410)), state_dict)
    with pytest.raises(ValueError, match="unknown LLaVA-OV key layout"):
        table.rules(CFG, "hub")


# ------------------------------------------------------------------------------------------------ configs

def test_config_json_reads_into_our_config(hf):
    cfg = llava_ov_config_from_hf(hf.config.to_dict(), max_frames=CFG.max_frames)
    assert cfg == CFG
    good = hf.config.to_dict()
    for field, value, match in (("model_type", "llava", "model_type"),
                                ("vision_feature_layer", -2, "vision_feature_layer"),
                                ("vision_feature_select_strategy", "default", "vision_feature_select_strategy"),
                                ("vision_aspect_ratio", "anyres", "vision_aspect_ratio"),
                                ("image_token_index", 400, "llava_ov.image_token_id")):
        with pytest.raises(ConversionError, match=match):
            llava_ov_config_from_hf({**good, field: value})
    with pytest.raises(ConversionError, match="vision_config.vision_use_head"):
        llava_ov_config_from_hf({**good, "vision_config": {**good["vision_config"], "vision_use_head": True}})
    with pytest.raises(ConversionError, match="use_sliding_window"):
        llava_ov_config_from_hf({**good, "text_config": {**good["text_config"], "use_sliding_window": True}})


def test_qwen2_config_json():
    q = llm_config_from_hf(Qwen2Config(vocab_size=152128, hidden_size=3584, intermediate_size=18944,
                                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                       rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                                       tie_word_embeddings=False).to_dict())
    assert q == M.llava_ov_7b().llm  # == config.qwen2_7b_llm()
    with pytest.raises(ConversionError, match="'gemma'"):
        llm_config_from_hf({"model_type": "gemma"})


def test_convert_hf_reads_a_qwen2_config_json(tmp_path):
    """tpo-convert of a saved Qwen2ForCausalLM needs no explicit config now: q/k/v biases come from model_type."""
    from transformers import Qwen2ForCausalLM

    q = CFG.llm
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**hf_config(CFG).text_config.to_dict())).save_pretrained(tmp_path / "qwen2")
    report = convert_hf(tmp_path / "qwen2", tmp_path / "out", dry_run=True)
    assert report["summary"]["mapped_keys"] == 2 + q.num_layers * (9 + 3) + 1
    assert report["config"]["llm"]["attention_bias"] is True


def test_presets_and_validation():
    big = M.llava_ov_7b()
    assert (big.siglip.hidden_size, big.siglip.num_layers, big.siglip.image_size, big.siglip.patch_size) == \
        (1152, 26, 384, 14)
    assert (big.llm.hidden_size, big.llm.num_layers, big.llm.vocab_size, big.llm.attention_bias) == \
        (3584, 28, 152128, True)
    assert (big.image_token_id, big.video_token_id, big.anyres.max_num_patches, len(big.anyres.pinpoints)) == \
        (151646, 151647, 9, 36)
    assert (big.anyres.token_budget, big.video_tokens, big.vision.llm_hidden) == (8829, 32 * 196 + 1, 3584)
    for kw, field in ((dict(image_token_id=400), "llava_ov.image_token_id"),
                      (dict(video_token_id=-1), "llava_ov.video_token_id"),
                      (dict(video_token_id=387), "llava_ov.video_token_id"),
                      (dict(max_frames=0), "llava_ov.max_frames"), (dict(max_images=0), "llava_ov.max_images"),
                      (dict(dtype="float64"), "llava_ov.dtype"),
                      (dict(anyres=vt.AnyresConfig()), "llava_ov.anyres.image_size"),
                      (dict(llm=dataclasses.replace(CFG.llm, num_kv_heads=3)), "llava_ov.llm.num_kv_heads")):
        with pytest.raises(ConfigError, match=field):
            M.tiny(**kw)


def test_placeholders_and_multi_image(ours):
    plan = vt.image_plan((30, 52), CFG.anyres)
    with pytest.raises(ValueError, match="2 <image> tokens"):
        M.expand_placeholders([IMG, 1, IMG], CFG, [int(plan.length)] * 3)
    ids = np.array([M.expand_placeholders([1, IMG, 2], CFG, [int(plan.length)])])
    with pytest.raises(ValueError, match="sample 0: 0 <video> tokens"):
        M.check_placeholders(ids, CFG, vt.stack_plans([plan]), [2])
    # two untiled images in one sample (max_images 2) == each written after the other, in order
    cfg2 = dataclasses.replace(CFG, max_images=2)
    p1, p2 = (vt.image_plan(s, cfg2.anyres, tiled=False) for s in SIZES)
    plans = M.batch_plans([[p1, p2], [p2]], cfg2)
    assert plans.valid.shape == (2, 2, cfg2.anyres.token_budget)
    tiles = np.random.default_rng(5).standard_normal((2, 2, 1 + cfg2.anyres.tile_budget, S, S, 3), dtype=np.float32)
    got = np.asarray(ours.encode_images(jnp.asarray(tiles), plans))
    one = lambda t, p: np.asarray(ours.encode_images(jnp.asarray(t[None]), vt.stack_plans([p])))[0]  # noqa: E731
    n = int(p1.length)
    assert np.allclose(got[0, :n], one(tiles[0, 0], p1)[:n], atol=1e-6)
    assert np.allclose(got[0, n:2 * n], one(tiles[0, 1], p2)[:n], atol=1e-6)
    assert not np.any(got[0, 2 * n:]) and np.allclose(got[1, :n], one(tiles[1, 0], p2)[:n], atol=1e-6)

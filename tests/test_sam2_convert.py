"""SAM2 checkpoint conversion (checkpoints/tables/sam2_hf.py, checkpoints/sam2_convert.py, `tpo-convert sam2`).

Reference: transformers 5.25 `Sam2VideoModel` with the SAM 2 v1 flags (enable_occlusion_spatial_embedding=False,
enable_temporal_pos_encoding_for_object_pointers=False), tiny random config (its memory cross-attention takes a
64-d memory: hidden 128, memory 64, so each object pointer is 2 memory tokens), driven through its own video API:
`Sam2VideoInferenceSession` + a box on frame 0 (`add_point_inputs`, labels 2/3 as `Sam2VideoProcessor` builds
them) + `propagate_in_video_iterator`. Our side: the saved safetensors + config.json through the converter, then
`Sam2Video.propagate`. Upstream-style `.pt` files are written here with `torch.save({"model": state_dict})`.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.orbax_io import read_arrays, saved_arrays
from tpo_jax.checkpoints.sam2_convert import config_from_hf, convert_sam2
from tpo_jax.checkpoints.sources import open_source
from tpo_jax.checkpoints.tables import sam2 as sam2_table
from tpo_jax.checkpoints.tables import sam2_hf
from tpo_jax.cli.convert import main as convert_main
from tpo_jax.sam2 import config as sam2_config
from tpo_jax.sam2.video import Sam2Video

transformers = pytest.importorskip("transformers")
from test_sam2_memory import _randomize  # noqa: E402

TOL = 1e-4
T = 8  # frames: more than num_maskmem (3) and max_object_pointers (4), so both rings wrap
BOX = [12.0, 10.0, 40.0, 44.0]  # pixels of the 64×64 input


def _hf_config():
    from transformers import Sam2VideoConfig
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig, Sam2VisionConfig

    d, m = 128, 64
    bb = Sam2HieraDetConfig(hidden_size=8, num_attention_heads=1, image_size=[64, 64], blocks_per_stage=[1, 2, 3, 2],
                            embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 2, 4, 8],
                            window_size_per_stage=[4, 4, 2, 3], global_attention_blocks=[4],
                            window_positional_embedding_background_size=[3, 3])
    vis = Sam2VisionConfig(backbone_config=bb, backbone_channel_list=[64, 32, 16, 8],
                           backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], fpn_hidden_size=d)
    return Sam2VideoConfig(
        vision_config=vis, prompt_encoder_config=dict(hidden_size=d, image_size=64, patch_size=16, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=d, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
        image_size=64, num_maskmem=3, max_object_pointers_in_encoder=4,
        enable_temporal_pos_encoding_for_object_pointers=False, enable_occlusion_spatial_embedding=False,
        memory_attention_hidden_size=d, memory_attention_num_layers=2, memory_attention_num_attention_heads=1,
        memory_attention_feed_forward_hidden_size=96, memory_attention_rope_feat_sizes=[4, 4],
        memory_attention_dropout=0.0, memory_attention_rope_dropout=0.0, memory_encoder_hidden_size=d,
        memory_encoder_output_channels=m, mask_downsampler_embed_dim=d, memory_fuser_embed_dim=d,
        memory_fuser_intermediate_dim=4 * d)


def _build(cfg, state_dict, load):
    """A `Sam2Video` with its parameters from `state_dict` (built shape-only: real random init is slow)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Sam2Video(cfg, rngs=nnx.Rngs(0))))
    state = load(abstract, state_dict)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


def _sd(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    from transformers import Sam2VideoModel

    hf = Sam2VideoModel(_hf_config()).eval()
    _randomize(hf, 5)  # seed 5: masks with both signs on every frame
    with torch.no_grad():  # one Gaussian matrix in a real checkpoint, two random buffers in a fresh model
        hf.prompt_encoder.shared_embedding.positional_embedding.copy_(hf.shared_image_embedding.positional_embedding)
        hf.mask_decoder.pred_obj_score_head.proj_out.bias.add_(2.0)  # the object is there
    path = tmp_path_factory.mktemp("hf") / "sam2_video"
    hf.save_pretrained(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    src = open_source(path)
    sd = {k: src.read(k) for k in src.meta}
    ours = _build(cfg, sd, sam2_hf.load_state_dict)
    return hf, path, cfg, sd, ours


def _frames():
    g = torch.Generator().manual_seed(3)
    x = 0.3 * torch.randn(T, 3, 64, 64, generator=g)
    for t in range(T):
        x[t, :, 10 + 3 * t:30 + 3 * t, 12 + 2 * t:34 + 2 * t] += 2.0
    return x


def test_propagation_matches_transformers_video_inference(hf_pair):
    from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

    hf, _, cfg, _, ours = hf_pair
    assert cfg.memory.tokens.tokens_per_ptr == 2 and cfg.memory_storage_dtype == "bfloat16"  # as transformers
    frames = _frames()
    session = Sam2VideoInferenceSession(video=frames, video_height=64, video_width=64, dtype=torch.float32)
    obj = session.obj_id_to_idx(0)
    session.add_point_inputs(obj, 0, {"point_coords": torch.tensor([[[BOX[:2], BOX[2:]]]]),
                                      "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32)})
    session.obj_with_new_inputs = [0]
    with torch.no_grad():
        hf(session, frame_idx=0)
        outs = {o.frame_idx: o for o in hf.propagate_in_video_iterator(session, start_frame_idx=0)}
    low = np.stack([outs[t].pred_masks[0, 0].numpy() for t in range(T)])
    scores = np.array([float(outs[t].object_score_logits.reshape(-1)[0]) for t in range(T)])
    out = nnx.jit(lambda m, f, p: m.propagate(f, p))(
        ours, jnp.asarray(frames.permute(0, 2, 3, 1).numpy())[None], ours.box_prompt(jnp.asarray([[b / 64 for b in BOX]])))
    assert out.masks.shape == (1, T, 16, 16) and low.shape == (T, 16, 16)
    assert np.all(scores > 0) and all((low[t] > 0).any() and (low[t] < 0).any() for t in range(T))
    # measured: masks ≤ 2.4e-6 per frame, object scores ≤ 1e-6
    np.testing.assert_allclose(np.asarray(out.object_score_logits[0]), scores, atol=TOL, rtol=0)
    diff = float(np.max(np.abs(np.asarray(out.masks[0], np.float64) - low)))
    assert diff <= TOL, diff


def test_transformers_round_trip_bit_exact(hf_pair):
    _, _, _, sd, ours = hf_pair
    back = sam2_hf.export_state_dict(nnx.state(ours, nnx.Param))
    assert set(back) == set(sd) and len(sd) == 366
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == np.ascontiguousarray(v).tobytes(), k


def test_transformers_key_problems_are_one_error(hf_pair):
    _, _, _, sd, ours = hf_pair
    state = nnx.state(ours, nnx.Param)
    bad = dict(sd)
    bad["prompt_encoder.shared_embedding.positional_embedding"] = sd["shared_image_embedding.positional_embedding"] + 1
    with pytest.raises(ConversionError, match="copies of this tensor differ"):
        sam2_hf.load_state_dict(state, bad)
    v21 = dict(sd, occlusion_spatial_embedding_parameter=np.zeros((1, 64), np.float32))
    v21["temporal_positional_encoding_projection_layer.weight"] = np.zeros((64, 128), np.float32)
    with pytest.raises(ConversionError, match="SAM 2.1") as e:
        sam2_hf.load_state_dict(state, v21)
    assert "occlusion_spatial_embedding_parameter" in str(e.value) and "\n" not in str(e.value)


def _upstream_sd(cfg, seed: int) -> dict[str, np.ndarray]:
    abstract = nnx.state(nnx.eval_shape(lambda: Sam2Video(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    g = np.random.default_rng(seed)
    return {k: g.normal(size=s).astype(np.float32) for k, s in sam2_hf.upstream_shapes(abstract).items()}


@pytest.fixture(scope="module")
def upstream_pt(tmp_path_factory):
    sd = _upstream_sd(sam2_config.tiny(), 1)
    path = tmp_path_factory.mktemp("up") / "sam2_tiny.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
    return path, sd


def test_upstream_pt_round_trip_bit_exact(upstream_pt):
    path, sd = upstream_pt
    src = open_source(path)  # torch.load(weights_only=True), {"model": ...} unwrapped
    assert set(src.meta) == set(sd) and len(sd) == 368
    ours = _build(sam2_config.tiny(), {k: src.read(k) for k in src.meta}, sam2_table.load_state_dict)
    back = sam2_table.export_state_dict(nnx.state(ours, nnx.Param))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].tobytes() == v.tobytes(), k
    # and through the transformers names: upstream -> transformers -> upstream
    hf = sam2_hf.upstream_to_hf(sd)
    again = sam2_hf.hf_to_upstream(hf, {k: v.shape for k, v in sd.items()})
    assert set(again) == set(sd) and all(again[k].tobytes() == v.tobytes() for k, v in sd.items())


def test_v21_upstream_checkpoint_is_refused(upstream_pt, tmp_path, capsys):
    _, sd = upstream_pt
    v21 = dict(sd, no_obj_embed_spatial=np.zeros((1, 8), np.float32))
    v21["obj_ptr_tpos_proj.weight"] = np.zeros((8, 32), np.float32)
    v21["obj_ptr_tpos_proj.bias"] = np.zeros((8,), np.float32)
    path = tmp_path / "sam2.1_tiny.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in v21.items()}}, path)
    with pytest.raises(ConversionError) as e:
        convert_sam2(path, tmp_path / "out", config="tiny")
    msg = str(e.value)
    assert "SAM 2.1" in msg and "no_obj_embed_spatial" in msg and "obj_ptr_tpos_proj.weight" in msg
    assert convert_main(["sam2", str(path), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not supported" in err and not (tmp_path / "out2").exists()


def _saved(out) -> dict[str, np.ndarray]:
    return read_arrays(out / "params", list(saved_arrays(out / "params")))


def test_cli_converts_upstream_pt_and_transformers_dir(upstream_pt, hf_pair, tmp_path, capsys):
    path, sd = upstream_pt
    assert convert_main(["sam2", str(path), str(tmp_path / "up")]) == 0  # config inferred: tiny
    report = json.loads((tmp_path / "up" / "conversion.json").read_text())
    assert report["config_from"] == "tiny" and report["summary"]["mapped_keys"] == len(sd)
    assert "mapped into the model : 368 keys" in capsys.readouterr().out
    got = _saved(tmp_path / "up")
    ours = _build(sam2_config.tiny(), sd, sam2_table.load_state_dict)
    want = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert set(got) == set(want) and all(got[k].tobytes() == want[k].tobytes() for k in want)

    _, hf_dir, _, _, hf_ours = hf_pair
    assert convert_main(["sam2", str(hf_dir), str(tmp_path / "hf")]) == 0  # config from config.json
    got = _saved(tmp_path / "hf")
    want = {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(hf_ours, nnx.Param))}
    assert set(got) == set(want) and all(got[k].tobytes() == want[k].tobytes() for k in want)
    assert json.loads((tmp_path / "hf" / "conversion.json").read_text())["format"] == "sam2-transformers"
    # a preset that does not fit is one error line
    assert convert_main(["sam2", str(hf_dir), str(tmp_path / "bad"), "--config", "tiny"]) == 2
    assert capsys.readouterr().err.count("\n") == 1

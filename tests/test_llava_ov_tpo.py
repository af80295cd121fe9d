"""TPO on LLaVA-OneVision (`TPOConfig.llava_ov`, preset `llava_ov_tpo_tiny`): the assembled TPOModel against the
base model `tpo_jax.llava_ov.model.LlavaOV` with the same weights (which tests/test_llava_ov_model.py holds to
transformers' `LlavaOnevisionForConditionalGeneration`), the task-token rows at the Qwen2 tokenizer's ids, the
temporal head's model features, and the training groups of the new parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpo_jax import config as C
from tpo_jax.llava_ov import model as LM
from tpo_jax.model import TPOModel
from tpo_jax.tokenizer import TokenizerError
from tpo_jax.train.stages import GROUPS, param_group
from tpo_jax.vit import IMAGENET_MEAN, IMAGENET_STD

CFG = C.get_config("llava_ov_tpo_tiny")
T = CFG.task_tokens
VID = CFG.llava_ov.video_token_id
B, L = 2, 40


@pytest.fixture(scope="module")
def tpo():
    model = TPOModel(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)  # LoRA B starts at zero: give it values so the comparisons cover LoRA too
    for path, node in nnx.iter_graph(model):
        if path and path[-1] == "lora_b":
            node[...] = jnp.asarray(rng.normal(0, 0.05, node.shape), node.dtype)
    return model


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 380, (B, L)).astype(np.int32)
    ids[:, 3:3 + CFG.num_visual_tokens] = VID
    ids[0, 25], ids[0, 26], ids[1, 30] = T.box_begin, T.boxes, T.temp
    frames = rng.normal(0, 1, (B, CFG.num_frames, CFG.frame_size, CFG.frame_size, 3)).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(frames)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_preset_shapes():
    big = C.get_config("llava_ov_tpo_7b")
    assert big.arch == "llava_ov" and CFG.arch == "llava_ov" and C.get_config("tiny").arch == "videochat"
    assert (big.llm.hidden_size, big.llm.num_layers, big.llm.vocab_size, big.llm.attention_bias) == (3584, 28, 152128, True)
    assert (big.llava_ov.siglip.hidden_size, big.llava_ov.siglip.num_layers, big.llava_ov.siglip.grid) == (1152, 26, 27)
    assert big.num_visual_tokens == 32 * 14 * 14 + 1 == 6273
    assert big.task_tokens.by_token()["<box_begin>"] == 151648 and big.task_tokens.track_box == 151654
    assert big.heads.temporal.vid_dim == 1152 + 2 and big.heads.temporal.txt_dim == 3584
    assert CFG.num_visual_tokens == 4 * 2 * 2 + 1 and CFG.num_clips == 4 and CFG.vision_width == 32


def test_visual_rows_and_logits_equal_the_base_model(tpo, inputs):
    """Same weights in `LlavaOV`: TPOModel's video rows (ImageNet-normalised frames, mapped to SigLIP's
    normalisation inside) equal the base model's (fed SigLIP-normalised pixels), and so do the logits away from the
    task tokens."""
    ids, frames = inputs
    base = LM.LlavaOV(LM.base_config(CFG), CFG.lora, rngs=nnx.Rngs(5))
    nnx.update(base.vision, nnx.state(tpo.vision))
    nnx.update(base.llm, nnx.state(tpo.llm))
    pixels = np.asarray(frames) * IMAGENET_STD + IMAGENET_MEAN  # what the normalised frames came from
    siglip_frames = jnp.asarray((pixels - 0.5) / 0.5)
    plain = jnp.where((ids == T.boxes) | (ids == T.temp) | (ids == T.box_begin), 7, ids)  # no task-token rows
    ours = tpo.embed_inputs(plain, visual_mask=plain == VID, frames=frames)
    ref = base.embed_inputs(plain, videos=siglip_frames)
    assert _max_diff(ours, ref) < 1e-5
    assert _max_diff(ours[:, 3], base.llm.embed(plain)[:, 3]) > 1e-2  # the rows were written
    logits = tpo(plain, visual_mask=plain == VID, frames=frames).logits
    assert _max_diff(logits, base(plain, videos=siglip_frames).logits) < 1e-4


def test_task_token_rows_use_the_qwen2_ids(tpo, inputs):
    ids, frames = inputs
    emb = tpo.embed_inputs(ids, visual_mask=ids == VID, frames=frames)
    np.testing.assert_array_equal(emb[0, 26], tpo.box_token[...])
    np.testing.assert_array_equal(emb[1, 30], tpo.temporal_token[...])
    np.testing.assert_array_equal(emb[0, 25], tpo.llm.embed(ids)[0, 25])  # <box_begin> keeps its embedding
    out = tpo(ids, visual_mask=ids == VID, frames=frames, heads=("region", "temporal"),
              head_inputs={"region_boxes": jnp.zeros((B, 1, 4)), "temporal_text_ids": jnp.ones((B, 16), jnp.int32),
                           "text_mask": jnp.ones((B, 16)), "vid_mask": jnp.ones((B, CFG.num_clips))})
    np.testing.assert_array_equal(out.heads.region.present[:, 0], [True, False])
    np.testing.assert_array_equal(out.heads.region.positions[0], [26])
    np.testing.assert_array_equal(out.heads.temporal.present, [False, True])
    want = tpo.region_head(out.hidden[0, 26][None])
    assert _max_diff(out.heads.region.boxes[0, 0], want[0]) < 1e-6


def test_temporal_model_features_are_pooled_siglip_frames(tpo, inputs):
    """feature_source 'model': clip k = the mean of frame k's SigLIP features (before the projector), then TEF."""
    _, frames = inputs
    _, feats = tpo.encode_visual(frames, return_features=True)
    pixels = (np.asarray(frames) * IMAGENET_STD + IMAGENET_MEAN - 0.5) / 0.5
    tower = tpo.vision.vision_tower(jnp.asarray(pixels.reshape(-1, *pixels.shape[2:])))
    want_clips = np.asarray(tower).reshape(B, CFG.num_frames, -1, CFG.vision_width).mean(2)
    _, _, video, _ = tpo.temporal_features({"temporal_text_ids": jnp.ones((B, 16), jnp.int32),
                                            "text_mask": jnp.ones((B, 16)), "vid_mask": jnp.ones((B, 4))}, feats)
    assert video.shape == (B, CFG.num_clips, CFG.heads.temporal.vid_dim)
    assert _max_diff(video[..., :-2], want_clips) < 1e-5
    np.testing.assert_allclose(np.asarray(video[0, :, -2:]), [[0, .25], [.25, .5], [.5, .75], [.75, 1]])


def test_every_parameter_has_a_group(tpo):
    groups = {}
    state = nnx.state(tpo, nnx.Param)
    for path, _ in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        groups.setdefault(param_group(keys), set()).add(".".join(map(str, keys[:2])))
    assert set(groups) <= set(GROUPS)
    assert groups["connector"] == {"vision.projector", "vision.image_newline"}
    assert groups["vision"] == {"vision.vision_tower"}
    assert "qformer" not in {p.split(".")[0] for g in groups.values() for p in g}


def test_config_errors_name_the_field():
    with pytest.raises(C.ConfigError, match="llava_ov.video_token_id"):
        C.replace(CFG, **{"llava_ov.video_token_id": 400}).validate()
    with pytest.raises(C.ConfigError, match="task_tokens.temp"):
        C.replace(CFG, **{"task_tokens.temp": 389}).validate()  # = box_begin
    with pytest.raises(C.ConfigError, match="heads.temporal.vid_dim"):
        C.replace(CFG, **{"llava_ov.siglip.hidden_size": 48, "llava_ov.siglip.num_heads": 2}).validate()
    with pytest.raises(C.ConfigError, match="llava_ov.anyres.image_size"):
        C.replace(CFG, **{"llava_ov.siglip.image_size": 40}).validate()


def test_model_tokenizer_checks_the_ids():
    from tpo_jax.model_tokenizer import model_tokenizer
    tok = model_tokenizer(CFG)
    assert tok.added_token_ids == CFG.task_tokens.by_token()
    with pytest.raises(TokenizerError, match="task_tokens"):
        model_tokenizer(C.replace(CFG, task_tokens=C.TaskTokenIds(*range(390, 397))))
    with pytest.raises(TokenizerError, match="llava_ov.tokenizer"):
        model_tokenizer(C.get_config("llava_ov_tpo_7b"))  # the shipped tiny tokenizer has other ids

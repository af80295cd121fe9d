"""The assembled TPO model: embedding assembly, planted task tokens, gathering their hidden states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpo_jax import config as C
from tpo_jax.data.prompts import encode_demo_prompt
from tpo_jax.model import TPOModel, gather_task_hidden, scatter_rows
from tpo_jax.tokenizer import MultimodalTokenizer


@pytest.fixture(scope="module")
def tiny():
    cfg = C.get_config("tiny")
    return cfg, TPOModel(cfg, rngs=nnx.Rngs(0))


def _batch(cfg, seed=0):
    """Two samples of 24 tokens: 8 visual placeholders at 3..10, task tokens planted at known rows."""
    rng = np.random.default_rng(seed)
    n_vis = cfg.num_visual_tokens
    ids = rng.integers(3, 32000, (2, 24)).astype(np.int32)
    visual = np.zeros_like(ids, bool)
    visual[:, 3:3 + n_vis] = True
    ids[visual] = 0
    ids[0, [14, 20]] = C.BOXES_ID
    ids[0, 17] = C.TEMP_ID
    ids[1, 13] = C.TRACKING_ID
    ids[1, 15] = C.TRACK_BOX_ID
    ids[1, 18] = C.TRACK_BOX_ID
    frames = rng.normal(size=(2, cfg.vit.num_frames, cfg.vit.img_size, cfg.vit.img_size, 3)).astype(np.float32)
    boxes = rng.uniform(size=(2, 2, 4)).astype(np.float32)
    return ids, visual, frames, boxes


def test_embedding_assembly(tiny):
    cfg, model = tiny
    ids, visual, frames, boxes = _batch(cfg)
    emb = np.asarray(model.embed_inputs(jnp.asarray(ids), visual_mask=jnp.asarray(visual),
                                        frames=jnp.asarray(frames), track_boxes=jnp.asarray(boxes)))
    table = np.asarray(model.llm.embed_tokens.embedding[...])
    vis = np.asarray(model.encode_visual(jnp.asarray(frames)))
    for b in range(2):
        np.testing.assert_allclose(emb[b, 3:3 + cfg.num_visual_tokens], vis[b], atol=1e-6)
    np.testing.assert_array_equal(emb[0, 14], np.asarray(model.box_token[...]))
    np.testing.assert_array_equal(emb[0, 20], np.asarray(model.box_token[...]))
    np.testing.assert_array_equal(emb[0, 17], np.asarray(model.temporal_token[...]))
    np.testing.assert_array_equal(emb[1, 13], np.asarray(model.track_token[...]))
    # <track_box> rows get loc_encoder(box) in order; checked against a NumPy MLP
    w0, b0 = (np.asarray(v[...]) for v in (model.loc_encoder.layers[0].kernel, model.loc_encoder.layers[0].bias))
    w1, b1 = (np.asarray(v[...]) for v in (model.loc_encoder.layers[1].kernel, model.loc_encoder.layers[1].bias))
    ref = np.maximum(boxes[1] @ w0 + b0, 0) @ w1 + b1
    np.testing.assert_allclose(emb[1, [15, 18]], ref, rtol=1e-5, atol=1e-6)
    # every other row is the plain token embedding
    special = visual | np.isin(ids, [C.BOXES_ID, C.TEMP_ID, C.TRACKING_ID, C.TRACK_BOX_ID])
    np.testing.assert_array_equal(emb[~special], table[ids[~special]])


def test_gathered_hidden_states_are_the_planted_rows(tiny):
    cfg, model = tiny
    ids, visual, frames, boxes = _batch(cfg)
    out = model(jnp.asarray(ids), visual_mask=jnp.asarray(visual), frames=jnp.asarray(frames),
                track_boxes=jnp.asarray(boxes))
    hidden = np.asarray(out.hidden)
    states, pos, valid = gather_task_hidden(out.hidden, jnp.asarray(ids), C.BOXES_ID, num_slots=3)
    np.testing.assert_array_equal(np.asarray(pos[0, :2]), [14, 20])
    np.testing.assert_array_equal(np.asarray(valid), [[True, True, False], [False, False, False]])
    np.testing.assert_array_equal(np.asarray(states[0, 0]), hidden[0, 14])
    np.testing.assert_array_equal(np.asarray(states[0, 1]), hidden[0, 20])
    assert not np.asarray(states[0, 2]).any() and not np.asarray(states[1]).any()
    states, pos, valid = gather_task_hidden(out.hidden, jnp.asarray(ids), C.TRACKING_ID, num_slots=1)
    np.testing.assert_array_equal(np.asarray(valid[:, 0]), [False, True])
    np.testing.assert_array_equal(np.asarray(states[1, 0]), hidden[1, 13])

    # the full model equals the decoder run on the assembled embeddings (final-norm hidden states)
    emb = model.embed_inputs(jnp.asarray(ids), visual_mask=jnp.asarray(visual), frames=jnp.asarray(frames),
                             track_boxes=jnp.asarray(boxes))
    np.testing.assert_allclose(hidden, np.asarray(model.llm(inputs_embeds=emb).hidden), atol=1e-5)


def test_task_token_changes_only_later_positions(tiny):
    """Causality: replacing the box-token vector changes hidden states at and after its row only."""
    cfg, model = tiny
    ids, visual, frames, _ = _batch(cfg)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i, visual_mask=jnp.asarray(visual),
                                                       frames=jnp.asarray(frames)).hidden)
    base = np.asarray(fwd(state, jnp.asarray(ids)))
    other = jax.tree.map(lambda x: x, state)
    other["box_token"][...] = state["box_token"][...] + 1.0
    moved = np.asarray(fwd(other, jnp.asarray(ids)))
    np.testing.assert_array_equal(moved[0, :14], base[0, :14])
    assert np.abs(moved[0, 14:] - base[0, 14:]).max() > 1e-3
    np.testing.assert_array_equal(moved[1], base[1])  # sample 1 has no <boxes>


def test_scatter_rows_keeps_rows_beyond_values():
    emb = jnp.zeros((1, 5, 2))
    mask = jnp.array([[False, True, True, True, False]])
    vals = jnp.array([[[1.0, 1.0], [2.0, 2.0]]])
    got = np.asarray(scatter_rows(emb, mask, vals))
    np.testing.assert_array_equal(got[0], [[0, 0], [1, 1], [2, 2], [0, 0], [0, 0]])


def test_head_outputs_are_the_heads_at_the_planted_rows(tiny):
    """`model(..., heads=...)` runs each head on the hidden state of its own task token (and nothing else):
    region at both `<boxes>` rows, mask at `<tracking>`, CG-DETR at `<temp>` on the batch's features."""
    cfg, model = tiny
    ids, visual, frames, boxes = _batch(cfg)
    assert cfg.heads.temporal.feature_source == "model"  # CG-DETR reads pooled ViT clips + LLM text embeddings
    clips = cfg.vit.num_frames // cfg.vit.tubelet_size
    inputs = {"region_boxes": jnp.zeros((2, 2, 4)), "mask_boxes": jnp.asarray(boxes[:, 0]),
              "temporal_text_ids": jnp.asarray(ids[:, 18:23]), "text_mask": jnp.ones((2, 5), bool),
              "vid_mask": jnp.ones((2, clips), bool)}
    out = model(jnp.asarray(ids), visual_mask=jnp.asarray(visual), frames=jnp.asarray(frames),
                track_boxes=jnp.asarray(boxes), heads=("region", "temporal", "mask"), head_inputs=inputs)
    h = np.asarray(out.hidden)
    region = out.heads.region
    np.testing.assert_array_equal(np.asarray(region.present), [[True, True], [False, False]])
    np.testing.assert_array_equal(np.asarray(region.positions[0]), [14, 20])
    np.testing.assert_allclose(np.asarray(region.boxes[0]), np.asarray(model.region_head(jnp.asarray(h[0, [14, 20]]))),
                               rtol=1e-6, atol=1e-6)
    mask = out.heads.mask
    np.testing.assert_array_equal(np.asarray(mask.present), [False, True])
    prompt, box = model.mask_head(jnp.asarray(h[1:2, 13]))
    np.testing.assert_allclose(np.asarray(mask.prompt[1]), np.asarray(prompt[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mask.box[1]), np.asarray(box[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mask.target), np.asarray(model.sam2.box_prompt(jnp.asarray(boxes[:, 0]))))
    temporal = out.heads.temporal
    np.testing.assert_array_equal(np.asarray(temporal.present), [True, False])
    assert int(temporal.position[0]) == 17
    feats = model.temporal_features(inputs, out.vision_features)
    direct = model.temporal_head(*(f[:1] for f in feats), jnp.asarray(h[0:1, 17]))
    for key in ("pred_spans", "pred_logits", "saliency_scores"):
        np.testing.assert_allclose(np.asarray(temporal.outputs[key][0]), np.asarray(direct[key][0]), rtol=1e-5, atol=1e-5)
    # no heads asked: none run
    assert model(jnp.asarray(ids), visual_mask=jnp.asarray(visual), frames=jnp.asarray(frames)).heads is None
    with pytest.raises(ValueError, match="unknown head"):
        model(jnp.asarray(ids), visual_mask=jnp.asarray(visual), frames=jnp.asarray(frames), heads=("box",))


def test_tiny_forward_on_a_real_prompt(tiny):
    """The shipped tokenizer's demo prompt with the tiny model's visual-token count runs end to end."""
    cfg, model = tiny
    tok = MultimodalTokenizer(num_visual_tokens=cfg.num_visual_tokens)
    prompt = encode_demo_prompt(tok, "What is happening?")
    assert prompt.visual_index.sum() == cfg.num_visual_tokens
    frames = jnp.zeros((1, cfg.vit.num_frames, cfg.vit.img_size, cfg.vit.img_size, 3))
    out = model(jnp.asarray(prompt.input_ids)[None], visual_mask=jnp.asarray(prompt.visual_index)[None],
                frames=frames)
    assert out.logits.shape == (1, len(prompt.input_ids), cfg.llm.vocab_size)
    assert np.isfinite(np.asarray(out.logits)).all()


@pytest.mark.parametrize("changes, field", [
    ({"llm.num_heads": 3}, "llm.num_heads"),
    ({"llm.num_kv_heads": 3}, "llm.num_kv_heads"),
    ({"vit.num_heads": 5}, "vit.num_heads"),
    ({"qformer.encoder_width": 48}, "qformer.encoder_width"),
    ({"dtype": "float8"}, "dtype"),
    ({"lora.targets": ("q_proj", "qkv")}, "lora.targets"),
    ({"llm.vocab_size": 32000}, "task_tokens.box_begin"),  # the vocabulary must hold the task tokens
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(C.ConfigError, match=f"'{field}'"):
        C.replace(C.tiny(), **changes).validate()


def test_unknown_preset_and_field():
    with pytest.raises(C.ConfigError, match="unknown preset 'huge'"):
        C.get_config("huge")
    with pytest.raises(C.ConfigError, match="'llm.num_layer'"):
        C.replace(C.tiny(), **{"llm.num_layer": 2})


def test_presets_have_the_released_shapes():
    cfg = C.get_config("videochat_tpo_7b")
    assert (cfg.llm.vocab_size, cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.num_kv_heads) == (32007, 4096, 32, 8)
    assert (cfg.vit.depth, cfg.vit.width, cfg.vit.num_frames, cfg.vit.ckpt_num_frames) == (23, 1024, 16, 4)
    assert (cfg.qformer.num_queries, cfg.qformer.num_layers, cfg.qformer.vocab_size) == (96, 12, 30523)
    assert cfg.lora.scaling == 2.0 and len(cfg.lora.targets) == 8
    # abstract init: the 7B model's parameter count matches MODEL-SPEC App. B (LLM + LoRA + ViT + LN + ...)
    abstract = nnx.eval_shape(lambda: TPOModel(cfg, rngs=nnx.Rngs(0)))
    counts = jax.tree.map(lambda x: int(np.prod(x.shape)), nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    assert sum(jax.tree.leaves(counts["llm"])) == 7_241_789_440 + 42_520_688
    assert sum(jax.tree.leaves(counts["vision"])) == 290_477_056 + 2_048
    assert sum(jax.tree.leaves(counts["qformer"])) == 182_121_216 + 73_728 + (768 * 4096 + 4096)

"""SAM2 image path (tpo_jax.sam2) against upstream SAM 2 (`sam2` package 1.1.0, v1 settings), f32.

The upstream package is optional: tests that need it are skipped when `import sam2` fails. Install it without
its CUDA extension and WITHOUT its dependencies (they would replace the CPU torch by a CUDA build):
`SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0 hydra-core omegaconf
antlr4-python3-runtime==4.9.3 iopath portalocker` (torchvision is not needed: the predictor's transforms are
replaced by already-normalised inputs).
"""

import numpy as np
import pytest

import jax.numpy as jnp

from tpo_jax.sam2.position import sine_position_encoding

torch = pytest.importorskip("torch")


def _upstream(module: str):
    try:
        return __import__(f"sam2.{module}", fromlist=["_"])
    except Exception as e:  # noqa: BLE001 - any failure to import the optional reference skips
        pytest.skip(f"upstream sam2 not importable: {e}")


def _numpy_sine(h, w, dim, temperature=10000.0):
    """Independent float64 evaluation with explicit loops (normalize=True, scale 2π)."""
    n = dim // 2
    out = np.zeros((h, w, dim))
    for i in range(h):
        for j in range(w):
            y = (i + 1) / (h + 1e-6) * 2 * np.pi
            x = (j + 1) / (w + 1e-6) * 2 * np.pi
            for k in range(n):
                om = temperature ** (2 * (k // 2) / n)
                f = np.sin if k % 2 == 0 else np.cos
                out[i, j, k] = f(y / om)
                out[i, j, n + k] = f(x / om)
    return out


# -------------------------------------------------------------------------------------------- position encoding

@pytest.mark.parametrize("h,w,dim", [(4, 6, 16), (8, 8, 64)])
def test_sine_position_encoding_matches_float64_loops(h, w, dim):
    ours = np.asarray(sine_position_encoding(h, w, dim))
    assert ours.shape == (h, w, dim) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _numpy_sine(h, w, dim), atol=2e-6)


@pytest.mark.parametrize("h,w,dim", [(16, 16, 256), (7, 11, 64), (64, 64, 256)])
def test_sine_position_encoding_matches_upstream(h, w, dim):
    pe = _upstream("modeling.position_encoding")
    ref = pe.PositionEmbeddingSine(dim)(torch.zeros(2, dim, h, w))
    ref = ref[0].permute(1, 2, 0).numpy()
    ours = np.asarray(sine_position_encoding(h, w, dim))
    assert np.abs(ours - ref).max() <= 1e-6


def test_sine_position_encoding_dtype_and_errors():
    assert sine_position_encoding(4, 4, 8, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="even"):
        sine_position_encoding(4, 4, 7)
    with pytest.raises(ValueError, match="normalize"):
        sine_position_encoding(4, 4, 8, normalize=False, scale=1.0)


# ----------------------------------------------------------------------------------------------- reference model

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from tpo_jax.checkpoints.tables import sam2 as sam2_table  # noqa: E402
from tpo_jax.sam2 import config as sam2_config  # noqa: E402
from tpo_jax.sam2.image import Sam2Image  # noqa: E402
from tpo_jax.sam2.mask_decoder import select_masks  # noqa: E402

TOL = 1e-4


def _reference(cfg, seed=0):
    """Upstream modules built as `SAM2Base` builds them for `cfg` (v1 flags, the video predictor's decoder
    overrides), every parameter and buffer perturbed with N(0, 0.1²) noise so nothing is a trivial 0 / 1."""
    pe_mod = _upstream("modeling.position_encoding")
    hieradet = _upstream("modeling.backbones.hieradet")
    ienc = _upstream("modeling.backbones.image_encoder")
    pe_enc = _upstream("modeling.sam.prompt_encoder")
    mdec = _upstream("modeling.sam.mask_decoder")
    tr = _upstream("modeling.sam.transformer")
    t, n, m = cfg.trunk, cfg.neck, cfg.mask_decoder
    torch.manual_seed(seed)
    trunk = hieradet.Hiera(embed_dim=t.embed_dim, num_heads=t.num_heads, stages=t.stages,
                           global_att_blocks=t.global_att_blocks, window_spec=t.window_spec,
                           window_pos_embed_bkg_spatial_size=t.window_pos_embed_bkg_spatial_size)
    neck = ienc.FpnNeck(position_encoding=pe_mod.PositionEmbeddingSine(n.d_model), d_model=n.d_model,
                        backbone_channel_list=list(n.backbone_channel_list),
                        fpn_top_down_levels=list(n.fpn_top_down_levels), fpn_interp_model=n.fpn_interp_model)
    ref = torch.nn.Module()
    ref.image_encoder = ienc.ImageEncoder(trunk=trunk, neck=neck, scalp=n.scalp)
    e = cfg.image_embedding_size
    ref.sam_prompt_encoder = pe_enc.PromptEncoder(embed_dim=cfg.hidden_dim, image_embedding_size=(e, e),
                                                  input_image_size=(cfg.image_size, cfg.image_size),
                                                  mask_in_chans=cfg.mask_in_chans)
    ref.sam_mask_decoder = mdec.MaskDecoder(
        num_multimask_outputs=m.num_multimask_outputs,
        transformer=tr.TwoWayTransformer(depth=m.depth, embedding_dim=cfg.hidden_dim, mlp_dim=m.mlp_dim,
                                         num_heads=m.num_heads),
        transformer_dim=cfg.hidden_dim, iou_head_depth=m.iou_head_depth, iou_head_hidden_dim=m.iou_head_hidden_dim,
        use_high_res_features=m.use_high_res_features, iou_prediction_use_sigmoid=m.iou_prediction_use_sigmoid,
        pred_obj_scores=m.pred_obj_scores, pred_obj_scores_mlp=m.pred_obj_scores_mlp,
        use_multimask_token_for_obj_ptr=m.use_multimask_token_for_obj_ptr,
        dynamic_multimask_via_stability=m.dynamic_multimask_via_stability,
        dynamic_multimask_stability_delta=m.dynamic_multimask_stability_delta,
        dynamic_multimask_stability_thresh=m.dynamic_multimask_stability_thresh)
    ref.no_mem_embed = torch.nn.Parameter(torch.zeros(1, 1, cfg.hidden_dim))
    with torch.no_grad():
        for p in list(ref.parameters()) + list(ref.buffers()):
            p.add_(0.1 * torch.randn_like(p))
    return ref.eval()


def _ref_predict(ref, images, *, points=None, labels=None, boxes=None, mask_input=None, multimask=True):
    """`SAM2ImagePredictor.set_image` + `_predict` on the upstream modules (no torchvision transforms: images are
    already normalised at the model size). Returns NCHW masks, iou, sam tokens, object-score logits."""
    with torch.no_grad():
        out = ref.image_encoder(images)
        fpn = list(out["backbone_fpn"])
        fpn[0] = ref.sam_mask_decoder.conv_s0(fpn[0])
        fpn[1] = ref.sam_mask_decoder.conv_s1(fpn[1])
        embed = fpn[-1] + ref.no_mem_embed.reshape(1, -1, 1, 1)
        coords, labs = [], []
        if boxes is not None:
            coords.append(boxes.reshape(-1, 2, 2))
            labs.append(torch.tensor([[2, 3]], dtype=torch.int).repeat(boxes.shape[0], 1))
        if points is not None:
            coords.append(points)
            labs.append(labels)
        concat = (torch.cat(coords, 1), torch.cat(labs, 1))
        sparse, dense = ref.sam_prompt_encoder(points=concat, boxes=None, masks=mask_input)
        return ref.sam_mask_decoder(image_embeddings=embed, image_pe=ref.sam_prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=multimask, repeat_image=embed.shape[0] != concat[0].shape[0],
                                    high_res_features=fpn[:2]), (out, fpn, embed)


def _ours(cfg, ref) -> Sam2Image:
    model = Sam2Image(cfg, rngs=nnx.Rngs(0))
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    nnx.update(model, sam2_table.load_state_dict(nnx.state(model, nnx.Param), sd))
    return model


def _nhwc(x):
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def _close(ours, ref, what, tol=TOL):
    if isinstance(ref, torch.Tensor):
        ref = ref.detach().numpy()
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    diff = float(np.abs(ours - ref).max())
    assert diff <= tol * max(1.0, float(np.abs(ref).max())), f"{what}: max abs diff {diff}"
    return diff


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = sam2_config.tiny()
    ref = _reference(cfg)
    return cfg, ref, _ours(cfg, ref)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def features(tiny_pair, images):
    """Our image features of `images`, computed once (jitted)."""
    _, ref, ours = tiny_pair
    encode = nnx.jit(lambda m, x, e: m.encode_image(x, e))
    return encode(ours, _nhwc(images), jnp.asarray(ref.no_mem_embed.detach().numpy()))


# ---------------------------------------------------------------------------------------------- per module

def test_bicubic_resize_matches_torch():
    from tpo_jax.sam2.layers import bicubic_resize
    x = torch.randn(1, 5, 7, 7)
    for size in ((16, 16), (9, 20), (256, 256)):
        ref = torch.nn.functional.interpolate(x, size=size, mode="bicubic")
        _close(bicubic_resize(_nhwc(x), size), ref.permute(0, 2, 3, 1).numpy(), f"bicubic {size}", 1e-6)


def test_hiera_and_neck_match_upstream(tiny_pair, images):
    cfg, ref, ours = tiny_pair
    with torch.no_grad():
        ref_stages = ref.image_encoder.trunk(images)
        ref_out = ref.image_encoder(images)
    stages = ours.image_encoder.trunk(_nhwc(images))
    assert len(stages) == len(ref_stages) == 4
    for k, (a, b) in enumerate(zip(stages, ref_stages)):
        _close(a, b.permute(0, 2, 3, 1).numpy(), f"trunk stage {k}")
    fpn, pos = ours.image_encoder.neck(stages)
    assert len(fpn) == len(ref_out["backbone_fpn"]) == 3
    for k in range(3):
        _close(fpn[k], ref_out["backbone_fpn"][k].permute(0, 2, 3, 1).numpy(), f"fpn level {k}")
        _close(pos[k], ref_out["vision_pos_enc"][k].permute(0, 2, 3, 1).numpy(), f"pos level {k}")


def test_prompt_encoder_matches_upstream(tiny_pair):
    cfg, ref, ours = tiny_pair
    pe = ours.sam_prompt_encoder
    g = torch.Generator().manual_seed(2)
    pts = torch.rand(3, 4, 2, generator=g) * 64
    labels = torch.tensor([[1, 0, -1, 1], [2, 3, 1, 0], [0, 0, 1, -1]], dtype=torch.int)
    masks = torch.randn(3, 1, 16, 16, generator=g)
    boxes = torch.rand(3, 4, generator=g) * 64
    with torch.no_grad():
        sparse, dense = ref.sam_prompt_encoder(points=(pts, labels), boxes=None, masks=masks)
        _, no_mask = ref.sam_prompt_encoder(points=(pts, labels), boxes=None, masks=None)
        both, _ = ref.sam_prompt_encoder(points=(pts, labels), boxes=boxes, masks=None)
        dense_pe = ref.sam_prompt_encoder.get_dense_pe()
    _close(pe.embed_points(jnp.asarray(pts.numpy()), jnp.asarray(labels.numpy()), pad=True), sparse.numpy(),
           "sparse points")
    unpadded = pe.embed_points(jnp.asarray(pts.numpy()), jnp.asarray(labels.numpy()), pad=False)
    with_box = jnp.concatenate([unpadded, pe.embed_boxes(jnp.asarray(boxes.numpy()))], axis=1)
    _close(with_box, both.numpy(), "sparse points + boxes")
    _close(pe.dense_embedding(3, _nhwc(masks)), dense.permute(0, 2, 3, 1).numpy(), "dense (mask input)")
    _close(pe.dense_embedding(3), no_mask.permute(0, 2, 3, 1), "dense (no_mask_embed)")
    _close(pe.dense_pe(), dense_pe[0].permute(1, 2, 0).numpy(), "dense pe")


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder_matches_upstream(tiny_pair, multimask):
    cfg, ref, ours = tiny_pair
    d, e = cfg.hidden_dim, cfg.image_embedding_size
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(1, d, e, e, generator=g)
    pe = torch.randn(1, d, e, e, generator=g)
    sparse = torch.randn(3, 3, d, generator=g)
    dense = torch.randn(3, d, e, e, generator=g)
    s0 = torch.randn(1, d // 8, 4 * e, 4 * e, generator=g)
    s1 = torch.randn(1, d // 4, 2 * e, 2 * e, generator=g)
    with torch.no_grad():
        r = ref.sam_mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                 dense_prompt_embeddings=dense, multimask_output=multimask, repeat_image=True,
                                 high_res_features=[s0, s1])
    out = ours.sam_mask_decoder(_nhwc(emb), _nhwc(pe)[0], jnp.asarray(sparse.numpy()), _nhwc(dense),
                                (_nhwc(s0), _nhwc(s1)))
    masks, iou, tokens = select_masks(out, cfg.mask_decoder, multimask)
    _close(masks, r[0].numpy(), "masks")
    _close(iou, r[1].numpy(), "iou")
    _close(tokens, r[2].numpy(), "sam tokens")
    _close(out.object_score_logits, r[3].numpy(), "object score logits")


def test_dynamic_stability_selection_matches_upstream(tiny_pair):
    cfg, ref, _ = tiny_pair
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 4, 8, 8, generator=g) * 3
    logits[0, 0] = 5.0  # stable single mask
    logits[1, 0, :4] = 0.01  # unstable: a quarter of the mask sits inside ±δ
    logits[2, 0] = -1.0  # empty: stability 1 by definition
    iou = torch.rand(4, 4, generator=g)
    with torch.no_grad():
        rm, ri = ref.sam_mask_decoder._dynamic_multimask_via_stability(logits, iou)
    from tpo_jax.sam2.mask_decoder import DecoderOutput
    out = DecoderOutput(jnp.asarray(logits.numpy()), jnp.asarray(iou.numpy()), jnp.zeros((4, 4, 1)), jnp.zeros((4, 1)))
    masks, sel_iou, _ = select_masks(out, cfg.mask_decoder, multimask_output=False)
    np.testing.assert_array_equal(np.asarray(masks), rm.numpy())
    np.testing.assert_array_equal(np.asarray(sel_iou), ri.numpy())


# --------------------------------------------------------------------------------------------- whole image path

@pytest.mark.parametrize("prompt", ["box", "points", "box+point+mask", "one image: points"])
@pytest.mark.parametrize("multimask", [True, False])
def test_image_path_matches_upstream(tiny_pair, images, features, prompt, multimask):
    """Image → mask logits, IoU, SAM tokens, object-score logits; two images with a prompt set each, or one image
    with two prompt sets (the predictor's batched-prompt mode)."""
    cfg, ref, ours = tiny_pair
    if prompt.startswith("one image"):
        images = images[:1]
        features = jax.tree.map(lambda x: x[:1], features)
    g = torch.Generator().manual_seed(5)
    kw = {}
    if "box" in prompt:
        kw["boxes"] = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 3.0, 60.0, 33.0]])
    if "point" in prompt:
        n = 1 if prompt == "box+point+mask" else 2
        kw["points"] = torch.rand(2, n, 2, generator=g) * 64
        kw["labels"] = torch.tensor([[1], [0]] if n == 1 else [[1, 0], [1, 1]], dtype=torch.int)
    if "mask" in prompt:
        kw["mask_input"] = torch.randn(2, 1, 16, 16, generator=g)
    (r_masks, r_iou, r_tok, r_obj), _ = _ref_predict(ref, images, multimask=multimask, **kw)
    ours_kw = {k: (_nhwc(v) if k == "mask_input" else jnp.asarray(v.numpy())) for k, v in kw.items()}
    pred = ours.predict(features, multimask_output=multimask, **ours_kw)
    _close(pred.masks, r_masks.numpy(), "mask logits")
    _close(pred.iou, r_iou.numpy(), "iou")
    _close(pred.sam_tokens, r_tok.numpy(), "sam tokens")
    _close(pred.object_score_logits, r_obj.numpy(), "object score logits")


# ------------------------------------------------------------------------------------------------- conversion

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from tpo_jax.checkpoints.errors import ConversionError  # noqa: E402
from tpo_jax.checkpoints.mapping import Meta, build_export_plan, build_plan  # noqa: E402

# the release index shipped with the package (a copy of the released checkpoint's key names)
_INDEX = Path(__file__).resolve().parents[1] / "tpo_jax" / "assets" / "videochat_tpo" / "model.safetensors.index.json"


def test_release_image_keys_and_shapes_map_to_hiera_l():
    """Every image-path key of the release (names from the index) is exactly what the Hiera-L v1 model exports,
    with the shapes of MODEL-SPEC §9.2, and converts back onto the model built shape-only."""
    release = {k[len("sam."):] for k in json.loads(_INDEX.read_text())["weight_map"] if k.startswith("sam.")}
    image_keys = {k for k in release if sam2_table.is_image_key(k)}
    assert len(image_keys) == 742
    cfg = sam2_config.sam2_hiera_l_v1()
    abstract = nnx.state(nnx.eval_shape(lambda: Sam2Image(cfg, rngs=None)), nnx.Param)
    ours = {".".join(map(str, p)): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(abstract)}
    plan = build_export_plan(ours, {}, sam2_table.image_path(), where="hiera-l")
    shapes = {k: s for j in plan.params for k, s in zip(j.src, j.src_shapes)}
    assert set(shapes) == image_keys
    spec = {"image_encoder.trunk.patch_embed.proj.weight": (144, 3, 7, 7),
            "image_encoder.trunk.pos_embed": (1, 144, 7, 7),
            "image_encoder.trunk.pos_embed_window": (1, 144, 8, 8),
            "image_encoder.trunk.blocks.2.proj.weight": (288, 144),
            "image_encoder.trunk.blocks.47.attn.qkv.weight": (3456, 1152),
            "image_encoder.neck.convs.0.conv.weight": (256, 1152, 1, 1),
            "image_encoder.neck.convs.3.conv.weight": (256, 144, 1, 1),
            "sam_prompt_encoder.point_embeddings.3.weight": (1, 256),
            "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
            "sam_prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2),
            "sam_prompt_encoder.mask_downscaling.6.weight": (256, 16, 1, 1),
            "sam_mask_decoder.mask_tokens.weight": (4, 256),
            "sam_mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight": (128, 256),
            "sam_mask_decoder.output_upscaling.0.weight": (256, 64, 2, 2),
            "sam_mask_decoder.output_upscaling.3.weight": (64, 32, 2, 2),
            "sam_mask_decoder.conv_s0.weight": (32, 256, 1, 1),
            "sam_mask_decoder.conv_s1.weight": (64, 256, 1, 1),
            "sam_mask_decoder.pred_obj_score_head.layers.2.weight": (1, 256)}
    for k, s in spec.items():
        assert shapes[k] == s, k
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    # the whole release's SAM2 is 224,430,386 values; the memory path and SAM2Base parameters are the rest
    assert 200_000_000 < n_params < 224_430_386
    # and the release's names (with `sam.`) go back onto the model through the same rules
    source = {f"sam.{k}": Meta(s, np.float32, "index") for k, s in shapes.items()}
    build_plan(source, sam2_table.image_path(src="sam."), ours, where="index")


def test_round_trip_is_bit_exact_and_errors_name_the_key(tiny_pair):
    cfg, ref, ours = tiny_pair
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    image_sd = {k: v for k, v in sd.items() if sam2_table.is_image_key(k)}
    assert len(image_sd) == len(sd) - 1  # everything but no_mem_embed
    back = sam2_table.export_state_dict(nnx.state(ours, nnx.Param))
    assert set(back) == set(image_sd)
    for k, v in image_sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
    # the release layout: `sam.` prefix, extra keys of the memory path ignored
    prefixed = {f"sam.{k}": v for k, v in sd.items()} | {"sam.memory_encoder.out_proj.weight": np.zeros(1)}
    state = sam2_table.load_state_dict(nnx.state(ours, nnx.Param), prefixed, src="sam.")
    again = sam2_table.export_state_dict(state)
    assert all(np.array_equal(again[k], v) for k, v in image_sd.items())
    bad = dict(image_sd)
    del bad["sam_mask_decoder.conv_s0.bias"]
    with pytest.raises(ConversionError, match="conv_s0"):
        sam2_table.load_state_dict(nnx.state(ours, nnx.Param), bad)
    bad = dict(image_sd) | {"sam_mask_decoder.iou_token.weight": np.zeros((2, cfg.hidden_dim), np.float32)}
    with pytest.raises(ConversionError, match="iou_token"):
        sam2_table.load_state_dict(nnx.state(ours, nnx.Param), bad)


def test_config_validation_and_presets():
    cfg = sam2_config.sam2_hiera_l_v1()
    assert cfg.trunk.channel_list == (1152, 576, 288, 144) and cfg.trunk.q_pool_blocks == (2, 8, 44)
    assert [b for b, s in enumerate(cfg.trunk.block_specs()) if s[3] == 0] == [23, 33, 43]
    assert cfg.image_embedding_size == 64 and cfg.hidden_dim == 256
    from tpo_jax.config import ConfigError
    with pytest.raises(ConfigError, match="sam2.neck.backbone_channel_list"):
        sam2_config.Sam2Config(neck=sam2_config.NeckConfig(backbone_channel_list=(1, 2, 3, 4))).validate()
    with pytest.raises(ConfigError, match="sam2.trunk.window_spec"):
        sam2_config.Sam2Config(trunk=sam2_config.HieraConfig(window_spec=(8, 4, 16))).validate()
    with pytest.raises(ConfigError, match="sam2.dtype"):
        sam2_config.Sam2Config(dtype="int8").validate()


def test_bfloat16_compute_runs_close_to_float32(tiny_pair, images):
    """The compute-dtype option: same parameters, bf16 activations; mask logits agree with f32 to bf16 precision."""
    cfg, ref, ours = tiny_pair
    import dataclasses
    m16 = Sam2Image(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(m16, nnx.state(ours, nnx.Param))
    x = _nhwc(images)
    box = jnp.asarray([[4.0, 6.0, 40.0, 50.0], [10.0, 3.0, 60.0, 33.0]])
    run = nnx.jit(lambda m, x, b: m(x[:1], boxes=b[:1]))
    p32, p16 = run(ours, x, box), run(m16, x, box)
    assert p16.masks.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(p16.masks)))
    scale = float(jnp.abs(p32.masks).max())
    assert float(jnp.abs(p16.masks - p32.masks).max()) < 0.1 * scale

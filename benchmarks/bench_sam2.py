"""SAM2 video propagation, frames per second: our `Sam2Video.propagate` against the upstream PyTorch predictor.

Same process, same weights, same frames, CPU, float32. Ours: `Sam2Video.propagate` (frame 0 prompted with a box,
the rest as one `lax.scan`) under `nnx.jit`; its first call (trace + compile + one run) is timed separately and
the compile time reported is that first call minus the median timed call. PyTorch: the upstream `sam2` 1.1.0
`SAM2VideoPredictor`, `init_state` + `add_new_points_or_box` (the same box) on frame 0 + `propagate_in_video`,
built with the release's flags at our sizes (as tests/test_sam2_video.py builds it; the weights are random and
go into our model through `tpo_jax.checkpoints.tables.sam2.load_state_dict`). Each side is warmed up once,
then `--repeats` timed runs alternate between the two; frames/s = frames / median seconds. Both use the same
number of threads (`--threads`, default: the cores, which is what XLA:CPU uses). Per config it also prints the
max abs difference of the low-resolution mask logits of the two (the check that both did the same work).

Configs: "tiny" = `tpo_jax.sam2.config.tiny()` (64 px); "small" = Hiera-T sizes (upstream `sam2_hiera_t.yaml`:
embed 96, 1 head, stages (1, 2, 7, 2)) with the release's mask decoder and memory path, at `--small-size` px.

    python benchmarks/bench_sam2.py                                   # tiny and small, 8 frames, 3 repeats
    python benchmarks/bench_sam2.py --configs small --frames 16 --repeats 5 --json /tmp/sam2.json
    python benchmarks/bench_sam2.py --configs small --profile         # + image encoder vs the rest, per frame

`--profile` adds, per config, the per-frame time of the image encoder alone and of one tracked frame (encoder
+ memory attention + heads + memory encoder) on both sides, each as its own jitted / no-grad call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from unittest import mock

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_llm_vs_torch.py
os.environ.setdefault("TQDM_DISABLE", "1")  # propagate_in_video's progress bar

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from tpo_jax.checkpoints.tables import sam2 as sam2_table
from tpo_jax.sam2 import config as sam2_config
from tpo_jax.sam2.config import HieraConfig, MaskDecoderConfig, NeckConfig, Sam2Config
from tpo_jax.sam2.memory_config import Sam2MemoryConfig
from tpo_jax.sam2.video import Sam2Video

from sam2 import sam2_video_predictor as up_video  # noqa: E402  (pip sam2==1.1.0, see tests/test_sam2_image.py)
from sam2.modeling.backbones import hieradet, image_encoder as up_ienc
from sam2.modeling.memory_attention import MemoryAttention as UpMemoryAttention, MemoryAttentionLayer
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder as UpMemoryEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam import mask_decoder as up_mdec, prompt_encoder as up_penc, transformer as up_tr
from sam2.modeling.sam2_utils import MLP as UpMLP


# --------------------------------------------------------------------------------------------------- configs

def small(image_size: int = 256) -> Sam2Config:
    """Hiera-T (upstream `sam2_hiera_t.yaml`): embed 96, 1 head, stages (1, 2, 7, 2), global blocks (5, 7, 9),
    windows (8, 4, 14, 7); FPN neck (768, 384, 192, 96) → 256; the release's mask decoder (8 heads, MLP 2048)
    and memory path (4 memory-attention layers, 64-d memory, 7 memory frames, 16 object pointers)."""
    return Sam2Config(
        trunk=HieraConfig(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                          window_spec=(8, 4, 14, 7), window_pos_embed_bkg_spatial_size=(7, 7)),
        neck=NeckConfig(d_model=256, backbone_channel_list=(768, 384, 192, 96)),
        mask_decoder=MaskDecoderConfig(),
        image_size=image_size,
        memory=Sam2MemoryConfig.release(dropout=0.0),
    ).validate()


# ------------------------------------------------------------------------------------------ the two models

def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (LayerNorm weights and the 1e-6 layer scales too), scaled by 1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            fan = p.shape[1] * int(np.prod(p.shape[2:])) if p.ndim >= 2 else 4
            p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan))


def _image_modules(cfg: Sam2Config, seed: int = 0) -> torch.nn.Module:
    """Upstream image encoder, prompt encoder and mask decoder built as `SAM2Base` builds them for `cfg` (the
    video predictor's decoder overrides), every parameter and buffer perturbed by N(0, 0.1²)."""
    t, n, m = cfg.trunk, cfg.neck, cfg.mask_decoder
    torch.manual_seed(seed)
    trunk = hieradet.Hiera(embed_dim=t.embed_dim, num_heads=t.num_heads, stages=t.stages,
                           global_att_blocks=t.global_att_blocks, window_spec=t.window_spec,
                           window_pos_embed_bkg_spatial_size=t.window_pos_embed_bkg_spatial_size)
    neck = up_ienc.FpnNeck(position_encoding=PositionEmbeddingSine(n.d_model), d_model=n.d_model,
                           backbone_channel_list=list(n.backbone_channel_list),
                           fpn_top_down_levels=list(n.fpn_top_down_levels), fpn_interp_model=n.fpn_interp_model)
    ref = torch.nn.Module()
    ref.image_encoder = up_ienc.ImageEncoder(trunk=trunk, neck=neck, scalp=n.scalp)
    e = cfg.image_embedding_size
    ref.sam_prompt_encoder = up_penc.PromptEncoder(embed_dim=cfg.hidden_dim, image_embedding_size=(e, e),
                                                   input_image_size=(cfg.image_size, cfg.image_size),
                                                   mask_in_chans=cfg.mask_in_chans)
    ref.sam_mask_decoder = up_mdec.MaskDecoder(
        num_multimask_outputs=m.num_multimask_outputs,
        transformer=up_tr.TwoWayTransformer(depth=m.depth, embedding_dim=cfg.hidden_dim, mlp_dim=m.mlp_dim,
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


def _memory_modules(cfg: Sam2Config) -> torch.nn.Module:
    """Upstream memory encoder / attention and the SAM2Base-owned memory parameters, with upstream's names."""
    e, a, t = cfg.memory.encoder, cfg.memory.attention, cfg.memory.tokens
    g = cfg.image_embedding_size
    mem = torch.nn.Module()
    mem.memory_encoder = UpMemoryEncoder(
        out_dim=e.out_dim, in_dim=e.in_dim,
        mask_downsampler=MaskDownSampler(embed_dim=e.in_dim, kernel_size=e.mask_kernel, stride=e.mask_stride,
                                         padding=e.mask_padding, total_stride=e.mask_total_stride),
        fuser=Fuser(CXBlock(e.in_dim, kernel_size=e.fuser_kernel, padding=e.fuser_kernel // 2,
                            layer_scale_init_value=e.layer_scale_init, use_dwconv=True), e.fuser_layers),
        position_encoding=PositionEmbeddingSine(num_pos_feats=e.out_dim, normalize=True, scale=None,
                                                temperature=int(e.pos_temperature)))
    rope = dict(rope_theta=a.rope_theta, feat_sizes=[g, g], embedding_dim=a.d_model, num_heads=a.num_heads,
                downsample_rate=a.downsample_rate, dropout=a.dropout)
    layer = MemoryAttentionLayer(
        activation="relu", dim_feedforward=a.ffn_dim, dropout=a.dropout, pos_enc_at_attn=False,
        self_attention=up_tr.RoPEAttention(**rope), d_model=a.d_model, pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
        cross_attention=up_tr.RoPEAttention(rope_k_repeat=True, kv_in_dim=a.kv_dim, **rope))
    mem.memory_attention = UpMemoryAttention(d_model=a.d_model, pos_enc_at_input=True, layer=layer,
                                             num_layers=a.num_layers)
    c, m = t.hidden_dim, t.mem_dim
    mem.maskmem_tpos_enc = torch.nn.Parameter(torch.zeros(t.num_maskmem, 1, 1, m))
    mem.no_mem_pos_enc = torch.nn.Parameter(torch.zeros(1, 1, c))
    mem.no_obj_ptr = torch.nn.Parameter(torch.zeros(1, c))
    mem.obj_ptr_proj = UpMLP(c, c, c, t.obj_ptr_mlp_layers)
    mem.mask_downsample = torch.nn.Conv2d(1, 1, kernel_size=4, stride=4)
    _randomize(mem, 1)
    return mem.eval()


def reference_predictor(cfg: Sam2Config, *, object_bias: float = 2.0) -> up_video.SAM2VideoPredictor:
    """An upstream `SAM2VideoPredictor` with the release's flags (v1 `sam2_hiera_l.yaml` + the video-predictor
    overrides) and `cfg`'s sizes, random weights. The object-score head's last bias is shifted by
    `object_bias` so that every frame has the object (real masks, as in a tracked clip)."""
    img, mem = _image_modules(cfg), _memory_modules(cfg)
    t, md = cfg.memory.tokens, cfg.mask_decoder
    pred = up_video.SAM2VideoPredictor(
        image_encoder=img.image_encoder, memory_attention=mem.memory_attention, memory_encoder=mem.memory_encoder,
        num_maskmem=t.num_maskmem, image_size=cfg.image_size, backbone_stride=cfg.backbone_stride,
        sigmoid_scale_for_mem_enc=cfg.memory.encoder.sigmoid_scale,
        sigmoid_bias_for_mem_enc=cfg.memory.encoder.sigmoid_bias,
        binarize_mask_from_pts_for_mem_enc=True, use_mask_input_as_output_without_sam=True,
        directly_add_no_mem_embed=True, use_high_res_features_in_sam=True, multimask_output_in_sam=True,
        multimask_min_pt_num=0, multimask_max_pt_num=1, multimask_output_for_tracking=True,
        use_multimask_token_for_obj_ptr=True, iou_prediction_use_sigmoid=True, use_obj_ptrs_in_encoder=True,
        max_obj_ptrs_in_encoder=t.max_obj_ptrs, add_tpos_enc_to_obj_ptrs=False,
        only_obj_ptrs_in_the_past_for_eval=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True, use_mlp_for_obj_ptr_proj=True,
        sam_mask_decoder_extra_args=dict(dynamic_multimask_via_stability=md.dynamic_multimask_via_stability,
                                         dynamic_multimask_stability_delta=md.dynamic_multimask_stability_delta,
                                         dynamic_multimask_stability_thresh=md.dynamic_multimask_stability_thresh),
        fill_hole_area=0, non_overlap_masks=False, clear_non_cond_mem_around_input=False)
    pred.sam_prompt_encoder, pred.sam_mask_decoder = img.sam_prompt_encoder, img.sam_mask_decoder
    pred.obj_ptr_proj, pred.mask_downsample = mem.obj_ptr_proj, mem.mask_downsample
    with torch.no_grad():
        for name in ("maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr"):
            getattr(pred, name).copy_(getattr(mem, name))
        pred.no_mem_embed.copy_(img.no_mem_embed)
        pred.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(object_bias)
    return pred.eval()


def ours_from(cfg: Sam2Config, pred: torch.nn.Module) -> Sam2Video:
    model = Sam2Video(cfg, rngs=nnx.Rngs(0))
    sd = {k: v.detach().numpy() for k, v in pred.state_dict().items()}
    nnx.update(model, sam2_table.load_state_dict(nnx.state(model, nnx.Param), sd))
    return model


# ------------------------------------------------------------------------------------------------- the runs

def clip(n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) normalised frames: a bright square moving over noise, so the masks change."""
    g = torch.Generator().manual_seed(3)
    x = 0.3 * torch.randn(n, 3, size, size, generator=g)
    u = size / 64
    for t in range(n):
        y0, x0 = int((10 + 2 * t) * u) % (size // 2), int((12 + 1.5 * t) * u) % (size // 2)
        x[t, :, y0:y0 + int(20 * u), x0:x0 + int(22 * u)] += 2.0
    return x


def run_reference(pred, frames: torch.Tensor, box_px: list[float]) -> np.ndarray:
    """`init_state` + box on frame 0 + `propagate_in_video` (the frames given already normalised at the model
    size, which is also the video size). Returns the low-res mask logits (T, 4E, 4E)."""
    n, s = frames.shape[0], frames.shape[-1]
    with mock.patch.object(up_video, "load_video_frames", lambda **kw: (frames, s, s)), torch.inference_mode():
        state = pred.init_state(video_path="<frames>")
        pred.add_new_points_or_box(state, frame_idx=0, obj_id=0, box=box_px)
        for _ in pred.propagate_in_video(state):
            pass
    out = state["output_dict_per_obj"][0]
    per_frame = [out["cond_frame_outputs"][0]] + [out["non_cond_frame_outputs"][t] for t in range(1, n)]
    return np.stack([o["pred_masks"][0, 0].numpy() for o in per_frame])


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_config(name: str, cfg: Sam2Config, args, env: dict) -> dict:
    t0 = time.perf_counter()
    pred = reference_predictor(cfg)
    ours = ours_from(cfg, pred)
    build_s = time.perf_counter() - t0
    s = cfg.image_size
    frames = clip(args.frames, s)
    box = [0.2, 0.25, 0.6, 0.8]  # normalised xyxy
    box_px = [v * s for v in box]
    frames_j = jnp.asarray(frames.permute(0, 2, 3, 1).numpy())[None]
    prompt = ours.box_prompt(jnp.asarray([box]))
    propagate = nnx.jit(lambda m, f, p: m.propagate(f, p))

    def run_ours():
        out = propagate(ours, frames_j, prompt)
        jax.block_until_ready(out)
        return out

    first_s, out = _timed(run_ours)  # trace + compile + one run
    low_ours = np.asarray(out.masks[0])
    _, low_ref = _timed(lambda: run_reference(pred, frames, box_px))  # warm-up
    diff = float(np.max(np.abs(low_ours.astype(np.float64) - low_ref.astype(np.float64))))
    agree = float(np.mean((low_ours > 0) == (low_ref > 0)))
    times = {"tpo_jax": [], "torch": []}
    for _ in range(args.repeats):
        times["tpo_jax"].append(_timed(run_ours)[0])
        times["torch"].append(_timed(lambda: run_reference(pred, frames, box_px))[0])
    sec = {k: statistics.median(v) for k, v in times.items()}
    fps = {k: args.frames / v for k, v in sec.items()}
    row = {"config": name, "image_size": s, "frames": args.frames, "repeats": args.repeats,
           "tpo_jax_fps": round(fps["tpo_jax"], 2), "torch_fps": round(fps["torch"], 2),
           "ratio_ours_over_torch": round(fps["tpo_jax"] / fps["torch"], 3),
           "tpo_jax_s": round(sec["tpo_jax"], 3), "torch_s": round(sec["torch"], 3),
           "tpo_jax_runs_s": [round(t, 3) for t in times["tpo_jax"]],
           "torch_runs_s": [round(t, 3) for t in times["torch"]],
           "compile_s": round(first_s - sec["tpo_jax"], 2), "first_call_s": round(first_s, 2),
           "build_s": round(build_s, 2), "max_abs_diff_low_res_logits": diff,
           "max_abs_low_res_logit": float(np.max(np.abs(low_ref))), "mask_sign_agreement": agree,
           "foreground_fraction": round(float(np.mean(low_ref > 0)), 3), **env}
    if args.profile:
        row["profile"] = profile(cfg, pred, ours, frames, frames_j, prompt, args.repeats)
    return row


def profile(cfg, pred, ours, frames, frames_j, prompt, repeats: int) -> dict:
    """Per-frame seconds of the pieces, each its own call on one frame (median of `repeats` after a warm-up):
    the image encoder alone (ours: `encode_image`; upstream: `forward_image`) and one tracked frame with a
    full memory bank (ours: `track_frame`; upstream: `track_step` on frame 1, memory from the clip's
    propagation, plus its memory encoding as `_run_single_frame_inference` does)."""
    def med(fn):
        fn()
        return statistics.median(_timed(fn)[0] for _ in range(repeats))

    encode = nnx.jit(lambda m, x: m.encode_image(x))
    frame = frames_j[:, 1]
    track = nnx.jit(lambda m, st, f, t: m.track_frame(st, f, t))
    state, _ = nnx.jit(lambda m, f, p: m.init_frame(f, p))(ours, frames_j[:, 0], prompt)
    for t in range(1, frames_j.shape[1]):  # fill the bank as the propagation does
        state, _ = track(ours, state, frames_j[:, t], jnp.int32(t))
    t_last = jnp.int32(frames_j.shape[1])
    ours_enc = med(lambda: jax.block_until_ready(encode(ours, frame)))
    ours_track = med(lambda: jax.block_until_ready(track(ours, state, frame, t_last)))

    n, s = frames.shape[0], frames.shape[-1]
    img = frames[1:2]
    with torch.inference_mode():
        ref_enc = med(lambda: pred.forward_image(img))
        with mock.patch.object(up_video, "load_video_frames", lambda **kw: (frames, s, s)):
            st = pred.init_state(video_path="<frames>")
        pred.add_new_points_or_box(st, frame_idx=0, obj_id=0, box=[0.2 * s, 0.25 * s, 0.6 * s, 0.8 * s])
        for _ in pred.propagate_in_video(st):
            pass
        out_dict = st["output_dict_per_obj"][0]

        def one_tracked():  # `_run_single_frame_inference` on frame n (a new index, full bank), features uncached
            st["cached_features"] = {}
            pred._run_single_frame_inference(
                inference_state=st, output_dict=out_dict, frame_idx=n - 1, batch_size=1,
                is_init_cond_frame=False, point_inputs=None, mask_inputs=None, reverse=False, run_mem_encoder=True)

        ref_track = med(one_tracked)
    return {"tpo_jax_encode_image_s": round(ours_enc, 4), "tpo_jax_track_frame_s": round(ours_track, 4),
            "tpo_jax_rest_s": round(ours_track - ours_enc, 4),
            "torch_forward_image_s": round(ref_enc, 4), "torch_track_frame_s": round(ref_track, 4),
            "torch_rest_s": round(ref_track - ref_enc, 4)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,small", help="comma-separated: tiny, small")
    p.add_argument("--small-size", type=int, default=256, help="image size of the small config (multiple of 32)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA:CPU uses the cores)")
    p.add_argument("--profile", action="store_true", help="also time the image encoder and one tracked frame")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    env = {"device": jax.devices()[0].device_kind, "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
           "torch": torch.__version__, "dtype": "float32"}
    configs = {"tiny": lambda: sam2_config.tiny(), "small": lambda: small(args.small_size)}
    rows = []
    for name in args.configs.split(","):
        row = bench_config(name, configs[name](), args, env)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

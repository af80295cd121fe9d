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
import sys
import time
from unittest import mock

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_llm_vs_torch.py
os.environ.setdefault("TQDM_DISABLE", "1")  # propagate_in_video's progress bar

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from tpo_jax.sam2 import config as sam2_config
from tpo_jax.sam2.config import HieraConfig, MaskDecoderConfig, NeckConfig, Sam2Config
from tpo_jax.sam2.memory_config import Sam2MemoryConfig

from sam2 import sam2_video_predictor as up_video  # noqa: E402  (pip sam2==1.1.0, see tests/test_sam2_image.py)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from test_sam2_video import _ours, _predictor  # noqa: E402  (the parity tests' reference builders)


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
# The upstream predictor at our sizes and our model with its weights: the builders of tests/test_sam2_video.py.
reference_predictor, ours_from = _predictor, _ours


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

"""Data-path cost: how to store clips (part a) and samples/s of decode + resize + tokenize (part b).

    python benchmarks/bench_data.py                 # both parts
    python benchmarks/bench_data.py --part a --reps 20
    python benchmarks/bench_data.py --part b --samples 64

Part a, per stored example of a 16-frame 224² clip: bytes, and the per-sample cost of turning the stored
bytes into normalised frames (single thread, median of `--reps`):
  * jpeg16  — 16 JPEG frames (quality 90) sampled and resized at build time: decode + normalise;
  * mp4     — the source mp4 as is: demux, decode (seeking to key frames), "middle"-sample, resize, normalise;
  * mp4_224 — the 16 sampled 224² frames re-encoded as one small mp4 (libx264 crf 18): decode + normalise;
  * jpeg16_q95 — as jpeg16 at quality 95; mp4_decode_only — the mp4 row without resize and normalise.
Sources are synthetic (a panned smooth texture plus a moving object, libx264
crf 23, key frame every 2 s as in typical web video). Also reports the mean pixel error of each stored form
against decoding the source directly.

Part b: samples/s of the pipeline's full per-example path (`tpo_jax.data.pipeline.Prepare`: read the stored example,
decode + sample + resize + normalise, templates + tokenization into the fixed-shape example of the 7B config:
16 x 224², 96 visual tokens, seq_len 256) in a multiprocessing pool of 1 and 2 workers, per storage form
(16 JPEG frames, or the source mp4 bytes). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from tpo_jax.data.video import (decode_jpeg_frames, decode_video, encode_jpeg_frames, encode_mp4, normalize,
                        read_video_frames, resize_frames)

SIZE = 224
NUM_FRAMES = 16
QUESTION = "What is happening in the video?"


def source_frames(seconds: float, fps: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A panned smooth texture (two octaves of upsampled noise, features scaled with the resolution) with a
    moving red square: (T, h, w, 3) uint8, about the bitrate of ordinary web video at crf 23."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    t = int(seconds * fps)
    th, tw = h + t // 2 + 1, w + t + 1
    tex = np.zeros((th, tw, 3), np.float32)
    for scale, amp in ((h / 12, 50.0), (h / 48, 25.0)):
        small = rng.integers(0, 256, (int(th / scale) + 2, int(tw / scale) + 2, 3), dtype=np.uint8)
        big = np.asarray(Image.fromarray(small).resize((tw, th), Image.Resampling.BICUBIC), np.float32)
        tex += amp * (big - big.mean()) / big.std()
    tex = np.clip(128 + tex, 0, 255).astype(np.uint8)
    frames = np.empty((t, h, w, 3), np.uint8)
    side = h // 5
    for i in range(t):
        frames[i] = tex[i // 2:i // 2 + h, i:i + w]
        x, y = int((w - side) * (0.5 + 0.4 * np.sin(i / 20))), int((h - side) * (0.5 + 0.4 * np.cos(i / 27)))
        frames[i, y:y + side, x:x + side] = (230, 60, 40)
    return frames


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_examples(sources: list[tuple[str, float, int, int, int]]) -> dict[str, dict[str, bytes | list[bytes]]]:
    """Per source: the original mp4, the 16 sampled 224² frames as JPEGs, and as a small mp4."""
    out = {}
    for name, seconds, fps, h, w in sources:
        mp4 = encode_mp4(source_frames(seconds, fps, h, w), fps, crf=23, keyint=2 * fps)
        sampled, *_ = read_video_frames(mp4, NUM_FRAMES)
        clip = resize_frames(sampled, SIZE)
        out[name] = {"mp4": mp4, "jpeg16": encode_jpeg_frames(clip, quality=90),
                     "jpeg16_q95": encode_jpeg_frames(clip, quality=95), "mp4_decode_only": mp4,
                     "mp4_224": encode_mp4(clip, 1.0, crf=18), "reference": clip}
    return out


def decode_stored(kind: str, data) -> np.ndarray:
    if kind.startswith("jpeg16"):
        return normalize(decode_jpeg_frames(data))
    if kind == "mp4_decode_only":  # demux + decode + sample, no resize / normalise (cost breakdown)
        return read_video_frames(data, NUM_FRAMES)[0]
    if kind == "mp4_224":
        return normalize(read_video_frames(data, NUM_FRAMES)[0])
    return decode_video(data, NUM_FRAMES, SIZE).frames


def part_a(examples, reps: int) -> None:
    for name, ex in examples.items():
        ref = normalize(ex["reference"])
        for kind in ("jpeg16", "jpeg16_q95", "mp4_224", "mp4", "mp4_decode_only"):
            data = ex[kind]
            nbytes = sum(len(b) for b in data) if isinstance(data, list) else len(data)
            dt = median_time(lambda: decode_stored(kind, data), reps)
            if kind == "mp4_decode_only":
                print(json.dumps({"part": "a", "source": name, "stored": kind, "bytes": nbytes,
                                  "ms_per_sample": round(dt * 1e3, 2)}), flush=True)
                continue
            err = float(np.abs(decode_stored(kind, data) - ref).mean() * 0.226 * 255)  # ≈ uint8 levels
            print(json.dumps({"part": "a", "source": name, "stored": kind, "bytes": nbytes,
                              "ms_per_sample": round(dt * 1e3, 2), "mean_abs_err_levels": round(err, 2)}), flush=True)


class _Stored:
    """A one-example random-access source: the stored example is decoded on every read, as a built dataset is."""

    def __init__(self, example):
        self.example = example

    def __len__(self):
        return 1

    def __getitem__(self, index):
        from tpo_jax.data.record_codec import example_to_record
        return example_to_record(self.example)


def make_prepare(kind: str, ex) -> object:
    """The pipeline's per-example transform (`tpo_jax.data.pipeline.Prepare`) over one stored example: read the
    stored record, `load_media`, `build_example` (templates + tokenization) at 16 x 224², 96 visual tokens."""
    from tpo_jax.data.record_codec import record_to_example
    from tpo_jax.data.pipeline import DataConfig, Prepare, example_spec
    from tpo_jax.data.records import Record
    from tpo_jax.config import get_config

    if kind == "jpeg16":
        media, storage = {"frames": ex["reference"], "fps": 1.6}, "jpeg"
    else:
        media, storage = {"video": ex["mp4"]}, "video"
    record = Record(id="bench", task="conversation", turns=[(QUESTION, "A red square moves over a texture.")],
                    **media)
    spec = example_spec(DataConfig(seq_len=256), get_config("videochat_tpo_7b"))
    return Prepare({"conversation": _Stored(record_to_example(record, storage))}, spec, seed=0)


_PREPARE = None


def _one_sample(position: int) -> int:
    out = _PREPARE.example("conversation", 0, position)
    if not isinstance(out, dict):
        raise RuntimeError(f"bad example: {out}")
    return int(out["attention_mask"].sum())


def part_b(examples, samples: int, workers_list) -> None:
    global _PREPARE
    ctx = mp.get_context("fork")
    for name, ex in examples.items():
        for kind in ("jpeg16", "mp4"):
            _PREPARE = make_prepare(kind, ex)  # inherited by the forked workers
            for workers in workers_list:
                with ctx.Pool(workers) as pool:
                    pool.map(_one_sample, range(2 * workers), chunksize=1)  # warm-up: tokenizer, codecs
                    t0 = time.perf_counter()
                    pool.map(_one_sample, range(samples), chunksize=4)
                    dt = time.perf_counter() - t0
                print(json.dumps({"part": "b", "source": name, "stored": kind, "workers": workers,
                                  "samples_per_s": round(samples / dt, 1),
                                  "per_worker": round(samples / dt / workers, 1),
                                  "load_avg_1min": round(os.getloadavg()[0], 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["a", "b", "ab"], default="ab")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    sources = [("10s_360p_30fps", 10, 30, 360, 640), ("60s_360p_30fps", 60, 30, 360, 640),
               ("10s_720p_30fps", 10, 30, 720, 1280)]
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                      "size": SIZE, "frames": NUM_FRAMES}), flush=True)
    examples = build_examples(sources)
    if "a" in args.part:
        part_a(examples, args.reps)
    if "b" in args.part:
        part_b({k: v for k, v in examples.items() if k != "60s_360p_30fps"}, args.samples, args.workers)
    print(json.dumps({"load_avg_end": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()

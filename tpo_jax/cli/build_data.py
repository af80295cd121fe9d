"""`tpo-build-data`: build a TPO dataset as ArrayRecord files in TFDS layout (`python -m tpo_jax.cli.build_data`).

Subcommands `synthetic` (the synthetic dataset) and `records` (annotation files); prints one line per split
written (stderr) and the dataset directory (stdout). The work lives in `tpo_jax.data.builders`; see
docs/data_pipeline.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from tpo_jax.cli.common import add_debug_flag, guarded
from tpo_jax.config import get_config
from tpo_jax.data.builders import TpoRecords, TpoSynthetic, build
from tpo_jax.data.record_codec import STORAGES
from tpo_jax.data.records import MediaBudget
from tpo_jax.data.synthetic import get_synthetic_config


def main(argv=None) -> int:
    """`tpo-build-data synthetic|records --data-dir DIR ...`: build and print the dataset directory."""
    p = argparse.ArgumentParser(prog="tpo-build-data",
                                description="Build a TPO dataset as ArrayRecord files (TFDS layout).")
    add_debug_flag(p)
    sub = p.add_subparsers(dest="kind", required=True)
    syn = sub.add_parser("synthetic", help="the synthetic dataset (tpo_jax.data.synthetic)")
    syn.add_argument("--preset", default="default", help="SyntheticConfig preset: default, easy, hard")
    syn.add_argument("--size", type=int, help="frame side in pixels (default: the preset's)")
    syn.add_argument("--num-frames", type=int, help="frames per clip (default: the preset's)")
    syn.add_argument("--train", type=int, default=10000, help="train records per task")
    syn.add_argument("--validation", type=int, default=256, help="validation records per task")
    syn.add_argument("--seed", type=int, default=0)
    rec = sub.add_parser("records", help="annotation files read by tpo_jax.data.formats")
    rec.add_argument("--inputs", required=True,
                     help='JSON file: a list of {"path", "format", "split", "media_root", "options"}')
    rec.add_argument("--model-config", help="tpo_jax.config preset whose vit.num_frames / vit.img_size the "
                     "sampled frames take (default: 16 frames of 224x224)")
    rec.add_argument("--frames", type=int, help="sampled_jpeg: frames per clip (overrides --model-config)")
    rec.add_argument("--frame-size", type=int, help="sampled_jpeg: frame side in pixels (overrides --model-config)")
    rec.add_argument("--allow-outside-media-root", action="store_true",
                     help="let media paths leave their input's media_root (absolute paths, '..', symlinks)")
    rec.add_argument("--max-pixels", type=int, help="media budget: pixels per frame / image (default 40,000,000)")
    rec.add_argument("--max-seconds", type=float, help="media budget: seconds per video (default 21,600)")
    for q in (syn, rec):
        q.add_argument("--data-dir", required=True)
        q.add_argument("--storage", choices=STORAGES, help="media storage (synthetic: jpeg, records: sampled_jpeg)")
        q.add_argument("--max-bad-fraction", type=float, default=0.05)
    args = p.parse_args(argv)
    return guarded("tpo-build-data", lambda: _run(args), args.debug)


@contextlib.contextmanager
def _quiet_tfds():
    """Our log lines (one per split, on stderr) instead of TFDS's progress bars and INFO logs; the builders'
    logger is put back as it was afterwards (an in-process caller keeps its own logging)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415
    tfds.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    ours = logging.getLogger("tpo_jax.data.builders")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tpo-build-data: %(message)s"))
    level, propagate = ours.level, ours.propagate
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.setLevel(level)
        ours.propagate = propagate


def _run(args) -> int:
    with _quiet_tfds():
        return _build(args)


def _build(args) -> int:
    common = dict(data_dir=args.data_dir, max_bad_fraction=args.max_bad_fraction)
    if args.storage:
        common["storage"] = args.storage
    if args.kind == "synthetic":
        overrides = {k: v for k, v in (("size", args.size), ("num_frames", args.num_frames)) if v is not None}
        builder = TpoSynthetic(get_synthetic_config(args.preset, **overrides),
                               sizes={"train": args.train, "validation": args.validation}, seed=args.seed, **common)
    else:
        model_cfg = get_config(args.model_config) if args.model_config else None
        limits = {k: v for k, v in (("max_pixels", args.max_pixels), ("max_seconds", args.max_seconds)) if v is not None}
        common["budget"] = MediaBudget(allow_outside_media_root=args.allow_outside_media_root, **limits)
        with open(args.inputs, encoding="utf-8") as fh:
            builder = TpoRecords(json.load(fh), num_frames=args.frames, size=args.frame_size, model_config=model_cfg,
                                 **common)
    print(build(builder))
    return 0


if __name__ == "__main__":
    sys.exit(main())

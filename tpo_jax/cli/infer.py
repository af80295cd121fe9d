"""`tpo-infer`: ask a TPO model about a video or an image; print the answer, write JSON, draw the heads' outputs.

    tpo-infer --checkpoint runs/tiny --video clip.mp4 --prompt "Where is the red square?"
    tpo-infer --checkpoint /ckpt/tpo7b --video clip.mp4 --prompt "When does he jump?" --temporal-features f.npz
    tpo-infer --checkpoint runs/tiny --video clip.mp4 --prompt "Track the square." --overlay out.gif
    tpo-infer --checkpoint runs/tiny --batch prompts.jsonl --output answers.json
    tpo-infer --checkpoint runs/tiny --video clip.mp4 --chat
    tpo-infer --checkpoint runs/tiny --example region:3 --overlay region.png   # a validation example + truth

--checkpoint: a `tpo-train` work directory (config.json + <stage>/checkpoints; the latest checkpoint of the
last stage, or --stage / --step) or a `tpo-convert videochat` output (conversion.json + params/), loaded by
`tpo_jax.train.load`; both architectures (VideoChat-TPO, LLaVA-OV-TPO: `model.llava_ov` set). Media are decoded
at the model's frames and frame size (`cfg.num_frames`, `cfg.frame_size`), the prompt built with its tokenizer
(`model_tokenizer`). VideoChat: the released demo's prompt (MODEL-SPEC §4.3, three BOS; `--template library` for
the `generate_answer` form; chat turns use the library form, the only one with history). LLaVA-OV: ChatML with
the default system message (`--template` does not apply), an image as its frame repeated.
--batch: one JSON object per line, {"prompt": ..., "video" | "image": path, "temporal_features": path, "id": ...},
paths relative to the file; missing media default to --video / --image. The JSON (--output, default tpo-infer.json;
"-" prints it instead of the text) holds per prompt the answer, token ids, the region boxes in pixels, the temporal
spans in seconds with scores and the per-clip saliency, the mask head's SAM2 prompt and box. Exit status: 0 done, 2
bad input (one line; --debug shows the traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from tpo_jax.cli.common import add_debug_flag, guarded, one_line

EXIT_BAD_INPUT = 2


class InferError(ValueError):
    """Bad command-line input."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpo-infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="tpo-train work directory or converted checkpoint directory")
    p.add_argument("--stage", default=None, help="work directory: stage whose checkpoint to load (default: last)")
    p.add_argument("--step", type=int, default=None, help="work directory: checkpoint step (default: latest)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override (model.dtype=bfloat16); a change of parameter shapes is an error")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--video", help="video file (the model's frames, sampled as the demo, MODEL-SPEC §8.2)")
    media.add_argument("--image", help="image file")
    ask = p.add_mutually_exclusive_group(required=True)
    ask.add_argument("--prompt", help="the question")
    ask.add_argument("--batch", help="JSON-lines file of prompts")
    ask.add_argument("--chat", action="store_true", help="multi-turn chat in the terminal (/reset, /quit)")
    ask.add_argument("--example", metavar="TASK:N", help="the N-th validation example of TASK (region, temporal, "
                     "mask, mc) of a work directory's data, its own prompt and media; the overlay adds its "
                     "ground truth (white)")
    p.add_argument("--temporal-features", help="precomputed temporal-head features (.npz / .safetensors; "
                                               "format in tpo_jax.generate.heads)")
    p.add_argument("--template", choices=("demo", "library"), default="demo")
    p.add_argument("--output", default="tpo-infer.json", help="JSON results ('-': print the JSON, not the text)")
    p.add_argument("--overlay", help="draw boxes, spans and saliency: out.png (middle frame) or out.gif (all)")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--strategy", choices=("greedy", "sample", "beam"), default="greedy")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--num-beams", type=int, default=4)
    g.add_argument("--side-step", choices=("released", "training"), default="released",
                   help="task-token side step: the released demo's, or <box_begin><boxes> as in training")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seed", type=int, default=0, help="sampling rng")
    add_debug_flag(p)
    return p


# --- requests ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Item:
    prompt: str
    media: str | None
    is_video: bool
    features: str | None = None
    id: str | None = None


def load_media(cfg, item: Item):
    """Decoded media (tpo_jax.data.video.Media, as `load_media` decodes a record's video / image); an image given
    as a video is an error."""
    from tpo_jax.data.video import IMAGE_EXTENSIONS, decode_image, decode_video  # noqa: PLC0415
    if item.is_video and item.media.lower().endswith(IMAGE_EXTENSIONS):
        raise InferError(f"{item.media}: an image where a video is needed; pass it with --image")
    if item.is_video:
        media = decode_video(item.media, cfg.num_frames, cfg.frame_size)
    else:
        media = decode_image(item.media, cfg.frame_size)
    if item.is_video and cfg.num_frames > 1 and len(set(media.indices.tolist())) == 1:
        raise InferError(f"{item.media}: holds a single frame, an image where a video is needed; pass it with "
                         f"--image")
    if item.features and not item.is_video:
        raise InferError(f"{item.features}: temporal features need a video, but the media {item.media} is an image")
    return media


def make_request(cfg, tok, item: Item, media, template: str, history=()):
    """The request of one question in the model's prompt form (`tpo_jax.data.generation_prompt.encode_question`)."""
    from tpo_jax.data.generation_prompt import encode_question, query_ids  # noqa: PLC0415
    from tpo_jax.generate import GenerationRequest, load_temporal_features  # noqa: PLC0415
    times = media.timestamps if item.is_video else None
    ids = encode_question(cfg, tok, item.prompt, is_video=item.is_video, frame_times=times, history=history,
                          template=template)
    feats = load_temporal_features(item.features, cfg) if item.features else None
    return GenerationRequest(ids.input_ids, ids.visual_mask, media.frames, frame_size=media.source_size,
                             duration=media.duration, query_ids=query_ids(tok, item.prompt),
                             temporal_features=feats, track_frames=lambda: track_frames(cfg, item, media))


def source_frames(item: Item, media):
    """Every frame of the source as (T, H, W, 3) uint8 (one for an image): what SAM2 tracks over."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from tpo_jax.data.video import read_video_frames  # noqa: PLC0415
    if item.is_video:
        return read_video_frames(item.media, max(1, round(media.duration * media.fps)))[0]
    with Image.open(item.media) as img:
        return np.asarray(img.convert("RGB"))[None]


def track_frames(cfg, item: Item, media):
    """SAM2 inputs of every source frame (read only when an answer tracks)."""
    from tpo_jax.sam2.frames import sam2_frames  # noqa: PLC0415
    return sam2_frames(source_frames(item, media), cfg.sam2.image_size)


def read_batch(path: str, args) -> list[Item]:
    """The items of a JSON-lines file (see the module docstring)."""
    base = os.path.dirname(os.path.abspath(path))
    rel = lambda x: x if x is None or os.path.isabs(x) else os.path.join(base, x)  # noqa: E731
    items = []
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise InferError(f"--batch {path}: cannot read ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise InferError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str) or ("video" in d and "image" in d):
            raise InferError(f"{path}:{n}: expected an object with a string 'prompt' and at most one of "
                             f"'video' / 'image'")
        video, image = rel(d.get("video")), rel(d.get("image"))
        if video is None and image is None:
            video, image = args.video, args.image
        if video is None and image is None:
            raise InferError(f"{path}:{n}: no 'video' or 'image', and no --video / --image default")
        items.append(Item(d["prompt"], video or image, video is not None,
                          rel(d.get("temporal_features")) or args.temporal_features, str(d.get("id", n))))
    if not items:
        raise InferError(f"--batch {path}: no prompts")
    return items


# --- output --------------------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    return "[" + ", ".join(f"{x:.1f}" for x in v) + "]"


def describe(item: Item, res) -> str:
    lines = [f"Q: {item.prompt}", f"A: {res.text}"]
    lines += [f"   box: {_fmt(r['box'])} px" for r in res.region]
    if res.temporal:
        t = res.temporal
        lines.append(f"   span: {t['span'][0]:.1f}-{t['span'][1]:.1f} s (score {t['score']:.3f}); saliency over "
                     f"{len(t['saliency'])} clips")
    if res.track:
        lines.append(f"   track: box {_fmt(res.track['box'])} px, SAM2 prompt {len(res.track['prompt'])}x"
                     f"{len(res.track['prompt'][0])}")
        if "mask_boxes" in res.track:
            boxes = res.track["mask_boxes"]
            lines.append(f"   masks: {len(boxes)} frames ({sum(b is not None for b in boxes)} with the object), "
                         f"prompt from {res.track['prompt_source']}")
    lines += [f"   note: {n}" for n in res.notes]
    return "\n".join(lines)


def record(item: Item, media, res) -> dict:
    """One result as JSON; a tracked answer's per-frame masks (every source frame, in order) as COCO RLE."""
    out = {"id": item.id, "prompt": item.prompt,
           "media": {"path": item.media, "kind": "video" if item.is_video else "image",
                     "frame_size": list(media.source_size), "duration": media.duration,
                     "frame_times": [float(t) for t in media.timestamps]},
           "answer": res.text, **{k: v for k, v in res.to_json().items() if k != "text"}}
    if "track_masks" in res.raw:
        from tpo_jax.data.rle import rle_encode  # noqa: PLC0415
        out["track"] = {**out["track"], "masks": [rle_encode(m) for m in res.raw["track_masks"]]}
    return out


def overlay(path: str, item: Item, media, res) -> None:
    """The sampled frames (the model's view) with the heads' outputs; a tracked answer's masks of those frames."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from tpo_jax.data.video import read_video_frames  # noqa: PLC0415
    from tpo_jax.generate.overlay import draw_overlay  # noqa: PLC0415
    if item.is_video:
        frames = read_video_frames(item.media, len(media.timestamps))[0]
    else:
        with Image.open(item.media) as img:
            frames = np.asarray(img.convert("RGB"))[None]
    masks = res.raw.get("track_masks")
    if masks is not None:
        masks = masks[np.clip(np.asarray(media.indices), 0, len(masks) - 1)] if item.is_video else masks[:1]
    draw_overlay(path, frames, res, media.timestamps if item.is_video else (), media.duration, masks=masks)


# --- a validation example of the work directory's data -------------------------------------------------------------

EXAMPLE_SIZE = 256  # the example's frames are drawn at this width (the tiny model's are 32 pixels)


def run_example(args, source, gen, tok, out) -> int:
    """`--example TASK:N`: the N-th evaluation row of TASK, generated as `tpo-eval --mode generate` does (its
    prompt, frames and `<track_box>` boxes; spans in normalised time), printed with its ground truth."""
    import numpy as np  # noqa: PLC0415
    from tpo_jax.data.pipeline import eval_batches  # noqa: PLC0415
    from tpo_jax.data.video import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415
    from tpo_jax.generate import Generator  # noqa: PLC0415
    from tpo_jax.heads.box_ops import span_cw_to_xx  # noqa: PLC0415
    from tpo_jax.train.evaluate_generate import generation_config, make_requests  # noqa: PLC0415
    from tpo_jax.train.run_config import load_run_config  # noqa: PLC0415
    task, _, index = args.example.partition(":")
    if source.info["kind"] != "workdir" or task not in ("region", "temporal", "mask", "mc") or not index.isdigit():
        raise InferError(f"--example {args.example}: expected TASK:N with TASK one of region, temporal, mask, mc "
                         f"and a tpo-train work directory as --checkpoint")
    run = load_run_config(os.path.join(args.checkpoint, "config.json"))
    n = int(index)
    rows = eval_batches(run.data, source.cfg, split=run.eval.split, num_examples=n + 1, tasks=(task,))[task]
    batch = rows[n // len(rows[0]["labels"])]
    row = n % len(batch["labels"])
    request = make_requests(batch)[row]
    t, h, w, _ = request.frames.shape
    k = max(1, EXAMPLE_SIZE // w)
    request = dataclasses.replace(request, frame_size=(h * k, w * k))
    gen_cfg = dataclasses.replace(generation_config(len(batch["labels"][row])), max_new_tokens=args.max_new_tokens)
    res = Generator(source.load(), gen_cfg, tok)([request])[0]
    prompt = tok.decode([int(i) for i, v in zip(request.input_ids, request.visual_mask) if not v])
    truth = {}
    if task == "region":
        truth["boxes"] = [list(b * [w * k, h * k, w * k, h * k]) for b, v in
                          zip(batch["region_boxes"][row], batch["region_valid"][row]) if v]
    if task == "mask":
        truth["boxes"] = [list(batch["mask_boxes"][row] * [w * k, h * k, w * k, h * k])]
    if task == "temporal":
        spans = np.asarray(span_cw_to_xx(batch["spans"][row]))
        truth["spans"] = [list(map(float, sp)) for sp, v in zip(spans, batch["span_valid"][row]) if v]
    if task == "mc":
        truth["answer"] = int(batch["mc_answer"][row])
    print(f"example {task}:{n} (validation)", file=out)
    print(describe(Item(prompt.strip(), None, True), res), file=out)
    shown = {key: np.round(v, 2).tolist() if key != "answer" else v for key, v in truth.items()}
    print(f"   truth: {json.dumps(shown)}{' (spans in normalised time)' if task == 'temporal' else ''}", file=out)
    if args.output != "-":
        with open(args.output, "w") as f:
            json.dump({"checkpoint": source.info, "example": args.example, "prompt": prompt,
                       "truth": truth, "result": res.to_json()}, f, indent=1)
    if args.overlay:
        from tpo_jax.generate.overlay import draw_overlay  # noqa: PLC0415
        frames = np.clip(request.frames * IMAGENET_STD + IMAGENET_MEAN, 0, 1) * 255
        frames = np.repeat(np.repeat(frames.astype(np.uint8), k, axis=1), k, axis=2)
        draw_overlay(args.overlay, frames, res, [(i + 0.5) / t for i in range(t)], 1.0, truth)
    return 0


# --- main ----------------------------------------------------------------------------------------------------------

def run(args, out=None) -> int:
    out = out or sys.stdout
    if args.overlay and os.path.splitext(args.overlay)[1].lower() not in (".png", ".gif"):
        raise InferError(f"--overlay {args.overlay}: must end in .png or .gif")
    if not args.batch and not args.example and not (args.video or args.image):
        raise InferError("give the media: --video FILE or --image FILE")
    from tpo_jax.train.load import resolve_checkpoint  # noqa: PLC0415
    source = resolve_checkpoint(args.checkpoint, args.overrides, args.stage, args.step)
    cfg = source.cfg
    import jax  # noqa: PLC0415
    from tpo_jax.generate import GenerationConfig, Generator  # noqa: PLC0415
    from tpo_jax.generate.settings import check_context  # noqa: PLC0415
    from tpo_jax.model_tokenizer import model_tokenizer  # noqa: PLC0415
    tok = model_tokenizer(cfg)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, strategy=args.strategy, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                           side_step=args.side_step).for_tokenizer(tok).validate()
    rng = jax.random.key(args.seed) if args.strategy == "sample" else None
    if args.example:
        return run_example(args, source, gen, tok, out)
    if args.batch:
        items = read_batch(args.batch, args)
    else:
        items = [Item(args.prompt or "", args.video or args.image, args.video is not None, args.temporal_features)]
    media = [load_media(cfg, it) for it in items]  # bad media and feature files fail before the model loads
    first = [make_request(cfg, tok, it, m, args.template) for it, m in zip(items, media)]
    check_context([len(r.input_ids) for r in first], gen.max_new_tokens, cfg.llm.max_position)
    generator = Generator(source.load(), gen, tok)
    doc = {"checkpoint": source.info, "generation": dataclasses.asdict(gen), "results": []}
    text_out = out if args.output != "-" else sys.stderr

    def emit(item, m, res):
        print(describe(item, res), file=text_out)
        doc["results"].append(record(item, m, res))
        if args.output != "-":
            with open(args.output, "w") as f:
                json.dump(doc, f, indent=1)

    if args.chat:
        chat(generator, cfg, tok, items[0], media[0], args, rng, emit)
    else:
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(first):  # one batch per frame shape (videos and images apart)
            groups.setdefault(r.frames.shape, []).append(i)
        results = [None] * len(items)
        for idx in groups.values():
            for k in range(0, len(idx), args.batch_size):
                part = idx[k:k + args.batch_size]
                for i, res in zip(part, generator([first[i] for i in part], rng)):
                    results[i] = res
        for it, m, res in zip(items, media, results):
            emit(it, m, res)
        if args.overlay:
            overlay(args.overlay, items[0], media[0], results[0])
    if args.output == "-":
        print(json.dumps(doc, indent=1), file=out)
    return 0


def chat(generator, cfg, tok, item: Item, media, args, rng, emit) -> None:
    """Read questions from stdin until EOF or /quit; /reset forgets the history."""
    history: list[tuple[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return
        question = line.strip()
        if not question:
            continue
        if question == "/reset":
            history.clear()
            continue
        turn = dataclasses.replace(item, prompt=question, id=str(len(history) + 1))
        (res,) = generator([make_request(cfg, tok, turn, media, "library", history)], rng)
        emit(turn, media, res)
        if args.overlay:
            overlay(args.overlay, turn, media, res)
        history.append((question, res.text))


def _own_bad_input() -> tuple[type[BaseException], ...]:
    """Bad-input errors of this command's layers that `tpo_jax.cli.common.guarded` does not know."""
    from tpo_jax.data.records import RecordError  # noqa: PLC0415  (MediaError is one)
    from tpo_jax.generate import GenerationError  # noqa: PLC0415
    from tpo_jax.tokenizer import TokenizerError  # noqa: PLC0415
    return InferError, RecordError, GenerationError, TokenizerError


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import logging  # noqa: PLC0415
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on read-only managers

    def body() -> int:
        try:
            return run(args)
        except Exception as e:  # noqa: BLE001
            if args.debug or not isinstance(e, _own_bad_input()):
                raise
            print(f"tpo-infer: error: {one_line(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return guarded("tpo-infer", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())

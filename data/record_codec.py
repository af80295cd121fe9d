"""A `Record` <-> its stored form: the TFDS feature dict the ArrayRecord datasets hold, media encoded as bytes.

TFDS 4.9 builds `array_record` datasets without TensorFlow as long as every feature is a
`Tensor` / `Scalar` / `Text` / `Sequence` of those (the `Image` / `Video` features need TF to encode),
so media are encoded here (JPEG per frame with PIL, MP4 with PyAV, or the source file's bytes) and
stored as byte strings (`features()`). `record_to_example` is what the builders (`tpo_jax.data.builders`)
write; `example_to_record` is what the readers (`tpo_jax.data.stored_source`) give back.

| media of the record            | stored as (option `storage`)                                                     |
|--------------------------------|----------------------------------------------------------------------------------|
| frames (synthetic data)        | "jpeg" (one JPEG per frame), "sampled_jpeg", "video" (MP4), "raw" (uint8)      |
| video file / bytes             | "sampled_jpeg", "video" (the file's bytes), "jpeg" (every frame), "raw"          |

"sampled_jpeg" decodes each clip once at build time with `tpo_jax.data.video` (MODEL-SPEC §8.2 "middle"
sampling of `num_frames` frames, bicubic resize to `size`) and stores those frames as JPEG (`quality`)
with their source times (`frame_times`), the source fps and duration: 7-32x cheaper to read than the
source mp4 and ~20 kB per frame whatever the source (docs/benchmarks.md, "Data path"); the sampling,
frame count and size are then fixed. Images are stored as their file bytes, whatever the option; frame
folders (MeViS / SA-V JPEG layout) as their JPEG files, or, with "sampled_jpeg", sampled like a video.
Media that cannot be read raise `MediaError` (a `RecordError`), so the builders skip and count the record;
every medium is decoded (or, for "video" storage, opened, indexed and its sampled frames decoded) at build time
under a `MediaBudget`, so a record whose media would fail or blow the budget at training time is a bad record
of the build instead.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Mapping, Sequence

import av
import numpy as np
import tensorflow_datasets as tfds

from tpo_jax.data.records import DEFAULT_BUDGET, MediaBudget, Record, RecordError, as_record_error
from tpo_jax.data.video import (MediaError, _read_image, decode_jpeg_frames, encode_jpeg_frames, encode_mp4,
                                list_frame_files, read_video_frames, resize_frames, sample_indices)

VERSION = "1.1.0"  # 1.1.0: "sampling" (sampled_jpeg storage) and "instruction" features
STORAGES = ("sampled_jpeg", "jpeg", "video", "raw")
DEFAULT_NUM_FRAMES, DEFAULT_SIZE = 16, 224  # MODEL-SPEC §8.2 (the 7B model's vit.num_frames, vit.img_size)
_F32, _I64, _BOOL = np.float32, np.int64, np.bool_


def features() -> tfds.features.FeaturesDict:
    """The stored form of a Record (TF-free feature types only)."""
    f = tfds.features
    blob = f.Tensor(shape=(), dtype=np.object_)
    return f.FeaturesDict({
        "id": f.Text(), "task": f.Text(),
        "media_kind": f.Text(),  # "frames_jpeg" | "frames_raw" | "video" | "image"
        "media": f.Sequence(blob),  # JPEG per frame, or one element: MP4 / image bytes / raw uint8 frames
        "frames_shape": f.Tensor(shape=(4,), dtype=_I64),  # (T, H, W, 3) of raw frames, else zeros
        "fps": f.Scalar(dtype=_F32),  # 0: unknown
        "question": f.Text(), "answer": f.Text(),
        "turn_questions": f.Sequence(f.Text()), "turn_answers": f.Sequence(f.Text()),
        "options": f.Sequence(f.Text()), "mc_answer": f.Scalar(dtype=_I64),
        "duration": f.Scalar(dtype=_F32),  # -1: none
        "spans": f.Tensor(shape=(None, 2), dtype=_F32), "saliency": f.Tensor(shape=(None,), dtype=_F32),
        "clip_seconds": f.Scalar(dtype=_F32),
        "boxes": f.Tensor(shape=(None, 4), dtype=_F32), "box_frames": f.Tensor(shape=(None,), dtype=_I64),
        "track_boxes": f.Tensor(shape=(None, 4), dtype=_F32), "track_visible": f.Tensor(shape=(None,), dtype=_BOOL),
        "track_masks": f.Text(),  # JSON list of COCO RLEs, "" for none
        # frames sampled at build time: JSON {"fps", "frame_times", "source_duration"} (exact float64; tfds
        # stores float features as float32), "" for none
        "sampling": f.Text(),
        "instruction": f.Text(),
    })


# --- media --------------------------------------------------------------------------------------------------------


def _read_bytes(path: str, what: str, rid: str, budget: MediaBudget = DEFAULT_BUDGET) -> bytes:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise MediaError(f"record {rid!r}: cannot read {what} {path} ({e.strerror or e})", "media_missing") from None
    if size > budget.max_bytes:
        raise MediaError(f"record {rid!r}: {what} {path} of {size} bytes is over the media budget "
                         f"max_bytes={budget.max_bytes}", "media_budget")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise MediaError(f"record {rid!r}: cannot read {what} {path} ({e.strerror or e})") from None
    if not data:
        raise MediaError(f"record {rid!r}: {what} {path} is empty")
    return data


def _open(src: str | bytes):
    return av.open(io.BytesIO(src) if isinstance(src, bytes) else src)


def _all_video_frames(src: str | bytes, rid: str, budget: MediaBudget = DEFAULT_BUDGET) -> tuple[np.ndarray, float]:
    """Every frame of a video, RGB uint8 (T, H, W, 3), and its fps; corrupt streams raise MediaError; all the
    frames together must fit `budget.max_decoded_bytes` (checked from the frame count and size first)."""
    name = f"record {rid!r}"
    frames16, _, _, duration, fps = read_video_frames(src, 16, name=name, budget=budget)  # the training-time checks
    count = int(round(duration * fps))
    h, w = frames16.shape[1:3]
    if count * h * w * 3 > budget.max_decoded_bytes:
        raise MediaError(f"{name}: storing all {count} frames of {w}x{h} decodes {count * h * w * 3} bytes, over the "
                         f"media budget max_decoded_bytes={budget.max_decoded_bytes} (use sampled_jpeg storage)",
                         "media_budget")
    try:
        with _open(src) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = []
            for f in container.decode(stream):
                if (f.height, f.width) != (h, w) or len(frames) >= count:
                    raise MediaError(f"{name}: frame {len(frames)} of {f.width}x{f.height} (stream {w}x{h}, "
                                     f"{count} frames)")
                frames.append(f.to_ndarray(format="rgb24"))
    except av.FFmpegError as e:
        raise MediaError(f"{name}: decoding failed ({e})") from e
    return np.stack(frames), fps


def _sampling(fps: float, times, duration: float | None) -> str:
    return json.dumps({"fps": float(fps), "frame_times": [float(t) for t in np.asarray(times, np.float64)],
                       "source_duration": None if duration is None else float(duration)})


def _sampled(frames: np.ndarray, times: np.ndarray, duration: float, fps: float, size, quality: int) -> dict[str, Any]:
    """Media fields of frames sampled at build time: resized uint8 frames as JPEG + their source times."""
    resized = resize_frames(np.ascontiguousarray(frames, np.uint8), size)
    return {"media_kind": "frames_jpeg", "media": encode_jpeg_frames(resized, quality),
            "frames_shape": np.zeros(4, np.int64), "fps": float(fps), "sampling": _sampling(fps, times, duration)}


def _store_sampled(record: Record, num_frames: int, size, quality: int,
                   budget: MediaBudget = DEFAULT_BUDGET) -> dict[str, Any]:
    """"sampled_jpeg": what `tpo_jax.data.video.load_media` would decode ("middle" sampling), stored as JPEG."""
    tag = f"record {record.id!r}"
    src = record.video
    if record.frames is not None:
        frames = np.asarray(record.frames)
        fps = float(record.fps or 1.0)
        idx, times = sample_indices(len(frames), num_frames, fps)
        return _sampled(frames[idx], times, len(frames) / fps, fps, size, quality)
    if isinstance(src, str) and os.path.isdir(src):  # frame folder at record.fps, like tpo_jax.data.video.decode_frame_dir
        files = list_frame_files(src)
        if not files:
            raise MediaError(f"{tag}: frame folder {src} has no images")
        if not record.fps:
            raise MediaError(f"{tag}: {src}: a frame folder needs the record's fps")
        idx, times = sample_indices(len(files), num_frames, record.fps)
        unique = np.unique(idx)
        if len(files) > budget.max_frames:
            raise MediaError(f"{tag}: frame folder {src} holds {len(files)} frames, over the media budget "
                             f"max_frames={budget.max_frames}", "media_budget")
        decoded = decode_jpeg_frames([_read_bytes(files[i], "frame", record.id, budget) for i in unique],
                                     name=f"{tag}: {src}", budget=budget)
        frames = decoded[np.searchsorted(unique, idx)]
        return _sampled(frames, times, len(files) / record.fps, record.fps, size, quality)
    name = f"{tag}: {src if isinstance(src, str) else f'<{len(src)} bytes>'}"
    frames, _, times, duration, fps = read_video_frames(src, num_frames, name=name, budget=budget)
    return _sampled(frames, times, duration, fps, size, quality)


def _store_frames(frames: np.ndarray, storage: str, fps: float, quality: int) -> tuple[str, list[bytes], tuple]:
    frames = np.ascontiguousarray(frames, np.uint8)
    if storage == "raw":
        return "frames_raw", [frames.tobytes()], frames.shape
    if storage == "video" and len(frames) > 1:
        return "video", [encode_mp4(frames, fps or 1.0)], (0, 0, 0, 0)
    return "frames_jpeg", encode_jpeg_frames(frames, quality), (0, 0, 0, 0)


def encode_media(record: Record, storage: str, quality: int = 90, *, num_frames: int = DEFAULT_NUM_FRAMES,
                 size: int | Sequence[int] = DEFAULT_SIZE, budget: MediaBudget | None = None) -> dict[str, Any]:
    """The media fields of a stored record (MediaError when the media cannot be read or is over `budget`).
    `num_frames` and `size` are used by "sampled_jpeg" only. Images are decoded here (header size first)."""
    budget = budget or DEFAULT_BUDGET
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    fps = float(record.fps or 0.0)
    zero = (0, 0, 0, 0)
    if record.frame_times is not None:  # already sampled (a stored record): keep its frames and times
        if record.frames is None:
            raise MediaError(f"record {record.id!r}: frame_times without frames")
        return {"media_kind": "frames_jpeg", "media": encode_jpeg_frames(record.frames, quality),
                "frames_shape": np.zeros(4, np.int64), "fps": fps,
                "sampling": _sampling(fps, record.frame_times, record.source_duration)}
    single = record.image is not None or (record.frames is not None and len(record.frames) == 1)
    if storage == "sampled_jpeg" and not single:
        return _store_sampled(record, num_frames, size, quality, budget)
    if storage == "sampled_jpeg":  # images (and one-frame clips) stay one frame: file bytes / one JPEG
        storage = "jpeg"
    if record.frames is not None:
        kind, media, shape = _store_frames(record.frames, storage, fps, quality)
    elif record.image is not None:
        img = record.image
        data = img if isinstance(img, bytes) else _read_bytes(img, "image", record.id, budget)
        _read_image(img, f"record {record.id!r}: {img if isinstance(img, str) else f'<{len(img)} bytes>'}",
                    budget)  # decodes under the budget (and checks the name): a bomb / corrupt image is a bad record
        kind, media, shape = "image", [data], zero
    elif record.video is not None:
        src = record.video
        if isinstance(src, str) and os.path.isdir(src):  # frame folder: keep its image files
            files = list_frame_files(src)
            if not files:
                raise MediaError(f"record {record.id!r}: frame folder {src} has no images")
            media = [_read_bytes(f, "frame", record.id, budget) for f in files]
            decode_jpeg_frames(media, name=f"record {record.id!r}: {src}", budget=budget)
            kind, shape = "frames_jpeg", zero
        elif storage == "video":
            data = src if isinstance(src, bytes) else _read_bytes(src, "video", record.id, budget)
            read_video_frames(data if isinstance(src, bytes) else src, 16, name=f"record {record.id!r}",
                              budget=budget)  # fail at build time on a corrupt / image / oversized video
            kind, media, shape = "video", [data], zero
        else:
            frames, video_fps = _all_video_frames(src, record.id, budget)
            fps = fps or video_fps
            kind, media, shape = _store_frames(frames, storage, fps, quality)
    else:
        raise MediaError(f"record {record.id!r}: no media")
    return {"media_kind": kind, "media": media, "frames_shape": np.asarray(shape, np.int64), "fps": fps, "sampling": ""}


def record_to_example(record: Record, storage: str = "jpeg", quality: int = 90, *,
                      num_frames: int = DEFAULT_NUM_FRAMES, size: int | Sequence[int] = DEFAULT_SIZE,
                      budget: MediaBudget | None = None) -> dict[str, Any]:
    """A validated Record → the feature dict of `features()` (`num_frames`, `size`: "sampled_jpeg" only)."""
    record.validate()

    def arr(x, shape, dtype):
        return np.zeros(shape, dtype) if x is None else np.asarray(x, dtype).reshape((-1,) + shape[1:])

    return {
        "id": record.id, "task": record.task,
        **encode_media(record, storage, quality, num_frames=num_frames, size=size, budget=budget),
        "question": record.question, "answer": record.answer,
        "turn_questions": [q for q, _ in record.turns], "turn_answers": [a for _, a in record.turns],
        "options": list(record.options), "mc_answer": int(record.mc_answer),
        "duration": -1.0 if record.duration is None else float(record.duration),
        "spans": arr(record.spans, (0, 2), _F32), "saliency": arr(record.saliency, (0,), _F32),
        "clip_seconds": float(record.clip_seconds),
        "boxes": arr(record.boxes, (0, 4), _F32), "box_frames": arr(record.box_frames, (0,), _I64),
        "track_boxes": arr(record.track_boxes, (0, 4), _F32), "track_visible": arr(record.track_visible, (0,), _BOOL),
        "track_masks": "" if record.track_masks is None else json.dumps(record.track_masks),
        "instruction": record.instruction,
    }


def _text(x) -> str:
    """Stored text; invalid UTF-8 surrogates are kept ("surrogatepass") so `Record.validate` names the field."""
    return x.decode("utf-8", errors="surrogatepass") if isinstance(x, bytes) else str(x)


def example_to_record(ex: Mapping[str, Any]) -> Record:
    """A stored example → Record (JPEG frames decoded; videos and images stay encoded bytes).
    A stored example that cannot be decoded raises RecordError naming it."""
    raw_id = ex.get("id", "?")
    rid = raw_id.decode("utf-8", errors="backslashreplace") if isinstance(raw_id, bytes) else str(raw_id)
    try:
        return _example_to_record(ex, rid)
    except RecordError as e:
        e.record_id = rid
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001  (whatever a corrupt stored record makes the decoders raise)
        err = as_record_error(e, f"stored record {rid!r}: malformed", "decode")
        err.record_id = rid
        raise err from e


def _example_to_record(ex: Mapping[str, Any], rid: str) -> Record:
    kind = _text(ex["media_kind"])
    media = list(ex["media"])
    fps = float(ex["fps"]) or None
    m: dict[str, Any] = {}
    if kind == "frames_jpeg":
        m["frames"] = decode_jpeg_frames(media, name=f"record {rid!r}")
    elif kind == "frames_raw":
        shape = tuple(int(s) for s in ex["frames_shape"])
        m["frames"] = np.frombuffer(media[0], np.uint8).reshape(shape)
    elif kind == "video":
        m["video"] = bytes(media[0])
    elif kind == "image":
        m["image"] = bytes(media[0])
    else:
        raise RecordError(f"stored record {rid!r}: unknown media kind {kind!r}")

    def opt(a):
        a = np.asarray(a)
        return None if a.shape[0] == 0 else a

    task = _text(ex["task"])
    duration = float(ex["duration"])
    masks = _text(ex["track_masks"])
    sampling = json.loads(_text(ex.get("sampling", "")) or "{}")  # absent from datasets built before 1.1.0
    if sampling:
        fps = float(sampling["fps"])
    return Record(
        id=_text(ex.get("id", "?")), task=task, fps=fps, **m, question=_text(ex["question"]), answer=_text(ex["answer"]),
        turns=[(_text(q), _text(a)) for q, a in zip(ex["turn_questions"], ex["turn_answers"])],
        options=tuple(_text(o) for o in ex["options"]), mc_answer=int(ex["mc_answer"]),
        duration=None if duration < 0 else duration, spans=opt(ex["spans"]), saliency=opt(ex["saliency"]),
        clip_seconds=float(ex["clip_seconds"]), boxes=opt(ex["boxes"]), box_frames=opt(ex["box_frames"]),
        track_boxes=opt(ex["track_boxes"]),
        track_visible=opt(ex["track_visible"]),
        track_masks=json.loads(masks) if masks else None,
        frame_times=np.asarray(sampling["frame_times"], np.float64) if sampling else None,
        source_duration=sampling.get("source_duration"),
        instruction=_text(ex.get("instruction", "")),
    )


"""Media decoding: videos (PyAV), images and frame folders (PIL) → normalised float32 frames.

Video path of the reference (MODEL-SPEC §8.2):
* frame count `vlen` = number of video packets (what decord counts), fps = the stream's average rate,
  duration = vlen / fps;
* 16 frames, "middle" sampling (:func:`sample_indices`), timestamps index / fps;
* bicubic resize of the uint8 RGB frames to `size` (aspect ratio not kept, no crop), antialiased as
  torchvision's `Resize(antialias=True)` on uint8 tensors, rounded back to uint8 (:func:`resize_frames`);
* /255 then ImageNet mean/std (:func:`normalize`).
Images are one frame (T = 1) through the same resize and normalisation.

Every failure to read media raises :class:`MediaError` naming the file (or the record) and what failed.
Also here: :func:`encode_mp4`, :func:`encode_jpeg_frames`, :func:`decode_jpeg_frames` for fixtures and storage.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import warnings
from fractions import Fraction
from typing import NamedTuple, Sequence

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from tpo_jax.data.records import DEFAULT_BUDGET, MediaBudget, Record, RecordError
from tpo_jax.sam2.frames import resize_bicubic
from tpo_jax.vit import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".wmv", ".3gp")
SAMPLING_MODES = ("middle", "rand")


class MediaError(RecordError):
    """A video / image that cannot be read: missing, truncated, corrupt, or with no usable frames.
    `kind`: "decode" (default), "media_missing", "media_kind" (content not what the name / field says),
    "media_budget" (over `MediaBudget`)."""

    default_kind = "decode"


def _budget_error(name: str, what: str, value, limit_name: str, limit) -> MediaError:
    return MediaError(f"{name}: {what} {value} is over the media budget {limit_name}={limit}", "media_budget")


def sniff(head: bytes) -> str | None:
    """What the first bytes of a file say it is: "image:<format>", "video:<container>" or None (unknown)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image:JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image:PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image:GIF"
    if head.startswith(b"BM"):
        return "image:BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image:WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image:TIFF"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
        return "video:MP4/MOV"
    if head.startswith(b"\x1aE\xdf\xa3"):
        return "video:Matroska/WebM"
    if head[:4] == b"RIFF" and head[8:11] == b"AVI":
        return "video:AVI"
    if head.startswith(b"FLV"):
        return "video:FLV"
    if head.startswith(b"\x00\x00\x01\xba") or head.startswith(b"\x00\x00\x01\xb3"):
        return "video:MPEG"
    return None


def _head(src) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src[:16])
    with open(src, "rb") as f:
        return f.read(16)


def _check_kind(src, name: str, want: str) -> None:
    """MediaError(kind="media_kind") when `src`'s content (magic bytes) or file name says it is not `want`
    ("image" or "video"): an image named .mp4 must not decode as a one-frame video."""
    what = sniff(_head(src))
    if what is not None and not what.startswith(want + ":"):
        raise MediaError(f"{name}: content is {what.replace(':', ' ')}, expected {'an image' if want == 'image' else 'a video'}",
                         "media_kind")
    if isinstance(src, (str, os.PathLike)):
        ext = os.path.splitext(os.fspath(src))[1].lower()
        other = VIDEO_EXTENSIONS if want == "image" else IMAGE_EXTENSIONS
        if ext in other:
            raise MediaError(f"{name}: file named {ext!r} read as {'an image' if want == 'image' else 'a video'}"
                             f"{'' if what is None else ' (content: ' + what.replace(':', ' ') + ')'}", "media_kind")


class Media(NamedTuple):
    """Decoded media of one example."""
    frames: np.ndarray  # (T, H, W, 3) float32, ImageNet-normalised
    timestamps: np.ndarray  # (T,) seconds of each sampled frame (index / fps); zeros for images
    duration: float  # seconds (vlen / fps); 0 for images
    fps: float  # average frame rate; 0 for images
    indices: np.ndarray  # (T,) frame index of each sampled frame in the source
    source_size: tuple[int, int]  # (height, width) of the source frames


# --- sampling ----------------------------------------------------------------------------------------------------


def sample_indices(num_video_frames: int, num_samples: int = 16, fps: float = 1.0, *, mode: str = "middle",
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices and their timestamps (index / fps, seconds) of the reference's uniform sampling.

    edges = int(linspace(0, n, k + 1)) with k = min(num_samples, n); segment i is [edges[i], edges[i+1] - 1];
    "middle" takes ⌊(a + b) / 2⌋, "rand" a uniform integer in [a, b] (training augmentation, needs `rng`).
    With fewer frames than samples (n < num_samples) every frame is taken once and the last index
    repeats to fill `num_samples`.
    """
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode must be one of {SAMPLING_MODES}, got {mode!r}")
    k = min(num_samples, num_video_frames)
    edges = np.linspace(0, num_video_frames, k + 1).astype(np.int64)
    starts, ends = edges[:-1], edges[1:] - 1
    if mode == "middle":
        idx = (starts + ends) // 2
    else:
        if rng is None:
            raise ValueError('mode "rand" needs an rng (np.random.Generator)')
        idx = rng.integers(starts, ends + 1)
    if k < num_samples:
        idx = np.concatenate([idx, np.full(num_samples - k, idx[-1])])
    return idx.astype(np.int64), idx / float(fps)


# --- resize and normalisation ------------------------------------------------------------------------------------


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(h), int(w)


def resize_frames(frames: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """(T, h, w, 3) uint8 → (T, H, W, 3) uint8 by antialiased bicubic interpolation (a = -0.5).

    Computed in float32 per channel with PIL (mode "F") and rounded half-to-even, i.e. what torchvision's
    `Resize((H, W), BICUBIC, antialias=True)` does to a uint8 tensor (interpolate in float, clamp, round).
    Frames already at the target size are returned unchanged.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    h, w = _hw(size)
    if frames.shape[1:3] == (h, w):
        return frames
    return np.rint(np.clip(resize_bicubic(frames, (h, w)), 0, 255)).astype(np.uint8)


def normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB → float32 (x / 255 − mean) / std with the ImageNet mean/std (any leading shape)."""
    x = np.asarray(frames, np.float32) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD


# --- sources -----------------------------------------------------------------------------------------------------


def _why(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def _name(src, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return os.fspath(src)


def _handle(src, name: str, kind: str, budget: MediaBudget | None = None):
    """A file path or an in-memory file for `src` (bytes or a path); MediaError if there is nothing to read,
    the size is over `budget.max_bytes`, or the content / name says it is not a `kind` ("image" / "video")."""
    budget = budget or DEFAULT_BUDGET
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise MediaError(f"{name}: empty {kind} bytes")
        if len(src) > budget.max_bytes:
            raise _budget_error(name, f"{kind} of", f"{len(src)} bytes", "max_bytes", budget.max_bytes)
        _check_kind(src, name, kind)
        return io.BytesIO(bytes(src))
    if not os.path.isfile(src):
        raise MediaError(f"{name}: {kind} file not found", "media_missing")
    size = os.path.getsize(src)
    if size == 0:
        raise MediaError(f"{name}: {kind} file is empty")
    if size > budget.max_bytes:
        raise _budget_error(name, f"{kind} file of", f"{size} bytes", "max_bytes", budget.max_bytes)
    _check_kind(src, name, kind)
    return os.fspath(src)


def _stream_size(stream) -> tuple[int, int]:
    """(width, height) the stream's header declares; (0, 0) when it declares none (a stream PyAV cannot
    give a codec context)."""
    try:
        return int(stream.width or 0), int(stream.height or 0)
    except (AttributeError, TypeError, ValueError):
        return 0, 0


_IMAGE_DEMUXERS = ("image2", "jpeg_pipe", "png_pipe", "bmp_pipe", "webp_pipe", "gif", "tiff_pipe", "image2pipe")


def _open_video(src, name: str, budget: MediaBudget | None = None):
    """The opened container, after the header checks: a video stream, not an image demuxer, frame size
    within `budget.max_pixels`, declared frames within `max_frames`, declared duration within `max_seconds`."""
    budget = budget or DEFAULT_BUDGET
    handle = _handle(src, name, "video", budget)
    try:
        container = av.open(handle, mode="r")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise MediaError(f"{name}: cannot open video ({_why(e)})") from e
    try:
        fmt = (container.format.name or "").split(",")
        if any(f in _IMAGE_DEMUXERS or f.endswith("_pipe") for f in fmt):
            raise MediaError(f"{name}: content is an image ({container.format.name}), expected a video", "media_kind")
        if not container.streams.video:
            raise MediaError(f"{name}: no video stream")
        stream = container.streams.video[0]
        w, h = _stream_size(stream)
        if w * h > budget.max_pixels:
            raise _budget_error(name, "frame size", f"{w}x{h} = {w * h} pixels", "max_pixels", budget.max_pixels)
        if stream.frames and stream.frames > budget.max_frames:
            raise _budget_error(name, "frame count (header)", stream.frames, "max_frames", budget.max_frames)
        if container.duration and container.duration / 1e6 > budget.max_seconds:
            raise _budget_error(name, "duration (header)", f"{container.duration / 1e6:.1f} s", "max_seconds",
                                budget.max_seconds)
    except BaseException:
        container.close()
        raise
    return container


class _Index(NamedTuple):
    pts: np.ndarray | None  # (vlen,) presentation timestamps in frame order; None when the stream has none
    key_pts: np.ndarray  # presentation timestamps of the key frames, sorted
    num_frames: int


def _index_packets(container, stream, name: str, budget: MediaBudget | None = None) -> _Index:
    """One demux pass: the packets' pts (→ frame order) and key frames, as decord indexes a video."""
    budget = budget or DEFAULT_BUDGET
    pts, keys, missing = [], [], False
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's final flush packet
                continue
            if len(pts) >= budget.max_frames:
                raise _budget_error(name, "frame count", f"> {budget.max_frames}", "max_frames", budget.max_frames)
            p = packet.pts if packet.pts is not None else packet.dts
            if p is None:
                missing = True
                pts.append(len(pts))
            else:
                pts.append(p)
            if packet.is_keyframe:
                keys.append(pts[-1])
    except av.FFmpegError as e:
        raise MediaError(f"{name}: corrupt video stream after {len(pts)} packets ({_why(e)})") from e
    declared = stream.frames
    if declared and len(pts) < declared:
        raise MediaError(f"{name}: truncated video: header lists {declared} frames, only {len(pts)} readable")
    if not pts:
        raise MediaError(f"{name}: video has no frames")
    order = np.sort(np.asarray(pts, np.int64))
    key_pts = np.sort(np.asarray(keys or [order[0]], np.int64))
    return _Index(None if missing else order, key_pts, len(pts))


def _rgb(frame, name: str, budget: MediaBudget) -> np.ndarray:
    """A decoded frame as RGB uint8, after checking its own size (a stream may change size mid-way)."""
    w, h = int(frame.width), int(frame.height)
    if w * h > budget.max_pixels:
        raise _budget_error(name, "decoded frame size", f"{w}x{h}", "max_pixels", budget.max_pixels)
    return frame.to_ndarray(format="rgb24")


def _decode_targets(container, stream, index: _Index, targets: np.ndarray, name: str,
                    budget: MediaBudget | None = None) -> dict[int, np.ndarray]:
    """RGB uint8 frames at the sorted unique frame indices `targets`, seeking forward to key frames."""
    budget = budget or DEFAULT_BUDGET
    w, h = _stream_size(stream)
    if len(targets) * w * h * 3 > budget.max_decoded_bytes:
        raise _budget_error(name, f"{len(targets)} frames of {w}x{h}:", f"{len(targets) * w * h * 3} bytes",
                            "max_decoded_bytes", budget.max_decoded_bytes)
    got: dict[int, np.ndarray] = {}
    try:
        if index.pts is None:  # no timestamps: decode from the start and count frames
            container.seek(0)
            wanted = set(targets.tolist())
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    got[i] = _rgb(frame, name, budget)
                    if len(got) == len(wanted):
                        break
        else:
            target_pts = index.pts[targets]
            key_of = index.key_pts[np.maximum(np.searchsorted(index.key_pts, target_pts, side="right") - 1, 0)]
            j, sought = 0, None
            while j < len(targets):
                sought = int(key_of[j])
                container.seek(sought, stream=stream, backward=True)
                exhausted = True
                for frame in container.decode(stream):
                    fpts = frame.pts
                    if fpts is None:
                        continue
                    while j < len(targets) and fpts >= target_pts[j]:
                        got[int(targets[j])] = _rgb(frame, name, budget)
                        j += 1
                    if j == len(targets) or (key_of[j] > sought and key_of[j] > fpts):
                        exhausted = False  # done, or the next target is past a later key frame: seek there
                        break
                if exhausted:
                    break
    except (av.FFmpegError, ValueError) as e:
        raise MediaError(f"{name}: decoding failed ({_why(e)})") from e
    if len(got) < len(targets):
        missing = sorted(set(targets.tolist()) - set(got))
        raise MediaError(f"{name}: could not decode frames {missing[:5]} of {index.num_frames} "
                         "(truncated or corrupt video)")
    return got


def read_video_frames(src: str | os.PathLike | bytes, num_frames: int = 16, *, mode: str = "middle",
                      rng: np.random.Generator | None = None, threads: int = 1, name: str | None = None,
                      budget: MediaBudget | None = None):
    """Sampled uint8 RGB frames of a video: (frames (T, h, w, 3) uint8, indices, timestamps, duration, fps).
    Header sizes, frame count, duration and decoded bytes are checked against `budget` before decoding."""
    budget = budget or DEFAULT_BUDGET
    name = _name(src, name)
    sample_indices(1, num_frames, 1.0, mode=mode, rng=rng)  # the caller's arguments: ValueError, not MediaError
    try:
        return _read_video_frames(src, num_frames, mode, rng, threads, name, budget)
    except (MediaError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001  (whatever PyAV / FFmpeg raise on a hostile file is this file's error)
        raise MediaError(f"{name}: cannot read video ({type(e).__name__}: {str(e)[:160]})") from e


def _read_video_frames(src, num_frames, mode, rng, threads, name, budget):
    container = _open_video(src, name, budget)
    try:
        stream = container.streams.video[0]
        stream.thread_count = threads
        rate = stream.average_rate or stream.guessed_rate
        if not rate or not math.isfinite(float(rate)) or float(rate) <= 0:
            raise MediaError(f"{name}: video has no frame rate")
        fps = float(rate)
        index = _index_packets(container, stream, name, budget)
        if index.num_frames / fps > budget.max_seconds:
            raise _budget_error(name, "duration", f"{index.num_frames / fps:.1f} s", "max_seconds", budget.max_seconds)
        indices, timestamps = sample_indices(index.num_frames, num_frames, fps, mode=mode, rng=rng)
        targets = np.unique(indices)
        got = _decode_targets(container, stream, index, targets, name, budget)
    finally:
        container.close()
    shapes = {f.shape for f in got.values()}
    if len(shapes) != 1:
        raise MediaError(f"{name}: frames of different sizes {sorted(shapes)}")
    frames = np.stack([got[int(i)] for i in indices])
    return frames, indices, timestamps, index.num_frames / fps, fps


def decode_video(src: str | os.PathLike | bytes, num_frames: int = 16, size: int | Sequence[int] = 224, *,
                 mode: str = "middle", rng: np.random.Generator | None = None, threads: int = 1,
                 name: str | None = None, budget: MediaBudget | None = None) -> Media:
    """Decode, sample (§8.2), resize and normalise a video file or its encoded bytes."""
    frames, indices, timestamps, duration, fps = read_video_frames(src, num_frames, mode=mode, rng=rng,
                                                                   threads=threads, name=name, budget=budget)
    return Media(normalize(resize_frames(frames, size)), timestamps, duration, fps, indices,
                 tuple(frames.shape[1:3]))


def _bomb(name: str, e: Exception) -> MediaError:
    """PIL refuses the header itself (over 2 × Image.MAX_IMAGE_PIXELS, 179 Mpx): over any sane budget too."""
    return MediaError(f"{name}: image size over the media budget max_pixels (PIL: {str(e)[:120]})", "media_budget")


def _pil_why(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL knows (UnidentifiedImageError)"
    return f"{type(e).__name__}: {str(e)[:160]}"


@contextlib.contextmanager
def _pil_errors(name: str):
    """PIL work on the image `name`: its bomb warning silenced (the budget decides), and whatever PIL raises on a
    hostile file turned into this file's MediaError (a bomb refusal into the budget's); MemoryError passes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except (MediaError, MemoryError):
        raise
    except Image.DecompressionBombError as e:
        raise _bomb(name, e) from e
    except Exception as e:  # noqa: BLE001  (whatever PIL raises on a hostile file is this file's error)
        raise MediaError(f"{name}: cannot decode image ({_pil_why(e)})") from e


def image_size(src, name: str | None = None, budget: MediaBudget | None = None) -> tuple[int, int]:
    """(width, height) of an image from its header only (nothing decoded); MediaError as `decode_image`."""
    name = _name(src, name)
    handle = _handle(src, name, "image", budget)
    with _pil_errors(name), Image.open(handle) as img:
        return img.size


def _read_image(src, name: str, budget: MediaBudget | None = None) -> np.ndarray:
    """RGB uint8 (h, w, 3); the header's size is checked against `budget.max_pixels` before decoding."""
    budget = budget or DEFAULT_BUDGET
    handle = _handle(src, name, "image", budget)
    with _pil_errors(name), Image.open(handle) as img:
        w, h = img.size
        if w * h > budget.max_pixels:
            raise _budget_error(name, "image size", f"{w}x{h} = {w * h} pixels", "max_pixels", budget.max_pixels)
        if w * h == 0:
            raise MediaError(f"{name}: image of size {w}x{h}")
        rgb = np.asarray(img.convert("RGB"))
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[:2] != (h, w):
        raise MediaError(f"{name}: decoded image of shape {rgb.shape}, header says {w}x{h}")
    return rgb


def decode_image(src: str | os.PathLike | bytes, size: int | Sequence[int] = 224, *,
                 name: str | None = None, budget: MediaBudget | None = None) -> Media:
    """One image as a single frame (T = 1): resized and normalised like video frames."""
    name = _name(src, name)
    rgb = _read_image(src, name, budget)
    return Media(normalize(resize_frames(rgb[None], size)), np.zeros(1), 0.0, 0.0, np.zeros(1, np.int64),
                 tuple(rgb.shape[:2]))


def list_frame_files(directory: str | os.PathLike) -> list[str]:
    """The image files of a frame folder (MeViS / SA-V JPEG layout), sorted by name."""
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.lower().endswith(IMAGE_EXTENSIONS))


def decode_frame_dir(directory: str | os.PathLike, fps: float, num_frames: int = 16,
                     size: int | Sequence[int] = 224, *, mode: str = "middle",
                     rng: np.random.Generator | None = None, name: str | None = None,
                     budget: MediaBudget | None = None) -> Media:
    """A folder of frame images at `fps`, sampled like a video of that many frames."""
    budget = budget or DEFAULT_BUDGET
    name = _name(directory, name)
    if not os.path.isdir(directory):
        raise MediaError(f"{name}: frame folder not found", "media_missing")
    if not (math.isfinite(fps) and fps > 0):
        raise MediaError(f"{name}: frame folder fps must be a finite positive number, got {fps}", "bad_field")
    files = list_frame_files(directory)
    if not files:
        raise MediaError(f"{name}: frame folder has no images ({', '.join(IMAGE_EXTENSIONS)})", "media_missing")
    if len(files) > budget.max_frames:
        raise _budget_error(name, "frame files", len(files), "max_frames", budget.max_frames)
    indices, timestamps = sample_indices(len(files), num_frames, fps, mode=mode, rng=rng)
    decoded = {int(i): _read_image(files[i], f"{name}/{os.path.basename(files[i])}", budget)
               for i in np.unique(indices)}
    shapes = {d.shape for d in decoded.values()}
    if len(shapes) != 1:
        raise MediaError(f"{name}: frames of different sizes {sorted(shapes)}")
    frames = np.stack([decoded[int(i)] for i in indices])
    return Media(normalize(resize_frames(frames, size)), timestamps, len(files) / fps, float(fps), indices,
                 tuple(frames.shape[1:3]))


def load_media(record: Record, num_frames: int = 16, size: int | Sequence[int] = 224, *, mode: str = "middle",
               rng: np.random.Generator | None = None, threads: int = 1, budget: MediaBudget | None = None) -> Media:
    """The media of a `Record`, decoded: video file / bytes / frame folder, image, or given frames.

    Given `frames` (uint8 (T, H, W, 3)) are only resized and normalised when T is 1 or `num_frames`;
    otherwise they are sampled like a video of T frames at `record.fps` (1 if unset).
    Frames sampled at build time (`record.frame_times` set) are used as stored: timestamps = `frame_times`,
    indices = round(time × fps), duration = `record.source_duration`; they must be `num_frames` frames of
    `size` (the sampling is fixed when the dataset is built), else MediaError.
    A frame folder needs `record.fps`. Errors name the record and the file. Sizes are checked against
    `budget` (`MediaBudget`, default `DEFAULT_BUDGET`) before decoding.
    """
    budget = budget or DEFAULT_BUDGET
    tag = f"record {record.id!r}"
    if record.frames is not None:
        frames = np.asarray(record.frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise MediaError(f"{tag}: frames must be (T>0, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        if record.frame_times is not None:
            return _presampled(record, frames, num_frames, _hw(size), tag)
        fps = float(record.fps or 1.0)
        if not (math.isfinite(fps) and fps > 0):
            raise MediaError(f"{tag}: fps must be a finite positive number, got {record.fps}", "bad_field")
        if len(frames) in (1, num_frames):
            indices = np.arange(len(frames))
            timestamps = indices / fps
        else:
            indices, timestamps = sample_indices(len(frames), num_frames, fps, mode=mode, rng=rng)
        return Media(normalize(resize_frames(frames[indices], size)), timestamps, len(frames) / fps, fps,
                     indices, tuple(frames.shape[1:3]))
    if record.image is not None:
        src = record.image
        return decode_image(src, size, name=f"{tag}: {_name(src, None)}", budget=budget)
    if record.video is not None:
        src = record.video
        name = f"{tag}: {_name(src, None)}"
        if isinstance(src, (str, os.PathLike)) and os.path.isdir(src):
            if not record.fps:
                raise MediaError(f"{name}: a frame folder needs the record's fps")
            return decode_frame_dir(src, record.fps, num_frames, size, mode=mode, rng=rng, name=name, budget=budget)
        return decode_video(src, num_frames, size, mode=mode, rng=rng, threads=threads, name=name, budget=budget)
    raise MediaError(f"{tag}: no media (video, image or frames)")


def _presampled(record: Record, frames: np.ndarray, num_frames: int, hw: tuple[int, int], tag: str) -> Media:
    """Media of frames sampled and resized when the dataset was built (`Record.frame_times` set)."""
    times = np.asarray(record.frame_times, np.float64).reshape(-1)
    if len(times) != len(frames) or not np.all(np.isfinite(times)) or times.min() < 0:
        raise MediaError(f"{tag}: frame_times must be {len(frames)} finite times >= 0, got {times.tolist()}")
    if not record.fps or not record.fps > 0:
        raise MediaError(f"{tag}: frames sampled at build time need the source fps, got {record.fps}")
    if len(frames) != num_frames or frames.shape[1:3] != hw:
        raise MediaError(f"{tag}: stored {len(frames)} sampled frames of {frames.shape[1]}x{frames.shape[2]}, "
                         f"the model takes {num_frames} of {hw[0]}x{hw[1]}; the sampling is fixed when the "
                         "dataset is built: rebuild it with this num_frames and size")
    fps = float(record.fps)
    duration = float(record.source_duration) if record.source_duration is not None else 0.0
    return Media(normalize(frames), times, duration, fps, np.rint(times * fps).astype(np.int64),
                 tuple(frames.shape[1:3]))


# --- encoding (fixtures and storage) -----------------------------------------------------------------------------


def encode_mp4(frames: np.ndarray, fps: float, *, codec: str = "libx264", crf: int = 18,
               pix_fmt: str = "yuv420p", keyint: int | None = None, faststart: bool = False) -> bytes:
    """(T, H, W, 3) uint8 RGB → mp4 bytes. libx264 at `crf` (mpeg4: qscale ≈ crf / 6).

    yuv420p needs an even height and width. `keyint`: frames between key frames (codec default if None).
    `faststart` moves the index (moov atom) to the front of the file.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be (T>0, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    h, w = frames.shape[1:3]
    if pix_fmt == "yuv420p" and (h % 2 or w % 2):
        raise ValueError(f"yuv420p needs even height and width, got {h}x{w}")
    if codec not in av.codecs_available:
        raise ValueError(f"codec {codec!r} not in this PyAV build")
    if faststart:  # the muxer's second pass re-opens the output by name: go through a temporary file
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "clip.mp4")
            _write_mp4(path, frames, fps, codec, crf, pix_fmt, keyint, {"movflags": "faststart"})
            with open(path, "rb") as f:
                return f.read()
    buf = io.BytesIO()
    _write_mp4(buf, frames, fps, codec, crf, pix_fmt, keyint, {})
    return buf.getvalue()


def _write_mp4(target, frames, fps, codec, crf, pix_fmt, keyint, options):
    h, w = frames.shape[1:3]
    with av.open(target, mode="w", format="mp4", options=options) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if keyint:
            stream.codec_context.gop_size = keyint
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "medium"}
        else:
            stream.codec_context.qscale = max(1, round(crf / 6))
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())


def encode_jpeg_frames(frames: np.ndarray, quality: int = 90) -> list[bytes]:
    """(T, H, W, 3) uint8 RGB → one JPEG per frame (PIL, 4:2:0 chroma)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def decode_jpeg_frames(jpegs: Sequence[bytes], *, name: str | None = None,
                       budget: MediaBudget | None = None) -> np.ndarray:
    """JPEG bytes per frame → (T, H, W, 3) uint8 RGB; all frames must share one size."""
    budget = budget or DEFAULT_BUDGET
    name = name or f"<{len(jpegs)} JPEG frames>"
    if len(jpegs) == 0:
        raise MediaError(f"{name}: no frames")
    if len(jpegs) > budget.max_frames:
        raise _budget_error(name, "frames", len(jpegs), "max_frames", budget.max_frames)
    total = 0
    for i, b in enumerate(jpegs):  # headers first: the whole set must fit max_decoded_bytes before decoding
        w, h = image_size(b, f"{name} frame {i}", budget)
        total += w * h * 3
        if w * h > budget.max_pixels:
            raise _budget_error(f"{name} frame {i}", "image size", f"{w}x{h}", "max_pixels", budget.max_pixels)
        if total > budget.max_decoded_bytes:
            raise _budget_error(name, f"{i + 1} frames:", f"{total} bytes", "max_decoded_bytes",
                                budget.max_decoded_bytes)
    frames = [_read_image(b, f"{name} frame {i}", budget) for i, b in enumerate(jpegs)]
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise MediaError(f"{name}: frames of different sizes {sorted(shapes)}")
    return np.stack(frames)


__all__ = ["MediaError", "Media", "MediaBudget", "sniff", "image_size", "VIDEO_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "sample_indices", "resize_frames", "normalize",
           "read_video_frames", "decode_video", "decode_image", "decode_frame_dir", "list_frame_files", "load_media",
           "encode_mp4", "encode_jpeg_frames", "decode_jpeg_frames"]

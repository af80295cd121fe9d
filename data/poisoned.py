"""Hostile inputs for tests and benchmarks: tiny "bomb" media and a synthetic dataset with poisoned records.

`write_poisoned_dataset(data_dir, ...)` builds the synthetic dataset (`TpoSynthetic`, ArrayRecord) and replaces
a fraction of its records, after encoding, by poisoned ones of each kind of `POISON_KINDS` — so they reach the
training pipeline as a corrupt / hostile stored dataset would (the builders' own checks would reject most of
them at build time). `data.source=<result.path>` trains on it through the normal config; the pipeline must
skip every poisoned record and count it under `POISON_KINDS[kind]` (`TrainIterator.bad_by_kind`).

The poisoned records *replace* records (same lengths per split and task), so the pipeline's (task, index,
position) stream is the same as the clean dataset's (`clean_path`, written with `clean_copy=True`): a run on the
poisoned dataset yields exactly the batches of the clean one with the records at `poisoned_index` skipped.

Media helpers: `bomb_png(w, h)` / `bomb_jpeg(w, h)` (a few hundred bytes whose header claims w × h pixels).
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import zlib
from typing import Mapping, Sequence

import numpy as np

from tpo_jax.data.records import TASKS

#: poison kind → the skip kind (`tpo_jax.data.records.SKIP_KINDS`) the pipeline must count it under.
POISON_KINDS: dict[str, str] = {
    "bomb_image": "media_budget",  # an image whose header claims 20000 x 20000 pixels (400 Mpx, > PIL's 179 M)
    "image_as_video": "media_kind",  # JPEG bytes stored as the record's video (an image named .mp4)
    "garbage_video": "decode",  # random bytes as the video
    "truncated_jpeg": "decode",  # the frames' JPEGs cut in half
    "lone_surrogate": "bad_field",  # a lone UTF-16 surrogate in the question / first turn / option
    "negative_fps": "bad_field",  # fps -5 on stored frames
    "many_options": "template",  # mc: 9 options (the prompt letters (A) to (H))
    "inf_duration": "bad_field",  # temporal: duration Infinity
    "huge_rle": "media_budget",  # mask: an RLE claiming 50000 x 50000 pixels
}
#: poison kinds that apply to one task only (the others apply to every task)
TASK_ONLY = {"many_options": "mc", "inf_duration": "temporal", "huge_rle": "mask"}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid-header PNG (~60 bytes) claiming `width` × `height` RGB pixels, with one tiny compressed row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def bomb_jpeg(width: int = 9000, height: int = 9000) -> bytes:
    """A tiny JPEG (a 8 × 8 one, a few hundred bytes) whose frame header (SOF) is rewritten to claim
    `width` × `height`."""
    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 64, 32)).save(buf, format="JPEG", quality=50)
    data = bytearray(buf.getvalue())
    i = 2
    while i < len(data) - 9:
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):  # SOF: length(2) precision(1) height(2) width(2)
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker in the JPEG PIL wrote")


def small_jpeg(size: int = 8) -> bytes:
    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def poison_example(ex: dict, kind: str, rng: np.random.Generator) -> dict:
    """A stored example (the feature dict of `tpo_jax.data.record_codec.features`) with poison `kind` applied."""
    ex = dict(ex)
    zero = np.zeros(4, np.int64)
    if kind == "bomb_image":
        ex.update(media_kind="image", media=[bomb_png()], frames_shape=zero, sampling="")
    elif kind == "image_as_video":
        ex.update(media_kind="video", media=[small_jpeg()], frames_shape=zero, sampling="")
    elif kind == "garbage_video":
        ex.update(media_kind="video", media=[rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()],
                  frames_shape=zero, sampling="")
    elif kind == "truncated_jpeg":
        if ex["media_kind"] != "frames_jpeg":
            raise ValueError("truncated_jpeg needs frames stored as JPEG (storage 'jpeg' or 'sampled_jpeg')")
        ex["media"] = [m[:len(m) // 2] for m in ex["media"]]
    elif kind == "lone_surrogate":
        bad = "what is \ud800 here?".encode("utf-8", errors="surrogatepass")
        if ex.get("turn_questions"):
            ex["turn_questions"] = [bad] + list(ex["turn_questions"])[1:]
        elif ex.get("options"):
            ex["options"] = [bad] + list(ex["options"])[1:]
        else:
            ex["question"] = bad
    elif kind == "negative_fps":
        ex["fps"] = np.float32(-5.0)
        if ex.get("sampling"):
            s = json.loads(ex["sampling"])
            s["fps"] = -5.0
            ex["sampling"] = json.dumps(s)
    elif kind == "many_options":
        ex["options"] = [f"option {k}" for k in range(9)]
    elif kind == "inf_duration":
        ex["duration"] = np.float32(np.inf)
    elif kind == "huge_rle":
        ex["track_masks"] = json.dumps([{"size": [50000, 50000], "counts": [2_500_000_000]}])
    else:
        raise ValueError(f"unknown poison kind {kind!r}; known: {sorted(POISON_KINDS)}")
    return ex


@dataclasses.dataclass
class PoisonedDataset:
    path: str  # the dataset directory (`data.source`)
    poisoned: dict[str, list[str]]  # poison kind → ids of the poisoned records (every split)
    poisoned_index: dict[tuple[str, str], dict[int, str]]  # (split, task) → {stored record index: poison kind}
    clean_path: str | None = None  # the same dataset without poison (`clean_copy=True`)

    def expected_skips(self, split: str = "train") -> dict[str, int]:
        """skip kind → number of poisoned records of `split` (each counted once per epoch)."""
        out: dict[str, int] = {}
        for (s, _), plan in self.poisoned_index.items():
            if s == split:
                for kind in plan.values():
                    out[POISON_KINDS[kind]] = out.get(POISON_KINDS[kind], 0) + 1
        return out


    def clean_sources_skipping(self, split: str, tasks: Sequence[str]) -> dict[str, "SkippingSource"]:
        """{task: source} of the clean copy that yields a `Bad` (kind "clean_skip") where this dataset is poisoned:
        the stream the poisoned dataset gives, made from clean records (pass as `make_train_iterator(sources=)`)."""
        from tpo_jax.data.stored_source import open_task_sources  # noqa: PLC0415

        if self.clean_path is None:
            raise ValueError("write_poisoned_dataset(..., clean_copy=True) makes the clean copy this needs")
        clean = open_task_sources([self.clean_path], split, tasks)
        return {t: SkippingSource(clean[t], self.poisoned_index.get((split, t), {})) for t in tasks}


class SkippingSource:
    """A random-access source whose records at the indices of `plan` are skips (a `Bad` of kind "clean_skip")."""

    def __init__(self, source, plan: Mapping[int, str]):
        self.source, self.plan = source, plan

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        from tpo_jax.data.pipeline import Bad  # noqa: PLC0415  (the pipeline imports grain)

        return Bad(f"clean-{i}", "poisoned in the other copy", "clean_skip") if i in self.plan else self.source[i]


def poison_plan(sizes: Mapping[str, int], tasks: Sequence[str], fraction: float, kinds: Sequence[str],
                seed: int, splits: Sequence[str]) -> dict[tuple[str, str], dict[int, str]]:
    """Which record of each (split, task) gets which poison: round(fraction × n) records (at least one per
    applicable kind when fraction > 0), drawn without replacement, kinds cycled in order."""
    plan = {}
    for split in splits:
        for t_i, task in enumerate(tasks):
            n = int(sizes[split])
            usable = [k for k in kinds if TASK_ONLY.get(k, task) == task]
            if not usable or fraction <= 0:
                continue
            k = min(n, max(len(usable), int(round(fraction * n))))
            rng = np.random.default_rng([seed, TASKS.index(task), len(split)])
            where = sorted(rng.choice(n, k, replace=False).tolist())
            plan[(split, task)] = {int(i): usable[j % len(usable)] for j, i in enumerate(where)}
    return plan


def write_poisoned_dataset(data_dir: str, synthetic=None, *, sizes: Mapping[str, int] | None = None,
                           fraction: float = 0.1, kinds: Sequence[str] | None = None, tasks: Sequence[str] = TASKS,
                           splits: Sequence[str] = ("train",), seed: int = 0, storage: str = "jpeg",
                           clean_copy: bool = False) -> PoisonedDataset:
    """Build the synthetic dataset under `data_dir/poisoned` (and, with `clean_copy`, the same without poison
    under `data_dir/clean`) with `fraction` of the records of each `splits` × `tasks` group poisoned.

    `synthetic`: a `SyntheticConfig` (its size / frame count should be the model's: the pipeline reads stored
    frames as they are); `kinds`: subset of `POISON_KINDS` (default all). Returns the dataset path and the ids
    of the poisoned records per kind."""
    import os  # noqa: PLC0415

    from tpo_jax.data.builders import TpoSynthetic, build  # noqa: PLC0415  (tensorflow_datasets)
    from tpo_jax.data.synthetic import SyntheticConfig  # noqa: PLC0415

    kinds = list(kinds or POISON_KINDS)
    unknown = sorted(set(kinds) - set(POISON_KINDS))
    if unknown:
        raise ValueError(f"unknown poison kinds {unknown}; known: {sorted(POISON_KINDS)}")
    if storage not in ("jpeg", "sampled_jpeg") and "truncated_jpeg" in kinds:
        kinds.remove("truncated_jpeg")
    synthetic = synthetic or SyntheticConfig()
    sizes = dict(sizes or {"train": 64, "validation": 8})
    plan = poison_plan(sizes, tasks, fraction, kinds, seed, [s for s in splits if s in sizes])
    poisoned: dict[str, list[str]] = {k: [] for k in kinds}

    class TpoPoisoned(TpoSynthetic, skip_registration=True):
        """The synthetic dataset with poisoned records (tpo_jax.data.poisoned)."""

        def _generate_examples(self, records, name=""):
            split, task = name.split("_", 1)
            todo = plan.get((split, task), {})
            rng = np.random.default_rng([seed, TASKS.index(task), 99])
            for i, (key, ex) in enumerate(super()._generate_examples(records, name)):
                if i in todo:
                    kind = todo[i]
                    ex = poison_example(ex, kind, rng)
                    ex["id"] = f"poisoned-{kind}-{key}"  # the key stays: TFDS orders records by it, as in the clean copy
                    poisoned[kind].append(ex["id"])
                yield key, ex

    common = dict(sizes=sizes, tasks=tuple(tasks), seed=seed, storage=storage)
    path = build(TpoPoisoned(synthetic, data_dir=os.path.join(data_dir, "poisoned"), **common))
    clean = build(TpoSynthetic(synthetic, data_dir=os.path.join(data_dir, "clean"), **common)) if clean_copy else None
    # ids and stored indices read back (TFDS orders records by key; a directory that already held the dataset
    # was reused, not rebuilt)
    import tensorflow_datasets as tfds  # noqa: PLC0415

    stored = tfds.builder_from_directory(path).as_data_source()
    ids: dict[str, list[str]] = {}
    index: dict[tuple[str, str], dict[int, str]] = {}
    for (split, task) in sorted(plan):
        source = stored[f"{split}_{task}"]
        for i in range(len(source)):
            rid = source[i]["id"]
            rid = rid.decode("utf-8", errors="backslashreplace") if isinstance(rid, bytes) else str(rid)
            if rid.startswith("poisoned-"):
                kind = next(k for k in POISON_KINDS if rid.startswith(f"poisoned-{k}-"))
                ids.setdefault(kind, []).append(rid)
                index.setdefault((split, task), {})[i] = kind
    return PoisonedDataset(path, ids, index, clean)


__all__ = ["POISON_KINDS", "TASK_ONLY", "bomb_png", "bomb_jpeg", "small_jpeg", "poison_example", "poison_plan",
           "PoisonedDataset", "write_poisoned_dataset"]

"""grain input pipeline: data sources → per-task mixture → examples → fixed-shape batches.

    per task k:  MapDataset.range(len(source_k)).shuffle(seed_k).repeat()     (reshuffled every epoch)
    MapDataset.mix(tasks, stage weights)   → (task, index) stream, deterministic interleave
    .map_with_index(+ global position)     → the position seeds the template / saliency choice
    [process_index::process_count]         → this host's share
    .map(Prepare)                          → read record, decode media, build_example (or a Bad marker)
    .to_iter_dataset(ReadOptions) [.mp_prefetch(workers)]
    TrainIterator (this process)           → skip + count bad records, collate `batch_size` examples

The iterator's `get_state()` is a JSON-serialisable dict (grain's iterator state plus the skip
counters); `set_state()` restores it, after which the iterator yields exactly the batches an
uninterrupted run yields from that point. Sources: the built-in synthetic dataset
(`source="synthetic"`, generated on demand) or datasets written by `tpo_jax.data.builders`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from absl import flags

from tpo_jax.data.conversation import (ExampleSpec, _record_frame_index, build_example, collate,
                                       mc_cloze_examples)
from tpo_jax.data.records import TASKS, DataError, MediaBudget, Record, RecordError, as_record_error
from tpo_jax.data.rle import rle_decode
from tpo_jax.data.synthetic import SyntheticConfig, SyntheticSource
from tpo_jax.config import ConfigError, TPOConfig
from tpo_jax.config_fields import check_field
from tpo_jax.model_tokenizer import model_tokenizer
from tpo_jax.tokenizer import MultimodalTokenizer

log = logging.getLogger(__name__)

#: Default task weights of each training stage (train/stages.py recipe names).
STAGE_WEIGHTS: dict[str, dict[str, float]] = {
    "stage1": {"conversation": 0.125, "mc": 0.125, "temporal": 0.25, "region": 0.25, "mask": 0.25},
    "stage2": {"temporal": 1 / 3, "region": 1 / 3, "mask": 1 / 3},
    "stage2_region": {"region": 1.0},
    "stage2_temporal": {"temporal": 1.0},
    "stage2_mask": {"mask": 1.0},
    "stage3": {"conversation": 0.2, "mc": 0.2, "temporal": 0.2, "region": 0.2, "mask": 0.2},
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str | tuple[str, ...] = "synthetic"  # "synthetic" or built dataset directories (tpo_jax.data.builders)
    batch_size: int = 8  # per host
    seq_len: int = 128
    seed: int = 0
    workers: int = 0  # grain worker processes (0: read in this process)
    threads: int = 1  # reader threads per process (ReadOptions.num_threads)
    prefetch: int = 8  # elements buffered per worker / reader
    weights: Mapping[str, float] | None = None  # task weights; None: STAGE_WEIGHTS[stage]
    max_bad_fraction: float = 0.05
    bad_check_after: int = 100  # bad records tolerated before this many were read: max_bad_fraction × this
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    track_slots: int = 1
    max_options: int = 5
    eval_examples: int = 64  # per task, rounded up to whole batches
    budget: MediaBudget = dataclasses.field(default_factory=MediaBudget)  # media decoding limits (records.MediaBudget)

    def validate(self, prefix: str = "data.") -> "DataConfig":
        for name in ("batch_size", "seq_len", "threads", "prefetch", "bad_check_after", "track_slots",
                     "max_options", "eval_examples"):
            v = getattr(self, name)
            check_field(isinstance(v, int) and v > 0, prefix + name, f"must be a positive integer, got {v!r}")
        check_field(isinstance(self.workers, int) and self.workers >= 0, prefix + "workers", "must be >= 0")
        check_field(0 <= self.max_bad_fraction < 1, prefix + "max_bad_fraction", "must be in [0, 1)")
        if self.weights is not None:
            unknown = sorted(set(self.weights) - set(TASKS))
            check_field(not unknown, prefix + "weights", f"unknown task(s) {unknown}; known: {TASKS}")
            check_field(all(w >= 0 for w in self.weights.values()) and sum(self.weights.values()) > 0,
                        prefix + "weights", f"must be >= 0 with a positive sum, got {dict(self.weights)}")
        self.synthetic.validate(prefix + "synthetic.")
        check_field(isinstance(self.budget, MediaBudget), prefix + "budget", "must be a MediaBudget")
        try:
            self.budget.validate(prefix + "budget.")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def task_weights(self, stage: str) -> dict[str, float]:
        if self.weights is not None:
            w = dict(self.weights)
        elif stage in STAGE_WEIGHTS:
            w = STAGE_WEIGHTS[stage]
        else:
            raise ConfigError(f"config field 'stage': no default task weights for {stage!r}; "
                              f"known: {sorted(STAGE_WEIGHTS)} (or set data.weights)")
        total = sum(w.values())
        return {t: w[t] / total for t in TASKS if w.get(t, 0) > 0}

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"


def example_spec(data_cfg: DataConfig, model_cfg: TPOConfig) -> ExampleSpec:
    return ExampleSpec.from_model(model_cfg, data_cfg.seq_len, track_slots=data_cfg.track_slots,
                                  max_options=data_cfg.max_options)


def synthetic_config(data_cfg: DataConfig, model_cfg: TPOConfig) -> SyntheticConfig:
    """The synthetic config rendered at the model's resolution and frame count (`TPOConfig.frame_size`,
    `num_frames`: either architecture)."""
    return dataclasses.replace(data_cfg.synthetic, size=model_cfg.frame_size,
                               num_frames=model_cfg.num_frames).validate()


def task_sources(data_cfg: DataConfig, model_cfg: TPOConfig, split: str, tasks: Sequence[str]) -> dict[str, Any]:
    """A random-access source of `Record`s per task."""
    if data_cfg.is_synthetic:
        cfg = synthetic_config(data_cfg, model_cfg)
        return {t: SyntheticSource(cfg, t, split, data_cfg.seed) for t in tasks}
    from tpo_jax.data.stored_source import open_task_sources  # noqa: PLC0415  (imports tensorflow_datasets)

    paths = (data_cfg.source,) if isinstance(data_cfg.source, str) else tuple(data_cfg.source)
    return open_task_sources(paths, split, tasks)


# --- per-element transforms (picklable: they travel to grain worker processes) -------------------------------------


class _Tag(grain.transforms.Map):
    def __init__(self, task: int):
        self.task = task

    def map(self, index):
        return self.task, int(index)


class _Position(grain.transforms.MapWithIndex):
    def map_with_index(self, position, element):
        return element[0], element[1], int(position)


@dataclasses.dataclass
class Bad:
    """A record that could not become an example (kept in the stream so it is counted in order).
    `kind`: the short reason key (`tpo_jax.data.records.SKIP_KINDS`) skips are counted by."""
    record_id: str
    message: str
    kind: str = "internal"


#: What a failure of each step of `Prepare.example` is, when the exception does not say (not a RecordError).
_STEP_KINDS = {"read": "decode", "media": "decode", "build": "internal"}


class Prepare(grain.transforms.Map):
    """(task index, record index, position) → example dict, or `Bad`.

    Every failure of one record (reading the stored record, decoding its media, templating, tokenizing), whatever
    the library underneath raises, becomes a `Bad` naming the record, the exception type and the reason kind;
    only MemoryError (re-raised naming the record), KeyboardInterrupt and SystemExit end the run.

    The tokenizer is `model_tokenizer(model_cfg)` (either architecture; built lazily in each process), or without
    `model_cfg` the Mistral one with `spec.num_visual_tokens` placeholders (arch "videochat")."""

    def __init__(self, sources: Mapping[str, Any], spec: ExampleSpec, seed: int, budget: MediaBudget | None = None,
                 model_cfg: TPOConfig | None = None):
        self.sources, self.spec, self.seed = dict(sources), spec, seed
        self.budget = budget or MediaBudget()
        self.model_cfg = model_cfg
        self._tok = None

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = (MultimodalTokenizer(num_visual_tokens=self.spec.num_visual_tokens) if self.model_cfg is None
                         else model_tokenizer(self.model_cfg))
        return self._tok

    def example(self, task: str, index: int, position: int, build=build_example):
        """`build(record, media, spec, tokenizer, seed=...)` of record `index` of `task`, or `Bad`."""
        from tpo_jax.data.video import load_media  # noqa: PLC0415  (PyAV import only where media is read)

        rid, step = f"{task}[{index}]", "read"
        try:
            record = self.sources[task][index]
            if isinstance(record, Bad):
                return record
            if not isinstance(record, Record):
                raise RecordError(f"source of task {task!r} gave a {type(record).__name__}, not a Record")
            rid = record.id if isinstance(record.id, str) else rid
            step = "media"
            media = load_media(record, self.spec.num_frames, self.spec.img_size, budget=self.budget)
            step = "build"
            return build(record, media, self.spec, self.tokenizer, seed=hash_seed(self.seed, position))
        except MemoryError as e:
            raise MemoryError(f"record {rid!r} ({step}): out of memory ({e}); lower data.budget") from e
        except Exception as e:  # noqa: BLE001  (one record's failure is a counted skip, never the run's end)
            rid = getattr(e, "record_id", None) or rid  # a stored record that cannot be read names itself
            err = as_record_error(e, f"record {rid!r}", _STEP_KINDS[step])
            return Bad(rid, str(err), err.kind)

    def map(self, element):
        task, index, position = element
        return self.example(TASKS[task], index, position)


def hash_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# --- the dataset ---------------------------------------------------------------------------------------------------


def index_dataset(data_cfg: DataConfig, sizes: Mapping[str, int], weights: Mapping[str, float], *,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """The infinite (task index, record index, position) stream of one host, before any record is read."""
    parts, w = [], []
    for task, weight in weights.items():
        k = TASKS.index(task)
        if sizes[task] <= 0:
            raise DataError(f"task {task!r} has weight {weight} but its source is empty")
        ds = grain.MapDataset.range(sizes[task]).shuffle(seed=hash_seed(data_cfg.seed, k)).repeat()
        parts.append(ds.map(_Tag(k)))
        w.append(weight)
    mixed = grain.MapDataset.mix(parts, w) if len(parts) > 1 else parts[0]
    mixed = mixed.map_with_index(_Position())
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return mixed[process_index::process_count]


class SkipCounter:
    """Skipped records per reason kind, with the first few record ids of each kind (for error messages)."""

    EXAMPLES = 3

    def __init__(self):
        self.by_kind: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, kind: str, record_id: str) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        ids = self.examples.setdefault(kind, [])
        if len(ids) < self.EXAMPLES:
            ids.append(str(record_id))

    def summary(self) -> str:
        """"by kind: media_budget 4 (e.g. 'a', 'b', 'c'), bad_field 1 (e.g. 'd')", most frequent first."""
        parts = [f"{k} {n}" + (f" (e.g. {', '.join(repr(i) for i in self.examples.get(k, []))})"
                               if self.examples.get(k) else "")
                 for k, n in sorted(self.by_kind.items(), key=lambda kv: (-kv[1], kv[0]))]
        return "by kind: " + (", ".join(parts) if parts else "none")

    def state(self) -> dict:
        return {"bad_by_kind": dict(self.by_kind), "bad_examples": {k: list(v) for k, v in self.examples.items()}}

    @classmethod
    def from_state(cls, state: Mapping, bad: int = 0) -> "SkipCounter":
        c = cls()
        if "bad_by_kind" in state:
            c.by_kind = {str(k): int(v) for k, v in state["bad_by_kind"].items()}
            c.examples = {str(k): [str(i) for i in v] for k, v in state.get("bad_examples", {}).items()}
        elif bad:
            c.by_kind = {"unknown": int(bad)}
        return c


class TrainIterator:
    """Batches of one host; skips and counts bad records; `get_state` / `set_state` for checkpoints."""

    def __init__(self, dataset: grain.IterDataset, batch_size: int, max_bad_fraction: float, bad_check_after: int):
        self._it = iter(dataset)
        self.batch_size = batch_size
        self.max_bad_fraction, self.bad_check_after = max_bad_fraction, bad_check_after
        self.seen = 0
        self.bad = 0
        self.skips = SkipCounter()

    @property
    def bad_by_kind(self) -> dict[str, int]:
        """Skipped records per reason kind (`tpo_jax.data.records.SKIP_KINDS`), e.g. {"media_budget": 2}."""
        return dict(self.skips.by_kind)

    def __iter__(self):
        return self

    def _count_bad(self, bad: Bad):
        self.bad += 1
        self.skips.add(bad.kind, bad.record_id)
        log.warning("skipping bad record %s [%s]: %s (%d bad of %d read)", bad.record_id, bad.kind, bad.message,
                    self.bad, self.seen)
        if self.bad > self.max_bad_fraction * max(self.seen, self.bad_check_after):
            raise DataError(f"{self.bad} of {self.seen} records were bad, more than max_bad_fraction="
                            f"{self.max_bad_fraction}; {self.skips.summary()}; last: {bad.record_id}: {bad.message}")

    def __next__(self) -> dict[str, np.ndarray]:
        examples = []
        while len(examples) < self.batch_size:
            element = next(self._it)
            self.seen += 1
            if isinstance(element, Bad):
                self._count_bad(element)
            else:
                examples.append(element)
        return collate(examples)

    def get_state(self) -> dict:
        return {"grain": self._it.get_state(), "seen": self.seen, "bad": self.bad, **self.skips.state()}

    def set_state(self, state: Mapping) -> None:
        """Restore `get_state()`; states written before the per-kind counters (no "bad_by_kind") still load,
        their earlier skips counted under "unknown"."""
        self._it.set_state(state["grain"])
        self.seen, self.bad = int(state["seen"]), int(state["bad"])
        self.skips = SkipCounter.from_state(state, self.bad)

    def close(self):
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def make_dataset(data_cfg: DataConfig, model_cfg: TPOConfig, stage: str, *, split: str = "train",
                 process_index: int = 0, process_count: int = 1,
                 sources: Mapping[str, Any] | None = None) -> grain.IterDataset:
    """The grain dataset of examples (and `Bad` markers) of one host. `sources` ({task: random-access
    source of Records}) replaces the ones `data_cfg.source` names."""
    data_cfg.validate()
    weights = data_cfg.task_weights(stage)
    if sources is None:
        sources = task_sources(data_cfg, model_cfg, split, list(weights))
    ds = index_dataset(data_cfg, {t: len(s) for t, s in sources.items()}, weights,
                       process_index=process_index, process_count=process_count)
    prep = Prepare(sources, example_spec(data_cfg, model_cfg), data_cfg.seed, data_cfg.budget, model_cfg)
    prep.tokenizer  # noqa: B018  (a tokenizer that does not fit the model fails here, not as a skip per record)
    ds = ds.map(prep)
    read = grain.ReadOptions(num_threads=data_cfg.threads, prefetch_buffer_size=data_cfg.prefetch)
    it = ds.to_iter_dataset(read)
    if data_cfg.workers > 0:
        if not flags.FLAGS.is_parsed():  # grain reads absl flags when it starts workers; keep their defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.workers,
                                                         per_worker_buffer_size=data_cfg.prefetch))
    return it


def make_train_iterator(data_cfg: DataConfig, model_cfg: TPOConfig, stage: str, process_index: int = 0,
                        process_count: int = 1, *, sources: Mapping[str, Any] | None = None) -> TrainIterator:
    """Endless per-host batches (dict of numpy arrays, keys of `ExampleSpec.shapes`, leading axis batch_size)."""
    ds = make_dataset(data_cfg, model_cfg, stage, process_index=process_index, process_count=process_count,
                      sources=sources)
    return TrainIterator(ds, data_cfg.batch_size, data_cfg.max_bad_fraction, data_cfg.bad_check_after)


#: Evaluation-only task: the cloze form of the `mc` records (`tpo_jax.data.conversation.mc_cloze_examples`).
MC_CLOZE = "mc_cloze"
#: Per-row fields of `mc_cloze` batches: the question's index among the evaluated records (−1: padding
#: row), the option the row answers with, the question's right option.
CLOZE_FIELDS = ("cloze_question", "cloze_option", "cloze_answer")


def _cloze_rows(record_index: int):
    """`build` for `Prepare.example`: the cloze examples of one mc record, tagged with `CLOZE_FIELDS`."""
    def build(record, media, spec, tok, *, seed):
        rows = mc_cloze_examples(record, media, spec, tok, seed=seed)
        for k, row in enumerate(rows):
            for name, value in zip(CLOZE_FIELDS, (record_index, k, record.mc_answer)):
                row[name] = np.int32(value)
        return rows
    return build


#: Evaluation-only field of `mask` batches: the sampled frames as SAM2 inputs (T, S, S, 3), S = sam2.image_size.
SAM2_FRAMES = "sam2_frames"
#: Evaluation-only ground truth of `mask` batches for the tracking metrics, read on the host only (never placed
#: on devices): per sampled frame the object's mask (T, H, W) bool at the ground truth's frame size (zero-padded to
#: the batch's largest; the real size in `gt_frame_size` (h, w)), its box (T, 4) normalised xyxy, its visibility
#: (T,), and whether the record has masks at all (`gt_has_masks`; boxes only: no J&F, only the box metrics).
TRACK_GT_FIELDS = ("gt_track_masks", "gt_track_boxes", "gt_track_visible", "gt_frame_size", "gt_has_masks")


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415

        return ml_dtypes.bfloat16
    return np.dtype(name)


def tracking_fields(record: Record, media, num_frames: int, image_size: int, dtype="float32",
                    budget: MediaBudget | None = None) -> dict[str, np.ndarray]:
    """`SAM2_FRAMES` and `TRACK_GT_FIELDS` of one `mask` example, for the frames `media` sampled.

    SAM2 frames: given uint8 frames (`record.frames`, those at `media.indices`; frames sampled at build time as
    stored) through `tpo_jax.sam2.frames.sam2_frames`, the release's Mask transform; a video file is decoded again
    at S×S with the same sampling (`load_media`, which rounds the resized frames to uint8). Stored in `dtype`
    (SAM2's compute dtype: bfloat16 at 7B halves the host copy, as the release's bf16 video tensor). Ground truth:
    the record's per-frame entry nearest each sampled frame (as the head's target, `_record_frame_index`)."""
    from tpo_jax.data.video import load_media  # noqa: PLC0415
    from tpo_jax.sam2.frames import sam2_frames  # noqa: PLC0415

    if record.frames is not None:
        frames = np.asarray(record.frames)
        if record.frame_times is None:
            frames = frames[np.asarray(media.indices, np.int64)]
        s2 = sam2_frames(frames, image_size)
    else:
        s2 = load_media(record, num_frames, image_size, budget=budget).frames
    boxes = np.asarray(record.track_boxes, np.float32)
    visible = np.ones(len(boxes), bool) if record.track_visible is None else np.asarray(record.track_visible, bool)
    idx = _record_frame_index(record, media, len(boxes))
    out = {SAM2_FRAMES: np.asarray(s2, np.float32).astype(_np_dtype(dtype)),
           "gt_track_boxes": boxes[idx], "gt_track_visible": visible[idx]}
    if record.track_masks:
        midx = _record_frame_index(record, media, len(record.track_masks))
        masks = np.stack([rle_decode(record.track_masks[j], budget) for j in midx]).astype(bool)
        out["gt_track_masks"], out["gt_has_masks"] = masks, np.bool_(True)
    else:
        h, w = media.source_size
        out["gt_track_masks"], out["gt_has_masks"] = np.zeros((len(idx), h, w), bool), np.bool_(False)
    out["gt_frame_size"] = np.asarray(out["gt_track_masks"].shape[1:], np.int32)
    return out


def _tracking_rows(model_cfg: TPOConfig, budget: MediaBudget):
    """`build` for `Prepare.example`: a `mask` example with its `tracking_fields`."""
    def build(record, media, spec, tok, *, seed):
        out = build_example(record, media, spec, tok, seed=seed)
        out.update(tracking_fields(record, media, spec.num_frames, model_cfg.sam2.image_size,
                                   model_cfg.sam2.dtype, budget))
        return out
    return build


def collate_tracking(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`collate`, the ground-truth masks zero-padded to the largest frame size among the examples."""
    if "gt_track_masks" not in examples[0]:
        return collate(examples)
    h = max(e["gt_track_masks"].shape[1] for e in examples)
    w = max(e["gt_track_masks"].shape[2] for e in examples)
    padded = []
    for e in examples:
        m = e["gt_track_masks"]
        padded.append(dict(e, gt_track_masks=np.pad(m, ((0, 0), (0, h - m.shape[1]), (0, w - m.shape[2])))))
    return collate(padded)


def eval_batches(data_cfg: DataConfig, model_cfg: TPOConfig, split: str = "validation",
                 num_examples: int | None = None, tasks: Sequence[str] | None = None, *,
                 sources: Mapping[str, Any] | None = None, tracking: bool = True) -> dict[str, list[dict]]:
    """Deterministic evaluation batches per task: records 0, 1, 2, … of each task's `split` source (bad
    ones skipped and counted as in training), `ceil(num_examples / batch_size)` full batches each.

    Task `MC_CLOZE` reads the `mc` source: the first `num_examples` good records, each as one row per
    option (`_cloze_rows`), the last batch filled with padding rows (`cloze_question` −1). With `tracking`,
    `mask` batches also carry `SAM2_FRAMES` and `TRACK_GT_FIELDS` (`tracking_fields`) for the tracking metrics
    (J&F, success AUC, precision); no other batch does."""
    data_cfg.validate()
    tasks = list(tasks or TASKS)
    n = data_cfg.eval_examples if num_examples is None else num_examples
    if sources is None:
        sources = task_sources(data_cfg, model_cfg, split, sorted({"mc" if t == MC_CLOZE else t for t in tasks}))
    prep = Prepare(sources, example_spec(data_cfg, model_cfg), data_cfg.seed, data_cfg.budget, model_cfg)
    prep.tokenizer  # noqa: B018  (a tokenizer that does not fit the model fails here)
    bs = data_cfg.batch_size
    out = {}
    for task in tasks:
        if task == MC_CLOZE:
            rows = [row for rows in _good_examples(prep, "mc", n, data_cfg, split, cloze=True) for row in rows]
            if rows:
                rows += [dict(rows[0], cloze_question=np.int32(-1))] * (-len(rows) % bs)
                out[task] = [collate(rows[j:j + bs]) for j in range(0, len(rows), bs)]
            continue
        want = math.ceil(n / bs) * bs
        build = _tracking_rows(model_cfg, data_cfg.budget) if task == "mask" and tracking else None
        examples = _good_examples(prep, task, want, data_cfg, split, build=build)
        if not examples:
            continue
        examples = [examples[j % len(examples)] for j in range(want)]  # a small split: repeat from the start
        out[task] = [collate_tracking(examples[j:j + bs]) for j in range(0, len(examples) - bs + 1, bs)]
    return out


def _good_examples(prep: Prepare, task: str, want: int, data_cfg: DataConfig, split: str, *,
                   cloze: bool = False, build=None) -> list:
    """The examples of records 0, 1, 2, … of `task` until `want` are good (bad ones skipped and counted
    as in training); with `cloze`, each good record's list of cloze rows (`_cloze_rows`); `build` replaces
    `build_example`."""
    examples, bad, i, size = [], 0, 0, len(prep.sources[task])
    skips = SkipCounter()
    while len(examples) < want and i < size:
        ex = prep.example(task, i, i, build=_cloze_rows(len(examples)) if cloze else (build or build_example))
        i += 1
        if isinstance(ex, Bad):
            bad += 1
            skips.add(ex.kind, ex.record_id)
            log.warning("skipping bad %s record %s [%s]: %s", split, ex.record_id, ex.kind, ex.message)
            if bad > data_cfg.max_bad_fraction * max(i, data_cfg.bad_check_after):
                raise DataError(f"{bad} of {i} {split} records of task {task!r} were bad, more than "
                                f"max_bad_fraction={data_cfg.max_bad_fraction}; {skips.summary()}; "
                                f"last: {ex.record_id}: {ex.message}")
        else:
            examples.append(ex)
    return examples

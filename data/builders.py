"""TFDS dataset builders that store `Record`s as ArrayRecord files (stored form: `tpo_jax.data.record_codec`).

Reading needs no TF: `tfds.builder_from_directory(dir).as_data_source()`, wrapped by
`tpo_jax.data.stored_source.open_task_sources` for the pipeline. Command line: `tpo-build-data`
(`tpo_jax.cli.build_data`).

Layout: `<data_dir>/<name>/<version>/` with `dataset_info.json`, `features.json`, `metadata.json`
(bad-record counts) and one ArrayRecord file set per split *and task*, named `<split>_<task>`
(e.g. `train_region`), so the pipeline can mix tasks with its own weights.

| builder        | records from                                   | media stored as (option `storage`)              |
|----------------|------------------------------------------------|-------------------------------------------------|
| `TpoSynthetic` | `tpo_jax.data.synthetic` (`SyntheticConfig`, sizes)    | "jpeg" (default), "sampled_jpeg", "video" (MP4), "raw" (uint8) |
| `TpoRecords`   | annotation files via `tpo_jax.data.formats.iter_records` | "sampled_jpeg" (default), "video" (the file's bytes), "jpeg" (every frame), "raw" |

Bad records (parse errors, unreadable media, media over the `MediaBudget`: every medium is decoded at build
time) are skipped, counted in `metadata.json` (in total and per reason kind) and logged; when more than
`max_bad_fraction` of all the records to build are bad, the build stops with one error naming the counts per
kind and a few record ids. The fraction is judged against the total number of records (every annotation file
is parsed before anything is written), so bad records that come first do not stop a healthy dataset.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import tensorflow_datasets as tfds
from etils import epath

from tpo_jax.data.formats import iter_records
from tpo_jax.data.record_codec import DEFAULT_NUM_FRAMES, DEFAULT_SIZE, STORAGES, VERSION, features, record_to_example
from tpo_jax.data.records import TASKS, DataError, MediaBudget, Record, RecordError, as_record_error
from tpo_jax.data.synthetic import SyntheticConfig, SyntheticSource

log = logging.getLogger(__name__)


class _BadCounter:
    """Good / bad records of one build, bad ones per reason kind. The threshold is judged against `total`, the
    number of records the build will see (known before writing starts): bad > max_bad_fraction × total stops
    the build as soon as it is certain (bad only grows), never because bad records came first."""

    def __init__(self, max_bad_fraction: float, check_after: int):
        from tpo_jax.data.pipeline import SkipCounter  # noqa: PLC0415  (pipeline imports grain: only when building)

        self.max_bad_fraction, self.check_after = max_bad_fraction, check_after
        self.seen, self.bad = 0, 0
        self.total: int | None = None
        self.skips = SkipCounter()

    def good(self):
        self.seen += 1

    def fail(self, where: str, error: Exception):
        self.seen += 1
        self.bad += 1
        kind = getattr(error, "kind", "internal")
        self.skips.add(kind, where)
        log.warning("skipping bad record %s [%s]: %s", where, kind, error)
        self.check(where, error)

    def check(self, where: str = "", error: Exception | None = None):
        total = self.total if self.total is not None else max(self.seen, self.check_after)
        if self.bad > self.max_bad_fraction * total:
            last = f"; last: {where}: {error}" if error is not None else ""
            raise DataError(f"{self.bad} of {total} records were bad, more than max_bad_fraction="
                            f"{self.max_bad_fraction}; {self.skips.summary()}{last}")


class _RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery: per (split, task) generators of stored records, bad-record accounting."""

    VERSION = tfds.core.Version(VERSION)

    # tfds' default looks the module up with `importlib_resources` (not installed); the file is enough.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, storage: str, quality: int = 90, num_frames: int | None = None,
                 size: int | Sequence[int] | None = None, model_config=None, max_bad_fraction: float = 0.05,
                 bad_check_after: int = 100, budget: MediaBudget | None = None, data_dir: str, **kwargs):
        """`num_frames` / `size` of "sampled_jpeg": given, else the model config's `vit.num_frames` /
        `vit.img_size`, else 16 / 224 (MODEL-SPEC §8.2). `budget`: the `MediaBudget` media are decoded under
        (and annotation sizes checked against) at build time."""
        self.budget = (budget or MediaBudget()).validate()
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        vit = getattr(model_config, "vit", None)
        self.num_frames = int(num_frames or (vit.num_frames if vit else DEFAULT_NUM_FRAMES))
        self.size = size or (vit.img_size if vit else DEFAULT_SIZE)
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        self.storage, self.quality = storage, quality
        self._bad = _BadCounter(max_bad_fraction, bad_check_after)
        super().__init__(data_dir=data_dir, file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=features(), metadata=tfds.core.MetadataDict(),
                                     description=(self.__doc__ or "").strip().splitlines()[0])

    def _records(self) -> dict[tuple[str, str], Iterable[Record]]:
        raise NotImplementedError

    def _group_size(self, key: tuple[str, str]) -> int:
        """Records of a group whose iterable has no len (generators)."""
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        groups = self._records()
        self._bad.total = self._bad.seen + sum(len(r) if hasattr(r, "__len__") else self._group_size(k)
                                               for k, r in groups.items())
        self._bad.check()
        return {f"{split}_{task}": self._generate_examples(records, f"{split}_{task}")
                for (split, task), records in groups.items()}

    def _generate_examples(self, records: Iterable[Record], name: str = ""):
        written = 0
        for record in records:
            try:
                ex = record_to_example(record, self.storage, self.quality, num_frames=self.num_frames,
                                       size=self.size, budget=self.budget)
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001  (any failure of one record's media is that record's)
                self._bad.fail(getattr(record, "id", "?"), as_record_error(e, f"record {getattr(record, 'id', '?')!r}",
                                                                           "decode"))
                continue
            self._bad.good()
            written += 1
            yield record.id, ex
        self.info.metadata.update(records_seen=self._bad.seen, bad_records=self._bad.bad,
                                  bad_by_kind=dict(self._bad.skips.by_kind))
        log.info("%s: %d records (%d bad so far)", name, written, self._bad.bad)

    # tfds prints "Downloading and preparing dataset ..." and "... downloaded and prepared" to stdout: a log line
    def _log_download_bytes(self) -> None:
        log.info("building %s in %s", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        log.info("built %s: %d records, %d bad", self.data_dir, self._bad.seen - self._bad.bad, self._bad.bad)


class TpoSynthetic(_RecordBuilder, skip_registration=True):
    """The synthetic TPO dataset (`tpo_jax.data.synthetic`) stored as ArrayRecord."""

    def __init__(self, synthetic=None, *, sizes: Mapping[str, int] | None = None, tasks: Sequence[str] = TASKS,
                 seed: int = 0, storage: str = "jpeg", **kwargs):
        self.synthetic = (synthetic or SyntheticConfig()).validate()
        self.sizes = dict(sizes or {"train": 1000, "validation": 64})
        self.tasks, self.seed = tuple(tasks), seed
        super().__init__(storage=storage, **kwargs)

    def _records(self):
        def records(src, n):
            return (src[i] for i in range(min(n, len(src))))

        return {(split, task): records(SyntheticSource(self.synthetic, task, split, self.seed), n)
                for split, n in self.sizes.items() for task in self.tasks}

    def _group_size(self, key):
        split, task = key
        return min(self.sizes[split], len(SyntheticSource(self.synthetic, task, split, self.seed)))


class TpoRecords(_RecordBuilder, skip_registration=True):
    """Real annotation files (`tpo_jax.data.formats`) stored as ArrayRecord."""

    def __init__(self, inputs: Sequence[Mapping[str, Any]], *, storage: str = "sampled_jpeg", **kwargs):
        """inputs: dicts {"path", "format", "split" ("train"), "media_root" (None), "options" ({})}.
        kwargs: `num_frames`, `size`, `model_config` (for "sampled_jpeg"), `quality`, `max_bad_fraction`, …"""
        self.inputs = [dict(i) for i in inputs]
        for i in self.inputs:
            if "path" not in i or "format" not in i:
                raise ValueError(f"each input needs 'path' and 'format', got {i}")
        super().__init__(storage=storage, **kwargs)

    def _records(self):
        groups: dict[tuple[str, str], list[Record]] = {}
        for spec in self.inputs:
            split = spec.get("split", "train")
            options = dict(spec.get("options", {}))
            options.setdefault("budget", self.budget)
            try:
                for r in iter_records(spec["path"], spec["format"], spec.get("media_root"), **options):
                    if isinstance(r, RecordError):
                        self._bad.seen += 1  # judged once all files are parsed (_split_generators)
                        self._bad.bad += 1
                        self._bad.skips.add(r.kind, str(r).split(": ", 1)[0])
                        log.warning("skipping bad record [%s]: %s", r.kind, r)
                    else:
                        groups.setdefault((split, r.task), []).append(r)
            except RecordError as e:  # raised, not yielded: the file as a whole (missing, not JSON, unknown format)
                raise DataError(f"input {spec['path']} ({spec['format']}): {e}") from e
        return groups


def build(builder: _RecordBuilder) -> str:
    """Build (if not built yet) and return the dataset directory `<data_dir>/<name>/<version>`."""
    builder.download_and_prepare()
    return os.fspath(builder.data_dir)

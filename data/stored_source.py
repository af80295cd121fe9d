"""Random-access readers of the datasets the builders wrote (`tpo_jax.data.builders`): `Record`s of one
`<split>_<task>` over one or more dataset directories, decoded by `tpo_jax.data.record_codec`. The grain
pipeline (`tpo_jax.data.pipeline`) reads them through `open_task_sources`; reading needs no TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from tpo_jax.data.record_codec import example_to_record
from tpo_jax.data.records import DataError, Record


class StoredSource:
    """Random-access Records of one `<split>_<task>` over one or more built datasets."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return example_to_record(self.sources[k][int(index - self.offsets[k])])


def open_task_sources(paths: Sequence[str], split: str, tasks: Sequence[str]) -> dict[str, StoredSource]:
    """{task: StoredSource} of `split` over the dataset directories `paths`; a task none of them holds
    is an error naming what they do hold."""
    per_task: dict[str, list] = {t: [] for t in tasks}
    available: set[str] = set()
    for path in paths:
        try:
            builder = tfds.builder_from_directory(os.fspath(path))
        except Exception as e:  # tfds raises several types for a missing / malformed directory
            raise DataError(f"{path}: not a built dataset directory (dataset_info.json, features.json) ({e})") from e
        splits = builder.as_data_source()
        available |= set(splits)
        for t in tasks:
            if f"{split}_{t}" in splits:
                per_task[t].append(splits[f"{split}_{t}"])
    missing = [t for t, s in per_task.items() if not s]
    if missing:
        raise DataError(f"no {split!r} records of task(s) {missing} in {list(paths)} (splits there: "
                        f"{sorted(available)}); set data.weights to the tasks you have")
    return {t: StoredSource(s) for t, s in per_task.items()}

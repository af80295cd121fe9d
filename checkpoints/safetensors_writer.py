"""Streaming safetensors writer: the header is written first (all names, dtypes and shapes are known from the
export plan), then tensors one at a time at their offsets, so only one tensor is in memory at a time.
Checkpoints above `max_shard_bytes` are split into `model-0000k-of-0000n.safetensors` plus an index, as
Hugging Face does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.sources import DTYPE_NAMES


class SafetensorsWriter:
    """One file. `entries` = [(key, dtype, shape)] in file order; `write(key, array)` in any order; `close()`."""

    def __init__(self, path: str | Path, entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = str(path)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        offset = 0
        for key, dtype, shape in entries:
            dtype = np.dtype(dtype)
            if dtype not in DTYPE_NAMES:
                raise ConversionError(f"dtype {dtype} cannot be stored in safetensors", file=self.path, key=key)
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.entries[key] = (dtype, tuple(shape), offset, offset + n)
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        self.written: set[str] = set()
        self._f = open(self.path, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)
        self._f.truncate(self.size)

    def write(self, key: str, array: np.ndarray) -> None:
        if key not in self.entries:
            raise ConversionError("not in this file's header", file=self.path, key=key)
        dtype, shape, begin, end = self.entries[key]
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise ConversionError(f"expected {dtype} {shape}, got {array.dtype} {tuple(array.shape)}",
                                  file=self.path, key=key)
        self._f.seek(self.data_start + begin)
        self._f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        self.written.add(key)

    def close(self) -> None:
        self._f.close()
        missing = [k for k in self.entries if k not in self.written]
        if missing:
            raise ConversionError(f"{len(missing)} tensors were never written", file=self.path, key=missing[0])


class ShardedWriter:
    """Several files of at most `max_shard_bytes` each (a tensor is never split) plus `<stem>.safetensors.index.json`;
    a single file is named `<stem>.safetensors`."""

    def __init__(self, directory: str | Path, entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]], *,
                 stem: str = "model", max_shard_bytes: int = 5 * 1024 ** 3):
        directory = Path(directory)
        shards: list[list] = [[]]
        size = 0
        total = 0
        for e in entries:
            n = int(np.prod(e[2], dtype=np.int64)) * np.dtype(e[1]).itemsize
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += n
            total += n
        count = len(shards)
        names = ([f"{stem}.safetensors"] if count == 1 else
                 [f"{stem}-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)])
        self.writers = [SafetensorsWriter(directory / name, shard) for name, shard in zip(names, shards)]
        self.where = {e[0]: w for w, shard in zip(self.writers, shards) for e in shard}
        self.files = [directory / n for n in names]
        if count > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {e[0]: name for name, shard in zip(names, shards) for e in shard}}
            (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
            self.files.append(directory / f"{stem}.safetensors.index.json")

    def write(self, key: str, array: np.ndarray) -> None:
        self.where[key].write(key, array)

    def close(self) -> None:
        for w in self.writers:
            w.close()

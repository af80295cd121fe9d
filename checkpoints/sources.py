"""Reading PyTorch checkpoints one tensor at a time.

* safetensors (single file, or sharded with a `*.safetensors.index.json`): the header is parsed here (8-byte
  little-endian length + JSON), every entry is checked against the file size up front (a truncated file is
  reported before anything is converted), and `read` fills one NumPy array straight from the file (no torch,
  no memory map; bfloat16 / float8 through `ml_dtypes`).
* PyTorch pickles (`.bin`, `.pt`, `.pth`, also sharded via `pytorch_model.bin.index.json`): loaded with
  `torch.load(weights_only=True, mmap=True)`; a pickle that would run code is refused.

`open_source(path)` accepts a file, an index file, or a directory holding one of them, and returns a
`TensorSource`: `meta` (key -> shape, dtype, file) and `read(key) -> np.ndarray`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.mapping import Meta

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class TensorSource:
    """Key -> (shape, dtype, file) metadata plus one-tensor-at-a-time reads."""

    def __init__(self, meta: Mapping[str, Meta], readers: Mapping[str, "object"], description: str):
        self.meta = dict(meta)
        self._readers = readers  # file -> reader with .read(key)
        self.description = description

    def read(self, key: str) -> np.ndarray:
        m = self.meta[key]
        return self._readers[m.file].read(key)

    def merged_with(self, other: "TensorSource") -> "TensorSource":
        for k in other.meta:
            if k in self.meta:
                raise ConversionError(f"key also present in {self.meta[k].file}", file=other.meta[k].file, key=k)
        return TensorSource({**self.meta, **other.meta}, {**self._readers, **other._readers},
                            f"{self.description} + {other.description}")


# ------------------------------------------------------------------------------------------------ safetensors

class SafetensorsFile:
    """One `.safetensors` file: header parsed and validated on open, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ConversionError(f"not a safetensors file: only {size} bytes", file=self.path)
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise ConversionError(f"corrupt or truncated safetensors file: header length {n} does not fit "
                                          f"in the file's {size} bytes", file=self.path)
                raw = f.read(n)
        except OSError as e:
            raise ConversionError(f"cannot read: {e.strerror or e}", file=self.path) from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"corrupt safetensors header (not JSON: {e})", file=self.path) from None
        if not isinstance(header, dict):
            raise ConversionError("corrupt safetensors header (not a JSON object)", file=self.path)
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        available = size - self.data_start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, e in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"corrupt header entry {e!r} (dtype must be one of "
                                      f"{sorted(SAFETENSORS_DTYPES)})", file=self.path, key=key) from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if any(d < 0 for d in shape) or end - begin != nbytes or begin < 0:
                raise ConversionError(f"corrupt header: offsets {begin}..{end} do not hold {e['dtype']} "
                                      f"{list(shape)} ({nbytes} bytes)", file=self.path, key=key)
            if end > available:
                raise ConversionError(f"file is truncated: the tensor needs bytes {begin}..{end} of the data "
                                      f"section, but the file holds only {available}", file=self.path, key=key)
            self.entries[key] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def meta(self) -> dict[str, Meta]:
        return {k: Meta(s, d, self.path) for k, (d, s, _, _) in self.entries.items()}

    def read(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[key]
        out = np.empty(shape, dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(buf) if end > begin else 0
        if got != end - begin:
            raise ConversionError(f"file is truncated: read {got} of {end - begin} bytes", file=self.path, key=key)
        return out


# ------------------------------------------------------------------------------------------------ torch pickles

class TorchFile:
    """A `torch.save`d state dict, loaded with weights_only=True (no code runs) and memory-mapped if possible."""

    def __init__(self, path: str | os.PathLike):
        import torch

        self.path = str(path)
        if not os.path.exists(self.path):
            raise ConversionError("file not found", file=self.path)
        try:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                    raise
                obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several types; report one clear error
            text = str(e).strip().splitlines()
            reason = next((ln for ln in text if "GLOBAL" in ln or "Unsupported" in ln), text[0] if text else "")
            if "weights_only" in str(e) or "GLOBAL" in str(e) or "Unsupported" in str(e):
                raise ConversionError("refusing to load: the pickle is not a plain tensor state dict and would "
                                      f"run code or construct arbitrary objects ({reason.strip()})",
                                      file=self.path) from None
            raise ConversionError(f"cannot load PyTorch file: {reason.strip() or type(e).__name__}",
                                  file=self.path) from None
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and set(obj) == {wrapper} and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict):
            raise ConversionError(f"expected a state dict (dict of tensors), got {type(obj).__name__}", file=self.path)
        self.tensors = {}
        for k, v in obj.items():
            if not isinstance(v, torch.Tensor):
                raise ConversionError(f"expected a tensor, got {type(v).__name__}", file=self.path, key=str(k))
            self.tensors[str(k)] = v

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self) -> dict[str, Meta]:
        return {k: Meta(tuple(v.shape), _numpy_dtype(v.dtype, self.path, k), self.path)
                for k, v in self.tensors.items()}

    def read(self, key: str) -> np.ndarray:
        import torch

        t = self.tensors[key].detach().contiguous()
        dtype = _numpy_dtype(t.dtype, self.path, key)
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(dtype).copy()
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return t.view(torch.uint8).numpy().view(dtype).copy()
        return t.numpy().copy()


def _numpy_dtype(torch_dtype, file: str, key: str) -> np.dtype:
    import torch

    table = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
             torch.bfloat16: ml_dtypes.bfloat16, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
             torch.float8_e5m2: ml_dtypes.float8_e5m2, torch.int64: np.int64, torch.int32: np.int32,
             torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}
    if torch_dtype not in table:
        raise ConversionError(f"unsupported tensor dtype {torch_dtype}", file=file, key=key)
    return np.dtype(table[torch_dtype])


# ------------------------------------------------------------------------------------------------ resolving paths

def _open_file(path: Path):
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in PICKLE_SUFFIXES:
        return TorchFile(path)
    raise ConversionError("unknown checkpoint file type (expected .safetensors, .bin, .pt, .pth or an "
                          "index .json)", file=str(path))


def _from_files(files: Iterable, description: str) -> TensorSource:
    meta: dict[str, Meta] = {}
    readers = {}
    for f in files:
        readers[f.path] = f
        for k, m in f.meta().items():
            if k in meta:
                raise ConversionError(f"key also present in {meta[k].file}", file=f.path, key=k)
            meta[k] = m
    return TensorSource(meta, readers, description)


def _from_index(index: Path) -> TensorSource:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except FileNotFoundError:
        raise ConversionError("index file not found", file=str(index)) from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConversionError("not a sharded-checkpoint index (expected JSON with a 'weight_map' object)",
                              file=str(index)) from None
    shards = {}
    for name in dict.fromkeys(weight_map.values()):
        shard = index.parent / name
        if not shard.exists():
            key = next(k for k, v in weight_map.items() if v == name)
            raise ConversionError(f"shard file '{shard}' listed in the index is missing", file=str(index), key=key)
        shards[name] = _open_file(shard)
    source = _from_files(shards.values(), str(index))
    held = {name: set(f.keys()) for name, f in shards.items()}
    for key, name in weight_map.items():
        if key not in held[name]:
            raise ConversionError(f"the index puts this key in '{name}', but that shard does not contain it",
                                  file=str(index), key=key)
    return source


def open_source(path: str | os.PathLike) -> TensorSource:
    """A file (.safetensors / .bin / .pt / .pth), an index (*.index.json) or a directory holding one."""
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                     "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin"):
            if (p / name).exists():
                return open_source(p / name)
        candidates = sorted(p.glob("*.safetensors"))
        if len(candidates) == 1:
            return open_source(candidates[0])
        raise ConversionError("no checkpoint found in directory (expected model.safetensors[.index.json], "
                              "pytorch_model.bin[.index.json] or a single *.safetensors)", file=str(p))
    if not p.exists():
        raise ConversionError("file not found", file=str(p))
    if p.name.endswith(".json"):
        return _from_index(p)
    return _from_files([_open_file(p)], str(p))

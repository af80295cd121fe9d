"""Reading PyTorch checkpoints one tensor at a time, from untrusted files.

* safetensors (single file, or sharded with a `*.safetensors.index.json`): the header is parsed and validated
  here exactly as strictly as the `safetensors` library does (`parse_header`: header length within the file and
  at most 100,000,000 bytes, UTF-8 JSON object, known dtypes, integer shapes and offsets, every entry's byte
  length = its element count x item size, entries tiling the data section with no overlap and no gap, the file
  ending at the last tensor's end), and `read` fills one NumPy array straight from the file (no torch, no memory
  map; bfloat16 / float8 through `ml_dtypes`). Nothing but the header is read to validate.
* PyTorch pickles (`.bin`, `.pt`, `.pth`, also sharded via `pytorch_model.bin.index.json`): loaded with
  `torch.load(weights_only=True, mmap=True)`; a pickle that would run code is refused.

Confinement: every file read is inside the checkpoint directory (`checkpoint_root`: the directory named, or
the one holding the file named; for a Hugging Face hub snapshot `.../models--X/snapshots/<rev>/` the repository
folder `models--X`, whose `blobs/` the snapshot's symlinks point into). Index entries must be relative names
without `..`; a symlink whose real path leaves the directory is refused; only regular files are opened (a FIFO,
device, socket or directory named like a checkpoint file is refused after `os.stat`, never opened for blocking
reads).

`open_source(path)` accepts a file, an index file, or a directory holding one of them, and returns a
`TensorSource`: `meta` (key -> shape, dtype, file) and `read(key) -> np.ndarray`. Every failure is a
`ConversionError` naming the file (and the key when there is one).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat as stat_mod
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping, NamedTuple

import ml_dtypes
import numpy as np

from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.mapping import Meta

# the dtypes tpo-convert reads (safetensors name -> NumPy dtype)
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# every dtype of the safetensors format (0.8) and its size in bits: a header naming any of them is valid, one
# outside SAFETENSORS_DTYPES is refused afterwards as "not supported by tpo-convert"
FORMAT_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
MAX_HEADER_BYTES = 100_000_000      # the safetensors library's limit
MAX_JSON_DEPTH = 127                # serde_json's recursion limit, counted as nested objects/arrays
MAX_INDEX_BYTES = 64 * 2 ** 20      # an index of a 7B model is ~25 KB
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_U64 = 2 ** 64


def _short(value, limit: int = 80) -> str:
    text = repr(dict(value) if isinstance(value, _Obj) else value)
    return text if len(text) <= limit else text[:limit - 5] + " ...]"


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


# ------------------------------------------------------------------------------------------------ files

def _kind(mode: int) -> str:
    for test, name in ((stat_mod.S_ISDIR, "a directory"), (stat_mod.S_ISFIFO, "a FIFO"),
                       (stat_mod.S_ISCHR, "a character device"), (stat_mod.S_ISBLK, "a block device"),
                       (stat_mod.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def checkpoint_root(path: str | os.PathLike) -> str:
    """The directory every file of the checkpoint at `path` must resolve into (module docstring)."""
    p = Path(path)
    root = os.path.realpath(p if p.is_dir() else p.parent)
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots" and os.path.isdir(os.path.join(os.path.dirname(parent), "blobs")):
        root = os.path.dirname(parent)  # Hugging Face hub cache: snapshots/<rev>/* -> ../../blobs/<hash>
    return root


def confined(path: str | os.PathLike, root: str | None, *, label: str | None = None) -> str:
    """The real path of `path` if it resolves inside `root` (None: anywhere) to a regular file; else one
    ConversionError naming `label` (default: `path` as given). Nothing is opened."""
    label = str(path) if label is None else label
    try:
        real = os.path.realpath(path)
        if root is not None and os.path.commonpath([real, root]) != root:
            raise ConversionError(f"resolves to {real}, outside the checkpoint directory {root}; checkpoint "
                                  f"files (and symlinks to them) must stay inside it", file=label)
        st = os.stat(real)
    except ConversionError:
        raise
    except FileNotFoundError:
        what = "dangling symlink" if os.path.islink(path) else "file not found"
        raise ConversionError(what, file=label) from None
    except (OSError, ValueError) as e:  # ELOOP, EACCES, ENAMETOOLONG, embedded NUL byte
        raise ConversionError(f"cannot read: {getattr(e, 'strerror', None) or e}", file=label) from None
    if not stat_mod.S_ISREG(st.st_mode):
        raise ConversionError(f"not a regular file ({_kind(st.st_mode)}); a checkpoint file must be a regular "
                              f"file", file=label)
    return real


def open_regular(real: str, label: str) -> tuple[BinaryIO, os.stat_result]:
    """Open a file for reading only if it is a regular file (checked on the open descriptor too, so a file
    swapped for a FIFO after `confined` fails instead of blocking)."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read: {getattr(e, 'strerror', None) or e}", file=label) from None
    st = os.fstat(fd)
    if not stat_mod.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConversionError(f"not a regular file ({_kind(st.st_mode)}); a checkpoint file must be a regular "
                              f"file", file=label)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), st


def read_json_file(path: str | os.PathLike, root: str | None = None, *, limit: int = MAX_INDEX_BYTES):
    """A small JSON file (index, config) read under the same rules as checkpoint files."""
    label = str(path)
    f, st = open_regular(confined(path, root, label=label), label)
    with f:
        if st.st_size > limit:
            raise ConversionError(f"{st.st_size} bytes is too large for a JSON index / config file (limit "
                                  f"{limit})", file=label)
        raw = f.read(min(st.st_size, limit) + 1)  # read(n) allocates n bytes up front: ask only for the file's size
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise ConversionError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=label) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, NaN / Infinity
        raise ConversionError(f"not valid JSON ({' '.join(str(e).split())[:120]})", file=label) from None


# ------------------------------------------------------------------------------------------------ safetensors header

class _Obj(list):
    """A JSON object as its (key, value) pairs, duplicates kept (the library treats some as errors)."""


class _BadNumber(ValueError):
    pass


def _no_constant(name: str):
    raise _BadNumber(f"{name} is not JSON")


def _parse_int(text: str):
    # serde_json reads -0 and integers outside i64/u64 as floats (so they are not valid sizes or offsets)
    if text == "-0":
        return -0.0
    digits = len(text.lstrip("-"))
    if digits <= 20:
        value = int(text)
        if -2 ** 63 <= value < _U64:
            return value
    return _parse_float(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _BadNumber(f"number out of range: {text[:40]}")
    return value


def _check_tree(value) -> None:
    """serde_json's other limits: nesting depth and no unpaired surrogate escapes in strings."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ConversionError("corrupt safetensors header (a string holds an unpaired surrogate escape)")
        elif isinstance(v, list):  # arrays and _Obj
            if depth > MAX_JSON_DEPTH:
                raise ConversionError(f"corrupt safetensors header (nested deeper than {MAX_JSON_DEPTH} levels)")
            for item in v:
                if isinstance(v, _Obj):
                    stack.append((item[0], depth + 1))
                    stack.append((item[1], depth + 1))
                else:
                    stack.append((item, depth + 1))


class Entry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class Header(NamedTuple):
    size: int                # header length n
    data_start: int          # 8 + n
    metadata: dict[str, str]
    entries: dict[str, Entry]


def _is_size(x) -> bool:
    return type(x) is int and 0 <= x < _U64


def _entry(key: str, value) -> Entry:
    def bad(what):
        return ConversionError(f"corrupt safetensors header entry: {what}", key=key)

    if isinstance(value, _Obj):
        fields = {}
        for name, v in value:
            if name in ("dtype", "shape", "data_offsets"):
                if name in fields:
                    raise bad(f"field '{name}' appears twice")
                fields[name] = v
        for name in ("dtype", "shape", "data_offsets"):
            if name not in fields:
                raise bad(f"missing field '{name}'")
        dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    elif isinstance(value, list):  # the library also reads an entry written as [dtype, shape, data_offsets]
        if len(value) != 3:
            raise bad(f"expected an object with dtype, shape, data_offsets, got a list of {len(value)} items")
        dtype, shape, offsets = value
    else:
        raise bad(f"expected an object with dtype, shape, data_offsets, got {_short(value)}")
    if not isinstance(dtype, str) or dtype not in FORMAT_DTYPE_BITS:
        raise bad(f"dtype {_short(dtype)} is not a safetensors dtype (one of {', '.join(FORMAT_DTYPE_BITS)})")
    if not isinstance(shape, list) or isinstance(shape, _Obj) or not all(_is_size(d) for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {_short(shape)}")
    if (not isinstance(offsets, list) or isinstance(offsets, _Obj) or len(offsets) != 2
            or not all(_is_size(x) for x in offsets)):
        raise bad(f"data_offsets must be two non-negative integers [begin, end], got {_short(offsets)}")
    return Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _entry_bytes(key: str, e: Entry) -> int:
    count = 1
    for d in e.shape:  # the library multiplies in order and fails on the first overflow
        count *= d
        if count >= _U64:
            raise ConversionError(f"corrupt safetensors header entry: shape {_short(list(e.shape))} overflows "
                                  f"64 bits", key=key)
    bits = count * FORMAT_DTYPE_BITS[e.dtype]
    if bits >= _U64:
        raise ConversionError(f"corrupt safetensors header entry: {e.dtype} {_short(list(e.shape))} overflows "
                              f"64 bits", key=key)
    if bits % 8:
        raise ConversionError(f"corrupt safetensors header entry: {count} {e.dtype} elements are not a whole "
                              f"number of bytes", key=key)
    return bits // 8


def parse_header(f: BinaryIO, file_size: int) -> Header:
    """Read and validate the header of the safetensors file open as `f` (at offset 0, `file_size` bytes).

    Accepts exactly what the `safetensors` library (0.8, `SafeTensors::read_metadata`) accepts, reading only the
    header. Raises ConversionError (without `file`; `SafetensorsFile` adds it) on the first problem."""
    head = f.read(8)
    if len(head) < 8:
        raise ConversionError(f"not a safetensors file: only {file_size} bytes (the header length alone takes 8)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        limit = "exceeds the format's limit of 100,000,000 bytes" if n > MAX_HEADER_BYTES else \
            f"does not fit in the file's {file_size} bytes"
        raise ConversionError(f"corrupt or truncated safetensors file: header length {n} {limit}")
    raw = f.read(n)
    if len(raw) != n:
        raise ConversionError(f"file is truncated: read {len(raw)} of the header's {n} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConversionError(f"corrupt safetensors header (not UTF-8: {e.reason} at byte {8 + e.start})") from None
    try:
        tree = json.loads(text, object_pairs_hook=_Obj, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_no_constant)
    except _BadNumber as e:
        raise ConversionError(f"corrupt safetensors header (not JSON: {e})") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"corrupt safetensors header (not JSON: {e.msg} at byte {8 + e.pos})") from None
    except (ValueError, RecursionError):
        raise ConversionError(f"corrupt safetensors header (not JSON: nested deeper than {MAX_JSON_DEPTH} "
                              f"levels or unreadable)") from None
    if not isinstance(tree, _Obj):
        raise ConversionError(f"corrupt safetensors header (not a JSON object: {_short(tree, 40)})")
    _check_tree(tree)
    metadata: dict[str, str] | None = None
    entries: dict[str, Entry] = {}
    for key, value in tree:
        if key == "__metadata__":
            if metadata is not None:
                raise ConversionError("corrupt safetensors header: '__metadata__' appears twice", key=key)
            if value is not None and (not isinstance(value, _Obj) or not all(isinstance(v, str) for _, v in value)):
                raise ConversionError("corrupt safetensors header: '__metadata__' must map strings to strings, got "
                                      f"{_short(value)}", key=key)
            metadata = dict(value or ())
        else:
            entries[key] = _entry(key, value)  # a repeated tensor name: the last one counts, as in the library
    data_size = file_size - 8 - n
    nbytes = {}
    for key, e in entries.items():
        nbytes[key] = _entry_bytes(key, e)
        if e.end < e.begin:
            raise ConversionError(f"corrupt safetensors header entry: data_offsets [{e.begin}, {e.end}] end "
                                  f"before they begin", key=key)
        if e.end - e.begin != nbytes[key]:
            raise ConversionError(f"corrupt safetensors header entry: offsets {e.begin}..{e.end} ({e.end - e.begin} "
                                  f"bytes) do not hold {e.dtype} {_short(list(e.shape))} ({nbytes[key]} bytes)",
                                  key=key)
        if e.end > data_size:
            raise ConversionError(f"file is truncated: the tensor needs bytes {e.begin}..{e.end} of the data "
                                  f"section, but the file holds only {data_size}", key=key)
    # the entries must tile the data section [0, end) in offset order, and the file must end there
    position, previous = 0, None
    for key, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin < position:
            raise ConversionError(f"corrupt safetensors header: bytes {e.begin}..{e.end} overlap tensor "
                                  f"'{previous}' (bytes ..{position}); tensors must not share bytes", key=key)
        if e.begin > position:
            raise ConversionError(f"corrupt safetensors header: bytes {position}..{e.begin} of the data section "
                                  f"belong to no tensor (gap before this one); the library refuses such files",
                                  key=key)
        position, previous = e.end, key
    if position != data_size:
        raise ConversionError(f"corrupt safetensors file: {data_size - position} bytes after the last tensor's data "
                              f"(the header covers {position} data bytes, the file holds {data_size})")
    return Header(n, 8 + n, metadata or {}, entries)


def _numpy_limit(shape: tuple[int, ...], itemsize: int) -> bool:
    """Whether NumPy can hold an array of this shape (a zero-size tensor may have huge other dimensions)."""
    total = itemsize
    for d in shape:
        if d >= 2 ** 63:
            return False
        total *= max(d, 1)
    return total < 2 ** 63


class SafetensorsFile:
    """One `.safetensors` file: header parsed and validated on open, tensors read on demand.

    `root`: the checkpoint directory the file must resolve into (None: no confinement; it must still be a
    regular file)."""

    def __init__(self, path: str | os.PathLike, root: str | None = None):
        self.path = str(path)
        self._real = confined(path, root, label=self.path)
        f, st = open_regular(self._real, self.path)
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            with f:
                header = parse_header(f, st.st_size)
        except ConversionError as e:
            raise ConversionError(e.detail, file=self.path, key=e.key) from None
        except OSError as e:
            raise ConversionError(f"cannot read: {e.strerror or e}", file=self.path) from None
        self.metadata = header.metadata
        self.data_start = header.data_start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, e in header.entries.items():
            if e.dtype not in SAFETENSORS_DTYPES:
                raise ConversionError(f"dtype {e.dtype} is valid safetensors but tpo-convert cannot convert it "
                                      f"(supported: {', '.join(SAFETENSORS_DTYPES)})", file=self.path, key=key)
            dtype = SAFETENSORS_DTYPES[e.dtype]
            if not _numpy_limit(e.shape, dtype.itemsize):
                raise ConversionError(f"shape {_short(list(e.shape))} is too large for a NumPy array",
                                      file=self.path, key=key)
            self.entries[key] = (dtype, e.shape, e.begin, e.end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def meta(self) -> dict[str, Meta]:
        return {k: Meta(s, d, self.path) for k, (d, s, _, _) in self.entries.items()}

    def read(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[key]
        out = np.empty(shape, dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        f, st = open_regular(self._real, self.path)
        with f:
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
                raise ConversionError("the file changed after its header was read", file=self.path, key=key)
            try:
                f.seek(self.data_start + begin)
                got = f.readinto(buf) if end > begin else 0
            except OSError as e:
                raise ConversionError(f"cannot read: {e.strerror or e}", file=self.path, key=key) from None
        if got != end - begin:
            raise ConversionError(f"file is truncated: read {got} of {end - begin} bytes", file=self.path, key=key)
        return out


# ------------------------------------------------------------------------------------------------ torch pickles

class TorchFile:
    """A `torch.save`d state dict, loaded with weights_only=True (no code runs) and memory-mapped if possible."""

    def __init__(self, path: str | os.PathLike, root: str | None = None):
        import torch

        self.path = str(path)
        real = confined(path, root, label=self.path)
        open_regular(real, self.path)[0].close()  # a FIFO swapped in since `confined` fails here, not in torch
        try:
            try:
                obj = torch.load(real, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                    raise
                obj = torch.load(real, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several types; report one clear error
            raise ConversionError(_torch_load_problem(e), file=self.path) from None
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and set(obj) == {wrapper} and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict):
            raise ConversionError(f"expected a state dict (dict of tensors), got {type(obj).__name__}", file=self.path)
        self.tensors = {}
        for k, v in obj.items():
            if not isinstance(v, torch.Tensor):
                raise ConversionError(f"expected a tensor, got {type(v).__name__}", file=self.path, key=str(k))
            if v.layout != torch.strided or v.is_quantized or v.device.type != "cpu":
                raise ConversionError(f"expected a dense CPU tensor, got layout {v.layout}, device {v.device}"
                                      f"{', quantized' if v.is_quantized else ''}", file=self.path, key=str(k))
            if str(k) in self.tensors:
                raise ConversionError("key appears twice", file=self.path, key=str(k))
            self.tensors[str(k)] = v

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self) -> dict[str, Meta]:
        return {k: Meta(tuple(v.shape), _numpy_dtype(v.dtype, self.path, k), self.path)
                for k, v in self.tensors.items()}

    def read(self, key: str) -> np.ndarray:
        import torch

        try:
            t = self.tensors[key].detach().contiguous()
            dtype = _numpy_dtype(t.dtype, self.path, key)
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(dtype).copy()
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                return t.view(torch.uint8).numpy().view(dtype).copy()
            return t.numpy().copy()
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - a storage the file does not really hold, etc.
            raise ConversionError(f"cannot read tensor: {' '.join(str(e).split())[:200] or type(e).__name__}",
                                  file=self.path, key=key) from None


def _torch_load_problem(e: Exception) -> str:
    """torch.load's multi-paragraph error as one clause: refused code, or a corrupt / foreign file."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    code = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported global" in ln), None)
    if code:
        return ("refusing to load: the pickle is not a plain tensor state dict and would run code or construct "
                f"arbitrary objects ({code[:200]})")
    reason = lines[0].split(". ")[0] if lines else type(e).__name__
    for i, ln in enumerate(lines):  # the unpickler's own reason: on this line, or alone on the next
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            reason = rest or (lines[i + 1] if i + 1 < len(lines) else reason)
            break
    return f"cannot load PyTorch file (corrupt, or not written by torch.save): {reason[:200]}"


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

def _open_file(path: Path, root: str | None):
    if path.suffix == ".safetensors":
        return SafetensorsFile(path, root)
    if path.suffix in PICKLE_SUFFIXES:
        return TorchFile(path, root)
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


def shard_name_problem(name) -> str | None:
    """Why an index's shard name is not a plain relative path inside the checkpoint directory (None: it is)."""
    if not isinstance(name, str):
        return f"the shard must be a file name, got {_short(name, 60)}"
    if not name or "\0" in name:
        return f"the shard name {_short(name, 60)} is empty or holds a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or os.path.isabs(name):
        return (f"the shard name {_short(name, 120)} is an absolute path; index entries must name files inside "
                f"the checkpoint directory")
    if ".." in re.split(r"[/\\]", name):
        return (f"the shard name {_short(name, 120)} contains '..'; index entries must name files inside the "
                f"checkpoint directory")
    return None


def _from_index(index: Path, root: str | None) -> TensorSource:
    data = read_json_file(index, root)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ConversionError("not a sharded-checkpoint index (expected JSON with a 'weight_map' object)",
                              file=str(index))
    for key, name in weight_map.items():
        problem = shard_name_problem(name)
        if problem:
            raise ConversionError(problem, file=str(index), key=key)
    shards = {}
    for name in dict.fromkeys(weight_map.values()):
        shard = index.parent / name
        if not os.path.lexists(shard):
            key = next(k for k, v in weight_map.items() if v == name)
            raise ConversionError(f"shard file '{shard}' listed in the index is missing", file=str(index), key=key)
        shards[name] = _open_file(shard, root)
    source = _from_files(shards.values(), str(index))
    held = {name: set(f.keys()) for name, f in shards.items()}
    for key, name in weight_map.items():
        if key not in held[name]:
            raise ConversionError(f"the index puts this key in '{name}', but that shard does not contain it",
                                  file=str(index), key=key)
    return source


DIRECTORY_NAMES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                   "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")


def open_source(path: str | os.PathLike) -> TensorSource:
    """A file (.safetensors / .bin / .pt / .pth), an index (*.index.json) or a directory holding one.

    Every file read must resolve into `checkpoint_root(path)` and be a regular file (module docstring)."""
    p = Path(path)
    try:
        present = os.path.lexists(p)
    except ValueError:  # a NUL byte in the path
        present = False
    if not present:
        raise ConversionError("file not found", file=str(p))
    root = checkpoint_root(p)
    if p.is_dir():
        for name in DIRECTORY_NAMES:
            if os.path.lexists(p / name):  # also a dangling symlink or a FIFO: reported, not skipped
                return _open_named(p / name, root)
        candidates = sorted(p.glob("*.safetensors"))
        if len(candidates) == 1:
            return _open_named(candidates[0], root)
        raise ConversionError("no checkpoint found in directory (expected model.safetensors[.index.json], "
                              "pytorch_model.bin[.index.json] or a single *.safetensors)", file=str(p))
    return _open_named(p, root)


def _open_named(p: Path, root: str) -> TensorSource:
    if p.name.endswith(".json"):
        return _from_index(p, root)
    return _from_files([_open_file(p, root)], str(p))

"""Seeded hostile-input cases for `tpo-convert` (a case generator and a runner, not a test file).

    cases(rng, n, tmp_dir)   -> iterator of (case_name, case_dir): n small checkpoints built from one tiny valid
                                Mistral checkpoint (12 tensors, 1 layer) and mutated: safetensors headers (byte
                                flips, lying lengths, truncation, trailing bytes, dtype / shape / offset / field /
                                metadata / key mutations, overlaps, gaps, JSON edge cases), sharded indexes
                                (`..`, absolute paths, missing or non-string shards, broken JSON), file-system
                                tricks (FIFOs, directories, symlinks escaping the directory, loops) and PyTorch
                                `.bin` files (truncated, flipped, garbage). Each case directory holds a config.json
                                and is what `tpo-convert hf CASE_DIR OUT` gets.
    run(case_dir, out_dir)   -> "accepted" | "rejected": calls `convert_hf` (what `tpo-convert hf` runs); a
                                ConversionError is "rejected" (after checking that nothing was left at or next
                                to out_dir); anything else propagates (a harness counts it as a failure)
    run_detailed(...)        -> (verdict, message or None)
    library_parity(case_dir) -> (ours, library) header verdicts for single-file safetensors cases, else None:
                                ours = `sources.parse_header` accepts, library = `safetensors.safe_open` accepts
    run_all(...)             -> counts (cases, accepted, rejected, uncaught, hangs, parity mismatches, max time)
                                with a per-case time limit (SIGALRM; main thread only)

`python tests/fuzz_convert.py --n 2000 --seed 0` runs a campaign and prints the counts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import stat
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tpo_jax.checkpoints.convert import convert_hf  # noqa: E402
from tpo_jax.checkpoints.errors import ConversionError  # noqa: E402
from tpo_jax.checkpoints.sources import parse_header  # noqa: E402

HF_CONFIG = {"model_type": "mistral", "vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 12,
             "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": None}
_D, _KV, _F, _V = 8, 4, 12, 11
SHAPES = {"model.embed_tokens.weight": (_V, _D), "model.norm.weight": (_D,), "lm_head.weight": (_V, _D),
          "model.layers.0.input_layernorm.weight": (_D,), "model.layers.0.post_attention_layernorm.weight": (_D,),
          "model.layers.0.self_attn.q_proj.weight": (_D, _D), "model.layers.0.self_attn.k_proj.weight": (_KV, _D),
          "model.layers.0.self_attn.v_proj.weight": (_KV, _D), "model.layers.0.self_attn.o_proj.weight": (_D, _D),
          "model.layers.0.mlp.gate_proj.weight": (_F, _D), "model.layers.0.mlp.up_proj.weight": (_F, _D),
          "model.layers.0.mlp.down_proj.weight": (_D, _F)}


# ------------------------------------------------------------------------------------------------ valid files

class Raw(str):
    """A JSON fragment written verbatim (to build what json.dumps cannot: duplicates, NaN, deep nesting)."""


class Pairs(list):
    """A JSON object as a list of [key, value] pairs (duplicates allowed, order kept)."""


def dump(v) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, Pairs):
        return "{" + ",".join(json.dumps(k) + ":" + dump(x) for k, x in v) + "}"
    if isinstance(v, dict):
        return dump(Pairs([k, x] for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(dump(x) for x in v) + "]"
    return json.dumps(v)


def state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {k: g.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def encode(header: Pairs, data: bytes, *, pad: bool = True) -> bytes:
    raw = dump(header).encode("utf-8", "surrogatepass")
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def safetensors_bytes(sd: dict[str, np.ndarray], metadata: dict | None = None) -> tuple[Pairs, bytes]:
    """(header pairs, data section) of a valid file holding `sd` in order."""
    header = Pairs([["__metadata__", dict(metadata or {"format": "pt"})]])
    chunks, offset = [], 0
    for k, a in sd.items():
        b = np.ascontiguousarray(a).tobytes()
        header.append([k, Pairs([["dtype", "F32"], ["shape", list(a.shape)], ["data_offsets", [offset, offset + len(b)]]])])
        chunks.append(b)
        offset += len(b)
    return header, b"".join(chunks)


def _case_dir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(HF_CONFIG))
    return d


def _entries(header: Pairs) -> list[list]:
    return [p for p in header if p[0] != "__metadata__"]


def _field(entry: Pairs, name: str):
    return next(v for k, v in entry if k == name)


def _set_field(entry: Pairs, name: str, value) -> None:
    for p in entry:
        if p[0] == name:
            p[1] = value
            return
    entry.append([name, value])


# ------------------------------------------------------------------------------------------------ header mutations

_DTYPE_BITS = {"F32": 32, "F16": 16, "BF16": 16, "F64": 64, "I32": 32, "I64": 64, "U8": 8, "I8": 8, "BOOL": 8,
               "F8_E4M3": 8, "F8_E5M2": 8, "U16": 16, "I16": 16, "U32": 32, "U64": 64}
_EXOTIC = {"F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_BAD_SCALARS = [2.0, "2", -1, None, True, 2 ** 64, 2 ** 64 - 1, Raw("-0"), Raw("1e400"), Raw("1e2"), [2], {}]


def _mutate_header(header: Pairs, data: bytes, rng: random.Random) -> tuple[str, Pairs, bytes]:
    """One JSON-level mutation of a valid header: (name, header, data)."""
    entries = _entries(header)
    k, e = rng.choice(entries)
    name = rng.choice(["dtype_size", "dtype_same_size", "dtype_bad", "dtype_exotic", "shape_bad_dim", "shape_bad",
                       "shape_same_bytes", "shape_scaled", "offsets_shift", "offsets_swap", "offsets_past_end",
                       "offsets_bad", "overlap", "swap_equal_tensors", "gap", "dup_field", "missing_field",
                       "extra_field", "array_form", "entry_not_object", "metadata_bad", "metadata_null",
                       "dup_metadata", "dup_key", "rename_key", "top_level", "deep_nesting", "number_edge",
                       "surrogate", "drop_entry", "zero_size_entry", "reorder"])
    if name == "dtype_size":
        old = _field(e, "dtype")
        _set_field(e, "dtype", rng.choice([d for d, b in _DTYPE_BITS.items() if b != _DTYPE_BITS.get(old)]))
    elif name == "dtype_same_size":
        _set_field(e, "dtype", rng.choice(["I32", "U32"]))
    elif name == "dtype_bad":
        _set_field(e, "dtype", rng.choice(["F33", "f32", "", 32, None, ["F32"], "F32 ", Raw('"F\\u0033\\u0032"')]))
    elif name == "dtype_exotic":  # valid safetensors dtypes tpo-convert cannot read; keep the byte length
        dt = rng.choice(list(_EXOTIC))
        nbytes = _field(e, "data_offsets")[1] - _field(e, "data_offsets")[0]
        count, rem = divmod(nbytes * 8, _EXOTIC[dt])
        _set_field(e, "dtype", dt)
        _set_field(e, "shape", [count + (1 if rem or rng.random() < 0.3 else 0)])
    elif name == "shape_bad_dim":
        shape = list(_field(e, "shape"))
        shape[rng.randrange(len(shape))] = rng.choice(_BAD_SCALARS)
        _set_field(e, "shape", shape)
    elif name == "shape_bad":
        _set_field(e, "shape", rng.choice([None, "x", {}, 8, [[8]], Raw("[8,]"), Pairs([["0", 8]])]))
    elif name == "shape_same_bytes":
        shape = _field(e, "shape")
        n = int(np.prod(shape))
        _set_field(e, "shape", rng.choice([[n], [1, n], [n, 1], list(shape) + [1], [0] if n == 0 else [n // 2, 2]
                                           if n % 2 == 0 else [n]]))
    elif name == "shape_scaled":
        shape = list(_field(e, "shape"))
        i = rng.randrange(len(shape))
        shape[i] = rng.choice([shape[i] * 2, shape[i] - 1, 0, shape[i] + 1, 2 ** 32])
        _set_field(e, "shape", shape)
    elif name == "offsets_shift":
        b, end = _field(e, "data_offsets")
        s = rng.choice([-8, -4, -1, 1, 4, 8, len(data)])
        _set_field(e, "data_offsets", [max(0, b + s), max(0, end + s)])
    elif name == "offsets_swap":
        b, end = _field(e, "data_offsets")
        _set_field(e, "data_offsets", [end, b])
    elif name == "offsets_past_end":
        last = max(entries, key=lambda p: _field(p[1], "data_offsets")[1])[1]
        b, end = _field(last, "data_offsets")
        s = rng.choice([1, 4, 8, 1 << 20, 2 ** 63])
        _set_field(last, "data_offsets", [b + s, end + s])
    elif name == "offsets_bad":
        b, end = _field(e, "data_offsets")
        _set_field(e, "data_offsets", rng.choice([[float(b), end], [b, -1], [b, end, end], [end], [str(b), end],
                                                  None, [b, 2 ** 64], [b, Raw("1e400")], Pairs([["0", b], ["1", end]])]))
    elif name == "overlap":
        (_, a), (_, c) = rng.sample(entries, 2) if len(entries) > 1 else (entries[0], entries[0])
        ab, ae = _field(a, "data_offsets")
        cb, ce = _field(c, "data_offsets")
        start = rng.choice([ab, max(0, ab + (ae - ab) // 2)])
        _set_field(c, "data_offsets", [start, start + (ce - cb)])
    elif name == "swap_equal_tensors":  # valid: two tensors of the same byte length swap places
        same = [(x, y) for i, x in enumerate(entries) for y in entries[i + 1:]
                if _field(x[1], "data_offsets")[1] - _field(x[1], "data_offsets")[0]
                == _field(y[1], "data_offsets")[1] - _field(y[1], "data_offsets")[0]]
        (_, x), (_, y) = rng.choice(same)
        ox, oy = _field(x, "data_offsets"), _field(y, "data_offsets")
        _set_field(x, "data_offsets", oy)
        _set_field(y, "data_offsets", ox)
    elif name == "gap":  # bytes no tensor covers, before one tensor
        b0, _ = _field(e, "data_offsets")
        g = rng.choice([1, 4, 8])
        for _, x in entries:
            xb, xe = _field(x, "data_offsets")
            if xb >= b0:
                _set_field(x, "data_offsets", [xb + g, xe + g])
        data = data[:b0] + b"\0" * g + data[b0:]
    elif name == "dup_field":
        f = rng.choice(["dtype", "shape", "data_offsets"])
        e.append([f, _field(e, f)])
    elif name == "missing_field":
        f = rng.choice(["dtype", "shape", "data_offsets"])
        e[:] = [p for p in e if p[0] != f]
    elif name == "extra_field":
        e.append([rng.choice(["foo", "offsets", "__metadata__"]), rng.choice([1, "x", None, [1, 2], Raw("-0"),
                                                                              Raw("1" * 300), {"a": [1]}])])
    elif name == "array_form":
        i = header.index([k, e])
        header[i][1] = [_field(e, "dtype"), _field(e, "shape"), _field(e, "data_offsets")] + \
            rng.choice([[], [], [1]])
    elif name == "entry_not_object":
        i = header.index([k, e])
        header[i][1] = rng.choice([None, 5, "x", [], True])
    elif name == "metadata_bad":
        header[0][1] = rng.choice([{"format": 1}, [], "pt", 5, {"format": None}, {"format": ["pt"]}])
    elif name == "metadata_null":
        header[0][1] = rng.choice([None, {}, {"a": "b", "c": "\u00e9"}])
    elif name == "dup_metadata":
        header.append(["__metadata__", {"format": "pt"}])
    elif name == "dup_key":  # the last one counts (library): identical -> valid, different -> broken tiling
        copy = Pairs([list(p) for p in e])
        if rng.random() < 0.5:
            _set_field(copy, "shape", [int(np.prod(_field(e, "shape")))])
        header.append([k, copy])
    elif name == "rename_key":
        i = header.index([k, e])
        header[i][0] = rng.choice([k + ".x", "", "\n", "__metadata", k.upper(), "a" * 300])
    elif name == "top_level":
        return name, Raw(rng.choice(["[]", "5", '"x"', "null", "{}", "[{}]", "{" + dump(e) + "}"])), data
    elif name == "deep_nesting":
        depth = rng.choice([100, 124, 125, 126, 127, 200, 5000])
        e.append(["deep", Raw("[" * depth + "]" * depth)])
    elif name == "number_edge":
        e.append(["n", Raw(rng.choice(["1e400", "-1e400", "1" * 400, "1" * 300, "-0", "NaN", "Infinity",
                                       "0.5", "1E+2", "-9223372036854775809"]))])
    elif name == "surrogate":
        i = header.index([k, e])
        header[i][0] = k + rng.choice(["\ud800", "\udfff", "\U0001f600", "\u00e9"])
    elif name == "drop_entry":
        header.remove([k, e])
    elif name == "zero_size_entry":
        b, _ = _field(e, "data_offsets")
        pos = rng.choice([0, b, len(data), b + 4])
        header.append(["zero", Pairs([["dtype", "F32"], ["shape", [0, rng.choice([3, 2 ** 63, 2 ** 64 - 1])]],
                                      ["data_offsets", [pos, pos]]])])
    elif name == "reorder":  # valid: header order does not matter, offsets do
        rng.shuffle(header)
    return name, header, data


def _flip(buf: bytes, lo: int, hi: int, rng: random.Random, count: int) -> bytes:
    b = bytearray(buf)
    for _ in range(count):
        i = rng.randrange(lo, max(lo + 1, hi))
        if i < len(b):
            b[i] = rng.choice([rng.randrange(256), b[i] ^ (1 << rng.randrange(8)), ord('"'), ord("}"), ord("9"),
                               ord("-"), 0, 0xFF])
    return bytes(b)


# ------------------------------------------------------------------------------------------------ cases

def _raw_file_case(valid: bytes, n_header: int, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["flip_header", "flip_header", "flip_header", "flip_length", "length", "truncate", "append",
                       "tiny"])
    if kind == "flip_header":
        return kind, _flip(valid, 8, 8 + n_header, rng, rng.choice([1, 1, 2, 4]))
    if kind == "flip_length":
        return kind, _flip(valid, 0, 8, rng, 1)
    if kind == "length":
        n = rng.choice([0, 1, n_header - 1, n_header + 1, n_header - 8, n_header + 8, len(valid) - 8, len(valid),
                        100_000_001, 2 ** 63, 2 ** 64 - 1])
        return kind, struct.pack("<Q", max(0, n)) + valid[8:]
    if kind == "truncate":
        return kind, valid[:rng.choice([rng.randrange(len(valid)), len(valid) - 1, 8 + n_header, 8 + n_header - 1])]
    if kind == "append":
        return kind, valid + bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8, 100])))
    return kind, valid[:rng.randrange(9)]


def _sharded(d: Path, sd: dict, split: int) -> tuple[dict, list[str]]:
    keys = list(sd)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, part in zip(names, (keys[:split], keys[split:])):
        h, data = safetensors_bytes({k: sd[k] for k in part})
        (d / name).write_bytes(encode(h, data))
    weight_map = {k: names[0] if i < split else names[1] for i, k in enumerate(keys)}
    return weight_map, names


def _index_case(d: Path, sd: dict, rng: random.Random, outside: Path) -> str:
    weight_map, names = _sharded(d, sd, 6)
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    kind = rng.choice(["valid", "dotdot", "dotdot_inside", "absolute", "missing", "non_string", "empty_name",
                       "nul_name", "weight_map_bad", "not_json", "not_utf8", "deep", "wrong_shard", "dir_shard",
                       "symlink_shard_out", "symlink_shard_in", "fifo_shard", "fifo_index", "backslash", "huge_index"])
    key = rng.choice(list(weight_map))
    raw = None
    if kind == "dotdot":
        for k, v in weight_map.items():
            if v == weight_map[key]:
                weight_map[k] = rng.choice(["../../outside/" + v, "../" + d.name + "/" + v, "sub/../../x"])
        if weight_map[key].startswith("../../outside/"):  # the escaping name points at a real, valid file
            (outside / weight_map[key].rsplit("/", 1)[-1]).write_bytes((d / names[0]).read_bytes())
    elif kind == "dotdot_inside":  # resolves inside, but '..' is refused all the same
        (d / "sub").mkdir()
        for k, v in weight_map.items():
            if v == names[1]:
                weight_map[k] = "sub/../" + names[1]
    elif kind == "absolute":
        target = outside / f"abs-{rng.randrange(10 ** 9)}.safetensors"
        shutil.copy(d / weight_map[key], target)
        for k, v in list(weight_map.items()):
            if v == weight_map[key] and k != key:
                weight_map[k] = str(target)
        weight_map[key] = rng.choice([str(target), str(d / weight_map[key])])
    elif kind == "missing":
        weight_map[key] = "model-00003-of-00002.safetensors"
    elif kind == "non_string":
        weight_map[key] = rng.choice([1, None, [names[0]], {"f": names[0]}, True])
    elif kind == "empty_name":
        weight_map[key] = rng.choice(["", ".", "./", "/"])
    elif kind == "nul_name":
        weight_map[key] = names[0] + "\u0000x"
    elif kind == "weight_map_bad":
        index = rng.choice([{"weight_map": list(weight_map)}, {"weight_map": None}, {}, [weight_map], "x"])
    elif kind == "not_json":
        raw = json.dumps(index).encode()[:-rng.randrange(1, 20)]
    elif kind == "not_utf8":
        raw = json.dumps(index).encode().replace(b'"weight_map"', b'"weight_\xff\xfemap"')
    elif kind == "deep":
        raw = (b"[" * 100_000) + (b"]" * 100_000)
    elif kind == "wrong_shard":
        weight_map[key] = names[1] if weight_map[key] == names[0] else names[0]
    elif kind == "dir_shard":
        (d / "shard.dir.safetensors").mkdir()
        weight_map[key] = "shard.dir.safetensors"
    elif kind == "symlink_shard_out":
        target = outside / f"link-{rng.randrange(10 ** 9)}.safetensors"
        shutil.copy(d / names[1], target)
        (d / names[1]).unlink()
        os.symlink(rng.choice([str(target), os.path.relpath(target, d)]), d / names[1])
    elif kind == "symlink_shard_in":  # valid: a symlink that stays inside the checkpoint directory
        (d / "blobs").mkdir()
        os.replace(d / names[1], d / "blobs" / "abc")
        os.symlink("blobs/abc", d / names[1])
    elif kind == "fifo_shard":
        (d / names[1]).unlink()
        os.mkfifo(d / names[1])
    elif kind == "fifo_index":
        os.mkfifo(d / "model.safetensors.index.json")
        return "index_" + kind
    elif kind == "backslash":
        weight_map[key] = "..\\..\\outside\\" + names[0]
    elif kind == "huge_index":  # sparse: refused by its size before anything is read
        with open(d / "model.safetensors.index.json", "wb") as f:
            f.write(b"{")
            f.truncate(65 * 2 ** 20)
        return "index_" + kind
    if raw is None:
        raw = json.dumps(index).encode()
    (d / "model.safetensors.index.json").write_bytes(raw)
    return "index_" + kind


def _fs_case(d: Path, valid: bytes, rng: random.Random, outside: Path) -> str:
    kind = rng.choice(["fifo_file", "fifo_config", "dir_named_file", "symlink_out", "symlink_in", "symlink_loop",
                       "dangling", "symlink_dev", "symlink_self_dir", "no_checkpoint", "two_candidates",
                       "unknown_suffix"])
    target = d / "model.safetensors"
    if kind == "fifo_file":
        os.mkfifo(target)
    elif kind == "fifo_config":
        target.write_bytes(valid)
        (d / "config.json").unlink()
        os.mkfifo(d / "config.json")
    elif kind == "dir_named_file":
        target.mkdir()
        (target / "model.safetensors").write_bytes(valid)
    elif kind == "symlink_out":
        f = outside / f"out-{rng.randrange(10 ** 9)}.safetensors"
        f.write_bytes(valid)
        os.symlink(rng.choice([str(f), os.path.relpath(f, d)]), target)
    elif kind == "symlink_in":  # valid
        (d / "real.bin.safetensors.data").write_bytes(valid)
        os.symlink("real.bin.safetensors.data", target)
    elif kind == "symlink_loop":
        os.symlink("model.safetensors", target)
    elif kind == "dangling":
        os.symlink("nowhere.safetensors", target)
    elif kind == "symlink_dev":
        os.symlink(rng.choice(["/dev/zero", "/dev/null", "/dev/stdin", "/proc/self/environ"]), target)
    elif kind == "symlink_self_dir":
        os.symlink(".", target)
    elif kind == "no_checkpoint":
        (d / "weights.txt").write_bytes(valid)
    elif kind == "two_candidates":
        (d / "a.safetensors").write_bytes(valid)
        (d / "b.safetensors").write_bytes(valid)
    elif kind == "unknown_suffix":
        (d / "weights.npz").write_bytes(valid)
        index = {"weight_map": {k: "weights.npz" for k in SHAPES}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return "fs_" + kind


def _torch_case(d: Path, sd: dict, rng: random.Random) -> str:
    import torch

    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, buf)
    valid = buf.getvalue()
    kind = rng.choice(["valid", "truncate", "flip", "flip", "garbage", "append", "empty", "not_a_dict",
                       "non_tensor"])
    raw = valid
    if kind == "truncate":
        raw = valid[:rng.randrange(len(valid))]
    elif kind == "flip":
        raw = _flip(valid, 0, len(valid), rng, rng.choice([1, 4, 16]))
    elif kind == "garbage":
        raw = bytes(rng.randrange(256) for _ in range(rng.choice([10, 1000])))
    elif kind == "append":
        raw = valid + b"\0" * rng.choice([1, 100])
    elif kind == "empty":
        raw = b""
    elif kind in ("not_a_dict", "non_tensor"):
        buf = io.BytesIO()
        obj = [1, 2] if kind == "not_a_dict" else {**{k: torch.from_numpy(v) for k, v in sd.items()}, "x": 3}
        torch.save(obj, buf)
        raw = buf.getvalue()
    (d / "pytorch_model.bin").write_bytes(raw)
    return "bin_" + kind


def cases(rng: random.Random | int, n: int, tmp_dir: str | os.PathLike) -> Iterator[tuple[str, Path]]:
    """`n` case directories under `tmp_dir` (module docstring), deterministic in `rng` (a seed or Random)."""
    rng = random.Random(rng) if isinstance(rng, int) else rng
    root = Path(tmp_dir)
    outside = root / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    sd = state_dict(0)
    header, data = safetensors_bytes(sd)
    valid = encode(header, data)
    n_header = struct.unpack("<Q", valid[:8])[0]
    families = ["header"] * 8 + ["raw"] * 5 + ["index"] * 3 + ["fs"] * 2 + ["torch"] * 1 + ["valid"] * 1
    for i in range(n):
        family = rng.choice(families)
        d = _case_dir(root / "cases", f"{i:05d}")
        if family == "valid":
            h = Pairs([[k, Pairs([list(p) for p in v]) if isinstance(v, Pairs) else v] for k, v in header])
            (d / "model.safetensors").write_bytes(encode(h, data, pad=rng.random() < 0.5))
            name = "valid"
        elif family == "header":
            h = Pairs([[k, Pairs([list(p) for p in v]) if isinstance(v, Pairs) else v] for k, v in header])
            kind, h, dd = _mutate_header(h, data, rng)
            (d / "model.safetensors").write_bytes(encode(h, dd, pad=rng.random() < 0.7))
            name = "header_" + kind
        elif family == "raw":
            kind, raw = _raw_file_case(valid, n_header, rng)
            (d / "model.safetensors").write_bytes(raw)
            name = "raw_" + kind
        elif family == "index":
            name = _index_case(d, sd, rng, outside)
        elif family == "fs":
            name = _fs_case(d, valid, rng, outside)
        else:
            name = _torch_case(d, sd, rng)
        yield f"{i:05d}_{name}", d


# ------------------------------------------------------------------------------------------------ running

def _leftovers(out_dir: Path) -> list[str]:
    found = [str(out_dir)] if os.path.lexists(out_dir) else []
    if out_dir.parent.is_dir():
        found += [str(out_dir.parent / p) for p in os.listdir(out_dir.parent) if p.startswith(f".{out_dir.name}.")]
    return found


def run_detailed(case_path: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[str, str | None]:
    """("accepted", None) or ("rejected", message); a rejection that left files behind raises AssertionError."""
    out_dir = Path(out_dir)
    try:
        convert_hf(case_path, out_dir)
    except ConversionError as e:
        left = _leftovers(out_dir)
        if left:
            raise AssertionError(f"rejected ({e}) but left {left}") from None
        return "rejected", str(e)
    return "accepted", None


def run(case_path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """"accepted" or "rejected"; anything but a ConversionError propagates."""
    return run_detailed(case_path, out_dir)[0]


def library_accepts(path: str | os.PathLike) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
        return True
    except Exception:  # noqa: BLE001 - the library's verdict is all we want
        return False


def library_parity(case_path: str | os.PathLike) -> tuple[bool, bool] | None:
    """(our header parser accepts, the safetensors library accepts) for a case whose checkpoint is one regular
    `model.safetensors` (no index, no symlink); None for other cases."""
    d = Path(case_path)
    f = d / "model.safetensors"
    if os.path.lexists(d / "model.safetensors.index.json") or not os.path.lexists(f) or f.is_symlink() \
            or not stat.S_ISREG(os.stat(f).st_mode):
        return None
    raw = f.read_bytes()
    try:
        parse_header(io.BytesIO(raw), len(raw))
        ours = True
    except ConversionError:
        ours = False
    return ours, library_accepts(f)


class _Hang(BaseException):
    pass


def _release_fifos(d: Path) -> None:
    """Give any FIFO in `d` a writer that closes at once, so a reader stuck in open() gets EOF."""
    for p in d.rglob("*"):
        try:
            if stat.S_ISFIFO(os.lstat(p).st_mode):
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def run_all(case_iter, out_root: str | os.PathLike, *, limit_s: float = 60.0, parity: bool = True,
            keep: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Run every case; count verdicts, uncaught exceptions, hangs (> limit_s), rejections whose message does not
    name the case directory, and header verdicts that differ from the safetensors library. Each case directory
    is deleted after its run unless `keep`."""
    out_root = Path(out_root)
    counts = {"cases": 0, "accepted": 0, "rejected": 0, "uncaught": 0, "hangs": 0, "unnamed": 0,
              "parity_checked": 0, "parity_both_accept": 0, "parity_mismatch": 0, "max_s": 0.0, "max_case": None, "failures": [],
              "by_family": {}}

    def on_alarm(signum, frame):
        raise _Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for name, path in case_iter:
            counts["cases"] += 1
            out = out_root / name
            start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, limit_s)
            try:
                verdict, message = run_detailed(path, out)
            except _Hang:
                verdict, message = "hang", None
                _release_fifos(Path(path))
            except Exception as e:  # noqa: BLE001 - counted, with its traceback kept for the report
                verdict, message = "uncaught", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            seconds = time.perf_counter() - start
            if seconds > counts["max_s"]:
                counts["max_s"], counts["max_case"] = seconds, name
            family = name.split("_", 1)[1].split("_", 1)[0]
            counts["by_family"].setdefault(family, {"accepted": 0, "rejected": 0})
            if verdict in ("accepted", "rejected"):
                counts[verdict] += 1
                counts["by_family"][family][verdict] += 1
            else:
                counts["uncaught" if verdict == "uncaught" else "hangs"] += 1
                counts["failures"].append((name, verdict, message))
            if verdict == "rejected" and str(Path(path)) not in message:
                counts["unnamed"] += 1
                counts["failures"].append((name, "unnamed", message))
            if parity:
                pair = library_parity(path)
                if pair is not None:
                    counts["parity_checked"] += 1
                    counts["parity_both_accept"] += pair[0] and pair[1]
                    if pair[0] != pair[1]:
                        counts["parity_mismatch"] += 1
                        counts["failures"].append((name, f"parity ours={pair[0]} library={pair[1]}", message))
            if os.path.lexists(out):
                shutil.rmtree(out, ignore_errors=True)
            if not keep:
                shutil.rmtree(path, ignore_errors=True)
            if log:
                log(f"{name}: {verdict} {seconds:.3f}s {(message or '')[:160]}")
    finally:
        signal.signal(signal.SIGALRM, old)
    counts["max_s"] = round(counts["max_s"], 3)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="tpo-convert fuzz campaign")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-s", type=float, default=60.0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        counts = run_all(cases(args.seed, args.n, Path(tmp) / "in"), Path(tmp) / "out", limit_s=args.limit_s,
                         log=print if args.verbose else None)
        counts["wall_s"] = round(time.perf_counter() - start, 1)
    failures = counts.pop("failures")
    print(json.dumps(counts, indent=1))
    for f in failures[:30]:
        print(*f, sep="\n  ")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())

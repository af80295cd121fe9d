"""Streaming writes into an Orbax checkpoint, and restoring it as the model's parameter tree.

Writing: `write_streaming(directory, tree)` saves a nested dict whose leaves are `LazyArray`s through Orbax's
own `PyTreeCheckpointHandler` (OCDBT + zarr, the standard layout). A private type handler materialises each
leaf (reads and transforms one source tensor) only when Orbax asks to serialize it, writes it with
TensorStore, and drops it; a byte budget bounds how much is materialised at once (one tensor larger than the
budget runs alone). Peak memory is therefore about max(largest tensor, budget) plus its transform, not the
checkpoint size. With `sharding` set on the leaves, each tensor is placed on the mesh
(`jax.make_array_from_callback`) and written by Orbax's jax.Array handler (each process writes its shards).
Arrays are stored in chunks of at most `CHUNK_BYTES`, so restoring one device's shard reads about that shard;
leaves marked `layers=True` (stacked parameters of scanned layer stacks) are chunked along their leading axis
first, one layer per chunk or less, so one layer can be read alone (`ArrayReader`).

Reading: `load_params(path, abstract_state, shardings=None, *, prefix="", strict=True, layouts=None)`
restores the saved tree into the structure of `abstract_state` (an `nnx.State`, e.g.
`nnx.state(nnx.eval_shape(lambda: TPOModel(cfg, rngs=...)), nnx.Param)`, or a nested dict), cast to each
abstract leaf's dtype and placed with `shardings` (same structure), or the abstract leaf's own `.sharding`, or
on the first local device. A checkpoint written in the other stack layout (unrolled `llm.layers.{i}.…` into a
scanned model's stacked `llm.layers.…`, or back) is restored by stacking / slicing; `layouts` says how the
paths relate and defaults to the config recorded in the checkpoint's conversion.json (see `load_params`).
`read_arrays(directory, paths)` returns a subset as NumPy arrays (used by the exporters, group by group);
`ArrayReader` reads single arrays or single layers of stacked ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from orbax.checkpoint import future as ocp_future
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import tensorstore_utils, type_handler_registry, type_handlers

from tpo_jax.checkpoints.errors import ConversionError

DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024
# storage chunk size of the arrays written here (benchmarks/bench_init_from.py: with whole-array chunks, loading
# onto 8 devices held up to 2.5x the largest tensor at once; with 4 MiB chunks, under 0.35x of it)
CHUNK_BYTES = 4 * 1024 * 1024


class LazyArray:
    """A leaf that is produced only when written: `load()` -> np.ndarray of `shape`/`dtype`."""

    __slots__ = ("load", "shape", "dtype", "cost", "sharding", "layers")

    def __init__(self, load: Callable[[], np.ndarray], shape, dtype, cost: int, sharding=None, *,
                 layers: bool = False):
        self.load, self.shape, self.dtype = load, tuple(shape), np.dtype(dtype)
        self.cost, self.sharding = cost, sharding
        self.layers = layers  # a stacked parameter: stored one chunk per index of the leading axis

    def save_args(self) -> ocp.SaveArgs:
        # storage chunks of at most CHUNK_BYTES: a reader of one device's shard (a restore into a sharded train
        # state) reads little more than that shard, not the whole array; shard_axes=(0,) splits a stacked array's
        # chunks along its leading axis first, down to one layer each (`ArrayReader` reads one layer alone)
        return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if self.layers and self.shape else ())


class _Budget:
    """At most `limit` bytes materialised at once (an item larger than the limit runs alone)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def take(self, n: int):
        if self.cond is None:
            self.cond = asyncio.Condition()
        async with self.cond:
            await self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            async with self.cond:
                self.used -= n
                self.cond.notify_all()


def _write_all(values, infos, args, budget: _Budget, write_one) -> list:
    args = args or [ocp.SaveArgs()] * len(values)

    async def one(value: LazyArray, info, arg):
        async with budget.take(value.cost):
            array = await asyncio.to_thread(value.load)
            if tuple(array.shape) != value.shape:
                raise ConversionError(f"produced shape {array.shape}, expected {value.shape}", key=info.name)
            await write_one(array, value, info, arg)
            del array

    async def run():
        # every write finishes (or fails) before an error propagates: none may still be writing into the
        # staged directory while the caller deletes it
        results = await asyncio.gather(*[one(v, i, a) for v, i, a in zip(values, infos, args)],
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    return [ocp_future.CommitFutureAwaitingContractedSignals(run(), name="tpo_convert_stream")]


class _LazyNumpyHandler(type_handlers.NumpyHandler):
    """Writes `LazyArray` leaves as NumPy arrays (restored like any np.ndarray / jax.Array leaf)."""

    def __init__(self, budget: _Budget):
        super().__init__(deepcopy_host_arrays=False)
        self._budget = budget

    async def serialize(self, values, infos, args=None):
        async def write_one(array, value, info, arg):
            await self._background_serialize([array], [info], [arg])
        return _write_all(values, infos, args, self._budget, write_one)


class _SerialStore(array_metadata_store.Store):
    """Orbax's array-metadata store appends by read-modify-write of one file per process; with one serialize call
    per array, concurrent calls must take turns or entries are lost."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()  # Orbax runs each array's write on its own thread and event loop

    async def write(self, checkpoint_dir, array_metadatas, process_index):
        await asyncio.to_thread(self._lock.acquire)
        try:
            await super().write(checkpoint_dir, array_metadatas, process_index)
        finally:
            self._lock.release()


class _LazyShardedHandler(type_handlers.ArrayHandler):
    """Writes `LazyArray` leaves as jax.Arrays placed with the leaf's sharding."""

    def __init__(self, budget: _Budget):
        super().__init__(array_metadata_store=_SerialStore())
        self._budget = budget

    async def serialize(self, values, infos, args=None):
        async def write_one(array, value, info, arg):
            placed = jax.make_array_from_callback(array.shape, value.sharding, lambda idx: array[idx])
            futures = await type_handlers.ArrayHandler.serialize(self, [placed], [info], [arg])
            for f in futures or []:
                await asyncio.to_thread(f.result)
        return _write_all(values, infos, args, self._budget, write_one)


def write_streaming(directory: str | Path, tree: Mapping[str, Any], *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                    sharded: bool = False, compression: bool = False) -> None:
    """Save a nested dict of `LazyArray` leaves as an Orbax PyTree checkpoint at `directory`.

    Arrays are stored as zarr3 in OCDBT (Orbax's own format; restore detects it). compression: Orbax's zstd
    compression of each array; weights barely compress and it costs most of the write time, so it is off by
    default (restores are identical either way)."""
    budget = _Budget(budget_bytes)
    handler = _LazyShardedHandler(budget) if sharded else _LazyNumpyHandler(budget)
    registry = type_handler_registry.create_type_handler_registry(
        *type_handler_registry._DEFAULT_TYPE_HANDLERS, (LazyArray, handler))
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                                         use_compression=compression, use_zarr3=True))
    save_args = _tree_map(lambda v: v.save_args() if isinstance(v, LazyArray) else ocp.SaveArgs(), tree)
    ckptr.save(Path(directory).absolute(), args=ocp.args.PyTreeSave(dict(tree), save_args=save_args))


def _tree_map(fn, tree):
    return {k: _tree_map(fn, v) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


# ------------------------------------------------------------------------------------------------ reading

def nest(flat: Mapping[str, Any], sep: str = ".") -> dict:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}}."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(tree: Mapping, sep: str = ".", prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        p = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, sep, p))
        else:
            out[p] = v
    return out


def saved_arrays(directory: str | Path, sep: str = ".") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """path -> (shape, dtype) of every array in the Orbax checkpoint at `directory` (reads metadata only)."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise ConversionError("no Orbax checkpoint here (directory not found)", file=str(directory))
    meta = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(directory)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if tree is None:
        tree = meta.item_metadata
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in flatten(tree, sep).items()}


def read_arrays(directory: str | Path, paths: Iterable[str], sep: str = ".") -> dict[str, np.ndarray]:
    """The arrays at `paths` as NumPy arrays (a partial restore: other leaves are not read)."""
    paths = list(paths)
    if not paths:
        return {}
    item = nest({p: 0 for p in paths}, sep)
    rargs = nest({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths}, sep)
    restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        Path(directory).absolute(), args=ocp.args.PyTreeRestore(item=item, restore_args=rargs, partial_restore=True))
    flat = flatten(restored, sep)
    return {p: np.asarray(flat[p]) for p in paths}


def _flat_state(tree) -> tuple[dict[str, Any], Callable[[Mapping[str, Any]], Any]]:
    """(path -> leaf, rebuild(path -> new value)) for an nnx.State or a nested dict."""
    if isinstance(tree, nnx.State):
        items = list(nnx.to_flat_state(tree))
        flat = {".".join(map(str, p)): v for p, v in items}

        def rebuild(values):
            return nnx.from_flat_state([(p, v.replace(values[".".join(map(str, p))])) for p, v in items])
        return flat, rebuild
    if isinstance(tree, Mapping):
        flat = flatten(tree)
        return flat, nest
    raise TypeError(f"expected an nnx.State or a nested dict, got {type(tree).__name__}")


def _leaf_value(leaf):
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


class ArrayReader:
    """Arrays of an Orbax checkpoint read straight from its TensorStore, whole or one index of the leading axis.

    A slice reads only the storage chunks it covers: stacked parameters are written one chunk per layer
    (`LazyArray(layers=True)`), so reading layer g of a stacked array costs one layer of memory and I/O."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        meta_file = self.directory / "_METADATA"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self.use_ocdbt, self.use_zarr3 = bool(meta.get("use_ocdbt", True)), bool(meta.get("use_zarr3", True))
        self._open: dict[str, Any] = {}
        self._context = tensorstore_utils.get_ts_context(use_ocdbt=self.use_ocdbt)

    def _store(self, name: str):
        store = self._open.get(name)
        if store is None:
            spec = tensorstore_utils.ArrayReadSpec(str(self.directory), name, self.use_zarr3, use_ocdbt=self.use_ocdbt)
            store = self._open[name] = ts.open(spec.json, open=True, read=True, context=self._context).result()
        return store

    def read(self, name: str, index=None) -> np.ndarray:
        """Array `name` (a dotted parameter path), or the part `index` of it (an int: that index of the leading
        axis; or a tuple of ints and slices): only the storage chunks that part covers are read."""
        store = self._store(name)
        return np.asarray((store if index is None else store[index]).read().result())

    def chunk_shape(self, name: str) -> tuple[int, ...]:
        """The storage chunk of array `name` (leading 1 for a stacked parameter written `layers=True`)."""
        return tuple(self._store(name).chunk_layout.read_chunk.shape)


def _layouts(layouts, directory: Path) -> list:
    from tpo_jax.checkpoints import stacking  # imports the model's layout functions: only when restoring

    if layouts is None:
        return stacking.checkpoint_layouts(directory)
    if isinstance(layouts, (list, tuple)) and all(isinstance(lo, stacking.StackLayout) for lo in layouts):
        return list(layouts)
    return stacking.possible_layouts(layouts)


def restore_plan(directory: str | Path, shapes: Mapping[str, tuple[int, ...]], layouts=None,
                 saved: Mapping[str, tuple] | None = None) -> dict[str, Any]:
    """How the checkpoint at `directory` (an Orbax params directory) supplies the parameters `shapes`
    ({checkpoint path: model shape}): {"saved": {path: (shape, dtype)} of the checkpoint, "direct": paths stored
    as they are, "across": {path: parts} stored in the other stack layout (`stacking.across_layouts`),
    "missing": paths it lacks, "extra": checkpoint arrays (or layers "name[g]") no parameter uses}.
    Reads metadata only (none when `saved`, the checkpoint's `saved_arrays`, is given); a shape that does not fit
    is one ConversionError naming the parameter."""
    from tpo_jax.checkpoints.stacking import across_layouts

    directory = Path(directory)
    saved = saved_arrays(directory) if saved is None else saved
    direct, across, missing, used = [], {}, [], {}
    stack_layouts = None
    for cp, shape in shapes.items():
        if cp in saved:
            if tuple(saved[cp][0]) != tuple(shape):
                raise ConversionError(f"shape mismatch: checkpoint has {tuple(saved[cp][0])}, the model expects "
                                      f"{tuple(shape)}", file=str(directory), key=cp)
            direct.append(cp)
            used.setdefault(cp, None)
            continue
        if stack_layouts is None:
            stack_layouts = _layouts(layouts, directory)
        parts = across_layouts(cp, tuple(shape), saved, stack_layouts, where=str(directory))
        if parts is None:
            missing.append(cp)
            continue
        across[cp] = parts
        for name, index in parts:
            if index is None:
                used.setdefault(name, None)
            else:
                used.setdefault(name, set()).add(index)
    extra = sorted(k for k in saved if k not in used)
    extra += [f"{k}[{g}]" for k, idx in used.items() if idx is not None for g in range(saved[k][0][0]) if g not in idx]
    return {"saved": saved, "direct": direct, "across": across, "missing": missing, "extra": extra}


def _read_shards(reader: "ArrayReader", parts: list[tuple[str, int | None]], shape: tuple[int, ...], dtype,
                 sharding) -> jax.Array:
    """A parameter stored in the other stack layout, placed with `sharding`: each device's shard is read
    straight from the checkpoint (only the storage it covers), never the whole parameter on the host."""
    dtype = np.dtype(dtype)

    def shard(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if len(parts) == 1 and parts[0][1] is not None:  # one layer of a stacked array
            name, g = parts[0]
            return reader.read(name, (g, *index)).astype(dtype, copy=False)
        layers = range(shape[0])[index[0]]  # per-layer arrays stacked: the layers of this shard
        return np.stack([reader.read(parts[g][0], index[1:]).astype(dtype, copy=False) for g in layers])

    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def _read_whole_shards(reader: "ArrayReader", name: str, shape: tuple[int, ...], dtype, sharding) -> jax.Array:
    """A stored array placed with `sharding`, each device's shard read on its own (only the chunks it covers)."""
    dtype = np.dtype(dtype)

    def shard(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        return reader.read(name, index if shape else None).astype(dtype, copy=False)

    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def load_params(path: str | Path, abstract_state, shardings=None, *, prefix: str = "", strict: bool = True,
                layouts=None, sequential: bool = False):
    """Restore a converted checkpoint into the structure of `abstract_state`.

    path: the conversion output directory (its `params/` is read) or an Orbax checkpoint directory.
    abstract_state: nnx.State or nested dict whose leaves have `.shape`/`.dtype` (ShapeDtypeStructs or arrays);
      values are restored in each leaf's dtype.
    shardings: same structure, leaves `jax.sharding.Sharding` (e.g. from `tpo_jax.sharding.tree_shardings`);
      default: each abstract leaf's `.sharding` if it has one, else the first local device.
    prefix: checkpoint path prefix of `abstract_state` (e.g. "llm" to restore into `nnx.state(model.llm)`).
    strict: every leaf must be in the checkpoint and every checkpoint array in `abstract_state`; with
      strict=False, leaves not in the checkpoint are returned unchanged (use it to overlay converted weights
      onto an initialised state).
    layouts: how stacked (scanned) and per-layer parameter paths relate, to restore a checkpoint written in the
      other layout (per-layer arrays stacked into a scanned model's parameter, or a stacked array sliced into an
      unrolled model's layers): None (default) reads them from the config recorded in the checkpoint's
      conversion.json (none without one); or a TPOConfig / LLMConfig / (LLMConfig, LoRAConfig) (its stacks'
      layouts as if scanned: `stacking.possible_layouts`), or a list of `tpo_jax.stack.StackLayout` in
      checkpoint path space (e.g. `tpo_jax.model.stack_layouts(cfg)`). Parameters in the same layout on both
      sides are restored as they are.
    sequential: read every array one device shard at a time with TensorStore (`ArrayReader`) instead of Orbax's
      concurrent restore: at most one shard in flight, and a damaged file fails at once with one error (Orbax's
      other reads would go on and report theirs later).
    Every array goes straight into its shards: Orbax reads each device's part of a stored array, and a
    parameter stored in the other layout is read shard by shard (`_read_shards`), so a process holds no more
    than the shards it owns (plus Orbax's read buffers).
    Returns the same structure with jax.Array values.
    """
    root = Path(path)
    directory = root / "params" if (root / "params").is_dir() else root
    flat, rebuild = _flat_state(abstract_state)
    flat_sh = _flat_state(shardings)[0] if shardings is not None else {}
    pre = f"{prefix}." if prefix else ""
    values = {p: _leaf_value(leaf) for p, leaf in flat.items()}
    plan = restore_plan(directory, {pre + p: tuple(v.shape) for p, v in values.items()}, layouts)
    if strict and plan["missing"]:
        raise ConversionError(f"the checkpoint has no array for parameter '{plan['missing'][0]}'",
                              file=str(directory), key=plan["missing"][0])
    if strict:
        extra = [k for k in plan["extra"] if k.startswith(pre)]
        if extra:
            raise ConversionError(f"the model has no parameter for this checkpoint array ({len(extra)} such arrays)",
                                  file=str(directory), key=extra[0])

    def sharding_of(p):
        sharding = _leaf_value(flat_sh[p]) if p in flat_sh else getattr(values[p], "sharding", None)
        return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    got = {}
    reader = ArrayReader(directory) if (plan["across"] or sequential) else None
    if plan["direct"] and sequential:
        for cp in plan["direct"]:
            value = values[cp[len(pre):]]
            got[cp] = _read_whole_shards(reader, cp, tuple(value.shape), value.dtype, sharding_of(cp[len(pre):]))
    elif plan["direct"]:
        wanted = {cp: jax.ShapeDtypeStruct(tuple(values[cp[len(pre):]].shape), values[cp[len(pre):]].dtype,
                                           sharding=sharding_of(cp[len(pre):])) for cp in plan["direct"]}
        item = nest(wanted)
        restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
            directory.absolute(), args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
        got = flatten(restored)
    if plan["across"]:
        for cp, parts in plan["across"].items():
            value = values[cp[len(pre):]]
            got[cp] = _read_shards(reader, parts, tuple(value.shape), value.dtype, sharding_of(cp[len(pre):]))
    return rebuild({p: got[pre + p] if pre + p in got else values[p] for p in flat})


def load_extras(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """The tensors kept unchanged at conversion (`extras/`), as {group: {name: np.ndarray}} (PyTorch layout)."""
    directory = Path(path) / "extras"
    if not directory.is_dir():
        return {}
    paths = list(saved_arrays(directory, sep="/"))
    arrays = read_arrays(directory, paths, sep="/")
    out: dict[str, dict[str, np.ndarray]] = {}
    for p, a in arrays.items():
        group, name = p.split("/", 1)
        out.setdefault(group, {})[name] = a
    return out

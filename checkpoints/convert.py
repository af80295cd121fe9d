"""PyTorch checkpoints -> Orbax: `convert_videochat`, `convert_hf` (command line: `tpo_jax.cli.convert`).

Output directory layout (written to a temporary directory next to `out_dir` and renamed at the end, so a
failed conversion leaves nothing at `out_dir`):

    out_dir/params/          Orbax PyTree checkpoint of our nnx.Param tree (nested dict, keys as in
                             `nnx.state(TPOModel(cfg), nnx.Param)`); restore with `load_params`
    out_dir/extras/          Orbax PyTree checkpoint of tensors kept unchanged ({group: {PyTorch name: array}}),
                             e.g. `sam2/…`; read with `load_extras`
    out_dir/conversion.json  source, options, model config, and the full report (every key: where it went)

Every source tensor is read, transformed and written one at a time (see `tpo_jax.checkpoints.orbax_io`).

Scanned layer stacks (`cfg.{llm,vit,qformer}.stack.scan_layers`): the key tables name layers
(`llm.layers.{i}.…`); the plan is built against the model's shapes with each stacked parameter split into its
layers (`tpo_jax.stack.unstack_shapes`), and each stacked parameter is then written as ONE array: its loader
allocates the stacked output once and fills index g from the job of layer g, reading and transforming one
source tensor at a time. Host memory for it is its stacked size plus one layer's source and transform (never
the stacked tensor twice); that is also its cost against the write budget. (A job with several outputs keeps
the parts not yet asked for until their arrays are written; no rule of a stacked layer has several today.)
Stacked arrays are stored one chunk per layer, so export reads them layer by layer. The report names such
destinations `llm.layers.self_attn.q_proj.kernel[3]`; `summary.arrays_written` counts the arrays written.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np
from flax import nnx

from tpo_jax.checkpoints import tables
from tpo_jax.checkpoints.configs import REPORT_FILE, AdapterInfo, adapter_info, llm_config_from_hf, to_dict
from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.mapping import Job, Plan, build_plan
from tpo_jax.checkpoints.orbax_io import DEFAULT_BUDGET_BYTES, LazyArray, _flat_state, nest, write_streaming
from tpo_jax.checkpoints.sources import TensorSource, checkpoint_root, open_source, read_json_file
from tpo_jax.checkpoints.stacking import locate, present_layouts, slice_name
from tpo_jax.checkpoints.staging import staged_output
from tpo_jax.checkpoints.tables.llm import PEFT_PREFIX
from tpo_jax.config import LLMConfig, TPOConfig, get_config, replace
from tpo_jax.llm import MistralDecoder, llm_stack_layouts
from tpo_jax.model import TPOModel, stack_layouts
from tpo_jax.stack import StackLayout, unstack_shapes

OUTPUT_DTYPES = {"keep": None, "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


# ------------------------------------------------------------------------------------------------ helpers

def abstract_params(build: Callable[[], nnx.Module]) -> nnx.State:
    """The nnx.Param state of a model built shape-only (no memory for values).

    Build with `rngs=None` (the layers then use a fixed key): tracing a constructor that draws from an
    `nnx.Rngs` updates its counter once per parameter, and each update costs time linear in the trace so far
    (minutes for a model with ~1,700 parameters); the values are not used here anyway."""
    return nnx.state(nnx.eval_shape(build), nnx.Param)


def param_shapes(state: nnx.State, prefix: str = "") -> dict[str, tuple[int, ...]]:
    flat, _ = _flat_state(state)
    pre = f"{prefix}." if prefix else ""
    return {pre + p: tuple(v.get_value().shape) for p, v in flat.items()}


def _per_layer(shapes: dict[str, tuple[int, ...]], layouts: list[StackLayout]) -> dict[str, tuple[int, ...]]:
    """The model's parameter shapes as the key tables see them: every stacked parameter split into its layers."""
    try:
        return unstack_shapes(shapes, layouts)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def _out_dtype(dtype: str) -> np.dtype | None:
    if dtype not in OUTPUT_DTYPES:
        raise ConversionError(f"dtype must be one of {list(OUTPUT_DTYPES)}, got {dtype!r}")
    return OUTPUT_DTYPES[dtype]


def contiguous(x: np.ndarray, tile: int = 512) -> np.ndarray:
    """C-contiguous copy of `x` (or `x` itself). A transposed 2-D view is copied tile by tile, which keeps both
    sides in cache: about 2x faster than NumPy's plain strided copy for large bf16 matrices."""
    if x.flags.c_contiguous:
        return x
    if x.ndim != 2 or not x.flags.f_contiguous or x.size < tile * tile:
        return np.ascontiguousarray(x)
    out = np.empty(x.shape, x.dtype)
    rows, cols = x.shape
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            out[i:i + tile, j:j + tile] = x[i:i + tile, j:j + tile]
    return out


class _Runner:
    """Materialises job outputs on demand (thread-safe); multi-output jobs compute once, hand out each part."""

    def __init__(self, source: TensorSource, dtype: np.dtype | None):
        self.source, self.dtype = source, dtype
        self.lock = threading.Lock()
        self.job_locks: dict[int, threading.Lock] = {}
        self.pending: dict[int, dict[int, np.ndarray]] = {}

    def out_dtype(self, job: Job) -> np.dtype:
        first = np.dtype(self.source.meta[job.src[0]].dtype)
        is_float = np.issubdtype(first, np.floating) or first == ml_dtypes.bfloat16
        return self.dtype if (self.dtype is not None and is_float) else first

    def _compute(self, job: Job) -> list[np.ndarray]:
        xs = [self.source.read(k) for k in job.src]
        ys = [contiguous(y) for y in job.rule.op.forward(xs)]  # layout change in the source dtype (smaller)
        del xs  # the sources are freed before any upcast copy is made
        dtype = self.out_dtype(job)
        out = []
        while ys:
            out.append(ys.pop(0).astype(dtype, copy=False))
        return out

    def output(self, job: Job, k: int) -> np.ndarray:
        if len(job.dst) == 1:
            return self._compute(job)[0]
        with self.lock:
            lock = self.job_locks.setdefault(id(job), threading.Lock())
        with lock:
            if id(job) not in self.pending:
                self.pending[id(job)] = dict(enumerate(self._compute(job)))
            parts = self.pending[id(job)]
            out = parts.pop(k)
            if not parts:
                del self.pending[id(job)]
        return out

    def cost(self, job: Job, k: int) -> int:
        src = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(self.source.meta[key].dtype).itemsize
                  for key, s in zip(job.src, job.src_shapes))
        return src + int(np.prod(job.dst_shapes[k], dtype=np.int64)) * self.out_dtype(job).itemsize


def _shardings_by_path(mesh, rules, shardings, abstract: nnx.State, prefix: str) -> dict[str, Any] | None:
    if shardings is None and mesh is None:
        return None
    if shardings is None:
        from tpo_jax import sharding as tpo_sharding  # written alongside; imported only on the mesh path

        rule_table = tpo_sharding.get_rules(rules or "fsdp") if isinstance(rules, (str, type(None))) else rules
        shardings = tpo_sharding.tree_shardings(abstract, mesh, rule_table)
    flat = {p: (v.get_value() if isinstance(v, nnx.Variable) else v) for p, v in _flat_state(shardings)[0].items()}
    pre = f"{prefix}." if prefix else ""
    return {pre + p: s for p, s in flat.items()}


def _sharding(shardings: dict | None, path: str):
    if shardings is not None and path not in shardings:
        raise ConversionError("no sharding given for this parameter", key=path)
    return None if shardings is None else shardings[path]


def _stacked(path: str, parts: list[tuple[Job, int]], runner: _Runner, sharding) -> LazyArray:
    """One stacked parameter from the jobs of its layers (index g = parts[g]), filled one layer at a time."""
    dtypes = {runner.out_dtype(job) for job, _ in parts}
    if len(dtypes) > 1:
        raise ConversionError(f"the layers of this stacked parameter come in different dtypes "
                              f"{sorted(map(str, dtypes))}; convert with dtype='float32' or 'bfloat16'", key=path)
    dtype = dtypes.pop()
    shape = (len(parts), *parts[0][0].dst_shapes[parts[0][1]])

    def load() -> np.ndarray:
        out = np.empty(shape, dtype)  # the only stacked-size allocation
        for g, (job, k) in enumerate(parts):
            out[g] = runner.output(job, k)  # one layer materialised at a time, freed after the copy
        return out

    cost = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize + max(runner.cost(job, k) for job, k in parts)
    return LazyArray(load, shape, dtype, cost, sharding, layers=True)


def lazy_params(plan: Plan, runner: _Runner, layouts: list[StackLayout], shardings: dict | None) -> dict:
    """path -> LazyArray of every parameter the plan writes; per-layer destinations of `layouts` are gathered
    into one stacked array per stacked path."""
    params, stacks = {}, {}
    for job in plan.params:
        for k, path in enumerate(job.dst):
            found = locate(layouts, path)
            if found is not None:
                layout, stacked, g = found
                stacks.setdefault(stacked, (layout, {}))[1][g] = (job, k)
                continue
            params[path] = LazyArray(lambda job=job, k=k: runner.output(job, k), job.dst_shapes[k],
                                     runner.out_dtype(job), runner.cost(job, k), _sharding(shardings, path))
    for stacked, (layout, parts) in stacks.items():
        if sorted(parts) != list(range(layout.count)):  # build_plan checked every target: cannot happen
            raise ConversionError(f"layers {sorted(set(range(layout.count)) - set(parts))} have no source",
                                  key=stacked)
        params[stacked] = _stacked(stacked, [parts[g] for g in range(layout.count)], runner,
                                   _sharding(shardings, stacked))
    return params


def _execute(plan: Plan, source: TensorSource, out_dir, *, dtype: np.dtype | None, shardings: dict | None,
             budget_bytes: int, overwrite: bool, info: dict, log: Callable[[str], None],
             layouts: list[StackLayout] = ()) -> dict:
    runner = _Runner(source, dtype)
    params, extras = lazy_params(plan, runner, list(layouts), shardings), {}
    for job in plan.extras:
        meta = source.meta[job.src[0]]
        nbytes = int(np.prod(meta.shape, dtype=np.int64)) * np.dtype(meta.dtype).itemsize
        extras[job.dst[0]] = LazyArray(lambda key=job.src[0]: source.read(key), meta.shape, meta.dtype, nbytes)
    report = {**info, "summary": {**plan.summary(), "arrays_written": len(params)},
              "mapped": {", ".join(j.src): [slice_name(layouts, d) for d in j.dst] for j in plan.params},
              "extras": {j.src[0]: {"path": j.dst[0], "why": j.rule.note} for j in plan.extras},
              "dropped": {", ".join(j.src): j.rule.note or "dropped" for j in plan.dropped}}
    total = sum(int(np.prod(m.shape, dtype=np.int64)) * np.dtype(m.dtype).itemsize for m in source.meta.values())
    start = time.perf_counter()
    with staged_output(out_dir, overwrite) as tmp:
        if params:
            write_streaming(tmp / "params", nest(params), budget_bytes=budget_bytes, sharded=shardings is not None)
        if extras:
            write_streaming(tmp / "extras", nest(extras, "/"), budget_bytes=budget_bytes)
        seconds = time.perf_counter() - start
        report["timing"] = {"seconds": round(seconds, 3), "source_bytes": total,
                            "gb_per_s": round(total / 1e9 / max(seconds, 1e-9), 3)}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
    log(format_report(report, out_dir))
    return report


def format_report(report: dict, out_dir=None) -> str:
    s = report["summary"]
    comp = ", ".join(f"{k} {v}" for k, v in s["mapped_by_component"].items())
    groups: dict[str, int] = {}
    for e in report["extras"].values():
        g = e["path"].split("/", 1)[0]
        groups[g] = groups.get(g, 0) + 1
    n_keys = s["mapped_keys"] + s["extra_keys"] + s["dropped_keys"]
    kept = ", ".join(f"{g} {n}" for g, n in groups.items()) or "-"
    lines = [f"source: {report['source']} ({report['format']}, {n_keys} keys)",
             f"  mapped into the model : {s['mapped_keys']} keys -> {s['params_written']} parameters ({comp})",
             f"  kept unchanged, extras: {s['extra_keys']} keys ({kept})",
             f"  dropped               : {s['dropped_keys']} keys",
             "  unmapped / missing    : none (checked before writing)"]
    if "timing" in report:
        t = report["timing"]
        lines.append(f"wrote {out_dir} in {t['seconds']:.1f} s ({t['gb_per_s']:.2f} GB/s of source)")
    return "\n".join(lines)


def hf_llm_config(path, root: str | None = None) -> LLMConfig:
    """A Hugging Face config.json -> LLMConfig; the file is read like a checkpoint file (`sources.confined`:
    inside `root`, a regular file) and any bad field is one ConversionError naming it."""
    data = read_json_file(path, root)
    if not isinstance(data, dict):
        raise ConversionError("expected a JSON object", file=str(path))
    try:
        return llm_config_from_hf(data, file=str(path))
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:
        raise ConversionError(f"unusable config: {type(e).__name__}: {' '.join(str(e).split())[:200]}",
                              file=str(path)) from None


def _adapter_info(path, root: str | None) -> AdapterInfo:
    data = read_json_file(path, root)  # confined and a regular file before `adapter_info` reads it again
    if not isinstance(data, dict):
        raise ConversionError("expected a JSON object", file=str(path))
    try:
        return adapter_info(path)
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:
        raise ConversionError(f"unusable adapter config: {type(e).__name__}: {' '.join(str(e).split())[:200]}",
                              file=str(path)) from None


def _check_output(source, out_dir) -> None:
    """Refuse an output directory that is, or holds, the source (with --overwrite it would be deleted)."""
    src, out = os.path.realpath(source), os.path.realpath(out_dir)
    if os.path.commonpath([src, out]) == out:
        raise ConversionError(f"the output directory is or contains the source {src}; choose another output",
                              file=str(out_dir))


# ------------------------------------------------------------------------------------------------ public API

def convert_videochat(source, out_dir, cfg: TPOConfig | None = None, *, lora: str = "keep", dtype: str = "keep",
                      extras: bool = True, mesh=None, rules=None, shardings=None, overwrite: bool = False,
                      budget_bytes: int = DEFAULT_BUDGET_BYTES, dry_run: bool = False,
                      log: Callable[[str], None] = lambda s: None) -> dict:
    """The released VideoChat-TPO checkpoint (index + shards, a single file, or a .bin) -> `out_dir`.

    cfg: model config (default: the `videochat_tpo_7b` preset); lora: "keep" (adapters as lora_a/lora_b) or
    "merge" (folded into the kernels; the model is then built with LoRA disabled); dtype: "keep", "float32" or
    "bfloat16" for floating parameters (extras always keep their dtype); extras: keep the SAM2 / unused tensors
    (needed for a bit-exact export back). mesh + rules (name or table of `tpo_jax.sharding`) or explicit
    `shardings` (nnx.State / nested dict / {path: Sharding}) place each parameter on devices while writing.
    Returns the report (also in `out_dir/conversion.json`).
    """
    cfg = (cfg or get_config("videochat_tpo_7b")).validate()
    if lora not in ("keep", "merge"):
        raise ConversionError(f"lora must be 'keep' or 'merge', got {lora!r}")
    model_cfg = replace(cfg, **{"lora.enabled": False}) if lora == "merge" else cfg
    out_dtype = _out_dtype(dtype)
    _check_output(source, out_dir)
    src = open_source(source)
    abstract = abstract_params(lambda: TPOModel(model_cfg, rngs=None))
    rule_table = tables.videochat(lora, cfg.lora.scaling, cfg.lora.rank, cfg.sam2.memory.encoder.mask_layers)
    shapes = param_shapes(abstract)
    layouts = present_layouts(stack_layouts(model_cfg), shapes)
    plan = build_plan(src.meta, rule_table, _per_layer(shapes, layouts), where=src.description, keep_extras=extras)
    info = {"format": "videochat", "source": src.description, "lora": lora, "dtype": dtype,
            "config": to_dict(model_cfg), "lora_scaling": cfg.lora.scaling, "lora_rank": cfg.lora.rank}
    if dry_run:
        return {**info, "summary": plan.summary(), "extras": {j.src[0]: {"path": j.dst[0], "why": j.rule.note}
                                                               for j in plan.extras}}
    sh = _shardings_by_path(mesh, rules, shardings, abstract, "")
    return _execute(plan, src, out_dir, dtype=out_dtype, shardings=sh, budget_bytes=budget_bytes,
                    overwrite=overwrite, info=info, log=log, layouts=layouts)


def convert_hf(source, out_dir, *, adapter=None, lora: str = "merge", llm_cfg: LLMConfig | None = None,
               dtype: str = "keep", mesh=None, rules=None, shardings=None, overwrite: bool = False,
               budget_bytes: int = DEFAULT_BUDGET_BYTES, dry_run: bool = False, scan_layers: bool | None = None,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """A Hugging Face Mistral/Llama checkpoint (+ optional PEFT adapter directory) -> `out_dir`, under `llm.`.

    The LLM config comes from the config.json next to the weights unless `llm_cfg` is given. With an adapter,
    lora="merge" folds W + s·B·A into the kernels and lora="keep" stores lora_a / lora_b (the model's LoRAConfig
    is then the adapter's: rank, alpha, targets). scan_layers: override `llm_cfg.stack.scan_layers` (write the
    decoder layers stacked, as a scanned model holds them; a config.json has no such field). Restore with
    `load_params(out_dir, nnx.state(model.llm, nnx.Param), prefix="llm")` (into either layout).
    """
    if lora not in ("keep", "merge"):
        raise ConversionError(f"lora must be 'keep' or 'merge', got {lora!r}")
    out_dtype = _out_dtype(dtype)
    _check_output(source, out_dir)
    src = open_source(source)
    if llm_cfg is None:
        base = Path(source)
        cfg_file = (base if base.is_dir() else base.parent) / "config.json"
        if not os.path.lexists(cfg_file):
            raise ConversionError("no config.json next to the checkpoint (pass llm_cfg= or --config)",
                                  file=str(cfg_file))
        llm_cfg = hf_llm_config(cfg_file, checkpoint_root(base))
    if scan_layers is not None:
        llm_cfg = replace(llm_cfg, **{"stack.scan_layers": bool(scan_layers)})
    info_lora = None
    targets: tuple[str, ...] = ()
    overrides: dict[str, str] = {}
    if adapter is not None:
        ad = Path(adapter)
        ad_config = ad / "adapter_config.json" if ad.is_dir() else ad
        ainfo = _adapter_info(ad_config, checkpoint_root(ad))
        _check_output(ad, out_dir)
        adapter_src = open_source(ad if ad.is_dir() else ad.parent)
        src = src.merged_with(adapter_src)
        targets = ainfo.targets
        for module in ("model.embed_tokens", "lm_head"):
            for key in (f"{PEFT_PREFIX}{module}.base_layer.weight", f"{PEFT_PREFIX}{module}.weight"):
                if key in adapter_src.meta:
                    overrides[module] = key
        if llm_cfg.tie_embeddings and "lm_head" in targets:
            raise ConversionError("adapter targets lm_head, but the LLM ties it to the embeddings", file=str(ad))
        info_lora = ainfo
    lora_cfg = info_lora.lora_config() if (info_lora is not None and lora == "keep") else None
    abstract = abstract_params(lambda: MistralDecoder(llm_cfg, lora_cfg, rngs=None))
    rule_table = tables.hf(tie=llm_cfg.tie_embeddings, attention_bias=llm_cfg.attention_bias,
                           adapter_targets=targets, lora=lora,
                           scaling=info_lora.scaling if info_lora else 1.0, rank=info_lora.rank if info_lora else 0,
                           base_overrides=overrides)
    shapes = param_shapes(abstract, "llm")
    layouts = present_layouts(llm_stack_layouts(llm_cfg, "llm"), shapes)
    plan = build_plan(src.meta, rule_table, _per_layer(shapes, layouts), where=src.description)
    info = {"format": "hf", "source": src.description, "lora": lora if info_lora else None, "dtype": dtype,
            "config": {"llm": to_dict(llm_cfg), "lora": None if lora_cfg is None else to_dict(lora_cfg)}}
    if dry_run:
        return {**info, "summary": plan.summary(), "extras": {}}
    sh = _shardings_by_path(mesh, rules, shardings, abstract, "llm")
    return _execute(plan, src, out_dir, dtype=out_dtype, shardings=sh, budget_bytes=budget_bytes,
                    overwrite=overwrite, info=info, log=log, layouts=layouts)

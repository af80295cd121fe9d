"""Our parameters -> PyTorch layouts: Hugging Face Mistral (merged, or base + PEFT adapter) and the
VideoChat-TPO key layout. The mapping tables are the conversion tables run backwards (`build_export_plan`);
all ops except LoRA merging only move bytes, so convert -> export reproduces every source tensor bit for bit.

The input is a directory written by `tpo-convert` or a `ParamSet` (an in-memory state plus its config, e.g. a
trained model's `nnx.state(model, nnx.Param)`). Arrays are read in groups of at most `budget_bytes` and
written one at a time through a streaming safetensors writer.

Scanned stacks: the stacked arrays (leading `layers` axis) are recognised with the layouts of the recorded
config (conversion.json, or the ParamSet's config; `stacking.possible_layouts`), so checkpoints written
scanned or unrolled both export. The plan sees one entry per layer; each is read as one slice of its stacked
array (`orbax_io.ArrayReader`: one storage chunk per layer), so export memory stays one group of layers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np

from tpo_jax.checkpoints import tables
from tpo_jax.checkpoints.configs import hf_config_from_llm, peft_adapter_config
from tpo_jax.checkpoints.configs import REPORT_FILE, model_config, read_report
from tpo_jax.checkpoints.convert import OUTPUT_DTYPES, contiguous
from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.mapping import Plan, Rule, build_export_plan
from tpo_jax.checkpoints.orbax_io import DEFAULT_BUDGET_BYTES, ArrayReader, _flat_state, read_arrays, saved_arrays
from tpo_jax.checkpoints.safetensors_writer import ShardedWriter
from tpo_jax.checkpoints.sources import confined
from tpo_jax.checkpoints.stacking import locate, possible_layouts, present_layouts, unstacked_meta
from tpo_jax.checkpoints.staging import staged_output
from tpo_jax.checkpoints.tables.llm import PEFT_PREFIX, hf_llm_export
from tpo_jax.config import LLMConfig, LoRAConfig, TPOConfig

_LORA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@dataclass
class ParamSet:
    """Parameters to export: path -> array (our layout), the config they belong to, optional extras."""

    params: Mapping[str, Any]
    config: Any  # TPOConfig, or (LLMConfig, LoRAConfig | None)
    extras: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    lora_scaling: float | None = None

    @classmethod
    def from_state(cls, state, config, extras=None) -> "ParamSet":
        flat, _ = _flat_state(state)
        params = {p: np.asarray(v.get_value() if hasattr(v, "get_value") else v) for p, v in flat.items()}
        return cls(params, config, extras or {})


class _Reader:
    """The parameters to export, seen per layer: `params` {path: (shape, dtype)} lists each layer of a stacked
    array as its own entry (`llm.layers.{i}.…`), and `read` returns slices of the stacked arrays for them."""

    def __init__(self, checkpoint):
        if isinstance(checkpoint, ParamSet):
            self.where = "<in-memory parameters>"
            self.config = checkpoint.config
            self._params = {p: np.asarray(v) for p, v in checkpoint.params.items()}
            self._extras = {f"{g}/{n}": np.asarray(a) for g, d in checkpoint.extras.items() for n, a in d.items()}
            stored = {p: (a.shape, a.dtype) for p, a in self._params.items()}
            self.extras = {p: (a.shape, a.dtype) for p, a in self._extras.items()}
            self.lora_scaling = checkpoint.lora_scaling
            self.lora_rank = None
            self.dir = None
        else:
            self.dir = Path(checkpoint)
            self.where = str(self.dir)
            report_file = self.dir / REPORT_FILE
            if not os.path.lexists(report_file):
                raise ConversionError("not a tpo-convert output (no conversion.json) nor a tpo-train work "
                                      "directory", file=str(self.dir))
            confined(report_file, os.path.realpath(self.dir))  # a regular file inside: a FIFO fails, not hangs
            report = read_report(self.dir)
            self.config = model_config(report)
            stored = saved_arrays(self.dir / "params")
            self.extras = saved_arrays(self.dir / "extras", sep="/") if (self.dir / "extras").is_dir() else {}
            self.lora_scaling = report.get("lora_scaling")
            self.lora_rank = report.get("lora_rank")
        self.layouts = present_layouts(possible_layouts(self.config), stored)
        self.params = unstacked_meta(stored, self.layouts, where=self.where)
        self._slices = None

    def read(self, paths: Sequence[str], extras: bool) -> dict[str, np.ndarray]:
        if extras:
            if self.dir is None:
                return {p: self._extras[p] for p in paths}
            return read_arrays(self.dir / "extras", paths, sep="/")
        whole, out = [], {}
        for p in paths:
            found = locate(self.layouts, p)
            if found is None:
                whole.append(p)
            elif self.dir is None:
                out[p] = self._params[found[1]][found[2]]
            else:  # one layer of a stacked array: read only its chunk
                if self._slices is None:
                    self._slices = ArrayReader(self.dir / "params")
                out[p] = self._slices.read(found[1], found[2])
        if self.dir is None:
            out.update({p: self._params[p] for p in whole})
        else:
            out.update(read_arrays(self.dir / "params", whole))
        return out


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _is_float(dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating) or np.dtype(dtype) == ml_dtypes.bfloat16


def _write(reader: _Reader, plan: Plan, out: Path, *, dtype: str, route, max_shard_bytes: int,
           budget_bytes: int) -> list[Path]:
    if dtype not in OUTPUT_DTYPES:
        raise ConversionError(f"dtype must be one of {list(OUTPUT_DTYPES)}, got {dtype!r}")
    want = OUTPUT_DTYPES[dtype]
    entries: dict[str, list] = {}
    jobs = []
    for is_extra, job_list in ((False, plan.params), (True, plan.extras)):
        meta = reader.extras if is_extra else reader.params
        for job in job_list:
            base = np.dtype(meta[job.dst[0]][1])
            out_dtype = want if (want is not None and _is_float(base) and not is_extra) else base
            for key, shape in zip(job.src, job.src_shapes):
                entries.setdefault(route(key), []).append((key, out_dtype, tuple(shape)))
            jobs.append((is_extra, job, out_dtype))
    writers = {}
    for target, ents in entries.items():
        directory = out / target[0]
        directory.mkdir(parents=True, exist_ok=True)
        writers[target] = ShardedWriter(directory, ents, stem=target[1], max_shard_bytes=max_shard_bytes)
    # read in groups of bounded size, write each tensor as soon as it is produced
    group, size = [], 0
    for item in jobs + [None]:
        if item is not None:
            is_extra, job, _ = item
            meta = reader.extras if is_extra else reader.params
            n = sum(_nbytes(*meta[d]) for d in job.dst)
            if not group or (size + n <= budget_bytes and group[0][0] == is_extra):
                group.append(item)
                size += n
                continue
        if group:
            arrays = reader.read([d for _, job, _ in group for d in job.dst], extras=group[0][0])
            for _, job, out_dtype in group:
                for key, t in zip(job.src, job.rule.op.inverse([arrays[d] for d in job.dst])):
                    writers[route(key)].write(key, contiguous(np.asarray(t).astype(out_dtype, copy=False)))
            del arrays
        if item is not None:
            group, size = [item], n
    files = []
    for w in writers.values():
        w.close()
        files += w.files
    return files


def _llm_parts(config) -> tuple[LLMConfig, LoRAConfig | None]:
    if isinstance(config, TPOConfig):
        return config.llm, config.lora
    return config


def export_hf(checkpoint, out_dir, *, peft: bool = False, dtype: str = "keep", max_shard_bytes: int = 5 * 10 ** 9,
              overwrite: bool = False, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> list[Path]:
    """Our `llm.*` -> a Hugging Face MistralForCausalLM directory (config.json + safetensors).

    LoRA weights, if the parameters have them, are merged into the weights (W + s·B·A, float32 math) unless
    `peft`, in which case `out_dir` holds the base weights and `out_dir/adapter/` a PEFT adapter
    (adapter_config.json + adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads.
    Returns the written files.
    """
    reader = _Reader(checkpoint)
    llm_cfg, lora_cfg = _llm_parts(reader.config)
    params = {p: s for p, (s, _) in reader.params.items() if p.startswith("llm.")}
    modules = [n for n in _LORA_NAMES if any(p.endswith(f".{n}.lora_a") for p in params)]
    if peft and not modules:
        raise ConversionError("no LoRA weights in these parameters, so there is no adapter to export "
                              "(convert with lora='keep', or export merged)", file=reader.where)
    scaling = reader.lora_scaling or (lora_cfg.scaling if lora_cfg is not None else 1.0)
    rules = hf_llm_export(tie=llm_cfg.tie_embeddings, lora_modules=modules, merged=not peft, scaling=scaling)
    plan = build_export_plan(params, {}, rules, where=reader.where)

    def route(key: str):
        return ("adapter", "adapter_model") if key.startswith(PEFT_PREFIX) else (".", "model")

    with staged_output(out_dir, overwrite) as tmp:
        files = _write(reader, plan, tmp, dtype=dtype, route=route, max_shard_bytes=max_shard_bytes,
                       budget_bytes=budget_bytes)
        kernel = reader.params["llm.embed_tokens.embedding"][1]
        torch_dtype = "bfloat16" if (OUTPUT_DTYPES[dtype] or np.dtype(kernel)) == ml_dtypes.bfloat16 else "float32"
        (tmp / "config.json").write_text(json.dumps(hf_config_from_llm(llm_cfg, torch_dtype), indent=2))
        files.append(tmp / "config.json")
        if peft:
            lo = lora_cfg or LoRAConfig(rank=reader.lora_rank or 16, alpha=scaling * (reader.lora_rank or 16))
            (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(peft_adapter_config(lo, modules), indent=2))
            files.append(tmp / "adapter" / "adapter_config.json")
    out = Path(out_dir).absolute()
    return sorted(out / f.relative_to(tmp) for f in files)


def export_videochat(checkpoint, out_dir, *, dtype: str = "keep", max_shard_bytes: int = 5 * 10 ** 9,
                     overwrite: bool = False, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> list[Path]:
    """The whole model (+ extras) -> VideoChat-TPO keys (`model.safetensors` or shards + index).

    Parameters converted with lora='keep' go back to base_layer / lora_A / lora_B; merged ones are written as
    base_layer = merged weight with an all-zero adapter (the same function). Extras (SAM2, unused modules) are
    written back unchanged; tensors dropped at conversion (`extras=False`) are absent.
    """
    reader = _Reader(checkpoint)
    if not isinstance(reader.config, TPOConfig):
        raise ConversionError("these parameters are an LLM only (converted from Hugging Face); use export_hf",
                              file=reader.where)
    cfg = reader.config
    kept = any(p.endswith(".lora_a") for p in reader.params)
    rank = reader.lora_rank or cfg.lora.rank
    scaling = reader.lora_scaling or cfg.lora.scaling
    rules: list[Rule] = tables.videochat("keep" if kept else "merge", scaling, rank,
                                         cfg.sam2.memory.encoder.mask_layers)
    plan = build_export_plan({p: s for p, (s, _) in reader.params.items()},
                             {p: s for p, (s, _) in reader.extras.items()}, rules, where=reader.where)
    with staged_output(out_dir, overwrite) as tmp:
        files = _write(reader, plan, tmp, dtype=dtype, route=lambda key: (".", "model"),
                       max_shard_bytes=max_shard_bytes, budget_bytes=budget_bytes)
    out = Path(out_dir).absolute()
    return sorted(out / f.relative_to(tmp) for f in files)

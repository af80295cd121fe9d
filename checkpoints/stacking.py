"""Stack layouts at the checkpoint boundary: scanned stacks (one array per parameter, leading `layers` axis)
versus the per-layer paths the key tables speak of (`tpo_jax.stack.StackLayout`).

The tables always name layers (`llm.layers.{i}.…`); conversion and export put these layouts between the tables
and the parameter tree:

* `present_layouts(layouts, paths)`: the layouts of which a parameter tree really has stacked paths (a stack
  whose config says scanned but whose module still builds a list has none, and is treated as unrolled).
* `possible_layouts(config)`: the layouts of the config's stacks *as if* all were scanned, whatever the
  config's `scan_layers` flags say. A stacked path and a per-layer path never look alike (`llm.layers.mlp.…`
  vs `llm.layers.3.mlp.…`), so these recognise the stacked arrays of a checkpoint written in either layout;
  export and `load_params` use them with the checkpoint's recorded config (conversion.json).
* `locate(layouts, path)` (`tpo_jax.stack`): (layout, stacked path, index g) of a per-layer path; `slice_name` writes it
  `stacked[g]` (as the conversion report lists stacked destinations).
* `unstacked_meta(meta, layouts)`: the per-layer view of `{path: (shape, dtype)}` of stacked arrays.
* `across_layouts(...)`: for `load_params`, which arrays of a checkpoint in the other layout make a parameter.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tpo_jax.checkpoints.configs import REPORT_FILE, model_config, read_report
from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.config import LLMConfig, TPOConfig, replace
from tpo_jax.stack import StackLayout, locate, stack_rest

__all__ = ["StackLayout", "present_layouts", "possible_layouts", "locate", "slice_name", "unstacked_meta",
           "stacked_groups", "checkpoint_layouts", "across_layouts"]


def slice_name(layouts: Sequence[StackLayout], path: str) -> str:
    """`path`, or `stacked[g]` when it is a slice of a stacked array of `layouts`."""
    found = locate(layouts, path)
    return path if found is None else f"{found[1]}[{found[2]}]"


def present_layouts(layouts: Sequence[StackLayout], paths: Iterable[str]) -> list[StackLayout]:
    """The layouts of which `paths` hold at least one stacked path."""
    paths = list(paths)
    return [lo for lo in layouts if any(stack_rest([lo], p) is not None for p in paths)]


def stacked_groups(paths: Iterable[str], layouts: Sequence[StackLayout]) -> dict[str, list[str]]:
    """stacked path -> its per-layer paths (index g at position g), for every stacked path among `paths`."""
    out = {}
    for p in paths:
        found = stack_rest(layouts, p)
        if found is not None:
            layout, rest = found
            out[p] = [layout.unrolled_path(rest, g) for g in range(layout.count)]
    return out


def unstacked_meta(meta: Mapping[str, tuple[tuple[int, ...], Any]], layouts: Sequence[StackLayout], *,
                   where: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{path: (shape, dtype)} with every stacked array replaced by its per-layer entries."""
    out = {}
    for path, (shape, dtype) in meta.items():
        found = stack_rest(layouts, path)
        if found is None:
            out[path] = (tuple(shape), dtype)
            continue
        layout, rest = found
        if not shape or shape[0] != layout.count:
            raise ConversionError(f"stacked parameter has shape {tuple(shape)}, but its config has {layout.count} "
                                  "layers there", file=where, key=path)
        for g in range(layout.count):
            out[layout.unrolled_path(rest, g)] = (tuple(shape[1:]), dtype)
    return out


def _scanned(stack_cfg) -> Any:
    return dataclasses.replace(stack_cfg, scan_layers=True)


def possible_layouts(config) -> list[StackLayout]:
    """The stack layouts of `config` with every stack scanned: a TPOConfig (paths `llm.`, `vision.`, `qformer.`;
    arch llava_ov: `llm.`, `vision.vision_tower.`),
    an LLMConfig or (LLMConfig, LoRAConfig | None) (an LLM under `llm.`, as `convert_hf` writes it), or None."""
    from tpo_jax.llm import llm_stack_layouts  # the model modules import slowly; only when needed

    if isinstance(config, tuple):
        config = config[0]
    if isinstance(config, LLMConfig):
        return llm_stack_layouts(replace(config, stack=_scanned(config.stack)), "llm")
    if isinstance(config, TPOConfig):
        from tpo_jax.model import stack_layouts

        changes = {"llm.stack": _scanned(config.llm.stack), "vit.stack": _scanned(config.vit.stack)}
        if config.llava_ov is not None:  # LLaVA-OV: the SigLIP tower under vision.vision_tower
            changes["llava_ov.siglip.stack"] = _scanned(config.llava_ov.siglip.stack)
        if config.qformer.num_layers % config.qformer.cross_attention_freq == 0:  # else it cannot be scanned
            changes["qformer.stack"] = _scanned(config.qformer.stack)
        return stack_layouts(replace(config, **changes))
    return []


def checkpoint_layouts(params_dir: str | Path) -> list[StackLayout]:
    """`possible_layouts` of the config recorded in a converted checkpoint (`conversion.json` in `params_dir`, or
    next to it when `params_dir` is its `params/`), or [] when there is none."""

    params_dir = Path(params_dir)
    for root in (params_dir, params_dir.parent) if params_dir.name == "params" else (params_dir,):
        if (root / REPORT_FILE).is_file():
            return possible_layouts(model_config(read_report(root)))
    return []


def across_layouts(path: str, shape: tuple[int, ...], saved: Mapping[str, tuple[tuple[int, ...], Any]],
                   layouts: Sequence[StackLayout], *, where: str) -> list[tuple[str, int | None]] | None:
    """Where a parameter absent from a checkpoint is in the other layout, for `load_params`:
    [(per-layer array, None) for each layer g] to stack, or [(stacked array, g)] to slice; None when neither.
    Raises one ConversionError naming the parameter when the layers are there but do not fit `shape`."""
    found = stack_rest(layouts, path)
    if found is not None:  # stacked here, per-layer arrays in the checkpoint
        layout, rest = found
        names = [layout.unrolled_path(rest, g) for g in range(layout.count)]
        present = [n for n in names if n in saved]
        if not present:
            return None
        if not shape or shape[0] != layout.count:
            raise ConversionError(f"shape mismatch: the model expects {shape}, but the checkpoint has this stack's "
                                  f"{layout.count} layers as separate arrays ({present[0]}: "
                                  f"{tuple(saved[present[0]][0])})", file=where, key=path)
        for n in names:
            if n not in saved:
                raise ConversionError(f"the checkpoint has no array '{n}' for layer {names.index(n)} of this "
                                      "stacked parameter", file=where, key=path)
            if tuple(saved[n][0]) != tuple(shape[1:]):
                raise ConversionError(f"shape mismatch: the model expects {shape} (per layer {tuple(shape[1:])}), "
                                      f"but the checkpoint has {tuple(saved[n][0])} for '{n}'", file=where, key=path)
        return [(n, None) for n in names]
    found = locate(layouts, path)
    if found is not None:  # one layer here, a stacked array in the checkpoint
        layout, stacked, g = found
        if stacked not in saved:
            return None
        want = (layout.count, *shape)
        if tuple(saved[stacked][0]) != want:
            raise ConversionError(f"shape mismatch: the model expects {tuple(shape)} for layer {g} of the "
                                  f"checkpoint's stacked '{stacked}', which has {tuple(saved[stacked][0])} "
                                  f"(expected {want})", file=where, key=path)
        return [(stacked, g)]
    return None

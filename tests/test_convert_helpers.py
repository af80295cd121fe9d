"""Shared helpers of the conversion tests (no tests here): tiny configs with the released layer counts, fake
VideoChat-TPO checkpoints carrying every real key name, and loading converted parameters into a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from tpo_jax.checkpoints import tables
from tpo_jax.checkpoints.convert import abstract_params, param_shapes
from tpo_jax.checkpoints.mapping import build_export_plan
from tpo_jax.checkpoints.orbax_io import load_params
from tpo_jax.config import get_config, replace
from tpo_jax.model import TPOModel, stack_layouts
from tpo_jax.stack import unstack_shapes

ASSETS = Path(__file__).resolve().parents[1] / "tpo_jax" / "assets" / "videochat_tpo"
INDEX = ASSETS / "model.safetensors.index.json"


def real_layout_tiny():
    """The tiny preset's widths with the released checkpoint's layer counts (so every real key has a home)."""
    return replace(get_config("tiny"), **{
        "llm.num_layers": 32, "vit.depth": 23, "qformer.num_layers": 12,
        # SAM2 v1 Hiera-L's blocks, windows, memory layers and bank sizes (MODEL-SPEC §7) at the tiny widths
        "sam2.trunk.stages": (2, 6, 36, 4), "sam2.trunk.global_att_blocks": (23, 33, 43),
        "sam2.trunk.window_spec": (8, 4, 16, 8), "sam2.trunk.window_pos_embed_bkg_spatial_size": (7, 7),
        "sam2.memory.attention.num_layers": 4, "sam2.memory.tokens.num_maskmem": 7,
        "sam2.memory.tokens.max_obj_ptrs": 16})


def real_keys() -> dict[str, str]:
    """key -> shard file name, from the shipped index of the released checkpoint (2,594 keys)."""
    return json.loads(INDEX.read_text())["weight_map"]


def source_shapes(cfg, lora="keep") -> dict[str, tuple[int, ...]]:
    """Source-key shapes a checkpoint for `cfg` must have: our parameter shapes through the inverse mapping."""
    model_cfg = replace(cfg, **{"lora.enabled": False}) if lora == "merge" else cfg
    target = param_shapes(abstract_params(lambda: TPOModel(model_cfg, rngs=None)))
    target = unstack_shapes(target, stack_layouts(model_cfg))  # scanned stacks: the tables name each layer
    rules = tables.videochat(lora, cfg.lora.scaling, cfg.lora.rank, cfg.sam2.memory.encoder.mask_layers)
    plan = build_export_plan(target, {}, rules, where="test")
    return {k: tuple(s) for j in plan.params for k, s in zip(j.src, j.src_shapes)}


def fake_videochat(directory: Path, cfg, overrides: dict[str, torch.Tensor] | None = None, seed: int = 0,
                   keys: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Write the released key set (4 shards + index) at the shapes of `cfg`: mapped keys at their derived
    shapes (bf16 random, unless in `overrides`), kept-as-extra keys at small shapes, `position_ids` int64."""
    keys = real_keys() if keys is None else keys
    shapes = source_shapes(cfg)
    overrides = overrides or {}
    gen = torch.Generator().manual_seed(seed)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for key, shard in keys.items():
        if key in overrides:
            t = overrides[key]
        elif key.endswith("position_ids"):
            t = torch.arange(8, dtype=torch.int64).reshape(1, 8)
        else:
            t = torch.randn(shapes.get(key, (2, 3)), generator=gen).to(torch.bfloat16)
        shards.setdefault(shard, {})[key] = t.contiguous()
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for shard, tensors in shards.items():
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keys}))
    return {k: v for d in shards.values() for k, v in d.items()}


def load_model(out_dir, cfg) -> TPOModel:
    """A TPOModel whose parameters are the converted checkpoint at `out_dir` (float32)."""
    model = nnx.eval_shape(lambda: TPOModel(cfg, rngs=None))
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, load_params(out_dir, state))


def t2n(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def exported_tensors(files) -> dict[str, torch.Tensor]:
    """Every tensor of the .safetensors files an export wrote (its other files, e.g. the index, skipped)."""
    out = {}
    for f in files:
        if f.suffix == ".safetensors":
            out.update(load_file(str(f)))
    return out

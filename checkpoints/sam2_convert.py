"""SAM2 checkpoint files -> the Orbax param tree of a `tpo_jax.sam2.video.Sam2Video` (`tpo-convert sam2`).

Sources (read by `checkpoints.sources.open_source`: torch pickles with `torch.load(weights_only=True)`,
safetensors parsed strictly, every file confined to the checkpoint directory):

* upstream SAM 2 v1 (`sam2_hiera_large.pt`-style: a pickle holding {"model": state_dict}, facebookresearch/sam2
  names) -> `checkpoints/tables/sam2.py` `whole()`;
* a transformers `Sam2VideoModel` directory (model.safetensors + config.json, transformers 5.x names) ->
  `checkpoints/tables/sam2_hf.py` (transformers -> upstream names) -> the same table.

SAM 2.1 checkpoints (`no_obj_embed_spatial`, `obj_ptr_tpos_proj.*`, or their transformers names) are refused
with one ConversionError naming the keys. The model config is a preset (`tiny`, `sam2_hiera_l_v1`), read from a
transformers config.json (`config_from_hf`), or, for a file without one, the preset whose shapes fit.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
from flax import nnx

from tpo_jax.checkpoints.configs import REPORT_FILE, from_dict, to_dict
from tpo_jax.checkpoints.convert import OUTPUT_DTYPES, _check_output, abstract_params, format_report
from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.mapping import Meta, build_plan
from tpo_jax.checkpoints.orbax_io import DEFAULT_BUDGET_BYTES, LazyArray, nest, write_streaming
from tpo_jax.checkpoints.sources import checkpoint_root, open_source, read_json_file
from tpo_jax.checkpoints.staging import staged_output
from tpo_jax.checkpoints.tables import sam2 as sam2_table
from tpo_jax.checkpoints.tables import sam2_hf
from tpo_jax.sam2 import config as sam2_config
from tpo_jax.sam2.memory_config import (MemoryAttentionConfig, MemoryEncoderConfig, MemoryTokensConfig,
                                        Sam2MemoryConfig)

PRESETS = {"sam2_hiera_l_v1": sam2_config.sam2_hiera_l_v1, "tiny": sam2_config.tiny}


def config_from_hf(data: dict, *, file: str = "config.json") -> sam2_config.Sam2Config:
    """A transformers `Sam2VideoConfig` (config.json as a dict) -> our `Sam2Config`. SAM 2.1 flags
    (`enable_occlusion_spatial_embedding`, `enable_temporal_pos_encoding_for_object_pointers`) are refused."""
    try:
        on = [f for f in ("enable_occlusion_spatial_embedding", "enable_temporal_pos_encoding_for_object_pointers")
              if data.get(f, True)]
        if on:
            raise ConversionError(f"{on} set: a SAM 2.1 configuration, which is not supported (Sam2Video is "
                                  "SAM 2 v1; both flags must be false)", file=file)
        vis, pe, md = data["vision_config"], data["prompt_encoder_config"], data["mask_decoder_config"]
        bb = vis["backbone_config"]
        dims, heads = list(bb["embed_dim_per_stage"]), list(bb["num_attention_heads_per_stage"])
        trunk = sam2_config.HieraConfig(
            embed_dim=dims[0], num_heads=heads[0], stages=tuple(bb["blocks_per_stage"]),
            global_att_blocks=tuple(bb["global_attention_blocks"]), window_spec=tuple(bb["window_size_per_stage"]),
            window_pos_embed_bkg_spatial_size=tuple(bb["window_positional_embedding_background_size"]),
            q_pool=bb["num_query_pool_stages"], q_stride=tuple(bb["query_stride"]),
            dim_mul=dims[1] / dims[0] if len(dims) > 1 else 2.0,
            head_mul=heads[1] / heads[0] if len(heads) > 1 else 2.0, mlp_ratio=bb["mlp_ratio"],
            in_chans=bb["num_channels"], patch_kernel=bb["patch_kernel_size"][0],
            patch_stride=bb["patch_stride"][0], patch_padding=bb["patch_padding"][0], norm_eps=bb["layer_norm_eps"])
        if [int(trunk.embed_dim * trunk.dim_mul ** i) for i in range(len(dims))] != dims or \
                [int(trunk.num_heads * trunk.head_mul ** i) for i in range(len(heads))] != heads:
            raise ConversionError(f"embed_dim_per_stage {dims} / num_attention_heads_per_stage {heads} do not grow "
                                  "geometrically, which the Hiera of Sam2Video assumes", file=file)
        d = vis["fpn_hidden_size"]
        neck = sam2_config.NeckConfig(d_model=d, backbone_channel_list=tuple(vis["backbone_channel_list"]),
                                      fpn_top_down_levels=tuple(vis["fpn_top_down_levels"]))
        decoder = sam2_config.MaskDecoderConfig(
            depth=md["num_hidden_layers"], num_heads=md["num_attention_heads"], mlp_dim=md["mlp_dim"],
            attention_downsample_rate=md["attention_downsample_rate"],
            num_multimask_outputs=md["num_multimask_outputs"], iou_head_depth=md["iou_head_depth"],
            iou_head_hidden_dim=md["iou_head_hidden_dim"],
            dynamic_multimask_via_stability=md["dynamic_multimask_via_stability"],
            dynamic_multimask_stability_delta=md["dynamic_multimask_stability_delta"],
            dynamic_multimask_stability_thresh=md["dynamic_multimask_stability_thresh"])
        m = data["memory_encoder_output_channels"]
        encoder = MemoryEncoderConfig(
            in_dim=data["memory_encoder_hidden_size"], out_dim=m, mask_kernel=data["mask_downsampler_kernel_size"],
            mask_stride=data["mask_downsampler_stride"], mask_padding=data["mask_downsampler_padding"],
            mask_total_stride=data["mask_downsampler_total_stride"], fuser_layers=data["memory_fuser_num_layers"],
            fuser_kernel=data["memory_fuser_kernel_size"],
            fuser_expansion=data["memory_fuser_intermediate_dim"] // data["memory_fuser_embed_dim"],
            layer_scale_init=data["memory_fuser_layer_scale_init_value"],
            sigmoid_scale=data["sigmoid_scale_for_mem_enc"], sigmoid_bias=data["sigmoid_bias_for_mem_enc"])
        rope = data.get("rope_parameters") or {}
        attention = MemoryAttentionConfig(
            d_model=data["memory_attention_hidden_size"], num_layers=data["memory_attention_num_layers"],
            num_heads=data["memory_attention_num_attention_heads"],
            downsample_rate=data["memory_attention_downsample_rate"],
            ffn_dim=data["memory_attention_feed_forward_hidden_size"], kv_dim=m,
            dropout=float(data["memory_attention_dropout"]), rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_feat_sizes=tuple(data["memory_attention_rope_feat_sizes"]))
        tokens = MemoryTokensConfig(hidden_dim=d, mem_dim=m, num_maskmem=data["num_maskmem"],
                                    max_obj_ptrs=data["max_object_pointers_in_encoder"])
        image_size = data["image_size"]
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        return sam2_config.Sam2Config(
            trunk=trunk, neck=neck, mask_decoder=decoder, image_size=image_size,
            backbone_stride=pe["patch_size"], mask_in_chans=pe["mask_input_channels"],
            multimask_output_in_sam=data["multimask_output_in_sam"], multimask_min_pt_num=data["multimask_min_pt_num"],
            multimask_max_pt_num=data["multimask_max_pt_num"],
            multimask_output_for_tracking=data["multimask_output_for_tracking"],
            memory=Sam2MemoryConfig(encoder, attention, tokens)).validate()
    except ConversionError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, AttributeError) as e:
        raise ConversionError(f"unusable transformers SAM2 config: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}", file=file) from None


def _abstract(cfg) -> nnx.State:
    from tpo_jax.sam2.video import Sam2Video

    return abstract_params(lambda: Sam2Video(cfg, rngs=None))


def _ours(state: nnx.State) -> dict[str, tuple[int, ...]]:
    return {".".join(map(str, p)): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}


def _plans(meta: dict[str, Meta], fmt: str, cfg, where: str):
    """(hf plan or None, upstream plan) for `cfg`; ConversionError when the checkpoint does not fit it."""
    state = _abstract(cfg)
    target = sam2_hf.upstream_shapes(state)
    hf = None
    if fmt == "transformers":
        hf = sam2_hf.hf_plan(meta, target, where=where)
        meta = {d: Meta(s, meta[j.src[0]].dtype, where) for j in hf.params for d, s in zip(j.dst, j.dst_shapes)}
    rules, _ = sam2_table._rules(_ours(state), "")
    return hf, build_plan(meta, rules, _ours(state), where=where)


def _format(meta: dict[str, Meta], where: str) -> str:
    if any(k.startswith("vision_encoder.") for k in meta):
        return "transformers"
    if any(k.startswith("image_encoder.") for k in meta):
        return "upstream"
    if any(k.startswith("sam.image_encoder.") for k in meta):
        raise ConversionError("a VideoChat-TPO checkpoint (sam.* keys): convert it with `tpo-convert videochat`",
                              file=where)
    raise ConversionError("not a SAM2 checkpoint (no image_encoder.* or vision_encoder.* keys)", file=where,
                          key=next(iter(meta), None))


def convert_sam2(source, out_dir, *, config: str | None = None, dtype: str = "keep", overwrite: bool = False,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES, dry_run: bool = False,
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """An upstream SAM2 v1 checkpoint file or a transformers `Sam2VideoModel` directory -> `out_dir/params`
    (the nnx.Param tree of `Sam2Video`) + `out_dir/conversion.json`. config: a preset name (`PRESETS`); default:
    the directory's config.json for transformers, else the preset whose shapes fit. Returns the report."""
    if dtype not in OUTPUT_DTYPES:
        raise ConversionError(f"dtype must be one of {list(OUTPUT_DTYPES)}, got {dtype!r}")
    if config is not None and config not in PRESETS:
        raise ConversionError(f"unknown SAM2 config {config!r} (expected one of {sorted(PRESETS)})")
    _check_output(source, out_dir)
    src = open_source(source)
    where = src.description
    fmt = _format(src.meta, where)
    sam2_hf.refuse_v21(src.meta, file=where)
    if config is not None:
        name, cfg = config, PRESETS[config]()
        hf, plan = _plans(src.meta, fmt, cfg, where)
    else:
        base = Path(source)
        cfg_file = (base if base.is_dir() else base.parent) / "config.json"
        if fmt == "transformers" and os.path.lexists(cfg_file):
            name, cfg = str(cfg_file), config_from_hf(read_json_file(cfg_file, checkpoint_root(base)),
                                                      file=str(cfg_file))
            hf, plan = _plans(src.meta, fmt, cfg, where)
        else:
            fits, problems = [], []
            for preset, build in PRESETS.items():
                try:
                    fits.append((preset, build(), *_plans(src.meta, fmt, build(), where)))
                except ConversionError as e:
                    problems.append(f"{preset}: {e.detail}")
            if not fits:
                raise ConversionError("the shapes fit no SAM2 preset (pass --config; "
                                      + "; ".join(p[:160] for p in problems) + ")", file=where)
            name, cfg, hf, plan = fits[0]
    out_dtype = OUTPUT_DTYPES[dtype]
    summary = {**plan.summary(), "source_keys": len(src.meta)}
    info = {"format": f"sam2-{fmt}", "source": where, "dtype": dtype, "config_from": name, "config": to_dict(cfg),
            "summary": summary, "extras": {}, "dropped": {},
            "renamed": ({", ".join(j.src): list(j.dst) for j in hf.params} if hf is not None else {})}
    if dry_run:
        return info
    # every tensor through both tables (SAM2 is small: Hiera-L is 224M parameters)
    upstream = {}
    if hf is not None:
        for job in hf.params:
            try:
                upstream.update(zip(job.dst, job.rule.op.forward([src.read(k) for k in job.src])))
            except ValueError as e:
                raise ConversionError(str(e), file=where, key=job.src[0]) from None
    else:
        upstream = {k: src.read(k) for j in plan.params for k in j.src}
    params = {}
    for job in plan.params:
        for path, x in zip(job.dst, job.rule.op.forward([upstream[k] for k in job.src])):
            x = np.ascontiguousarray(x if out_dtype is None or not np.issubdtype(x.dtype, np.floating)
                                     else x.astype(out_dtype))
            params[path] = LazyArray(lambda x=x: x, x.shape, x.dtype, x.nbytes)
    info["mapped"] = {", ".join(j.src): list(j.dst) for j in plan.params}
    start = time.perf_counter()
    with staged_output(out_dir, overwrite) as tmp:
        write_streaming(tmp / "params", nest(params), budget_bytes=budget_bytes)
        seconds = time.perf_counter() - start
        total = sum(int(np.prod(m.shape, dtype=np.int64)) * np.dtype(m.dtype).itemsize for m in src.meta.values())
        info["timing"] = {"seconds": round(seconds, 3), "source_bytes": total,
                          "gb_per_s": round(total / 1e9 / max(seconds, 1e-9), 3)}
        (tmp / REPORT_FILE).write_text(json.dumps(info, indent=1, default=str))
    log(format_report(info, out_dir))
    return info


def load_sam2(out_dir, cfg: sam2_config.Sam2Config | None = None):
    """A `Sam2Video` restored from a `convert_sam2` output (its config from conversion.json unless given)."""
    from tpo_jax.checkpoints.orbax_io import load_params
    from tpo_jax.sam2.video import Sam2Video

    if cfg is None:
        cfg = from_dict(sam2_config.Sam2Config, json.loads((Path(out_dir) / REPORT_FILE).read_text())["config"]).validate()
    model = Sam2Video(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, load_params(Path(out_dir) / "params", nnx.state(model, nnx.Param)))
    return model


__all__ = ["convert_sam2", "config_from_hf", "load_sam2", "PRESETS"]

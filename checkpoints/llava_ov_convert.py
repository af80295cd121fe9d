"""A Hugging Face LLaVA-OneVision checkpoint <-> the base weights of a TPO model of arch "llava_ov".

`convert_llava_ov(source, out_dir, cfg)`: a `LlavaOnevisionForConditionalGeneration` directory (config.json +
safetensors, as `save_pretrained` writes it, or the llava-hf Hub files) -> `out_dir` in the layout of
`tpo_jax.checkpoints.convert` (params/, extras/, conversion.json with format "llava_ov"). The parameters written
are the base model's: `vision.*` (SigLIP tower, projector, image_newline) and `llm.*` (the Qwen2 decoder), the
paths `TPOModel(cfg)` has for them; LoRA adapters, task tokens, heads, loc_encoder and SAM2 are not in such a
checkpoint and keep their initialisation when a run starts from it (`init_from`).

The key tables are LLaVA-OV's (`tables/llava_ov.py`, `tables/llava_ov_vision.py`; the key layout is detected from
the vision tower's spelling). Every key of the source is mapped, kept as an extra (SigLIP's `post_layernorm`,
which LLaVA-OV does not read: `unused/…`, listed in the report with why) or dropped with a reason; any other key,
any parameter without a source, and any shape that does not fit the model is a ConversionError naming it.
Before any tensor is read, the config.json is checked against `cfg` (`check_config`): a field that differs is
named on both sides. Scanned stacks (`llm.stack.scan_layers`, `llava_ov.siglip.stack.scan_layers`) are written
as one stacked array per parameter (`checkpoints.stacking`).

`export_llava_ov(checkpoint, out_dir)`: the inverse, from a converted directory, a `ParamSet` or (through the
CLI) a tpo-train work directory: `vision.*` + `llm.*` (+ kept extras) -> safetensors in the source's key layout
(LoRA merged) and a config.json (the source's, recorded at conversion, else one built from the config). Every op
only moves bytes, so convert -> export reproduces the source tensors bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from tpo_jax.checkpoints.configs import REPORT_FILE, hf_config_from_llava_ov, llava_ov_config_from_hf, read_report
from tpo_jax.checkpoints.configs import to_dict
from tpo_jax.checkpoints.convert import (_check_output, _execute, _out_dtype, _per_layer, _shardings_by_path,
                                         abstract_params, param_shapes)
from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.export import _LORA_NAMES, ParamSet, _Reader, _write
from tpo_jax.checkpoints.mapping import build_export_plan, build_plan
from tpo_jax.checkpoints.orbax_io import DEFAULT_BUDGET_BYTES
from tpo_jax.checkpoints.sources import TensorSource, checkpoint_root, open_source, read_json_file
from tpo_jax.checkpoints.stacking import present_layouts
from tpo_jax.checkpoints.staging import staged_output
from tpo_jax.checkpoints.tables import llava_ov as table
from tpo_jax.config import TPOConfig, get_config

FORMAT = "llava_ov"
DEFAULT_PRESET = "llava_ov_tpo_7b"


def is_base_param(path: str) -> bool:
    """Whether a TPOModel parameter is one a LLaVA-OV checkpoint holds (`vision.*`, `llm.*`, not LoRA)."""
    return path.startswith(("vision.", "llm.")) and not path.endswith((".lora_a", ".lora_b"))


def _require_llava_ov(cfg: TPOConfig, what: str) -> None:
    if cfg.llava_ov is None:
        raise ConversionError(f"{what}: the model config is of arch 'videochat' (no llava_ov section); a LLaVA-OV "
                              f"checkpoint needs a config of arch 'llava_ov', e.g. the preset {DEFAULT_PRESET}")


def _config_pairs(base, cfg: TPOConfig) -> list[tuple[str, Any, str, Any]]:
    """(config.json field, its value, our config field, its value) for everything the two must agree on."""
    s, t = base.siglip, cfg.llava_ov.siglip
    pairs = [(f"vision_config.{hf}", getattr(s, ours), f"llava_ov.siglip.{ours}", getattr(t, ours))
             for hf, ours in (("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
                              ("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_heads"),
                              ("patch_size", "patch_size"), ("image_size", "image_size"),
                              ("num_channels", "in_chans"), ("layer_norm_eps", "norm_eps"))]
    a, b = base.llm, cfg.llm
    pairs += [(f"text_config.{hf}", getattr(a, ours), f"llm.{ours}", getattr(b, ours))
              for hf, ours in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                               ("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_heads"),
                               ("num_key_value_heads", "num_kv_heads"), ("head_dim", "resolved_head_dim"),
                               ("intermediate_size", "intermediate_size"), ("rms_norm_eps", "rms_norm_eps"),
                               ("rope_theta", "rope_theta"), ("tie_word_embeddings", "tie_embeddings"),
                               ("model_type (qwen2: q/k/v bias)", "attention_bias"))]
    pairs += [("image_token_index", base.image_token_id, "llava_ov.image_token_id", cfg.llava_ov.image_token_id),
              ("video_token_index", base.video_token_id, "llava_ov.video_token_id", cfg.llava_ov.video_token_id)]
    return pairs


def check_config(hf: dict, cfg: TPOConfig, *, file: str = "config.json"):
    """The LlavaOVConfig of a config.json, checked against the TPO model config `cfg`: ConversionError naming every
    field that differs (config.json's name and value, ours and its value)."""
    base = llava_ov_config_from_hf(hf, file=file)
    diff = [f"'{h}' is {hv!r} but the model config's {o} is {ov!r}" for h, hv, o, ov in _config_pairs(base, cfg)
            if (hv != ov if not isinstance(hv, float) else abs(hv - ov) > 1e-12 * max(abs(hv), abs(ov), 1.0))]
    if diff:
        raise ConversionError(f"the checkpoint does not fit the model config: {'; '.join(diff)} (pick the preset or "
                              "--set overrides that match this checkpoint)", file=file)
    return base


def _hf_config(source) -> tuple[dict, str]:
    base = Path(source)
    cfg_file = (base if base.is_dir() else base.parent) / "config.json"
    if not os.path.lexists(cfg_file):
        raise ConversionError("no config.json next to the checkpoint: a LLaVA-OneVision checkpoint directory (as "
                              "`save_pretrained` writes it) has one; is this another kind of checkpoint?",
                              file=str(cfg_file))
    data = read_json_file(cfg_file, checkpoint_root(base))
    if not isinstance(data, dict):
        raise ConversionError("expected a JSON object", file=str(cfg_file))
    return data, str(cfg_file)


def convert_llava_ov(source, out_dir, cfg: TPOConfig | None = None, *, dtype: str = "keep", extras: bool = True,
                     layout: str | None = None, mesh=None, rules=None, shardings=None, overwrite: bool = False,
                     budget_bytes: int = DEFAULT_BUDGET_BYTES, dry_run: bool = False, hf_config: dict | None = None,
                     log: Callable[[str], None] = lambda s: None) -> dict:
    """A Hugging Face LLaVA-OneVision checkpoint directory -> `out_dir` (module docstring).

    cfg: the TPO model config (default: the `llava_ov_tpo_7b` preset), arch "llava_ov"; the checkpoint's
    config.json must agree with it. dtype: "keep", "float32" or "bfloat16" for floating parameters. extras: keep
    SigLIP's unused post_layernorm (needed for a bit-exact export back). layout: the key layout
    (`tables.llava_ov.LAYOUTS`; default: detected). mesh + rules / shardings: place each parameter while writing,
    as `convert_videochat`. `source` may also be a `TensorSource` (e.g. metadata only, for a dry run), with its
    config.json as `hf_config`. Returns the report (also in `out_dir/conversion.json`)."""
    cfg = (cfg or get_config(DEFAULT_PRESET)).validate()
    _require_llava_ov(cfg, "convert_llava_ov")
    out_dtype = _out_dtype(dtype)
    if isinstance(source, TensorSource):
        if hf_config is None:
            raise ConversionError("a TensorSource source needs its config.json as hf_config=")
        hf, cfg_file = hf_config, f"{source.description} (hf_config)"
    else:
        _check_output(source, out_dir)
        hf, cfg_file = _hf_config(source)
    check_config(hf, cfg, file=cfg_file)
    src = source if isinstance(source, TensorSource) else open_source(source)
    if layout is None:
        try:
            layout = table.detect_layout(src.meta)
        except ConversionError as e:
            raise ConversionError(f"{e.args[0] if e.args else e}: not a LLaVA-OneVision checkpoint (its first keys: "
                                  f"{sorted(src.meta)[:3]})", file=src.description) from None
    elif layout not in table.LAYOUTS:
        raise ConversionError(f"unknown key layout {layout!r}; known: {sorted(table.LAYOUTS)}")
    abstract = abstract_params(lambda: _tpo_model(cfg))
    shapes = {p: s for p, s in param_shapes(abstract).items() if is_base_param(p)}
    layouts = present_layouts(_stack_layouts(cfg), shapes)
    plan = build_plan(src.meta, table.base_rules(cfg.llava_ov.siglip, cfg.llm, layout), _per_layer(shapes, layouts),
                      where=src.description, keep_extras=extras)
    info = {"format": FORMAT, "source": src.description, "layout": layout, "dtype": dtype, "config": to_dict(cfg),
            "hf_config": hf}
    if dry_run:
        return {**info, "summary": plan.summary(), "extras": {j.src[0]: {"path": j.dst[0], "why": j.rule.note}
                                                               for j in plan.extras},
                "dropped": {", ".join(j.src): j.rule.note or "dropped" for j in plan.dropped}}
    sh = _shardings_by_path(mesh, rules, shardings, abstract, "")
    return _execute(plan, src, out_dir, dtype=out_dtype, shardings=sh, budget_bytes=budget_bytes,
                    overwrite=overwrite, info=info, log=log, layouts=layouts)


def _tpo_model(cfg: TPOConfig):
    from tpo_jax.model import TPOModel  # noqa: PLC0415

    return TPOModel(cfg, rngs=None)


def _stack_layouts(cfg: TPOConfig):
    from tpo_jax.model import stack_layouts  # noqa: PLC0415

    return stack_layouts(cfg)


def export_llava_ov(checkpoint, out_dir, *, layout: str | None = None, dtype: str = "keep",
                    max_shard_bytes: int = 5 * 10 ** 9, overwrite: bool = False,
                    budget_bytes: int = DEFAULT_BUDGET_BYTES) -> list[Path]:
    """The base weights of a LLaVA-OV TPO model -> a Hugging Face LLaVA-OneVision directory (`model.safetensors`
    or shards + index, and config.json). `checkpoint`: a `convert_llava_ov` output or a `ParamSet` (e.g. a trained
    model's state and config). layout: the key layout to write (default: the source's, recorded at conversion;
    else "saved5", what transformers 5 `save_pretrained` writes). Kept LoRA adapters are merged into the weights;
    heads, task tokens and SAM2 are not part of the base model and are not written. Returns the written files."""
    reader = _Reader(checkpoint)
    cfg = reader.config
    if not isinstance(cfg, TPOConfig) or cfg.llava_ov is None:
        what = "an LLM only (tpo-convert hf)" if not isinstance(cfg, TPOConfig) else "of arch 'videochat'"
        raise ConversionError(f"these parameters are {what}, not a LLaVA-OV model; use export_hf / "
                              "export_videochat", file=reader.where)
    report = read_report(reader.dir) if reader.dir is not None else {}
    layout = layout or report.get("layout") or "saved5"
    if layout not in table.LAYOUTS:
        raise ConversionError(f"unknown key layout {layout!r}; known: {sorted(table.LAYOUTS)}")
    params = {p: s for p, (s, _) in reader.params.items() if p.startswith(("vision.", "llm."))}
    if not any(p.startswith("vision.") for p in params) or not any(p.startswith("llm.") for p in params):
        raise ConversionError("these parameters lack the vision side or the LLM of the base model (a partial "
                              "checkpoint?)", file=reader.where)
    modules = [n for n in _LORA_NAMES if any(p.endswith(f".{n}.lora_a") for p in params)]
    scaling = reader.lora_scaling or cfg.lora.scaling
    rules = table.base_export_rules(cfg.llava_ov.siglip, cfg.llm, layout, lora_modules=modules, scaling=scaling)
    extras = {p: s for p, (s, _) in reader.extras.items() if p.startswith("unused/")}
    plan = build_export_plan(params, extras, rules, where=reader.where)
    hf = report.get("hf_config") or hf_config_from_llava_ov(cfg)
    with staged_output(out_dir, overwrite) as tmp:
        files = _write(reader, plan, tmp, dtype=dtype, route=lambda key: (".", "model"),
                       max_shard_bytes=max_shard_bytes, budget_bytes=budget_bytes)
        if dtype != "keep":
            hf = {**hf, "torch_dtype": dtype, "dtype": dtype}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        files.append(tmp / "config.json")
    out = Path(out_dir).absolute()
    return sorted(out / f.relative_to(tmp) for f in files)


__all__ = ["FORMAT", "is_base_param", "check_config", "convert_llava_ov", "export_llava_ov", "ParamSet",
           "REPORT_FILE"]

"""Configs at the conversion boundary: our dataclass configs <-> JSON, Hugging Face config.json <-> LLMConfig
(Mistral, Llama, Qwen2), a LLaVA-OneVision config.json -> LlavaOVConfig, and PEFT adapter_config.json -> LoRA
settings."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

from tpo_jax.config import LLMConfig, LoRAConfig, TPOConfig
from tpo_jax.config_fields import ConfigError
from tpo_jax.llava_ov.model import LlavaOVConfig
from tpo_jax.config import SiglipConfig
from tpo_jax.llava_ov.visual_tokens import AnyresConfig

from tpo_jax.checkpoints.errors import ConversionError

REPORT_FILE = "conversion.json"  # written by conversion next to params/: source, options, config, report


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict, *, file: str = "config", prefix: str = ""):
    """Rebuild a (nested, frozen) config dataclass from `to_dict` output."""
    default = cls()
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not resolve: only non-optional sections then
        hints = {}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConversionError(f"unknown config field(s) {[prefix + u for u in unknown]} for {cls.__name__}", file=file)
    kw = {}
    for name, value in data.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current):
            value = from_dict(type(current), value, file=file, prefix=f"{prefix}{name}.")
        elif current is None and isinstance(value, dict) and _optional_section(hints.get(name)) is not None:
            value = from_dict(_optional_section(hints[name]), value, file=file, prefix=f"{prefix}{name}.")
        elif isinstance(current, tuple):
            value = _tuples(value)
        kw[name] = value
    return cls(**kw)


def _optional_section(hint):
    """The dataclass of an optional section's annotation (`LlavaOVVisualConfig | None`), else None."""
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _tuples(value):
    """JSON lists back to the (nested) tuples of a config field, e.g. anyres pinpoints ((w, h), ...)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConversionError("file not found", file=str(path)) from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"not valid JSON ({e})", file=str(path)) from None


def llm_config_from_hf(hf: dict[str, Any], *, file: str = "config.json") -> LLMConfig:
    """A Hugging Face Mistral / Llama / Qwen2 config.json -> LLMConfig; features our decoder lacks are rejected.

    Qwen2 always has q/k/v biases (`attention_bias`); its sliding window (`use_sliding_window`) is refused."""
    model_type = hf.get("model_type")
    if model_type not in ("mistral", "llama", "qwen2"):
        raise ConversionError(f"field 'model_type' is {model_type!r}; only 'mistral', 'llama' and 'qwen2' are "
                              "supported", file=file)
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            raise ConversionError(f"field '{name}' is true; our decoder has no such projection biases", file=file)
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ConversionError("field 'use_sliding_window' is true; Qwen2's per-layer sliding window is not "
                              "supported", file=file)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"field 'hidden_act' is {hf.get('hidden_act')!r}; expected 'silu'", file=file)
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type", "default")
    if scaling or rope_type != "default":
        raise ConversionError(f"rope scaling {scaling or rope} is not supported (plain RoPE only)", file=file)
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    try:
        cfg = LLMConfig(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=None if hf.get("head_dim") is None else int(hf["head_dim"]),
            intermediate_size=int(hf["intermediate_size"]), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta), max_position=int(hf.get("max_position_embeddings", 32768)),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention_bias=model_type == "qwen2")
    except KeyError as e:
        raise ConversionError(f"missing field {e.args[0]!r}", file=file) from None
    if cfg.head_dim is not None and cfg.head_dim == cfg.hidden_size // cfg.num_heads:
        cfg = dataclasses.replace(cfg, head_dim=None)
    cfg.validate()
    return cfg


def llava_ov_config_from_hf(hf: dict[str, Any], *, file: str = "config.json", **overrides) -> LlavaOVConfig:
    """A Hugging Face LLaVA-OneVision config.json (`model_type: llava_onevision`, a SigLIP `vision_config`, a
    Qwen2 `text_config`) -> LlavaOVConfig; what our model does not build is rejected, naming the field.
    `overrides`: LlavaOVConfig fields the config.json does not hold (max_images, max_frames, dtype, …)."""
    if hf.get("model_type") != "llava_onevision":
        raise ConversionError(f"field 'model_type' is {hf.get('model_type')!r}; expected 'llava_onevision'",
                              file=file)
    vis, text = hf.get("vision_config"), hf.get("text_config")
    for name, sub in (("vision_config", vis), ("text_config", text)):
        if not isinstance(sub, dict):
            raise ConversionError(f"field '{name}' is missing or not an object", file=file)
    expected = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
                "multimodal_projector_bias": True, "vision_config.model_type": "siglip_vision_model",
                "vision_config.hidden_act": "gelu_pytorch_tanh", "vision_config.vision_use_head": False}
    defaults = {"multimodal_projector_bias": True, "vision_config.hidden_act": "gelu_pytorch_tanh",
                "vision_config.vision_use_head": True}  # the transformers defaults when a key is absent
    for name, want in expected.items():
        tree, key = (vis, name.split(".", 1)[1]) if name.startswith("vision_config.") else (hf, name)
        got = tree.get(key, defaults.get(name))
        if got != want:
            raise ConversionError(f"field '{name}' is {got!r}; LLaVA-OV as built here needs {want!r}", file=file)
    ratio = str(hf.get("vision_aspect_ratio", "anyres_max_9"))
    if not ratio.startswith("anyres_max_") or not ratio[len("anyres_max_"):].isdigit():
        raise ConversionError(f"field 'vision_aspect_ratio' is {ratio!r}; expected 'anyres_max_<N>'", file=file)
    try:
        tower = SiglipConfig(hidden_size=int(vis["hidden_size"]), intermediate_size=int(vis["intermediate_size"]),
                             num_layers=int(vis["num_hidden_layers"]), num_heads=int(vis["num_attention_heads"]),
                             patch_size=int(vis["patch_size"]), image_size=int(vis["image_size"]),
                             in_chans=int(vis.get("num_channels", 3)),
                             norm_eps=float(vis.get("layer_norm_eps", 1e-6)))
        anyres = AnyresConfig(image_size=tower.image_size, patch_size=tower.patch_size,
                              pinpoints=tuple(tuple(p) for p in hf["image_grid_pinpoints"]),
                              max_num_patches=int(ratio[len("anyres_max_"):]))
        image_id = hf["image_token_index"] if "image_token_index" in hf else hf["image_token_id"]
        video_id = hf["video_token_index"] if "video_token_index" in hf else hf["video_token_id"]
    except KeyError as e:
        raise ConversionError(f"missing field {e.args[0]!r}", file=file) from None
    llm = llm_config_from_hf(text, file=f"{file} (text_config)")
    try:
        return LlavaOVConfig(siglip=tower, anyres=anyres, llm=llm, image_token_id=int(image_id),
                             video_token_id=int(video_id), **overrides).validate()
    except ConfigError as e:
        raise ConversionError(str(e), file=file) from None


def hf_config_from_llava_ov(cfg: TPOConfig, dtype: str = "float32") -> dict[str, Any]:
    """config.json of a Hugging Face LlavaOnevisionForConditionalGeneration with the base-model shapes of a TPO
    config of arch "llava_ov" (what `llava_ov_config_from_hf` reads back to the same tower, LLM and ids)."""
    v, q = cfg.llava_ov, cfg.llm
    s, a = v.siglip, v.anyres
    text = {"model_type": "qwen2", "hidden_act": "silu", "vocab_size": q.vocab_size, "hidden_size": q.hidden_size,
            "num_hidden_layers": q.num_layers, "num_attention_heads": q.num_heads,
            "num_key_value_heads": q.num_kv_heads, "head_dim": q.resolved_head_dim,
            "intermediate_size": q.intermediate_size, "rms_norm_eps": q.rms_norm_eps, "rope_theta": q.rope_theta,
            "max_position_embeddings": q.max_position, "use_sliding_window": False,
            "tie_word_embeddings": q.tie_embeddings, "attention_dropout": 0.0, "torch_dtype": dtype}
    vision = {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
              "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
              "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads, "patch_size": s.patch_size,
              "image_size": s.image_size, "num_channels": s.in_chans, "layer_norm_eps": s.norm_eps}
    return {"architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
            "vision_config": vision, "text_config": text, "image_token_index": v.image_token_id,
            "video_token_index": v.video_token_id, "image_grid_pinpoints": [list(p) for p in a.pinpoints],
            "vision_aspect_ratio": f"anyres_max_{a.max_num_patches}", "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True, "tie_word_embeddings": q.tie_embeddings, "torch_dtype": dtype}


def hf_config_from_llm(cfg: LLMConfig, dtype: str) -> dict[str, Any]:
    """config.json of a Hugging Face MistralForCausalLM with the shapes of `cfg`."""
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim, "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position, "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "torch_dtype": dtype,
        "dtype": dtype, "bos_token_id": 1, "eos_token_id": 2,
    }


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """The LoRA settings of a PEFT adapter_config.json."""

    rank: int
    alpha: float
    scaling: float
    targets: tuple[str, ...]
    dropout: float

    def lora_config(self) -> LoRAConfig:
        # LoRAConfig.scaling is alpha / rank; rsLoRA's alpha / sqrt(rank) is expressed through alpha.
        return LoRAConfig(enabled=True, rank=self.rank, alpha=self.scaling * self.rank, dropout=self.dropout,
                          targets=self.targets)


SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def adapter_info(path: str | Path) -> AdapterInfo:
    file = str(path)
    data = read_json(path)
    if data.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"field 'peft_type' is {data.get('peft_type')!r}; only LORA is supported", file=file)
    for name, ok in (("use_dora", not data.get("use_dora")), ("modules_to_save", not data.get("modules_to_save")),
                     ("bias", data.get("bias", "none") == "none"), ("fan_in_fan_out", not data.get("fan_in_fan_out")),
                     ("rank_pattern", not data.get("rank_pattern")), ("alpha_pattern", not data.get("alpha_pattern"))):
        if not ok:
            raise ConversionError(f"field '{name}' = {data.get(name)!r} is not supported (plain LoRA only)", file=file)
    targets = data.get("target_modules") or []
    if isinstance(targets, str):
        raise ConversionError(f"field 'target_modules' is a regex {targets!r}; list the module names", file=file)
    unknown = sorted(set(targets) - set(SUPPORTED_TARGETS))
    if unknown:
        raise ConversionError(f"field 'target_modules' has {unknown}; supported: {list(SUPPORTED_TARGETS)}", file=file)
    try:
        rank, alpha = int(data["r"]), float(data["lora_alpha"])
    except KeyError as e:
        raise ConversionError(f"missing field {e.args[0]!r}", file=file) from None
    scaling = alpha / math.sqrt(rank) if data.get("use_rslora") else alpha / rank
    return AdapterInfo(rank, alpha, scaling, tuple(t for t in SUPPORTED_TARGETS if t in targets),
                       float(data.get("lora_dropout", 0.0)))


def peft_adapter_config(lora: LoRAConfig, targets) -> dict[str, Any]:
    """adapter_config.json for our kept LoRA weights (scaling alpha / r, no rsLoRA)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False,
            "modules_to_save": None, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "base_model_name_or_path": None, "revision": None}


def read_report(path) -> dict:
    """The conversion.json of a converted checkpoint."""
    return read_json(Path(path) / REPORT_FILE)


def model_config(report: dict) -> TPOConfig | tuple[LLMConfig, Any]:
    """The config recorded at conversion: TPOConfig (videochat, llava_ov) or (LLMConfig, LoRAConfig | None) (hf)."""
    if report["format"] in ("videochat", "llava_ov"):
        return from_dict(TPOConfig, report["config"], file=REPORT_FILE)
    lo = report["config"]["lora"]
    return (from_dict(LLMConfig, report["config"]["llm"], file=REPORT_FILE),
            None if lo is None else from_dict(LoRAConfig, lo, file=REPORT_FILE))

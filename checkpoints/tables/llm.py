"""Mistral / Llama / Qwen2 decoder keys <-> `llm.*` of our model (MODEL-SPEC §3, §9.2, §9.3).

Our side (`tpo_jax.llm.MistralDecoder`, placed under `llm.` of TPOModel):

    llm.embed_tokens.embedding                        <- model.embed_tokens.weight                    (as is)
    llm.norm.scale                                    <- model.norm.weight
    llm.layers.{i}.{input,post_attention}_layernorm.scale <- model.layers.{i}.<same>.weight
    llm.layers.{i}.self_attn.{q,k,v,o}_proj.kernel    <- model.layers.{i}.self_attn.<p>.weight        (transposed)
    llm.layers.{i}.self_attn.{q,k,v}_proj.bias        <- model.layers.{i}.self_attn.<p>.bias          (Qwen2: as is)
    llm.layers.{i}.mlp.{gate,up,down}_proj.kernel     <- model.layers.{i}.mlp.<p>.weight              (transposed)
    llm.lm_head.kernel                                <- lm_head.weight                               (transposed)
    <proj>.lora_a (in, r) / <proj>.lora_b (r, out)    <- lora_A (r, in) / lora_B (out, r)             (transposed)

Source layouts:
* VideoChat-TPO: prefix `lm.base_model.model.`, PEFT-wrapped projections `<p>.base_layer.weight`,
  `<p>.lora_A.default.weight`, `<p>.lora_B.default.weight` on all 8 targets (incl. lm_head).
* Hugging Face: the plain names above; old checkpoints' `rotary_emb.inv_freq` buffers are dropped (recomputed).
  Qwen2's q/k/v biases are mapped when the config has `attention_bias` (`hf_llm(attention_bias=True)`);
  otherwise such a key is unexpected, and a bias-free checkpoint into a biased config is missing a key.
  Export writes the biases the parameters have.
  A decoder nested in a multimodal model is read through `layout` (`HF_LAYOUTS`): LLaVA-OneVision keeps it at
  `model.language_model.*` + `lm_head.*` (transformers 5 `state_dict()` names) or, saved by transformers 4
  (the llava-hf checkpoints), at `language_model.model.*` + `language_model.lm_head.*`. Only the decoder's
  keys are this table's; the vision tower and projector need their own.
* PEFT adapter: `base_model.model.<plain name without .weight>.lora_{A,B}.weight`.

LoRA mode "keep" maps base weight, A and B to kernel, lora_a, lora_b; "merge" folds them into the kernel,
W + (alpha/r)·B·A, computed in float32 (q/k rows stay in Hugging Face rotate-half order: our RoPE uses it too).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from tpo_jax.checkpoints.mapping import Rule, drop, norm, rule
from tpo_jax.checkpoints.ops import T, Duplicate, LoRAFold, LoRAMerge

PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
VIDEOCHAT_PREFIX = "lm.base_model.model."
PEFT_PREFIX = "base_model.model."
BIASED = ("q_proj", "k_proj", "v_proj")  # projections that carry a bias with `LLMConfig.attention_bias`
# where a Hugging Face state dict keeps the decoder: (prefix of embed_tokens / layers / norm, lm_head module)
HF_LAYOUTS = {
    "causal_lm": ("model.", "lm_head"),  # *ForCausalLM
    "llava": ("model.language_model.", "lm_head"),  # transformers 5 LlavaOnevisionForConditionalGeneration
    "llava_legacy": ("language_model.model.", "language_model.lm_head"),  # saved by transformers 4 (llava-hf)
}


def _layout(layout: str) -> tuple[str, str]:
    if layout not in HF_LAYOUTS:
        raise ValueError(f"unknown Hugging Face layout {layout!r}; known: {sorted(HF_LAYOUTS)}")
    return HF_LAYOUTS[layout]


def _modules(tie: bool, decoder: str = "model.", head: str = "lm_head") -> list[tuple[str, str, str]]:
    """(LoRA target name, source module path, our module path) for every projection."""
    out = [(name, f"{decoder}layers.{{i}}.{block}.{name}", f"llm.layers.{{i}}.{block}.{name}")
           for block, name in PROJECTIONS]
    return out if tie else out + [("lm_head", head, "llm.lm_head")]


def _common(decoder: str) -> list[Rule]:
    return [
        rule(f"{decoder}embed_tokens.weight", "llm.embed_tokens.embedding"),
        *norm(f"{decoder}norm", "llm.norm", bias=False),
        *norm(f"{decoder}layers.{{i}}.input_layernorm", "llm.layers.{i}.input_layernorm", bias=False),
        *norm(f"{decoder}layers.{{i}}.post_attention_layernorm", "llm.layers.{i}.post_attention_layernorm",
              bias=False),
    ]


def _biases(modules: list[tuple[str, str, str]]) -> list[Rule]:
    """The base Linear's bias of q/k/v (also under LoRA: PEFT leaves it on the base layer)."""
    return [rule(f"{src}.bias", f"{dst}.bias") for name, src, dst in modules if name in BIASED]


def _lora_linear(base: str, a: str, b: str, dst: str, lora: str, scaling: float, rank: int) -> list[Rule]:
    if lora == "keep":
        return [rule(base, f"{dst}.kernel", T), rule(a, f"{dst}.lora_a", T), rule(b, f"{dst}.lora_b", T)]
    if lora == "merge":
        return [rule((base, a, b), f"{dst}.kernel", LoRAMerge(scaling, rank), note="LoRA merged: W + s·B·A")]
    raise ValueError(f"lora mode must be 'keep' or 'merge', got {lora!r}")


def videochat_llm(lora: str, scaling: float, rank: int) -> list[Rule]:
    """The released checkpoint's `lm.*` keys (741), every projection PEFT-wrapped."""
    p = VIDEOCHAT_PREFIX
    rules = _common(f"{p}model.")
    for _, src, dst in _modules(tie=False):
        rules += _lora_linear(f"{p}{src}.base_layer.weight", f"{p}{src}.lora_A.default.weight",
                              f"{p}{src}.lora_B.default.weight", dst, lora, scaling, rank)
    return rules


def hf_llm(*, tie: bool, adapter_targets: Sequence[str] = (), lora: str = "merge", scaling: float = 1.0,
           rank: int = 0, base_overrides: Mapping[str, str] | None = None, attention_bias: bool = False,
           layout: str = "causal_lm") -> list[Rule]:
    """A Hugging Face Mistral/Llama/Qwen2 state dict, plus an optional PEFT adapter on `adapter_targets`
    (`attention_bias`: the q/k/v biases of Qwen2, `LLMConfig.attention_bias`; `layout`: `HF_LAYOUTS`).

    `base_overrides` maps a module ("model.embed_tokens", "lm_head"; under `layout` its own names) to the
    adapter key holding a copy of its base weight (PEFT saves one when that layer is targeted or was resized);
    the adapter copy is used and the base model's tensor is dropped, as PEFT does when it loads the adapter.
    """
    decoder, head = _layout(layout)
    modules = _modules(tie, decoder, head)
    embed = f"{decoder}embed_tokens"
    overrides = dict(base_overrides or {})
    rules = []
    if embed in overrides:
        rules += [rule(overrides[embed], "llm.embed_tokens.embedding"),
                  drop(f"{embed}.weight", "replaced by the copy saved in the PEFT adapter")]
    rules += _common(decoder) + (_biases(modules) if attention_bias else [])
    for name, src, dst in modules:
        base = overrides.get(src, f"{src}.weight")
        if src in overrides:
            rules.append(drop(f"{src}.weight", "replaced by the copy saved in the PEFT adapter"))
        if name in adapter_targets:
            rules += _lora_linear(base, f"{PEFT_PREFIX}{src}.lora_A.weight",
                                  f"{PEFT_PREFIX}{src}.lora_B.weight", dst, lora, scaling, rank)
        else:
            rules.append(rule(base, f"{dst}.kernel", T))
    rules += [drop(f"{decoder}layers.{{i}}.self_attn.rotary_emb.inv_freq", "RoPE buffer, recomputed"),
              drop(f"{decoder}rotary_emb.inv_freq", "RoPE buffer, recomputed")]
    if tie:
        rules.append(drop(f"{head}.weight", f"tied to {embed}.weight"))
    return rules


def hf_llm_export(*, tie: bool, lora_modules: Sequence[str], merged: bool, scaling: float,
                  layout: str = "causal_lm") -> list[Rule]:
    """Our `llm.*` -> Hugging Face keys. Modules in `lora_modules` carry kept adapters: with `merged` they are
    folded into the weight, otherwise the adapter goes to PEFT keys (`base_model.model.….lora_{A,B}.weight`).
    q/k/v biases, if the parameters have them, go to `<p>.bias` of the base model either way."""
    decoder, head = _layout(layout)
    modules = _modules(tie, decoder, head)
    rules = _common(decoder) + _biases(modules)
    for name, src, dst in modules:
        if name in lora_modules and merged:
            rules.append(rule(f"{src}.weight", (f"{dst}.kernel", f"{dst}.lora_a", f"{dst}.lora_b"),
                              LoRAFold(scaling)))
        elif name in lora_modules:
            if name == "lm_head":  # PEFT also keeps the targeted output layer's base weight in the adapter
                rules.append(rule((f"{src}.weight", f"{PEFT_PREFIX}{src}.base_layer.weight"), f"{dst}.kernel",
                                  Duplicate(2, transpose=True)))
                rules += [rule(f"{PEFT_PREFIX}{src}.lora_A.weight", f"{dst}.lora_a", T),
                          rule(f"{PEFT_PREFIX}{src}.lora_B.weight", f"{dst}.lora_b", T)]
                continue
            rules += _lora_linear(f"{src}.weight", f"{PEFT_PREFIX}{src}.lora_A.weight",
                                  f"{PEFT_PREFIX}{src}.lora_B.weight", dst, "keep", scaling, 0)
        else:
            rules.append(rule(f"{src}.weight", f"{dst}.kernel", T))
    return rules

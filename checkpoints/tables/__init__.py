"""Declarative key tables, one module per component; this module assembles them per source format.

Where does a key go? Read the docstring of the component's module:
`llm` (Mistral / LoRA), `vision` (ViT, Q-Former, projections), `heads` (task tokens, box encoder, region and
mask heads), `sam2` + `sam2_memory` (the whole SAM2: image path, memory path), `temporal` (CG-DETR). Rules are tried in order; the first whose source template matches
a key handles it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from tpo_jax.checkpoints.mapping import Rule
from tpo_jax.checkpoints.tables import heads, llm, sam2, temporal, vision


def videochat(lora: str = "keep", scaling: float = 2.0, rank: int = 16, sam2_mask_layers: int = 4) -> list[Rule]:
    """Every key of the released VideoChat-TPO checkpoint (2,594): mapped, kept as an extra, or dropped.
    `sam2_mask_layers`: convs of SAM2's memory mask downsampler (4 in the release)."""
    return (llm.videochat_llm(lora, scaling, rank) + vision.vit() + vision.qformer() + heads.tokens_and_heads()
            + sam2.whole(sam2_mask_layers, src="sam.", dst="sam2.") + temporal.cgdetr())


def hf(*, tie: bool = False, adapter_targets: Sequence[str] = (), lora: str = "merge", scaling: float = 1.0,
       rank: int = 0, base_overrides: Mapping[str, str] | None = None, attention_bias: bool = False) -> list[Rule]:
    """A Hugging Face Mistral/Llama/Qwen2 checkpoint (+ PEFT adapter) -> `llm.*`."""
    return llm.hf_llm(tie=tie, adapter_targets=adapter_targets, lora=lora, scaling=scaling, rank=rank,
                      base_overrides=base_overrides, attention_bias=attention_bias)


__all__ = ["videochat", "hf", "llm", "vision", "heads", "sam2", "temporal"]

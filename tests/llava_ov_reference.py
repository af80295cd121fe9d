"""The transformers reference of the LLaVA-OV tests: a `LlavaOnevisionConfig` with the shapes of one of our
`LlavaOVConfig`s and a random model of it (weights ~0.2·N(0, 1), norm scales 1 + 0.2·N(0, 1); f32)."""

from __future__ import annotations

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from tpo_jax.llava_ov import model as M


def hf_config(cfg: M.LlavaOVConfig) -> LlavaOnevisionConfig:
    s, q = cfg.siglip, cfg.llm
    return LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=s.hidden_size,
                           intermediate_size=s.intermediate_size, patch_size=s.patch_size, image_size=s.image_size,
                           num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, vision_use_head=False),
        text_config=dict(model_type="qwen2", hidden_size=q.hidden_size, intermediate_size=q.intermediate_size,
                         num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
                         num_key_value_heads=q.num_kv_heads, vocab_size=q.vocab_size, rms_norm_eps=q.rms_norm_eps,
                         rope_theta=q.rope_theta, max_position_embeddings=q.max_position, tie_word_embeddings=False),
        image_token_index=cfg.image_token_id, video_token_index=cfg.video_token_id,
        image_grid_pinpoints=[list(p) for p in cfg.anyres.pinpoints])


def random_hf_model(cfg: M.LlavaOVConfig) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(hf_config(cfg)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = ("norm" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen) if is_scale
                    else 0.2 * torch.randn(p.shape, generator=gen))
    return model

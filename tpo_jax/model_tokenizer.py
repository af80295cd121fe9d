"""The tokenizer of a model config: `MultimodalTokenizer` (Mistral, VideoChat-TPO) or `LlavaOVTokenizer` (Qwen2,
LLaVA-OV-TPO), checked against the config's token ids so a mismatched pair fails before any step runs."""

from __future__ import annotations

from tpo_jax.config import TPOConfig
from tpo_jax.llava_ov.model import base_config
from tpo_jax.llava_ov.tokenizer import LlavaOVTokenizer
from tpo_jax.tokenizer import MultimodalTokenizer, TokenizerError


def model_tokenizer(cfg: TPOConfig) -> MultimodalTokenizer | LlavaOVTokenizer:
    """arch "videochat": the released Mistral tokenizer with `cfg.num_visual_tokens` placeholders per visual block;
    arch "llava_ov": the Qwen2 tokenizer of `cfg.llava_ov.tokenizer` ("" = the shipped tiny one). Raises
    TokenizerError naming the config field when the tokenizer's `<image>` / `<video>` / task-token ids are not the
    config's or the vocabulary does not fit the embedding."""
    if cfg.llava_ov is None:
        tok = MultimodalTokenizer(num_visual_tokens=cfg.num_visual_tokens)
    else:
        path = cfg.llava_ov.tokenizer
        tok = LlavaOVTokenizer(path) if path else LlavaOVTokenizer.tiny()
        try:
            tok.check_config(base_config(cfg))
        except TokenizerError as e:
            hint = "" if path else " (set llava_ov.tokenizer to the directory of the model's tokenizer)"
            raise TokenizerError(f"{e}{hint}") from None
    mine = cfg.task_tokens.by_token()
    theirs = tok.added_token_ids
    wrong = {t: (mine[t], theirs.get(t)) for t in mine if theirs.get(t) != mine[t]}
    if wrong:
        where = ("the Mistral tokenizer" if cfg.llava_ov is None
                 else cfg.llava_ov.tokenizer or "the shipped tiny tokenizer")
        raise TokenizerError(f"config field 'task_tokens': ids {wrong} (config, tokenizer) disagree with {where}")
    return tok


__all__ = ["model_tokenizer"]

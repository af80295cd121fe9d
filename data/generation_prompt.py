"""The prompt of a generation request (`tpo_jax.generate.GenerationRequest`) in the model's own form — the form the
training examples use (`tpo_jax.data.conversation`) — built with its tokenizer
(`tpo_jax.model_tokenizer.model_tokenizer(cfg)`):

* arch "videochat" (Mistral, `MultimodalTokenizer`): the released demo's prompt (MODEL-SPEC §4.3, three BOS,
  `encode_demo_prompt`), or with `template="library"` or a chat history the library `generate_answer` form
  (`encode_answer_prompt`, with the frame-timestamp message when the question asks about timestamps);
* arch "llava_ov" (Qwen2, `LlavaOVTokenizer`): LLaVA-OV's ChatML, `chat_messages(question, video=True,
  system=DEFAULT_SYSTEM_PROMPT, history=...)` with the generation prompt (`<|im_start|>assistant\\n`), its
  `<video>` expanded to `cfg.num_visual_tokens` rows, and the frame-time sentence before the first question when
  it asks about timestamps (`data.conversation.chatml_user_text`, the training examples' rule). Every input of this
  architecture is a video (an image is its frame repeated `cfg.num_frames` times), so `is_video` and `template` do
  not change it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from tpo_jax.config import TPOConfig
from tpo_jax.data.conversation import chatml_user_text
from tpo_jax.data.prompts import encode_answer_prompt, encode_demo_prompt, timestamp_message
from tpo_jax.llava_ov.model import base_config
from tpo_jax.llava_ov.tokenizer import DEFAULT_SYSTEM_PROMPT, chat_messages

TEMPLATES = ("demo", "library")


@dataclasses.dataclass(frozen=True)
class PromptIds:
    input_ids: np.ndarray  # (L,) int32
    visual_mask: np.ndarray  # (L,) bool: the visual placeholder rows


def encode_question(cfg: TPOConfig, tok, question: str, *, is_video: bool = True,
                    frame_times: Sequence[float] | None = None, history: Sequence[tuple[str, str]] = (),
                    template: str = "demo") -> PromptIds:
    """Ids and visual rows of the prompt asking `question` (after the (question, answer) turns of `history`)."""
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r} is not one of {list(TEMPLATES)}")
    if cfg.arch == "llava_ov":
        turns = list(history)
        if turns:  # the frame-time sentence belongs to the first user turn, as in training (data.conversation)
            turns[0] = (chatml_user_text(turns[0][0], frame_times), turns[0][1])
        else:
            question = chatml_user_text(question, frame_times)
        messages = chat_messages(question, video=True, system=DEFAULT_SYSTEM_PROMPT, history=turns)
        p = tok.build_input_ids(messages, base_config(cfg), num_frames=cfg.num_frames, add_generation_prompt=True)
        return PromptIds(np.asarray(p.input_ids, np.int32), np.asarray(p.video_index, bool))
    if template == "demo" and not history:
        p = encode_demo_prompt(tok, question, is_video=is_video, frame_times=frame_times, max_length=None)
    else:
        msg = timestamp_message(frame_times) if frame_times is not None and "timestamp" in question else ""
        p = encode_answer_prompt(tok, question, is_video=is_video, msg=msg, history=list(history))
    return PromptIds(np.asarray(p.input_ids, np.int32), np.asarray(p.visual_index, bool))


def query_ids(tok, question: str) -> list[int]:
    """The question's token ids without BOS: the temporal head's query (feature_source "model")."""
    return list(tok.encode(question, add_bos=False))


__all__ = ["PromptIds", "TEMPLATES", "encode_question", "query_ids"]

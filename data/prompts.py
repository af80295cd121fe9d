"""The released model's conversation prompts (MODEL-SPEC §4.3): the demo and library templates as strings,
and as token ids through `MultimodalTokenizer.build_input_ids` (which expands the visual placeholders and gives
every text segment its own BOS, `tpo_jax.tokenizer`).

| template                          | strings            | ids                    | BOS |
|-----------------------------------|--------------------|------------------------|-----|
| demo (`app.py process_qa`)        | `demo_prompt`      | `encode_demo_prompt`   | 3   |
| library (`generate_answer`)       | `answer_prompt`    | `encode_answer_prompt` | 2   |

Training examples (`tpo_jax.data.conversation`) use the demo form; the per-task instructions and task-token
answers are in `tpo_jax.data.templates`.
"""

from __future__ import annotations

from typing import Any, Sequence

from tpo_jax.tokenizer import EOS_TOKEN, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, MultimodalTokenizer, TokenizedPrompt

IMAGE_BLOCK = "<Image>" + IMAGE_PLACEHOLDER + "</Image>"
VIDEO_BLOCK = "<Video>" + VIDEO_PLACEHOLDER + "</Video>"

#: Answer prefix the library ``generate_answer`` appends for multiple-choice questions.
BEST_OPTION_PREFIX = "Best Option: ("

#: The demo cuts the concatenated prompt ids to at most this many tokens.
DEMO_MAX_LENGTH = 1024


# --- strings -------------------------------------------------------------------------------------------------------


def timestamp_message(frame_times: Sequence[float]) -> str:
    """``" The video contains N frames sampled at t1, t2, …, tN seconds. "`` with each time ``str(round(t, 1))``."""
    times = ", ".join(str(round(float(t), 1)) for t in frame_times)
    return f" The video contains {len(frame_times)} frames sampled at {times} seconds. "


def _media_block(is_video: bool) -> str:
    return VIDEO_BLOCK if is_video else IMAGE_BLOCK


def demo_prompt(question: str, *, is_video: bool = True, frame_times: Sequence[float] | None = None) -> tuple[str, str]:
    """The two strings of the demo template (``app.py Inference.process_qa``, MODEL-SPEC §4.3).

    Part 1: ``"[INST] " + "<Video>[<VID_PLH>]</Video>" + msg.rstrip() + "[/INST]"`` (images:
    ``"<Image>[<IMG_PLH>]</Image>"``), where ``msg`` is :func:`timestamp_message` of ``frame_times`` if the question
    contains ``"timestamp"`` and ``frame_times`` are given, else empty.
    Part 2: ``" [INST] " + question + " [/INST]" + " "``, or just ``" "`` for an empty question.
    """
    msg = timestamp_message(frame_times) if frame_times is not None and "timestamp" in question else ""
    part1 = "[INST] " + _media_block(is_video) + msg.rstrip() + "[/INST]"
    part2 = (" [INST] " + question + " [/INST]" if question else "") + " "
    return part1, part2


def answer_prompt(
    question: str,
    *,
    is_video: bool = True,
    instruction: str = "",
    msg: str = "",
    history: Sequence[tuple[str, str]] = (),
    answer_prefix: str | None = None,
) -> str:
    """The single string of the library ``MultiModalLLM_PT.generate_answer`` template (MODEL-SPEC §4.3).

    ``instruction + "[INST] " + media block + msg.rstrip() + "[/INST]"``, then per ``(q, a)`` in ``history``
    ``" [INST] " + q + " [/INST]" + a + "</s>"``, then ``" [INST] " + question + " [/INST]"`` (no trailing space),
    then ``answer_prefix`` if given (e.g. :data:`BEST_OPTION_PREFIX` = ``"Best Option: ("``).
    ``msg`` is the optional timestamp sentence (see :func:`timestamp_message`).
    """
    text = instruction + "[INST] " + _media_block(is_video) + msg.rstrip() + "[/INST]"
    for q, a in history:
        text += " [INST] " + q + " [/INST]" + a + EOS_TOKEN
    text += " [INST] " + question + " [/INST]"
    if answer_prefix:
        text += answer_prefix
    return text


# --- ids -----------------------------------------------------------------------------------------------------------


def encode_demo_prompt(
    tok: MultimodalTokenizer,
    question: str,
    *,
    is_video: bool = True,
    frame_times: Sequence[float] | None = None,
    max_length: int | None = DEMO_MAX_LENGTH,
) -> TokenizedPrompt:
    """Ids of the demo (``app.py``) prompt: the two strings of :func:`demo_prompt`, each through
    ``tok.build_input_ids``, concatenated (three BOS in total) and cut to ``max_length`` (1024 in the demo)."""
    part1, part2 = demo_prompt(question, is_video=is_video, frame_times=frame_times)
    out = TokenizedPrompt.concatenate(
        [tok.build_input_ids(part1, is_video=is_video), tok.build_input_ids(part2, is_video=is_video)],
        is_video=is_video,
    )
    return out if max_length is None else out.truncate(max_length)


def encode_answer_prompt(
    tok: MultimodalTokenizer,
    question: str,
    *,
    is_video: bool = True,
    max_length: int | None = None,
    **template: Any,
) -> TokenizedPrompt:
    """Ids of the library ``generate_answer`` prompt (one string, tokenised once → two BOS); ``template``: the
    other keyword arguments of :func:`answer_prompt` (``instruction``, ``msg``, ``history``, ``answer_prefix``)."""
    text = answer_prompt(question, is_video=is_video, **template)
    return tok.build_input_ids(text, is_video=is_video, max_length=max_length)

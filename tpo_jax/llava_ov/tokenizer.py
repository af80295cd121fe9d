"""The text side of LLaVA-OV-TPO: the Qwen2 tokenizer with LLaVA-OV's `<image>` / `<video>` and TPO's 7 task
tokens, the LLaVA-OV chat template, and prompts with their visual placeholders expanded.

Tokenizer. `LlavaOVTokenizer(path)` wraps the `transformers` tokenizer of a local directory (`AutoTokenizer`,
`local_files_only`: a llava-hf `llava-onevision-qwen2-*-hf` directory, or the tiny one shipped in
`tpo_jax/assets/llava_ov_tiny_tokenizer/`, `LlavaOVTokenizer.tiny()`). The directory must already hold
`<|im_start|>`, `<|im_end|>`, `<image>` and `<video>` (llava-hf adds the last two to Qwen2's vocabulary as special
tokens: 151646 / 151647 for 7B). TPO's task tokens (`tpo_jax.tokenizer.ADDED_TOKENS`, the strings VideoChat-TPO
adds to Mistral) that it lacks are added as special tokens right after them, in that order (7B: 151648..151654,
inside Qwen2-7B's 152128 embedding rows; the tiny tokenizer ships them at 389..395). Qwen2 has no BOS; EOS of a
chat turn is `<|im_end|>`, the pad token `<|endoftext|>`. `decode(..., skip_special_tokens=True)` drops the chat
and visual tokens but keeps the task tokens (as `MultimodalTokenizer.decode` does for Mistral).

Chat template. `CHAT_TEMPLATE` is the Jinja template llava-hf ships for LLaVA-OneVision (its
`chat_template.json`), transcribed from `chat_template` in transformers'
`src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py`, which writes it into every
converted processor. Per message: `<|im_start|>{role}\\n`, then one `<image>\\n` per image item, one `<video>\\n`
per video item (images first, then videos, whatever their position in the content list), then the text items
concatenated, then `<|im_end|>\\n`; `add_generation_prompt` appends `<|im_start|>assistant\\n`. The template adds no
system message on its own; `DEFAULT_SYSTEM_PROMPT` ("You are a helpful assistant.") is the one the same script's
check prompt writes (`<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<image>\\n
What is shown in this image?<|im_end|>\\n<|im_start|>assistant\\n`), Qwen2-Instruct's default and LLaVA-NeXT's
`conv_qwen` system message. `render_chat` renders the template in Python (no Jinja) and also returns the
character spans of the assistant texts (the template's `{% generation %}` blocks).

Prompts. `build_input_ids(messages, cfg, image_sizes=… | image_plans=…, num_frames=…)` renders, tokenises
(one `<image>` / `<video>` id each) and expands the placeholders with `tpo_jax.llava_ov.model.expand_placeholders`:
the k-th `<image>` becomes its packing plan's `length` ids (`visual_tokens.image_plan`, tiled when the sample
has one image, base + newline when it has several, as the HF processor counts them), the `<video>` becomes
`num_frames · p² + 1`. The result (`LlavaOVPrompt`) carries `image_index` / `video_index` (the rows
`LlavaOV.embed_inputs` overwrites) and `assistant_mask` (the assistant texts and their closing `<|im_end|>`: the
positions whose next-token targets a training step would score). The ids equal what transformers'
`LlavaOnevisionProcessor` gives for the same conversation (tests/test_llava_ov_tokenizer.py).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tpo_jax.tokenizer import (ADDED_TOKENS, BOX_BEGIN, BOXES, TEMP, TIME_BEGIN, TRACK_BEGIN, TRACK_BOX, TRACKING,
                               TokenizerError)

__all__ = ["CHAT_TEMPLATE", "DEFAULT_SYSTEM_PROMPT", "ENDOFTEXT", "IM_END", "IM_START", "IMAGE_TOKEN", "VIDEO_TOKEN",
           "LlavaOVPrompt", "LlavaOVTokenizer", "TokenizerError", "chat_messages", "default_tiny_tokenizer_dir",
           "render_chat"]

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

#: llava-hf's LLaVA-OneVision chat template (see the module docstring for the source).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_ASSET = ("assets", "llava_ov_tiny_tokenizer")
_REQUIRED = (IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN)
_WHY = {IM_START: "the chat template's turn start", IM_END: "the chat template's turn end",
        IMAGE_TOKEN: "LLaVA-OV's image placeholder; llava-hf adds <image> and <video> to Qwen2 as special tokens",
        VIDEO_TOKEN: "LLaVA-OV's video placeholder; llava-hf adds <image> and <video> to Qwen2 as special tokens"}


def default_tiny_tokenizer_dir():
    """The tiny tokenizer shipped in the package (an `importlib.resources` Traversable; rebuilt by
    tools/make_llava_ov_tiny_tokenizer.py)."""
    node = importlib.resources.files("tpo_jax")
    for part in _ASSET:
        node = node.joinpath(part)
    return node


# --- chat template ---------------------------------------------------------------------------------------------------


def _items(content) -> list[Mapping[str, Any]]:
    """A message's content as a list of typed items (a plain string is one text item)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
                ) -> tuple[str, list[tuple[int, int]]]:
    """`CHAT_TEMPLATE` rendered in Python → (text, character spans of the assistant texts).

    messages: HF chat format, `{"role": "system" | "user" | "assistant", "content": [{"type": "text", "text": …},
    {"type": "image"}, {"type": "video"}, …]}`; a string content is shorthand for one text item.
    """
    out: list[str] = []
    pos = 0
    spans: list[tuple[int, int]] = []

    def put(s: str) -> None:
        nonlocal pos
        out.append(s)
        pos += len(s)

    for k, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str) or "content" not in message:
            raise ValueError(f"message {k} needs a string 'role' and a 'content', got keys {sorted(message)}")
        items = _items(message["content"])
        for item in items:
            if item.get("type") not in ("text", "image", "video"):
                raise ValueError(f"message {k}: content item type {item.get('type')!r} is not text, image or video")
        put(IM_START + role + "\n")
        put("".join(IMAGE_TOKEN + "\n" for it in items if it["type"] == "image"))
        put("".join(VIDEO_TOKEN + "\n" for it in items if it["type"] == "video"))
        start = pos
        put("".join(str(it["text"]) for it in items if it["type"] == "text"))
        if role == "assistant" and pos > start:
            spans.append((start, pos + len(IM_END)))  # the reply and the <|im_end|> that closes it
        put(IM_END + "\n")
    if add_generation_prompt:
        put(IM_START + "assistant\n")
    return "".join(out), spans


def chat_messages(question: str, *, num_images: int = 0, video: bool = False,
                  system: str | None = DEFAULT_SYSTEM_PROMPT, history: Sequence[tuple[str, str]] = (),
                  answer: str | None = None) -> list[dict[str, Any]]:
    """The conversation of one sample in HF chat format: an optional system message, the visual inputs (images,
    then the video) in the first user turn, `history` (question, answer) turns, `question`, and `answer` as the
    final assistant turn if given (a training target) — without it, render with `add_generation_prompt`."""
    visual = [{"type": "image"}] * num_images + ([{"type": "video"}] if video else [])
    turns = list(history) + [(question, answer)]
    msgs: list[dict[str, Any]] = [] if system is None else [{"role": "system",
                                                              "content": [{"type": "text", "text": system}]}]
    for k, (q, a) in enumerate(turns):
        msgs.append({"role": "user", "content": (visual if k == 0 else []) + [{"type": "text", "text": q}]})
        if a is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return msgs


# --- results ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlavaOVPrompt:
    """A tokenised LLaVA-OV prompt with its placeholders expanded.

    input_ids (L,) int32; attention_mask (L,) int32 ones; image_index / video_index (L,) bool: the `<image>` /
    `<video>` rows (the ids there are the placeholder ids; `LlavaOV.embed_inputs` overwrites their embeddings);
    assistant_mask (L,) bool: the assistant replies and their `<|im_end|>` (all False for a generation prompt).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    image_index: np.ndarray
    video_index: np.ndarray
    assistant_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def visual_index(self) -> np.ndarray:
        return self.image_index | self.video_index

    @property
    def num_image_tokens(self) -> int:
        return int(self.image_index.sum())

    @property
    def num_video_tokens(self) -> int:
        return int(self.video_index.sum())

    def truncate(self, max_length: int) -> "LlavaOVPrompt":
        """The first `max_length` positions; ValueError if the cut would split an image or video block (the
        model could not fill a partial one)."""
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if len(self) <= max_length:
            return self
        for name, idx in (("image", self.image_index), ("video", self.video_index)):
            if idx[max_length - 1] and idx[max_length]:
                raise ValueError(f"max_length={max_length} would cut through the {name} placeholder block (prompt has "
                                 f"{len(self)} tokens); raise max_length or use fewer visual tokens")
        return LlavaOVPrompt(*(getattr(self, f.name)[:max_length] for f in dataclasses.fields(self)))


# --- tokenizer -------------------------------------------------------------------------------------------------------


class LlavaOVTokenizer:
    """A local Qwen2 tokenizer (transformers, fast) with `<image>`, `<video>` and TPO's task tokens.

    Args:
      path: a directory holding `tokenizer.json` (or `vocab.json` + `merges.txt`) and `tokenizer_config.json`, as
        llava-hf ships it; `LlavaOVTokenizer.tiny()` uses the tiny tokenizer in the package.

    Raises:
      TokenizerError (`tpo_jax.tokenizer`): the directory is missing or holds no tokenizer, transformers cannot
        load it, or it lacks `<|im_start|>` / `<|im_end|>` / `<image>` / `<video>` as single tokens; one line that
        names the directory and what is missing.
    """

    ADDED_TOKENS = ADDED_TOKENS

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.isdir(self.path):
            raise TokenizerError(f"tokenizer directory not found: {self.path}")
        files = set(os.listdir(self.path))
        if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
            raise TokenizerError(f"no tokenizer in {self.path}: expected tokenizer.json (or vocab.json + merges.txt)")
        from transformers import AddedToken, AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as e:  # transformers raises many types; one line naming the directory
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise TokenizerError(f"cannot load the tokenizer in {self.path}: {type(e).__name__}: {first}") from None
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise TokenizerError(f"the tokenizer in {self.path} ({type(hf).__name__}) is not a fast (tokenizers) one")
        for token in _REQUIRED:
            if _single_id(backend, token) is None:
                raise TokenizerError(f"the tokenizer in {self.path} has no {token} token ({_WHY[token]})")
        missing = [t for t in ADDED_TOKENS if _single_id(backend, t) is None]
        if missing:  # in ADDED_TOKENS order, after everything the directory has (7B: after <video> = 151647)
            hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
            backend = hf.backend_tokenizer
            for t in missing:
                if _single_id(backend, t) is None:
                    raise TokenizerError(f"adding {t} to the tokenizer in {self.path} did not make it one token")
        self.hf = hf
        self._backend = backend
        self._task_ids = {t: _single_id(backend, t) for t in ADDED_TOKENS}
        self.image_token_id = _single_id(backend, IMAGE_TOKEN)
        self.video_token_id = _single_id(backend, VIDEO_TOKEN)
        self.im_start_id = _single_id(backend, IM_START)
        self.im_end_id = _single_id(backend, IM_END)
        self.endoftext_id = _single_id(backend, ENDOFTEXT)  # None if absent (then pad_id falls back to <|im_end|>)
        task = set(self._task_ids.values())
        self._skip_ids = frozenset(i for i, tok in hf.added_tokens_decoder.items()
                                   if tok.special and i not in task) | {self.image_token_id, self.video_token_id}

    @classmethod
    def tiny(cls) -> "LlavaOVTokenizer":
        """The tiny byte-level BPE of the package (396 ids; `<image>` 387, `<video>` 388)."""
        with importlib.resources.as_file(default_tiny_tokenizer_dir()) as p:
            return cls(p)

    # -- vocabulary --------------------------------------------------------------------------------------------------

    @property
    def bos_id(self) -> None:
        """Qwen2 has no BOS token."""
        return None

    @property
    def eos_id(self) -> int:
        """`<|im_end|>`: the end of a chat turn, where generation stops."""
        return self.im_end_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: `<|im_end|>` and `<|endoftext|>`."""
        return tuple(i for i in (self.im_end_id, self.endoftext_id) if i is not None)

    @property
    def pad_id(self) -> int:
        """`<|endoftext|>` (Qwen2's pad token)."""
        return self.endoftext_id if self.endoftext_id is not None else self.im_end_id

    @property
    def vocab_size(self) -> int:
        """Every id of the tokenizer, added tokens included (the model's embedding may have more rows)."""
        return len(self.hf)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def added_token_ids(self) -> dict[str, int]:
        """The 7 task tokens and their ids (the name matches `MultimodalTokenizer`)."""
        return dict(self._task_ids)

    BOX_BEGIN_ID = property(lambda self: self._task_ids[BOX_BEGIN])
    TIME_BEGIN_ID = property(lambda self: self._task_ids[TIME_BEGIN])
    TEMP_ID = property(lambda self: self._task_ids[TEMP])
    BOXES_ID = property(lambda self: self._task_ids[BOXES])
    TRACK_BEGIN_ID = property(lambda self: self._task_ids[TRACK_BEGIN])
    TRACKING_ID = property(lambda self: self._task_ids[TRACKING])
    TRACK_BOX_ID = property(lambda self: self._task_ids[TRACK_BOX])

    def token_to_id(self, token: str) -> int:
        i = self._backend.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return int(i)

    def id_to_token(self, token_id: int) -> str:
        return self._backend.id_to_token(self._check_id(token_id))

    def _check_id(self, token_id) -> int:
        i = int(token_id)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return i

    # -- text --------------------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        return self._backend.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; added tokens (chat, visual, task) are matched as single ids anywhere. `add_eos`
        appends `<|im_end|>`. Qwen2 has no BOS: `add_bos=True` is an error (kept for `MultimodalTokenizer`'s
        signature)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if add_bos:
            raise ValueError("Qwen2 has no BOS token; encode with add_bos=False")
        ids = list(self._backend.encode(text, add_special_tokens=False).ids)
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. `skip_special_tokens` drops the chat tokens and the `<image>` / `<video>` placeholders but
        keeps the task tokens (which the heads read), so `decode(encode(s)) == s` for text with task tokens."""
        flat = [self._check_id(i) for i in np.asarray(ids).reshape(-1).tolist()]
        if skip_special_tokens:
            flat = [i for i in flat if i not in self._skip_ids]
        return self.hf.decode(flat, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # -- prompts -----------------------------------------------------------------------------------------------------

    def chat_text(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template's text of `messages` (see `render_chat`)."""
        return render_chat(messages, add_generation_prompt)[0]

    def check_config(self, cfg) -> None:
        """The `LlavaOVConfig` must use this tokenizer's `<image>` / `<video>` ids and have an embedding row for
        every id; TokenizerError naming the field otherwise."""
        for field, mine, token in (("image_token_id", self.image_token_id, IMAGE_TOKEN),
                                   ("video_token_id", self.video_token_id, VIDEO_TOKEN)):
            if getattr(cfg, field) != mine:
                raise TokenizerError(f"llava_ov.{field} is {getattr(cfg, field)} but the tokenizer in {self.path} "
                                     f"has {token} = {mine}")
        if cfg.llm.vocab_size < self.vocab_size:
            raise TokenizerError(f"llava_ov.llm.vocab_size {cfg.llm.vocab_size} is smaller than the tokenizer's "
                                 f"{self.vocab_size} ids ({self.path})")

    def build_input_ids(self, conversation: Sequence[Mapping[str, Any]] | str, cfg, *,
                        image_sizes: Sequence[Sequence[int]] = (), image_plans: Sequence[Any] = (),
                        num_frames: int = 0, add_generation_prompt: bool = True,
                        max_length: int | None = None) -> LlavaOVPrompt:
        """Ids of a conversation with its `<image>` / `<video>` placeholders expanded for `cfg` (an
        `LlavaOVConfig`: its ids, `anyres` and pooled grid).

        conversation: HF chat messages (rendered with `CHAT_TEMPLATE`), or an already rendered text holding one
          `<image>` per image and at most one `<video>` (then `assistant_mask` is all False).
        image_sizes: the original (height, width) of each image, in prompt order; their packing plans are built
          with `visual_tokens.image_plan` (tiled for a single image, untiled when there are several, as the HF
          processor counts them). Or image_plans: the plans themselves (their `length`s are used).
        num_frames: frames of the video (0: no video); its `<video>` expands to `num_frames · p² + 1` ids.
        add_generation_prompt: end with `<|im_start|>assistant\\n` (messages only).
        max_length: keep the first `max_length` ids (`LlavaOVPrompt.truncate`).
        """
        from tpo_jax.llava_ov import visual_tokens
        from tpo_jax.llava_ov.model import expand_placeholders, video_token_count

        self.check_config(cfg)
        if isinstance(conversation, str):
            text, spans = conversation, []
        else:
            text, spans = render_chat(conversation, add_generation_prompt)
        if image_sizes and image_plans:
            raise ValueError("give image_sizes or image_plans, not both")
        if image_plans:
            lengths = [int(np.asarray(p.length)) for p in image_plans]
        else:
            tiled = len(image_sizes) == 1
            lengths = [int(visual_tokens.image_plan(tuple(s), cfg.anyres, tiled=tiled).length) for s in image_sizes]

        enc = self._backend.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, np.int64)
        n_video = int((ids == self.video_token_id).sum())
        if n_video and num_frames <= 0:
            raise ValueError("the prompt has a <video> token but num_frames is 0")
        if num_frames > 0 and not n_video:
            raise ValueError(f"num_frames={num_frames} but the prompt has no <video> token")
        expanded = expand_placeholders(ids.tolist(), cfg, lengths, num_frames)

        starts = np.asarray([o[0] for o in enc.offsets], np.int64)
        assistant = np.zeros(len(ids), bool)
        for a, b in spans:
            assistant |= (starts >= a) & (starts < b)
        counts = np.ones(len(ids), np.int64)
        counts[ids == self.image_token_id] = lengths
        counts[ids == self.video_token_id] = video_token_count(num_frames, cfg)
        assistant = np.repeat(assistant, counts)

        out_ids = np.asarray(expanded, np.int32)
        if len(out_ids) != len(assistant):  # cannot happen: expand_placeholders repeats exactly these counts
            raise AssertionError("placeholder expansion and mask expansion disagree")
        out = LlavaOVPrompt(input_ids=out_ids, attention_mask=np.ones(len(out_ids), np.int32),
                            image_index=out_ids == self.image_token_id, video_index=out_ids == self.video_token_id,
                            assistant_mask=assistant)
        return out if max_length is None else out.truncate(max_length)

    def __repr__(self) -> str:
        return (f"LlavaOVTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"image_token_id={self.image_token_id}, video_token_id={self.video_token_id})")


def _single_id(backend, token: str) -> int | None:
    """The id of `token` if the tokenizer maps it to exactly one id, else None."""
    i = backend.token_to_id(token)
    if i is None or backend.encode(token, add_special_tokens=False).ids != [i]:
        return None
    return int(i)

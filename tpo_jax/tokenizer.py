"""Text tokenisation for VideoChat-TPO (MODEL-SPEC §4.1-4.2).

The released model was trained and served with a *slow* Hugging Face ``LlamaTokenizer`` (``legacy=True``) on the
Mistral-7B SentencePiece model plus 7 added task tokens. This module reproduces its encoding rule with the
``sentencepiece`` package alone (no transformers, no downloads):

1. The text is cut at every occurrence of a token that the slow tokenizer never splits: the 7 added tokens
   (``<box_begin>`` … ``<track_box>``, ids 32000..32006) and the special tokens ``<unk>`` (0), ``<s>`` (1) and
   ``</s>`` (2). Matching is an exact, case-sensitive string match; surrounding whitespace is kept (the added
   tokens have ``lstrip = rstrip = False``).
2. Each remaining non-empty chunk is encoded by SentencePiece *on its own*, with the model's default dummy prefix.
   So every chunk starts as if it began a new sentence: ``"a<temp> b"`` → ``▁a <temp> ▁ ▁b`` (the leading space of
   ``" b"`` becomes a lone ``▁`` = 28705 in front of ``▁b``).
3. ``add_bos`` puts ``<s>`` (1) in front; no EOS is appended unless asked.

On top of that, :meth:`MultimodalTokenizer.build_input_ids` expands the visual placeholders ``[<IMG_PLH>]`` /
``[<VID_PLH>]`` into ``num_visual_tokens`` placeholder ids (id 0, later replaced by the projected Q-Former outputs)
with the reference quirk that *every* text segment gets its own BOS. The conversation templates of §4.3 that
use it (demo and library prompts, as strings and ids) are in ``tpo_jax.data.prompts``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from tpo_jax.config import (
    BOX_BEGIN_ID,
    BOXES_ID,
    NUM_ADDED_TOKENS,
    TEMP_ID,
    TIME_BEGIN_ID,
    TRACK_BEGIN_ID,
    TRACK_BOX_ID,
    TRACKING_ID,
)

__all__ = [
    "ADDED_TOKENS",
    "BOS_ID",
    "EOS_ID",
    "IMAGE_PLACEHOLDER",
    "PAD_ID",
    "UNK_ID",
    "VIDEO_PLACEHOLDER",
    "MultimodalTokenizer",
    "TokenizedPrompt",
    "TokenizerError",
    "default_tokenizer_dir",
]

# --- vocabulary constants -------------------------------------------------------------------------------------------

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
PAD_ID = UNK_ID  # the reference forces pad_token = <unk>
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
BASE_VOCAB_SIZE = 32000  # SentencePiece pieces; the added tokens follow directly

BOX_BEGIN, TIME_BEGIN, TEMP, BOXES = "<box_begin>", "<time_begin>", "<temp>", "<boxes>"
TRACK_BEGIN, TRACKING, TRACK_BOX = "<track_begin>", "<tracking>", "<track_box>"

#: The 7 added tokens, in id order (32000..32006), as in the released ``added_tokens.json``.
ADDED_TOKENS: tuple[str, ...] = (BOX_BEGIN, TIME_BEGIN, TEMP, BOXES, TRACK_BEGIN, TRACKING, TRACK_BOX)
_ADDED_IDS = (BOX_BEGIN_ID, TIME_BEGIN_ID, TEMP_ID, BOXES_ID, TRACK_BEGIN_ID, TRACKING_ID, TRACK_BOX_ID)
assert len(ADDED_TOKENS) == NUM_ADDED_TOKENS and _ADDED_IDS == tuple(range(BASE_VOCAB_SIZE, BASE_VOCAB_SIZE + 7))

#: Visual placeholders: never tokenised, replaced by ``num_visual_tokens`` ids 0 in :meth:`build_input_ids`.
IMAGE_PLACEHOLDER = "[<IMG_PLH>]"
VIDEO_PLACEHOLDER = "[<VID_PLH>]"

_ASSET_PACKAGE = "tpo_jax"
_ASSET_DIR = ("assets", "videochat_tpo")
_MODEL_NAME = "tokenizer.model"


class TokenizerError(ValueError):
    """The tokenizer files cannot be used (missing, unreadable, corrupt or inconsistent)."""


def default_tokenizer_dir():
    """The directory of the tokenizer files shipped in the package (an ``importlib.resources`` Traversable)."""
    node = importlib.resources.files(_ASSET_PACKAGE)
    for part in _ASSET_DIR:
        node = node.joinpath(part)
    return node


# --- results ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizedPrompt:
    """A tokenised prompt with its visual placeholder block(s).

    Attributes:
      input_ids: (L,) int32 token ids; placeholder positions hold id 0 (``<unk>``/pad).
      attention_mask: (L,) int32, all ones (the reference never pads a single prompt).
      visual_index: (L,) bool, True exactly at the placeholder positions whose embeddings are replaced by the
        projected visual tokens (the reference's ``video_index`` / ``image_index``).
      is_video: True when the placeholders stand for a video (``[<VID_PLH>]``), False for an image.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    visual_index: np.ndarray
    is_video: bool

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_visual_positions(self) -> int:
        """How many positions are visual placeholders."""
        return int(self.visual_index.sum())

    @property
    def video_index(self) -> np.ndarray | None:
        """``visual_index`` if this prompt is for a video, else None (reference naming)."""
        return self.visual_index if self.is_video else None

    @property
    def image_index(self) -> np.ndarray | None:
        """``visual_index`` if this prompt is for an image, else None (reference naming)."""
        return None if self.is_video else self.visual_index

    def truncate(self, max_length: int) -> "TokenizedPrompt":
        """Keep the first ``max_length`` positions (like the reference's cut of the concatenated ids).

        Raises ValueError if the cut would split a visual placeholder block: the model could not fill a partial
        block (the reference would fail later, at embedding assembly).
        """
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if len(self) <= max_length:
            return self
        if self.visual_index[max_length - 1] and self.visual_index[max_length]:
            raise ValueError(
                f"max_length={max_length} would cut through a visual placeholder block "
                f"(prompt has {len(self)} tokens); raise max_length or shorten the text"
            )
        return TokenizedPrompt(
            input_ids=self.input_ids[:max_length],
            attention_mask=self.attention_mask[:max_length],
            visual_index=self.visual_index[:max_length],
            is_video=self.is_video,
        )

    @staticmethod
    def concatenate(parts: Sequence["TokenizedPrompt"], *, is_video: bool | None = None) -> "TokenizedPrompt":
        """Join prompts end to end (the demo tokenises its two strings separately and concatenates them)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if is_video is None:
            is_video = any(p.is_video for p in parts if p.num_visual_positions)
        return TokenizedPrompt(
            input_ids=np.concatenate([p.input_ids for p in parts]).astype(np.int32),
            attention_mask=np.concatenate([p.attention_mask for p in parts]).astype(np.int32),
            visual_index=np.concatenate([p.visual_index for p in parts]).astype(bool),
            is_video=bool(is_video),
        )


# --- tokenizer -------------------------------------------------------------------------------------------------------


class MultimodalTokenizer:
    """SentencePiece tokenizer reproducing the released slow ``LlamaTokenizer(legacy=True)`` + 7 added tokens.

    Args:
      model_file: path to the SentencePiece ``tokenizer.model``; None uses the copy shipped in the package
        (``tpo_jax/assets/videochat_tpo``). If an ``added_tokens.json`` sits next to it, it must agree with the
        added-token ids 32000..32006.
      num_visual_tokens: how many placeholder ids one ``[<IMG_PLH>]`` / ``[<VID_PLH>]`` expands to (the reference
        demo uses n_query = 96, the number of Q-Former outputs).

    Raises:
      TokenizerError: the model file is missing, unreadable, not a SentencePiece model, or not the expected
        32000-piece Llama/Mistral vocabulary; the message names the path.
    """

    # Added-token ids as class attributes (also importable from tpo_jax.config).
    BOX_BEGIN_ID = BOX_BEGIN_ID
    TIME_BEGIN_ID = TIME_BEGIN_ID
    TEMP_ID = TEMP_ID
    BOXES_ID = BOXES_ID
    TRACK_BEGIN_ID = TRACK_BEGIN_ID
    TRACKING_ID = TRACKING_ID
    TRACK_BOX_ID = TRACK_BOX_ID
    ADDED_TOKENS = ADDED_TOKENS

    def __init__(self, model_file: str | os.PathLike | None = None, num_visual_tokens: int = 96):
        if not isinstance(num_visual_tokens, int) or isinstance(num_visual_tokens, bool) or num_visual_tokens <= 0:
            raise ValueError(f"num_visual_tokens must be a positive integer, got {num_visual_tokens!r}")
        self.num_visual_tokens = num_visual_tokens

        if model_file is None:
            asset_dir = default_tokenizer_dir()
            model_node = asset_dir.joinpath(_MODEL_NAME)
            added_node = asset_dir.joinpath("added_tokens.json")
        else:
            model_node = os.fspath(model_file)
            added_node = os.path.join(os.path.dirname(os.path.abspath(model_node)), "added_tokens.json")
        self.model_file = str(model_node)
        self._sp = _load_sentencepiece(model_node, self.model_file)
        _check_added_tokens_json(added_node)

        # token string <-> id for everything the slow tokenizer never splits.
        self._unsplit_to_id: dict[str, int] = {UNK_TOKEN: UNK_ID, BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID}
        self._unsplit_to_id.update(zip(ADDED_TOKENS, _ADDED_IDS))
        self._id_to_unsplit = {i: t for t, i in self._unsplit_to_id.items()}
        # Longest first, so that a token that is a prefix of another could never win (none is, today).
        alternatives = sorted(self._unsplit_to_id, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    # -- vocabulary --------------------------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def pad_id(self) -> int:
        """Pad id = ``<unk>`` = 0 (also the id of the visual placeholders)."""
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def vocab_size(self) -> int:
        """32000 SentencePiece pieces + 7 added tokens = 32007 (= the LLM embedding rows)."""
        return BASE_VOCAB_SIZE + len(ADDED_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def added_token_ids(self) -> dict[str, int]:
        """The 7 added tokens and their ids."""
        return dict(zip(ADDED_TOKENS, _ADDED_IDS))

    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry (a SentencePiece piece such as ``"▁the"``, or a special/added token)."""
        if token in self._unsplit_to_id:
            return self._unsplit_to_id[token]
        i = self._sp.piece_to_id(token)
        if i == UNK_ID and token != UNK_TOKEN:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return int(i)

    def id_to_token(self, token_id: int) -> str:
        """The piece / token string of one id."""
        token_id = self._check_id(token_id)
        if token_id in self._id_to_unsplit:
            return self._id_to_unsplit[token_id]
        return self._sp.id_to_piece(token_id)

    # -- encoding ----------------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """The pieces of ``text`` (no BOS), e.g. ``"a<temp> b"`` → ``["▁a", "<temp>", "▁", "▁b"]``."""
        return [self.id_to_token(i) for i in self.encode(text, add_bos=False)]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` under the legacy slow-tokenizer rule (see the module docstring).

        ``[<IMG_PLH>]`` / ``[<VID_PLH>]`` are *not* treated specially here; use :meth:`build_input_ids`.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = [BOS_ID] if add_bos else []
        # re.split with one capturing group alternates: chunk, token, chunk, token, ..., chunk.
        for k, part in enumerate(self._split_re.split(text)):
            if k % 2:
                ids.append(self._unsplit_to_id[part])
            elif part:
                ids.extend(self._sp.encode(part))
        if add_eos:
            ids.append(EOS_ID)
        return ids

    # -- decoding ----------------------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``.

        Runs of ordinary pieces are decoded by SentencePiece (which drops the dummy-prefix space at the start of
        each run, mirroring how each chunk was encoded); added tokens are written out literally with no extra
        spaces (``spaces_between_special_tokens=False`` in the released config). ``skip_special_tokens`` drops
        ``<unk>``/``<s>``/``</s>`` (ids 0, 1, 2, which includes the visual placeholders) but, as in the reference,
        keeps the 7 added task tokens, which are not "special". So ``decode(encode(s, add_bos=False)) == s`` for
        ordinary text, including added tokens surrounded by spaces.
        """
        flat = np.asarray(ids).reshape(-1).tolist() if not isinstance(ids, list) else ids
        out: list[str] = []
        run: list[int] = []
        for raw in flat:
            i = self._check_id(raw)
            if i in self._id_to_unsplit:
                if skip_special_tokens and i in (UNK_ID, BOS_ID, EOS_ID):
                    continue
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._id_to_unsplit[i])
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def _check_id(self, token_id) -> int:
        i = int(token_id)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return i

    # -- multimodal prompts ------------------------------------------------------------------------------------------

    def build_input_ids(
        self, text: str, *, is_video: bool | None = None, max_length: int | None = None
    ) -> TokenizedPrompt:
        """Tokenise ``text`` and expand its visual placeholders (MODEL-SPEC §4.2).

        Repeatedly the earliest ``[<IMG_PLH>]`` or ``[<VID_PLH>]`` is found; the text before it is encoded *with a
        BOS* (the reference overwrites ``add_special_tokens`` with a truthy list, so every segment gets its own BOS,
        even an empty one), followed by ``num_visual_tokens`` ids 0 flagged in ``visual_index``. The text after the
        last placeholder (possibly empty, then just a BOS) is encoded the same way. A text without placeholders is
        therefore simply ``[BOS] + pieces``.

        Args:
          text: the prompt.
          is_video: whether the placeholders stand for a video. None: inferred from the placeholder kind (False
            when the text has none). Mixing image and video placeholders in one text is rejected.
          max_length: if given, keep only the first ``max_length`` ids (see :meth:`TokenizedPrompt.truncate`).
        """
        ids: list[int] = []
        flags: list[bool] = []
        kinds: set[str] = set()
        start = 0
        while True:
            hits = [(text.find(ph, start), ph) for ph in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)]
            hits = [h for h in hits if h[0] != -1]
            if not hits:
                break
            pos, ph = min(hits)  # the earliest placeholder (both have 11 characters, so they cannot overlap)
            seg = self.encode(text[start:pos], add_bos=True)
            ids += seg + [PAD_ID] * self.num_visual_tokens
            flags += [False] * len(seg) + [True] * self.num_visual_tokens
            kinds.add(ph)
            start = pos + len(ph)
        seg = self.encode(text[start:], add_bos=True)
        ids += seg
        flags += [False] * len(seg)

        if len(kinds) > 1:
            raise ValueError(
                f"text mixes {IMAGE_PLACEHOLDER} and {VIDEO_PLACEHOLDER}; one prompt takes one kind of visual input"
            )
        if is_video is None:
            is_video = VIDEO_PLACEHOLDER in kinds
        elif kinds and bool(is_video) != (VIDEO_PLACEHOLDER in kinds):
            raise ValueError(f"is_video={is_video} but the text uses {kinds.pop()}")

        n = len(ids)
        out = TokenizedPrompt(
            input_ids=np.asarray(ids, dtype=np.int32).reshape(n),
            attention_mask=np.ones((n,), dtype=np.int32),
            visual_index=np.asarray(flags, dtype=bool).reshape(n),
            is_video=bool(is_video),
        )
        return out if max_length is None else out.truncate(max_length)

    def __repr__(self) -> str:
        return (f"MultimodalTokenizer(model_file={self.model_file!r}, num_visual_tokens={self.num_visual_tokens}, "
                f"vocab_size={self.vocab_size})")


# --- loading ---------------------------------------------------------------------------------------------------------


def _load_sentencepiece(node, shown_path: str):
    """Load and sanity-check the SentencePiece model from a path or Traversable; one TokenizerError on failure."""
    import sentencepiece as spm

    try:
        data = node.read_bytes() if hasattr(node, "read_bytes") else open(node, "rb").read()
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer model file not found: {shown_path}") from None
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer model file {shown_path}: {e}") from None
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except Exception as e:  # sentencepiece raises RuntimeError / OSError with terse messages
        raise TokenizerError(f"tokenizer model file {shown_path} is not a valid SentencePiece model ({e})") from None
    expected = {UNK_ID: UNK_TOKEN, BOS_ID: BOS_TOKEN, EOS_ID: EOS_TOKEN}
    if sp.get_piece_size() != BASE_VOCAB_SIZE or any(sp.id_to_piece(i) != p for i, p in expected.items()):
        raise TokenizerError(
            f"tokenizer model file {shown_path} is not the {BASE_VOCAB_SIZE}-piece Llama/Mistral vocabulary "
            f"(has {sp.get_piece_size()} pieces; ids 0/1/2 must be <unk>/<s>/</s>)"
        )
    return sp


def _check_added_tokens_json(node) -> None:
    """If an ``added_tokens.json`` is present, it must map the 7 added tokens to 32000..32006."""
    try:
        is_file = node.is_file() if hasattr(node, "is_file") else os.path.isfile(node)
        if not is_file:
            return
        text = node.read_text(encoding="utf-8") if hasattr(node, "read_text") else open(node, encoding="utf-8").read()
        found = json.loads(text)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read added tokens file {node}: {e}") from None
    expected = dict(zip(ADDED_TOKENS, _ADDED_IDS))
    if found != expected:
        raise TokenizerError(f"added tokens file {node} maps {found}, expected {expected}")

"""Rebuild the tiny Qwen2-style tokenizer shipped in tpo_jax/assets/llava_ov_tiny_tokenizer/.

    python tools/make_llava_ov_tiny_tokenizer.py            # rewrites the asset directory
    python tools/make_llava_ov_tiny_tokenizer.py OUT_DIR    # writes elsewhere (the test compares the two)

A byte-level BPE with Qwen2's normalizer (NFC), pre-tokenizer (the Qwen2 split regex, then ByteLevel without a
prefix space) and decoder (ByteLevel) — the pipeline of transformers' `Qwen2Tokenizer` — trained with the
`tokenizers` library on the frozen corpus below (synthetic-dataset style questions and answers plus the chat
template's words, about 6 KB). Deterministic: the corpus is fixed here, not read from tpo_jax.data, and BPE
training breaks count ties by the pair itself, so two runs write byte-identical files.

Ids (see `tpo_jax.llava_ov.tokenizer`): 0..255 the byte alphabet, 256..383 the 128 merges, then the special
tokens in Qwen2's order `<|endoftext|>` 384, `<|im_start|>` 385, `<|im_end|>` 386, LLaVA-OV's `<image>` 387 and
`<video>` 388, and TPO's 7 task tokens 389..395 (the order of `tpo_jax.tokenizer.ADDED_TOKENS`); 396 in all.
"""

from __future__ import annotations

import json
import os
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tpo_jax", "assets", "llava_ov_tiny_tokenizer")

#: transformers' Qwen2Tokenizer PRETOKENIZE_REGEX (models/qwen2/tokenization_qwen2.py)
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
NUM_MERGES = 128
BASE_VOCAB = 256 + NUM_MERGES
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VISUAL = ("<image>", "<video>")
# Same strings and order as tpo_jax.tokenizer.ADDED_TOKENS (kept literal so the script needs no tpo_jax import).
TASK_TOKENS = ("<box_begin>", "<time_begin>", "<temp>", "<boxes>", "<track_begin>", "<tracking>", "<track_box>")


def corpus() -> list[str]:
    """The fixed training text: one string per line."""
    colours = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    shapes = ("square", "circle", "triangle")
    numbers = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    visible = ("is visible", "can be seen", "is on the screen", "is shown")
    lines = ["system", "user", "assistant"] * 4 + ["You are a helpful assistant.",
             "Answer the question using a single word or phrase.",
             "The video contains 4 frames sampled at 0.0, 1.0, 2.0, 3.0 seconds."]
    for n, word in enumerate(numbers):
        lines += [f"How many shapes appear in the video? {word.capitalize()}.", f"({'ABCD'[n % 4]}) {word}"]
    for i, c in enumerate(colours):
        for j, s in enumerate(shapes):
            other = colours[(i + j + 1) % len(colours)]
            lines += [
                f"What colour is the {s}? {c.capitalize()}.",
                f"What shape is the {c} object? A {s}.",
                f"Which appears first, the {c} {s} or the {other} {shapes[(j + 1) % 3]}? The {c} {s}.",
                f"Is there a {c} {s} in the video? {'Yes' if (i + j) % 2 else 'No'}.",
                f"Where is the {c} {s}? Please locate the {c} {s} in the first frame.",
                f"Find the video segment where the {c} {s} {visible[(i + j) % 4]}.",
                f"Track the {c} {s} in the video. Show the tracking trajectory of the {c} {s}.",
            ]
    lines += ["Options:\n(A) one\n(B) two\n(C) three\n(D) four", "Best Option: (B) two",
              "Localize the visual content described by the given textual query in the video, and output the start "
              "and end timestamps in seconds.",
              "Track the object in the video using a box with initial coordinates."]
    return lines


def build() -> Tokenizer:
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                        byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(vocab_size=BASE_VOCAB, min_frequency=2, show_progress=False, special_tokens=[],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() != BASE_VOCAB:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, expected {BASE_VOCAB}")
    for t in CHAT_SPECIALS + VISUAL + TASK_TOKENS:  # one at a time: ids follow in this order
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False,
                                           single_word=False)])
    want = {t: BASE_VOCAB + k for k, t in enumerate(CHAT_SPECIALS + VISUAL + TASK_TOKENS)}
    got = {t: tok.token_to_id(t) for t in want}
    if got != want:
        raise RuntimeError(f"special token ids {got}, expected {want}")
    return tok


TOKENIZER_CONFIG = {
    # What transformers' AutoTokenizer reads next to tokenizer.json (the llava-hf / Qwen2-Instruct values).
    "tokenizer_class": "Qwen2Tokenizer",
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "errors": "replace",
    "split_special_tokens": False,
    "model_max_length": 32768,
}


def write(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    build().save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        sys.exit("usage: make_llava_ov_tiny_tokenizer.py [OUT_DIR]")
    out = sys.argv[1] if len(sys.argv) == 2 else DEFAULT_OUT
    write(out)
    print(f"wrote {out}")

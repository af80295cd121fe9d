"""Tests for tpo_jax.tokenizer and the prompts built with it (tpo_jax.data.prompts): the verified §4.3 prompt
ids, parity with an independent slow HF tokenizer, placeholder expansion, templates, decoding and load errors."""

import random

import numpy as np
import pytest

from tpo_jax import config
from tpo_jax.data.prompts import (BEST_OPTION_PREFIX, answer_prompt, demo_prompt, encode_answer_prompt,
                                  encode_demo_prompt)
from tpo_jax.tokenizer import (
    ADDED_TOKENS,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    MultimodalTokenizer,
    TokenizerError,
    default_tokenizer_dir,
)

# MODEL-SPEC §4.3, verified with transformers 4.44.2 slow LlamaTokenizer(legacy=True) on the released file.
DEMO_IDS_WHAT_IS_HAPPENING = (
    [1, 733, 16289, 28793, 523, 11761, 28767]  # "[INST] <Video>"
    + [0] * 96
    + [1, 1867, 11761, 28767, 28792, 28748, 16289, 28793]  # "</Video>[/INST]"
    + [1, 28705, 733, 16289, 28793, 1824, 349, 9615, 28804, 733, 28748, 16289, 28793, 28705]  # " [INST] ... [/INST] "
)

PARITY_STRINGS = [
    "[INST] <Video>",
    "</Video>[/INST]",
    " [INST] What is happening? [/INST] ",
    "Hello world",
    "  two leading spaces",
    "trailing space ",
    " ",
    "",
    "<box_begin><boxes>",
    "a<temp> b",
    "x</s>y",
    "The answer is yes.</s>",
    "<time_begin><temp> then <track_begin><tracking> at <track_box> ",
    " <boxes> <boxes>  <temp>",
    "<s>hi<unk> there",
    "<boxes<boxes>>",
    "日本語 ü café — ✓ 😀 Ωmega",
    "digits 123.45 and 2024-01-31, 0.5s",
    "tabs\tand\nnewlines\n\n",
    "[/INST]Best Option: (A) yes</s> [INST] next? [/INST]",
    "▁already ▁underlined",
]


@pytest.fixture(scope="module")
def tok():
    return MultimodalTokenizer()


@pytest.fixture(scope="module")
def model_path():
    path = default_tokenizer_dir().joinpath("tokenizer.model")
    assert path.is_file()
    return str(path)


@pytest.fixture(scope="module")
def hf_slow(model_path):
    """Independent reference: transformers' slow (pure-Python + sentencepiece) tokenizer.

    In transformers 5.x ``LlamaTokenizer`` is an alias of the `tokenizers`-backed fast class; the slow code path of
    the 4.x ``LlamaTokenizer(legacy=True)`` (added-token trie split in ``PreTrainedTokenizer.tokenize``, then
    ``sp_model.encode`` per chunk, BOS prepended) lives on as the generic ``SentencePieceBackend``.
    """
    pytest.importorskip("sentencepiece")
    sp_backend = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    from transformers import AddedToken

    ref = sp_backend.SentencePieceBackend(
        vocab_file=model_path, legacy=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<unk>", special_tokens_pattern="bos",
    )
    ref.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=True, special=False) for t in ADDED_TOKENS])
    assert ref.convert_tokens_to_ids(list(ADDED_TOKENS)) == list(range(32000, 32007))
    assert len(ref) == 32007
    return ref


# --- the verified demo example ----------------------------------------------------------------------------------------


def test_demo_prompt_ids_match_spec_example(tok):
    p = encode_demo_prompt(tok, "What is happening?")
    assert p.input_ids.dtype == np.int32
    assert p.input_ids.tolist() == DEMO_IDS_WHAT_IS_HAPPENING
    assert p.visual_index.dtype == np.bool_
    assert np.flatnonzero(p.visual_index).tolist() == list(range(7, 103))
    assert p.attention_mask.tolist() == [1] * len(DEMO_IDS_WHAT_IS_HAPPENING)
    assert p.is_video and p.video_index is p.visual_index and p.image_index is None
    assert int((p.input_ids == tok.bos_id).sum()) == 3


def test_demo_prompt_strings():
    part1, part2 = demo_prompt("What is happening?")
    assert part1 == "[INST] <Video>[<VID_PLH>]</Video>[/INST]"
    assert part2 == " [INST] What is happening? [/INST] "
    assert demo_prompt("")[1] == " "
    # The timestamp sentence appears only when asked for a timestamp and frame times are known.
    times = [i * 0.53 for i in range(16)]
    p1, _ = demo_prompt("Give the timestamp of the jump.", frame_times=times)
    assert p1 == ("[INST] <Video>[<VID_PLH>]</Video> The video contains 16 frames sampled at 0.0, 0.5, 1.1, 1.6, "
                  "2.1, 2.7, 3.2, 3.7, 4.2, 4.8, 5.3, 5.8, 6.4, 6.9, 7.4, 8.0 seconds.[/INST]")
    assert demo_prompt("What happens?", frame_times=times)[0] == part1
    assert demo_prompt("Give the timestamp.")[0] == part1


def test_image_template_uses_image_placeholder(tok):
    part1, _ = demo_prompt("What is this?", is_video=False)
    assert part1 == "[INST] <Image>[<IMG_PLH>]</Image>[/INST]"
    assert VIDEO_PLACEHOLDER not in part1
    p = encode_demo_prompt(tok, "What is this?", is_video=False)
    idx = np.flatnonzero(p.visual_index)
    assert not p.is_video and p.image_index is p.visual_index and p.video_index is None
    assert len(idx) == 96 and idx.tolist() == list(range(idx[0], idx[0] + 96))
    assert (p.input_ids[idx] == 0).all()
    assert p.input_ids[: idx[0]].tolist() == tok.encode("[INST] <Image>")


def test_empty_question_part2_is_bos_and_space(tok):
    p = encode_demo_prompt(tok, "")
    assert p.input_ids[-2:].tolist() == [1, 259]  # " " alone is the piece '▁▁'


# --- parity with the independent slow tokenizer -----------------------------------------------------------------------


@pytest.mark.parametrize("text", PARITY_STRINGS)
def test_encode_matches_hf_slow_tokenizer(tok, hf_slow, text):
    expected = hf_slow(text)["input_ids"]
    assert tok.encode(text) == expected
    assert tok.encode(text, add_bos=False) == expected[1:]


def test_encode_matches_hf_slow_tokenizer_random(tok, hf_slow):
    rng = random.Random(0)
    atoms = list(ADDED_TOKENS) + ["</s>", "<s>", " ", "  ", "\n", "a", "b ", "Hello", " world", "<", ">", "[INST]",
                                  "12", "3.5", "é", "日本", "😀", "[/INST]", "?", ".", "\t", "box", "<temp"]
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 12)))
        assert tok.encode(text) == hf_slow(text)["input_ids"], repr(text)


def test_leading_space_gives_lone_underline(tok):
    assert tok.encode(" [INST]", add_bos=False)[:2] == [28705, 733]
    assert tok.tokenize("a<temp> b") == ["▁a", "<temp>", "▁", "▁b"]
    assert tok.encode("<box_begin><boxes>") == [1, 32000, 32003]
    assert tok.encode("x</s>y", add_bos=False) == [1318, 2, 337]


# --- vocabulary ------------------------------------------------------------------------------------------------------


def test_vocab_constants(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 0, 0)
    assert tok.vocab_size == len(tok) == 32007
    assert tok.added_token_ids == {
        "<box_begin>": config.BOX_BEGIN_ID, "<time_begin>": config.TIME_BEGIN_ID, "<temp>": config.TEMP_ID,
        "<boxes>": config.BOXES_ID, "<track_begin>": config.TRACK_BEGIN_ID, "<tracking>": config.TRACKING_ID,
        "<track_box>": config.TRACK_BOX_ID,
    }
    assert tok.TEMP_ID == 32002 and tok.TRACK_BOX_ID == 32006
    assert tok.token_to_id("<boxes>") == 32003 and tok.token_to_id("▁") == 28705
    assert tok.id_to_token(32005) == "<tracking>" and tok.id_to_token(1) == "<s>"
    with pytest.raises(ValueError):
        tok.id_to_token(32007)


# --- decoding --------------------------------------------------------------------------------------------------------


def test_decode_round_trip(tok):
    text = "The man throws the ball to the dog, then walks away at 12.5 seconds."
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == "<s>" + text
    assert tok.decode(np.asarray(ids + [2]), skip_special_tokens=True) == text
    # Added tokens are not "special": kept when skipping, with the spaces around them preserved.
    mixed = "It happens at <time_begin><temp> and here <box_begin><boxes> ok"
    assert tok.decode(tok.encode(mixed), skip_special_tokens=True) == mixed
    with pytest.raises(ValueError):
        tok.decode([5, 40000])


# --- placeholder expansion -------------------------------------------------------------------------------------------


def test_build_input_ids_every_segment_gets_bos():
    tok = MultimodalTokenizer(num_visual_tokens=4)
    p = tok.build_input_ids(VIDEO_PLACEHOLDER + "a" + VIDEO_PLACEHOLDER)
    # empty prefix -> lone BOS; middle "a" -> BOS + '▁a'; empty tail -> lone BOS.
    assert p.input_ids.tolist() == [1, 0, 0, 0, 0, 1, 264, 0, 0, 0, 0, 1]
    assert p.visual_index.tolist() == [False] + [True] * 4 + [False] * 2 + [True] * 4 + [False]
    assert p.is_video
    plain = tok.build_input_ids("no visual input")
    assert plain.input_ids.tolist() == tok.encode("no visual input") and not plain.visual_index.any()
    assert not plain.is_video
    assert not tok.build_input_ids("x" + IMAGE_PLACEHOLDER).is_video
    with pytest.raises(ValueError, match="mixes"):
        tok.build_input_ids(IMAGE_PLACEHOLDER + VIDEO_PLACEHOLDER)
    with pytest.raises(ValueError):
        tok.build_input_ids(IMAGE_PLACEHOLDER, is_video=True)


def test_truncation(tok):
    full = encode_demo_prompt(tok, "What is happening?", max_length=None)
    assert len(encode_demo_prompt(tok, "What is happening?")) == len(full)  # < 1024: unchanged
    cut = encode_demo_prompt(tok, "What is happening?", max_length=110)
    assert cut.input_ids.tolist() == DEMO_IDS_WHAT_IS_HAPPENING[:110]
    assert len(cut.visual_index) == 110 and cut.num_visual_positions == 96
    with pytest.raises(ValueError, match="visual placeholder block"):
        encode_demo_prompt(tok, "What is happening?", max_length=50)
    long = encode_demo_prompt(tok, "word " * 2000)
    assert len(long) == 1024


def test_answer_prompt(tok):
    text = answer_prompt("Which one?", history=[("What is it?", "A dog.")], answer_prefix=BEST_OPTION_PREFIX)
    assert text == ("[INST] <Video>[<VID_PLH>]</Video>[/INST] [INST] What is it? [/INST]A dog.</s>"
                    " [INST] Which one? [/INST]Best Option: (")
    p = encode_answer_prompt(tok, "What is happening?")
    ids = p.input_ids.tolist()
    assert int((p.input_ids == 1).sum()) == 2
    assert ids == DEMO_IDS_WHAT_IS_HAPPENING[:111] + [733, 16289, 28793, 1824, 349, 9615, 28804, 733, 28748, 16289,
                                                      28793]
    assert 2 in encode_answer_prompt(tok, "q", history=[("a", "b")]).input_ids.tolist()
    sys_p = encode_answer_prompt(tok, "q", instruction="Be brief. ", is_video=False)
    head = tok.encode("Be brief. [INST] <Image>")
    assert sys_p.input_ids[: len(head)].tolist() == head and not sys_p.is_video
    assert np.flatnonzero(sys_p.visual_index)[0] == len(head)


# --- load errors -----------------------------------------------------------------------------------------------------


def test_missing_model_file_raises_naming_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(TokenizerError, match="not found") as err:
        MultimodalTokenizer(str(missing))
    assert str(missing) in str(err.value)


def test_corrupt_model_file_raises_naming_path(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError) as err:
        MultimodalTokenizer(str(bad))
    assert str(bad) in str(err.value)


def test_explicit_model_file_and_bad_added_tokens(tmp_path, model_path):
    import json
    import shutil

    copy = tmp_path / "tokenizer.model"
    shutil.copyfile(model_path, copy)
    assert MultimodalTokenizer(str(copy)).encode("Hello world") == MultimodalTokenizer().encode("Hello world")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<boxes>": 32000}))
    with pytest.raises(TokenizerError, match="added tokens"):
        MultimodalTokenizer(str(copy))
    with pytest.raises(ValueError):
        MultimodalTokenizer(num_visual_tokens=0)

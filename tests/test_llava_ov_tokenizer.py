"""LLaVA-OV-TPO text side (tpo_jax/llava_ov/tokenizer.py) against transformers 5.25's LlavaOnevisionProcessor.

The processor is built locally: the tiny tokenizer shipped in tpo_jax/assets/llava_ov_tiny_tokenizer/, an image
processor with default arguments (384 px tiles, the 36 default pinpoints, anyres_max_9; the PIL backend, there is
no torchvision here), `num_image_tokens=729`, strategy `full`, and our transcription of llava-hf's chat template.
transformers' video processor needs torchvision, so the processor used here has no video processor: for videos
its `_process_videos` hands HF's own `replace_video_token` the frame stacks directly (the count only depends on
the number of frames); everything else — the Jinja rendering, the placeholder replacement, the tokenisation — is
transformers' code. Our side expands with the model config's packing plans (`AnyresConfig()`, pooled grid 14).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tpo_jax.config import qwen2_tiny_llm
from tpo_jax.llava_ov import model as ov_model
from tpo_jax.llava_ov import visual_tokens
from tpo_jax.llava_ov.model import LlavaOVConfig, check_placeholders, video_token_count
from tpo_jax.llava_ov.tokenizer import (CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, LlavaOVTokenizer,
                                        TokenizerError, chat_messages, default_tiny_tokenizer_dir, render_chat)
from tpo_jax.tokenizer import ADDED_TOKENS

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "tpo_jax" / "assets" / "llava_ov_tiny_tokenizer"


@pytest.fixture(scope="module")
def tok():
    return LlavaOVTokenizer.tiny()


@pytest.fixture(scope="module")
def cfg(tok):
    """The 7B geometry (SigLIP 384/14, default anyres) with the tiny tokenizer's ids: what the default image
    processor and num_image_tokens=729 count for."""
    return LlavaOVConfig(llm=qwen2_tiny_llm(vocab_size=400), image_token_id=tok.image_token_id,
                         video_token_id=tok.video_token_id).validate()


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoTokenizer, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    class NoVideoProcessorLlavaOV(LlavaOnevisionProcessor):
        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

        def _process_videos(self, videos, **kwargs):
            data = {"pixel_values_videos": [np.asarray(v) for v in videos]}
            return data, [self.replace_video_token(data, video_idx=i) for i in range(len(videos))]

    hf_tok = AutoTokenizer.from_pretrained(str(ASSET), local_files_only=True)
    proc = NoVideoProcessorLlavaOV(image_processor=LlavaOnevisionImageProcessorPil(), tokenizer=hf_tok,
                                   num_image_tokens=729, vision_feature_select_strategy="full",
                                   chat_template=CHAT_TEMPLATE)
    proc.video_processor = None  # ProcessorMixin only checks that the attribute exists
    return proc


def _image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf_ids(processor, messages, *, images=None, videos=None, add_generation_prompt=True):
    text = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    out = processor(images=images, videos=videos, text=[text])
    return np.asarray(out["input_ids"][0])


CONVERSATIONS = [
    chat_messages("What is shown in this image?", num_images=1),
    chat_messages("Where is the red square?", num_images=1, answer="<box_begin><boxes>"),
    chat_messages("How many shapes appear in the video?", video=True, system=None,
                  history=[("What colour is the circle?", "Green.")]),
    chat_messages("Track the object <track_box>.", video=True, answer="<track_begin><tracking>"),
    chat_messages("Compare them.", num_images=2, system="Be brief."),
    [{"role": "user", "content": [{"type": "text", "text": "first "}, {"type": "video"}, {"type": "text", "text": "b"},
                                  {"type": "image"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}],
    [{"role": "user", "content": "plain string content"}],
]


# --- chat template ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_render_matches_hf_jinja(processor, tok, k, gen):
    msgs = CONVERSATIONS[k]
    if isinstance(msgs[0]["content"], str):  # HF's template needs content lists
        hf_msgs = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in msgs]
    else:
        hf_msgs = msgs
    want = processor.apply_chat_template(hf_msgs, add_generation_prompt=gen, tokenize=False)
    assert tok.chat_text(msgs, add_generation_prompt=gen) == want


def test_conversion_script_prompt(tok):
    """The prompt transformers' convert_llava_onevision_weights_to_hf.py checks the converted model with."""
    want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
            "What is shown in this image?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.chat_text(chat_messages("What is shown in this image?", num_images=1)) == want
    assert DEFAULT_SYSTEM_PROMPT == "You are a helpful assistant."


def test_assistant_spans():
    text, spans = render_chat(CONVERSATIONS[5], add_generation_prompt=False)
    assert [text[a:b] for a, b in spans] == ["xy<|im_end|>"]
    with pytest.raises(ValueError, match="audio"):
        render_chat([{"role": "user", "content": [{"type": "audio"}]}])


# --- prompt ids against the processor --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(30, 52), (500, 300), (899, 1024)])
def test_image_prompt_ids_match_processor(processor, tok, cfg, size):
    msgs = chat_messages("Where is the red square?", num_images=1)
    want = _hf_ids(processor, msgs, images=[_image(*size)])
    got = tok.build_input_ids(msgs, cfg, image_sizes=[size])
    np.testing.assert_array_equal(got.input_ids, want)
    plan = visual_tokens.image_plan(size, cfg.anyres)
    assert got.num_image_tokens == int(plan.length) == int((want == tok.image_token_id).sum())
    assert got.num_video_tokens == 0 and not got.assistant_mask.any()
    np.testing.assert_array_equal(got.image_index, want == tok.image_token_id)
    check_placeholders(got.input_ids[None], cfg, visual_tokens.stack_plans([plan]))


def test_training_prompt_with_answer_matches_processor(processor, tok, cfg):
    msgs = chat_messages("Where is the red square?", num_images=1, answer="It is here: <box_begin><boxes>")
    want = _hf_ids(processor, msgs, images=[_image(60, 40)], add_generation_prompt=False)
    got = tok.build_input_ids(msgs, cfg, image_sizes=[(60, 40)], add_generation_prompt=False)
    np.testing.assert_array_equal(got.input_ids, want)
    assert tok.decode(got.input_ids[got.assistant_mask]) == "It is here: <box_begin><boxes><|im_end|>"
    assert got.assistant_mask[-2] and not got.assistant_mask[-1]  # <|im_end|> scored, the final "\n" not


def test_multi_image_prompt_matches_processor(processor, tok, cfg):
    """Two images in one sample: HF does not tile them (base grid² + one newline each)."""
    msgs = chat_messages("Compare them.", num_images=2)
    sizes = [(30, 52), (52, 30)]
    want = _hf_ids(processor, msgs, images=[[_image(*s, seed=i) for i, s in enumerate(sizes)]])
    got = tok.build_input_ids(msgs, cfg, image_sizes=sizes)
    np.testing.assert_array_equal(got.input_ids, want)
    assert got.num_image_tokens == 2 * (27 * 27 + 1)
    plans = [visual_tokens.image_plan(s, cfg.anyres, tiled=False) for s in sizes]
    np.testing.assert_array_equal(tok.build_input_ids(msgs, cfg, image_plans=plans).input_ids, want)


@pytest.mark.parametrize("frames", [1, 8])
def test_video_prompt_ids_match_processor(processor, tok, cfg, frames):
    msgs = chat_messages("How many shapes appear in the video?", video=True,
                         history=[("What colour is the circle?", "Green.")])
    want = _hf_ids(processor, msgs, videos=[np.zeros((frames, 8, 8, 3), np.uint8)])
    got = tok.build_input_ids(msgs, cfg, num_frames=frames)
    np.testing.assert_array_equal(got.input_ids, want)
    assert got.num_video_tokens == frames * 14 * 14 + 1 == video_token_count(frames, cfg)
    assert got.num_image_tokens == 0
    assert tok.decode(got.input_ids[got.assistant_mask]) == "Green.<|im_end|>"
    check_placeholders(got.input_ids[None], cfg, num_frames=np.array([frames]))


def test_image_and_video_prompt_matches_processor(processor, tok, cfg):
    msgs = CONVERSATIONS[5]
    want = _hf_ids(processor, msgs, images=[_image(40, 40)], videos=[np.zeros((3, 8, 8, 3), np.uint8)],
                   add_generation_prompt=False)
    got = tok.build_input_ids(msgs, cfg, image_sizes=[(40, 40)], num_frames=3, add_generation_prompt=False)
    np.testing.assert_array_equal(got.input_ids, want)
    assert got.num_video_tokens == 3 * 196 + 1


def test_rendered_text_input(tok, cfg):
    text = tok.chat_text(chat_messages("hi", num_images=1))
    a = tok.build_input_ids(text, cfg, image_sizes=[(20, 20)])
    b = tok.build_input_ids(chat_messages("hi", num_images=1), cfg, image_sizes=[(20, 20)])
    np.testing.assert_array_equal(a.input_ids, b.input_ids)


def test_tiny_preset_geometry(tok):
    """The tiny tower's anyres (20 px tiles, 5 × 5 grid) with the tokenizer's ids."""
    cfg = ov_model.tiny(llm=qwen2_tiny_llm(vocab_size=400), image_token_id=tok.image_token_id,
                        video_token_id=tok.video_token_id)
    p = tok.build_input_ids(chat_messages("q", num_images=1), cfg, image_sizes=[(30, 52)])
    assert p.num_image_tokens == int(visual_tokens.image_plan((30, 52), cfg.anyres).length)
    p = tok.build_input_ids(chat_messages("q", video=True), cfg, num_frames=4)
    assert p.num_video_tokens == 4 * 3 * 3 + 1 == cfg.video_tokens


def test_placeholder_errors(tok, cfg):
    with pytest.raises(ValueError, match="num_frames is 0"):
        tok.build_input_ids(chat_messages("q", video=True), cfg)
    with pytest.raises(ValueError, match="no <video> token"):
        tok.build_input_ids(chat_messages("q"), cfg, num_frames=2)
    with pytest.raises(ValueError, match="images given"):
        tok.build_input_ids(chat_messages("q", num_images=1), cfg)
    with pytest.raises(ValueError, match="not both"):
        tok.build_input_ids(chat_messages("q", num_images=1), cfg, image_sizes=[(9, 9)],
                            image_plans=[visual_tokens.image_plan((9, 9), cfg.anyres)])


def test_truncate(tok, cfg):
    p = tok.build_input_ids(chat_messages("q", num_images=1), cfg, image_sizes=[(20, 20)])
    first, last = np.flatnonzero(p.image_index)[[0, -1]]
    with pytest.raises(ValueError, match="cut through the image placeholder block"):
        p.truncate(first + 1)
    short = p.truncate(first)
    assert len(short) == first and not short.image_index.any()
    assert p.truncate(last + 1).num_image_tokens == p.num_image_tokens
    assert p.truncate(len(p) + 5) is p


def test_config_mismatch_names_field(tok):
    tok.check_config(ov_model.tiny())  # the tiny preset uses this tokenizer's ids
    with pytest.raises(TokenizerError, match=r"llava_ov\.image_token_id is 386"):
        tok.check_config(ov_model.tiny(image_token_id=386))
    cfg = ov_model.tiny(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                        llm=qwen2_tiny_llm(vocab_size=390))
    with pytest.raises(TokenizerError, match=r"llava_ov\.llm\.vocab_size 390"):
        tok.check_config(cfg)


# --- vocabulary and task tokens --------------------------------------------------------------------------------------


def test_ids_layout(tok):
    assert len(tok) == tok.vocab_size == 396
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (384, 385, 386)
    assert (tok.image_token_id, tok.video_token_id) == (387, 388)
    assert list(tok.added_token_ids) == list(ADDED_TOKENS)
    assert list(tok.added_token_ids.values()) == list(range(389, 396))
    assert (tok.BOX_BEGIN_ID, tok.TIME_BEGIN_ID, tok.TEMP_ID, tok.BOXES_ID, tok.TRACK_BEGIN_ID, tok.TRACKING_ID,
            tok.TRACK_BOX_ID) == tuple(range(389, 396))
    assert tok.bos_id is None and tok.eos_id == 386 and tok.pad_id == 384 and tok.stop_ids == (386, 384)


def test_task_tokens_round_trip(tok, processor):
    for t, i in tok.added_token_ids.items():
        assert tok.encode(t) == [i]
        assert tok.token_to_id(t) == i and tok.id_to_token(i) == t
        assert tok.decode([i]) == t and tok.decode([i], skip_special_tokens=True) == t
    for s in ["a<temp> b", "The red square <box_begin><boxes> is here.", "<track_begin><tracking>",
              "Track it with <track_box>, then <time_begin><temp>.", "ünïcödé × 3 <boxes>\n\n end"]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert ids == processor.tokenizer(s, add_special_tokens=False)["input_ids"]


def test_decode_skip_special(tok):
    ids = tok.encode("<|im_start|>assistant\n<image><video><boxes> ok<|im_end|><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<boxes> ok"
    assert tok.encode("x", add_eos=True)[-1] == tok.eos_id
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("x", add_bos=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([396])
    with pytest.raises(KeyError):
        tok.token_to_id("<nope>")


# --- loading errors and the shipped asset ----------------------------------------------------------------------------


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_missing_directory(tmp_path):
    with pytest.raises(TokenizerError) as e:
        LlavaOVTokenizer(tmp_path / "nowhere")
    assert "not found" in _one_line(e) and "nowhere" in str(e.value)


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError) as e:
        LlavaOVTokenizer(tmp_path)
    msg = _one_line(e)
    assert str(tmp_path) in msg and "tokenizer.json" in msg


def test_corrupt_tokenizer_json(tmp_path):
    shutil.copy(ASSET / "tokenizer_config.json", tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError) as e:
        LlavaOVTokenizer(tmp_path)
    assert str(tmp_path) in _one_line(e)


def _variant(tmp_path, drop):
    """The tiny tokenizer without the added tokens in `drop` (the others keep their ids)."""
    data = json.loads((ASSET / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in drop]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    shutil.copy(ASSET / "tokenizer_config.json", tmp_path)
    return tmp_path


def test_tokenizer_without_image_token(tmp_path):
    with pytest.raises(TokenizerError) as e:
        LlavaOVTokenizer(_variant(tmp_path, {IMAGE_TOKEN}))
    msg = _one_line(e)
    assert "<image>" in msg and str(tmp_path) in msg


def test_missing_task_tokens_are_added_after_video(tmp_path):
    """A llava-hf directory (no task tokens): they are appended after <video>, in ADDED_TOKENS order."""
    t = LlavaOVTokenizer(_variant(tmp_path, set(ADDED_TOKENS)))
    assert list(t.added_token_ids.values()) == list(range(t.video_token_id + 1, t.video_token_id + 8))
    assert t.added_token_ids == LlavaOVTokenizer.tiny().added_token_ids
    assert t.decode(t.encode("a<temp> b"), skip_special_tokens=True) == "a<temp> b"


def test_shipped_asset_is_package_data():
    node = default_tiny_tokenizer_dir()
    assert node.joinpath("tokenizer.json").is_file() and node.joinpath("tokenizer_config.json").is_file()
    text = (REPO / "pyproject.toml").read_text()
    assert '"assets/*/*"' in text  # the package-data glob that ships tpo_jax/assets/<dir>/<file>
    assert os.path.getsize(ASSET / "tokenizer.json") < 64_000


def test_generator_rebuilds_asset_byte_identical(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tiny_tok", REPO / "tools" / "make_llava_ov_tiny_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (ASSET / name).read_bytes(), name


def test_prompt_dataclass_fields(tok, cfg):
    p = tok.build_input_ids(chat_messages("q", num_images=1), cfg, image_sizes=[(20, 20)])
    assert [f.name for f in dataclasses.fields(p)] == ["input_ids", "attention_mask", "image_index", "video_index",
                                                       "assistant_mask"]
    assert p.input_ids.dtype == np.int32 and p.attention_mask.sum() == len(p)
    np.testing.assert_array_equal(p.visual_index, p.image_index | p.video_index)

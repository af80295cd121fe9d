"""Records → fixed-shape examples: token ids against hand-built ids, label masking, task slots and
head targets against hand-computed values, and the fit / skip policy."""

import jax.numpy as jnp
import numpy as np
import pytest

from tpo_jax.data import templates as TPL
from tpo_jax.data.conversation import (ExampleSpec, build_example, clip_saliency, collate, option_tokens, video_id,
                                       video_key)
from tpo_jax.data.records import Record, RecordError
from tpo_jax.data.video import load_media, normalize
from tpo_jax import config as C
from tpo_jax.losses import loss_counts
from tpo_jax.model import gather_task_hidden
from tpo_jax.tokenizer import MultimodalTokenizer

CFG = C.get_config("tiny")
SPEC = ExampleSpec.from_model(CFG, 128)
TOK = MultimodalTokenizer(num_visual_tokens=CFG.num_visual_tokens)
RNG = np.random.default_rng(0)
FRAMES = RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)

# verified ids of MODEL-SPEC §4.3: "[INST] <Video>", "</Video>[/INST]", " [INST] ", " [/INST] "
HEAD = [1, 733, 16289, 28793, 523, 11761, 28767]
AFTER_VIDEO = [1, 1867, 11761, 28767, 28792, 28748, 16289, 28793]
OPEN = [1, 28705, 733, 16289, 28793]
CLOSE = [733, 28748, 16289, 28793, 28705]


def seed_for(templates, index):
    return next(s for s in range(1000) if TPL.pick(templates, s) == templates[index])


def example(record, spec=SPEC, seed=0):
    return build_example(record, load_media(record, spec.num_frames, spec.img_size), spec, TOK, seed=seed)


def pieces(*names):
    return [TOK.token_to_id(n) for n in names]


def assert_labels_are_answers(ex, answer_positions):
    labels, ids = ex["labels"], ex["input_ids"]
    expected = np.full_like(labels, -100)
    expected[answer_positions] = ids[answer_positions]
    np.testing.assert_array_equal(labels, expected)


def test_region_example_equals_hand_built_ids():
    box = [0.125, 0.25, 0.5, 0.75]
    rec = Record(id="r0", task="region", frames=FRAMES, fps=1.0, question="the red circle", boxes=np.array([box]))
    ex = example(rec, seed=seed_for(TPL.REGION, 0))  # "Where is {expr}?"
    question = pieces("▁Where", "▁is", "▁the", "▁red", "▁circle", "?")
    answer = [C.BOX_BEGIN_ID, C.BOXES_ID, 2]
    ids = HEAD + [0] * 8 + AFTER_VIDEO + OPEN + question + CLOSE + answer
    n = len(ids)
    np.testing.assert_array_equal(ex["input_ids"], ids + [0] * (128 - n))
    np.testing.assert_array_equal(ex["attention_mask"], [1] * n + [0] * (128 - n))
    np.testing.assert_array_equal(np.flatnonzero(ex["visual_mask"]), np.arange(7, 15))
    assert ex["answer_start"] == n - 3
    assert_labels_are_answers(ex, np.arange(n - 3, n))
    # the <boxes> slot: where the model gathers the region head's hidden state
    _, pos, valid = gather_task_hidden(jnp.zeros((1, 128, 2)), jnp.asarray(ex["input_ids"][None]), C.BOXES_ID, 1)
    assert int(pos[0, 0]) == n - 2 and bool(valid[0, 0])
    np.testing.assert_allclose(ex["region_boxes"], [box])
    np.testing.assert_array_equal(ex["region_valid"], [True])
    np.testing.assert_allclose(ex["frames"], normalize(FRAMES), rtol=1e-6)
    assert ex["task_id"] == 3 and ex["mc_answer"] == -1 and not ex["temporal_valid"] and not ex["mask_valid"]


def test_image_region_uses_the_image_block_and_repeats_the_frame():
    rec = Record(id="r1", task="region", frames=FRAMES[:1], question="the red circle",
                 boxes=np.array([[0.0, 0.0, 1.0, 1.0]]))
    ex = example(rec)
    n = int(ex["attention_mask"].sum())
    assert "<Image>" in TOK.decode(ex["input_ids"][:n]) and "<Video>" not in TOK.decode(ex["input_ids"][:n])
    for t in range(4):
        np.testing.assert_allclose(ex["frames"][t], normalize(FRAMES[0]), rtol=1e-6)


def test_temporal_targets_and_timestamps():
    rec = Record(id="t0", task="temporal", frames=FRAMES, fps=1.0, question="the red square is visible",
                 duration=4.0, spans=np.array([[1.0, 2.5]]))
    ex = example(rec, seed=seed_for(TPL.TEMPORAL, 0))  # template with "timestamps": the frame-time sentence
    n = int(ex["attention_mask"].sum())
    text = TOK.decode(ex["input_ids"][:n])
    assert "The video contains 4 frames sampled at 0.0, 1.0, 2.0, 3.0 seconds.[/INST]" in text
    assert "query 'the red square is visible' in the video" in text
    a = int(ex["answer_start"])
    assert list(ex["input_ids"][a:a + 3]) == [C.TIME_BEGIN_ID, C.TEMP_ID, 2] and a + 3 == n
    assert_labels_are_answers(ex, np.arange(a, n))
    np.testing.assert_allclose(ex["spans"], [[1.75 / 4, 1.5 / 4], [0, 0]])
    np.testing.assert_array_equal(ex["span_valid"], [True, False])
    np.testing.assert_allclose(ex["saliency_labels"], [0, 12, 6, 0])  # clip overlap with [1, 2.5] × 12 (0-12 scale)
    assert set(ex["saliency_pos"]) == {1} and set(ex["saliency_neg"]) <= {0, 3}
    q = TOK.encode("the red square is visible", add_bos=False)
    np.testing.assert_array_equal(ex["temporal_text_ids"][:len(q)], q)
    np.testing.assert_array_equal(ex["text_mask"], [1.0] * len(q) + [0.0] * (16 - len(q)))
    assert ex["temporal_valid"] and int(ex["vid"]) == video_id(rec) > 0


def test_clip_saliency_resamples_record_clips():
    rec = Record(id="s", task="temporal", frames=FRAMES, duration=8.0, spans=np.array([[2.0, 5.0]]),
                 saliency=np.array([0, 1, 2, 3, 4, 4, 0, 0.0]), clip_seconds=1.0)
    np.testing.assert_allclose(clip_saliency(rec, 8.0, 4), [0.5, 2.5, 4.0, 0.0])


def test_tracking_prompt_box_and_target():
    boxes = np.array([[0.1, 0.1, 0.4, 0.4], [0.2, 0.1, 0.5, 0.4], [0.3, 0.1, 0.6, 0.4], [0, 0, 0, 0]])
    rec = Record(id="m0", task="mask", frames=FRAMES, fps=1.0, question="", track_boxes=boxes,
                 track_visible=np.array([1, 1, 1, 0], bool))
    ex = example(rec, seed=seed_for(TPL.TRACKING, 0))
    n = int(ex["attention_mask"].sum())
    ids = ex["input_ids"]
    track = pieces("▁Track", "▁the", "▁object", "▁in", "▁the", "▁video", "▁using", "▁a", "▁box", "▁with",
                   "▁initial", "▁coordinates", "▁")
    # the chunk after <track_box> gets its own dummy prefix: ". [/INST] " → "▁." ...
    expected = (HEAD + [0] * 8 + AFTER_VIDEO + OPEN + track + [C.TRACK_BOX_ID] + pieces("▁.") + CLOSE
                + [C.TRACK_BEGIN_ID, C.TRACKING_ID, 2])
    np.testing.assert_array_equal(ids[:n], expected)
    assert_labels_are_answers(ex, np.arange(n - 3, n))
    np.testing.assert_allclose(ex["track_boxes"], boxes[:1])
    np.testing.assert_allclose(ex["mask_boxes"], boxes[0])
    assert ex["mask_valid"] and ex["task_id"] == 4


def test_referring_and_sparse_annotations_use_the_nearest_annotated_frame():
    frames8 = RNG.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)  # sampled frames: 0, 2, 4, 6
    boxes = np.array([[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]])
    rec = Record(id="m1", task="mask", frames=frames8, fps=1.0, question="the red square", track_boxes=boxes,
                 track_visible=np.array([False, True]), box_frames=np.array([1, 5]))
    ex = example(rec)
    assert C.TRACK_BOX_ID not in ex["input_ids"] and "the red square" in TOK.decode(ex["input_ids"])
    np.testing.assert_allclose(ex["mask_boxes"], boxes[1])  # frame 2 → entry at 1 (absent); frame 4 → entry at 5
    tracking = Record(id="m2", task="mask", frames=frames8, fps=1.0, question="", track_boxes=boxes,
                      track_visible=np.array([False, True]), box_frames=np.array([1, 5]))
    with pytest.raises(RecordError, match="m2.*not visible in the first sampled frame"):
        example(tracking)


def test_multiple_choice_letters():
    rec = Record(id="q0", task="mc", frames=FRAMES, question="What colour is the square?",
                 options=("Red.", "Green.", "Blue."), mc_answer=2)
    ex = example(rec)
    np.testing.assert_array_equal(ex["mc_options"], [28741, 28760, 28743, -1, -1])  # "A", "B", "C" (no "▁")
    a, p = int(ex["answer_start"]), int(ex["mc_letter_pos"])
    assert p == a + 1 and ex["input_ids"][a] == 325  # "▁(" then the letter
    assert ex["input_ids"][p] == 28743 and ex["labels"][p] == 28743 and ex["mc_answer"] == 2
    n = int(ex["attention_mask"].sum())
    assert TOK.decode(ex["input_ids"][a:n]) == "(C) Blue.</s>"
    prompt = ex["input_ids"][:a]
    assert "Options:\n(A) Red.\n(B) Green.\n(C) Blue. [/INST]" in TOK.decode(prompt)
    for letter in ex["mc_options"][:3]:  # each option letter is the same token in the option list
        assert np.sum(prompt == letter) == 1
    assert example(Record(id="c", task="conversation", frames=FRAMES, turns=[("?", "x")]))["mc_letter_pos"] == -1


def test_long_conversations_drop_whole_turns():
    turns = [("How many shapes appear in the video?", "There are two shapes in the video.")] * 3
    rec = Record(id="c0", task="conversation", frames=FRAMES, turns=turns)
    full = example(rec)
    per_turn = [int(x) for x in np.diff(np.flatnonzero(full["input_ids"] == 1))]  # BOS-to-BOS distances
    one = 7 + 8 + len(AFTER_VIDEO)
    turn_len = per_turn[-1]
    total = one + 3 * turn_len
    assert full["attention_mask"].sum() == total
    spec = ExampleSpec.from_model(CFG, total - 1)
    ex = example(rec, spec)
    assert ex["attention_mask"].sum() == one + 2 * turn_len
    answer = TOK.encode("There are two shapes in the video.", add_bos=False) + [2]
    starts = [one + turn_len - len(answer), one + 2 * turn_len - len(answer)]
    assert_labels_are_answers(ex, np.concatenate([np.arange(s, s + len(answer)) for s in starts]))
    assert ex["answer_start"] == starts[1]
    with pytest.raises(RecordError, match="c0.*do not fit seq_len 30"):
        example(rec, ExampleSpec.from_model(CFG, 30))


def test_records_that_do_not_fit_the_static_slots_are_rejected():
    spans = np.array([[0.0, 1.0], [1.5, 2.0], [3.0, 4.0]])
    rec = Record(id="t1", task="temporal", frames=FRAMES, fps=1.0, question="q", duration=4.0, spans=spans)
    with pytest.raises(RecordError, match="t1.*3 spans.*max_spans=2"):
        example(rec)
    img = Record(id="t2", task="temporal", frames=FRAMES[:1], question="q", duration=4.0, spans=spans[:1])
    with pytest.raises(RecordError, match="t2.*needs a video"):
        example(img)
    bad_box = Record(id="r9", task="region", frames=FRAMES, question="x", boxes=np.array([[0.5, 0.5, 1.2, 0.9]]))
    with pytest.raises(RecordError, match="r9.*outside the frame"):
        example(bad_box)
    many = Record(id="q9", task="mc", frames=FRAMES, question="?", options=tuple("abcdef"), mc_answer=0)
    with pytest.raises(RecordError, match="q9.*6 options"):
        example(many)


def test_extra_boxes_keep_their_tokens_without_targets():
    boxes = np.array([[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]])
    ex = example(Record(id="r2", task="region", frames=FRAMES, question="the squares", boxes=boxes))
    assert np.sum(ex["input_ids"] == C.BOXES_ID) == 2 and np.sum(ex["input_ids"] == C.BOX_BEGIN_ID) == 2
    np.testing.assert_allclose(ex["region_boxes"], boxes[:1])


def test_video_key_survives_stored_media():
    raw = Record(id="AO8RW#3", task="temporal", video="/charades/AO8RW.mp4", question="q", duration=4.0,
                 spans=np.array([[0.0, 2.0]]))
    stored = Record(id=raw.id, task="temporal", video=b"mp4 bytes", question="q", duration=4.0, spans=raw.spans)
    assert video_key(raw) == video_key(stored) == "AO8RW" and video_id(raw) == video_id(stored)
    own = Record(id="synthetic-train-temporal-5", task="temporal", frames=FRAMES)  # a clip of its own
    assert video_key(own) == "synthetic-train-temporal-5"


def test_batch_counts_match_the_losses():
    recs = [
        Record(id="a", task="region", frames=FRAMES, question="x", boxes=np.array([[0.1, 0.1, 0.5, 0.5]])),
        Record(id="b", task="temporal", frames=FRAMES, question="q", duration=4.0, spans=np.array([[0.0, 2.0]])),
        Record(id="c", task="mask", frames=FRAMES, track_boxes=np.array([[0.1, 0.1, 0.5, 0.5]] * 4)),
        Record(id="d", task="conversation", frames=FRAMES, turns=[("Hi?", "Hello.")]),
    ]
    batch = collate([example(r) for r in recs])
    counts = {k: float(v) for k, v in loss_counts({k: jnp.asarray(v) for k, v in batch.items()}, CFG).items()}
    assert counts == {"lm": float(np.sum(batch["labels"] != -100)), "region": 1.0, "temporal": 1.0, "mask": 1.0,
                      "temporal_spans": 1.0, "temporal_neg": 0.0, "temporal_plain": 1.0, "temporal_plain_attn": 1.0,
                      "temporal_moment_clips": 2.0}
    np.testing.assert_array_equal(batch["task_id"], [3, 2, 4, 0])


class _BracketMergingTokenizer:
    """Tokenises "(X" as one token, as a Qwen2 BPE may; every other character is a token of its own."""

    def encode(self, text, add_bos=False):
        out, i = [], 0
        while i < len(text):
            if text[i] == "(" and i + 1 < len(text):
                out.append(1000 + ord(text[i + 1]))
                i += 2
            else:
                out.append(ord(text[i]))
                i += 1
        return out


def test_option_tokens_follow_the_tokenisation():
    """The option letter's position and token per option come from the answers as tokenised: the letter token
    after "▁(" for Mistral, the merged "(B" where a tokenizer merges it."""
    offset, tokens = option_tokens(_BracketMergingTokenizer(), "red square", 3)
    assert offset == 0 and tokens == [1000 + ord(c) for c in "ABC"]
    tok = MultimodalTokenizer()
    offset, tokens = option_tokens(tok, "red square", 4)
    assert offset == 1 and tokens == [tok.token_to_id(c) for c in "ABCD"]
    assert tok.encode("(B) red square", add_bos=False)[offset] == tok.token_to_id("B")

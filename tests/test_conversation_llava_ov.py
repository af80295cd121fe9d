"""Records → examples on arch "llava_ov": the ChatML pieces of `tokenize_dialogue` against the tokenizer's own rendering
of the whole conversation (`LlavaOVTokenizer.build_input_ids`), labels against its `assistant_mask`, task targets at
the Qwen2 task-token ids, the grain pipeline, `shortest_example` and the fixed synthetic batch on both archs."""

import dataclasses

import numpy as np
import pytest

from tpo_jax import config as C
from tpo_jax.config import ConfigError
from tpo_jax.data import pipeline as P
from tpo_jax.data import templates as TPL
from tpo_jax.data.conversation import ExampleSpec, build_example, chatml_prompt_texts, tokenize_dialogue
from tpo_jax.data.fixed_batch import synthetic_batch
from tpo_jax.data.prompts import timestamp_message
from tpo_jax.data.records import TASKS, Record, RecordError
from tpo_jax.data.video import load_media, normalize
from tpo_jax.llava_ov.model import base_config, check_placeholders
from tpo_jax.llava_ov.tokenizer import DEFAULT_SYSTEM_PROMPT, LlavaOVTokenizer, chat_messages, render_chat
from tpo_jax.model_tokenizer import model_tokenizer
from tpo_jax.tokenizer import MultimodalTokenizer, TokenizerError
from tpo_jax.train.run_config import RUN_PRESETS, shortest_example

CFG = C.get_config("llava_ov_tpo_tiny")
BASE = base_config(CFG)
TOK = model_tokenizer(CFG)
SPEC = ExampleSpec.from_model(CFG, 256)
T, V = CFG.num_frames, CFG.num_visual_tokens  # 4 frames → 4 · 2² + 1 = 17 <video> rows
RNG = np.random.default_rng(0)
FRAMES = RNG.integers(0, 256, (T, 32, 32, 3), dtype=np.uint8)
NL = TOK.encode("\n")


def example(record, spec=SPEC, seed=0):
    return build_example(record, load_media(record, spec.num_frames, spec.img_size), spec, TOK, seed=seed)


def reference(turns, *, system=DEFAULT_SYSTEM_PROMPT):
    """The tokenizer's own ids of the whole conversation (chat template, placeholders expanded, no generation
    prompt)."""
    (*history, (q, a)) = turns
    return TOK.build_input_ids(chat_messages(q, video=True, system=system, history=history, answer=a), BASE,
                               num_frames=T, add_generation_prompt=False)


def assert_matches_reference(ex, ref):
    """The example is the reference without its final "\\n"; labels exactly at the assistant_mask positions."""
    n = int(ex["attention_mask"].sum())
    assert n == len(ref) - 1 and list(ref.input_ids[n:]) == NL  # the template's "\n" after the last <|im_end|>
    assert not ref.assistant_mask[n:].any()
    np.testing.assert_array_equal(ex["input_ids"][:n], ref.input_ids[:n])
    np.testing.assert_array_equal(ex["visual_mask"][:n], ref.video_index[:n])
    expected = np.where(ref.assistant_mask[:n], ref.input_ids[:n], -100)
    np.testing.assert_array_equal(ex["labels"][:n], expected)
    assert (ex["labels"][n:] == -100).all() and (ex["input_ids"][n:] == TOK.pad_id).all()
    assert (ex["attention_mask"][n:] == 0).all()


def test_spec_reads_the_arch_neutral_properties():
    assert (SPEC.num_frames, SPEC.img_size, SPEC.num_clips, SPEC.num_visual_tokens) == (4, 32, 4, 17)
    assert SPEC.track_box_id == CFG.task_tokens.track_box == TOK.TRACK_BOX_ID == 395
    tiny = ExampleSpec.from_model(C.tiny(), 128)
    assert (tiny.num_frames, tiny.img_size, tiny.num_clips, tiny.num_visual_tokens, tiny.track_box_id) == \
        (4, 32, 4, 8, C.TRACK_BOX_ID)


def test_multi_turn_conversation_equals_the_chat_template():
    turns = [("How many shapes are there?", "two"), ("Which colour appears first?", "red"),
             ("Is there a circle?", "No, there is no circle.")]
    rec = Record(id="c0", task="conversation", frames=FRAMES, fps=1.0, turns=turns)
    ex = example(rec)
    ref = reference(turns)
    assert_matches_reference(ex, ref)
    n = int(ex["attention_mask"].sum())
    # 3 answers, each its text + <|im_end|>; the last answer starts at answer_start
    labelled = np.flatnonzero(ex["labels"] != -100)
    last = TOK.encode("No, there is no circle.") + [TOK.eos_id]
    assert int(ex["answer_start"]) == n - len(last) and list(ex["input_ids"][n - len(last):n]) == last
    assert len(labelled) == sum(len(TOK.encode(a)) + 1 for _, a in turns)
    assert (ex["input_ids"][labelled] == TOK.eos_id).sum() == 3
    # one block of V <video> rows, the only visual rows, right after "<|im_start|>user\n"
    vis = np.flatnonzero(ex["visual_mask"])
    assert len(vis) == V and (np.diff(vis) == 1).all() and (ex["input_ids"][vis] == TOK.video_token_id).all()
    head = TOK.encode(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert list(ex["input_ids"][:len(head)]) == head and vis[0] == len(head)
    np.testing.assert_allclose(ex["frames"], normalize(FRAMES), rtol=1e-6)
    assert TOK.decode(ex["input_ids"][:n]).endswith("No, there is no circle.<|im_end|>")


def test_pieces_concatenate_to_build_input_ids():
    turns = [("What is it?", "A red square."), ("And now?", "<box_begin><boxes>")]
    pieces = tokenize_dialogue(TOK, turns, is_video=True, frame_times=None, num_visual_tokens=V)
    ref = reference(turns)
    ids = np.concatenate([np.concatenate([p, a]) for p, _, a in pieces])
    np.testing.assert_array_equal(ids, ref.input_ids[:-1])
    np.testing.assert_array_equal(np.concatenate([np.concatenate([v, np.zeros(len(a), bool)]) for _, v, a in pieces]),
                                  ref.video_index[:-1])
    labels = np.concatenate([np.concatenate([np.zeros(len(p), bool), np.ones(len(a), bool)]) for p, _, a in pieces])
    np.testing.assert_array_equal(labels, ref.assistant_mask[:-1])
    # the later turn's prompt begins with the "\n" after <|im_end|> and ends with the generation prompt
    assert list(pieces[1][0][:1]) == NL and TOK.decode(pieces[1][0]) == \
        "\n<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n"
    # each prompt piece is the tokenizer's generation prompt: turn 1 = build_input_ids with add_generation_prompt
    gen = TOK.build_input_ids(chat_messages("What is it?", video=True), BASE, num_frames=T)
    np.testing.assert_array_equal(pieces[0][0], gen.input_ids)
    np.testing.assert_array_equal(pieces[0][1], gen.video_index)


def test_instruction_is_the_system_message():
    turns = [("What colour is the square?", "red")]
    rec = Record(id="c1", task="conversation", frames=FRAMES, fps=1.0, turns=turns, instruction="Answer briefly.")
    ex = example(rec)
    assert_matches_reference(ex, reference(turns, system="Answer briefly."))
    assert DEFAULT_SYSTEM_PROMPT not in TOK.decode(ex["input_ids"])
    assert chatml_prompt_texts(["q"], instruction="   ")[0].startswith(
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>")  # blank: the default


def test_temporal_timestamps_targets_and_labels():
    seed = next(s for s in range(1000) if "timestamp" in TPL.pick(TPL.TEMPORAL, s))
    rec = Record(id="t0", task="temporal", frames=FRAMES, fps=1.0, question="the red square is visible",
                 duration=4.0, spans=np.array([[1.0, 2.5]]))
    ex = example(rec, seed=seed)
    question = TPL.task_instruction("temporal", rec.question, seed)
    user = timestamp_message([0.0, 1.0, 2.0, 3.0]).strip() + " " + question
    assert user.startswith("The video contains 4 frames sampled at 0.0, 1.0, 2.0, 3.0 seconds. ")
    ref = reference([(user, "<time_begin><temp>")])
    assert_matches_reference(ex, ref)
    n, a = int(ex["attention_mask"].sum()), int(ex["answer_start"])
    assert list(ex["input_ids"][a:n]) == [TOK.TIME_BEGIN_ID, TOK.TEMP_ID, TOK.eos_id]
    assert [TOK.TIME_BEGIN_ID, TOK.TEMP_ID] == [CFG.task_tokens.time_begin, CFG.task_tokens.temp]
    np.testing.assert_allclose(ex["spans"], [[1.75 / 4, 1.5 / 4], [0, 0]])
    np.testing.assert_allclose(ex["saliency_labels"], [0, 12, 6, 0])
    q = TOK.encode("the red square is visible")[:SPEC.max_text_len]
    np.testing.assert_array_equal(ex["temporal_text_ids"][:len(q)], q)
    # without "timestamp" in the question there is no frame-time sentence
    other = next(s for s in range(1000) if "timestamp" not in TPL.pick(TPL.TEMPORAL, s))
    assert "frames sampled" not in TOK.decode(example(rec, seed=other)["input_ids"])


def test_mc_letter_is_found_in_the_answer():
    rec = Record(id="m0", task="mc", frames=FRAMES, fps=1.0, question="What colour is the square?",
                 options=("blue", "red", "green"), mc_answer=1)
    ex = example(rec)
    assert TOK.tokenize("(B) red") == ["(", "B", ")", "Ġred"]
    ref = reference([(TPL.mc_question(rec.question, rec.options), "(B) red")])
    assert_matches_reference(ex, ref)
    letters = [TOK.token_to_id(x) for x in "ABC"]
    np.testing.assert_array_equal(ex["mc_options"], letters + [-1, -1])
    pos = int(ex["mc_letter_pos"])
    assert ex["input_ids"][pos] == letters[1] and pos == int(ex["answer_start"]) + 1 and ex["mc_answer"] == 1


def test_tracking_prompt_uses_the_configs_track_box_id():
    boxes = np.array([[0.1, 0.1, 0.4, 0.4], [0.2, 0.1, 0.5, 0.4], [0.3, 0.1, 0.6, 0.4], [0, 0, 0, 0]])
    rec = Record(id="k0", task="mask", frames=FRAMES, fps=1.0, question="", track_boxes=boxes,
                 track_visible=np.array([1, 1, 1, 0], bool))
    ex = example(rec, seed=0)
    assert_matches_reference(ex, reference([(TPL.task_instruction("mask", "", 0), "<track_begin><tracking>")]))
    assert (ex["input_ids"] == CFG.task_tokens.track_box).sum() == 1
    np.testing.assert_allclose(ex["track_boxes"], boxes[:1])
    assert ex["mask_valid"]
    # a spec with fewer track slots than <track_box> tokens fails naming the limit
    with pytest.raises(RecordError, match="track box slot"):
        example(rec, spec=dataclasses.replace(SPEC, track_slots=0))


def test_image_is_a_video_of_repeated_frames():
    rec = Record(id="r0", task="region", frames=FRAMES[:1], question="the red circle",
                 boxes=np.array([[0.0, 0.0, 1.0, 1.0]]))
    ex = example(rec, seed=0)
    assert_matches_reference(ex, reference([(TPL.task_instruction("region", "the red circle", 0),
                                             "<box_begin><boxes>")]))
    for t in range(T):
        np.testing.assert_allclose(ex["frames"][t], normalize(FRAMES[0]), rtol=1e-6)
    assert ex["visual_mask"].sum() == V


def test_whole_turns_are_dropped_to_fit_and_a_placeholder_in_the_text_is_a_skip():
    turns = [("How many shapes are there?", "two"), ("Which colour appears first?", "red")]
    rec = Record(id="c2", task="conversation", frames=FRAMES, fps=1.0, turns=turns)
    full = len(reference(turns)) - 1
    one = len(reference(turns[:1])) - 1
    ex = example(rec, spec=dataclasses.replace(SPEC, seq_len=full - 1))
    assert int(ex["attention_mask"].sum()) == one
    with pytest.raises(RecordError, match="do not fit"):
        example(rec, spec=dataclasses.replace(SPEC, seq_len=one - 1))
    bad = Record(id="c3", task="conversation", frames=FRAMES, fps=1.0, turns=[("see <video> here", "ok")])
    with pytest.raises(RecordError, match="c3.*<video>") as e:
        example(bad)
    assert e.value.kind == "tokenize"


def test_pipeline_batch_of_every_task_without_skips():
    data = P.DataConfig(batch_size=20, seq_len=256, weights={t: 1.0 for t in TASKS})
    it = P.make_train_iterator(data, CFG, "stage1")
    batches = [next(it) for _ in range(3)]
    assert it.bad == 0 and it.seen == 60
    spec = P.example_spec(data, CFG)
    assert spec == SPEC
    for batch in batches:
        for k, (shape, dtype) in spec.shapes().items():
            assert batch[k].shape == (20, *shape) and batch[k].dtype == dtype, k
        assert sorted(set(batch["task_id"].tolist())) == list(range(len(TASKS)))
        check_placeholders(batch["input_ids"], BASE, num_frames=np.full(20, T))
        np.testing.assert_array_equal(batch["visual_mask"], batch["input_ids"] == TOK.video_token_id)
        mc = batch["task_id"] == TASKS.index("mc")
        rows = np.flatnonzero(mc)
        letters = batch["input_ids"][rows, batch["mc_letter_pos"][rows]]
        np.testing.assert_array_equal(letters, batch["mc_options"][rows, batch["mc_answer"][rows]])
        for b in range(20):  # each example ends with a labelled <|im_end|>
            n = int(batch["attention_mask"][b].sum())
            assert batch["input_ids"][b, n - 1] == batch["labels"][b, n - 1] == TOK.eos_id
            assert batch["labels"][b, :int(batch["answer_start"][b])][:V + 1].max() == -100
    # the synthetic clips are rendered at the model's frame size and count
    syn = P.synthetic_config(data, CFG)
    assert (syn.size, syn.num_frames) == (CFG.frame_size, CFG.num_frames)


def test_eval_batches_and_tokenizer_mismatch_fails_before_any_record():
    out = P.eval_batches(P.DataConfig(batch_size=4, seq_len=256), CFG, num_examples=4, tasks=("mc", P.MC_CLOZE),
                         tracking=False)
    assert out["mc"][0]["input_ids"].shape == (4, 256) and len(out[P.MC_CLOZE]) >= 1
    wrong = dataclasses.replace(CFG, task_tokens=C.TaskTokenIds(*range(380, 387)))
    with pytest.raises(TokenizerError, match="task_tokens"):
        P.make_train_iterator(P.DataConfig(batch_size=2, seq_len=256), wrong, "stage1")


def test_shortest_example_both_archs():
    tiny_tok = MultimodalTokenizer(num_visual_tokens=C.tiny().num_visual_tokens)
    ((p, _, a),) = tokenize_dialogue(tiny_tok, [("", "")], is_video=True, frame_times=None)
    assert shortest_example(C.tiny()) == len(p) + len(a) == 26
    text = render_chat(chat_messages("", video=True, answer=""), add_generation_prompt=False)[0]
    assert text.endswith("<|im_start|>assistant\n<|im_end|>\n")
    want = len(TOK.build_input_ids(text, BASE, num_frames=T)) - 1  # without the final "\n"
    assert shortest_example(CFG) == want == 67
    # the 7B preset before its tokenizer is set: a lower bound (6273 video rows + the template's pieces)
    big = C.llava_ov_tpo_7b()
    assert big.num_visual_tokens + 12 <= shortest_example(big) < big.num_visual_tokens + 30
    run = RUN_PRESETS["llava_ov_tpo_tiny"]()
    run.validate()
    with pytest.raises(ConfigError, match="data.seq_len.*llava_ov template"):
        dataclasses.replace(run, data=dataclasses.replace(run.data, seq_len=shortest_example(run.model))).validate()


@pytest.mark.parametrize("name", ["tiny", "llava_ov_tpo_tiny"])
def test_fixed_batch_both_archs(name):
    cfg = C.get_config(name)
    tok = model_tokenizer(cfg)
    batch = synthetic_batch(cfg, 4, seed=0)
    L = batch["input_ids"].shape[1]
    assert L == (64 if name == "tiny" else V + 96)
    assert batch["frames"].shape == (4, cfg.num_frames, cfg.frame_size, cfg.frame_size, 3)
    assert batch["saliency_labels"].shape == (4, cfg.num_clips)
    for i, (task, question) in enumerate([("region", "Where is the square in the first frame?"),
                                          ("temporal", "When is the square visible?"),
                                          ("mask", "Track the square.")]):
        answer = {"region": "<box_begin><boxes>", "temporal": "<time_begin><temp>",
                  "mask": "<track_begin><tracking>"}[task]
        ((p, v, a),) = tokenize_dialogue(tok, [(question, answer)], is_video=True, frame_times=None,
                                         num_visual_tokens=cfg.num_visual_tokens)
        n = len(p) + len(a)
        np.testing.assert_array_equal(batch["input_ids"][i, :n], np.concatenate([p, a]))
        np.testing.assert_array_equal(batch["visual_mask"][i, :len(p)], v)
        np.testing.assert_array_equal(batch["labels"][i, len(p):n], a)
        assert (batch["labels"][i, :len(p)] == -100).all() and (batch["input_ids"][i, n:] == tok.pad_id).all()
    if name == "llava_ov_tpo_tiny":
        check_placeholders(batch["input_ids"], BASE, num_frames=np.full(4, T))
        with pytest.raises(ValueError, match="does not fit seq_len"):
            synthetic_batch(cfg, 4, seq_len=64)


def test_llava_tokenizer_type():
    assert isinstance(TOK, LlavaOVTokenizer)

"""Generation on the LLaVA-OV architecture (`llava_ov_tpo_tiny`, random float32 weights): the compiled KV-cache
decode against argmax loops over full (no-cache) `TPOModel` forwards on the growing sequence, the Qwen2 stop and
pad ids (`<|im_end|>`), the task heads at generated task tokens against `TPOModel.run_heads` on full-forward hidden
states, the ChatML prompt, and `tpo-infer` end to end on a LLaVA-OV work directory."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpo_jax import config as C
from tpo_jax.data.generation_prompt import encode_question
from tpo_jax.generate import GenerationConfig, GenerationRequest, Generator
from tpo_jax.llava_ov.model import base_config
from tpo_jax.llava_ov.tokenizer import DEFAULT_SYSTEM_PROMPT, render_chat
from tpo_jax.model import TPOModel
from tpo_jax.model_tokenizer import model_tokenizer

CFG = C.get_config("llava_ov_tpo_tiny")
TT = CFG.task_tokens
TOL = 1e-5
N_NEW = 8
PAD_TO = 128  # the oracle's right-padded length (causal: the padding after the last token changes nothing)
QUESTIONS = ["Where is the red square?", "When does it move?"]
SIZE, DURATION = (240, 320), 6.0


@pytest.fixture(scope="module")
def tok():
    return model_tokenizer(CFG)


def make_requests(tok, questions, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for q in questions:
        p = encode_question(CFG, tok, q)
        frames = rng.normal(size=(CFG.num_frames, CFG.frame_size, CFG.frame_size, 3)).astype(np.float32)
        out.append(GenerationRequest(p.input_ids, p.visual_mask, frames, frame_size=SIZE, duration=DURATION,
                                     query_ids=tok.encode(q)))
    return out


# --- the oracle: full TPOModel forwards, no cache ------------------------------------------------------------------

class Full:
    """`TPOModel.__call__` on one right-padded sequence (ids, visual rows, frames): final-norm hidden states,
    logits and the vision features, jitted once for PAD_TO positions."""

    def __init__(self, model):
        graphdef, state = nnx.split(model)
        self.model = model

        @jax.jit
        def fwd(state, ids, vmask, frames):
            out = nnx.merge(graphdef, state)(ids, visual_mask=vmask, frames=frames, return_vision_features=True)
            return out.hidden, out.logits, out.vision_features

        self._fwd = lambda *a: fwd(state, *a)

    def __call__(self, ids, vmask, frames):
        n = len(ids)
        assert n <= PAD_TO
        pad_ids = np.zeros(PAD_TO, np.int32)
        pad_ids[:n] = ids
        pad_mask = np.zeros(PAD_TO, bool)
        pad_mask[:len(vmask)] = vmask
        h, logits, feats = self._fwd(jnp.asarray(pad_ids)[None], jnp.asarray(pad_mask)[None],
                                     jnp.asarray(frames)[None])
        return h[:, :n], logits[0, :n], feats


def oracle(full, req, n_new, stop_ids, training=False):
    """Greedy ids of a full forward per step on prompt + generated ids (the stop token included). With
    `training` a begin token is followed by its placeholder, as the training-style side step forces it."""
    ids = [int(i) for i in req.input_ids]
    gen, forced = [], None
    for _ in range(n_new):
        _, logits, _ = full(ids + gen, req.visual_mask, req.frames)
        t = forced if forced is not None else int(jnp.argmax(logits[-1]))
        forced = TT.placeholders[TT.begin_tokens.index(t)] if training and t in TT.begin_tokens else None
        gen.append(t)
        if t in stop_ids:
            break
    return gen


def heads_at(full, req, seq, n_prompt):
    """`TPOModel.run_heads` on the full forward of `seq`: region / mask / temporal outputs at the first `<boxes>` /
    `<tracking>` / `<temp>` of the answer (the prompt part `seq[:n_prompt]` holds none)."""
    model = full.model
    hidden, _, feats = full(seq, req.visual_mask, req.frames)
    ids = jnp.asarray(seq, jnp.int32)[None]
    n = CFG.heads.temporal.max_text_len
    q = list(req.query_ids)[:n]
    inputs = {"region_boxes": jnp.zeros((1, 1, 4)),
              "temporal_text_ids": jnp.asarray([q + [0] * (n - len(q))], jnp.int32),
              "text_mask": jnp.asarray([[1.0] * len(q) + [0.0] * (n - len(q))]),
              "vid_mask": jnp.ones((1, CFG.num_clips))}
    out = model.run_heads(hidden, ids, ("region", "mask", "temporal"), inputs, feats)
    assert not set(seq[:n_prompt]) & set(TT.placeholders)
    res = {}
    if TT.boxes in seq:
        res["region_boxes"] = np.asarray(out.region.boxes[0])
    if TT.tracking in seq:
        res.update(track_prompt=np.asarray(out.mask.prompt[0]), track_box=np.asarray(out.mask.box[0]))
    if TT.temp in seq:
        o = out.temporal.outputs
        res.update(pred_spans=np.asarray(o["pred_spans"][0]), pred_logits=np.asarray(o["pred_logits"][0]),
                   saliency=np.asarray(o["saliency_scores"][0]))
    return res


def plant(model, run, plan):
    """Make the model emit each token of `plan` at (sample, step): its lm_head column becomes 1.01 × the column of
    the token `run()` chooses there, so it wins wherever that token would have won."""
    for token_id, (i, s) in plan:
        a = run()[i].token_ids[s]
        k = model.llm.lm_head.kernel
        k[...] = k[...].at[:, token_id].set(1.01 * k[...][:, a])


@pytest.fixture(scope="module")
def plain(tok):
    model = TPOModel(CFG, rngs=nnx.Rngs(0))
    return model, Full(model), make_requests(tok, QUESTIONS)


@pytest.fixture(scope="module")
def tasked(tok):
    """A model that answers `<box_begin>`, `<time_begin>` and `<track_begin>` (training-style side steps)."""
    model = TPOModel(CFG, rngs=nnx.Rngs(1))
    reqs = make_requests(tok, QUESTIONS[:1], seed=1)
    gen = GenerationConfig(max_new_tokens=N_NEW, side_step="training")
    plant(model, lambda: Generator(model, gen, tok)(reqs),
          [(TT.box_begin, (0, 0)), (TT.time_begin, (0, 2)), (TT.track_begin, (0, 4))])
    return model, Full(model), reqs


# --- tests ---------------------------------------------------------------------------------------------------------

def test_prompt_is_chatml_with_the_video_rows(tok):
    p = encode_question(CFG, tok, QUESTIONS[0], history=[("Hi", "Hello.")])
    text, _ = render_chat([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                           {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]},
                           {"role": "assistant", "content": "Hello."},
                           {"role": "user", "content": QUESTIONS[0]}])
    ids = tok.encode(text)
    k = ids.index(tok.video_token_id)
    expected = ids[:k] + [tok.video_token_id] * CFG.num_visual_tokens + ids[k + 1:]
    assert p.input_ids.tolist() == expected and text.endswith("<|im_start|>assistant\n")
    assert p.visual_mask.sum() == CFG.num_visual_tokens == 17
    assert p.visual_mask.tolist() == [i == tok.video_token_id for i in expected]
    assert tok.bos_id is None and (p.input_ids == tok.im_end_id).sum() == 4  # system, user, assistant, user


def test_prompt_equals_the_training_prompt_with_timestamps(tok):
    """A question about timestamps gets the frame-time sentence in the same place as the training examples."""
    from tpo_jax.data.conversation import tokenize_dialogue
    times = [0.5, 1.5, 2.5, 3.5]
    for q in ("Give the timestamp of the square.", "What colour is the square?"):
        p = encode_question(CFG, tok, q, frame_times=times)
        ((train_ids, train_visual, _),) = tokenize_dialogue(tok, [(q, "x")], is_video=True, frame_times=times,
                                                            num_visual_tokens=CFG.num_visual_tokens)
        assert p.input_ids.tolist() == list(train_ids) and p.visual_mask.tolist() == list(train_visual)
    assert "0.5, 1.5" in tok.decode(encode_question(CFG, tok, "timestamp?", frame_times=times).input_ids)


def test_stop_and_pad_ids_are_the_qwen2_tokenizers(plain, tok):
    model, _, _ = plain
    g = Generator(model, GenerationConfig(max_new_tokens=4))  # no tokenizer: the config's is loaded for the ids
    assert g.gen.stop_ids == (tok.im_end_id, tok.endoftext_id) == (386, 384) and g.gen.pad_id == 384
    assert GenerationConfig(max_new_tokens=4).for_tokenizer(tok) == g.gen
    explicit = GenerationConfig(stop_ids=(5,), pad_id=7).for_tokenizer(tok)
    assert explicit.stop_ids == (5,) and explicit.pad_id == 7


def test_greedy_equals_full_forward_argmax(plain, tok):
    model, full, reqs = plain
    results = Generator(model, GenerationConfig(max_new_tokens=N_NEW), tok)(reqs)  # one batch, left-padded
    for req, res in zip(reqs, results):
        ids = oracle(full, req, N_NEW, tok.stop_ids)
        assert not set(ids) & set(TT.placeholders)  # released side steps: generated ids enter as plain embeddings
        assert res.token_ids + ([ids[-1]] if res.finish_reason == "stop" else []) == ids
        in_vocab = [t for t in res.token_ids if t < len(tok)]  # the 4 embedding rows past the tokenizer: no text
        assert res.text == tok.decode(in_vocab, skip_special_tokens=True)
        assert any("outside the tokenizer" in n for n in res.notes) == (len(in_vocab) < len(res.token_ids))
    assert results[0].token_ids != results[1].token_ids


def test_generation_stops_at_im_end(plain, tok):
    """`<|im_end|>` made the argmax at step 3: the answer ends there (finish "stop", the stop id not in it), as the
    full-forward loop that stops at the tokenizer's stop ids."""
    _, _, reqs = plain
    model = TPOModel(CFG, rngs=nnx.Rngs(0))
    gen = GenerationConfig(max_new_tokens=N_NEW)
    plant(model, lambda: Generator(model, gen, tok)(reqs[:1]), [(tok.im_end_id, (0, 3))])
    (res,) = Generator(model, gen, tok)(reqs[:1])
    ids = oracle(Full(model), reqs[0], N_NEW, tok.stop_ids)
    assert ids[-1] == tok.im_end_id and len(ids) <= 4
    assert res.finish_reason == "stop" and res.token_ids == ids[:-1] and tok.im_end_id not in res.token_ids
    assert "<|im_end|>" not in res.text


def test_training_side_step_heads_equal_run_heads_on_the_full_forward(tasked, tok):
    model, full, reqs = tasked
    gen = GenerationConfig(max_new_tokens=N_NEW, side_step="training")
    (res,) = Generator(model, gen, tok)(reqs)
    ids = oracle(full, reqs[0], N_NEW, tok.stop_ids, training=True)
    assert res.token_ids + ([ids[-1]] if res.finish_reason == "stop" else []) == ids
    for b, p in zip(TT.begin_tokens, TT.placeholders):  # each begin token emitted, followed by its placeholder
        (at,) = [i for i, t in enumerate(ids) if t == b]
        assert ids[at + 1] == p
    assert "<box_begin><boxes>" in res.text and "<track_begin><tracking>" in res.text
    req = reqs[0]
    seq = [int(i) for i in req.input_ids] + ids
    expected = heads_at(full, req, seq, len(req.input_ids))
    assert set(expected) == {"region_boxes", "track_prompt", "track_box", "pred_spans", "pred_logits", "saliency"}
    for name, value in expected.items():
        got = res.raw[name][:len(value)]
        assert np.abs(got - value).max() <= TOL, name
    assert np.allclose(res.region[0]["box"], expected["region_boxes"][0] * [320, 240, 320, 240], atol=1e-4)
    assert len(res.temporal["saliency"]) == CFG.num_clips and res.temporal["duration"] == DURATION
    assert res.track is not None and not any("head not run" in n for n in res.notes)


def test_released_side_step_heads_equal_run_heads_on_the_full_forward(tasked, tok):
    """Released side step: the head reads the placeholder's state at the begin token's position, i.e. the full
    forward of prompt + the answer before the begin token + the placeholder."""
    model, full, reqs = tasked
    (res,) = Generator(model, GenerationConfig(max_new_tokens=N_NEW), tok)(reqs)
    ids = oracle(full, reqs[0], N_NEW, tok.stop_ids)
    assert res.token_ids + ([ids[-1]] if res.finish_reason == "stop" else []) == ids
    assert not set(ids) & set(TT.placeholders)  # generated ids enter as plain embeddings, as in the oracle
    prompt = [int(i) for i in reqs[0].input_ids]
    ran = 0
    for b, p, names in zip(TT.begin_tokens, TT.placeholders,
                           (("region_boxes",), ("pred_spans", "pred_logits", "saliency"),
                            ("track_prompt", "track_box"))):
        if b not in ids:
            assert all(n not in res.raw for n in names)
            continue
        at = ids.index(b) if b == TT.box_begin else len(ids) - 1 - ids[::-1].index(b)  # region: first; others: last
        expected = heads_at(full, reqs[0], prompt + ids[:at] + [p], len(prompt))
        for name in names:
            assert np.abs(res.raw[name][:len(expected[name])] - expected[name]).max() <= TOL, name
        ran += 1
    assert ran >= 1 and ids.count(TT.box_begin) >= 1


# --- tpo-infer --------------------------------------------------------------------------------------------------------

def test_infer_cli_on_a_llava_ov_work_directory(tmp_path, tok):
    """`tpo-infer --checkpoint WORKDIR --video clip.mp4`: the answer and region box of `generate` on the restored
    model with the ChatML prompt and the video decoded at the model's frames and size, built here by hand."""
    from tpo_jax.checkpoints.manager import CheckpointManager
    from tpo_jax.cli import infer
    from tpo_jax.data.video import decode_video, encode_mp4
    from tpo_jax.llava_ov.tokenizer import chat_messages
    from tpo_jax.train.load import load_model
    from tpo_jax.train.run_config import get_run_config
    from tpo_jax.train.workdir import params_of_groups, trained_groups

    run = get_run_config("llava_ov_tpo_tiny")
    cfg = run.model
    frames = np.full((24, 48, 64, 3), 90, np.uint8)
    for t in range(24):
        frames[t, 10:22, 4 + 2 * t:16 + 2 * t] = (220, 30, 30)
    (tmp_path / "clip.mp4").write_bytes(encode_mp4(frames, fps=8.0))
    media = decode_video(str(tmp_path / "clip.mp4"), cfg.num_frames, cfg.frame_size)
    assert media.frames.shape == (4, 32, 32, 3)
    p = tok.build_input_ids(chat_messages(QUESTIONS[0], video=True, system=DEFAULT_SYSTEM_PROMPT), base_config(cfg),
                            num_frames=cfg.num_frames, add_generation_prompt=True)
    assert p.num_video_tokens == cfg.num_visual_tokens == 65
    req = GenerationRequest(p.input_ids, p.video_index, media.frames, frame_size=media.source_size,
                            duration=media.duration, query_ids=tok.encode(QUESTIONS[0]))

    model = TPOModel(cfg, rngs=nnx.Rngs(run.seed))
    gen = GenerationConfig(max_new_tokens=N_NEW)
    plant(model, lambda: Generator(model, gen, tok)([req]), [(TT.box_begin, (0, 1))])
    work = tmp_path / "workdir"
    work.mkdir()
    (work / "config.json").write_text(json.dumps(run.to_dict()))
    state = nnx.state(model, nnx.Param)
    with CheckpointManager(work / "stage3" / "checkpoints") as mngr:
        mngr.save(run.stage3.steps, params=params_of_groups(state, {}, trained_groups(run, "stage3")),
                  state={"step": np.int32(run.stage3.steps)}, meta={"stage": "stage3"}, config=run.to_dict(),
                  force=True)
    restored, _ = load_model(str(work))
    (expected,) = Generator(restored, gen, tok)([req])
    assert expected.region, "the planted <box_begin> must survive the checkpoint, else the head goes untested"

    out = tmp_path / "answer.json"
    assert infer.main([f"--checkpoint={work}", f"--video={tmp_path / 'clip.mp4'}", f"--prompt={QUESTIONS[0]}",
                       f"--max-new-tokens={N_NEW}", f"--output={out}"]) == 0
    doc = json.loads(out.read_text())
    (got,) = doc["results"]
    assert got["token_ids"] == expected.token_ids and got["answer"] == expected.text
    assert np.allclose(got["region"][0]["box"], expected.region[0]["box"], atol=1e-3)
    assert got["media"]["frame_size"] == [48, 64] and len(got["media"]["frame_times"]) == cfg.num_frames
    assert doc["generation"]["stop_ids"] == [tok.im_end_id, tok.endoftext_id]
    assert doc["generation"]["pad_id"] == tok.pad_id
    # the same answer from the in-memory model: the checkpoint restores it exactly
    (mem,) = Generator(model, dataclasses.replace(gen), tok)([req])
    assert mem.token_ids == expected.token_ids

    # --batch: the same question answers the same; --chat: the second turn is the ChatML prompt with the first turn
    # (question, answer) as history, here built by hand from the first answer
    (tmp_path / "batch.jsonl").write_text(json.dumps({"prompt": QUESTIONS[0], "video": "clip.mp4"}) + "\n" +
                                          json.dumps({"prompt": QUESTIONS[1], "video": "clip.mp4"}))
    assert infer.main([f"--checkpoint={work}", f"--batch={tmp_path / 'batch.jsonl'}",
                       f"--max-new-tokens={N_NEW}", f"--output={tmp_path / 'batch.json'}"]) == 0
    batch = json.loads((tmp_path / "batch.json").read_text())["results"]
    assert len(batch) == 2 and batch[0]["token_ids"] == expected.token_ids
    import io
    import sys
    stdin, sys.stdin = sys.stdin, io.StringIO(f"{QUESTIONS[0]}\n{QUESTIONS[1]}\n/quit\n")
    try:
        assert infer.main([f"--checkpoint={work}", f"--video={tmp_path / 'clip.mp4'}", "--chat",
                           f"--max-new-tokens={N_NEW}", f"--output={tmp_path / 'chat.json'}"]) == 0
    finally:
        sys.stdin = stdin
    turns = json.loads((tmp_path / "chat.json").read_text())["results"]
    assert [t["prompt"] for t in turns] == QUESTIONS and turns[0]["token_ids"] == expected.token_ids
    second = tok.build_input_ids(chat_messages(QUESTIONS[1], video=True, system=DEFAULT_SYSTEM_PROMPT,
                                               history=[(QUESTIONS[0], turns[0]["answer"])]),
                                 base_config(cfg), num_frames=cfg.num_frames, add_generation_prompt=True)
    req2 = GenerationRequest(second.input_ids, second.video_index, media.frames, frame_size=media.source_size,
                             duration=media.duration, query_ids=tok.encode(QUESTIONS[1]))
    (want2,) = Generator(restored, gen, tok)([req2])
    assert turns[1]["token_ids"] == want2.token_ids
    assert len(turns[1]["region"]) == len(want2.region)  # the head reads the history-dependent hidden state
    for got_box, want_box in zip(turns[1]["region"], want2.region):
        assert np.allclose(got_box["box"], want_box["box"], atol=1e-3)

"""`tpo_jax.generate`: the compiled KV-cache decode against argmax loops over full forwards (tiny TPO model, random
weights), batched (left padding) against one by one, the side steps of MODEL-SPEC §8.3 in both forms, beams,
sampling, stop ids, buckets (no recompiles), precomputed temporal features and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpo_jax import config as C
from tpo_jax.data.prompts import encode_demo_prompt
from tpo_jax.generate import (GenerationConfig, GenerationError, GenerationRequest, Generator, TemporalFeatures,
                              compiled_decode, load_temporal_features)
from tpo_jax.model import TPOModel
from tpo_jax.tokenizer import MultimodalTokenizer

CFG = C.get_config("tiny")
BEGIN_TOKENS, PLACEHOLDERS = CFG.task_tokens.begin_tokens, CFG.task_tokens.placeholders
TOL = 1e-5
N_NEW = 10
QUESTIONS = ["Where is the red square?", "What happens in the video, from the start to the very end?", "Hi"]
SIZE, DURATION = (240, 320), 8.0


def make_requests(cfg, tok, questions, seed=0, image=False):
    rng = np.random.default_rng(seed)
    out = []
    for q in questions:
        p = encode_demo_prompt(tok, q, is_video=not image)
        t = 1 if image else cfg.vit.num_frames
        frames = rng.normal(size=(t, cfg.vit.img_size, cfg.vit.img_size, 3)).astype(np.float32)
        out.append(GenerationRequest(p.input_ids, p.visual_index, frames, frame_size=SIZE, duration=DURATION,
                                     query_ids=tok.encode(q, add_bos=False)))
    return out


def plant(model, kernel_of, run, plan):
    """Make the model emit each begin token: its lm_head column becomes 1.01 × the column of the token `run()`
    chooses at (sample, step), so it wins wherever that token would have won."""
    for token_id, (i, s) in plan:
        a = run()[i].token_ids[s]
        k = kernel_of(model)
        k[...] = k[...].at[:, token_id].set(1.01 * k[...][:, a])


@pytest.fixture(scope="module")
def setup():
    model = TPOModel(CFG, rngs=nnx.Rngs(0))
    tok = MultimodalTokenizer(num_visual_tokens=CFG.num_visual_tokens)
    reqs = make_requests(CFG, tok, QUESTIONS)
    gen = GenerationConfig(max_new_tokens=N_NEW)
    plant(model, lambda m: m.llm.lm_head.kernel, lambda: Generator(model, gen)(reqs),
          [(C.BOX_BEGIN_ID, (0, 1)), (C.TIME_BEGIN_ID, (1, 3)), (C.TRACK_BEGIN_ID, (2, 2))])
    results = Generator(model, gen, tok)(reqs)
    emitted = {t for r in results for t in r.token_ids}
    assert set(BEGIN_TOKENS) <= emitted, "the planted begin tokens must appear, else the side steps go untested"
    return model, tok, reqs, results


# --- the oracle: full forwards, no cache ---------------------------------------------------------------------------

def _forward(model):
    graphdef, state = nnx.split(model.llm)

    @jax.jit
    def fwd(state, emb):  # (1, Lmax, D) right-padded; causal, so the padding after position n-1 does not matter
        return nnx.merge(graphdef, state)(inputs_embeds=emb).hidden

    def run(emb):
        n = emb.shape[1]
        padded = jnp.zeros((1, 128, emb.shape[2]), emb.dtype).at[:, :n].set(emb)
        h = fwd(state, padded)[0, n - 1]
        return h, model.llm.logits(h)
    return run


def oracle(model, req, n_new, training=False):
    """Greedy argmax loop over full forwards. Released: generated tokens enter as plain embeddings and the side step
    is a full forward of the context + the task-token vector. Training: the placeholder is forced after a begin
    token, everything enters through `embed_inputs` (as in training), and the head reads the placeholder's state."""
    fwd = _forward(model)
    ids = jnp.asarray(req.input_ids)[None]
    prompt, feats = model.embed_inputs(ids, visual_mask=jnp.asarray(req.visual_mask)[None],
                                       frames=jnp.asarray(req.frames)[None], return_vision_features=True)
    embed = model.embed_inputs if training else model.llm.embed
    gen, slots, forced = [], {"region": [], "temporal": None, "mask": None}, None

    def record(kind, h):
        name = ("region", "temporal", "mask")[kind]
        slots[name] = slots[name] + [h] if name == "region" else h

    def context():
        return jnp.concatenate([prompt, embed(jnp.asarray(gen, jnp.int32)[None])], axis=1)

    for _ in range(n_new):
        emb = context()
        h, logits = fwd(emb)
        if training and gen and gen[-1] in PLACEHOLDERS:
            record(PLACEHOLDERS.index(gen[-1]), h)
        t = forced if forced is not None else int(jnp.argmax(logits))
        forced = None
        if t in BEGIN_TOKENS:
            kind = BEGIN_TOKENS.index(t)
            if training:
                forced = PLACEHOLDERS[kind]
            else:
                task = model.embed_inputs(jnp.asarray([[PLACEHOLDERS[kind]]], jnp.int32))
                record(kind, fwd(jnp.concatenate([emb, task], axis=1))[0])
        gen.append(t)
        if t == 2:
            break
    if training and gen[-1] in PLACEHOLDERS:
        record(PLACEHOLDERS.index(gen[-1]), fwd(context())[0])
    return gen, slots, feats


def oracle_heads(model, req, slots, feats):
    out = {}
    if slots["region"]:
        out["region_boxes"] = np.stack([np.asarray(model.region_head(h)) for h in slots["region"]])
    if slots["mask"] is not None:
        prompt, box = model.mask_head(slots["mask"])
        out["track_prompt"], out["track_box"] = np.asarray(prompt), np.asarray(box)
    if slots["temporal"] is not None:
        n = CFG.heads.temporal.max_text_len
        q = list(req.query_ids)[:n]
        inputs = {"temporal_text_ids": jnp.asarray([q + [0] * (n - len(q))], jnp.int32),
                  "text_mask": jnp.asarray([[1.0] * len(q) + [0.0] * (n - len(q))]),
                  "vid_mask": jnp.ones((1, CFG.vit.num_frames))}
        o = model.temporal_head(*model.temporal_features(inputs, feats), slots["temporal"][None])
        out.update(pred_spans=np.asarray(o["pred_spans"][0]), pred_logits=np.asarray(o["pred_logits"][0]),
                   saliency=np.asarray(o["saliency_scores"][0]))
    return out


def assert_heads_close(raw, expected):
    for name, value in expected.items():
        got = raw[name][:len(value)] if name == "region_boxes" else raw[name]
        assert np.abs(got - value).max() <= TOL, name


# --- tests ---------------------------------------------------------------------------------------------------------

def test_greedy_cache_equals_full_forward_loop(setup):
    model, _, reqs, results = setup
    for req, res in zip(reqs, results):
        ids, slots, feats = oracle(model, req, N_NEW)
        assert res.token_ids + ([2] if res.finish_reason == "stop" else []) == ids
        assert_heads_close(res.raw, oracle_heads(model, req, slots, feats))
        if slots["region"]:
            assert len(res.region) == len(slots["region"])
            assert np.allclose(res.region[0]["box"], res.raw["region_boxes"][0] * [320, 240, 320, 240], atol=1e-4)
        assert (res.temporal is not None) == (slots["temporal"] is not None)
        assert (res.track is not None) == (slots["mask"] is not None)
        if res.temporal:
            assert len(res.temporal["saliency"]) == CFG.vit.num_frames
            assert all(0 <= s <= e <= DURATION for s, e, _ in res.temporal["spans"])


def test_batched_equals_one_by_one(setup):
    model, tok, reqs, results = setup
    gen = GenerationConfig(max_new_tokens=N_NEW)
    for req, batched in zip(reqs, results):
        (alone,) = Generator(model, gen, tok)([req])
        assert alone.token_ids == batched.token_ids and alone.text == batched.text
        for name, value in alone.raw.items():
            if name != "task_hidden":
                assert np.abs(np.asarray(batched.raw[name], np.float64) - value).max() <= TOL, name


def test_training_style_side_step_is_the_training_forward(setup):
    model, tok, reqs, _ = setup
    gen = GenerationConfig(max_new_tokens=N_NEW, side_step="training")
    results = Generator(model, gen, tok)(reqs)
    for req, res in zip(reqs, results):
        ids, slots, feats = oracle(model, req, N_NEW, training=True)
        assert res.token_ids + ([2] if res.finish_reason == "stop" else []) == ids
        for b, p in zip(BEGIN_TOKENS, PLACEHOLDERS):  # every begin token is followed by its placeholder
            at = [i for i, t in enumerate(ids[:-1]) if t == b]
            assert all(ids[i + 1] == p for i in at)
        assert_heads_close(res.raw, oracle_heads(model, req, slots, feats))
    assert any("<box_begin><boxes>" in r.text or "<track_begin><tracking>" in r.text for r in results)


def test_one_compile_per_bucket():
    model = TPOModel(CFG, rngs=nnx.Rngs(1))
    tok = MultimodalTokenizer(num_visual_tokens=CFG.num_visual_tokens)
    g = Generator(model, GenerationConfig(max_new_tokens=4))
    short, longer = make_requests(CFG, tok, ["a", "a much longer question about the video"], seed=1)
    assert len(short.input_ids) != len(longer.input_ids)
    g([short])
    before = compiled_decode._cache_size()
    g([longer])  # another prompt length, same bucket (64) and batch size: no new compile
    Generator(model, GenerationConfig(max_new_tokens=4))([short])  # a new Generator of the same model: none
    assert compiled_decode._cache_size() == before
    g([make_requests(CFG, tok, ["word " * 60], seed=1)[0]])  # bucket 128: one more
    assert compiled_decode._cache_size() == before + 1


def test_beam_search(setup):
    model, tok, reqs, results = setup
    one = Generator(model, GenerationConfig(max_new_tokens=N_NEW, strategy="beam", num_beams=1))(reqs)
    assert [r.token_ids for r in one] == [r.token_ids for r in results]
    # two beams, two steps: the best two-token continuation among the 2 best first tokens, by full forwards
    req = reqs[0]
    (res,) = Generator(model, GenerationConfig(max_new_tokens=2, strategy="beam", num_beams=2,
                                               length_penalty=0.0))([req])
    fwd = _forward(model)
    prompt = model.embed_inputs(jnp.asarray(req.input_ids)[None], visual_mask=jnp.asarray(req.visual_mask)[None],
                                frames=jnp.asarray(req.frames)[None])
    lp0 = jax.nn.log_softmax(fwd(prompt)[1])
    best = None
    for t0 in np.argsort(-np.asarray(lp0))[:2]:
        lp1 = jax.nn.log_softmax(fwd(jnp.concatenate([prompt, model.llm.embed(jnp.asarray([[t0]]))], 1))[1])
        t1 = int(jnp.argmax(lp1))
        score = float(lp0[t0] + lp1[t1])
        best = max(best or (score, [int(t0), t1]), (score, [int(t0), t1]))
    assert res.token_ids == best[1]


def test_sampling_and_stop_ids(setup):
    model, tok, reqs, results = setup
    sample = GenerationConfig(max_new_tokens=N_NEW, strategy="sample", temperature=0.8, top_p=0.9)
    a = Generator(model, sample)(reqs, rng=jax.random.key(0))
    b = Generator(model, sample)(reqs, rng=jax.random.key(0))
    c = Generator(model, sample)(reqs, rng=jax.random.key(1))
    assert [r.token_ids for r in a] == [r.token_ids for r in b] != [r.token_ids for r in c]
    top1 = Generator(model, GenerationConfig(max_new_tokens=N_NEW, strategy="sample", top_k=1))(
        reqs, rng=jax.random.key(5))
    assert [r.token_ids for r in top1] == [r.token_ids for r in results]
    with pytest.raises(GenerationError, match="explicit rng"):
        Generator(model, sample)(reqs)
    stop = results[0].token_ids[3]
    (r,) = Generator(model, GenerationConfig(max_new_tokens=N_NEW, stop_ids=(stop,)))(reqs[:1])
    first = results[0].token_ids.index(stop)
    assert r.token_ids == results[0].token_ids[:first] and r.finish_reason == "stop"


def test_precomputed_temporal_features(setup, tmp_path):
    model, tok, reqs, results = setup
    i = next(j for j, r in enumerate(results) if r.temporal is not None)
    t = CFG.heads.temporal
    rng = np.random.default_rng(3)
    video, text = rng.normal(size=(6, t.vid_dim - 2)), rng.normal(size=(5, t.txt_dim))
    np.savez(tmp_path / "f.npz", video_feats=video, text_feats=text, duration=np.float32(12.0))
    feats = load_temporal_features(str(tmp_path / "f.npz"), CFG)
    assert feats.video.shape == (6, t.vid_dim) and np.allclose(feats.video[:, -2:], [[j / 6, (j + 1) / 6]
                                                                                     for j in range(6)])
    req = reqs[i]
    (res,) = Generator(model, GenerationConfig(max_new_tokens=N_NEW), tok)(
        [GenerationRequest(**{**req.__dict__, "temporal_features": feats})])
    assert res.token_ids == results[i].token_ids
    assert res.temporal["duration"] == 12.0 and len(res.temporal["saliency"]) == 6
    h = jnp.asarray(res.raw["task_hidden"][4])[None]  # the temporal slot K = max_boxes = 4
    pad = lambda x, n: np.concatenate([x, np.zeros((n - len(x), x.shape[1]))])[None]  # noqa: E731
    o = model.temporal_head(jnp.asarray(pad(feats.text, t.max_text_len)),
                            jnp.asarray([[1.0] * 5 + [0.0] * (t.max_text_len - 5)]),
                            jnp.asarray(pad(feats.video, 8)), jnp.asarray([[1.0] * 6 + [0.0] * 2]), h)
    assert np.abs(res.raw["pred_spans"] - np.asarray(o["pred_spans"][0])).max() <= TOL
    np.savez(tmp_path / "bad.npz", video_feats=video[:, :3], text_feats=text)
    with pytest.raises(GenerationError, match=r"bad.npz: key 'video_feats' has shape \(6, 3\)"):
        load_temporal_features(str(tmp_path / "bad.npz"), CFG)


def test_bad_input(setup):
    model, tok, reqs, _ = setup
    g = Generator(model, GenerationConfig(max_new_tokens=8))
    long = GenerationRequest(np.ones(CFG.llm.max_position + 5, np.int32))
    with pytest.raises(GenerationError, match="longer than the model's context of 2048"):
        g([long])
    with pytest.raises(GenerationError, match="lower max_new_tokens"):
        g([GenerationRequest(np.ones(CFG.llm.max_position - 4, np.int32))])
    image = make_requests(CFG, tok, ["x"], image=True)[0]
    with pytest.raises(GenerationError, match="mixes frame shapes"):
        g([reqs[0], image])
    tf = TemporalFeatures(np.zeros((2, 34)), np.zeros((1, 64)), np.ones(2), np.ones(1))
    with pytest.raises(GenerationError, match="temporal features need a video"):
        g([GenerationRequest(**{**image.__dict__, "temporal_features": tf})])
    with pytest.raises(GenerationError, match="strategy"):
        GenerationConfig(strategy="nucleus").validate()


# --- against PyTorch transformers ----------------------------------------------------------------------------------

HF_QUESTIONS = ["What is happening?", "Describe the clip.", "Where is the red square?", "Count the objects.",
                "Is anything moving?", "What colour is the background?", "Summarise the video in one sentence.",
                "Who is there?", "When does the square stop?", "Give the timestamp of the jump."]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A tiny random transformers Mistral (vocab 32007), converted with tpo-convert's `convert_hf` into the LLM of a
    tiny TPO model (LoRA off); `<box_begin>` planted in lm_head (before conversion) to trigger a side step."""
    torch = pytest.importorskip("torch")
    from tpo_jax.checkpoints.convert import convert_hf
    from tpo_jax.checkpoints.orbax_io import load_params
    from test_parity_mistral import torch_mistral
    cfg = C.replace(CFG, **{"lora.enabled": False}).validate()
    hf = torch_mistral(cfg.llm)
    model = TPOModel(cfg, rngs=nnx.Rngs(2))
    tok = MultimodalTokenizer(num_visual_tokens=cfg.num_visual_tokens)
    reqs = make_requests(cfg, tok, HF_QUESTIONS, seed=2)
    root = tmp_path_factory.mktemp("hf")

    def convert(name):
        hf.save_pretrained(root / name)
        convert_hf(root / name, root / f"{name}_converted")
        nnx.update(model.llm, load_params(root / f"{name}_converted", nnx.state(model.llm, nnx.Param), prefix="llm"))

    convert("plain")
    embeds = [torch.tensor(np.asarray(model.embed_inputs(
        jnp.asarray(r.input_ids)[None], visual_mask=jnp.asarray(r.visual_mask)[None],
        frames=jnp.asarray(r.frames)[None]))) for r in reqs]
    with torch.no_grad():
        first = hf_generate(hf, embeds[0], N_NEW)
        w = hf.lm_head.weight
        w[C.BOX_BEGIN_ID] = 1.01 * w[first[3]]
    convert("planted")  # the lm_head changes, the embeddings (and so `embeds`) do not
    return hf, model, tok, reqs, embeds


def hf_generate(hf, embeds, n_new):
    import torch
    with torch.no_grad():
        out = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                          max_new_tokens=n_new, do_sample=False, num_beams=1, eos_token_id=2, pad_token_id=0)
    ids = out[0].tolist()
    return ids[:ids.index(2)] if 2 in ids else ids


@pytest.mark.slow
def test_greedy_text_equals_transformers_generate(hf_pair):
    hf, model, tok, reqs, embeds = hf_pair
    ours = Generator(model, GenerationConfig(max_new_tokens=N_NEW), tok)(reqs)  # one left-padded batch of 10
    for e, r in zip(embeds, ours):
        ref = hf_generate(hf, e, N_NEW)
        assert r.token_ids == ref and r.text == tok.decode(ref, skip_special_tokens=True)
    assert C.BOX_BEGIN_ID in ours[0].token_ids


@pytest.mark.slow
def test_side_step_hidden_equals_torch(hf_pair):
    """§8.3 in PyTorch: decode with the cache; at `<box_begin>` one step with the box-token vector on a copy of the
    cache (the copy is dropped), output_hidden_states[-1] of that step."""
    import copy
    import inspect
    import torch
    hf, model, tok, reqs, embeds = hf_pair
    new_api = "cache" in inspect.signature(hf.forward).parameters  # transformers >= 5.2x renamed past_key_values

    def step(cache=None, **kw):
        if cache is not None:
            kw["cache" if new_api else "past_key_values"] = cache
        out = hf(use_cache=True, **kw)
        return out, (out.cache if new_api else out.past_key_values)

    (ours,) = Generator(model, GenerationConfig(max_new_tokens=N_NEW), tok)(reqs[:1])
    box = torch.tensor(np.asarray(model.box_token[...]))[None, None]
    with torch.no_grad():
        out, cache = step(inputs_embeds=embeds[0])
        token = int(out.logits[0, -1].argmax())
        while token != C.BOX_BEGIN_ID:
            out, cache = step(cache, input_ids=torch.tensor([[token]]))
            token = int(out.logits[0, -1].argmax())
        side, _ = step(copy.deepcopy(cache), inputs_embeds=box, output_hidden_states=True)
        ref = side.hidden_states[-1][0, -1].numpy()
    assert ours.raw["task_slots"][0]
    assert np.abs(ours.raw["task_hidden"][0] - ref).max() <= 1e-4

"""`tpo-infer` (tpo_jax/cli/infer.py): a converted checkpoint and a tpo-train work directory give the answer and head
outputs of `generate` on the same weights; JSON, overlays, batches, chat; bad input is exit 2 with one line."""

import dataclasses
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from tpo_jax import config as C
from tpo_jax.checkpoints.convert import convert_videochat
from tpo_jax.checkpoints.export import ParamSet, export_videochat
from tpo_jax.checkpoints.manager import CheckpointManager
from tpo_jax.cli import infer
from tpo_jax.data.video import encode_mp4
from tpo_jax.generate import GenerationConfig, Generator
from tpo_jax.model import TPOModel
from tpo_jax.tokenizer import MultimodalTokenizer
from tpo_jax.train.run_config import get_run_config
from tpo_jax.train.workdir import params_of_groups, trained_groups

CFG = C.get_config("tiny")
QUESTION = "Where is the red square?"
N_NEW = 8


def clip(n=24, h=48, w=64):
    frames = np.full((n, h, w, 3), 90, np.uint8)
    for t in range(n):
        frames[t, 10:22, 4 + 2 * t:16 + 2 * t] = (220, 30, 30)
    return frames


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    (root / "clip.mp4").write_bytes(encode_mp4(clip(), fps=8.0))
    Image.fromarray(clip()[0]).save(root / "frame.jpg")
    model = TPOModel(CFG, rngs=nnx.Rngs(0))
    head = model.sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias  # the tracked object is "present"
    head[...] = head[...] + 4.0
    tok = MultimodalTokenizer(num_visual_tokens=CFG.num_visual_tokens)
    item = infer.Item(QUESTION, str(root / "clip.mp4"), True)
    req = infer.make_request(CFG, tok, item, infer.load_media(CFG, item), "demo")
    kernel = model.llm.lm_head.kernel
    for token_id, step in ((C.BOX_BEGIN_ID, 1), (C.TIME_BEGIN_ID, 3), (C.TRACK_BEGIN_ID, 5)):
        a = Generator(model, GenerationConfig(max_new_tokens=N_NEW))([req])[0].token_ids[step]
        kernel[...] = kernel[...].at[:, token_id].set(1.01 * kernel[...][:, a])
    (expected,) = Generator(model, GenerationConfig(max_new_tokens=N_NEW), tok)([req])
    assert expected.region and expected.temporal and expected.track
    state = nnx.state(model, nnx.Param)
    # a converted checkpoint: export to the released layout, convert back with tpo-convert's converter
    export_videochat(ParamSet.from_state(state, CFG), root / "released")
    convert_videochat(root / "released", root / "converted", CFG)
    # a tpo-train work directory: config.json + a stage3 checkpoint of the groups trained up to stage 3
    run = dataclasses.replace(get_run_config("tiny"), model=CFG).validate()  # seed 0: the same initial model
    (root / "workdir").mkdir()
    (root / "workdir" / "config.json").write_text(json.dumps(run.to_dict()))
    with CheckpointManager(root / "workdir" / "stage3" / "checkpoints") as mngr:
        mngr.save(run.stage3.steps, params=params_of_groups(state, {}, trained_groups(run, "stage3")),
                  state={"step": np.int32(run.stage3.steps)}, meta={"stage": "stage3"}, config=run.to_dict(),
                  force=True)
    return root, expected


def cli(*argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return infer.main([str(a) for a in argv])


def check_result(got: dict, expected):
    assert got["token_ids"] == expected.token_ids and got["answer"] == expected.text
    assert np.allclose(got["region"][0]["box"], expected.region[0]["box"], atol=1e-3)
    assert np.allclose(got["temporal"]["spans"], expected.temporal["spans"], atol=1e-4)
    assert np.allclose(got["temporal"]["saliency"], expected.temporal["saliency"], atol=1e-5)
    assert np.allclose(got["track"]["prompt"], expected.track["prompt"], atol=1e-5)


@pytest.mark.parametrize("kind,overlay", [("converted", "out.png"), ("workdir", "out.gif")])
def test_video_prompt(env, kind, overlay, capsys):
    root, expected = env
    out = root / f"{kind}.json"
    assert cli("--checkpoint", root / kind, "--video", root / "clip.mp4", "--prompt", QUESTION,
               "--max-new-tokens", N_NEW, "--output", out, "--overlay", root / overlay) == 0
    doc = json.loads(out.read_text())
    (got,) = doc["results"]
    check_result(got, expected)
    assert got["media"]["frame_size"] == [48, 64] and got["media"]["duration"] == 3.0
    assert doc["checkpoint"]["kind"] == kind
    printed = capsys.readouterr().out
    assert f"A: {expected.text}" in printed and "box:" in printed and "span:" in printed and "track:" in printed
    img = Image.open(root / overlay)
    assert img.width == 64 and img.height == 48 + 56
    assert getattr(img, "n_frames", 1) == (CFG.vit.num_frames if overlay.endswith(".gif") else 1)


def test_tracked_answer_has_sam2_masks_of_every_frame(env):
    """A `<track_begin>` answer's masks: SAM2 propagation of the mask head's prompt over every source frame (24),
    resized to the video (torch's bilinear resize as the reference), as COCO RLE in the JSON."""
    import torch

    from tpo_jax.data.rle import rle_decode
    from tpo_jax.data.video import read_video_frames
    from tpo_jax.sam2.frames import sam2_frames
    from tpo_jax.sam2.video import fill_holes
    from tpo_jax.train.load import load_model

    root, expected = env
    out = root / "masks.json"
    assert cli("--checkpoint", root / "converted", "--video", root / "clip.mp4", "--prompt", QUESTION,
               "--max-new-tokens", N_NEW, "--output", out) == 0
    track = json.loads(out.read_text())["results"][0]["track"]
    assert track["prompt_source"] == "track_embed"
    masks = np.stack([rle_decode(r) for r in track["masks"]])
    assert masks.shape == (24, 48, 64)
    model, _ = load_model(str(root / "converted"))
    frames = sam2_frames(read_video_frames(str(root / "clip.mp4"), 24)[0], CFG.sam2.image_size)
    prompt = np.asarray(track["prompt"], np.float32)
    ref = nnx.jit(lambda m, f, p: m.sam2.propagate(f, p))(model, frames[None], prompt[None])
    low = fill_holes(np.asarray(ref.masks[0]), CFG.sam2.fill_hole_area)
    logits = torch.nn.functional.interpolate(torch.from_numpy(low)[:, None], size=(48, 64), mode="bilinear",
                                             align_corners=False)[:, 0].numpy()
    decided = np.abs(logits) > 1e-4  # pixels whose sign both sides agree on to float rounding
    np.testing.assert_array_equal(masks[decided], logits[decided] > 0)
    assert 0 < masks.mean() < 1  # the object is found on some pixels of some frames, not everywhere
    np.testing.assert_allclose(track["object_scores"], np.asarray(ref.object_score_logits[0]), atol=1e-5)
    for m, box in zip(masks, track["mask_boxes"]):
        ys, xs = np.nonzero(m)
        assert box == (None if not len(ys) else [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


@pytest.mark.slow
def test_batch_and_chat(env, monkeypatch, capsys):
    root, expected = env
    lines = [{"prompt": QUESTION, "video": "clip.mp4", "id": "a"}, {"prompt": "What is this?", "image": "frame.jpg"},
             {"prompt": "And now?"}]
    (root / "batch.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    out = root / "batch.json"
    capsys.readouterr()
    assert cli("--checkpoint", root / "converted", "--batch", root / "batch.jsonl", "--video", root / "clip.mp4",
               "--max-new-tokens", N_NEW, "--output", out) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["id"] for r in results] == ["a", "2", "3"] and [r["media"]["kind"] for r in results] == \
        ["video", "image", "video"]
    check_result(results[0], expected)
    assert results[1]["media"]["duration"] == 0.0 and results[2]["prompt"] == "And now?"
    out = root / "chat.json"
    capsys.readouterr()
    assert cli("--checkpoint", root / "converted", "--video", root / "clip.mp4", "--chat", "--max-new-tokens", 4,
               "--output", out, stdin=f"{QUESTION}\n\nIs it moving?\n/quit\n", monkeypatch=monkeypatch) == 0
    turns = json.loads(out.read_text())["results"]
    assert [t["prompt"] for t in turns] == [QUESTION, "Is it moving?"]
    assert capsys.readouterr().out.count("A: ") == 2
    assert cli("--checkpoint", root / "converted", "--image", root / "frame.jpg", "--prompt", "What is it?",
               "--strategy", "sample", "--top-p", "0.9", "--max-new-tokens", 4, "--output", "-") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["generation"]["strategy"] == "sample" and len(doc["results"][0]["token_ids"]) <= 4


def bad_cases(root):
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    np.savez(root / "feats.npz", video_feats=np.zeros((4, 32)), text_feats=np.zeros((3, 64)))
    ask = ["--prompt", QUESTION]
    return {
        "unreadable video": (["--checkpoint", root / "converted", "--video", root / "broken.mp4", *ask],
                             "broken.mp4"),
        "prompt longer than the context": (["--checkpoint", root / "converted", "--video", root / "clip.mp4",
                                            "--prompt", "word " * 2100], "longer than the model's context of 2048"),
        "converted checkpoint of another config": (["--checkpoint", root / "converted", "--video", root / "clip.mp4",
                                                    "--set", "llm.num_layers=3", *ask],
                                                   "holds a model of another config: llm.num_layers: 2"),
        "work directory of another config": (["--checkpoint", root / "workdir", "--video", root / "clip.mp4",
                                              "--set", "model.vit.depth=3", *ask],
                                             "holds a model of another config: model.vit.depth: 2"),
        "image given as the video": (["--checkpoint", root / "converted", "--video", root / "frame.jpg", *ask],
                                     "an image where a video is needed"),
        "image with temporal features": (["--checkpoint", root / "converted", "--image", root / "frame.jpg",
                                          "--temporal-features", root / "feats.npz", *ask],
                                         "temporal features need a video"),
        "not a checkpoint": (["--checkpoint", root, "--video", root / "clip.mp4", *ask], "neither a tpo-train"),
    }


@pytest.mark.parametrize("case", ["unreadable video", "prompt longer than the context",
                                  "converted checkpoint of another config", "work directory of another config",
                                  "image given as the video", "image with temporal features", "not a checkpoint"])
def test_bad_input_is_one_line_and_exit_2(env, case, capsys):
    argv, expected = bad_cases(env[0])[case]
    assert cli(*argv, "--output", env[0] / "never.json") == 2
    err = capsys.readouterr().err
    assert err.startswith("tpo-infer: error: ") and err.count("\n") == 1 and expected in err, err
    assert not os.path.exists(env[0] / "never.json")


def test_command_line_process(env):
    root = env[0]
    bad_cases(root)
    proc = subprocess.run([sys.executable, "-m", "tpo_jax.cli.infer", "--checkpoint", str(root / "converted"),
                           "--video", str(root / "broken.mp4"), "--prompt", "hi"], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


def test_validation_example_with_truth(env, capsys):
    """`--example region:N` answers the N-th validation row exactly as generation-mode evaluation decodes it,
    and writes its ground-truth box (scaled to the drawn frames) beside the prediction."""
    from tpo_jax.data.pipeline import eval_batches
    from tpo_jax.train.evaluate_generate import generation_config, make_requests
    from tpo_jax.train.load import load_model
    from tpo_jax.train.run_config import load_run_config

    root, _ = env
    out = root / "example.json"
    assert cli("--checkpoint", root / "workdir", "--example", "region:3", "--max-new-tokens", N_NEW,
               "--output", out, "--overlay", root / "example.png") == 0
    doc = json.loads(out.read_text())
    run = load_run_config(str(root / "workdir" / "config.json"))
    batch = eval_batches(run.data, CFG, split=run.eval.split, num_examples=4, tasks=("region",))["region"][0]
    model, _ = load_model(str(root / "workdir"))
    gen = dataclasses.replace(generation_config(len(batch["labels"][3])), max_new_tokens=N_NEW)
    tok = MultimodalTokenizer(num_visual_tokens=CFG.num_visual_tokens)
    (expected,) = Generator(model, gen, tok)([make_requests(batch)[3]])
    assert doc["result"]["token_ids"] == expected.token_ids
    scale = infer.EXAMPLE_SIZE // CFG.vit.img_size  # the drawn frames: the model's, enlarged
    np.testing.assert_allclose(doc["truth"]["boxes"][0], batch["region_boxes"][3, 0] * CFG.vit.img_size * scale,
                               rtol=1e-6)
    assert "truth:" in capsys.readouterr().out
    assert Image.open(root / "example.png").width == CFG.vit.img_size * scale
    # an example needs a work directory (its data config) and a known task
    assert cli("--checkpoint", root / "converted", "--example", "region:0") == 2
    assert cli("--checkpoint", root / "workdir", "--example", "boxes:0") == 2
    assert "--example" in capsys.readouterr().err

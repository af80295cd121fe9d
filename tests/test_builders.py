"""The "sampled_jpeg" storage of `tpo_jax.data.record_codec` (frames sampled and resized at build time) against a
direct decode of the source video, and the `instruction` field from the annotation to the token ids."""

import json

import numpy as np
import pytest
from PIL import Image

from tpo_jax.data import pipeline as P
from tpo_jax.data.builders import TpoRecords, build
from tpo_jax.data.conversation import ExampleSpec, build_example
from tpo_jax.data.formats import read_records
from tpo_jax.data.prompts import encode_answer_prompt
from tpo_jax.data.record_codec import (DEFAULT_NUM_FRAMES, DEFAULT_SIZE, encode_media, example_to_record,
                                       record_to_example)
from tpo_jax.data.records import Record
from tpo_jax.data.stored_source import open_task_sources
from tpo_jax.data.video import (IMAGENET_STD, MediaError, decode_frame_dir, decode_video, encode_mp4, load_media,
                        read_video_frames)
from tpo_jax import config as C
from tpo_jax.tokenizer import MultimodalTokenizer

CFG = C.get_config("tiny")  # 4 frames of 32 x 32
FPS = 30000 / 1001  # NTSC rate: times index / fps are not short decimals
# mean |stored − direct| in uint8 levels: the JPEG q90 error, measured 3.5 at 32² and 1.5 at 224² on
# `smooth_clip`; the frame next to the sampled one would be 17 levels off
TOL_LEVELS = 5.0


def smooth_clip(n=45, h=48, w=64):
    """A moving smooth colour texture (natural-video-like, little high-frequency chroma)."""
    t = np.arange(n)[:, None, None]
    y, x = np.mgrid[0:h, 0:w][:, None]
    r = 128 + 100 * np.sin(2 * np.pi * (x + 2 * t) / 40)
    g = 128 + 100 * np.cos(2 * np.pi * (y + t) / 30)
    b = 128 + 80 * np.sin(2 * np.pi * (x + y - 3 * t) / 50)
    return np.stack(np.broadcast_arrays(r, g, b), -1).round().clip(0, 255).astype(np.uint8)


def levels(a, b):
    """Mean |a − b| of two normalised frame arrays, in uint8 levels."""
    return float(np.mean(np.abs(np.asarray(a) - np.asarray(b)) * IMAGENET_STD * 255))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "v1.mp4").write_bytes(encode_mp4(smooth_clip(), FPS, keyint=12))
    Image.fromarray(smooth_clip(1, 30, 40)[0]).save(root / "img.png")
    (root / "sta.txt").write_text("v1 0.2 1.0##a shape moves\n")
    (root / "it.json").write_text(json.dumps([{"video": "v1.mp4", "QA": [
        {"i": "Watch the video carefully.", "q": "At which timestamp does it start?", "a": "At once."}]}]))
    (root / "ref.jsonl").write_text(json.dumps({"image": "img.png", "expression": "the top left",
                                                "bbox": [0, 0, 20, 15], "width": 40, "height": 30}) + "\n")
    inputs = [{"path": str(root / "sta.txt"), "format": "charades_sta", "media_root": str(root),
               "options": {"durations": {"v1": 45 / FPS}}},
              {"path": str(root / "it.json"), "format": "videochat2", "media_root": str(root)},
              {"path": str(root / "ref.jsonl"), "format": "refcoco", "media_root": str(root)}]
    builder = TpoRecords(inputs, model_config=CFG, data_dir=str(root / "out"))
    assert builder.storage == "sampled_jpeg" and (builder.num_frames, builder.size) == (4, 32)
    return root, build(builder)


def test_stored_frames_and_times_equal_a_direct_decode(built):
    root, path = built
    rec = open_task_sources([path], "train", ["temporal"])["temporal"][0]
    direct = decode_video(str(root / "v1.mp4"), 4, 32)
    assert rec.video is None and rec.frames.shape == (4, 32, 32, 3) and rec.frames.dtype == np.uint8
    np.testing.assert_array_equal(rec.frame_times, direct.timestamps)  # bit-exact, not rounded
    assert rec.fps == direct.fps == FPS and rec.source_duration == direct.duration == 45 / FPS
    media = load_media(rec, 4, 32)
    np.testing.assert_array_equal(media.timestamps, direct.timestamps)
    np.testing.assert_array_equal(media.indices, direct.indices)
    np.testing.assert_array_equal(media.indices, [5, 16, 27, 38])  # ⌊(a + b) / 2⌋ of segments of 45 frames
    assert (media.duration, media.fps) == (direct.duration, direct.fps)
    err = levels(media.frames, direct.frames)
    assert 0 < err < TOL_LEVELS, err
    with pytest.raises(MediaError, match=r"stored 4 sampled frames of 32x32, the model takes 8 of 32x32.*rebuild"):
        load_media(rec, 8, 32)


def test_pipeline_batches_from_sampled_storage(built):
    root, path = built
    direct = decode_video(str(root / "v1.mp4"), 4, 32)
    batch = next(P.make_train_iterator(P.DataConfig(source=path, batch_size=2, weights={"temporal": 1}), CFG,
                                       "stage2_temporal"))
    for frames in batch["frames"]:
        assert levels(frames, direct.frames) < TOL_LEVELS
    np.testing.assert_allclose(batch["spans"][0, 0], [0.6 / (45 / FPS), 0.8 / (45 / FPS)], rtol=1e-6)
    # the conversation asks for timestamps: the prompt shows the direct decode's times
    conv = next(P.make_train_iterator(P.DataConfig(source=path, batch_size=1, weights={"conversation": 1}), CFG,
                                      "stage3"))
    text = MultimodalTokenizer(num_visual_tokens=CFG.num_visual_tokens).decode(conv["input_ids"][0])
    times = ", ".join(str(round(float(t), 1)) for t in direct.timestamps)
    assert times == "0.2, 0.5, 0.9, 1.3" and f"4 frames sampled at {times} seconds" in text
    assert text.index("Watch the video carefully.") < text.index("[INST]")


def test_images_stay_one_file(built):
    root, path = built
    rec = open_task_sources([path], "train", ["region"])["region"][0]
    assert rec.image == (root / "img.png").read_bytes() and rec.frame_times is None
    np.testing.assert_allclose(rec.boxes, [[0, 0, 0.5, 0.5]])


def test_defaults_are_the_reference_sampling_and_size(tmp_path):
    assert (DEFAULT_NUM_FRAMES, DEFAULT_SIZE) == (16, 224)
    clip = smooth_clip(n=30)
    mp4 = encode_mp4(clip, 10.0)
    stored = encode_media(Record(id="d", task="mc", video=mp4), "sampled_jpeg")
    assert stored["media_kind"] == "frames_jpeg" and len(stored["media"]) == 16
    rec = example_to_record(record_to_example(Record(id="d", task="mc", video=mp4, question="q", options=("a", "b"),
                                                     mc_answer=0), "sampled_jpeg"))
    direct = decode_video(mp4, 16, 224)
    _, indices, *_ = read_video_frames(mp4, 16)
    np.testing.assert_array_equal(rec.frame_times, indices / 10.0)
    assert rec.frames.shape == (16, 224, 224, 3) and rec.fps == 10.0 and rec.source_duration == 3.0
    assert levels(load_media(rec).frames, direct.frames) < TOL_LEVELS
    # a frame folder (MeViS layout) is sampled like tpo_jax.data.video.decode_frame_dir
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, f in enumerate(clip[:7]):
        Image.fromarray(f).save(folder / f"{k:05d}.png")
    rec = example_to_record(record_to_example(
        Record(id="f", task="mask", video=str(folder), fps=6.0, track_boxes=np.array([[0, 0, 1, 1.]])),
        "sampled_jpeg", num_frames=4, size=32))
    ref = decode_frame_dir(str(folder), 6.0, 4, 32)
    media = load_media(rec, 4, 32)
    np.testing.assert_array_equal(media.timestamps, ref.timestamps)
    np.testing.assert_array_equal(media.indices, ref.indices)
    assert media.duration == ref.duration and levels(media.frames, ref.frames) < TOL_LEVELS


def test_videochat2_instruction_is_a_field_placed_before_the_first_inst(tmp_path):
    path = tmp_path / "it.json"
    path.write_text(json.dumps([
        {"video": "v.mp4", "QA": [{"i": " Watch carefully. ", "q": "What moves?", "a": "A dot."},
                                  {"i": "ignored", "q": "Where?", "a": "Left."}]},
        {"video": "v.mp4", "QA": [{"i": "Describe the video.", "q": "", "a": "A dot moves."}]},
        {"video": "v.mp4", "QA": [{"q": "", "a": "x"}]}]))
    (rec, rec2), bad = read_records(path, "videochat2", str(tmp_path))
    assert rec.instruction == "Watch carefully." and rec.turns == [("What moves?", "A dot."), ("Where?", "Left.")]
    assert rec2.instruction == "Describe the video." and rec2.turns == [("", "A dot moves.")]
    assert len(bad) == 1 and "neither a question 'q' nor an instruction 'i'" in str(bad[0])

    tok = MultimodalTokenizer(num_visual_tokens=CFG.num_visual_tokens)
    spec = ExampleSpec.from_model(CFG, 128)
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    plain = Record(id="c", task="conversation", frames=frames, fps=1.0, turns=[("What moves?", "A dot.")])
    instr = Record(id="c", task="conversation", frames=frames, fps=1.0, turns=[("What moves?", "A dot.")],
                   instruction="Watch carefully.")
    a, b = (build_example(r, load_media(r, 4, 32), spec, tok) for r in (plain, instr))
    # head = the library form's first segment (MODEL-SPEC §4.3: instruction + "[INST] <Video>"), then the
    # placeholders; everything after the placeholders is the plain example's
    ref = encode_answer_prompt(tok, "What moves?", instruction="Watch carefully.\n").input_ids
    start = int(np.flatnonzero(b["visual_mask"])[0])
    assert start > 7 == int(np.flatnonzero(a["visual_mask"])[0])
    np.testing.assert_array_equal(b["input_ids"][:start + 8], ref[:start + 8])
    shift = start - 7
    np.testing.assert_array_equal(b["input_ids"][start:], a["input_ids"][7:128 - shift])
    np.testing.assert_array_equal(b["labels"][start:], a["labels"][7:128 - shift])
    assert b["answer_start"] == a["answer_start"] + shift
    # stored and read back with the record
    stored = example_to_record(record_to_example(instr, "raw"))
    assert stored.instruction == "Watch carefully."


# --- hostile input at build time (issue 26) ------------------------------------------------------------------------


def _refcoco_inputs(tmp_path, good: int, bad_lines: list[str], extra: list[dict] = ()):
    import os

    root = tmp_path / "media"
    root.mkdir()
    Image.fromarray(smooth_clip(1, 30, 40)[0]).save(root / "img.png")
    entry = {"image": "img.png", "expression": "it", "bbox": [4, 3, 20, 10], "width": 40, "height": 30}
    lines = bad_lines + [json.dumps(dict(entry, id=f"r{k}")) for k in range(good)]
    lines += [json.dumps(dict(entry, **e)) for e in extra]
    ann = tmp_path / "ref.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    (tmp_path / "outside.png").write_bytes((root / "img.png").read_bytes())
    os.symlink(tmp_path / "outside.png", root / "escape.png")
    return [{"path": str(ann), "format": "refcoco", "media_root": str(root)}], ann


def test_bad_records_first_do_not_stop_a_healthy_build(tmp_path):
    # 6 malformed lines before 200 good ones: 6 / 206 = 2.9 % < 5 %; judged against all records of the file
    bad = ["{not json", "[" * 5000 + "]" * 5000, '{"id": ' + "9" * 5000 + "}", '{"image": 5}',
           json.dumps({"image": "img.png", "expression": "x", "bbox": ["1", 2, 3, 4], "width": 40, "height": 30}),
           json.dumps({"image": "../outside.png", "expression": "x", "bbox": [1, 2, 3, 4], "width": 40, "height": 30})]
    inputs, ann = _refcoco_inputs(tmp_path, 200, bad)
    builder = TpoRecords(inputs, data_dir=str(tmp_path / "out"))
    path = build(builder)
    meta = builder.info.metadata
    assert meta["bad_records"] == 6 and meta["records_seen"] == 206
    assert meta["bad_by_kind"] == {"parse": 3, "bad_field": 2, "path": 1}
    assert len(open_task_sources([path], "train", ["region"])["region"]) == 200


def test_build_decodes_media_and_names_the_worst_offenders(tmp_path):
    from tpo_jax.data.poisoned import bomb_png
    from tpo_jax.data.records import DataError

    extra = [{"id": "escape", "image": "escape.png"}, {"id": "bomb", "image": "bomb.png"},
             {"id": "video", "image": "clip.mp4"}, {"id": "gone", "image": "missing.png"}]
    inputs, ann = _refcoco_inputs(tmp_path, 3, [], extra)
    root = tmp_path / "media"
    (root / "bomb.png").write_bytes(bomb_png(9000, 9000))  # passed the build before: stored without decoding
    (root / "clip.mp4").write_bytes((root / "img.png").read_bytes())
    builder = TpoRecords(inputs, data_dir=str(tmp_path / "out"), max_bad_fraction=0.6)
    path = build(builder)
    assert builder.info.metadata["bad_by_kind"] == {"path": 1, "media_budget": 1, "media_kind": 1, "media_missing": 1}
    assert len(open_task_sources([path], "train", ["region"])["region"]) == 3
    with pytest.raises(DataError) as e:
        build(TpoRecords(inputs, data_dir=str(tmp_path / "out2"), max_bad_fraction=0.2))
    msg = str(e.value)
    assert msg.startswith("2 of 7 records were bad, more than max_bad_fraction=0.2; by kind: ") or \
        msg.startswith("4 of 7") or msg.startswith("3 of 7"), msg
    assert "path 1 (e.g. " in msg and "\n" not in msg


def test_tpo_build_data_builds_a_healthy_file_and_names_offenders_of_a_bad_one(tmp_path, capfd):
    from tpo_jax.cli import build_data

    bad = ["{not json"] * 6
    inputs, ann = _refcoco_inputs(tmp_path, 200, bad)
    (tmp_path / "inputs.json").write_text(json.dumps(inputs))
    rc = build_data.main(["records", "--data-dir", str(tmp_path / "out"), "--inputs", str(tmp_path / "inputs.json")])
    out, err = capfd.readouterr()
    assert rc == 0 and out.strip().endswith("1.1.0"), err[-2000:]
    strict = build_data.main(["records", "--data-dir", str(tmp_path / "out2"), "--inputs", str(tmp_path / "inputs.json"),
                              "--max-bad-fraction", "0.01"])
    out, err = capfd.readouterr()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert strict == 2 and len(errors) == 1, err[-2000:]
    assert errors[0].startswith("tpo-build-data: error: 6 of 206 records were bad, more than max_bad_fraction=0.01; "
                                f"by kind: parse 6 (e.g. '{ann}:1', '{ann}:2', '{ann}:3')"), errors[0]

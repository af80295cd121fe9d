"""Annotation parsers → Records on tiny fixtures (the examples of docs/data.md), bad entries → one RecordError
naming file:line, and COCO RLE against hand-encoded strings and NumPy run lengths."""

import itertools
import json

import numpy as np
import pytest
from PIL import Image

from tpo_jax.data import rle as R
from tpo_jax.data.formats import iter_records, normalise_box, read_records
from tpo_jax.data.records import Record, RecordError

# --- fixtures (shown in docs/data.md) ----------------------------------------------------------------------------

VIDEOCHAT2 = [
    {"video": "clips/v1.mp4", "QA": [
        {"i": "Watch the video carefully.", "q": "What is the man doing?", "a": "He is slicing bread."},
        {"q": "With what?", "a": "A knife."}]},
    {"video": "clips/v2.mp4", "QA": [{"i": "Describe the video in detail.", "q": "", "a": "A dog runs on a beach."}]},
]
LLAVA = {"id": "sg-1", "video": "clips/v3.mp4", "conversations": [
    {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A car turns left."}]}
MC = {"video": "mc/v4.mp4", "question": "What colour is the car?", "candidates": ["red", "blue", "green"],
      "answer": "blue"}
CHARADES = "AO8RW 0.0 6.9##a person is putting a book on a shelf.\nY6R7T 17.2 32.5##person opens the door.\n"
CHARADES_DURATIONS = "id,length\nAO8RW,33.67\nY6R7T,30.0\n"
ACTIVITYNET = {"v_abc": {"duration": 20.0, "timestamps": [[0.5, 5.2], [6, 25]],
                         "sentences": ["A man enters.", " He sits down."]}}
QVH = {"qid": 2579, "query": "A girl cooks while talking on facetime.", "duration": 10,
       "vid": "NUsG9BgSes0_210.0_220.0",
       "relevant_windows": [[2, 6]], "relevant_clip_ids": [1, 2], "saliency_scores": [[4, 3, 2], [1, 1, 0]]}
REFCOCO = {"id": "ref-1", "image": "coco/COCO_train2014_000000581857.jpg", "expression": "the lady in the blue shirt",
           "bbox": [103.93, 299.99, 134.22, 177.42], "width": 640, "height": 480}
# 6x8 mask with rows 1-2, columns 2-4 set. Column-major runs: 13 zeros (columns 0-1 and row 0 of column 2),
# then (2 ones, 4 zeros) x 2, 2 ones, 21 zeros → counts [13, 2, 4, 2, 4, 2, 21].
# Compressed: 13 → "=", 2 → "2", 4 → "4", then deltas to the count two before: 0, 0, 0 → "000",
# 21 − 4 = 17 = 0b10001: the 5-bit group 17 has the sign bit 0x10, so a second group 0 follows:
# chr(48 + (17 | 0x20)) = "a", chr(48) = "0".
RLE_A = {"size": [6, 8], "counts": "=24000a0"}
RLE_B = {"size": [6, 8], "counts": [36, 2, 4, 2, 4]}  # rows 0-1 of columns 6-7
TRACK = {"id": "trk-1", "video": "tracks/t1.mp4", "width": 8, "height": 6, "fps": 24, "expression": "the red ball",
         "frames": [0, 4, 8], "masks": [RLE_A, None, RLE_B]}
SAV = {"video_id": "sav_000001", "video_height": 6, "video_width": 8, "masklet_id": [0, 1],
       "masklet": [[RLE_A, RLE_B], [RLE_B, RLE_A]]}
MEVIS_META = {"videos": {"cats": {"frames": ["00000", "00001"], "expressions": {
    "0": {"exp": "the two cats on the left", "obj_id": [0, 1], "anno_id": [10, 11]}}}}}
MEVIS_MASKS = {"10": [RLE_A, None], "11": [RLE_B, RLE_B]}


def mask_a():
    m = np.zeros((6, 8), np.uint8)
    m[1:3, 2:5] = 1
    return m


def mask_b():
    m = np.zeros((6, 8), np.uint8)
    m[0:2, 6:8] = 1
    return m


def write_jsonl(path, entries):
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))
    return str(path)


def errors(items):
    return [str(x) for x in items if isinstance(x, RecordError)]


# --- RLE ---------------------------------------------------------------------------------------------------------


def test_rle_hand_encoded_strings():
    assert R.counts_from_mask(mask_a()) == [13, 2, 4, 2, 4, 2, 21]
    assert R.rle_encode(mask_a()) == RLE_A
    np.testing.assert_array_equal(R.rle_decode(RLE_A), mask_a())
    np.testing.assert_array_equal(R.rle_decode(RLE_B), mask_b())
    # 5 → "5"; 40 = 8 + 1·32 → "X" (8 | 0x20) "1"; 3 → "3"; 100 − 40 = 60 = 28 + 1·32 → "l" (28 | 0x20) "1";
    # 2 − 3 = −1 → one group 31 with the sign bit → "O"
    assert R.counts_to_string([5, 40, 3, 100, 2]) == "5X13l1O"
    assert R.counts_from_string("5X13l1O") == [5, 40, 3, 100, 2]
    assert R.rle_encode(np.ones((2, 2)), compressed=False)["counts"] == [0, 4]  # starts with a run of 0 zeros


def test_rle_random_round_trip_and_box():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (7, 5), (33, 64)]:
        m = (rng.random((h, w)) < 0.3).astype(np.uint8)
        flat = m.ravel(order="F")
        runs = [len(list(g)) for _, g in itertools.groupby(flat.tolist())]  # independent run lengths
        expected = ([0] if flat[0] else []) + runs
        assert R.rle_encode(m, compressed=False)["counts"] == expected
        for compressed in (True, False):
            np.testing.assert_array_equal(R.rle_decode(R.rle_encode(m, compressed)), m)
        assert R.rle_area(R.rle_encode(m)) == int(m.sum())
    np.testing.assert_array_equal(R.rle_to_box(RLE_A), [2, 1, 5, 3])  # x0, y0, x1 (excl.), y1 (excl.)
    assert R.mask_to_box(np.zeros((4, 4))) is None
    np.testing.assert_array_equal(R.rle_decode(R.rle_union([RLE_A, RLE_B])), mask_a() | mask_b())
    with pytest.raises(RecordError, match="sum to h\\*w = 48"):
        R.rle_decode({"size": [6, 8], "counts": [13, 2]})


# --- conversations and multiple choice ---------------------------------------------------------------------------


def test_videochat2_json(tmp_path):
    path = tmp_path / "it.json"
    path.write_text(json.dumps(VIDEOCHAT2))
    recs, bad = read_records(path, "videochat2", "/data")
    assert not bad and [r.id for r in recs] == ["it-0", "it-1"]
    assert recs[0].video == "/data/clips/v1.mp4" and recs[0].task == "conversation"
    assert recs[0].instruction == "Watch the video carefully."
    assert recs[0].turns == [("What is the man doing?", "He is slicing bread."), ("With what?", "A knife.")]
    assert recs[1].instruction == "Describe the video in detail." and recs[1].turns == [("", "A dog runs on a beach.")]


def test_bad_json_line_is_one_error_naming_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "it.jsonl", [VIDEOCHAT2[0], '{"video": "x.mp4", "QA": [', {"video": "y.mp4"},
                                               VIDEOCHAT2[1]])
    out = list(iter_records(path, "videochat2", tmp_path))
    assert [type(x) for x in out] == [Record, RecordError, RecordError, Record]
    assert errors(out)[0].startswith(f"{path}:2: not valid JSON")
    assert errors(out)[1] == f"{path}:3: missing field 'QA'"
    with pytest.raises(RecordError, match="annotation file not found"):
        iter_records(tmp_path / "missing.jsonl", "videochat2")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"video": "a.mp4",\n "QA": ]')
    with pytest.raises(RecordError, match=r"broken\.json:2: not valid JSON"):
        list(iter_records(broken, "videochat2"))


def test_llava_and_mc(tmp_path):
    (rec,), bad = read_records(write_jsonl(tmp_path / "sg.jsonl", [LLAVA]), "llava", "/d")
    assert not bad and rec.id == "sg-1" and rec.turns == [("What happens?", "A car turns left.")]
    bad_mc = dict(MC, answer="purple")
    path = write_jsonl(tmp_path / "mc.jsonl", [MC, bad_mc])
    (rec,), bad = read_records(path, "mc", "/d")
    assert rec.task == "mc" and rec.options == ("red", "blue", "green") and rec.mc_answer == 1
    assert rec.question == "What colour is the car?" and rec.video == "/d/mc/v4.mp4"
    assert [str(b) for b in bad] == [f"{path}:2: answer 'purple' is not one of the candidates "
                                     "['red', 'blue', 'green']"]


# --- temporal grounding ------------------------------------------------------------------------------------------


def test_charades_sta(tmp_path):
    csv_path = tmp_path / "Charades_v1_test.csv"
    csv_path.write_text(CHARADES_DURATIONS)
    path = tmp_path / "charades_sta_test.txt"
    path.write_text(CHARADES + "Y6R7T 12.0 5.0##ends before it starts\nZZZZZ 1 2##unknown video\nno separator\n")
    out = list(iter_records(path, "charades_sta", "/charades", durations=str(csv_path)))
    recs = [r for r in out if isinstance(r, Record)]
    assert len(recs) == 2 and recs[0].video == "/charades/AO8RW.mp4"
    assert recs[0].question == "a person is putting a book on a shelf." and recs[0].duration == 33.67
    np.testing.assert_allclose(recs[0].spans, [[0.0, 6.9]])
    np.testing.assert_allclose(recs[1].spans, [[17.2, 30.0]])  # end 32.5 clipped to the 30 s duration
    assert errors(out) == [f"{path}:3: span [12.0, 5.0] must have 0 <= start <= end",
                           f"{path}:4: no duration for video 'ZZZZZ'",
                           f"{path}:5: expected 'vid start end##query', got 'no separator'"]
    same = list(iter_records(path, "charades_sta", "/charades", durations={"AO8RW": 33.67, "Y6R7T": 30.0}))
    np.testing.assert_allclose(same[1].spans, recs[1].spans)


def test_activitynet(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ACTIVITYNET))
    recs, bad = read_records(path, "activitynet", "/anet")
    assert not bad and [r.id for r in recs] == ["v_abc#0", "v_abc#1"]
    assert recs[1].question == "He sits down." and recs[1].video == "/anet/v_abc.mp4"
    np.testing.assert_allclose(recs[1].spans, [[6.0, 20.0]])


def test_qvhighlights(tmp_path):
    bad_clip = dict(QVH, qid=1, relevant_clip_ids=[1, 7])
    no_labels = {k: v for k, v in QVH.items() if k not in ("relevant_windows", "relevant_clip_ids", "saliency_scores")}
    path = write_jsonl(tmp_path / "highlight_val.jsonl", [QVH, bad_clip, no_labels])
    out = list(iter_records(path, "qvhighlights", "/qvh"))
    rec = out[0]
    assert rec.id == "NUsG9BgSes0_210.0_220.0#2579" and rec.video == "/qvh/NUsG9BgSes0_210.0_220.0.mp4"
    assert rec.duration == 10
    np.testing.assert_allclose(rec.spans, [[2, 6]])
    np.testing.assert_array_equal(rec.saliency, [0, 9, 2, 0, 0])  # 10 s / 2 s clips; clip 1: 4+3+2, clip 2: 1+1+0
    assert rec.clip_seconds == 2.0
    mean = next(iter(iter_records(path, "qvhighlights", "/qvh", saliency_reduce="mean")))
    np.testing.assert_allclose(mean.saliency, [0, 3, 2 / 3, 0, 0])
    assert errors(out) == [f"{path}:2: relevant clip id 7 not in [0, 5) for duration 10.0",
                           f"{path}:3: missing field 'relevant_windows'"]


# --- spatial grounding -------------------------------------------------------------------------------------------


def test_refcoco_boxes_normalised_and_outside_is_error(tmp_path):
    outside = dict(REFCOCO, id="ref-2", bbox=[600, 10, 100, 50])
    two = dict(REFCOCO, id="ref-3", expression=None, sentences=["left lady", "woman in blue"])
    path = write_jsonl(tmp_path / "refcoco.jsonl", [REFCOCO, outside, two])
    out = list(iter_records(path, "refcoco", "/img"))
    rec = out[0]
    assert rec.task == "region" and rec.image == "/img/coco/COCO_train2014_000000581857.jpg"
    assert rec.question == "the lady in the blue shirt" and rec.box_frames.tolist() == [0]
    np.testing.assert_allclose(rec.boxes, [[103.93 / 640, 299.99 / 480, (103.93 + 134.22) / 640,
                                            (299.99 + 177.42) / 480]])
    assert errors(out) == [f"{path}:2: box [600, 10, 100, 50] (xywh) outside the 640.0x480.0 frame"]
    assert [r.id for r in out[2:]] == ["ref-3_0", "ref-3_1"] and out[3].question == "woman in blue"
    # no width/height: read from the image file
    Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(tmp_path / "small.png")
    entry = {"image": "small.png", "expression": "it", "bbox": [8, 5, 40, 20]}
    (rec,), _ = read_records(write_jsonl(tmp_path / "r2.jsonl", [entry]), "refcoco", tmp_path)
    np.testing.assert_allclose(rec.boxes, [[0.1, 0.1, 0.6, 0.5]])
    np.testing.assert_allclose(normalise_box([1, 2, 9, 6], 10, 8, "xyxy"), [0.1, 0.25, 0.9, 0.75])


# --- tracking / segmentation -------------------------------------------------------------------------------------


def test_track_jsonl_boxes_from_masks(tmp_path):
    no_object = dict(TRACK, id="trk-2", masks=[None, None, None])
    path = write_jsonl(tmp_path / "tracks.jsonl", [TRACK, no_object])
    out = list(iter_records(path, "track", "/v"))
    rec = out[0]
    assert rec.task == "mask" and rec.video == "/v/tracks/t1.mp4" and rec.question == "the red ball"
    assert rec.fps == 24 and rec.box_frames.tolist() == [0, 4, 8]
    # mask A: columns 2-4, rows 1-2 → (2, 1, 5, 3) / (8, 6); mask B: columns 6-7, rows 0-1 → (6, 0, 8, 2) / (8, 6)
    np.testing.assert_allclose(rec.track_boxes, [[2 / 8, 1 / 6, 5 / 8, 3 / 6], [0, 0, 0, 0], [6 / 8, 0, 1, 2 / 6]])
    assert rec.track_visible.tolist() == [True, False, True]
    np.testing.assert_array_equal(R.rle_decode(rec.track_masks[1]), np.zeros((6, 8)))
    assert errors(out) == [f"{path}:2: the object is not visible in any annotated frame"]
    boxes_only = dict(TRACK, masks=None, boxes=[[2, 1, 3, 2], None, [6, 0, 2, 2]])
    (rec2,), _ = read_records(write_jsonl(tmp_path / "b.jsonl", [boxes_only]), "track", "/v")
    np.testing.assert_allclose(rec2.track_boxes, rec.track_boxes)
    assert rec2.track_masks is None


def test_sav_and_mevis(tmp_path):
    (tmp_path / "sav_000001_manual.json").write_text(json.dumps(SAV))
    recs, bad = read_records(tmp_path, "sav", "/sav")
    assert not bad and [r.id for r in recs] == ["sav_000001_0", "sav_000001_1"]
    assert recs[0].video == "/sav/sav_000001.mp4" and recs[0].box_frames.tolist() == [0, 4]  # every 4th frame
    np.testing.assert_allclose(recs[1].track_boxes, [[6 / 8, 0, 1, 2 / 6], [2 / 8, 1 / 6, 5 / 8, 3 / 6]])
    (tmp_path / "meta_expressions.json").write_text(json.dumps(MEVIS_META))
    (tmp_path / "mask_dict.json").write_text(json.dumps(MEVIS_MASKS))
    (rec,), bad = read_records(tmp_path / "meta_expressions.json", "mevis", "/mevis/JPEGImages")
    assert not bad and rec.id == "cats_0" and rec.question == "the two cats on the left"
    assert rec.video == "/mevis/JPEGImages/cats" and rec.fps == 6.0
    np.testing.assert_array_equal(R.rle_decode(rec.track_masks[0]), mask_a() | mask_b())  # two objects merged
    np.testing.assert_allclose(rec.track_boxes, [[2 / 8, 0, 1, 3 / 6], [6 / 8, 0, 1, 2 / 6]])


def test_unknown_format(tmp_path):
    with pytest.raises(RecordError, match="unknown annotation format 'nope'"):
        iter_records(tmp_path, "nope")


# --- hostile input (issue 26): every bad entry is one named, counted RecordError with a kind ---------------------


def kinds_and_messages(items):
    return [(x.kind, str(x)) for x in items if isinstance(x, RecordError)]


def test_numbers_must_be_real_numbers_in_range(tmp_path):
    entries = [
        dict(MC, candidates=[f"c{k}" for k in range(9)], answer="c1"),  # 9 options: the prompt letters (A)-(H)
        dict(MC, answer=7),  # answer index outside the 3 candidates
        dict(MC, answer=True),  # bool is not an index
        dict(REFCOCO, bbox=["103", 300, 134, 177]),  # strings for numbers
        dict(REFCOCO, width="640"),
        dict(REFCOCO, width=True),
        dict(REFCOCO, width=float("inf")),
    ]
    mc = write_jsonl(tmp_path / "mc.jsonl", entries[:3])
    ref = write_jsonl(tmp_path / "ref.jsonl", entries[3:])
    out = kinds_and_messages(iter_records(mc, "mc", "/v")) + kinds_and_messages(iter_records(ref, "refcoco", "/i"))
    assert [k for k, _ in out] == ["template", "bad_field", "bad_field", "bad_field", "bad_field", "bad_field",
                                   "bad_field"]
    assert out[0][1] == f"{mc}:1: 9 candidates, a multiple-choice prompt takes at most 8 (options (A) to (H))"
    assert out[1][1] == f"{mc}:2: answer index 7 not in [0, 3)"
    assert out[2][1].startswith(f"{mc}:3: field 'answer' must be str or int, got bool")
    assert out[3][1] == f"{ref}:1: box coordinate must be a number, got str '103'"
    assert out[4][1].startswith(f"{ref}:2: field 'width' must be int or float, got str")
    assert out[6][1] == f"{ref}:4: width must be finite, got inf"


def test_saliency_fps_durations_and_sizes_checked_before_allocating(tmp_path):
    import tracemalloc

    qvh = write_jsonl(tmp_path / "qvh.jsonl", [
        dict(QVH, saliency_scores=[[5, 3, 2], [1, 1, 0]]),  # a 0-4 annotator score of 5
        dict(QVH, duration=1e10),  # 5e9 clips = 18.6 GiB of saliency before the check
        dict(QVH, duration=10, relevant_windows=[[2, "6"]]),
        QVH])
    trk = write_jsonl(tmp_path / "trk.jsonl", [
        dict(TRACK, fps=-24),
        dict(TRACK, width=100000, height=100000, masks=[None, None, RLE_B]),  # 9 GiB of empty masks
        dict(TRACK, masks=[{"size": [50000, 50000], "counts": [2500000000]}, None, None]),  # RLE 50000²: 2.3 GiB
        dict(TRACK, masks=[{"size": [6, 8], "counts": ["13", 2, 4, 2, 4, 2, 21]}, None, None]),  # string count
        dict(TRACK, masks=[{"size": ["6", 8], "counts": [48]}, None, None])])
    tracemalloc.start()
    out = kinds_and_messages(iter_records(qvh, "qvhighlights", "/q")) + kinds_and_messages(iter_records(trk, "track", "/t"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 << 20, peak
    assert [k for k, _ in out] == ["bad_field", "media_budget", "bad_field", "bad_field", "media_budget",
                                   "media_budget", "bad_field", "bad_field"]
    assert out[0][1] == f"{qvh}:1: saliency_scores of clip 1 must be annotator scores 0-4, got [5, 3, 2]"
    assert out[1][1] == f"{qvh}:2: duration 10000000000.0 s is over the budget max_seconds=21600.0"
    assert out[3][1] == f"{trk}:1: fps must be positive, got -24.0"
    assert out[4][1].startswith(f"{trk}:2: frame of 100000x100000 = 10000000000 pixels is over the budget")
    assert out[5][1] == f"{trk}:3: RLE size 50000x50000 = 2500000000 pixels is over the budget max_mask_pixels=40000000"
    assert "RLE counts must be a list of at most h*w+1 integers" in out[6][1] and "'13'" in out[6][1]
    # a bigger budget lets the long QVHighlights video through, without changing the others
    from tpo_jax.data.records import MediaBudget
    long = write_jsonl(tmp_path / "long.jsonl", [dict(QVH, duration=30000)])  # 8.3 h: over the default 6 h
    assert next(iter_records(long, "qvhighlights", "/q")).kind == "media_budget"
    (rec,) = iter_records(long, "qvhighlights", "/q", budget=MediaBudget(max_seconds=1e5))
    assert isinstance(rec, Record) and len(rec.saliency) == 15000


def test_one_bad_jsonl_line_is_one_bad_entry(tmp_path):
    deep = "[" * 100000 + "]" * 100000
    huge = '{"id": ' + "1" * 5000 + "}"
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join([deep, huge, json.dumps(MC), '{"video": "x.mp4", "question": "\\ud800?", '
                               '"candidates": ["a", "b"], "answer": 0}']) + "\n")
    out = list(iter_records(path, "mc", "/v"))
    assert [type(x).__name__ for x in out] == ["RecordError", "RecordError", "Record", "RecordError"]
    assert (out[0].kind, str(out[0])) == ("parse", f"{path}:1: not usable JSON (nested too deeply)")
    assert out[1].kind == "parse" and str(out[1]).startswith(f"{path}:2: not usable JSON (Exceeds the limit")
    assert out[3].kind == "bad_field" and str(out[3]).startswith(f"{path}:4: record 'mc-4' (mc): question holds")
    assert "lone surrogate" in str(out[3])


def test_a_bad_durations_entry_spoils_only_its_video(tmp_path):
    ann = tmp_path / "sta.txt"
    ann.write_text("A 0 1##good\nB 0 1##inf duration\nC 0 1##negative\nD 0 1##text\nE 0 Infinity##end inf\n")
    csv_path = tmp_path / "durations.csv"
    csv_path.write_text("id,length\nA,5\nB,Infinity\nC,-3\nD,abc\nE,5\n")
    out = list(iter_records(ann, "charades_sta", "/c", durations=str(csv_path)))
    assert isinstance(out[0], Record) and out[0].duration == 5
    msgs = [str(x) for x in out[1:]]
    assert msgs == [f"{ann}:2: bad duration of video 'B' ({csv_path}:3: duration must be finite, got inf)",
                    f"{ann}:3: bad duration of video 'C' ({csv_path}:4: duration must be positive, got -3.0)",
                    f"{ann}:4: bad duration of video 'D' ({csv_path}:5: duration 'abc' is not a number)",
                    f"{ann}:5: end must be finite, got inf"]
    same = list(iter_records(ann, "charades_sta", "/c", durations={"A": 5, "B": float("inf"), "C": "7", "D": 1,
                                                                      "E": 5}))
    assert isinstance(same[0], Record) and isinstance(same[2], Record) and same[2].duration == 7.0
    assert "duration must be finite" in str(same[1])


def test_media_paths_stay_inside_the_media_root(tmp_path):
    import os

    root, outside = tmp_path / "media", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    (outside / "x.mp4").write_bytes(b"x")
    (root / "ok.mp4").write_bytes(b"x")
    os.symlink(outside / "x.mp4", root / "link.mp4")  # a symlink inside the root that leads out of it
    os.symlink(root / "ok.mp4", root / "inner.mp4")  # one that stays inside
    entries = [dict(MC, video=v) for v in ("../secret/x.mp4", str(outside / "x.mp4"), "link.mp4", "inner.mp4",
                                           "sub/../ok.mp4", str(root / "ok.mp4"))]
    path = write_jsonl(tmp_path / "mc.jsonl", entries)
    out = list(iter_records(path, "mc", root))
    assert [x.kind if isinstance(x, RecordError) else "ok" for x in out] == ["path", "path", "path", "ok", "ok", "ok"]
    assert str(out[0]) == (f"{path}:1: media path '../secret/x.mp4' resolves to {outside / 'x.mp4'}, outside the "
                           f"media root {root} (allow_outside_media_root=True to allow)")
    allowed = list(iter_records(path, "mc", root, allow_outside_media_root=True))
    assert all(isinstance(x, Record) for x in allowed) and allowed[1].video == str(outside / "x.mp4")

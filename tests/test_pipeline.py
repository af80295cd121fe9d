"""The grain pipeline and the ArrayRecord builders: state restore, mixtures, sharding, epochs, bad
records, evaluation batches, and stored records that read back as the records that were written."""

import collections
import dataclasses
import json
import logging
import re

import numpy as np
import pytest

from tpo_jax.data import pipeline as P
from tpo_jax.data.builders import TpoRecords, TpoSynthetic, build
from tpo_jax.data.stored_source import open_task_sources
from tpo_jax.data.records import TASKS, Record
from tpo_jax.data.synthetic import SyntheticConfig, SyntheticSource, make_record
from tpo_jax.data.video import encode_mp4
from tpo_jax import config as C

CFG = C.get_config("tiny")


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_keys_and_shapes():
    batch = next(P.make_train_iterator(P.DataConfig(batch_size=5), CFG, "stage3"))
    spec = P.example_spec(P.DataConfig(), CFG)
    assert batch.keys() == spec.shapes().keys()
    for k, (shape, dtype) in spec.shapes().items():
        assert batch[k].shape == (5, *shape) and batch[k].dtype == dtype, k
    np.testing.assert_array_equal(batch["task_id"], [0, 1, 2, 3, 4])  # equal weights: one of each in turn


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_state_continues_exactly(workers):
    cfg = P.DataConfig(batch_size=4, workers=workers, seed=3)
    it = P.make_train_iterator(cfg, CFG, "stage1")
    first = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    rest = take(it, 3)
    it.close()
    resumed = P.make_train_iterator(cfg, CFG, "stage1")
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), rest)
    resumed.close()
    if workers:  # worker processes change nothing about the data
        serial = P.make_train_iterator(P.DataConfig(batch_size=4, workers=0, seed=3), CFG, "stage1")
        assert_batches_equal(take(serial, 6), first + rest)


def test_mixture_proportions_follow_the_stage_weights():
    for stage in ("stage1", "stage2", "stage3"):
        weights = P.STAGE_WEIGHTS[stage]
        ds = P.index_dataset(P.DataConfig(), {t: 10**6 for t in TASKS}, weights)
        counts = collections.Counter(TASKS[ds[i][0]] for i in range(5000))
        for task in TASKS:
            assert abs(counts[task] / 5000 - weights.get(task, 0.0)) <= 0.02, (stage, task, counts)
    # the batches carry the tasks of the index stream, in order
    ds = P.index_dataset(P.DataConfig(), {t: 10**6 for t in TASKS}, P.DataConfig().task_weights("stage1"))
    batch = next(P.make_train_iterator(P.DataConfig(batch_size=16), CFG, "stage1"))
    np.testing.assert_array_equal(batch["task_id"], [ds[i][0] for i in range(16)])


def test_hosts_split_the_stream():
    cfg, weights = P.DataConfig(seed=1), P.STAGE_WEIGHTS["stage3"]
    sizes = {t: 1000 for t in TASKS}
    whole = P.index_dataset(cfg, sizes, weights)
    hosts = [P.index_dataset(cfg, sizes, weights, process_index=p, process_count=2) for p in range(2)]
    for i in range(200):
        assert hosts[i % 2][i // 2] == whole[i]


def test_epochs_are_reshuffled_deterministically():
    ds = P.index_dataset(P.DataConfig(seed=5), {"region": 6}, {"region": 1.0})
    stream = [ds[i][1] for i in range(18)]
    epochs = [stream[0:6], stream[6:12], stream[12:18]]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3
    again = P.index_dataset(P.DataConfig(seed=5), {"region": 6}, {"region": 1.0})
    assert [again[i][1] for i in range(18)] == stream


class FlakySource:
    """Synthetic region records with a missing video (i % 10 == 3), a box outside the frame (i % 10 == 7)
    and a truncated mp4 (i % 10 == 9)."""

    def __init__(self, n=200):
        self.src = SyntheticSource(SyntheticConfig(), "region")
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        r = self.src[i]
        if i % 10 == 3:
            return Record(id=f"missing-{i}", task="region", video="/nonexistent/clip.mp4", question="x",
                          boxes=r.boxes)
        if i % 10 == 7:
            r.boxes = np.array([[0.5, 0.5, 1.3, 0.9]])
        if i % 10 == 9:
            mp4 = encode_mp4(np.zeros((4, 32, 32, 3), np.uint8), 1.0)
            return Record(id=f"truncated-{i}", task="region", video=mp4[: len(mp4) // 2], question="x",
                          boxes=r.boxes)
        return r


def test_bad_records_are_skipped_counted_and_named(caplog):
    cfg = P.DataConfig(batch_size=4, weights={"region": 1.0}, max_bad_fraction=0.4)
    it = P.make_train_iterator(cfg, CFG, "stage2_region", sources={"region": FlakySource()})
    with caplog.at_level(logging.WARNING, logger="tpo_jax.data.pipeline"):
        batches = take(it, 10)
    assert all(b["region_valid"].all() for b in batches)
    assert it.seen == 40 + it.bad and 0 < it.bad
    assert it.get_state()["bad"] == it.bad
    named = " ".join(r.getMessage() for r in caplog.records)
    assert "missing-" in named and "truncated-" in named and "outside the frame" in named
    assert len(caplog.records) == it.bad


def test_too_many_bad_records_is_one_clear_error():
    cfg = P.DataConfig(batch_size=4, weights={"region": 1.0}, max_bad_fraction=0.1, bad_check_after=20)
    it = P.make_train_iterator(cfg, CFG, "stage2_region", sources={"region": FlakySource()})
    with pytest.raises(P.DataError, match=r"of \d+ records were bad, more than max_bad_fraction=0.1"):
        take(it, 50)


def test_eval_batches_are_deterministic_per_task():
    cfg = P.DataConfig(batch_size=4)
    a = P.eval_batches(cfg, CFG, num_examples=6)
    b = P.eval_batches(cfg, CFG, num_examples=6)
    assert list(a) == list(TASKS)
    for task in TASKS:
        assert len(a[task]) == 2  # 6 examples → 2 full batches of 4
        assert_batches_equal(a[task], b[task])
        assert (a[task][0]["task_id"] == TASKS.index(task)).all()
    first = make_record(P.synthetic_config(cfg, CFG), "temporal", 0, split="validation")
    n = int(a["temporal"][0]["attention_mask"][0].sum())
    assert first.question in P.MultimodalTokenizer(num_visual_tokens=8).decode(a["temporal"][0]["input_ids"][0][:n])


def test_mc_cloze_batches_answer_each_option_to_the_bare_question():
    """One row per option of each of the first N mc records: the question without the option list, the
    option's text as the only labelled answer; the last batch padded with rows marked −1."""
    cfg = P.DataConfig(batch_size=4)
    batches = P.eval_batches(cfg, CFG, num_examples=3, tasks=[P.MC_CLOZE])[P.MC_CLOZE]
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    records = [make_record(P.synthetic_config(cfg, CFG), "mc", i, split="validation") for i in range(3)]
    n = sum(len(r.options) for r in records)
    assert len(rows["input_ids"]) == 4 * -(-n // 4)
    assert (rows["cloze_question"][n:] == -1).all()
    tok = P.MultimodalTokenizer(num_visual_tokens=8)
    j = 0
    for q, record in enumerate(records):
        for k, option in enumerate(record.options):
            assert (rows["cloze_question"][j], rows["cloze_option"][j], rows["cloze_answer"][j]) == \
                (q, k, record.mc_answer)
            prompt = tok.decode(rows["input_ids"][j][:rows["answer_start"][j]])
            assert record.question in prompt and "Options:" not in prompt
            labels = rows["labels"][j][rows["labels"][j] >= 0]
            assert tok.decode(labels, skip_special_tokens=True).strip() == option
            j += 1


def test_synthetic_builder_round_trip_and_pipeline(tmp_path):
    syn = P.synthetic_config(P.DataConfig(), CFG)
    path = build(TpoSynthetic(syn, sizes={"train": 12, "validation": 4}, storage="raw", data_dir=str(tmp_path)))
    sources = open_task_sources([path], "train", TASKS)
    assert {t: len(s) for t, s in sources.items()} == {t: 12 for t in TASKS}
    for task in TASKS:
        for i in (0, 5):
            got = sources[task][i]
            want = make_record(syn, task, int(got.id.rsplit("-", 1)[1]))
            np.testing.assert_array_equal(got.frames, want.frames)
            assert (got.question, got.turns, got.options, got.mc_answer) == \
                (want.question, want.turns, want.options, want.mc_answer)
            for f in ("spans", "saliency", "boxes", "track_boxes", "track_visible"):
                if getattr(want, f) is not None:
                    np.testing.assert_allclose(getattr(got, f), getattr(want, f), err_msg=f)
            assert got.track_masks == want.track_masks
    batches = take(P.make_train_iterator(P.DataConfig(source=path, batch_size=5), CFG, "stage3"), 2)
    assert batches[0]["frames"].shape == (5, 4, 32, 32, 3)
    assert P.eval_batches(P.DataConfig(source=path, batch_size=2), CFG, num_examples=4).keys() == set(TASKS)
    with pytest.raises(P.DataError, match="no 'test' records of task"):
        open_task_sources([path], "test", TASKS)


def test_records_builder_stores_video_bytes_and_counts_bad_entries(tmp_path, caplog):
    frames = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "v1.mp4").write_bytes(encode_mp4(frames, 3.0))
    ann = tmp_path / "sta.txt"
    ann.write_text("v1 0.5 1.5##a person opens a door\nv2 0.0 1.0##missing video\nv1 oops##bad line\n")
    inputs = [{"path": str(ann), "format": "charades_sta", "media_root": str(tmp_path),
               "options": {"durations": {"v1": 2.0, "v2": 2.0}}}]
    builder = TpoRecords(inputs, storage="video", data_dir=str(tmp_path / "out"), max_bad_fraction=0.7)
    with caplog.at_level(logging.WARNING, logger="tpo_jax.data.builders"):
        path = build(builder)
    assert builder.info.metadata["bad_records"] == 2 and builder.info.metadata["records_seen"] == 3
    assert "v2" in caplog.text and "bad line" in caplog.text
    src = open_task_sources([path], "train", ["temporal"])["temporal"]
    assert len(src) == 1
    rec = src[0]
    assert rec.video == (tmp_path / "v1.mp4").read_bytes() and rec.question == "a person opens a door"
    np.testing.assert_allclose(rec.spans, [[0.5, 1.5]])
    batch = next(P.make_train_iterator(P.DataConfig(source=path, batch_size=2, weights={"temporal": 1}), CFG,
                                       "stage2_temporal"))
    np.testing.assert_allclose(batch["spans"][:, 0], [[0.5, 0.5]] * 2)  # center 1.0 / 2 s, width 1.0 / 2 s


# --- hostile records (issue 26): every per-record failure is a counted, named skip of a kind ---------------------


class ListSource:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        if isinstance(item, BaseException):
            raise item
        return item


def hostile_records():
    """(record or exception raised by the source, expected skip kind) per audit finding."""
    from tpo_jax.data.poisoned import bomb_png, small_jpeg

    mc = make_record(SyntheticConfig(size=32, num_frames=4), "mc", 0)
    tmp = make_record(SyntheticConfig(size=32, num_frames=4), "temporal", 0)
    mask = make_record(SyntheticConfig(size=32, num_frames=4), "mask", 0)
    video = dict(frames=None, video=None, image=None)
    return [
        (Record(id="bomb", task="region", image=bomb_png(), question="x", boxes=np.array([[0, 0, 1, 1.0]])),
         "media_budget"),
        (dataclasses.replace(mc, id="nine", options=tuple(f"o{k}" for k in range(9)), mc_answer=0), "template"),
        (dataclasses.replace(mc, id="surrogate", question="what \ud800?"), "bad_field"),
        (dataclasses.replace(tmp, id="inf", duration=float("inf")), "bad_field"),
        (dataclasses.replace(tmp, id="neg-fps", fps=-3.0), "bad_field"),
        (dataclasses.replace(mask, id="rle", track_masks=[{"size": [50000, 50000], "counts": [2500000000]}]),
         "media_budget"),
        (dataclasses.replace(mc, id="jpeg-as-video", **dict(video, video=small_jpeg())), "media_kind"),
        (dataclasses.replace(mc, id="garbage", **dict(video, video=b"\x00\x01" * 500)), "decode"),
        (ZeroDivisionError("a library bug"), "decode"),  # the source itself fails: the read step
        (mc, None),  # a good record in between
    ]


def test_prepare_turns_every_per_record_failure_into_a_named_skip_of_its_kind():
    cases = hostile_records()
    prep = P.Prepare({"mc": ListSource([r for r, _ in cases])}, P.example_spec(P.DataConfig(), CFG), 0)
    for i, (record, kind) in enumerate(cases):
        out = prep.example("mc", i, i)
        if kind is None:
            assert isinstance(out, dict)
            continue
        assert isinstance(out, P.Bad) and out.kind == kind, (i, out)
        name = record.id if isinstance(record, Record) else f"mc[{i}]"
        assert out.record_id == name and f"record {name!r}" in out.message, out.message
        assert "\n" not in out.message
    assert "ZeroDivisionError: a library bug" in prep.example("mc", 8, 8).message


def test_bad_by_kind_is_counted_named_in_the_error_and_kept_by_the_state():
    items = [r for r, _ in hostile_records()]
    src = ListSource(items)
    cfg = P.DataConfig(batch_size=2, weights={"mc": 1.0}, max_bad_fraction=0.95, bad_check_after=100)
    it = P.make_train_iterator(cfg, CFG, "stage3", sources={"mc": src})
    take(it, 1)
    state = it.get_state()
    assert it.bad_by_kind == state["bad_by_kind"] and sum(it.bad_by_kind.values()) == it.bad > 0
    assert set(state["bad_examples"]) == set(it.bad_by_kind)
    json.dumps(state)
    more = take(it, 2)
    it2 = P.make_train_iterator(cfg, CFG, "stage3", sources={"mc": src})
    it2.set_state(state)
    assert_batches_equal(take(it2, 2), more)
    assert it2.bad_by_kind == it.bad_by_kind
    old = {k: v for k, v in state.items() if k not in ("bad_by_kind", "bad_examples")}  # a state from before
    it3 = P.make_train_iterator(cfg, CFG, "stage3", sources={"mc": src})
    it3.set_state(old)
    assert it3.bad_by_kind == {"unknown": state["bad"]}
    strict = P.make_train_iterator(dataclasses.replace(cfg, max_bad_fraction=0.5, bad_check_after=2), CFG, "stage3",
                                   sources={"mc": src})
    with pytest.raises(P.DataError) as e:
        take(strict, 3)
    msg = str(e.value)
    assert re.search(r"; by kind: [a-z_]+ \d \(e\.g\. '[a-z-]+'\), [a-z_]+ \d \(e\.g\. '[a-z-]+'\)", msg), msg
    assert "\n" not in msg


def test_poisoned_dataset_every_poison_skipped_under_its_kind_with_0_and_2_workers(tmp_path):
    from tpo_jax.data.poisoned import POISON_KINDS, write_poisoned_dataset

    syn = SyntheticConfig(size=CFG.vit.img_size, num_frames=CFG.vit.num_frames)
    ds = write_poisoned_dataset(str(tmp_path), syn, sizes={"train": 16, "validation": 2}, fraction=0.25,
                                clean_copy=True)
    assert set(ds.poisoned) == set(POISON_KINDS)
    sources = open_task_sources([ds.path], "train", TASKS)
    prep = P.Prepare(sources, P.example_spec(P.DataConfig(), CFG), 0)
    for task in TASKS:
        plan = ds.poisoned_index.get(("train", task), {})
        for i in range(len(sources[task])):
            out = prep.example(task, i, i)
            if i in plan:
                assert isinstance(out, P.Bad) and out.kind == POISON_KINDS[plan[i]], (task, i, plan[i], out)
                assert out.record_id.startswith(f"poisoned-{plan[i]}-"), out.record_id
            else:
                assert isinstance(out, dict), (task, i, out)
    counts = []
    for workers in (0, 2):
        cfg = P.DataConfig(source=ds.path, batch_size=4, workers=workers, max_bad_fraction=0.5)
        it = P.make_train_iterator(cfg, CFG, "stage3")
        batches = take(it, 10)
        counts.append((it.seen, it.bad_by_kind, batches))
        it.close()
    assert counts[0][:2] == counts[1][:2] and counts[0][0] == 40 + sum(counts[0][1].values())
    assert_batches_equal(counts[0][2], counts[1][2])
    assert set(counts[0][1]) <= set(POISON_KINDS.values()) and len(counts[0][1]) >= 3

    # the same stream as the clean copy with the poisoned records skipped: equal batches
    skipping = ds.clean_sources_skipping("train", TASKS)
    cfg = P.DataConfig(batch_size=4, max_bad_fraction=0.5)
    assert_batches_equal(take(P.make_train_iterator(cfg, CFG, "stage3", sources=skipping), 10), counts[0][2])

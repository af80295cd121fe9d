"""The grain pipeline and the ArrayRecord builders: state restore, mixtures, sharding, epochs, bad
records, evaluation batches, and stored records that read back as the records that were written."""

import collections
import json
import logging

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

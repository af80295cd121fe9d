"""A training run over a dataset with poisoned records of every kind (tpo_jax.data.poisoned) completes, counts
each skip by kind, and trains exactly as the run over the clean records (the same stream, poisoned ones skipped)."""

import numpy as np

from tpo_jax.data.poisoned import POISON_KINDS, write_poisoned_dataset
from tpo_jax.data.synthetic import SyntheticConfig
from tpo_jax.checkpoints.manager import CheckpointManager
from tpo_jax.data.records import TASKS
from tpo_jax.overrides import apply_overrides
from tpo_jax.train import trainer as T
from tpo_jax.train.run_config import get_run_config

STEPS, BATCH = 70, 8  # 560 examples + skips: every record of each task read at least once (equal weights)
EQUAL = "{'conversation': 1.0, 'mc': 1.0, 'temporal': 1.0, 'region': 1.0, 'mask': 1.0}"


def test_a_run_over_poisoned_records_trains_as_the_clean_run(tmp_path, monkeypatch):
    model = get_run_config("tiny").model
    data = write_poisoned_dataset(str(tmp_path / "data"), SyntheticConfig(size=model.vit.img_size,
                                                                          num_frames=model.vit.num_frames),
                                  sizes={"train": 100, "validation": 4}, fraction=0.05, clean_copy=True)
    poisoned = sum(len(v) for v in data.poisoned.values())
    # 6 kinds once in each of the 5 tasks and 3 task-specific ones (many options, inf duration, huge RLE): 6.6 %
    assert set(data.poisoned) == set(POISON_KINDS) and poisoned == 33
    overrides = [f"stage1.steps={STEPS}", f"data.batch_size={BATCH}", "devices=1", "eval.enabled=false",
                 "checkpoint.every_steps=100", "data.max_bad_fraction=0.3", f"data.weights={EQUAL}"]

    run = T.run(apply_overrides(get_run_config("tiny"), overrides + [f"data.source={data.path}"]),
                str(tmp_path / "poisoned"), stages=["stage1"], progress=False)
    stage = run["stages"]["stage1"]
    assert stage["step"] == STEPS and stage["skipped_steps"] == 0
    skipped, expected = stage["skipped_records"], data.expected_skips("train")
    # every poisoned record was read (some twice, in the second pass over a task), each counted under its kind
    assert set(skipped) == set(expected) == {"bad_field", "decode", "media_kind", "media_budget", "template"}
    assert all(skipped[k] >= expected[k] for k in expected), (skipped, expected)
    with CheckpointManager(tmp_path / "poisoned" / "stage1" / "checkpoints", read_only=True) as m:
        data_state = m.read_json(STEPS)["meta"]["data_state"]
    assert data_state["bad_by_kind"] == skipped and data_state["bad"] == sum(skipped.values())
    assert data_state["seen"] == STEPS * BATCH + sum(skipped.values())

    # the clean copy, read in the same order, skipping the records that are poisoned in the other copy
    sources = data.clean_sources_skipping("train", TASKS)
    original = T.make_train_iterator
    monkeypatch.setattr(T, "make_train_iterator", lambda *a, **k: original(*a, sources=sources, **k))
    ref = T.run(apply_overrides(get_run_config("tiny"), overrides + [f"data.source={data.clean_path}"]),
                str(tmp_path / "clean"), stages=["stage1"], progress=False)["stages"]["stage1"]
    assert ref["skipped_records"] == {"clean_skip": sum(skipped.values())}
    np.testing.assert_array_equal(stage["losses"], ref["losses"])
    assert np.isfinite(stage["losses"]).all() and len(stage["losses"]) == STEPS

"""tpo_jax.train.gc_schedule: the automatic collector is off inside, collections follow the step schedule."""

import gc

import pytest

from tpo_jax.train.gc_schedule import GcSchedule


def test_collects_young_and_full_generations_on_schedule(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append((schedule.steps, generation)) or 0)
    assert gc.isenabled()
    with GcSchedule(young_every=3, full_every=6) as schedule:
        assert not gc.isenabled()
        for _ in range(12):
            schedule.step()
    assert gc.isenabled()
    assert calls == [(3, 1), (6, 2), (9, 1), (12, 2)]


def test_frees_cycles_and_restores_a_disabled_collector():
    class Node:
        pass

    gc.disable()
    try:
        schedule = GcSchedule(young_every=1, full_every=2).start()
        a, b = Node(), Node()
        a.other, b.other = b, a  # a reference cycle: only the collector frees it
        del a, b
        before = sum(type(o) is Node for o in gc.get_objects())
        schedule.step()
        schedule.step()  # the full collection
        after = sum(type(o) is Node for o in gc.get_objects())
        schedule.stop()
        assert (before, after) == (2, 0)
        assert not gc.isenabled()  # it was off before start(), so it stays off
    finally:
        gc.enable()


def test_rejects_non_positive_periods():
    with pytest.raises(ValueError, match="young_every"):
        GcSchedule(young_every=0)

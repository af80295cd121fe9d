"""Python garbage collection on a fixed step schedule during the training loop.

A JAX/Flax process holds millions of long-lived Python objects (traced graphs, module trees,
compilation caches). CPython's automatic collector runs a full (generation-2) pass over all of
them every few hundred allocations' worth of steps; on the tiny CPU run that stalled every 6th-8th
stage-2/3 step by 0.5-1 s and made the average stage-3 step 1.9x slower than the median
(docs/benchmarks.md). `GcSchedule` turns the automatic collector off for the loop and collects the
young generations every `young_every` steps and everything every `full_every` steps, so garbage
cycles are still freed, at points the loop chooses. The previous collector state is restored on exit.

    schedule = GcSchedule().start()      # or: with GcSchedule() as schedule:
    try:
        for step in ...:
            schedule.step()
            ...
    finally:
        schedule.stop()
"""

from __future__ import annotations

import gc


class GcSchedule:
    def __init__(self, young_every: int = 20, full_every: int = 500):
        if young_every <= 0 or full_every <= 0:
            raise ValueError(f"GcSchedule: young_every and full_every must be positive, got {young_every}, {full_every}")
        self.young_every, self.full_every = young_every, full_every
        self.steps = 0
        self._was_enabled = None

    def start(self) -> "GcSchedule":
        self._was_enabled = gc.isenabled()
        gc.disable()
        return self

    __enter__ = start

    def step(self) -> None:
        """Call once per training step: collects on the schedule."""
        self.steps += 1
        if self.steps % self.full_every == 0:
            gc.collect()
        elif self.steps % self.young_every == 0:
            gc.collect(1)

    def stop(self) -> None:
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None

    def __exit__(self, *exc) -> None:
        self.stop()

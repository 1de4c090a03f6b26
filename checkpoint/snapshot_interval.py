"""`checkpoint.memory_interval: auto`: how often to take memory snapshots, from what they cost.

A process takes a snapshot at every one of its first steps and times them
(`SnapshotTimings`); then the interval becomes the smallest one that keeps
their cost within COST_BUDGET of the step time. The cost of one snapshot is
the time the train loop waited for it plus the time its copies took (on CUDA
the side stream's copies, then the host's put into the store): the copies
run beside the next step and take memory bandwidth and cores from it for at
most that long, so this bounds what a snapshot takes from training.

This module knows timings, not tensors, stores or process groups: the caller
makes every rank use the same inputs (a reduction over the ranks).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

COST_BUDGET = 0.05  # of the step time
WARMUP_SNAPSHOTS = 1  # the first plans its layout (DCP's collectives): not what the next ones cost
MEASURED_SNAPSHOTS = 3


@dataclass(frozen=True)
class IntervalChoice:
    interval: int  # steps between snapshots
    snapshot_s: float  # cost of one snapshot: the loop's wait on it and its copy time
    step_s: float  # a step without that wait


def interval_for(snapshot_s: float, step_s: float, budget: float = COST_BUDGET) -> int:
    """The smallest interval whose snapshot cost per step is at most `budget` of a step."""
    if snapshot_s <= 0 or step_s <= 0:  # nothing measured: every step, as a fixed 1 would
        return 1
    return max(1, math.ceil(snapshot_s / (budget * step_s) - 1e-9))


class SnapshotTimings:
    """The first snapshots of a process: one per step, numbered from 1 in the order of `saved`.

    Between two snapshots lies one step; the loop's waits on snapshots in it
    (`waited_s`, a running total the caller keeps) are the snapshot's, the rest
    is the step's. The warm-up snapshots and the step that follows them are left out.
    """

    def __init__(self) -> None:
        self.saves = 0
        self.copy_s: dict[int, float] = {}  # snapshot number -> its copy time (once stored)
        self.step_s: list[float] = []
        self.wait_s: list[float] = []
        self._last: Optional[tuple[float, float]] = None  # (time, waited_s) at the previous save

    @property
    def complete(self) -> bool:
        """Enough snapshots started: once the last one is stored, `estimate` can answer.
        The same on every rank (it counts steps), so a reduction may follow it."""
        return self.saves >= WARMUP_SNAPSHOTS + MEASURED_SNAPSHOTS

    def saved(self, now: float, waited_s: float) -> int:
        """A snapshot starts (at `now`, with `waited_s` waited so far); returns its number."""
        self.end_step(now, waited_s)
        self.saves += 1
        self._last = (now, waited_s)
        return self.saves

    def end_step(self, now: float, waited_s: float) -> None:
        if self._last is not None and self.saves > WARMUP_SNAPSHOTS:
            wall, waited = now - self._last[0], waited_s - self._last[1]
            self.step_s.append(max(wall - waited, 0.0))
            self.wait_s.append(waited)
        self._last = None

    def copied(self, number: int, seconds: float) -> None:
        """Snapshot `number` is stored; its copies took `seconds` (called on the snapshot's thread)."""
        self.copy_s[number] = seconds

    def estimate(self) -> tuple[float, float]:
        """(cost of one snapshot, step time), medians over the measured ones."""
        copies = [s for number, s in self.copy_s.items() if number > WARMUP_SNAPSHOTS]
        snapshot_s = _median(copies) + _median(self.wait_s)
        return snapshot_s, _median(self.step_s)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0

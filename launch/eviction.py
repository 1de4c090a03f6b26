"""Straggler eviction: leave a slow rank's node out of the run for a while, then let it back.

With `fault_tolerance.straggler: evict`, the straggler policy names a rank once
its slowness has cost the run more than `straggler_evict_after` steps
(`evict_candidate()`). `Evictions.due` then decides whether the run can do
without that rank's node:

- a free node elsewhere (a spare) takes its place: the full layout restarts there;
- else the run shrinks at once to the largest valid layout that fits (the global
  batch kept, `data.grad_accum` absorbs it, as for a lost node), when
  `fault_tolerance.min_workers` allows shrinking and the smaller run is expected
  to be faster than waiting on the straggler (a 1.6x straggler among two ranks
  costs less than running on one);
- else it only reports, and says why once.

An eviction stops the group at a step boundary (the slow rank finishes its
step; nothing is lost), keeps the node out for `straggler_cooldown_s`, and
restarts from the memory snapshot of that step. When the cooldown ends the
node is released and a shrunk run grows back through the supervisor's usual
grow path. Evictions do not count against `max_restarts`: that bounds crash
loops, while an eviction is a planned move that loses no step and cannot
repeat faster than the policy's window + evict_after steps.

This module decides and keeps time; it knows neither Ray nor the train loop.
The group factory keeps a node out (`exclude(node)`), lets it back in
(`release(node)`) and says how many workers fit (`capacity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

RECHECK_S = 1.0  # how often a refused eviction is looked at again (the cluster may have changed)


@dataclass
class Eviction:
    """A straggler whose node leaves the run once its group has stopped at a step boundary."""

    rank: int
    node: str
    pid: Optional[int]
    step: int  # the last step every rank had finished when the eviction was decided
    decided_at: float
    message: str


class Evictions:
    """Which straggler's node to leave out, what layout runs without it, and when it may return."""

    def __init__(self, recipe: dict, factory: Any, fit_layout: Callable[[dict, int, int], Optional[dict]],
                 world_of: Callable[[dict], int], log: Callable[[str], None],
                 clock: Callable[[], float]):
        ft = recipe["fault_tolerance"]
        self.on = ft["straggler"] == "evict"
        self.cooldown_s = float(ft["straggler_cooldown_s"])
        self.min_workers = ft["min_workers"]
        self.full = recipe
        self.factory, self.fit_layout, self.world_of = factory, fit_layout, world_of
        self.log, self.clock = log, clock
        self.out: dict[str, float] = {}  # node -> when its cooldown ends
        self.pending: Optional[Eviction] = None  # decided; its group is stopping
        self._said: set[str] = set()  # refusals already explained (once each)
        self._next_check = 0.0

    # ------------------------------------------------------------------ deciding

    def due(self, policy: Any, ranks: list, step: int) -> Optional[Eviction]:
        """An eviction to carry out now (the caller stops the group), or None.

        `policy`: the StragglerPolicy scoring the group (trainer/stragglers.py);
        `ranks`: the group's RankInfo list; `step`: the last step done."""
        if not self.on or policy is None or self.pending is not None:
            return None
        rank = policy.evict_candidate()
        now = self.clock()
        if rank is None or now < self._next_check:
            return None
        self._next_check = now + RECHECK_S
        info = next((r for r in ranks if r.rank == rank), None)
        if info is None:
            return None
        world = len(ranks)
        # At most this many workers fit without the node: the group's own slots elsewhere and
        # what is free (the node's own free slots, if any, are not known here: checked after).
        room = self.factory.capacity(world) - sum(r.node == info.node for r in ranks)
        target = self._layout_for(room)
        slower = policy.slowdown(rank)
        if target is None:
            self._say_once("no-layout", f"supervisor: rank {rank} on node {info.node} straggles but the run "
                           f"cannot do without that node: no free node to move to and "
                           + ("fault_tolerance.min_workers=0 forbids shrinking" if not self.min_workers
                              else f"no smaller valid layout of at least fault_tolerance.min_workers="
                              f"{self.min_workers} workers") + "; reporting only")
            return None
        target_world = self.world_of(target)
        if target_world < world and slower is not None and target_world / world <= 1 / slower:
            self._say_once(f"slower-{target_world}", f"supervisor: rank {rank} on node {info.node} "
                           f"computes {slower:.2f}x the others' time, but without its node the run "
                           f"would shrink from {world} to {target_world} workers, slower still; "
                           "reporting only until a node is free")
            return None
        how = (f"computes {slower:.2f}x the others' median compute time (score {1 / slower:.2f})"
               if slower else "is named by the straggler policy")
        where = "a free node" if target_world >= self.world_of(self.full) else f"{target_world} workers"
        self.pending = Eviction(rank, info.node, info.pid, step, now,
                                f"rank {rank} {how}; its node leaves the run for "
                                f"fault_tolerance.straggler_cooldown_s={self.cooldown_s:g}, "
                                f"the run moves to {where}")
        return self.pending

    def _layout_for(self, workers: int) -> Optional[dict]:
        """The full recipe if `workers` hold it, else the largest allowed smaller one, else None."""
        if workers >= self.world_of(self.full):
            return self.full
        if not self.min_workers:  # the recipe forbids shrinking: only a free node will do
            return None
        return self.fit_layout(self.full, workers, self.min_workers)

    def _say_once(self, key: str, line: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.log(line)

    # ------------------------------------------------------------------ carrying out

    def take(self) -> Optional[Eviction]:
        """The pending eviction (its group has stopped, or failed: then it is dropped)."""
        eviction, self.pending = self.pending, None
        return eviction

    def leave_out(self, eviction: Eviction) -> Optional[dict]:
        """Keep the node out and return the recipe to restart with; None if, once the node
        is held, what is left cannot run the job after all (the node is let back in)."""
        self.factory.exclude(eviction.node)
        self.out[eviction.node] = self.clock() + self.cooldown_s
        target = self._layout_for(self.factory.capacity(0))
        if target is None:
            self.release(eviction.node)
            self._say_once("no-layout-after", f"supervisor: without node {eviction.node} the run "
                           "does not fit after all; it stays where it was (reporting only)")
        return target

    def release(self, node: str) -> None:
        self.out.pop(node, None)
        self.factory.release(node)

    def tick(self) -> None:
        """Let nodes whose cooldown has ended back in."""
        now = self.clock()
        for node in [n for n, until in self.out.items() if until <= now]:
            self.release(node)
            self.log(f"supervisor: node {node} is back after fault_tolerance.straggler_cooldown_s="
                     f"{self.cooldown_s:g}")

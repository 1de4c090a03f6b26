"""Straggler scoring: which rank computes clearly slower than the ranks doing the same work.

A pure policy over heartbeats (no Ray, no torch, no collective): the
supervisor (launch/supervisor.py) feeds it what each rank's heartbeat carries
(trainer/hooks.py HeartbeatHook: `step`, and `compute_s` / `wait_s` of the
last steps, oldest first, the last entry being `step`'s; `stage` and
`island`) and writes the events it returns. The evict helper acts on
`evict_candidate()`.

Scores, per step, once every rank has reported that step:
- a rank's recent compute is the median of its compute time over the last
  `ROLLING` steps (a short rolling median inside the window: one slow step
  from a log write, a checkpoint or a noisy neighbour does not count);
- relative score = the fastest comparable rank's recent compute / this rank's
  (1 for the fastest; 1/1.6 for a rank 1.6x slower). Comparable ranks do the
  same work: the same pipeline stage in the same DiLoCo island. Compute time
  is scored, not step time: in synchronous training a slow rank makes every
  peer's step as long as its own, and shows only as long compute on itself
  and long collective waits on the others;
- individual score = this rank's best recent compute so far / its current one.
  It is reported, never used to flag: a whole machine or cluster slowing down
  (thermal throttling, a shared file system, a slower data phase) lowers every
  rank's individual score together, and no rank is to blame or worth
  evicting, whereas the relative score stays near 1 for all of them.

A group's first `window` steps are not scored: a process that has just started
warms up beside its first steps (helper processes importing torch, the
allocator, the first snapshots), and on shared cores that makes one rank or
the other look slow for a few steps. A rank slow from its first step is named
after twice the window. Nor are the steps a launcher reports as not `settled`
(`observe(..., settled=False)`: on Ray, while the group's warm spare processes
start and import torch on the ranks' nodes), nor the next `ROLLING` - 1 whose
recent median reaches back into them; a streak below or above the threshold
starts over after them.

A rank is named (`straggler`) once its relative score has stayed below
`threshold` for `window` consecutive steps; it is cleared
(`straggler_cleared`) once it has stayed at or above it for `window` steps:
the same window both ways, so a rank hovering at the threshold is neither
named nor cleared on every wobble. Steps, not polls: the supervisor polls ten
times a second while a step may take a millisecond or a minute, so every
step's figures are taken from the per-step lists, each step once.

Cost, for eviction: while a rank is below the threshold, each step adds
(its compute - its peers' median compute) / the group's median step time:
the share of that step the group spent waiting for it. Its sum is the number
of steps the straggler has cost since `since_step`; with `mode="evict"` a
named rank whose cost passes `evict_after` is the evict candidate.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional

ROLLING = 5  # steps in a rank's recent-compute median


@dataclass
class _RankState:
    group: tuple = (0, 0)  # (island, stage)
    latest: int = -1  # newest step reported
    best: Optional[float] = None  # lowest recent compute seen
    below: int = 0  # consecutive steps below the threshold
    above: int = 0  # consecutive steps at or above it while named
    since_step: Optional[int] = None  # first step of the current streak below
    flagged: bool = False
    cost_steps: float = 0.0
    slowdown: Optional[float] = None  # recent compute / its peers' median, at the last step scored


class StragglerPolicy:
    def __init__(self, threshold: float = 0.7, window: int = 20, mode: str = "report",
                 evict_after: float = 50, rolling: int = ROLLING):
        self.threshold, self.window, self.mode = threshold, window, mode
        self.evict_after, self.rolling = evict_after, rolling
        self.forget()

    def forget(self) -> None:
        """Start over (a new worker group: new processes, new steps)."""
        self._ranks: dict[int, _RankState] = {}
        self._times: dict[int, dict[int, tuple[float, float]]] = {}  # rank -> step -> (compute, wait)
        self._next: dict[tuple, int] = {}  # group -> next step to score
        self._warmed: dict[tuple, int] = {}  # group -> its first step scored
        self._held: dict[tuple, int] = {}  # group -> the first step after the last unsettled one

    # ------------------------------------------------------------------ feeding

    def observe(self, beats_by_rank: dict[int, dict], nodes: dict[int, str],
                now: float, settled: bool = True) -> list[tuple[str, dict]]:
        """Take the ranks' latest heartbeats; the events due: ("straggler" | "straggler_cleared",
        fields). `nodes`: every rank of the group and its node; `now` is not needed by the
        step-based rules and is accepted for policies that time themselves. `settled` False:
        something beside the ranks disturbs their compute times now; the steps reported so
        far are not scored."""
        for rank, beat in beats_by_rank.items():
            self._take(rank, beat)
        events: list[tuple[str, dict]] = []
        groups: dict[tuple, list[int]] = {}
        for rank in nodes:
            state = self._ranks.get(rank)
            if state is None or state.latest < 0:
                return events  # a rank not heard from yet: its group cannot be scored
            groups.setdefault(state.group, []).append(rank)
        for group, ranks in groups.items():
            if len(ranks) < 2 or not all(self._times.get(r) for r in ranks):
                continue
            first = max(min(self._times[r]) for r in ranks)
            warmed = self._warmed.setdefault(group, first + self.window)  # a rollback keeps it
            if not settled:
                self._hold(group, ranks)
            step = max(self._next.get(group, warmed), first, self._held.get(group, 0))
            newest = min(self._ranks[r].latest for r in ranks)
            while step <= newest:
                events += self._score(ranks, step, nodes)
                step += 1
            self._next[group] = step
            for rank in ranks:  # what no later rolling median needs
                times = self._times[rank]
                for old in [s for s in times if s <= step - self.rolling - 1]:
                    del times[old]
        return events

    def _hold(self, group: tuple, ranks: list[int]) -> None:
        """No step reported so far is scored, nor one whose recent median reaches back to them;
        streaks start over after them (a named rank stays named until it has recovered)."""
        self._held[group] = max(self._ranks[r].latest for r in ranks) + self.rolling
        for rank in ranks:
            state = self._ranks[rank]
            state.below = state.above = 0
            if not state.flagged:
                state.since_step, state.cost_steps = None, 0.0

    def _take(self, rank: int, beat: dict) -> None:
        compute, wait, step = beat.get("compute_s") or [], beat.get("wait_s") or [], beat.get("step")
        if step is None or not compute:
            return
        state = self._ranks.setdefault(rank, _RankState())
        state.group = (beat.get("island", 0), beat.get("stage", 0))
        times = self._times.setdefault(rank, {})
        if step < state.latest:  # rolled back: its later steps are gone
            for later in [s for s in times if s > step]:
                del times[later]
            self._next.pop(state.group, None)
        first = step - len(compute) + 1
        for index, seconds in enumerate(compute):
            times[first + index] = (seconds, wait[index] if index < len(wait) else 0.0)
        state.latest = step

    def _recent(self, rank: int, step: int) -> Optional[float]:
        times = self._times[rank]
        window = [times[s][0] for s in range(step - self.rolling + 1, step + 1) if s in times]
        return statistics.median(window) if window else None

    def _score(self, ranks: list[int], step: int, nodes: dict[int, str]) -> list[tuple[str, dict]]:
        recent = {r: self._recent(r, step) for r in ranks}
        if any(v is None or v <= 0 for v in recent.values()) or any(step not in self._times[r] for r in ranks):
            return []  # a gap in some rank's figures (polls too far apart): skip the step
        fastest = min(recent.values())
        full = all(len([s for s in range(step - self.rolling + 1, step + 1) if s in self._times[r]])
                   == self.rolling for r in ranks)
        step_time = statistics.median(sum(self._times[r][step]) for r in ranks)
        events = []
        for rank in ranks:
            state, mine = self._ranks[rank], recent[rank]
            if full:
                state.best = mine if state.best is None else min(state.best, mine)
            score = fastest / mine
            peers = [recent[r] for r in ranks if r != rank]
            peers_median = statistics.median(peers)
            state.slowdown = mine / peers_median
            if score < self.threshold:
                state.above = 0
                state.below += 1
                if state.since_step is None:
                    state.since_step = step
                peer_compute = statistics.median(self._times[r][step][0] for r in ranks if r != rank)
                if step_time > 0:
                    state.cost_steps += max(0.0, self._times[rank][step][0] - peer_compute) / step_time
                if not state.flagged and state.below >= self.window:
                    state.flagged = True
                    events.append(("straggler", {
                        "rank": rank, "node": nodes.get(rank), "step": step,
                        "since_step": state.since_step, "score": round(score, 3),
                        "individual_score": round((state.best or mine) / mine, 3),
                        "compute_s": round(mine, 6), "median_compute_s": round(peers_median, 6),
                        "cost_steps": round(state.cost_steps, 2)}))
                continue
            state.below = 0
            if not state.flagged:
                state.since_step, state.cost_steps = None, 0.0
                continue
            state.above += 1
            if state.above >= self.window:
                state.flagged, state.above, state.since_step, state.cost_steps = False, 0, None, 0.0
                events.append(("straggler_cleared", {"rank": rank, "node": nodes.get(rank), "step": step,
                                                     "score": round(score, 3)}))
        return events

    # ------------------------------------------------------------------ deciding

    def flagged(self) -> list[int]:
        return sorted(r for r, s in self._ranks.items() if s.flagged)

    def cost_steps(self, rank: int) -> float:
        state = self._ranks.get(rank)
        return state.cost_steps if state is not None else 0.0

    def slowdown(self, rank: int) -> Optional[float]:
        """The rank's recent compute over its peers' median at the last step scored (what its
        `straggler` event reports), or None before its group is scored."""
        state = self._ranks.get(rank)
        return state.slowdown if state is not None else None

    def evict_candidate(self) -> Optional[int]:
        """With mode "evict": the named rank that has cost the most, once past `evict_after` steps."""
        if self.mode != "evict":
            return None
        over = [(s.cost_steps, r) for r, s in self._ranks.items() if s.flagged and s.cost_steps > self.evict_after]
        return max(over)[1] if over else None


def describe(event: str, fields: dict, threshold: float) -> str:
    """The console line of a `straggler` or `straggler_cleared` event."""
    node = str(fields.get("node") or "?")
    node = node[:8] + ".." if len(node) > 10 else node
    if event == "straggler":
        ratio = fields["compute_s"] / fields["median_compute_s"] if fields["median_compute_s"] else float("inf")
        return (f"straggler: rank {fields['rank']} on node {node} computes {ratio:.1f}x slower than the "
                f"median of its peers since step {fields['since_step']} (score {fields['score']:.2f} < "
                f"fault_tolerance.straggler_threshold={threshold:g})")
    return (f"straggler cleared: rank {fields['rank']} on node {node} computes like its peers again "
            f"at step {fields['step']} (score {fields['score']:.2f})")


class PeerReport:
    """The same scoring where no supervisor reads heartbeats (torchrun): every rank puts its
    last step's compute time in its own slot of a world-sized vector that rides on the step's
    existing all-reduce (`slots`), and one rank scores the sums (`take`). Report only."""

    def __init__(self, policy: StragglerPolicy, rank: int, stages: list[int], nodes: dict[int, str]):
        self.policy, self.rank, self.stages, self.nodes = policy, rank, stages, nodes
        self.history: dict[int, list[float]] = {r: [] for r in nodes}
        self.last_step = -1

    def slots(self, compute_s) -> list[float]:
        """This rank's share of the vector: its newest step's compute time, zeros elsewhere."""
        out = [0.0] * len(self.stages)
        out[self.rank] = compute_s[-1] if compute_s else 0.0
        return out

    def take(self, step: int, computes: list[float], now: float) -> list[tuple[str, dict]]:
        """The world's vector for `step`: the events due (on the rank that scores)."""
        if step == self.last_step:  # a skipped step (anomaly): nothing new
            return []
        if step < self.last_step:  # a rollback: the steps come again
            self.history = {r: [] for r in self.nodes}
            self.policy.forget()
        self.last_step = step
        if any(c <= 0 for c in computes):  # the first step: nobody has a figure yet
            return []
        for rank, seconds in enumerate(computes):
            self.history[rank] = (self.history[rank] + [seconds])[-32:]
        beats = {rank: {"step": step, "compute_s": times, "stage": self.stages[rank], "island": 0}
                 for rank, times in self.history.items()}
        return self.policy.observe(beats, self.nodes, now)


def peer_report(ft, watched: bool, rank: int, world: int, local_world: int, mesh) -> Optional[PeerReport]:
    """A `PeerReport` for every rank when no launcher watches the heartbeats (`watched`
    False) and `fault_tolerance.straggler` is on, else None. `mesh`: the rank's
    torch DeviceMesh (pipeline stage of each rank); a torchrun node holds `local_world`
    consecutive ranks."""
    if watched or ft.straggler == "off" or world < 2 or mesh is None:
        return None
    by_stage = mesh.mesh.movedim(list(mesh.mesh_dim_names).index("pp"), 0)
    stages = [0] * world
    for stage, ranks in enumerate(by_stage):
        for member in ranks.flatten().tolist():
            stages[member] = stage
    nodes = {r: str(r // max(local_world, 1)) for r in range(world)}
    policy = StragglerPolicy(ft.straggler_threshold, ft.straggler_window, "report", ft.straggler_evict_after)
    return PeerReport(policy, rank, stages, nodes)

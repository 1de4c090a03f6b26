"""The supervisor: what to do when a worker group fails, shrinks or can grow back.

A small state machine over worker groups:

    starting -> running -> finished
                   |   \\-> failed            (user error, or past max_restarts)
                   |-> restarting -> starting (a crash, a death, a hang, a lost node)
                   \\-> resizing  -> starting (shrink after a failure, grow back when resources return)

It watches a group only through `poll()` (per-rank state and heartbeat) and
acts only through the group's `create / start / request_stop / shutdown`
and the factory's `capacity()`, so it runs the same against Ray and
against the fake group of its unit tests. Decisions:

- failure policy: a user error (recipe, data, checkpoint) ends the run at
  once; anything else kills the whole group and starts a new one, at most
  `fault_tolerance.max_restarts` times, after `restart_backoff_s` × 2^(n-1).
  With DiLoCo islands, a failure confined to one island (not a lost node)
  restarts that island alone (`restart_island`); the others train on and
  admit it back.
  A rank whose step has not advanced for `hang_timeout_s` is hung.
- scaling policy: when the full world cannot be placed within
  `placement_timeout_s` and `min_workers` allows, the largest valid smaller
  layout runs with a larger `data.grad_accum` (same global batch); once the
  capacity is back, the group stops at a step boundary and the full layout
  resumes from that step.

- straggler eviction (`fault_tolerance.straggler: evict`, launch/eviction.py): the
  group stops at a step boundary, the slow rank's node is kept out for
  `straggler_cooldown_s`, and the run restarts from that step's memory snapshot on
  a free node or shrunk at once; it grows back when the node is released.

- stop policy: a signal (`interrupted()`) asks every rank to stop after its
  step in progress with a disk checkpoint. A step still running after a
  third of `stop_grace_s` is given up: a group restored from the newest memory
  snapshot commits that instead. A failure while stopping, or a stop past
  its grace period, ends the run without a new checkpoint (`StopIncomplete`).

Every decision is an event (DESIGN §7): workers, failure, restart, resize.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from atoll.launch.eviction import Eviction, Evictions
from atoll.launch.worker_group import PlacementTimeout, RankInfo, RankStatus
from atoll.trainer.hooks import RESIZE
from atoll.trainer.stragglers import StragglerPolicy, describe

BACKOFF_CAP_S = 30.0
# The outcome of a group that could not reach a signal's step boundary within this share of
# fault_tolerance.stop_grace_s: the rest is left to commit the newest memory snapshot instead.
SNAPSHOT_AFTER = 1 / 3
SNAPSHOT_TO_DISK = "snapshot_to_disk"
STARTUP_GRACE_S = 60.0  # on top of hang_timeout_s before the first step of a group
GROW_CHECK_S = 1.0  # how often a shrunk run looks for its missing capacity
# A rank that raised usually did so because a peer died: wait up to this long for the death to show.
SETTLE_S = 0.5
# ... and while a peer does not answer (its node may be gone: Ray declares a
# node dead after its health checks fail, about 2.5 s), up to this long.
NODE_SETTLE_S = 4.0


class WorkerFailed(RuntimeError):
    """The run failed for good; the message names the rank and the cause."""


class StopIncomplete(RuntimeError):
    """A signal's stop could not commit a new checkpoint (grace period over, or a rank
    failed while stopping); the newest committed checkpoint is untouched."""


class UserError(RuntimeError):
    """A rank failed on something a user must fix; carries the original type name."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.type_name = type_name


class WorkerGroup(Protocol):
    world: int
    ranks: list[RankInfo]

    def create(self) -> list[RankInfo]: ...
    def start(self, recipe: dict, store: Any = None, attempt: int = 0) -> None: ...
    def poll(self, timeout_s: float) -> list[RankStatus]: ...
    def request_stop(self, reason: str = RESIZE) -> None: ...
    def warming(self) -> bool: ...  # helper processes start beside the ranks: compute times are off
    def shutdown(self) -> None: ...
    def restart_island(self, island: int, recipe: dict, store: Any, attempt: int) -> list[RankInfo]: ...


class GroupFactory(Protocol):
    def group(self, recipe: dict, world: int, placement_timeout_s: float) -> WorkerGroup: ...
    def capacity(self, running_world: int) -> int: ...
    def snapshot_store(self) -> Any: ...
    def exclude(self, node: str) -> None: ...  # keep a node out of every later group
    def release(self, node: str) -> None: ...


@dataclass
class Failure:
    rank: int
    kind: str  # died | hang | error | node_lost | straggler
    step: int
    detected_s: float
    message: str
    user: bool = False
    type_name: str = ""


def fit_layout(recipe: dict, workers: int, min_workers: int) -> Optional[dict]:
    """The recipe resized to the largest valid world of at most `workers`, or None.

    pp stays; dp shrinks to a divisor of dp × grad_accum so that grad_accum
    absorbs the change (same global batch); ep becomes its largest divisor
    that divides the new dp (so it still divides the expert count).
    """
    par, data = recipe["parallel"], recipe["data"]
    pp, full_dp, accum = par["pp"], par["dp"], data["grad_accum"]
    islands = _islands(recipe)
    batch_units = full_dp * accum
    for dp in range(min(full_dp, workers // (pp * islands)), 0, -1):
        if batch_units % dp or islands * pp * dp < max(min_workers, 1):
            continue
        resized = copy.deepcopy(recipe)
        resized["parallel"]["dp"] = dp
        resized["parallel"]["ep"] = max(e for e in range(1, par["ep"] + 1)
                                        if par["ep"] % e == 0 and dp % e == 0)
        resized["data"]["grad_accum"] = batch_units // dp
        return resized
    return None


def _islands(recipe: dict) -> int:
    return recipe.get("diloco", {}).get("islands", 1)


def world_of(recipe: dict) -> int:
    return _islands(recipe) * recipe["parallel"]["pp"] * recipe["parallel"]["dp"]


def layout_of(recipe: dict) -> dict:
    par = recipe["parallel"]
    return {"pp": par["pp"], "dp": par["dp"], "ep": par["ep"], "dp_shard": par["dp_shard"],
            "grad_accum": recipe["data"]["grad_accum"]}


class Supervisor:
    def __init__(self, recipe: dict, factory: GroupFactory, emit: Callable[..., None], *,
                 has_disk_checkpoint: Callable[[], bool] = lambda: False,
                 poll_s: float = 0.1, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 interrupted: Callable[[], Optional[str]] = lambda: None,
                 stop_expired: Callable[[], bool] = lambda: False,
                 log: Callable[[str], None] = print):
        self.recipe, self.factory, self.emit = recipe, factory, emit
        ft = recipe["fault_tolerance"]
        self.max_restarts, self.backoff_s = ft["max_restarts"], ft["restart_backoff_s"]
        self.min_workers, self.hang_timeout_s = ft["min_workers"], ft["hang_timeout_s"]
        self.placement_timeout_s = ft["placement_timeout_s"]
        self.has_disk_checkpoint = has_disk_checkpoint
        self.poll_s, self.clock, self.sleep = poll_s, clock, sleep
        # `interrupted()`: the name of a signal that asked the run to stop (else None);
        # `stop_expired()`: that stop has had its grace period.
        self.interrupted, self.stop_expired, self.log = interrupted, stop_expired, log
        self.state = "starting"
        self.attempt = 0
        self.restarts = 0
        self.group: Optional[WorkerGroup] = None
        self._failure: Optional[tuple[Failure, float, int]] = None  # failure, when detected, last step
        self._restarted: list[int] = []  # ranks of an island restarted alone (DiLoCo)
        self.stop_grace_s = ft["stop_grace_s"]
        self._saving_snapshot = False  # a group only commits the newest memory snapshot to disk
        self.straggler_threshold = ft["straggler_threshold"]
        self.stragglers = None if ft["straggler"] == "off" else StragglerPolicy(
            ft["straggler_threshold"], ft["straggler_window"], ft["straggler"], ft["straggler_evict_after"])
        self.evictions = Evictions(recipe, factory, fit_layout, world_of, log, clock)
        # Seconds per phase of the recovery in progress (the `restart` event's breakdown).
        self._breakdown: dict[str, float] = {}
        self._kill_s = 0.0  # how long the last group's shutdown took
        self._placed_at: Optional[float] = None  # wall time the last group was placed

    # ------------------------------------------------------------------ main loop

    def run(self) -> list[dict]:
        current = self.recipe
        try:
            while True:
                if self.interrupted() and not self._saving_snapshot:  # nothing runs that could save
                    raise StopIncomplete(f"{self.interrupted()} arrived while no worker group ran")
                group = self._start_group(current)
                if group is None:  # could not place: resized or waiting
                    current = self._shrink(current)
                    continue
                outcome = self._watch(group, current)
                while isinstance(outcome, Failure) and self._restart_island(group, outcome, current):
                    outcome = self._watch(group, current)
                ranks = group.ranks
                if not isinstance(outcome, Eviction):
                    self.evictions.take()  # the group ended otherwise before it stopped for it
                ending = self.clock()
                group.shutdown()  # every process of the group, survivors included
                self._kill_s = self.clock() - ending
                self.group = None
                if isinstance(outcome, Failure) and self.interrupted():
                    raise StopIncomplete(f"rank {outcome.rank} {_verb(outcome.kind)} while stopping "
                                         f"({outcome.message[:200]})")
                if isinstance(outcome, Failure):
                    self._handle_failure(outcome, ranks)
                    current = self._restart_recipe(self.recipe)
                    continue
                if outcome == SNAPSHOT_TO_DISK:
                    # Asked only now: a keeper may have been busy with the stuck group's snapshot.
                    if not self._newest_snapshot():
                        raise StopIncomplete("the step in progress did not end within a third of "
                                             f"fault_tolerance.stop_grace_s={self.stop_grace_s:g} and "
                                             "no memory snapshot is complete")
                    self.log("supervisor: the step in progress did not end within a third of "
                             f"fault_tolerance.stop_grace_s={self.stop_grace_s:g}; committing the "
                             "newest memory snapshot to disk instead")
                    self._saving_snapshot = True
                    self.attempt += 1  # a new group that continues this run
                    current = self._snapshot_to_disk_recipe(self.recipe)
                    continue
                if isinstance(outcome, Eviction):
                    current = self._evict(outcome, current)
                    continue
                if outcome == "grow":
                    step = max(s.beat.get("step", 0) for s in self._last_statuses)
                    self.emit("resize", from_world=world_of(current), to_world=world_of(self.recipe),
                              layout=layout_of(self.recipe),
                              grad_accum=self.recipe["data"]["grad_accum"], step=step)
                    self.state = "resizing"
                    current = self._restart_recipe(self.recipe)
                    continue
                self.state = "finished"
                if self._saving_snapshot:  # the stop's checkpoint is the snapshot's step
                    for result in outcome:
                        result["stop"] = {"signal": self.interrupted(), "step": result.get("step"),
                                          "from_memory": True}
                return outcome
        finally:
            if self.group is not None:
                self.group.shutdown()
                self.group = None

    def _start_group(self, recipe: dict) -> Optional[WorkerGroup]:
        world = world_of(recipe)
        # The full layout gets the placement timeout; a smaller one is placed on what exists now.
        timeout = self.placement_timeout_s
        group = self.factory.group(recipe, world, timeout)
        self.group = group
        placing = self.clock()
        try:
            ranks = group.create()
        except PlacementTimeout as exc:
            group.shutdown()
            self.group = None
            self._add_phase("place", self.clock() - placing)
            if not self.min_workers or world <= self.min_workers:
                raise WorkerFailed(str(exc)) from None
            self.log(f"supervisor: {exc}")
            return None
        if self.stragglers is not None:
            self.stragglers.forget()  # new processes: their steps are timed afresh
        self._add_phase("place", self.clock() - placing)
        self._placed_at = time.time()
        self.emit("workers", attempt=self.attempt, world=world, layout=layout_of(recipe),
                  ranks=[{"rank": r.rank, "pid": r.pid, "node": r.node,
                          **({"island": r.rank * _islands(recipe) // world} if _islands(recipe) > 1 else {})}
                         for r in ranks])
        group.start(recipe, self.factory.snapshot_store(), self.attempt)
        self.state = "running"
        return group

    def _evict(self, eviction: Eviction, current: dict) -> dict:
        """The group stopped at a step boundary for a straggler: restart without its node, on a
        free node or shrunk; not counted against max_restarts (see launch/eviction.py)."""
        self.evictions.take()
        stopped = top_step(self._last_statuses) or eviction.step
        target = self.evictions.leave_out(eviction)
        self.attempt += 1  # a new group that continues this run
        self.state = "restarting"
        if target is None:  # the node is back in: carry on as before
            return self._restart_recipe(current)
        failure = Failure(eviction.rank, "straggler", eviction.step, 0.0, eviction.message)
        self._failure = (failure, eviction.decided_at, stopped)
        if world_of(target) != world_of(current):
            self.emit("resize", from_world=world_of(current), to_world=world_of(target),
                      layout=layout_of(target), grad_accum=target["data"]["grad_accum"], step=stopped)
            self.state = "resizing"
        self.log(f"supervisor: node {eviction.node} left out after step {stopped}; restarting on "
                 f"{world_of(target)} workers (dp={target['parallel']['dp']}, "
                 f"grad_accum={target['data']['grad_accum']})")
        return self._restart_recipe(target)

    def _restart_island(self, group: WorkerGroup, failure: Failure, recipe: dict) -> bool:
        """DiLoCo: a failure inside one island restarts that island only; the others keep
        training and admit it back. False when the whole group must restart instead."""
        islands = _islands(recipe)
        if islands < 2 or failure.user or failure.kind == "node_lost":
            return False
        island_world = group.world // islands
        island = failure.rank // island_world
        broken = {s.rank // island_world for s in self._last_statuses
                  if s.state in ("failed", "dead", "node_lost")}
        if broken - {island}:
            return False
        self._kill_s = 0.0  # the island's actors are killed while it is placed again
        self._handle_failure(failure, group.ranks)
        placing = self.clock()
        try:
            ranks = group.restart_island(island, self._restart_recipe(recipe),
                                         self.factory.snapshot_store(), self.attempt)
        except PlacementTimeout as exc:
            self.log(f"supervisor: cannot restart island {island} alone ({exc}); restarting all")
            return False
        self._add_phase("place", self.clock() - placing)
        self._placed_at = time.time()
        self._restarted = [r.rank for r in ranks if r.rank // island_world == island]
        self.emit("workers", attempt=self.attempt, world=group.world, layout=layout_of(recipe),
                  ranks=[{"rank": r.rank, "pid": r.pid, "node": r.node, "island": r.rank // island_world}
                         for r in ranks], restarted_island=island)
        self.log(f"supervisor: restarted island {island} (ranks {self._restarted[0]}-"
                 f"{self._restarted[-1]}); it rejoins from a peer island")
        return True

    def _shrink(self, current: dict) -> dict:
        capacity = self.factory.capacity(0)
        resized = fit_layout(self.recipe, min(capacity, world_of(current) - 1), self.min_workers)
        if resized is None:
            raise WorkerFailed(f"cannot place the run: {capacity} workers fit in the cluster, "
                               f"fewer than fault_tolerance.min_workers={self.min_workers}")
        step = self._failure[2] if self._failure else 0
        self.emit("resize", from_world=world_of(current), to_world=world_of(resized),
                  layout=layout_of(resized), grad_accum=resized["data"]["grad_accum"], step=step)
        self.log(f"supervisor: shrinking to {world_of(resized)} workers "
                 f"(dp={resized['parallel']['dp']}, grad_accum={resized['data']['grad_accum']})")
        self.state = "resizing"
        return self._restart_recipe(resized)

    def _snapshot_to_disk_recipe(self, recipe: dict) -> dict:
        """A group that restores the newest memory snapshot and, finding itself past its last
        step (run.stop_at=1), saves it as a disk checkpoint and ends."""
        out = self._restart_recipe(recipe)
        out["checkpoint"]["resume"] = "auto"
        out["checkpoint"]["interval"] = out["checkpoint"]["interval"] or 1
        out["checkpoint"]["async"] = False  # one save, at once: no writer process to start
        out["run"]["stop_at"] = 1
        return out

    def _restart_recipe(self, recipe: dict) -> dict:
        """A later group resumes this run: from memory, else from the run's own checkpoints."""
        out = copy.deepcopy(recipe)
        out["run"]["overwrite"] = False
        if self.has_disk_checkpoint():
            out["checkpoint"]["resume"] = "auto"
        return out

    # ------------------------------------------------------------------ watching

    def _watch(self, group: WorkerGroup, recipe: dict):
        """Poll until the group finishes (results), fails (Failure) or should grow ("grow")."""
        started = self.clock()
        last_change = {r: started for r in range(group.world)}  # the rank's step last moved
        last_answer = {r: started for r in range(group.world)}  # the rank last answered alive
        last_step = {r: None for r in range(group.world)}
        first_step_seen = False
        next_grow_check = started + GROW_CHECK_S
        stopping = False
        shrunk = world_of(recipe) < world_of(self.recipe)
        self._last_statuses: list[RankStatus] = []
        signalled: Optional[float] = None  # when the group was asked to stop for a signal
        while True:
            if self.interrupted() and signalled is None:
                # Every rank stops after its step in progress and commits a disk checkpoint.
                group.request_stop(self.interrupted())
                signalled = self.clock()
            if signalled is not None and not self._saving_snapshot \
                    and str(recipe["checkpoint"]["memory_interval"]) != "0" \
                    and self.clock() - signalled >= self.stop_grace_s * SNAPSHOT_AFTER:
                return SNAPSHOT_TO_DISK  # a long step: the newest complete state may be in memory
            if signalled is not None and self.stop_expired():
                raise StopIncomplete("the workers did not reach a step boundary and commit "
                                     f"within fault_tolerance.stop_grace_s={self.stop_grace_s:g}")
            statuses = group.poll(self.poll_s)
            now = self.clock()
            self._last_statuses = statuses
            self.evictions.tick()
            for status in statuses:
                if status.state not in ("running", "finished"):
                    continue
                last_answer[status.rank] = now
                step = status.beat.get("step")
                if step != last_step[status.rank]:
                    last_step[status.rank], last_change[status.rank] = step, now
            failure = self._failure_in(group, statuses, now, last_change, last_answer,
                                       first_step_seen)
            if failure is not None:
                return failure
            if not first_step_seen:
                first_step_seen = self._note_first_step(group, recipe, statuses, now)
            if self.stragglers is not None:
                self._score_stragglers(group, statuses, now)
            if all(s.state == "finished" for s in statuses):
                results = [s.result or {} for s in sorted(statuses, key=lambda s: s.rank)]
                if any(r.get("stop") for r in results):
                    return results  # a signal's stop: the run ends here
                if any(r.get("stopped") for r in results):
                    return self.evictions.pending or "grow"
                return results
            if not stopping and signalled is None and self._eviction_due(group, recipe, statuses):
                stopping = True
            if shrunk and not stopping and now >= next_grow_check:
                next_grow_check = now + GROW_CHECK_S
                if self.factory.capacity(group.world) >= world_of(self.recipe):
                    self.log("supervisor: capacity for the full layout is back; growing at the "
                             "next step boundary")
                    group.request_stop(RESIZE)
                    stopping = True
            self.sleep(self.poll_s)

    def _score_stragglers(self, group: WorkerGroup, statuses: list[RankStatus], now: float) -> None:
        beats = {s.rank: s.beat for s in statuses if s.state == "running" and s.beat}
        for event, fields in self.stragglers.observe(beats, {r.rank: r.node for r in group.ranks}, now,
                                                     settled=not group.warming()):
            self.emit(event, **fields)
            self.log(f"supervisor: {describe(event, fields, self.straggler_threshold)}")

    def _eviction_due(self, group: WorkerGroup, recipe: dict, statuses: list[RankStatus]) -> bool:
        """Whether a straggler is to be evicted now: then the group is asked to stop at the
        next step boundary (`_watch` returns the eviction once it has)."""
        eviction = self.evictions.due(self.stragglers, group.ranks, top_step(statuses))
        if eviction is None:
            return False
        self.emit("failure", attempt=self.attempt, rank=eviction.rank, pid=eviction.pid, node=eviction.node,
                  kind="straggler", step=eviction.step, detected_s=0.0, message=eviction.message[:500])
        self.log(f"supervisor: {eviction.message}; stopping the group at the next step boundary")
        group.request_stop(RESIZE)
        return True

    def _newest_snapshot(self) -> bool:
        store = self.factory.snapshot_store()
        return store is not None and store.latest() is not None

    def _note_first_step(self, group: WorkerGroup, recipe: dict, statuses: list[RankStatus],
                         now: float) -> bool:
        watched = [s for s in statuses if not self._restarted or s.rank in self._restarted]
        beats = [s.beat for s in watched if s.beat.get("step") is not None]
        done = [b for b in beats if b.get("step", 0) > (b.get("resumed_step") or 0)]
        if not done:
            return False
        self._restarted = []
        if self._failure is not None:
            failure, detected_at, failed_step = self._failure
            resumed = beats[0].get("resumed_step")
            self.emit("restart", attempt=self.attempt, world=group.world, layout=layout_of(recipe),
                      resume_step=resumed or 0, source=beats[0].get("resume_source") or "none",
                      recovery_s=round(now - detected_at + failure.detected_s, 3),
                      lost_steps=max(0, failed_step - (resumed or 0)),
                      breakdown=self._recovery_breakdown(beats))
            self._failure = None
        return True

    def _add_phase(self, phase: str, seconds: float) -> None:
        if self._failure is not None:  # only a recovery is broken down
            self._breakdown[phase] = self._breakdown.get(phase, 0.0) + seconds

    def _recovery_breakdown(self, beats: list[dict]) -> dict:
        """Seconds per phase: the supervisor's own (detect, kill, place, start until the
        ranks entered training) and, for the ranks' (rendezvous, build, restore,
        first_step), the slowest rank's, which the others waited for."""
        out = dict(self._breakdown)
        startups = [b["startup"] for b in beats if isinstance(b.get("startup"), dict)]
        entered = [s["entered_at"] for s in startups if "entered_at" in s]
        if entered and self._placed_at is not None:
            out["start"] = max(0.0, max(entered) - self._placed_at)
        for phase in ("rendezvous", "build", "restore", "first_step"):
            values = [s[phase] for s in startups if phase in s]
            if values:
                out[phase] = max(values)
        order = ("detect", "kill", "place", "start", "rendezvous", "build", "restore", "first_step")
        return {phase: round(out[phase], 3) for phase in order if phase in out}

    def _failure_in(self, group: WorkerGroup, statuses: list[RankStatus], now: float,
                    last_change: dict[int, float], last_answer: dict[int, float],
                    started: bool) -> Optional[Failure]:
        by_rank = {s.rank: s for s in statuses}
        steps = [s.beat.get("step") or 0 for s in statuses]
        top = max(steps) if steps else 0
        user = [s for s in statuses if s.state == "failed" and (s.error or {}).get("user")]
        if user:
            return self._failure_of(user[0], "error", top, 0.0)
        dead = [s for s in statuses if s.state in ("dead", "node_lost")]
        failed = [s for s in statuses if s.state == "failed"]
        if failed and not dead:
            dead, user, now = self._settle(group, now)
            if user:
                return self._failure_of(user[0], "error", top, 0.0)
        if dead:
            status = dead[0]
            kind = "node_lost" if status.state == "node_lost" else "died"
            # It died after it last answered: the detection took at most this long.
            return self._failure_of(status, kind, top, now - last_answer[status.rank])
        if failed:
            return self._failure_of(failed[0], "error", top, 0.0)
        limit = self.hang_timeout_s + (0 if started else STARTUP_GRACE_S)
        stuck = [r for r, s in by_rank.items()
                 if s.state in ("running", "unanswered") and now - last_change[r] > limit]
        if stuck:
            unanswered = [r for r in stuck if by_rank[r].state == "unanswered"]
            rank = (unanswered or sorted(stuck, key=lambda r: last_change[r]))[0]
            return Failure(rank, "hang", top, now - last_change[rank],
                           f"no step completed for {now - last_change[rank]:.1f}s "
                           f"(fault_tolerance.hang_timeout_s={self.hang_timeout_s:g})")
        return None

    def _settle(self, group: WorkerGroup, since: float) -> tuple[list, list, float]:
        """After a rank raised: (dead ranks, user errors, when seen) as soon as a death or a
        user error shows, else once SETTLE_S has passed with every rank answering, or
        NODE_SETTLE_S has passed."""
        while True:
            self.sleep(self.poll_s)
            later = group.poll(self.poll_s)
            now = self.clock()
            dead = [s for s in later if s.state in ("dead", "node_lost")]
            user = [s for s in later if s.state == "failed" and (s.error or {}).get("user")]
            silent = [s for s in later if s.state == "unanswered"]
            waited = now - since
            if dead or user or waited >= NODE_SETTLE_S or (not silent and waited >= SETTLE_S):
                return dead, user, now

    def _failure_of(self, status: RankStatus, kind: str, step: int, detected_s: float) -> Failure:
        error = status.error or {}
        return Failure(status.rank, kind, step, detected_s, error.get("message", status.state),
                       user=bool(error.get("user")), type_name=error.get("type", ""))

    # ------------------------------------------------------------------ deciding

    def _handle_failure(self, failure: Failure, ranks: list[RankInfo]) -> None:
        info = next((r for r in ranks if r.rank == failure.rank), None)
        self.emit("failure", attempt=self.attempt, rank=failure.rank,
                  pid=info.pid if info else None, node=info.node if info else None,
                  kind=failure.kind, step=failure.step, detected_s=round(failure.detected_s, 3),
                  message=failure.message[:500])
        if failure.user:
            self.state = "failed"
            raise UserError(failure.type_name, failure.message)
        if self.restarts >= self.max_restarts:
            self.state = "failed"
            raise WorkerFailed(f"worker rank {failure.rank} {_verb(failure.kind)}: {failure.message} "
                               f"(gave up after {self.restarts} restarts, "
                               f"fault_tolerance.max_restarts={self.max_restarts})")
        self.restarts += 1
        self.attempt += 1
        self.state = "restarting"
        # Recovery runs from the detection: the group's shutdown counts.
        self._failure = (failure, self.clock() - self._kill_s, failure.step)
        self._breakdown = {"detect": failure.detected_s, "kill": self._kill_s}
        self.log(f"supervisor: rank {failure.rank} {_verb(failure.kind)} at step {failure.step} "
                 f"({failure.message[:200]}); restart {self.restarts}/{self.max_restarts}")
        if self.backoff_s:
            self.sleep(min(BACKOFF_CAP_S, self.backoff_s * 2 ** (self.restarts - 1)))


def top_step(statuses: list[RankStatus]) -> int:
    return max((s.beat.get("step") or 0 for s in statuses), default=0)


def _verb(kind: str) -> str:
    return {"died": "died", "hang": "hung", "error": "failed", "node_lost": "was lost with its node",
            "straggler": "was evicted as a straggler"}[kind]

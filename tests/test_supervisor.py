"""Supervisor decisions against a fake worker group: no Ray, no processes, milliseconds."""

from __future__ import annotations

import statistics

import pytest

from atoll.launch.supervisor import (NODE_SETTLE_S, StopIncomplete, Supervisor, UserError, WorkerFailed,
                                     fit_layout)
from atoll.launch.worker_group import PlacementTimeout, RankInfo, RankStatus
from atoll.trainer.config import load_recipe, to_dict
from atoll.trainer.hooks import RESIZE


def recipe(**ft) -> dict:
    overrides = ["parallel.dp=2", "data.grad_accum=1"] + [f"fault_tolerance.{k}={v}" for k, v in ft.items()]
    return to_dict(load_recipe(None, overrides))


class Clock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeGroup:
    """Ranks that step once per poll; `script(poll, rank)` may override a rank's status."""

    def __init__(self, factory: "FakeFactory", recipe: dict, world: int):
        self.factory, self.recipe, self.world = factory, recipe, world
        self.script = None
        self.ranks: list[RankInfo] = []
        self.polls = 0
        self.stop_requested_at = None
        self.shut = False
        self.resumed = factory.resume_step

    def create(self):
        if self.world > self.factory.capacity(0):
            raise PlacementTimeout(f"cannot place {self.world} workers")
        scripts = self.factory.scripts
        self.script = scripts.pop(0) if scripts else (lambda g, r, s: None)
        nodes = self.factory.free_nodes() or [f"node{r % 2}" for r in range(self.world)]
        self.ranks = [RankInfo(r, 1000 * (len(self.factory.groups)) + r, nodes[r], "127.0.0.1")
                      for r in range(self.world)]
        return self.ranks

    def start(self, recipe, store=None, attempt=0):
        self.started_recipe = recipe

    def warming(self):  # spares start during the first `factory.warming_polls` polls
        return self.polls <= self.factory.warming_polls

    def poll(self, timeout_s):
        self.polls += 1
        statuses = []
        for rank in range(self.world):
            step = self.resumed + self.polls
            if self.stop_requested_at is not None and self.polls > self.stop_requested_at + 1:
                stop = {} if self.stop_reason == RESIZE else {"stop": {"signal": self.stop_reason, "step": step}}
                status = RankStatus(rank, "finished", {"step": step},
                                    result={"step": step, "stopped": True, **stop})
            elif step >= self.factory.total_steps:
                status = RankStatus(rank, "finished", {"step": self.factory.total_steps},
                                    result={"step": self.factory.total_steps, "rank": rank})
            else:
                status = RankStatus(rank, "running", {"step": step, "resumed_step": self.resumed,
                                                      "resume_source": "memory" if self.resumed else None})
            statuses.append(self.script(self, rank, status) or status)
        self.factory.last_step = max(s.beat.get("step", 0) for s in statuses)
        return statuses

    def request_stop(self, reason):
        self.stop_requested_at, self.stop_reason = self.polls, reason

    def restart_island(self, island, recipe, store, attempt):
        """New processes for one island's ranks; they come back healthy."""
        per_island = self.world // recipe["diloco"]["islands"]
        self.restarted_islands = getattr(self, "restarted_islands", []) + [(island, attempt)]
        for rank in range(island * per_island, (island + 1) * per_island):
            self.ranks[rank] = RankInfo(rank, 9000 + 10 * attempt + rank, self.ranks[rank].node, "127.0.0.1")
        self.script = lambda g, r, s: None
        return self.ranks

    def shutdown(self):
        self.shut = True


class FakeFactory:
    """`nodes`: one worker slot per named node, which `exclude` keeps out until `release`."""

    warming_polls = 0

    def __init__(self, scripts, capacity=2, total_steps=10, nodes=()):
        self.nodes, self.excluded = list(nodes), []
        self.scripts = list(scripts)
        self.capacity_now = capacity
        self.capacities: list[int] = []  # capacity after each group start, if given
        self.total_steps = total_steps
        self.groups: list[FakeGroup] = []
        self.resume_step = 0
        self.last_step = 0

    def group(self, recipe, world, placement_timeout_s):
        # One step lost to each failure, none to a stop at a step boundary.
        clean = self.groups and self.groups[-1].stop_requested_at is not None
        self.resume_step = self.last_step - (0 if clean else 1) if self.groups else 0
        group = FakeGroup(self, recipe, world)
        self.groups.append(group)
        return group

    def capacity(self, running_world):
        return len(self.free_nodes()) if self.nodes else self.capacity_now

    def free_nodes(self):
        return [n for n in self.nodes if n not in self.excluded]

    def exclude(self, node):
        self.excluded.append(node)

    def release(self, node):
        self.excluded.remove(node)

    def snapshot_store(self):
        return None


def supervise(factory, rec, clock=None, policy=None, log=None):
    clock = clock or Clock()
    events = []
    sup = Supervisor(rec, factory, lambda event, /, **f: events.append({"event": event, "at": clock.now, **f}),
                     clock=clock, sleep=clock.sleep, log=log or (lambda line: None))
    if policy is not None:
        sup.stragglers = policy
    return sup, events, clock


def kinds(events):
    return [e["event"] for e in events]


def test_workers_event_names_each_ranks_island():
    rec = to_dict(load_recipe(None, ["parallel.dp=1", "diloco.islands=2", "diloco.inner_steps=10",
                                     "checkpoint.interval=0"]))
    factory = FakeFactory([])
    sup, events, _ = supervise(factory, rec)
    sup.run()
    assert [(r["rank"], r["island"]) for r in events[0]["ranks"]] == [(0, 0), (1, 1)]
    assert events[0]["world"] == 2


def islands_recipe() -> dict:
    return to_dict(load_recipe(None, ["parallel.dp=2", "diloco.islands=2", "diloco.inner_steps=10",
                                      "checkpoint.interval=0"]))


def test_a_dead_rank_of_one_island_restarts_that_island_alone():
    factory = FakeFactory([dies_at(3, 3)], capacity=4)
    sup, events, _ = supervise(factory, islands_recipe())
    sup.run()
    group = factory.groups[0]
    assert len(factory.groups) == 1 and group.restarted_islands == [(1, 1)]
    assert kinds(events)[:3] == ["workers", "failure", "workers"]
    assert events[1]["rank"] == 3 and events[1]["kind"] == "died"
    assert events[2]["restarted_island"] == 1
    # island 0 keeps its processes, island 1's ranks are new ones
    assert [r["pid"] for r in events[2]["ranks"]] == [1000, 1001, 9012, 9013]
    assert sup.state == "finished"


def test_a_lost_node_under_islands_restarts_the_whole_group():
    def node_lost(group, rank, status):
        if group.polls >= 3 and rank == 3:
            return RankStatus(rank, "node_lost", error={"type": "ActorDiedError", "message": "gone", "user": False})
    factory = FakeFactory([node_lost], capacity=4)
    sup, events, _ = supervise(factory, islands_recipe())
    sup.run()
    assert len(factory.groups) == 2 and not hasattr(factory.groups[0], "restarted_islands")


def test_a_healthy_group_finishes_with_every_rank_result():
    factory = FakeFactory([])
    sup, events, _ = supervise(factory, recipe())
    results = sup.run()
    assert [r["rank"] for r in results] == [0, 1]
    assert kinds(events) == ["workers"]
    assert events[0]["ranks"] == [{"rank": 0, "pid": 1000, "node": "node0"}, {"rank": 1, "pid": 1001, "node": "node1"}]
    assert sup.state == "finished" and factory.groups[0].shut


def dies_at(poll, rank_to_kill):
    def script(group, rank, status):
        if group.polls >= poll and rank == rank_to_kill:
            return RankStatus(rank, "dead", error={"type": "ActorDiedError", "message": "killed", "user": False})
    return script


def test_a_dead_rank_restarts_the_whole_group_and_reports_recovery():
    factory = FakeFactory([dies_at(4, 1)])
    sup, events, _ = supervise(factory, recipe())
    sup.run()
    assert kinds(events) == ["workers", "failure", "workers", "restart"]
    failure, restart = events[1], events[3]
    assert failure["rank"] == 1 and failure["kind"] == "died" and failure["pid"] == 1001
    assert failure["node"] == "node1" and failure["step"] == 4 and failure["attempt"] == 0
    assert restart["attempt"] == 1 and restart["source"] == "memory"
    assert restart["resume_step"] == 3 and restart["lost_steps"] == 1
    assert restart["recovery_s"] >= 0
    assert factory.groups[0].shut and len(factory.groups) == 2


def test_the_restart_event_breaks_the_recovery_down_by_phase():
    """The supervisor's phases come from its own clock, the ranks' from their heartbeat: of
    each rank phase the slowest rank's (the others waited for it)."""
    import time

    startups = {0: {"rendezvous": 0.2, "build": 0.5, "restore": 0.3, "first_step": 0.4},
                1: {"rendezvous": 0.25, "build": 0.4, "restore": 0.35, "first_step": 0.1}}

    def with_startup(group, rank, status):
        if group is factory.groups[-1] and len(factory.groups) == 2 and "step" in status.beat:
            status.beat["startup"] = {"entered_at": time.time(), **startups[rank]}
        return dies_at(4, 1)(group, rank, status) if len(factory.groups) == 1 else None

    factory = FakeFactory([with_startup, with_startup])
    sup, events, _ = supervise(factory, recipe())
    sup.run()
    restart = next(e for e in events if e["event"] == "restart")
    breakdown = restart["breakdown"]
    assert list(breakdown) == ["detect", "kill", "place", "start", "rendezvous", "build", "restore", "first_step"]
    assert breakdown["detect"] == next(e for e in events if e["event"] == "failure")["detected_s"]
    assert (breakdown["rendezvous"], breakdown["build"], breakdown["restore"], breakdown["first_step"]) == \
        (0.25, 0.5, 0.35, 0.4)
    assert breakdown["kill"] == breakdown["place"] == 0  # the fake clock stands still in both
    assert 0 <= breakdown["start"] < 5


def test_a_peer_error_waits_for_the_death_that_caused_it():
    def script(group, rank, status):
        if group.polls == 3 and rank == 0:
            return RankStatus(rank, "failed", error={"type": "DistBackendError", "message": "peer gone",
                                                      "user": False})
        if group.polls >= 4 and rank == 1:
            return RankStatus(rank, "dead", error={"message": "killed", "user": False})
    sup, events, _ = supervise(FakeFactory([script]), recipe())
    sup.run()
    assert events[1]["kind"] == "died" and events[1]["rank"] == 1


def test_a_peer_error_waits_for_a_silent_rank_whose_node_is_declared_lost():
    """A node's loss shows first as a peer error and a rank that does not answer; Ray
    declares the node dead seconds later. The failure is the node loss, not the error."""
    def script(group, rank, status):
        if group.polls >= 3 and rank == 0:
            return RankStatus(rank, "failed", error={"type": "DistBackendError", "message": "peer gone",
                                                      "user": False})
        if 3 <= group.polls < 20 and rank == 1:
            return RankStatus(rank, "unanswered")
        if group.polls >= 20 and rank == 1:
            return RankStatus(rank, "node_lost", error={"message": "node died", "user": False})
    sup, events, clock = supervise(FakeFactory([script]), recipe())
    sup.run()
    failure = events[1]
    assert failure["kind"] == "node_lost" and failure["rank"] == 1
    assert 1.5 <= failure["detected_s"] <= 4.0


def test_a_peer_error_with_a_rank_silent_for_good_is_reported_after_the_node_settle():
    def script(group, rank, status):
        if group.polls >= 3 and rank == 0:
            return RankStatus(rank, "failed", error={"type": "DistBackendError", "message": "peer gone",
                                                      "user": False})
        if group.polls >= 3 and rank == 1:
            return RankStatus(rank, "unanswered")
    sup, events, clock = supervise(FakeFactory([script]), recipe())
    sup.run()
    failure = events[1]
    assert failure["kind"] == "error" and failure["rank"] == 0
    first_error_at = 2 * 0.1  # the third poll, after two sleeps
    assert NODE_SETTLE_S <= failure["at"] - first_error_at <= NODE_SETTLE_S + 0.5


def test_a_user_error_ends_the_run_at_once():
    def script(group, rank, status):
        if group.polls == 2 and rank == 1:
            return RankStatus(rank, "failed", error={"type": "DataError", "message": "token id 300 >= 256",
                                                      "user": True})
    factory = FakeFactory([script])
    sup, events, _ = supervise(factory, recipe())
    with pytest.raises(UserError) as info:
        sup.run()
    assert info.value.type_name == "DataError" and "token id 300" in str(info.value)
    assert len(factory.groups) == 1 and kinds(events) == ["workers", "failure"]
    assert sup.state == "failed"


def test_past_max_restarts_the_run_fails_naming_the_last_failure():
    factory = FakeFactory([dies_at(2, 0)] * 3)
    sup, events, clock = supervise(factory, recipe(max_restarts=2, restart_backoff_s=1))
    with pytest.raises(WorkerFailed, match=r"worker rank 0 died: killed \(gave up after 2 restarts"):
        sup.run()
    assert kinds(events).count("failure") == 3 and len(factory.groups) == 3
    assert [s for s in clock.sleeps if s >= 1] == [1, 2]  # backoff doubles


def test_a_rank_without_progress_is_a_hang():
    def script(group, rank, status):
        if group.polls >= 3 and rank == 1:
            return RankStatus(rank, "unanswered")  # stopped: its status call never returns
    factory = FakeFactory([script], total_steps=1000)
    sup, events, clock = supervise(factory, recipe(hang_timeout_s=2))
    sup.run()
    failure = events[1]
    assert failure["kind"] == "hang" and failure["rank"] == 1
    assert 2 <= failure["detected_s"] <= 2 + 2 * sup.poll_s


def test_no_room_for_the_full_world_shrinks_then_grows_back():
    def lose_node(group, rank, status):
        if group.polls >= 3 and rank == 1:
            group.factory.capacity_now = 1
            return RankStatus(rank, "node_lost", error={"message": "node died", "user": False})

    def regain(group, rank, status):
        if group.polls == 3:
            group.factory.capacity_now = 2

    factory = FakeFactory([lose_node, regain], total_steps=1000)
    sup, events, _ = supervise(factory, recipe(min_workers=1, placement_timeout_s=1))
    factory.total_steps = 40
    sup.run()
    assert kinds(events) == ["workers", "failure", "resize", "workers", "restart", "resize",
                             "workers", "restart"][:len(events)]
    assert events[1]["kind"] == "node_lost"
    shrink = events[2]
    assert shrink["from_world"] == 2 and shrink["to_world"] == 1 and shrink["grad_accum"] == 2
    placed = [g for g in factory.groups if g.ranks]
    small = placed[1].started_recipe
    assert small["parallel"]["dp"] == 1 and small["data"]["grad_accum"] == 2
    grow = [e for e in events if e["event"] == "resize"][1]
    assert grow["from_world"] == 1 and grow["to_world"] == 2 and grow["grad_accum"] == 1
    assert placed[-1].started_recipe["parallel"]["dp"] == 2 and len(placed) == 3


def test_without_min_workers_a_placement_timeout_fails_the_run():
    factory = FakeFactory([dies_at(2, 0)])
    factory.groups_capacity = None

    def lose(group, rank, status):
        group.factory.capacity_now = 1
        return dies_at(2, 0)(group, rank, status)

    factory.scripts = [lose]
    sup, _, _ = supervise(factory, recipe(placement_timeout_s=1))
    with pytest.raises(WorkerFailed, match="cannot place 2 workers"):
        sup.run()


@pytest.mark.parametrize("dp, ep, accum, workers, min_workers, want", [
    (4, 2, 1, 3, 0, (2, 2, 2)),
    (4, 2, 1, 1, 0, (1, 1, 4)),
    (4, 4, 1, 2, 0, (2, 2, 2)),
    (2, 1, 3, 1, 0, (1, 1, 6)),
    (4, 2, 1, 1, 2, None),
])
def test_fit_layout_keeps_the_global_batch(dp, ep, accum, workers, min_workers, want):
    rec = to_dict(load_recipe(None, [f"parallel.dp={dp}", f"parallel.ep={ep}", f"data.grad_accum={accum}"]))
    got = fit_layout(rec, workers, min_workers)
    if want is None:
        assert got is None
        return
    assert (got["parallel"]["dp"], got["parallel"]["ep"], got["data"]["grad_accum"]) == want
    assert got["parallel"]["dp"] * got["data"]["grad_accum"] == dp * accum


def signal_at(poll: int, clock: Clock, expire_after_s: float):
    """`interrupted` and `stop_expired` of a SIGTERM that arrives once the clock passes `poll` polls."""
    state = {"at": None}

    def interrupted():
        if state["at"] is None and clock.now >= poll * 0.1:
            state["at"] = clock.now
        return "SIGTERM" if state["at"] is not None else None

    return interrupted, lambda: state["at"] is not None and clock.now - state["at"] > expire_after_s


def test_a_signal_asks_every_rank_to_stop_with_a_checkpoint_and_ends_the_run():
    factory = FakeFactory([], total_steps=100)
    sup, events, clock = supervise(factory, recipe())
    sup.interrupted, sup.stop_expired = signal_at(3, clock, expire_after_s=20)
    results = sup.run()
    group, = factory.groups
    assert group.stop_reason == "SIGTERM"  # not a resize: the ranks commit a disk checkpoint
    assert [r["stop"]["signal"] for r in results] == ["SIGTERM", "SIGTERM"]
    assert "restart" not in kinds(events) and group.shut


def test_a_stop_past_its_grace_period_ends_without_waiting_longer():
    never_finish = lambda g, r, s: RankStatus(r, "running", {"step": 2})  # noqa: E731 (stuck in a step)
    factory = FakeFactory([never_finish], total_steps=100)
    sup, events, clock = supervise(factory, recipe(hang_timeout_s=1000))
    sup.interrupted, sup.stop_expired = signal_at(3, clock, expire_after_s=2)
    with pytest.raises(StopIncomplete, match="stop_grace_s=20"):
        sup.run()
    assert 2 < clock.now < 3 and factory.groups[0].shut


def test_a_rank_that_dies_while_stopping_ends_the_run_instead_of_restarting():
    dies = lambda g, r, s: RankStatus(r, "dead", {"step": 4}) if r == 1 and g.polls > 4 else None  # noqa: E731
    factory = FakeFactory([dies], total_steps=100)
    sup, events, clock = supervise(factory, recipe())
    sup.interrupted, sup.stop_expired = signal_at(3, clock, expire_after_s=20)
    with pytest.raises(StopIncomplete, match="rank 1 died while stopping"):
        sup.run()
    assert len(factory.groups) == 1 and "restart" not in kinds(events)


class NamesAStraggler:
    """The straggler policy's interface (trainer/stragglers.py), scripted: it names `rank` of
    the first group for eviction from that group's `from_poll`-th poll on."""

    def __init__(self, factory, rank, from_poll=3):
        self.factory, self.rank, self.from_poll = factory, rank, from_poll
        self.beats = {}

    def observe(self, beats_by_rank, nodes, now, settled=True):
        self.beats = beats_by_rank
        return []

    def slowdown(self, rank):  # the rank's median compute over its peers'
        medians = {r: statistics.median(b["compute_s"]) for r, b in self.beats.items() if b.get("compute_s")}
        others = [m for r, m in medians.items() if r != rank]
        return medians[rank] / statistics.median(others) if rank in medians and others else None

    def evict_candidate(self):
        group = self.factory.groups[-1]
        return self.rank if len(self.factory.groups) == 1 and group.polls >= self.from_poll else None

    def forget(self):
        pass


def test_the_straggler_policy_holds_its_scores_while_the_group_warms_up():
    """While a group's spares start beside its ranks (the group says `warming()`), the policy is
    told the steps are not settled."""
    class Recording(NamesAStraggler):
        def observe(self, beats_by_rank, nodes, now, settled=True):
            told.append(settled)
            return []

    told = []
    factory = FakeFactory([], total_steps=10)
    factory.warming_polls = 3
    sup, _, _ = supervise(factory, recipe(straggler="report"), policy=Recording(factory, rank=None))
    sup.run()
    assert told[:3] == [False] * 3 and len(told) > 3 and all(told[3:]), told


def evict_recipe(**ft) -> dict:
    return recipe(straggler="evict", straggler_cooldown_s=2, max_restarts=0, **ft)


def test_an_evicted_straggler_moves_to_a_free_node_and_its_node_returns_after_the_cooldown():
    def beats(group, rank, status):  # the heartbeat's compute seconds of the last steps
        status.beat["compute_s"] = [[0.1, 0.2][rank]] * 8 if group is factory.groups[0] else [0.1] * 8
    factory = FakeFactory([beats], total_steps=60, nodes=["n0", "n1", "n2"])
    policy = NamesAStraggler(factory, rank=1)
    sup, events, clock = supervise(factory, evict_recipe(), policy=policy)
    sup.run()
    assert kinds(events) == ["workers", "failure", "workers", "restart"]
    failure, restart = events[1], events[3]
    assert (failure["kind"], failure["rank"], failure["node"], failure["pid"]) == ("straggler", 1, "n1", 1001)
    assert "rank 1 computes 2.00x the others' median compute time (score 0.50)" in failure["message"]
    assert "straggler_cooldown_s=2" in failure["message"]
    # The group stopped at a step boundary: the new one resumes there, on n0 and the spare n2.
    assert [r["node"] for r in events[2]["ranks"]] == ["n0", "n2"] and events[2]["world"] == 2
    assert restart["lost_steps"] == 0 and restart["resume_step"] == factory.groups[0].polls
    assert factory.groups[0].stop_reason == RESIZE
    # Not a crash: max_restarts=0 did not end the run; n1 was let back in after 2 s.
    assert sup.state == "finished" and sup.restarts == 0 and factory.excluded == []
    assert clock.now - failure["at"] > 2


def test_without_a_free_node_an_eviction_shrinks_at_once_and_grows_back_after_the_cooldown():
    factory = FakeFactory([], total_steps=200, nodes=["n0", "n1"])
    sup, events, clock = supervise(factory, evict_recipe(min_workers=1, placement_timeout_s=30),
                                   policy=NamesAStraggler(factory, rank=0))
    sup.run()
    assert kinds(events) == ["workers", "failure", "resize", "workers", "restart", "resize", "workers"]
    failure, shrink, small, grow, back = (events[i] for i in (1, 2, 3, 5, 6))
    assert failure["kind"] == "straggler" and failure["node"] == "n0"
    assert (shrink["from_world"], shrink["to_world"], shrink["grad_accum"]) == (2, 1, 2)
    assert [r["node"] for r in small["ranks"]] == ["n1"]
    # No wait for the placement timeout: the capacity without n0 was known to be short.
    assert small["at"] - failure["at"] < 1 and all(g.ranks for g in factory.groups)
    assert (grow["from_world"], grow["to_world"], grow["grad_accum"]) == (1, 2, 1)
    assert 2 <= grow["at"] - shrink["at"] <= 2 + 2 * 1.0  # cooldown, then the next capacity check
    assert sorted(r["node"] for r in back["ranks"]) == ["n0", "n1"]
    assert factory.groups[1].started_recipe["data"]["grad_accum"] == 2 and sup.restarts == 0


@pytest.mark.parametrize("min_workers, compute_s, why", [
    (0, None, "min_workers=0 forbids shrinking"),  # no free node, shrinking not allowed
    (1, {0: [0.16] * 8, 1: [0.1] * 8}, "slower still"),  # 2 -> 1 workers costs more than 1.6x
])
def test_an_eviction_that_cannot_help_is_only_reported_once(min_workers, compute_s, why):
    def beats(group, rank, status):
        if compute_s:
            status.beat["compute_s"] = compute_s[rank]
    factory = FakeFactory([beats], total_steps=60, nodes=["n0", "n1"])
    said = []
    sup, events, _ = supervise(factory, evict_recipe(min_workers=min_workers),
                               policy=NamesAStraggler(factory, rank=0), log=said.append)
    sup.run()
    assert kinds(events) == ["workers"] and len(factory.groups) == 1 and factory.excluded == []
    assert len([line for line in said if why in line]) == 1, said

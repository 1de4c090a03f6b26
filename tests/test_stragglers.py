"""Stragglers: the scoring policy on synthetic heartbeats, the torchrun report that
scores the step's shared vector, and a torchrun rank slowed down from outside (SIGSTOP
duty cycle) named in time. A Ray worker slowed down and evicted is
tests/test_straggler_evict.py."""

from __future__ import annotations

import random

import pytest

from atoll.trainer.stragglers import ROLLING, StragglerPolicy, describe
from conftest import TINY_MOE, ended, events, finish, last_step, start_torchrun, torchrun_ranks, wait_for
from slowdown import duty_cycle, one_core_each

THRESHOLD, WINDOW = 0.7, 20  # the recipe's defaults
NODES = {rank: f"node{rank // 2}" for rank in range(4)}


def simulate(policy: StragglerPolicy, slowdown, steps: int, *, ranks: int = 4, noise: float = 0.05,
             poll_every: int = 1, stage_of=lambda rank: 0, spikes: float = 0.0, seed: int = 0,
             after_poll=lambda step: None, settled=lambda step: True):
    """Synchronous steps of `ranks` ranks computing 0.1 s × slowdown(rank, step) × noise, each
    waiting for the slowest; the heartbeats polled every `poll_every` steps (each twice, as a
    poll that finds no new step would). Returns [(step polled, event, fields)]."""
    rng = random.Random(seed)
    compute = {r: [] for r in range(ranks)}
    wait = {r: [] for r in range(ranks)}
    found = []
    for step in range(1, steps + 1):
        now = [0.1 * slowdown(r, step) * rng.lognormvariate(0, noise) for r in range(ranks)]
        for r in range(ranks):
            if spikes and rng.random() < spikes:  # a log write, a save, a noisy neighbour
                now[r] *= 3
        slowest = max(now)
        for r in range(ranks):
            compute[r].append(now[r])
            wait[r].append(slowest - now[r])
        if step % poll_every and step != steps:
            continue
        beats = {r: {"step": step, "compute_s": compute[r][-32:], "wait_s": wait[r][-32:],
                     "stage": stage_of(r), "island": 0} for r in range(ranks)}
        for _ in range(2):
            found += [(step, event, fields)
                      for event, fields in policy.observe(beats, NODES, now=step * 0.1, settled=settled(step))]
        after_poll(step)
    return found


def slow(rank: int, factor: float, start: int, end: int = 10 ** 9):
    return lambda r, step: factor if r == rank and start <= step < end else 1.0


def test_a_rank_1_6x_slower_is_named_within_the_window():
    policy = StragglerPolicy(THRESHOLD, WINDOW)
    found = simulate(policy, slow(1, 1.6, start=41), steps=120)
    assert [e for _, e, _ in found] == ["straggler"]
    step, _, fields = found[0]
    assert fields["rank"] == 1 and fields["node"] == "node0"
    assert 41 + WINDOW - 1 <= fields["step"] <= 41 + WINDOW + ROLLING
    assert 41 <= fields["since_step"] <= 41 + ROLLING // 2 + 1
    assert fields["score"] == pytest.approx(1 / 1.6, abs=0.08)
    assert fields["compute_s"] / fields["median_compute_s"] == pytest.approx(1.6, rel=0.1)
    assert fields["individual_score"] == pytest.approx(1 / 1.6, abs=0.08)
    line = describe("straggler", fields, THRESHOLD)
    assert line.startswith("straggler: rank 1 on node node0 computes 1.6x slower than the median of its peers")
    assert "< fault_tolerance.straggler_threshold=0.7" in line
    # What an eviction's message says: the same recent figures, at the last step scored.
    assert policy.slowdown(1) == pytest.approx(1.6, rel=0.1)
    assert policy.slowdown(0) == pytest.approx(1.0, rel=0.1)  # its peers: ranks 1-3, median 1x


def test_a_groups_first_window_of_steps_is_not_scored():
    """A new process warms up beside its first steps (on shared cores one rank or the other
    looks slow for a while): nothing is named for them; a rank slow from its first step is
    named after twice the window."""
    warming = simulate(StragglerPolicy(THRESHOLD, WINDOW), slow(1, 2.5, start=2, end=WINDOW + 1), steps=100)
    assert warming == []
    found = simulate(StragglerPolicy(THRESHOLD, WINDOW), slow(1, 1.6, start=1), steps=100)
    assert [(e, f["rank"], f["since_step"], f["step"]) for _, e, f in found] == \
        [("straggler", 1, WINDOW + 1, 2 * WINDOW)]


def test_steps_the_launcher_has_not_settled_are_not_scored():
    """On Ray a group's warm spares import torch beside its ranks for seconds after its first
    step, and whichever rank shares a core with them looks slow. Steps polled meanwhile
    (`settled=False`), and those whose rolling median reaches back to them, are not scored;
    a slowdown that goes on past them is named a window after scoring resumes."""
    unsettled = lambda step: not 25 <= step <= 70  # noqa: E731
    policy = StragglerPolicy(THRESHOLD, WINDOW)
    assert simulate(policy, slow(1, 2.0, start=30, end=71), steps=150, settled=unsettled) == []
    policy = StragglerPolicy(THRESHOLD, WINDOW)
    found = simulate(policy, slow(1, 2.0, start=30), steps=150, settled=unsettled)
    assert [(e, f["rank"], f["since_step"], f["step"]) for _, e, f in found] == \
        [("straggler", 1, 70 + ROLLING, 70 + ROLLING + WINDOW - 1)]
    # A streak under way when the launcher stops being settled starts over after it.
    policy = StragglerPolicy(THRESHOLD, WINDOW)
    found = simulate(policy, slow(1, 2.0, start=30), steps=150, settled=lambda step: step != 45)
    assert [(f["since_step"], f["step"]) for _, _, f in found] == [(45 + ROLLING, 45 + ROLLING + WINDOW - 1)]


@pytest.mark.parametrize("poll_every", [3, 7])
def test_polls_fewer_than_steps_see_every_step(poll_every):
    """Several steps between polls: the same decision, from the per-step lists."""
    every_step = simulate(StragglerPolicy(THRESHOLD, WINDOW), slow(2, 1.6, start=30), steps=100)
    sparse = simulate(StragglerPolicy(THRESHOLD, WINDOW), slow(2, 1.6, start=30), steps=100, poll_every=poll_every)
    assert [f for _, _, f in sparse] == [f for _, _, f in every_step]


@pytest.mark.parametrize("factor", [1.0, 1.1, 1.2])
def test_small_slowdowns_and_noise_are_never_named(factor):
    """A clean run with 10% jitter and an occasional 3x step on any rank, or one rank up to
    1.2x slower: nothing, over 500 steps."""
    for seed in range(3):
        policy = StragglerPolicy(THRESHOLD, WINDOW)
        assert simulate(policy, slow(3, factor, start=1), steps=500, noise=0.1, spikes=0.05, seed=seed) == []


def test_a_whole_machine_slowing_down_names_nobody():
    assert simulate(StragglerPolicy(THRESHOLD, WINDOW), lambda r, step: 1.6 if step > 40 else 1.0, steps=150) == []


def test_stages_are_compared_only_with_themselves():
    """Pipeline stage 1 does twice the work of stage 0: no one is slow among equals; then
    one stage-1 rank slows down 1.6x and only it is named."""
    stage_of = lambda rank: rank % 2  # noqa: E731
    uneven = lambda r, step: 2.0 if r % 2 else 1.0  # noqa: E731
    assert simulate(StragglerPolicy(THRESHOLD, WINDOW), uneven, steps=100, stage_of=stage_of) == []
    found = simulate(StragglerPolicy(THRESHOLD, WINDOW),
                     lambda r, step: uneven(r, step) * slow(3, 1.6, start=30)(r, step), steps=100,
                     stage_of=stage_of)
    assert [(e, f["rank"]) for _, e, f in found] == [("straggler", 3)]


def test_a_recovered_rank_is_cleared_after_the_window():
    found = simulate(StragglerPolicy(THRESHOLD, WINDOW), slow(0, 1.6, start=30, end=90), steps=200)
    assert [(e, f["rank"]) for _, e, f in found] == [("straggler", 0), ("straggler_cleared", 0)]
    cleared = found[1][2]
    assert 90 + WINDOW - 1 <= cleared["step"] <= 90 + WINDOW + ROLLING
    assert describe("straggler_cleared", cleared, THRESHOLD).startswith(
        "straggler cleared: rank 0 on node node0 computes like its peers again")


def test_evict_candidate_only_in_evict_mode_and_past_its_cost():
    """At 1.6x a straggler costs (1.6 - 1) / 1.6 = 0.375 of every step: 30 steps after
    about 80 steps below the threshold."""
    report = StragglerPolicy(THRESHOLD, WINDOW, mode="report", evict_after=30)
    simulate(report, slow(1, 1.6, start=21), steps=200)
    assert report.flagged() == [1] and report.evict_candidate() is None

    evict = StragglerPolicy(THRESHOLD, WINDOW, mode="evict", evict_after=30)
    seen = []
    simulate(evict, slow(1, 1.6, start=21), steps=200,
             after_poll=lambda step: seen.append((step, evict.flagged(), evict.evict_candidate())))
    named = next(step for step, flagged, _ in seen if flagged)
    chosen = next(step for step, _, candidate in seen if candidate is not None)
    assert all(candidate in (None, 1) for _, _, candidate in seen)
    assert named < chosen == pytest.approx(21 + 30 / 0.375, abs=6)
    assert evict.cost_steps(1) == pytest.approx(0.375 * (200 - 21), rel=0.1)
    evict.forget()
    assert evict.flagged() == [] and evict.evict_candidate() is None


def test_a_rollback_scores_the_repeated_steps_afresh():
    """Steps that come again after a rollback replace the old ones; nothing is named twice."""
    policy = StragglerPolicy(THRESHOLD, WINDOW)
    simulate(policy, slow(1, 1.6, start=10), steps=60)
    assert policy.flagged() == [1]
    beats = {r: {"step": 40, "compute_s": [0.1] * 10, "wait_s": [0.0] * 10, "stage": 0, "island": 0}
             for r in range(4)}
    events = policy.observe(beats, NODES, now=0.0)
    beats = {r: {"step": 60, "compute_s": [0.1] * 30, "wait_s": [0.0] * 30, "stage": 0, "island": 0}
             for r in range(4)}
    events += policy.observe(beats, NODES, now=0.0)
    assert [(e, f["rank"]) for e, f in events] == [("straggler_cleared", 1)]


def test_peer_report_scores_the_shared_vector_like_the_supervisor():
    """Without a supervisor (torchrun) each rank fills its own slot of a vector that the
    step's all-reduce sums, and one rank scores the sums: the supervisor's events."""
    from atoll.trainer.stragglers import PeerReport

    reports = [PeerReport(StragglerPolicy(THRESHOLD, WINDOW), rank, [0] * 4, NODES) for rank in range(4)]
    assert reports[2].slots([0.3, 0.5]) == [0.0, 0.0, 0.5, 0.0] and reports[2].slots([]) == [0.0] * 4
    rng, history = random.Random(1), {r: [] for r in range(4)}
    supervised = StragglerPolicy(THRESHOLD, WINDOW)
    by_supervisor, by_peers = [], []
    for step in range(1, 101):
        for rank in range(4):
            history[rank].append(0.1 * slow(1, 1.6, start=30)(rank, step) * rng.lognormvariate(0, 0.05))
        summed = [sum(column) for column in zip(*(r.slots(history[r.rank]) for r in reports))]
        by_peers += reports[0].take(step, summed, now=0.0)
        beats = {r: {"step": step, "compute_s": history[r][-32:], "stage": 0, "island": 0} for r in range(4)}
        by_supervisor += supervised.observe(beats, NODES, now=0.0)
    assert [e for e, _ in by_peers] == ["straggler"] and by_peers == by_supervisor
    assert reports[0].take(100, summed, now=0.0) == []  # a skipped step: nothing new


@pytest.mark.slow
def test_a_rank_slowed_from_outside_is_named_under_torchrun(tmp_path):
    """Two torchrun ranks (DDP, as the default recipe runs), each pinned to a core of its own
    as ranks on devices of their own are; rank 1's process is stopped half of every 10 ms
    from step `onset` on (2x). Nobody is named before; rank 1, once, within
    straggler_window + 10 steps of the onset, on the console (the logging rank's report).

    At 1.67x (40%) it was named at onset + 22-23 when run alone, but twice in full suite
    runs the streak began 12 steps after the onset (named at onset + 31, one step late):
    something of the suite's load disturbs the first steps of the slowdown on these two
    cores. 2x keeps the test about naming in time, not about that load."""
    onset, steps = 45, 110
    run_dir = tmp_path / "run"
    recipe = [*TINY_MOE, "data.seq_len=128", "data.micro_batch=4", "parallel.dp=2", "parallel.dp_shard=ddp",
              f"run.steps={steps}", "checkpoint.interval=1000", f"run.dir={run_dir}"]
    proc = start_torchrun(["train", *recipe], 2, 0)
    with ended(proc):
        wait_for(lambda: last_step(run_dir) >= onset - 1, 240, proc, "training to start")
        ranks = torchrun_ranks(proc)
        with one_core_each([ranks["0"].pid, ranks["1"].pid]):
            first_touched = last_step(run_dir) + 1  # the step in progress may be slowed already
            with duty_cycle(ranks["1"].pid, 0.5, period_s=0.01):
                slowed_from = last_step(run_dir) + 1
                out, err = finish(proc, 300)
    assert proc.returncode == 0, err[-3000:]
    found = events(run_dir, "straggler")
    assert [e["rank"] for e in found] == [1], found
    # Named only once the slowdown began, and in time. The streak it names may begin a few
    # steps earlier, where rank 1 happened to be slower under the suite's load (since_step 40
    # for a slowdown from step 45 in one full-suite run): the score saw that, not a mistake.
    assert first_touched <= found[0]["step"] <= slowed_from + WINDOW + 10, (first_touched, found[0])
    assert found[0]["since_step"] <= found[0]["step"]
    assert found[0]["compute_s"] / found[0]["median_compute_s"] > 1.5, found[0]
    assert "straggler: rank 1 on node" in out + err

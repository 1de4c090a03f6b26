"""A straggler evicted from a real three-node Ray cluster on this machine.

Two ranks train on a cluster of three one-CPU nodes (test_elastic's
`LocalCluster`: head + 2 workers), so one node is free. Each rank is pinned to a
core of its own, as ranks on devices of their own are, and rank 1 is slowed from
outside, as a throttled GPU would be: SIGSTOP/SIGCONT duty-cycling of its process
(tests/slowdown.py), stopped half of every 10 ms (2x). The period is a fraction of a
step (~50 ms) so that every step is slowed alike: with a period near the step time
the stop drifts slowly across the step and, for runs of steps, falls where the slow
rank waits in a collective, which counts as waiting, not as compute. 2x, not the
1.67x of tests/test_stragglers.py's torchrun run: here the two cores also carry three
raylets, the keepers, the warm spares and the writers, all ahead of Ray's workers
(niceness 15), so the fast rank loses a quarter of its time too and a 1.67x duty cycle
scores about 0.68, on the threshold. The ranks run DDP, as the default recipe does.
With `fault_tolerance.straggler: evict` the supervisor names it, stops the group at
a step boundary once the straggler has cost `straggler_evict_after` steps, keeps its
node out and restarts on the free node from that step's memory snapshot (a snapshot
every 10 steps, and one at the stop: replicating one every step costs these two
cores half a core). The layout is unchanged, so the run must end bitwise equal to an
undisturbed run. Before the slowdown nobody is named; after it, rank 1 (only) within
straggler_window + 10 steps, on the console too (the detection is the same in report
mode).

The step time after the move against a clean run is measured by
benchmarks/straggler_evict.py, not asserted here: on this 2-core machine shared
with other jobs (load average 20-38 while this was written) the median of twenty
clean steps moved by 30% from one minute to the next and the 1.6x duty cycle
stretched the median step by only ~1.3x (the slow rank's compute time, which the
policy scores, shows it fully); a bound loose enough not to fail here (2.5x) would
assert nothing. The test prints the medians.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys

import pytest

from atoll.checkpoint.manifest import verify
from atoll.checkpoint.store import resolve_checkpoint
from atoll.trainer.metrics import read_jsonl
from conftest import TINY_MOE, assert_same_state, ended, events, finish, last_step, run_cli, subprocess_env, wait_for
from slowdown import duty_cycle, one_core_each, spares_warm
from test_elastic import LocalCluster

STEPS = 150
PERIOD_S = 0.01  # of the duty cycle: a step (~50 ms) spans several
STOPPED = 0.5  # of each period: 2x
MICRO_BATCH = 4
RECIPE = [*TINY_MOE, "data.seq_len=128", f"data.micro_batch={MICRO_BATCH}", "parallel.dp=2",
          f"run.steps={STEPS}", "optim.warmup_steps=0",
          "optim.min_lr_ratio=1.0", "checkpoint.interval=1000", "checkpoint.memory_interval=10",
          "parallel.dp_shard=ddp"]  # as the default recipe runs (TINY_MOE pins fsdp)
# A short window and eviction threshold keep the test short.
WINDOW = 10
EVICT = ["fault_tolerance.straggler=evict", f"fault_tolerance.straggler_window={WINDOW}",
         "fault_tolerance.straggler_evict_after=4", "fault_tolerance.straggler_cooldown_s=600"]
CLEAN_FROM = 5  # steps before this one warm up (imports, first allocations)
# The duty cycle starts after this step, and once the warm spare actors that a group starts after
# its first step have imported torch: the straggler policy holds its scores until then.
SLOW_FROM = 70
SETTLED_AFTER = 10  # steps after the restart before its step time counts (a new process warms up)


@pytest.fixture
def three_nodes(short_tmp):
    cluster = LocalCluster(2, short_tmp)
    yield cluster
    cluster.close()


def step_times(run_dir, first: int, last: int) -> list[float]:
    return [r["step_time_s"] for r in read_jsonl(run_dir / "metrics.jsonl") if first <= r["step"] <= last]


@pytest.mark.slow
def test_a_slow_rank_is_evicted_to_the_free_node_without_losing_a_sample(three_nodes, short_tmp, tmp_path):
    run_dir = tmp_path / "evict"
    proc = subprocess.Popen(
        [sys.executable, "-m", "atoll.launch", "train", *RECIPE, *EVICT, f"run.dir={run_dir}",
         f"launch.ray_address={three_nodes.info['address']}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(RAY_TMPDIR=str(short_tmp)))
    with ended(proc):
        wait_for(lambda: last_step(run_dir) >= SLOW_FROM and spares_warm(three_nodes.proc.pid), 240, proc,
                 "training to start and the spares to warm up")
        started = events(run_dir, "workers")
        assert len(started) == 1, [e for e in read_jsonl(run_dir / "events.jsonl")
                                   if e["event"] in ("workers", "failure", "straggler", "restart")]
        first = started[0]
        slow = first["ranks"][1]
        with one_core_each([r["pid"] for r in first["ranks"]]):
            # The step in progress when the cycle starts may already be slowed (first_touched);
            # from slowed_from on, every step is.
            first_touched = last_step(run_dir) + 1
            with duty_cycle(slow["pid"], STOPPED, period_s=PERIOD_S):
                slowed_from = last_step(run_dir) + 1
                wait_for(lambda: len(events(run_dir, "workers")) > 1, 240, proc, "the eviction")
        out, err = finish(proc, 300)
    assert proc.returncode == 0, err[-3000:]

    # Named within straggler_window + 10 steps of the onset, and nobody in the clean phase.
    found = events(run_dir, "straggler")
    assert {e["rank"] for e in found} == {1}, found
    named = found[0]
    assert named["node"] == slow["node"], named
    assert first_touched <= named["since_step"] and named["step"] <= slowed_from + WINDOW + 10, (first_touched, named)
    assert named["compute_s"] / named["median_compute_s"] > 1.3, named
    assert "straggler: rank 1 on node" in out + err
    failure, = events(run_dir, "failure")
    assert failure["kind"] == "straggler" and (failure["rank"], failure["pid"]) == (1, slow["pid"])
    assert failure["step"] >= first_touched
    assert failure["node"] == slow["node"] and "straggler_cooldown_s" in failure["message"]
    assert float(re.search(r"computes ([\d.]+)x", failure["message"])[1]) > 1.3, failure["message"]
    moved = events(run_dir, "workers")[1]
    assert moved["world"] == 2 and slow["node"] not in {r["node"] for r in moved["ranks"]}
    restart, = events(run_dir, "restart")
    assert restart["source"] == "memory" and restart["lost_steps"] == 0
    assert not events(run_dir, "resize")  # a free node: the layout did not change

    # Every step logged once, every sample consumed once, and the state of an undisturbed run.
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert verify(resolve_checkpoint(run_dir))["samples"] == STEPS * 2 * MICRO_BATCH  # steps × dp × micro_batch
    reference = tmp_path / "reference"
    done = run_cli(["train", *RECIPE, f"run.dir={reference}"], torchrun_procs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")] == \
        [r["loss"] for r in read_jsonl(reference / "metrics.jsonl")]
    assert_same_state(run_dir, reference)

    clean = step_times(run_dir, CLEAN_FROM, first_touched - 1)
    after = step_times(run_dir, restart["resume_step"] + SETTLED_AFTER, STEPS) or [float("nan")]
    print(f"median step time: clean {statistics.median(clean):.4f}s, after the move "
          f"{statistics.median(after):.4f}s (not asserted: see above)")

"""Fault tolerance on a real local Ray cluster and under torchrun: kill, hang, recover, bit-exact.

Every run here is real: worker processes are killed with SIGKILL or stopped
with SIGSTOP by their OS process id (from the `workers` events), and the
final parameters and optimizer moments are compared bitwise with a run that
never failed.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time

import psutil
import pytest

from atoll.checkpoint.snapshot_store import shm_root
from conftest import (DP2_SIXTY, TINY_MOE, assert_same_state, ended, events, finish, last_step,
                      losses, start_ray_run, start_torchrun, torchrun_ranks, wait_for)


CHAOS = [*DP2_SIXTY, "checkpoint.interval=10", "checkpoint.memory_interval=1", "fault_tolerance.max_restarts=10"]


@pytest.mark.slow
def test_chaos_kills_on_ray_end_bitwise_equal(short_tmp, dp2_sixty_reference):
    """Six SIGKILLs of random ranks (one while a disk checkpoint is in flight, one while the
    group restarts); the run finishes with the state of a run that never failed. Every
    restart breaks its recovery down by phase."""
    reference = dp2_sixty_reference
    run_dir = short_tmp / "chaos"
    rng = random.Random(0)
    proc = start_ray_run([*CHAOS, f"run.dir={run_dir}"], short_tmp)
    with ended(proc):
        def kill_random(reason: str) -> None:
            pids = [r["pid"] for r in events(run_dir, "workers")[-1]["ranks"]]
            victim = rng.choice(pids)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
            kills.append((reason, victim))

        def progressed(steps: int):
            start = last_step(run_dir)
            return lambda: last_step(run_dir) >= start + steps

        kills: list = []
        wait_for(lambda: last_step(run_dir) >= 3, 120, proc, "training to start")
        for _ in range(2):
            kill_random("training")
            wait_for(lambda: len(events(run_dir, "restart")) == len(kills), 60, proc, "a restart")
            wait_for(progressed(2), 60, proc, "progress after a restart")
        # While a disk checkpoint is in flight: its .partial folder exists.
        wait_for(lambda: list((run_dir / "checkpoints").glob("*.partial")), 60, proc, "a save")
        kill_random("saving")
        # During the restart: the new group exists but has not stepped yet.
        workers_seen = len(events(run_dir, "workers"))
        wait_for(lambda: len(events(run_dir, "workers")) > workers_seen, 60, proc, "a new group")
        kill_random("restarting")
        wait_for(lambda: len(events(run_dir, "restart")) >= 3, 60, proc, "a restart")
        for _ in range(2):
            wait_for(progressed(2), 60, proc, "progress")
            restarts = len(events(run_dir, "restart"))
            kill_random("training")
            wait_for(lambda: len(events(run_dir, "restart")) > restarts, 60, proc, "a restart")
        out, err = finish(proc, 300)
    assert proc.returncode == 0, err[-3000:]
    failures = events(run_dir, "failure")
    assert len(failures) == len(kills) == 6
    assert {f["pid"] for f in failures} == {pid for _, pid in kills}
    assert all(f["kind"] == "died" and f["detected_s"] <= 1.0 for f in failures), failures
    restarts = events(run_dir, "restart")
    assert all(r["source"] == "memory" and r["lost_steps"] <= 1 for r in restarts[1:]), restarts
    for restart in restarts:
        assert list(restart["breakdown"]) == ["detect", "kill", "place", "start", "rendezvous", "build",
                                              "restore", "first_step"], restart
        assert all(v >= 0 for v in restart["breakdown"].values()), restart
    assert losses(run_dir) == losses(reference)
    assert_same_state(run_dir, reference)


@pytest.mark.slow
def test_a_killed_ranks_peer_keeps_its_process_for_the_next_group(short_tmp):
    """After a SIGKILL the surviving rank's process serves the new group (only the killed rank
    is replaced), also a second time when the reused process itself is killed, with
    asynchronous disk checkpoints on as by default (their writer processes must not hold a
    survivor up); the restarts resume from memory and their events break the recovery down
    by phase."""
    run_dir = short_tmp / "survivor"
    proc = start_ray_run([*TINY_MOE, "parallel.dp=2", "run.steps=16", "checkpoint.interval=100",
                          "checkpoint.memory_interval=1", f"run.dir={run_dir}"], short_tmp)
    with ended(proc):
        killed = []
        for restarts in range(2):
            wait_for(lambda: last_step(run_dir) >= 3 + 3 * restarts
                     and len(events(run_dir, "workers")) == restarts + 1, 120, proc, "training")
            pids = [r["pid"] for r in events(run_dir, "workers")[-1]["ranks"]]
            first_group = {r["pid"] for r in events(run_dir, "workers")[0]["ranks"]}
            reused = [pid for pid in pids if pid in first_group]
            assert restarts == 0 or reused, (pids, first_group)
            victim = pids[0] if restarts == 0 else reused[0]  # the second time, the reused process
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            wait_for(lambda: len(events(run_dir, "restart")) > restarts, 120, proc, "a restart")
        out, err = finish(proc, 300)
    assert proc.returncode == 0, err[-3000:]
    groups = [{r["pid"] for r in e["ranks"]} for e in events(run_dir, "workers")]
    assert len(groups) == 3
    for before, after, victim in zip(groups, groups[1:], killed):
        assert before - {victim} <= after and victim not in after, (groups, killed)
    restarts = events(run_dir, "restart")
    assert all(r["source"] == "memory" and r["lost_steps"] <= 1 for r in restarts), restarts
    for restart in restarts:
        assert list(restart["breakdown"]) == ["detect", "kill", "place", "start", "rendezvous", "build",
                                              "restore", "first_step"], restart
        assert all(v >= 0 for v in restart["breakdown"].values()), restart


@pytest.mark.slow
def test_torchrun_restart_resumes_from_shared_memory_bitwise(tmp_path, short_tmp, dp2_sixty_reference):
    """torchrun --max-restarts: a killed rank makes torchrun restart both; they resume from the
    /dev/shm snapshots and end with the state of a run that never failed; nothing is left in
    /dev/shm."""
    args = [*DP2_SIXTY, "checkpoint.interval=15", "checkpoint.memory_interval=1"]
    reference = dp2_sixty_reference
    run_dir = tmp_path / "restarted"
    proc = start_torchrun(["train", *args, f"run.dir={run_dir}"], procs=2, max_restarts=2)
    with ended(proc):
        # After the first commit: the checkpoint writer process is up.
        wait_for(lambda: events(run_dir, "checkpoint_commit") and last_step(run_dir) >= 20, 120, proc,
                 "training to pass the disk checkpoint")
        ranks = torchrun_ranks(proc)
        assert set(ranks) == {"0", "1"}
        ranks["1"].kill()
        out, err = finish(proc, 300)
    assert proc.returncode == 0, err[-3000:]
    resumes = events(run_dir, "resume")
    assert len(resumes) == 1 and resumes[0]["source"] == "memory" and resumes[0]["step"] >= 20
    assert losses(run_dir) == losses(reference)
    assert_same_state(run_dir, reference)
    family = shm_root(str(run_dir)).name.split(".", 1)[0]  # the run's folders, whatever the job id
    assert not list(shm_root(str(run_dir)).parent.glob(f"{family}.*"))


@pytest.mark.slow
def test_stopped_rank_is_a_hang_detected_in_time(short_tmp):
    """SIGSTOP one rank: no step completes, the group is failed within hang_timeout_s + 2 s,
    the stopped process is killed with its group, and the run finishes from memory."""
    run_dir = short_tmp / "hang"
    proc = start_ray_run([*TINY_MOE, "parallel.dp=2", "run.steps=30", "checkpoint.interval=0",
                          "checkpoint.memory_interval=1", "fault_tolerance.hang_timeout_s=6",
                          f"run.dir={run_dir}"], short_tmp)
    with ended(proc):
        wait_for(lambda: last_step(run_dir) >= 5, 120, proc, "training to start")
        victim = psutil.Process(events(run_dir, "workers")[-1]["ranks"][1]["pid"])
        victim.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        failure = wait_for(lambda: events(run_dir, "failure"), 60, proc, "the hang")[0]
        out, err = finish(proc, 300)
    assert proc.returncode == 0, err[-3000:]
    assert failure["kind"] == "hang" and 6 <= failure["detected_s"] <= 8
    assert failure["time"] - stopped_at <= 6 + 2
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
    restart = events(run_dir, "restart")[0]
    assert restart["source"] == "memory" and restart["lost_steps"] <= 1
    assert last_step(run_dir) == 30

"""SIGINT and SIGTERM stop a run at a step boundary with a checkpoint; the rerun loses nothing.

The first signal asks every rank to stop after its step in progress and commit a
disk checkpoint (here before the first interval checkpoint would have come); the
same command run again resumes there and ends bitwise where an uninterrupted run
ends. A second signal, or a stop past `fault_tolerance.stop_grace_s`, ends the
run at once without a new checkpoint and leaves the newest committed one intact.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from atoll.checkpoint.manifest import verify
from atoll.checkpoint.snapshot_store import shm_root
from atoll.checkpoint.store import committed, read_latest
from conftest import (DP2_SIXTY, assert_same_state, ended, events, finish, last_step, run_cli, start_torchrun,
                      subprocess_env, torchrun_ranks, wait_for)

# Checkpoints every 50 steps: a stop at step ~5 would otherwise have nothing on disk.
RECIPE = [*DP2_SIXTY, "checkpoint.interval=50"]
STOPPED = r"atoll: stopped at step (\d+): checkpoint step-0*(\d+) saved; rerun the same command to continue"


@pytest.fixture
def uninterrupted(dp2_sixty_reference):
    return dp2_sixty_reference


def assert_stopped(run_dir, err: str, signal_name: str) -> int:
    """One line names the step and its checkpoint; `stop` and `run_end` events say the same."""
    line = next(line for line in err.splitlines() if line.startswith("atoll: stopped"))
    found = re.fullmatch(STOPPED, line)
    assert found and found[1] == found[2], line
    step = int(found[1])
    assert 5 <= step < 60
    stop, = events(run_dir, "stop")
    assert stop["signal"] == signal_name and stop["step"] == step
    assert stop["checkpoint"] == str(committed(run_dir / "checkpoints")[-1][1])
    verify(read_latest(run_dir / "checkpoints"))
    end = events(run_dir, "run_end")[-1]
    assert end["status"] == "stopped" and end["steps"] == step
    return step


@pytest.mark.slow
def test_ctrl_c_on_ray_stops_with_a_checkpoint_and_the_rerun_is_bitwise(short_tmp, uninterrupted):
    run_dir = short_tmp / "run"
    args = [*RECIPE, "logging.log_interval=1", f"run.dir={run_dir}"]
    env = subprocess_env(RAY_TMPDIR=str(short_tmp))
    proc = subprocess.Popen([sys.executable, "-m", "atoll.launch", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    with ended(proc):
        wait_for(lambda: last_step(run_dir) >= 5, 180, proc, "training to pass step 5")
        ranks = [psutil.Process(r["pid"]) for r in events(run_dir, "workers")[-1]["ranks"]]
        proc.send_signal(signal.SIGINT)
        _, err = finish(proc, 120)
    assert proc.returncode == 130, err[-3000:]
    assert_stopped(run_dir, err, "SIGINT")
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive
    # Any launcher continues it (torchrun starts sooner; test_elastic reruns a stopped job on Ray).
    rerun = run_cli(["train", *args], torchrun_procs=2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert events(run_dir, "run_start")[-1]["resume"]["source"] == "disk"
    assert_same_state(run_dir, uninterrupted)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_with_a_checkpoint_and_the_rerun_is_bitwise(tmp_path, uninterrupted):
    """A preemption: the scheduler's SIGTERM reaches torchrun, which passes it to its ranks."""
    run_dir = tmp_path / "run"
    args = ["train", *RECIPE, "logging.log_interval=1", f"run.dir={run_dir}"]
    proc = start_torchrun(args, procs=2, max_restarts=0)
    with ended(proc):
        wait_for(lambda: last_step(run_dir) >= 5, 180, proc, "training to pass step 5")
        ranks = list(torchrun_ranks(proc).values())
        proc.send_signal(signal.SIGTERM)
        _, err = finish(proc, 120)
    assert_stopped(run_dir, err, "SIGTERM")
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive
    assert not shm_root(str(run_dir.resolve())).exists()  # the checkpoint holds it all
    rerun = run_cli(args, torchrun_procs=2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_state(run_dir, uninterrupted)


@pytest.mark.slow
def test_a_step_that_cannot_end_in_time_stops_from_the_memory_snapshot(short_tmp, uninterrupted):
    """On Ray, a rank stuck in its step (here: SIGSTOPped) cannot reach the boundary: after a third
    of stop_grace_s the group is replaced by one that restores the newest memory snapshot and
    commits it to disk; the rerun goes on from there and ends bitwise on the uninterrupted run."""
    run_dir = short_tmp / "run"
    args = [*RECIPE, "logging.log_interval=1", "fault_tolerance.stop_grace_s=24", "checkpoint.memory_interval=1",
            f"run.dir={run_dir}"]
    env = subprocess_env(RAY_TMPDIR=str(short_tmp))
    proc = subprocess.Popen([sys.executable, "-m", "atoll.launch", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    with ended(proc):
        wait_for(lambda: last_step(run_dir) >= 5, 180, proc, "training to pass step 5")
        stuck = psutil.Process(events(run_dir, "workers")[-1]["ranks"][1]["pid"])
        stuck.suspend()
        reached = last_step(run_dir)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = finish(proc, 120)
    assert proc.returncode == 130, err[-3000:]
    line = next(line for line in err.splitlines() if line.startswith("atoll: stopped"))
    found = re.fullmatch(r"atoll: stopped at step (\d+) \(the newest memory snapshot: the step in progress "
                         r"did not end in time\): checkpoint step-0*(\d+) saved; rerun the same command "
                         r"to continue", line)
    assert found and found[1] == found[2], line
    step = int(found[1])
    # The newest complete snapshot: the step reached, or the one before when the stuck rank
    # was cut off while its snapshot was still being copied.
    assert reached - 1 <= step <= reached
    stop, = events(run_dir, "stop")
    assert stop["reason"] == "memory snapshot" and stop["step"] == step and stop["checkpoint"]
    verify(read_latest(run_dir / "checkpoints"))
    rerun = run_cli(["train", *args], torchrun_procs=2)  # any launcher continues it
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_state(run_dir, uninterrupted)


# Steps of about a second on one thread, so that a signal always lands inside one.
SLOW_STEPS = ["model.dim=256", "model.layers=2", "model.heads=4", "model.moe.num_experts=4",
              "data.seq_len=128", "data.micro_batch=48", "data.max_bytes=400000", "logging.wandb=disabled",
              "logging.eval_interval=0", "logging.log_interval=1", "launch.threads_per_worker=1",
              "launch.backend=local", "parallel.dp=1", "run.steps=1000", "checkpoint.interval=2",
              "checkpoint.async=false"]


@pytest.mark.parametrize("how", ["second signal", "grace period over"])
def test_a_stop_cut_short_leaves_the_newest_checkpoint_intact(tmp_path, how):
    run_dir = tmp_path / "run"
    grace = "0.2" if how == "grace period over" else "60"
    proc = subprocess.Popen([sys.executable, "-m", "atoll.launch", "train", *SLOW_STEPS,
                             f"fault_tolerance.stop_grace_s={grace}", f"run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    with ended(proc):
        wait_for(lambda: last_step(run_dir) >= 3, 120, proc, "a checkpoint and a step past it")
        before = committed(run_dir / "checkpoints")
        proc.send_signal(signal.SIGINT)
        if how == "second signal":
            time.sleep(0.3)  # two signals at once would reach the process as one
            proc.send_signal(signal.SIGINT)
        _, err = finish(proc, 60)
    assert proc.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    why = ("a second signal aborted the stop" if how == "second signal" else
           "the stop did not finish within fault_tolerance.stop_grace_s=0.2")
    newest = before[-1][1].name
    assert last == f"atoll: stopped without a new checkpoint: {why}; rerun the same command to continue " \
                   f"from {newest}", last
    assert committed(run_dir / "checkpoints") == before
    assert read_latest(run_dir / "checkpoints").name == newest
    verify(read_latest(run_dir / "checkpoints"))
    stop, = events(run_dir, "stop")
    assert stop["checkpoint"] is None and stop["reason"] == why

"""The worker group as one unit: a dead or stopped worker, or Ctrl-C, ends the whole run cleanly."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from atoll.checkpoint.snapshot_store import shm_root
from atoll.trainer.metrics import read_jsonl
from conftest import MARKER, SESSION_ID, TINY_MOE, free_port, subprocess_env


def start_long_ray_run(short_tmp, *extra: str) -> tuple[subprocess.Popen, object]:
    run_dir = short_tmp / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "atoll.launch", "train", *TINY_MOE, "run.steps=100000",
         "logging.log_interval=1", f"run.dir={run_dir}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(RAY_TMPDIR=str(short_tmp)))
    deadline = time.time() + 120
    while not read_jsonl(run_dir / "metrics.jsonl"):  # training is under way
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.5)
    return proc, run_dir


def workers_of_this_session() -> list[psutil.Process]:
    """Every TrainWorker actor process of this session: the group's ranks and warm spares."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "ray::TrainWorker" in " ".join(p.info["cmdline"] or []) and \
                    p.environ().get(MARKER) == SESSION_ID:
                found.append(p)
        except psutil.Error:
            continue
    return found


def group_ranks(run_dir) -> list[psutil.Process]:
    """The ranks of the newest worker group, by the pids its `workers` event names."""
    group = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "workers"][-1]
    return [psutil.Process(r["pid"]) for r in group["ranks"]]


def wait_gone(processes, timeout=30.0):
    gone, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"still running: {[p.pid for p in alive]}"


@pytest.mark.slow
def test_dead_worker_past_max_restarts_ends_run_with_one_line(short_tmp):
    proc, run_dir = start_long_ray_run(short_tmp, "fault_tolerance.max_restarts=0")
    ranks = group_ranks(run_dir)
    assert len(ranks) == 2
    workers = workers_of_this_session()  # the ranks and the warm spares
    ranks[1].kill()  # a machine failure, as far as the run can tell
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"atoll: error: worker rank [01] (died|failed): .+ \(gave up after 0 restarts, "
                        r"fault_tolerance.max_restarts=0\)", last), last
    wait_gone(workers)


@pytest.mark.slow
def test_torchrun_rank_stopped_alone_ends_the_job(tmp_path):
    """SIGTERM to one rank (a preempted process): its peers learn of it through the step's
    all-reduce, every rank stops at the same step with a checkpoint, torchrun sees them exit
    and ends the job instead of every rank waiting on the others; and the job, with no restart
    left, leaves no memory snapshot in /dev/shm."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
         "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "atoll.launch", "train",
         *TINY_MOE, "run.steps=100000", "parallel.dp=2",
         "checkpoint.interval=0", f"run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.time() + 120
        while not read_jsonl(run_dir / "metrics.jsonl"):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.5)
        ranks = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "atoll.launch" in " ".join(child.cmdline()):
                    ranks[child.environ().get("RANK")] = child
        assert set(ranks) == {"0", "1"}
        ranks["1"].send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert re.search(r"atoll: stopped at step \d+: checkpoint step-\d+ saved", err), err[-3000:]
        wait_gone(list(ranks.values()))
        # No restart is left to resume from them: the job's memory snapshots are gone too.
        assert not shm_root(str(run_dir.resolve())).exists()
    finally:  # a hung job must not outlive the test
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            proc.kill()
            proc.wait()

"""Elastic training and job submission on a real multi-node Ray cluster on this machine.

`ray_cluster_script.py` runs the cluster (Ray's `cluster_utils.Cluster`, one
CPU per node) in a process of its own; the run joins it with
`launch.ray_address`. A node is lost by killing all of its processes at once:
its rank dies, its snapshot keeper with it, and the run must resume from the
replicas on the other node, shrink to what is left and grow back when a node
is added, consuming every sample exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from atoll.checkpoint.manifest import verify
from atoll.checkpoint.store import resolve_checkpoint
from atoll.trainer.config import recipes_dir
from atoll.trainer.metrics import read_jsonl
from conftest import (TINY_MOE, assert_same_state, ended, events, finish, free_port, grad_norms, last_step,
                      losses, run_cli, subprocess_env, wait_for)

CLUSTER_SCRIPT = Path(__file__).with_name("ray_cluster_script.py")
# A constant learning rate, so the reference's stops and resumes see the same schedule.
ELASTIC = [*TINY_MOE, "parallel.dp=2", "run.steps=80", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
           "checkpoint.interval=1000", "checkpoint.memory_interval=1"]


class LocalCluster:
    """The cluster script's process: `command("remove")`, `command("add")`."""

    def __init__(self, workers: int, ray_tmp: Path, dashboard: bool = False):
        cmd = [sys.executable, str(CLUSTER_SCRIPT), str(workers)] + (["--dashboard"] if dashboard else [])
        # Jobs run `atoll` from the cluster's environment: this test's virtual environment.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=subprocess_env(RAY_TMPDIR=str(ray_tmp), PATH=path))
        self.info = self._answer()

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("cluster: "):
                # Whatever Ray wrote right after the answer, on the same line, is not part of it.
                return json.JSONDecoder().raw_decode(line.removeprefix("cluster: "))[0]
        raise AssertionError(f"the cluster script ended (exit {self.proc.wait()})")

    def command(self, name: str) -> dict:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        """Shut the cluster down; its processes (the dashboard's helpers end a little after
        the dashboard) get a few seconds to go, then are ended by their ids."""
        started = []
        with contextlib.suppress(psutil.Error):
            started = psutil.Process(self.proc.pid).children(recursive=True)
        with contextlib.suppress(OSError):
            self.proc.stdin.write("exit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _, alive = psutil.wait_procs(started, timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.fixture
def two_nodes(short_tmp):
    cluster = LocalCluster(1, short_tmp)
    yield cluster
    cluster.close()


@pytest.mark.slow
def test_node_loss_resumes_from_replicas_shrinks_and_grows_back(two_nodes, short_tmp, tmp_path):
    """Lose the worker node at step ≥ 10: detected within 5 s, resumed from the copy of its
    snapshot on the head node, run on one worker with grad_accum 2, grown back to two when a
    node joins; the end state is bitwise that of a run which stops and resumes at the same steps
    with the same layouts, and every sample was consumed once."""
    run_dir = tmp_path / "elastic"
    proc = subprocess.Popen(
        [sys.executable, "-m", "atoll.launch", "train", *ELASTIC, f"run.dir={run_dir}",
         f"launch.ray_address={two_nodes.info['address']}", "fault_tolerance.min_workers=1",
         "fault_tolerance.placement_timeout_s=3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(RAY_TMPDIR=str(short_tmp)))
    with ended(proc):
        wait_for(lambda: last_step(run_dir) >= 10, 180, proc, "training to start")
        nodes = {r["node"] for r in events(run_dir, "workers")[0]["ranks"]}
        assert len(nodes) == 2  # one rank per node
        two_nodes.command("remove")
        wait_for(lambda: len(events(run_dir, "workers")) > 1 and last_step(run_dir) >= 40, 60, proc,
                 "the shrink")
        # The one-worker group trains its last ~40 steps in about 2 s, less than a node takes to
        # join here: its rank waits, stopped, until the node is in, so that the run grows back
        # before it ends (the rank's state, and so the numbers, do not change).
        alone = events(run_dir, "workers")[1]["ranks"][0]["pid"]
        os.kill(alone, signal.SIGSTOP)
        try:
            two_nodes.command("add")
        finally:
            os.kill(alone, signal.SIGCONT)
        out, err = finish(proc, 300)
    assert proc.returncode == 0, err[-3000:]

    failure, = events(run_dir, "failure")
    assert failure["kind"] == "node_lost" and failure["detected_s"] <= 5
    shrink, grow = events(run_dir, "resize")
    assert (shrink["from_world"], shrink["to_world"], shrink["grad_accum"]) == (2, 1, 2)
    assert (grow["from_world"], grow["to_world"], grow["grad_accum"]) == (1, 2, 1)
    assert [e["world"] for e in events(run_dir, "workers")] == [2, 1, 2]
    restart, = events(run_dir, "restart")
    assert restart["source"] == "memory" and restart["world"] == 1
    resumed, grown = restart["resume_step"], grow["step"]
    # At most memory_interval steps lost, plus one when the node died while the newest snapshot
    # was still being copied beside the next step (a snapshot_failed event names it), plus one
    # when the lost node's newest replica had not reached the head yet: on these two cores the
    # copy to the other node can take longer than a ~40 ms step.
    cut_off = [e["step"] for e in events(run_dir, "snapshot_failed") if e["step"] == failure["step"] - 1]
    assert failure["step"] - 2 - len(cut_off) <= resumed < grown < 80

    # The same schedule of layouts with stops and resumes through disk checkpoints.
    reference = tmp_path / "reference"
    for args, procs in ((["parallel.dp=2", f"run.stop_at={resumed}"], 2),
                        (["parallel.dp=1", "data.grad_accum=2", f"run.stop_at={grown}"], 1),
                        (["parallel.dp=2"], 2)):
        done = run_cli(["train", *ELASTIC, *args, f"run.dir={reference}"], torchrun_procs=procs)
        assert done.returncode == 0, done.stderr[-3000:]
    assert losses(run_dir) == losses(reference)
    assert grad_norms(run_dir) == grad_norms(reference)
    assert_same_state(run_dir, reference)
    manifest = verify(resolve_checkpoint(run_dir))
    assert manifest["samples"] == 80 * 2 * 2  # steps × dp × micro_batch: each sample once
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 81))


class RayStartCluster:
    """`ray start --head` with Ray's default settings, as a user starts one (token authentication
    on: this HOME holds a token, as any machine does once it has run a local Ray cluster).

    Its processes are found by a tag in the environment they inherit and ended by their ids."""

    def __init__(self, home: Path, ray_tmp: Path):
        self.tag = f"atoll-test-cluster-{os.getpid()}-{id(self)}"
        self.dashboard, self.gcs = free_port(), free_port()
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        self.env = subprocess_env(HOME=str(home), RAY_TMPDIR=str(ray_tmp), PATH=path,
                                  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", ATOLL_TEST_CLUSTER=self.tag)
        self.env.pop("RAY_AUTH_MODE", None)
        ray = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True)
        self.address = f"http://127.0.0.1:{self.dashboard}"
        started = subprocess.run(
            [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs}", "--num-cpus=2",
             f"--dashboard-port={self.dashboard}", "--object-store-memory=200000000",
             # Ports of its own, so that no other Ray on this machine keeps its job agent out.
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             "--disable-usage-stats"], env=self.env, capture_output=True, text=True, timeout=120)
        if started.returncode != 0 or "Token authentication is enabled" not in started.stdout + started.stderr:
            self.close()
            raise AssertionError(f"ray start: {started.stderr[-3000:]}")
        # What the README tells a submitter to set; the token is this HOME's.
        self.client_env = dict(self.env, RAY_AUTH_MODE="token")

    def wait_ready(self, timeout: float = 240) -> None:
        """Until the cluster takes jobs: its job agent comes up a while after `ray start` returns."""
        deadline = time.time() + timeout
        while True:
            probe = subprocess.run(self.job("submit", "--", "true"), env=self.client_env,
                                   capture_output=True, text=True, timeout=120)
            if probe.returncode == 0:
                return
            assert time.time() < deadline, probe.stderr[-300:]
            time.sleep(2)

    def job(self, *args: str, **kwargs) -> list[str]:
        return [str(Path(sys.executable).with_name("ray")), "job", *args, "--address", self.address]

    def close(self) -> None:
        ours = []
        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("ATOLL_TEST_CLUSTER") == self.tag:
                    ours.append(proc)
        for proc in ours:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(ours, timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.mark.slow
def test_ray_job_on_a_ray_start_cluster_recovers_stops_and_resumes(short_tmp, tmp_path, dp2_sixty_reference):
    """The README's `ray job submit` against `ray start --head` with default settings (token
    authentication on): the job's driver joins the cluster, a SIGKILLed rank is restarted from
    memory, `ray job stop` stops the job at a step boundary with a checkpoint, and the same
    command submitted again ends on the uninterrupted run's final weights (conftest's DP2_SIXTY:
    tiny.yaml and the overrides are that recipe)."""
    cluster = RayStartCluster(tmp_path / "home", short_tmp)
    work = tmp_path / "work"
    work.mkdir()
    # The default recipe as a user's file, renamed and shortened to conftest's DP2_SIXTY.
    default = (recipes_dir() / "default.yaml").read_text()
    (work / "tiny.yaml").write_text(default.replace("name: default", "name: tiny")
                                    .replace("steps: 200", "steps: 60"))
    run_dir = tmp_path / "job-run"
    args = ["--working-dir", str(work), "--runtime-env-json",
            json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}}),
            "--", "atoll", "train", "tiny.yaml", "launch.ray_address=auto", f"run.dir={run_dir}",
            *TINY_MOE, "parallel.dp=2", "checkpoint.interval=1000"]
    try:
        cluster.wait_ready()
        submit = subprocess.Popen(cluster.job("submit", "--submission-id", "first") + args,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=cluster.client_env)
        with ended(submit):
            wait_for(lambda: last_step(run_dir) >= 5, 180, submit, "the job to train")
            os.kill(events(run_dir, "workers")[0]["ranks"][1]["pid"], signal.SIGKILL)
            wait_for(lambda: events(run_dir, "restart") and last_step(run_dir) >= 15, 180, submit,
                     "the restarted group to train")
            stop = subprocess.run(cluster.job("stop", "first"), env=cluster.client_env,
                                  capture_output=True, text=True, timeout=120)
            assert stop.returncode == 0, stop.stderr[-2000:]
            out, err = finish(submit, 120)
        stopped, = events(run_dir, "stop")
        assert stopped["signal"] == "SIGTERM" and stopped["checkpoint"], stopped
        # The stop saves the step in progress, or (where that step cannot end within the grace,
        # as on a loaded machine) the newest memory snapshot's: either says so in one line.
        assert re.search(rf"atoll: stopped at step {stopped['step']}( \(the newest memory snapshot[^)]*\))?: "
                         rf"checkpoint step-0*{stopped['step']} saved; rerun the same command to continue",
                         out + err)
        assert stopped["step"] < 60
        assert events(run_dir, "run_end")[-1]["status"] == "stopped"
        again = subprocess.run(cluster.job("submit", "--submission-id", "second") + args,
                               env=cluster.client_env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    finally:
        cluster.close()
    failure, = events(run_dir, "failure")
    restart, = events(run_dir, "restart")
    assert failure["kind"] == "died" and restart["source"] == "memory"
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 61))
    assert_same_state(run_dir, dp2_sixty_reference)

"""Shared test helpers: small recipes, CLI subprocesses and a leftover-process check."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU interpreter here. Triton reads this when it is
    # first imported (DeepSpeed imports it too), so it is set before anything else.
    os.environ.setdefault("TRITON_INTERPRET", "1")
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from atoll.trainer.metrics import read_jsonl

# A tiny MoE that trains in well under a second per step on one core.
TINY_MOE = [
    "model.dim=64", "model.layers=2", "model.heads=4", "model.moe.num_experts=4",
    "model.moe.top_k=2", "data.seq_len=32", "data.micro_batch=2", "data.max_bytes=400000",
    "logging.wandb=disabled", "logging.eval_interval=0", "logging.log_interval=1",
    "launch.threads_per_worker=1",
]

# Every subprocess a test starts carries this marker in its environment, so
# the session can prove none of them (nor their children) outlived the suite.
MARKER = "ATOLL_TEST_SESSION"
SESSION_ID = f"{os.getpid()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1", **extra)
    env[MARKER] = SESSION_ID
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_cli(args: list[str], timeout: float = 300, env: dict | None = None,
            torchrun_procs: int = 0) -> subprocess.CompletedProcess:
    """`atoll ...` (or torchrun with N processes) in a subprocess, output captured."""
    if torchrun_procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={torchrun_procs}",
               "--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
               "-m", "atoll.launch", *args]
    else:
        cmd = [sys.executable, "-m", "atoll.launch", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or subprocess_env())


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


@pytest.fixture
def short_tmp():
    """A short path for Ray's session folder (unix sockets cap path length)."""
    path = tempfile.mkdtemp(prefix="atoll-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """GPU checks are deselected (not skipped) on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def _marked_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARKER) == SESSION_ID:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_processes_left_behind():
    yield
    leftovers = _marked_processes()
    if leftovers:
        names = [f"{p.pid}:{' '.join(p.cmdline()[:3])}" for p in leftovers]
        for proc in leftovers:  # ours, found by the marker we set: safe to end
            proc.kill()
        pytest.fail(f"processes left behind by the test suite: {names}")

"""atoll's checkpoint writer process: DCP's file format, hashes taken while writing, failures.

A real trainer (one gloo rank) saves asynchronously through its own spawned
writer process; the files are read back with torch's stock
`FileSystemReader`, and the manifest's hashes are checked against the bytes
on disk.
"""

from __future__ import annotations

import ast
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from atoll.checkpoint import manifest as manifest_module
from atoll.checkpoint.manifest import hash_file, read_manifest
from atoll.checkpoint.state import split_state
from atoll.trainer.config import load_recipe
from atoll.trainer.metrics import read_jsonl
from atoll.trainer.train import Trainer
from conftest import TINY_MOE

BASE = [*TINY_MOE, "launch.backend=local", "parallel.dp=1", "checkpoint.interval=2", "checkpoint.async=true",
        "checkpoint.memory_interval=0", "checkpoint.keep=5", "run.steps=100", "logging.wandb=disabled"]
CHECKPOINT_SOURCES = Path(__file__).resolve().parent.parent / "checkpoint"


def commits(run_dir: Path) -> list[int]:
    return [e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "checkpoint_commit"]


def failures(run_dir: Path) -> list[str]:
    return [e["error"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "checkpoint_failed"]


def wait_until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def trainer(tmp_path):
    saved_env = dict(os.environ)  # the trainer sets MASTER_ADDR/PORT for its 1-rank group
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # a free port of its own, whatever ran before
        os.environ.pop(name, None)
    trainer = Trainer(load_recipe(None, [*BASE, f"run.dir={tmp_path / 'run'}"]))
    try:
        yield trainer
    finally:
        trainer.close()
        os.environ.clear()
        os.environ.update(saved_env)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # dcp.load in this process
def test_async_save_writes_stock_dcp_files_hashed_by_the_writer(trainer, tmp_path, monkeypatch):
    rehashed = []
    monkeypatch.setattr(manifest_module, "hash_file", lambda path: rehashed.append(path.name) or hash_file(path))
    for _ in range(2):
        trainer.one_step()
    saved = {name: tensor.clone() for name, tensor in split_state(trainer.states)[0].items()}
    trainer.checkpointer.wait()
    writer_pid = trainer.checkpointer.writer_process.pid
    assert writer_pid is not None and writer_pid != os.getpid()

    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    manifest = read_manifest(ckpt)
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp"]
    # The data file's hash came from the writer, computed as it wrote: the commit did not read it.
    assert rehashed == [".metadata"]
    for name, info in manifest["files"].items():
        assert info["size"] == (ckpt / name).stat().st_size
        assert info["sha256"] == hash_file(ckpt / name), name

    loaded = {name: torch.empty_like(tensor) for name, tensor in saved.items()}
    dcp.load(loaded, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    assert loaded.keys() == saved.keys() and len(saved) > 10
    for name in saved:
        assert torch.equal(loaded[name], saved[name]), name

    trainer.close()  # the error path: the writer is asked to stop and reaped in the background
    def writer_gone() -> bool:
        try:
            return psutil.Process(writer_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    wait_until(writer_gone, timeout=15)


def test_writer_runs_before_the_first_save_and_writes_it(trainer, tmp_path):
    """Spawned at the first save, the writer's interpreter (seconds of CPU importing torch)
    took cores from the steps after that save; it starts with the checkpointer instead."""
    writer_pid = trainer.checkpointer.writer_process.pid
    assert writer_pid is not None and psutil.Process(writer_pid).status() != psutil.STATUS_ZOMBIE
    for _ in range(2):
        trainer.one_step()
    trainer.checkpointer.wait()
    assert commits(tmp_path / "run") == [2]
    assert trainer.checkpointer.writer_process.pid == writer_pid


def test_writer_killed_mid_save_fails_that_save_and_the_next_one_commits(trainer, tmp_path):
    run_dir = tmp_path / "run"
    for _ in range(2):
        trainer.one_step()
    wait_until(lambda: commits(run_dir) == [2])
    writer = psutil.Process(trainer.checkpointer.writer_process.pid)
    writer.send_signal(signal.SIGSTOP)  # it cannot finish step 4's files before it dies
    try:
        for _ in range(2):
            trainer.one_step()
        save = trainer.checkpointer.in_flight
        assert save is not None and save.step == 4
        save.staged.result(timeout=60)  # training went on; the writer holds the job
        assert not save.done.done()
    finally:
        writer.kill()
    trainer.checkpointer.wait()
    assert failures(run_dir) == ["checkpoint of step 4 failed: rank 0: CheckpointError: the checkpoint writer "
                                 "process died (exit code -9)"]
    assert trainer.checkpointer.last_error == failures(run_dir)[0]
    assert not (run_dir / "checkpoints" / "step-00000004").exists()

    for _ in range(2):
        trainer.one_step()
    trainer.checkpointer.wait()
    assert commits(run_dir) == [2, 6] and trainer.checkpointer.last_error is None
    assert trainer.checkpointer.writer_process.pid != writer.pid
    manifest_module.verify(run_dir / "checkpoints" / "step-00000006")


def test_write_error_in_the_writer_is_one_line_and_loses_no_checkpoint(trainer, tmp_path):
    run_dir = tmp_path / "run"
    for _ in range(2):
        trainer.one_step()
    trainer.checkpointer.wait()
    # The writer process cannot create step 4's data file: a folder stands where it goes.
    (run_dir / "checkpoints" / "step-00000004.partial" / "__0_0.distcp").mkdir(parents=True)
    for _ in range(2):
        trainer.one_step()
    trainer.checkpointer.wait()
    [error] = failures(run_dir)
    assert error.startswith("checkpoint of step 4 failed: rank 0: CheckpointError: the checkpoint writer could "
                            "not write ") and "IsADirectoryError" in error and "\n" not in error
    assert commits(run_dir) == [2]
    manifest_module.verify(run_dir / "checkpoints" / "step-00000002")


def test_checkpoint_code_uses_no_private_torch_module_or_name():
    """A torch upgrade must not silently break saving: no `torch...._x` import anywhere in checkpoint/."""
    private = []
    for source in sorted(CHECKPOINT_SOURCES.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
                names = [node.module, *(alias.name for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.startswith("torch")]
            else:
                continue
            private += [f"{source.name}: {name}" for name in names
                        if any(part.startswith("_") for part in name.split("."))]
    assert private == []


def test_hash_of_a_reused_write_buffer_is_of_the_bytes_written(tmp_path):
    """Writes are hashed after the file is written (while it is fsynced): one from the stable
    memory is hashed from there, any other is copied first, since its writer may change the
    buffer as soon as `write` returns (torch.save reuses its record buffers)."""
    import hashlib

    from atoll.checkpoint.dcp_io import _HashingStream

    stable = torch.arange(1 << 19, dtype=torch.float32)  # 2 MiB that stay as they are
    reused = bytearray(b"\x01" * (3 << 20))
    path = tmp_path / "file"
    with open(path, "wb") as f:
        stream = _HashingStream(f, stable=(stable.data_ptr(), stable.numel() * 4))
        stream.write(memoryview(stable.numpy()).cast("B"))
        stream.write(reused)
        reused[:] = b"\x02" * len(reused)  # before anything was hashed
        digest = stream.finish()
    written = path.read_bytes()
    assert digest == hashlib.sha256(written).hexdigest() and stream.size == len(written) == 5 << 20
    assert written[2 << 20:] == b"\x01" * (3 << 20)

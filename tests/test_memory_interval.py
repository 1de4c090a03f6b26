"""Memory snapshots as the GPU path takes them, checked on CPU: one reused staging buffer whose
snapshots still hold their own step, and `checkpoint.memory_interval: auto`.

Real torch.distributed (gloo on 127.0.0.1), real /dev/shm-style stores and the real train loop.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from atoll.checkpoint.snapshot import MemorySnapshotter, ShmSnapshotStore, restore_snapshot
from atoll.checkpoint.snapshot_interval import COST_BUDGET, MEASURED_SNAPSHOTS, WARMUP_SNAPSHOTS, interval_for
from atoll.trainer.config import load_recipe
from atoll.trainer.hooks import RunControl
from atoll.trainer.metrics import read_jsonl
from atoll.trainer.train import Trainer
from conftest import TINY_MOE, free_port, run_two_ranks
from memory_interval_script import TensorState, snapshot_loop

SCRIPT = Path(__file__).with_name("memory_interval_script.py")
MEASURING = WARMUP_SNAPSHOTS + MEASURED_SNAPSHOTS  # steps snapshotted before the interval is chosen


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class GatedStore(ShmSnapshotStore):
    """Puts wait for `gate`: a store still busy with a shard when the loop moves on."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.gate = threading.Event()
        self.stored: list[int] = []

    def put_shard(self, step, rank, data):
        self.gate.wait(timeout=20)
        super().put_shard(step, rank, data)
        self.stored.append(step)


def test_staged_snapshots_reuse_one_buffer_and_hold_their_own_step(tmp_path, world_of_one):
    """Tensors the store cannot take as they are (here non-contiguous; on a GPU, all) are copied
    into one staging buffer: the loop goes on once they are there, before the store holds them,
    and the next snapshot copies into the same memory. A restore gives each step's own values."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = TensorState(weight=base.t(), moment=torch.arange(12.0).reshape(3, 4).t())
    store = GatedStore(tmp_path / "shm")
    snapshotter = MemorySnapshotter(store, rank=0, world=1, is_coordinator=True, interval=1)
    at_step_1 = {name: t.clone() for name, t in state.tensors.items()}
    snapshotter.save(1, {"state": state}, {"step": 1})
    snapshotter.wait_copied()
    assert store.stored == []  # copied, not yet stored: training may change the state now
    for tensor in state.tensors.values():  # the optimizer step
        tensor.mul_(-2)
    store.gate.set()
    assert snapshotter.wait(), snapshotter.last_error
    staging = snapshotter.buffer.data
    address = staging.data_ptr()

    fresh = TensorState(weight=torch.zeros(6, 4), moment=torch.zeros(4, 3))
    assert restore_snapshot(store, 1, {"state": fresh}, process_group=snapshotter.group) == {"step": 1}
    for name, value in at_step_1.items():
        assert torch.equal(fresh.tensors[name], value), name

    at_step_2 = {name: t.clone() for name, t in state.tensors.items()}
    snapshotter.save(2, {"state": state}, {"step": 2})
    snapshotter.wait_copied()
    for tensor in state.tensors.values():
        tensor.add_(100)
    assert snapshotter.wait(), snapshotter.last_error
    assert snapshotter.buffer.data is staging and staging.data_ptr() == address  # no new allocation
    assert restore_snapshot(store, 2, {"state": fresh}, process_group=snapshotter.group) == {"step": 2}
    for name, value in at_step_2.items():
        assert torch.equal(fresh.tensors[name], value), name
    snapshotter.close()


@pytest.mark.parametrize("kind", ["cheap", "costly"])
def test_auto_interval_keeps_the_snapshot_cost_within_five_percent(tmp_path, world_of_one, kind):
    """A tiny state beside a 0.2 s step costs far below 5%: every step. 32 MB beside a 5 ms step
    costs many steps' 5%: an interval above 1. Either way the first steps are snapshotted, the
    choice is made once, and the interval then holds."""
    values = torch.zeros(16) if kind == "cheap" else torch.zeros(8 << 20)
    step_s = 0.2 if kind == "cheap" else 0.005
    snapshotter = MemorySnapshotter(ShmSnapshotStore(tmp_path / "shm"), rank=0, world=1, is_coordinator=True,
                                    interval=None)
    assert snapshotter.due(1) and snapshotter.due(3)  # measuring: every step
    saved, choices = snapshot_loop(snapshotter, TensorState(values=values), steps=12, step_s=step_s)
    snapshotter.close()
    (chosen_at, choice), = choices
    assert chosen_at == MEASURING + 1 and snapshotter.interval == choice.interval
    assert choice.interval == interval_for(choice.snapshot_s, choice.step_s)
    assert choice.snapshot_s / choice.interval <= COST_BUDGET * choice.step_s
    assert saved == list(range(1, MEASURING + 1)) + [s for s in range(chosen_at, 13) if s % choice.interval == 0]
    if kind == "cheap":
        assert choice.interval == 1, choice
    else:
        assert choice.interval > 1 and choice.snapshot_s > COST_BUDGET * choice.step_s, choice


@pytest.mark.slow
def test_auto_interval_is_the_same_on_every_rank(tmp_path):
    """Two ranks whose snapshots cost differently (rank 1 holds 32 MB, rank 0 almost nothing)
    choose one interval: the one for the worst cost and the shortest step of the two."""
    run_two_ranks([str(SCRIPT), str(tmp_path / "shm"), str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["interval"] == ranks[1]["interval"] > 1
    assert ranks[0]["saved"] == ranks[1]["saved"] and ranks[0]["chosen_at"] == ranks[1]["chosen_at"]
    worst = max(r["own_snapshot_s"] for r in ranks)
    shortest = min(r["own_step_s"] for r in ranks)
    for r in ranks:
        assert (r["snapshot_s"], r["step_s"]) == (worst, shortest)
        assert r["interval"] == interval_for(worst, shortest) >= r["own_interval"]


class RecordingStore(ShmSnapshotStore):
    """Remembers every step it completed."""

    completed: list[int] = []

    def put_meta(self, step, world, meta):
        super().put_meta(step, world, meta)
        self.completed.append(step)


def test_training_with_auto_reports_the_interval_once_and_keeps_it(tmp_path, capsys):
    """The real loop (recipe default `auto`): snapshots at the first steps, one console line and
    one `memory_interval` event, then snapshots on that interval and at the last step."""
    cfg = load_recipe(None, [*TINY_MOE, "parallel.dp=1", "launch.backend=local", "run.steps=10",
                             "checkpoint.interval=0", f"run.dir={tmp_path / 'run'}"])
    assert cfg.checkpoint.memory_interval == "auto"
    store = RecordingStore(tmp_path / "shm")
    store.completed = []
    trainer = Trainer(cfg, control=RunControl(snapshot_store=store))
    try:
        trainer.run()
    finally:
        trainer.close()
    event, = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "memory_interval"]
    interval = event["interval"]
    assert event["step"] == MEASURING + 1 and interval == interval_for(event["snapshot_s"], event["step_s"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory snapshots every")]
    assert len(lines) == 1 and f"every {interval} step" in lines[0], lines
    after = [s for s in range(MEASURING + 1, 11) if s % interval == 0 or s == 10]
    assert store.completed == list(range(1, MEASURING + 1)) + after

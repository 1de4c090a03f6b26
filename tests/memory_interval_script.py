"""The train loop's use of a `MemorySnapshotter`, for test_memory_interval; run alone, one rank of its
two-process check.

    python memory_interval_script.py STORE OUT_DIR   (RANK, WORLD_SIZE=2, MASTER_* set)

Each rank snapshots a state of its own size with `checkpoint.memory_interval: auto` (rank 1's
is large, rank 0's tiny) and writes what it chose and what its own timings alone would give
to OUT_DIR/rank-<R>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch


class TensorState:
    """A Stateful holding tensors as they are (any strides)."""

    def __init__(self, **tensors: torch.Tensor):
        self.tensors = tensors

    def state_dict(self) -> dict:
        return dict(self.tensors)

    def load_state_dict(self, state: dict) -> None:
        for name, tensor in self.tensors.items():
            tensor.copy_(state[name])


def snapshot_loop(snapshotter, state: TensorState, steps: int, step_s: float) -> tuple[list[int], list]:
    """What Trainer.run and MemorySnapshotHook do, with a sleep for forward/backward and an
    in-place add for the optimizer step; returns the snapshotted steps and the choices made."""
    states, saved, choices = {"state": state}, [], []
    for step in range(1, steps + 1):
        time.sleep(step_s)
        snapshotter.wait_copied()
        for tensor in state.tensors.values():
            tensor.add_(1)
        choice = snapshotter.choose_interval()
        if choice is not None:
            choices.append((step, choice))
        if snapshotter.due(step):
            snapshotter.save(step, states, {"step": step})
            saved.append(step)
    assert snapshotter.wait(), snapshotter.last_error
    return saved, choices


def main(store_root: str, out_dir: str) -> None:
    import torch.distributed as dist

    from atoll.checkpoint.snapshot import MemorySnapshotter, ShmSnapshotStore
    from atoll.checkpoint.snapshot_interval import interval_for

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # Named apart: a plain tensor under the same name on both ranks is one replicated tensor to
    # DCP, which has one rank (rank 0, with its 16 values) save it for both.
    state = TensorState(large=torch.zeros(8 << 20)) if rank == 1 else TensorState(small=torch.zeros(16))
    snapshotter = MemorySnapshotter(ShmSnapshotStore(Path(store_root)), rank=rank, world=2,
                                    is_coordinator=rank == 0, interval=None)
    saved, choices = snapshot_loop(snapshotter, state, steps=8, step_s=0.01)
    own_snapshot_s, own_step_s = snapshotter.timings.estimate()
    (step, choice), = choices
    (Path(out_dir) / f"rank-{rank}.json").write_text(json.dumps({
        "saved": saved, "chosen_at": step, "interval": choice.interval, "snapshot_s": choice.snapshot_s,
        "step_s": choice.step_s, "own_snapshot_s": own_snapshot_s, "own_step_s": own_step_s,
        "own_interval": interval_for(own_snapshot_s, own_step_s)}))
    snapshotter.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    assert os.environ["WORLD_SIZE"] == "2"
    main(*sys.argv[1:3])

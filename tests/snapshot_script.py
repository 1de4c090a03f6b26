"""One rank of test_snapshot's two-process check, plus the tiny model both sides build.

    python snapshot_script.py ONE_STORE TWO_STORE OUT_DIR   (RANK, WORLD_SIZE=2, MASTER_* set)

Each rank shards the model with FSDP2 over 2 gloo ranks, then
1. restores the world-of-one snapshot of step 2 from ONE_STORE and writes
   the gathered full tensors to OUT_DIR/restored.pt (rank 0);
2. trains one step, snapshots step 3 into TWO_STORE and writes the gathered
   full tensors it snapshotted to OUT_DIR/saved.pt (rank 0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from atoll.checkpoint.state import ModelOptimizerState, ValueState, split_state
from atoll.trainer.config import ModelConfig, MoEConfig, OptimConfig
from atoll.trainer.model import Transformer
from atoll.trainer.optim import build_optimizer

VOCAB = 64


def tiny_states(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    """A tiny MoE transformer, its AdamW and the states a train loop would snapshot."""
    cfg = ModelConfig(dim=32, layers=2, heads=4, vocab_size=VOCAB, ffn_hidden=48,
                      moe=MoEConfig(num_experts=4, top_k=2, hidden=24))
    model = Transformer(cfg)
    model.init_weights(seed)
    return model, *_optimizer_and_states(model)


def _optimizer_and_states(model: nn.Module) -> tuple[torch.optim.Optimizer, dict]:
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    return optimizer, {"model_optim": ModelOptimizerState([(model, optimizer)]),
                       "progress": ValueState(step=0)}


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    for i in range(steps):
        tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed + i))
        logits, aux = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)) + aux
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def full_tensors(states: dict) -> dict[str, torch.Tensor]:
    """Every snapshotted tensor, gathered whole (a collective under FSDP: same order everywhere)."""
    from torch.distributed.tensor import DTensor

    tensors = split_state(states)[0]
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
            for name, t in sorted(tensors.items())}


def main(one_root: str, two_root: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from atoll.checkpoint.snapshot import MemorySnapshotter, ShmSnapshotStore, restore_snapshot

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, _, _ = tiny_states(seed=1)  # other weights than the snapshot: the restore is not vacuous
    mesh = init_device_mesh("cpu", (2,))
    for block in model.layers.values():  # as parallel/data_parallel.py shards them
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    optimizer, states = _optimizer_and_states(model)
    snapshotter = MemorySnapshotter(ShmSnapshotStore(Path(two_root)), rank=rank, world=2,
                                    is_coordinator=rank == 0, interval=1)

    extra = restore_snapshot(ShmSnapshotStore(Path(one_root)), 2, states, process_group=snapshotter.group)
    restored = full_tensors(states)
    if rank == 0:
        torch.save({"tensors": restored, "extra": extra, "progress": states["progress"].values},
                   Path(out_dir) / "restored.pt")

    train(model, optimizer, 1, seed=100 + rank)
    states["progress"].values["step"] = 3
    saved = full_tensors(states)
    snapshotter.save(3, states, extra={"from": "fsdp", "world": 2})
    snapshotter.wait_copied()
    assert snapshotter.wait(), snapshotter.last_error
    if rank == 0:
        torch.save({"tensors": saved}, Path(out_dir) / "saved.pt")
    snapshotter.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    assert os.environ["WORLD_SIZE"] == "2"
    main(*sys.argv[1:4])

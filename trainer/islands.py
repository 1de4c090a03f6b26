"""What a training process adds when it is one rank of a DiLoCo island.

The trainer asks this module for the island's link to the others (the
`OuterGroup`, on the store the run shares), the `DiLoCo` state of its model
parts, how its checkpoint saves join the other islands' and how a restarted
island takes its place again from a peer. The algorithm itself lives in
`atoll.parallel.diloco`; this module only wires it to a recipe and a mesh.
It never imports Ray: the store and the rejoin token come from the launcher.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from omegaconf import DictConfig

from atoll.checkpoint.checkpointer import IslandSaves
from atoll.checkpoint.manifest import CheckpointError
from atoll.checkpoint.snapshot_store import IslandSnapshotStore, SnapshotStore
from atoll.parallel.diloco import DiLoCo, fragment_of
from atoll.parallel.layout import ParallelMesh
from atoll.parallel.outer_group import DilocoError, OuterGroup
from atoll.parallel.pseudo_grad_codecs import make_codec
from atoll.trainer.config import DilocoConfig, as_dataclass
from atoll.trainer.optim import ScheduleState

if TYPE_CHECKING:
    from atoll.trainer.train import Trainer


def connect_islands(cfg: DictConfig, mesh: ParallelMesh, joining: bool) -> OuterGroup:
    """This rank's outer group; a restarted island connects only once it is admitted."""
    lo = as_dataclass(cfg.diloco, DilocoConfig)
    env = mesh.env
    return OuterGroup(mesh.store, env.island, cfg.diloco.islands, env.rank, lo.wait_timeout_s,
                      lo.bandwidth_mbit, island_all=mesh.all_of, joining=joining)


def build_diloco(cfg: DictConfig, parts: list[torch.nn.Module], outer: OuterGroup,
                 mesh: ParallelMesh) -> DiLoCo:
    lo = as_dataclass(cfg.diloco, DilocoConfig)

    def island_digest(shard_digest: str) -> str:
        """One sha256 for the island's shared state, from every rank's shard digest."""
        pieces = mesh.gather_objects(shard_digest)
        return pieces[0] if len(pieces) == 1 else hashlib.sha256("".join(pieces).encode()).hexdigest()

    return DiLoCo(
        [(n, p) for part in parts for n, p in part.named_parameters()],
        [(n, b) for part in parts for n, b in part.named_buffers() if n.endswith("expert_bias_E")],
        outer, inner_steps=lo.inner_steps, outer_lr=lo.outer_lr, outer_momentum=lo.outer_momentum,
        nesterov=lo.nesterov, codec=make_codec(lo.quantize, lo.int4_group), fragments=lo.fragments,
        fragment_of_name=lambda name: fragment_of(name, cfg.model.layers, lo.fragments),
        overlap_steps=lo.overlap_steps, delayed_update=lo.delayed_update, island_digest=island_digest)


def island_saves(outer: OuterGroup, timeout_s: float) -> IslandSaves:
    """Each island writes its own part of a checkpoint; they meet in the outer store."""
    return IslandSaves(outer.island, outer.islands, report=outer.report_saved,
                       wait_all=lambda step: outer.wait_saved(step, timeout_s))


def island_snapshots(outer: OuterGroup, shared: SnapshotStore) -> IslandSnapshotStore:
    """This island's part of the run's memory snapshots; the islands tell each other their
    newest complete step, so each keeps what a resume of all of them together needs."""
    return IslandSnapshotStore(shared, outer.island, outer.islands, floor=outer.snapshot_floor)


def shared_memory_interval(outer: OuterGroup, proposed: int) -> int:
    """`checkpoint.memory_interval: auto` on islands: the first island to choose sets the
    interval for all (a restarted island finds it set), so they snapshot the same steps and
    always have a common one to resume from."""
    return int(outer.store.compare_set("memory-interval", "", str(proposed)).decode())


def newest_common_snapshot(outer: OuterGroup, store: SnapshotStore, not_before: int) -> Optional[int]:
    """The newest step (from `not_before` on) with a complete memory snapshot on every island,
    or None. Called by each island's first rank; every island computes the same answer."""
    mine = [step for step in store.complete() if step >= not_before]
    try:
        answers = outer.agree("memory-snapshots", json.dumps(mine), outer.timeout_s)
    except DilocoError as exc:
        raise CheckpointError(f"DiLoCo islands could not compare their memory snapshots: {exc}") from None
    common = set(mine)
    for steps in answers.values():
        common &= set(json.loads(steps))
    return max(common) if common else None


def agree_on_resume(outer: OuterGroup, choice: tuple) -> None:
    """Every island must resume from the same state (each chose for itself)."""
    mine = hashlib.sha256(repr(choice).encode()).hexdigest()
    if set(outer.agree("resume", mine, outer.timeout_s).values()) != {mine}:
        raise CheckpointError(f"DiLoCo islands found different states to resume from (island "
                              f"{outer.island}: {choice[1] or 'none'}); check the run directory")


def rejoin(trainer: "Trainer", token: str) -> Optional[int]:
    """A restarted island: the shared state from a peer island, the island's own data
    stream from its committed position, fresh inner optimizer state. Returns the step,
    or None when the other islands finished the run meanwhile."""
    diloco = trainer.diloco
    step = diloco.join(token, trainer.cfg.fault_tolerance.collective_timeout_s)
    if step is None:
        return None
    island = trainer.env.island
    trainer.progress.values["step"] = step
    trainer.loader.samples_consumed = diloco.positions.get(island, 0)
    ScheduleState(trainer.schedulers).load_state_dict({"last_epoch": step})
    trainer.island_event("resume", island=island, step=step, source="peer",
                         samples=trainer.loader.samples_consumed, outer_step=diloco.outer_step)
    if trainer.env.is_island_lead:
        print(f"island {island} rejoined at step {step} from a peer "
              f"({trainer.loader.samples_consumed} samples of its stream consumed)", flush=True)
    return step


def start_islands_from_plain(trainer: "Trainer", path: Path, manifest: dict) -> str:
    """Islands that start from a checkpoint of a run without islands (e.g. a pretrained
    model, as DiLoCo is usually run): every island loads the same model, optimizer and
    schedule, the global parameters start as that model, and each island's stream takes
    its share of the samples the run had consumed, so none is read twice. Returns the
    line that tells the user so (samples are counted per island from here on)."""
    states = {name: state for name, state in trainer.states.items() if name != "diloco"}
    trainer.checkpointer.load(path, manifest, states)
    islands = trainer.layout.islands
    consumed = trainer.loader.samples_consumed
    if consumed % islands:
        raise CheckpointError(f"checkpoint {path} consumed {consumed} samples, which "
                              f"diloco.islands={islands} cannot share evenly")
    trainer.loader.samples_consumed = consumed // islands
    trainer.diloco.start_from_model()
    step = int(trainer.progress.values["step"])
    return (f"warm start: checkpoint {path.name} was saved with 1 island; {islands} islands start "
            f"from its weights, optimizer and schedule at step {step} with a fresh outer optimizer, "
            f"and share out the {consumed} samples it consumed: each island's data stream goes on "
            f"after its first {consumed // islands} (samples are counted per island)")

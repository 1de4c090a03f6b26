"""Where a run starts: from scratch, a memory snapshot, a disk checkpoint, another run's
weights, or (a DiLoCo island restarted alone) a peer island's state.

Functions of the `Trainer` being built: rank 0 (each island's first rank) chooses, every
rank follows, and the trainer's step, progress and resume source are set from what was
loaded. This module decides and loads; it does not build models or talk to a launcher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from atoll.checkpoint.manifest import CheckpointError, read_manifest
from atoll.checkpoint.snapshot import restore_snapshot
from atoll.checkpoint.state import MODEL_PREFIX, ModelWeightsState
from atoll.checkpoint.store import find_resumable
from atoll.trainer.config import model_differences
from atoll.trainer.islands import agree_on_resume, newest_common_snapshot, rejoin, start_islands_from_plain
from atoll.trainer.run_dir import checkpoints_dir, choose_checkpoint, truncate_metrics


def rejoin_island(trainer) -> Optional[Path]:
    """Take the shared state from a peer island (the launcher restarted this island alone)."""
    step = rejoin(trainer, trainer.control.rejoin_token)
    if step is None:  # the other islands finished the run while this island came back
        trainer.step = trainer.last_step
        return None
    trainer.step = step
    trainer.resumed_step, trainer.resume_source = step, "peer"
    return Path(f"peer:step-{step}")

def resume(trainer) -> Optional[Path]:
    """Load the newest state: a memory snapshot or the checkpoint `checkpoint.resume` names.

    Rank 0 chooses, all follow. With `checkpoint.resume: auto` a complete
    memory snapshot wins over a disk checkpoint that is not newer.
    """
    choice: tuple = ("none", None)
    warm_start = None
    if trainer.env.is_island_lead:  # each DiLoCo island chooses for itself, then they compare
        try:
            choice = choose_resume(trainer)
        except CheckpointError as exc:
            choice = ("error", str(exc))
    kind, value = trainer.mesh.broadcast_object(choice)
    if kind == "error":
        raise CheckpointError(value)
    if trainer.outer is not None:
        agree_on_resume(trainer.outer, (kind, value))
    if kind == "none":
        if trainer.outer is not None and trainer.snapshot_store is not None and trainer.env.is_island_lead:
            trainer.snapshot_store.clear()  # this island's snapshots of a failed start
        if trainer.control.attempt > 0 and trainer.is_logging_rank:
            truncate_metrics(trainer.cfg, 0)  # the failed attempt's rows will be logged again
        return None
    if kind == "memory":
        restore_snapshot(trainer.snapshot_store, int(value), trainer.states, trainer.checkpointer.group)
        path = Path(f"memory:step-{int(value)}")
    elif kind == "weights":
        return start_from_weights(trainer, Path(value))
    else:
        path = Path(value)
        manifest = read_manifest(path)
        if trainer.diloco is not None and not manifest.get("islands"):
            warm_start = start_islands_from_plain(trainer, path, manifest)
        else:
            trainer.checkpointer.load(path, manifest, trainer.states)
    trainer.step = int(trainer.progress.values["step"])
    trainer.resumed_step, trainer.resume_source = trainer.step, ("memory" if kind == "memory" else "disk")
    if trainer.outer is not None and trainer.snapshot_store is not None and trainer.env.is_island_lead:
        trainer.snapshot_store.drop_after(trainer.step)
    if trainer.is_logging_rank:
        truncate_metrics(trainer.cfg, trainer.step)
        print(warm_start or f"resumed from {path} at step {trainer.step} "
                            f"({trainer.loader.samples_consumed} samples consumed)", flush=True)
    return path

def start_from_weights(trainer, path: Path) -> Path:
    """Step 0 with another run's weights (an imported model, fine-tuning): a fresh
    optimizer, schedule and data stream."""
    manifest = read_manifest(path)
    if manifest.get("islands"):
        raise CheckpointError(f"checkpoint {path} holds DiLoCo islands; export it "
                              "(atoll ckpt export) and import that to start from its weights")
    differences = model_differences(manifest.get("recipe", {}).get("model") or {}, trainer.cfg)
    if differences:
        raise CheckpointError(f"checkpoint {path} holds another model; train it with "
                              f"{' '.join(differences)}")
    trainer.checkpointer.load(path, manifest, {"model": ModelWeightsState(trainer.parts)}, only=MODEL_PREFIX)
    if trainer.diloco is not None:
        trainer.diloco.start_from_model()
    trainer.resumed_step, trainer.resume_source = 0, "weights"
    if trainer.is_logging_rank:
        truncate_metrics(trainer.cfg, 0)
        print(f"starting from the weights of {path} (step {manifest['step']} there): "
              "fresh optimizer and schedule, step 0", flush=True)
    return path

def weights_only(cfg: DictConfig, manifest: dict) -> bool:
    return bool(manifest.get("weights_only")) or not cfg.checkpoint.load_optimizer

def choose_resume(trainer) -> tuple:
    found = choose_checkpoint(trainer.cfg, trainer.warn, trainer.checkpoint_skipped)
    auto = trainer.cfg.checkpoint.resume == "auto"
    if found is not None and not auto and weights_only(trainer.cfg, found[1]):
        # Fine-tuning from other weights: once this run has saved state of its own
        # (a restart, a second invocation), that state is where it goes on from.
        own = find_resumable(checkpoints_dir(trainer.cfg), trainer.warn)
        memory = trainer.snapshot_store.latest() if trainer.snapshot_store is not None else None
        if own is None and memory is None:
            return "weights", str(found[0])
        found, auto = own, True
    disk_step = read_manifest(found[0])["step"] if found else -1
    store = trainer.snapshot_store
    if store is not None and auto:
        if trainer.outer is None:
            memory_step = store.latest()
        else:  # the newest step every island can resume from together
            memory_step = newest_common_snapshot(trainer.outer, store, disk_step)
        if memory_step is not None and memory_step >= disk_step:
            return "memory", memory_step
    return ("disk", str(found[0])) if found else ("none", None)

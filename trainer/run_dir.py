"""The run directory: checked before a run starts, prepared once, resumed from.

`check_run_dir` only reads, so every process (and the launcher's driver) can
call it and fail the same way before any worker starts. `prepare_run_dir`
creates the folder and writes the resolved recipe; with `run.overwrite=true`
it first removes what an earlier run wrote (and nothing else).
`check_inputs` stats the files the recipe names, so a wrong path stops the
driver (and `--dry-run`) in one line; `prepare_data` tokenises them into the
token cache before any worker starts, so a bad record does too. `choose_checkpoint` decides what
`checkpoint.resume` means for this run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig

from atoll.checkpoint.manifest import CheckpointError, verify
from atoll.checkpoint.store import committed, find_resumable, resolve_checkpoint
from atoll.trainer.config import DataConfig, RecipeError, as_dataclass, run_dir, to_yaml
from atoll.trainer.data_sources import check_data_paths, prepare_tokens
from atoll.trainer.metrics import EVENTS_FILE, METRICS_FILE, read_jsonl

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
DATA_CACHE = "data"  # token caches; kept by run.overwrite=true (they depend on the inputs only)
# What a run writes; `run.overwrite=true` removes exactly these and nothing else.
RUN_OUTPUTS = (CONFIG_FILE, METRICS_FILE, EVENTS_FILE, "loss.png", "wandb", "wandb_run_id", CHECKPOINTS)


def checkpoints_dir(cfg: DictConfig) -> Path:
    return run_dir(cfg) / CHECKPOINTS


def data_cache_dir(cfg: DictConfig) -> Path:
    return run_dir(cfg) / DATA_CACHE


def prepare_data(cfg: DictConfig) -> None:
    """Tokenise the sources that need it into the run's token cache (a no-op when it exists)."""
    prepare_tokens(as_dataclass(cfg.data, DataConfig), cfg.model.vocab_size, data_cache_dir(cfg))


def check_run_dir(cfg: DictConfig, restarting: bool = False) -> Path:
    """`restarting`: a launcher restarts this run, whose earlier attempt wrote the folder."""
    path = run_dir(cfg)
    if path.exists() and not path.is_dir():
        raise RecipeError(f"run.dir {path} exists and is not a directory")
    if cfg.run.overwrite or not path.exists() or restarting:
        return path
    has_run = (path / METRICS_FILE).exists()
    has_checkpoint = bool(committed(path / CHECKPOINTS))
    resume = cfg.checkpoint.resume
    if resume == "none" and (has_run or has_checkpoint):
        raise RecipeError(f"run directory {path} already holds a run and checkpoint.resume=none; "
                          "pass run.overwrite=true to replace it or choose another run.dir")
    if resume == "auto" and has_run and not has_checkpoint:
        raise RecipeError(f"run directory {path} already holds a run with no checkpoint to resume; "
                          "pass run.overwrite=true to replace it or choose another run.dir")
    return path


def check_inputs(cfg: DictConfig) -> None:
    """The data files and tokenizer and the `checkpoint.resume=PATH` the recipe names exist.
    Nothing is read or verified (workers do that), so the driver and every rank can call it."""
    check_data_paths(as_dataclass(cfg.data, DataConfig))
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none"):
        if not Path(resume).exists():
            raise CheckpointError(f"checkpoint.resume {resume} does not exist")
        try:
            resolve_checkpoint(Path(resume))
        except CheckpointError as exc:  # a folder that holds no checkpoint
            raise CheckpointError(f"checkpoint.resume={resume}: {exc}") from None


def prepare_run_dir(cfg: DictConfig, restarting: bool = False) -> Path:
    """Create the folder; with run.overwrite=true first remove what a run wrote there."""
    path = check_run_dir(cfg, restarting)
    if cfg.run.overwrite:
        for name in RUN_OUTPUTS:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(cfg: DictConfig) -> None:
    """The resolved recipe, written once the run has really started (after resuming)."""
    (run_dir(cfg) / CONFIG_FILE).write_text(to_yaml(cfg), encoding="utf-8")


def choose_checkpoint(cfg: DictConfig, warn: Callable[[str], None],
                      skipped: Callable[[Path, str], None] = lambda path, reason: None
                      ) -> Optional[tuple[Path, dict]]:
    """The verified checkpoint to resume from, or None to start afresh.

    `auto` takes the run's newest valid checkpoint (falling back past damaged
    ones); a PATH must verify, else the run stops with the reason.
    """
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    if mode == "auto":
        return find_resumable(checkpoints_dir(cfg), warn, skipped)
    path = resolve_checkpoint(Path(mode))
    return path, verify(path)


def truncate_metrics(cfg: DictConfig, step: int) -> None:
    """Drop metrics logged after the resumed step: they will be logged again."""
    path = run_dir(cfg) / METRICS_FILE
    records = read_jsonl(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(path)

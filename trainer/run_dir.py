"""The run directory: checked before a run starts, prepared by the logging rank.

`check_run_dir` only reads, so every process (and the launcher's driver) can
call it and fail the same way before any worker starts; `prepare_run_dir`
creates the folder and writes the resolved recipe.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig

from atoll.trainer.config import RecipeError, run_dir, to_yaml
from atoll.trainer.metrics import EVENTS_FILE, METRICS_FILE

CONFIG_FILE = "config.yaml"
# What a run writes; `run.overwrite=true` removes exactly these and nothing else.
RUN_OUTPUTS = (CONFIG_FILE, METRICS_FILE, EVENTS_FILE, "loss.png", "wandb", "wandb_run_id", "checkpoints")


def check_run_dir(cfg: DictConfig) -> Path:
    path = run_dir(cfg)
    if path.exists() and not path.is_dir():
        raise RecipeError(f"run.dir {path} exists and is not a directory")
    if (path / METRICS_FILE).exists() and not cfg.run.overwrite:
        raise RecipeError(f"run directory {path} already holds a run; "
                          "pass run.overwrite=true to replace it or choose another run.dir")
    return path


def prepare_run_dir(cfg: DictConfig) -> Path:
    path = check_run_dir(cfg)
    if cfg.run.overwrite:
        for name in RUN_OUTPUTS:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(to_yaml(cfg), encoding="utf-8")
    return path

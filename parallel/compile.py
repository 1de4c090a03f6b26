"""`model.compile`: torch.compile applied to each transformer block, from outside the model."""

from __future__ import annotations

from torch import nn


def apply_compile(part: nn.Module, model_cfg) -> None:
    if model_cfg.compile:
        raise NotImplementedError("model.compile is not implemented yet")

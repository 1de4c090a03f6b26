"""Activation checkpointing (`model.activation_checkpointing`), applied from outside the model.

none: every activation is kept. full: every transformer block recomputes its
forward in backward. selective: every `model.ac_every`-th block does.
"""

from __future__ import annotations

from torch import nn


def apply_activation_checkpointing(part: nn.Module, model_cfg) -> None:
    if model_cfg.activation_checkpointing != "none":
        raise NotImplementedError("model.activation_checkpointing is not implemented yet")

"""Optimizer and learning-rate schedule.

AdamW with decoupled weight decay on matrices only (norm gains and other 1-D
parameters are not decayed), using the fused or foreach implementation where
the build and the parameter types allow, and a linear-warmup + cosine-decay
schedule. Both objects are `Stateful` (state_dict/load_state_dict) so the
checkpointer can save them without knowing what they are.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from atoll.trainer.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **_implementation(decay + no_decay))


def _implementation(params: list[torch.Tensor]) -> dict:
    """Fused kernels for plain tensors; foreach for DTensors (FSDP/EP shards)."""
    if params and not any(isinstance(p, DTensor) for p in params):
        return {"fused": True}
    return {"foreach": True}


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (across shards) and return it before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"),
                                          foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)

"""Optimizer and learning-rate schedule.

AdamW (or SGD, e.g. as DiLoCo's inner optimizer) with weight decay on matrices only (norm gains and other 1-D
parameters are not decayed), AdamW with the fused implementation (plain
tensors and DTensors alike), and a linear warmup followed by cosine
decay, warmup-stable-decay or a constant rate. Both objects are `Stateful` (state_dict/load_state_dict) so the
checkpointer can save them without knowing what they are.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from atoll.trainer.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD with `optim.name: sgd`); matrices decayed, 1-D parameters not.

    Parameters are grouped by kind as well (plain tensors vs DTensors, e.g.
    expert shards under DDP), since one fused/foreach call cannot mix them.
    """
    groups: dict[tuple[bool, bool], list] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault((param.ndim >= 2, isinstance(param, DTensor)), []).append(param)
    param_groups = [{"params": params, "weight_decay": cfg.weight_decay if decayed else 0.0}
                    for (decayed, _), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    if cfg.name == "sgd":
        # foreach where DTensors are present, as before: SGD's results stay those it always had.
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum,
                               foreach=any(isinstance(p, DTensor) for p in model.parameters()))
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **_adamw_implementation(list(model.parameters())))


def _adamw_implementation(params: list[torch.Tensor]) -> dict:
    """The fused kernel (one launch per parameter group) wherever torch has one.

    torch has fused AdamW for CUDA and (since 2.4) CPU tensors, and DTensor
    dispatches it to the local shards since 2.4 (FSDP2 and expert shards,
    also of several meshes in one group, and empty shards of an uneven split).
    Integer or complex parameters, or a device without the kernel, take foreach.
    """
    if params and all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params):
        return {"fused": True}
    return {"foreach": True}


_FUSED_DEVICES = ("cuda", "cpu")


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float,
                  schedule: str = "cosine", decay_fraction: float = 0.1) -> float:
    """Linear warmup to 1, then by `schedule`:
    - cosine: cosine decay to `min_ratio` at `total_steps`;
    - wsd (warmup-stable-decay): 1 until the last `decay_fraction` of `total_steps`, then
      linear decay to `min_ratio` at `total_steps`;
    - constant: 1.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = round(decay_fraction * total_steps)
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - min_ratio) * progress
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio,
                                              cfg.schedule, cfg.decay_fraction))


class ScheduleState:
    """The LR schedule's position as a layout-free Stateful.

    LambdaLR's own state lists one base lr per parameter group, and the
    number of groups (and optimizers: one per pipeline stage) depends on the
    layout. The schedule is a pure function of the step, so the step is all
    that is saved.
    """

    def __init__(self, schedulers: list[torch.optim.lr_scheduler.LambdaLR]):
        self.schedulers = schedulers

    def state_dict(self) -> dict:
        return {"last_epoch": self.schedulers[0].last_epoch}

    def load_state_dict(self, state: dict) -> None:
        for scheduler in self.schedulers:
            scheduler.last_epoch = int(state["last_epoch"])
            scheduler._step_count = scheduler.last_epoch + 1
            lrs = [base * fn(scheduler.last_epoch)
                   for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, lr in zip(scheduler.optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs

"""Global gradient-norm clipping for parameters sharded in any mix of ways.

torch's `clip_grad_norm_` cannot mix DTensors of different meshes (dense
parameters sharded over dp, experts over ep and dp_mod_ep). Here every rank
sums the squares of its local gradient pieces, each divided by the number of
ranks that hold an identical copy of that piece, and one all-reduce over the
world gives the norm of the whole model's gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _copies(grad: torch.Tensor, stage_world: int) -> int:
    """How many ranks hold an identical copy of this rank's piece of `grad`.

    `stage_world` is the number of ranks that hold the same pipeline stage
    (dp); other stages hold other parameters, so they hold no copies.
    """
    if not isinstance(grad, DTensor):
        return stage_world  # a plain tensor is replicated on every rank of its stage
    mesh = grad.device_mesh
    copies = stage_world // mesh.size()  # stage ranks outside the DTensor's mesh hold the same piece
    for dim, placement in enumerate(grad.placements):
        if placement.is_replicate():
            copies *= mesh.size(dim)
    return copies


def clip_grad_norm(params, max_norm: float, stage_world: int = 1) -> float:
    """Scale gradients so their global L2 norm is at most `max_norm` (0: no clipping).

    Returns the norm before clipping. The all-reduce spans every rank, so
    the norm covers all pipeline stages.
    """
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        total += local.detach().double().pow(2).sum() / _copies(grad, stage_world)
    if world > 1:
        dist.all_reduce(total)
    norm = math.sqrt(float(total))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for grad in grads:
            (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(scale)
    return norm

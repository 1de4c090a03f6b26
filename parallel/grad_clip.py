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
    if not grads:
        return 0.0
    pieces = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    copies = torch.tensor([_copies(g, stage_world) for g in grads], dtype=torch.float64,
                          device=pieces[0].device)
    norms = torch.stack(torch._foreach_norm(pieces, 2)).double()  # one fused pass over all pieces
    total = (norms.pow(2) / copies).sum()
    if world > 1:
        dist.all_reduce(total)
    norm = math.sqrt(float(total))
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_(pieces, max_norm / (norm + 1e-6))
    return norm

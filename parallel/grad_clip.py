"""Global gradient-norm clipping for parameters sharded in any mix of ways.

torch's `clip_grad_norm_` cannot mix DTensors of different meshes (dense
parameters sharded over dp, experts over ep and dp_mod_ep). Here every rank
sums the squares of its local gradient pieces, each divided by the number of
ranks that hold an identical copy of that piece, and one all-reduce over the
world gives the norm of the whole model's gradient.
"""

from __future__ import annotations

import math
from typing import Sequence

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


# The copy counts change only with the layout: each distinct list of them is copied to the
# device once, not every step (a host-to-device copy per step otherwise).
_COPIES_ON_DEVICE: dict[tuple, torch.Tensor] = {}


def _copies_tensor(grads: list[torch.Tensor], stage_world: int, device: torch.device) -> torch.Tensor:
    counts = tuple(_copies(g, stage_world) for g in grads)
    key = (counts, str(device))
    if key not in _COPIES_ON_DEVICE:
        if len(_COPIES_ON_DEVICE) > 16:  # a process builds few trainers; never grow without bound
            _COPIES_ON_DEVICE.clear()
        _COPIES_ON_DEVICE[key] = torch.tensor(counts, dtype=torch.float64, device=device)
    return _COPIES_ON_DEVICE[key]


def clip_grad_norm(params, max_norm: float, stage_world: int = 1,
                   extra: Sequence[torch.Tensor] = ()) -> tuple[float, list[float]]:
    """Scale gradients so their global L2 norm is at most `max_norm` (0: no clipping).

    Returns the norm before clipping and the world sums of the `extra`
    scalars and vectors (flattened, in order), which ride on the same all-reduce (the train loop's per-step
    loss and non-finite checks cost no collective of their own). The
    all-reduce spans every rank, so the norm covers all pipeline stages.
    """
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.get_world_size() if dist.is_initialized() else 1
    pieces = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    device = pieces[0].device if pieces else (extra[0].device if extra else torch.device("cpu"))
    if pieces:
        copies = _copies_tensor(grads, stage_world, device)
        norms = torch.stack(torch._foreach_norm(pieces, 2)).double()  # one fused pass over all pieces
        total = (norms.pow(2) / copies).sum().reshape(1)
    else:
        total = torch.zeros(1, dtype=torch.float64, device=device)
    summed = torch.cat([total] + [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(-1)
                                  for v in extra])
    if world > 1:
        dist.all_reduce(summed)
    values = summed.tolist()
    norm = math.sqrt(values[0]) if math.isfinite(values[0]) else float("nan")
    if pieces and max_norm > 0 and norm > max_norm:
        torch._foreach_mul_(pieces, max_norm / (norm + 1e-6))
    return norm, values[1:]

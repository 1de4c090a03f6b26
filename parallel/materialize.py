"""A model part built on the meta device, given storage and its initial values, shard by shard.

Training builds the model with `torch.device("meta")` (no memory, no values),
lets the parallel wrappers shard it, then calls `materialize`: every
parameter and buffer gets uninitialised storage on the real device for the
piece this rank holds (`to_empty`), and `Transformer.init_weights` fills it.
The model draws each parameter's full value on the CPU, one at a time, and
`copy_local_shard` keeps the piece of it this rank holds, so the values are
bitwise those of a model initialised whole on one device, in every layout.

This module knows DTensor placements, not the model: it only asks the part to
initialise itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def materialize(part: nn.Module, device: torch.device, seed: int) -> None:
    """Storage on `device` for what this rank holds of `part`, then its initial values."""
    part.to_empty(device=device)
    part.init_weights(seed, copy_value=copy_local_shard)


@torch.no_grad()
def copy_local_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy into `param` its piece of `full`, the parameter's whole value (on the CPU)."""
    if not isinstance(param, DTensor):
        param.copy_(full)
        return
    local = param.to_local()
    if local.numel() == 0:  # an uneven split can leave a rank without rows
        return
    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(f"local shard {tuple(local.shape)} of a {tuple(full.shape)} parameter "
                           f"does not match its placements {param.placements} ({tuple(shape)})")
    piece = full
    for dim, (start, length) in enumerate(zip(offset, shape)):
        piece = piece.narrow(dim, start, length)
    local.copy_(piece)

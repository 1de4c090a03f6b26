"""Activation checkpointing (`model.activation_checkpointing`), applied from outside the model.

none: every activation is kept. full: every transformer block recomputes its
forward in backward. selective: every `model.ac_every`-th block does, counting
from the first: blocks 1, 3, 5, ... with the default ac_every=2 (block i when
(i + 1) % ac_every == 0, i being the block's key in `layers`, so a pipeline
stage checkpoints the same blocks as the whole model).

No wrapper module is inserted: the block's `forward` is replaced, on the
instance, by one that runs the class's forward under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`. Parameter names,
state-dict keys, optimizer FQNs and the pipeline split therefore stay exactly
those of the plain model, and hooks that wrappers register on the block (FSDP)
still run around the checkpointed region, as with torch's checkpoint_wrapper.

The recompute runs MoE.forward a second time; its routing statistics (load
per expert, drops: the aux-free bias and the load metrics read them) must be
counted once, so the recompute runs with every MoE layer's `record_routing`
off (checkpoint's `context_fn` gives the recompute its own context).

This module knows the model's blocks and MoE layers, not meshes or ranks.
"""

from __future__ import annotations

import contextlib
import functools
import types

from torch import nn
from torch.utils.checkpoint import checkpoint

from atoll.trainer.moe import MoE


def apply_activation_checkpointing(part: nn.Module, model_cfg) -> None:
    """Checkpoint the blocks of `part` (a Transformer or a pipeline stage of one) in place.
    The recipe's validation has checked the mode and `ac_every`."""
    mode = model_cfg.activation_checkpointing
    if mode == "none":
        return
    for name, block in part.layers.items():
        if recomputes(int(name), mode, model_cfg.ac_every):
            checkpoint_block(block)


def recomputes(index: int, mode: str, every: int) -> bool:
    """Whether block `index` (its key in `layers`) recomputes its forward in backward."""
    return mode == "full" or (mode == "selective" and (index + 1) % every == 0)


def checkpoint_block(block: nn.Module) -> None:
    """Make `block` recompute its forward in backward (in place, names unchanged)."""
    if is_checkpointed(block):
        return
    # What runs under checkpoint: the class's forward, a plain function given the block as its
    # first argument (torch.compile replaces it by its compiled version). The new forward is
    # bound to the block, not a closure over it, so a deep copy of the model stays consistent.
    block.checkpointed_body = type(block).forward
    block.checkpointed_moe = [m for m in block.modules() if isinstance(m, MoE)]  # found once
    block.forward = types.MethodType(_checkpointed_forward, block)


def is_checkpointed(block: nn.Module) -> bool:
    return "checkpointed_body" in vars(block)


def _checkpointed_forward(self, *args, **kwargs):
    return checkpoint(self.checkpointed_body, self, *args, use_reentrant=False,
                      context_fn=functools.partial(_routing_paused_in_recompute, self), **kwargs)


def _routing_paused_in_recompute(block: nn.Module):
    """checkpoint's context_fn: nothing in the forward; routing statistics off in the recompute."""
    return contextlib.nullcontext(), _routing_paused(block.checkpointed_moe)


@contextlib.contextmanager
def _routing_paused(moe_layers: list[MoE]):
    saved = [layer.record_routing for layer in moe_layers]
    for layer in moe_layers:
        layer.record_routing = False
    try:
        yield
    finally:
        for layer, value in zip(moe_layers, saved):
            layer.record_routing = value

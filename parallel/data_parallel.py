"""Data parallelism applied to a single-device model from outside.

`apply_data_parallel` shards the dense parameters with FSDP2 (`fully_shard`,
one unit per transformer block plus the root) or replicates them with DDP,
over the mesh's "dp" dimension, in the run's precision (parallel/precision.py):
under bf16 every FSDP unit all-gathers bf16 parameters and reduces fp32
gradients, except the routers' gates, which get fp32 units of their own so
that routing scores stay fp32. `gradient_sync` tells either wrapper whether
the current micro-batch is the last of the step, so gradient accumulation
reduces once per step. Under pipeline parallelism torch's schedule drives the
wrappers itself and reduces at the end of each data micro-batch's pipeline
run (once per step with the default data.grad_accum=1).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from atoll.parallel.expert_parallel import expert_params, moe_layers
from atoll.parallel.layout import Layout, ParallelMesh
from atoll.parallel.precision import FP32_POLICY, Precision
from atoll.parallel.wait_clock import time_ddp_waits, time_fsdp_waits


def uses_fsdp(layout: Layout) -> bool:
    """Whether `apply_data_parallel` shards with FSDP2 (which then casts for mixed precision)."""
    return layout.dp > 1 and layout.dp_shard == "fsdp"


def apply_data_parallel(model: nn.Module, blocks, mesh: ParallelMesh,
                        precision: Optional[Precision] = None) -> nn.Module:
    """Return the module to train: the model itself, sharded, or DDP-wrapped.

    `model` is the root to wrap (the model, or a pipeline stage around a
    part of it) and `blocks` its transformer blocks (one FSDP unit each);
    `precision` is the run's (default: fp32).

    Under expert parallelism the expert weights are already split over ep:
    with FSDP and dp > ep they are sharded again over the dp_mod_ep ranks
    holding the same experts; otherwise the wrappers leave them alone and
    `sync_expert_grads` averages their gradients (and, under mixed precision,
    their forward runs under autocast: FSDP does not cast what it ignores).
    """
    layout = mesh.layout
    if layout.dp == 1:
        return model
    dp_mesh = mesh["dp"]
    precision = precision or Precision(mesh.device.type, torch.float32)
    experts = set(expert_params(model)) if layout.ep > 1 else set()
    if uses_fsdp(layout):
        policy = precision.fsdp_policy()
        if precision.is_mixed:
            for _, moe in moe_layers(model):
                fully_shard(moe.router, mesh=dp_mesh, mp_policy=FP32_POLICY)
        if experts and layout.dp > layout.ep:
            for _, moe in moe_layers(model):
                # Averaged over dp_mod_ep by FSDP; sync_expert_grads finishes the mean over dp.
                fully_shard(moe.experts, mesh=mesh["dp_mod_ep"], mp_policy=policy)
            experts = set()
        elif experts and precision.fsdp_casts:
            for _, moe in moe_layers(model):
                _forward_under(moe.experts, precision.autocast)
        for block in blocks:
            fully_shard(block, mesh=dp_mesh, ignored_params=experts or None, mp_policy=policy)
        # The root unit holds embeddings, final norm and head; no need to
        # reshard it after forward because backward starts right there.
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, ignored_params=experts or None,
                    mp_policy=policy)
        if layout.pp > 1:  # microbatches alternate forward and backward: keep blocks gathered
            for block in blocks:
                block.set_reshard_after_forward(False)
        time_fsdp_waits(model.modules())  # parameter all-gathers, gradient reduce-scatters
        return model
    if experts:
        names = [name for name, p in model.named_parameters() if p in experts]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    # Pipeline stages drive DDP's reducer from torch's stage code, and DDP's
    # bucket rebuild after the first step also counts the schedule's
    # shape-inference backward; find_unused_parameters turns that rebuild off.
    # Gradients live in DDP's buckets (no copy in and out each step), and buffers are
    # not broadcast before every forward: each rank's are already rank 0's (rotary
    # tables, the aux-free bias updated from all-reduced loads, load counters at zero).
    ddp = DistributedDataParallel(model, process_group=dp_mesh.get_group(),
                                  device_ids=None if mesh.device.type == "cpu" else [mesh.device],
                                  find_unused_parameters=layout.pp > 1,
                                  broadcast_buffers=False, gradient_as_bucket_view=True)
    time_ddp_waits(ddp, dp_mesh.get_group())  # the same all-reduce, its tail counted as waiting
    return ddp


def _forward_under(module: nn.Module, context) -> None:
    """Run `module`'s forward (as it is now, e.g. expert parallelism's) inside `context()`."""
    forward = module.forward

    @functools.wraps(forward)
    def forward_in_context(*args, **kwargs):
        with context():
            return forward(*args, **kwargs)
    module.forward = forward_in_context


def gradient_sync(train_module: nn.Module, is_last_microbatch: bool):
    """Context for one micro-batch's backward: reduce gradients only on the last."""
    if isinstance(train_module, DistributedDataParallel) and not is_last_microbatch:
        return train_module.no_sync()
    if isinstance(train_module, FSDPModule):
        train_module.set_requires_gradient_sync(is_last_microbatch)
    return contextlib.nullcontext()


def unwrap(train_module: nn.Module) -> nn.Module:
    """The single-device model behind a DDP wrapper (FSDP2 works in place)."""
    return train_module.module if isinstance(train_module, DistributedDataParallel) else train_module


def dp_comm_bytes_per_step(param_bytes: int, layout, stats_bytes: int = 0,
                           precision: Optional[Precision] = None) -> int:
    """Bytes each rank sends for data parallelism in one step (ring algorithms).

    FSDP all-gathers parameters for forward and again for backward (in the
    compute dtype under mixed precision), then reduce-scatters fp32 gradients:
    (2·gathered + 1)·(dp-1)/dp of the fp32 parameter bytes. DDP's all-reduce
    sends 2·(dp-1)/dp of the gradient bytes. `stats_bytes` is all-reduced as
    well every step: the routing statistics that keep the aux-free expert bias
    equal on every replica.
    """
    if layout.dp == 1:
        return 0
    if layout.dp_shard == "fsdp":
        gathered: float = 1
        if precision is not None and precision.fsdp_casts:
            gathered = precision.compute_dtype.itemsize / 4
        factor = 2 * gathered + 1
    else:
        factor = 2
    return int((factor * param_bytes + 2 * stats_bytes) * (layout.dp - 1) / layout.dp)

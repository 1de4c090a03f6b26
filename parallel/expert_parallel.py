"""Expert parallelism: the experts of each MoE layer split over the "ep" mesh dim.

`apply_expert_parallel` turns every `GroupedExperts` weight into a DTensor
sharded on dim 0 over the ep ranks (each rank keeps E/ep experts; the global
`[E, ...]` shape is what checkpoints see) and replaces its forward with a
token dispatch:

    sort (token, slot) assignments by expert
    -> all-to-all: rows travel to the rank that owns their expert
    -> the configured kernel runs the local experts on the rows received
    -> all-to-all back -> weight by gate, scatter-add into token order

Both all-to-alls are autograd-aware, so backward sends gradients the same
way in reverse. Host syncs: one per MoE layer and micro-batch in forward (the
split sizes of the all-to-alls, which torch takes as Python ints); backward
reuses them. Gradients of expert weights therefore already sum the
contributions of every ep rank; `sync_expert_grads` finishes the data-
parallel average over the ranks that hold the same experts ("dp_mod_ep").

Assignments to zero-computation experts (and ones dropped over capacity)
arrive with the skip id E: they sort last and never enter the all-to-all.
Each layer counts the bytes it sends (`take_sent_bytes`, for comm_bytes).

`reduce_moe_load` gathers the routing statistics of the step over the
data-parallel group (for metrics and auxiliary-loss-free balancing).
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from atoll.parallel.kernels import get_kernel, in_compute_dtype
from atoll.parallel.kernels.sorted import sort_assignments
from atoll.parallel.layout import ParallelMesh
from atoll.parallel.wait_clock import waiting
from atoll.trainer.moe import MoE


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, moe in moe_layers(model) for p in moe.experts.parameters()]


def apply_expert_parallel(model: nn.Module, mesh: ParallelMesh) -> None:
    """Shard every MoE layer's experts over the ep ranks (in place)."""
    if mesh.layout.ep == 1:
        return
    ep_mesh = mesh["ep"]
    for _, moe in moe_layers(model):
        experts = moe.experts
        if experts.num_experts % mesh.layout.ep:
            raise ValueError(f"{experts.num_experts} experts cannot be split over ep={mesh.layout.ep}")
        for name in ("w1", "w3", "w2"):
            full = getattr(experts, name)
            per_rank = full.shape[0] // mesh.layout.ep
            rank = ep_mesh.get_local_rank()
            local = full.detach()[rank * per_rank:(rank + 1) * per_rank].clone()
            setattr(experts, name, nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)],
                                                                   run_check=False)))
        experts.forward = types.MethodType(_dispatching_forward, experts)
        experts.ep_group = ep_mesh.get_group()
        experts.sent_bytes = 0  # all-to-all bytes this rank sent to others, until `take_sent_bytes`


@torch.compiler.disable  # split sizes read on the host: runs eagerly under torch.compile
def _dispatching_forward(self, x_TD: torch.Tensor, gates_TK: torch.Tensor,
                         experts_TK: torch.Tensor) -> torch.Tensor:
    """GroupedExperts.forward under expert parallelism (bound to the module)."""
    group = self.ep_group
    ep = dist.get_world_size(group)
    w1_EDH, w3_EDH, w2_EHD = (w.to_local() for w in (self.w1, self.w3, self.w2))
    # In the compute dtype before the all-to-alls: bf16 rows travel at half the bytes.
    x_TD, w1_EDH, w3_EDH, w2_EHD = in_compute_dtype(x_TD, w1_EDH, w3_EDH, w2_EHD)
    local_experts = w1_EDH.shape[0]

    token_N, order_N, counts_E = sort_assignments(experts_TK, self.num_experts)
    # How many rows each rank receives for each of its local experts, from each source.
    recv_counts_E = torch.empty_like(counts_E)
    with waiting(x_TD.device):  # where this layer first meets the other ep ranks
        dist.all_to_all_single(recv_counts_E, counts_E, group=group)
        recv_counts_PL = recv_counts_E.view(ep, local_experts)
        # The one host sync of the layer: all_to_all_single takes its split sizes as Python
        # ints (so does torchtitan's). Both directions come over in a single read.
        send_splits, recv_splits = torch.stack([counts_E.view(ep, local_experts).sum(1),
                                                recv_counts_PL.sum(1)]).tolist()
    # Skipped assignments (zero-computation experts, drops) sort last and travel nowhere.
    sent = sum(send_splits)
    token_N, order_N = token_N[:sent], order_N[:sent]
    x_ND = x_TD[token_N]
    self.sent_bytes += _sent_bytes(send_splits, recv_splits, counts_E, x_ND, group,
                                   backward=torch.is_grad_enabled() and x_ND.requires_grad)

    x_RD = _all_to_all(x_ND, recv_splits, send_splits, group)
    # output_size: the length is known on the host, so repeat_interleave needs no sync
    local_ids_R = torch.arange(local_experts, device=x_TD.device).repeat(ep).repeat_interleave(
        recv_counts_PL.reshape(-1), output_size=x_RD.shape[0])
    kernel = get_kernel(self.kernel, x_TD.device, x_TD.dtype,
                        x_RD.shape[0] / local_experts * w1_EDH.shape[1] * w1_EDH.shape[2])
    ones_R1 = torch.ones(x_RD.shape[0], 1, dtype=torch.float32, device=x_TD.device)
    y_RD = kernel(x_RD, ones_R1, local_ids_R.unsqueeze(-1), w1_EDH, w3_EDH, w2_EHD)
    y_ND = _all_to_all(y_RD, send_splits, recv_splits, group)

    gate_N1 = gates_TK.reshape(-1)[order_N].to(x_TD.dtype).unsqueeze(-1)
    return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND * gate_N1)


def _sent_bytes(send_splits: list[int], recv_splits: list[int], counts_E: torch.Tensor,
                x_ND: torch.Tensor, group: dist.ProcessGroup, backward: bool) -> int:
    """Bytes this rank sends to the other ep ranks for one layer call: the counts, the rows
    out and the results back (and the same rows' gradients in backward)."""
    me = dist.get_rank(group)
    rows = sum(send_splits) - send_splits[me] + sum(recv_splits) - recv_splits[me]
    row_bytes = x_ND.shape[1] * x_ND.element_size()
    counts_bytes = counts_E.numel() * counts_E.element_size() * (len(send_splits) - 1) // len(send_splits)
    return counts_bytes + rows * row_bytes * (2 if backward else 1)


def take_sent_bytes(model: nn.Module) -> int:
    """All-to-all bytes the model's expert-parallel layers sent since the last call."""
    total = 0
    for _, moe in moe_layers(model):
        if hasattr(moe.experts, "sent_bytes"):  # only apply_expert_parallel's layers send
            total, moe.experts.sent_bytes = total + moe.experts.sent_bytes, 0
    return total


def _all_to_all(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
    # torch's functional collective, differentiable (backward exchanges the other way); the
    # result waits for the exchange where it is first used.
    return all_to_all_single_autograd(x_ND.contiguous(), out_splits, in_splits, group)


def sync_expert_grads(model: nn.Module, mesh: ParallelMesh) -> None:
    """Average expert gradients over data parallelism (call after the step's backward).

    Each rank's expert gradients already hold the contributions of all ep
    ranks' tokens. The replicas of the same experts (dp_mod_ep ranks) are
    summed, by FSDP's reduce-scatter (which divides by dp_mod_ep) or here, and
    the result is scaled so the total division is by dp: the mean over the
    whole data-parallel batch that dense gradients get.
    """
    if mesh.layout.ep == 1:
        return
    by_fsdp = any(isinstance(moe.experts, FSDPModule) for _, moe in moe_layers(model))
    replicas = None if by_fsdp or mesh.layout.dp == mesh.layout.ep else mesh["dp_mod_ep"].get_group()
    divisor = mesh.layout.ep if by_fsdp else mesh.layout.dp
    for param in expert_params(model):
        if param.grad is None:
            continue
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        if replicas is not None:
            with waiting(grad.device):
                dist.all_reduce(grad, group=replicas)
        grad.div_(divisor)


def reduce_moe_load(model: nn.Module, mesh: Optional[ParallelMesh]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(layer name, assignments per expert, dropped) summed over the dp group; resets counters.
    Tensors on the model's device: reading them on the host waits for the GPU (a log step's job)."""
    layers = moe_layers(model)
    if not layers:
        return []
    packed = take_moe_load(layers)
    if mesh is not None and mesh.layout.dp > 1:
        with waiting(packed.device):
            dist.all_reduce(packed, group=mesh.dp_group)
    return unpack_moe_load(layers, packed)


def take_moe_load(layers: list[tuple[str, MoE]]) -> torch.Tensor:
    """This rank's routing counts of `layers` since the last call, in one float64 vector
    (every layer's load per expert, then every layer's drops); resets the counters. The
    counts are integers: summed over ranks in any order, they are exact."""
    loads, dropped = zip(*(moe.take_load() for _, moe in layers))
    return torch.cat([torch.stack(loads).flatten(), torch.stack(dropped)]).to(torch.float64)


def unpack_moe_load(layers: list[tuple[str, MoE]], packed: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """`take_moe_load`'s vector (or its sum over ranks) as (layer name, load per expert, dropped)."""
    num_experts = layers[0][1].kinds.total  # every kind of expert is counted
    per_layer = packed[:len(layers) * num_experts].view(len(layers), num_experts)
    drops = packed[len(layers) * num_experts:]
    return [(name, per_layer[i], drops[i]) for i, (name, _) in enumerate(layers)]

"""Mixture-of-Experts feed-forward, single-device code.

The router picks top-k experts per token, `GroupedExperts` holds every
expert's weights stacked as `[num_experts, ...]` (so expert parallelism is a
sharding of dim 0) and hands the actual computation to a kernel chosen by
name (`model.moe.kernel`) from atoll.parallel.kernels. `experts_naive` here is
the readable reference that every fused kernel is tested against.

This file must not know about process groups, DTensor, ranks or token
all-to-all: expert parallelism wraps these modules from outside.

Shapes: T tokens, D model dim, H expert hidden, E experts, K top-k.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atoll.parallel.kernels import tokens_per_expert
from atoll.trainer.config import MoEConfig


class FeedForward(nn.Module):
    """Dense SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """Token-choice top-k router, scored in fp32.

    The gate's matmul and the softmax/sigmoid run on fp32 operands with
    autocast turned off, whatever precision the rest of the model runs in; the
    gates and probabilities it returns are fp32. Its input may arrive in bf16
    (it is upcast), and wrappers that cast parameters for compute must leave
    the gate's weight fp32 (atoll.parallel gives it an fp32 FSDP unit). On a
    GPU the matmul follows torch's fp32 matmul precision (TF32 in training).

    - `score_func`: softmax over experts, or an independent sigmoid per expert.
    - `expert_bias_E` (auxiliary-loss-free balancing): added to the scores only
      to *select* experts, never to the gates; nudged towards balance from the
      observed loads before each optimizer step (`update_bias`). Persistent, so
      checkpoints carry it.
    - `groups` (group-limited routing): experts form `groups` contiguous
      groups and each token picks top_k/groups experts in every group, so
      every group (an expert-parallel rank) receives the same number of
      assignments.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 renormalize: bool = True, groups: int = 0, not_renormalized: range = range(0),
                 gating_residual: bool = False):
        super().__init__()
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown router score_func '{score_func}' (known: softmax, sigmoid)")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if groups > 1 and (num_experts % groups or top_k % groups):
            raise ValueError(f"groups={groups} must divide num_experts={num_experts} and top_k={top_k}")
        self.gate = nn.Linear(dim, num_experts, bias=False)
        # Gating residual (MoE++): this layer's logits add a projection of the previous MoE
        # layer's, G_j(x) = W_g x + W_r G_{j-1}(x).
        self.residual = nn.Linear(num_experts, num_experts, bias=False) if gating_residual else None
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.renormalize = score_func, renormalize
        self.groups = groups if groups > 1 else 1
        self.not_renormalized = not_renormalized  # AdaMoE's null experts: outside the renormalisation
        self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor, previous_logits_TE: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (gates_TK, experts_TK long, probs_TE, logits_TE), all but the ids fp32."""
        # No autocast for meta tensors (a shape-only pass): nothing to turn off there.
        full_precision = contextlib.nullcontext() if x_TD.is_meta else \
            torch.autocast(x_TD.device.type, enabled=False)
        with full_precision:
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
            if self.residual is not None and previous_logits_TE is not None:
                logits_TE = logits_TE + F.linear(previous_logits_TE.float(), self.residual.weight.float())
            probs_TE = logits_TE.softmax(dim=-1) if self.score_func == "softmax" else logits_TE.sigmoid()
        with torch.no_grad():
            experts_TK = self._select(probs_TE + self.expert_bias_E)
        gates_TK = probs_TE.gather(1, experts_TK)
        if self.renormalize and len(self.not_renormalized):
            # AdaMoE: the gates of the experts that compute sum to one; a null expert only
            # takes a slot. A token that picked only null experts gets no output.
            null = self.not_renormalized
            computes_TK = (experts_TK < null.start) | (experts_TK >= null.stop)
            gates_TK = gates_TK * computes_TK
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        elif self.renormalize:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
        return gates_TK, experts_TK, probs_TE, logits_TE

    def _select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return scores_TE.topk(self.top_k, dim=-1).indices
        T, per_group = scores_TE.shape[0], self.num_experts // self.groups
        local_TGk = scores_TE.view(T, self.groups, per_group).topk(self.top_k // self.groups, dim=-1).indices
        offsets_G1 = torch.arange(self.groups, device=scores_TE.device).unsqueeze(-1) * per_group
        return (local_TGk + offsets_G1).reshape(T, self.top_k)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, rate: float, target_share_E: torch.Tensor | None = None) -> None:
        """Raise the bias of under-loaded experts and lower over-loaded ones by `rate`: loaded
        against the mean, or against `target_share_E` of all assignments where given."""
        load_E = load_E.float()
        target_E = load_E.mean() if target_share_E is None else load_E.sum() * target_share_E.to(load_E)
        self.expert_bias_E += rate * torch.sign(target_E - load_E)


def apply_capacity(experts_TK: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Mask [T, K] of the assignments kept when each expert takes at most
    ceil(capacity_factor · T·K / E) of them, earlier tokens first."""
    T, K = experts_TK.shape
    capacity = math.ceil(capacity_factor * T * K / num_experts)
    # Slot-major order: every token's first choice ranks before any second choice.
    flat_N = experts_TK.t().reshape(-1)
    one_hot_NE = F.one_hot(flat_N, num_experts)
    position_N = ((one_hot_NE.cumsum(0) - 1) * one_hot_NE).sum(-1)
    return (position_N < capacity).view(K, T).t()


def experts_naive(x_TD: torch.Tensor, gates_TK: torch.Tensor, experts_TK: torch.Tensor,
                  w1_EDH: torch.Tensor, w3_EDH: torch.Tensor, w2_EHD: torch.Tensor) -> torch.Tensor:
    """Reference expert computation: one SwiGLU per expert over the tokens routed to it.

    out[t] = sum_k gates[t, k] * swiglu_{experts[t, k]}(x[t]), in x's dtype.

    A reference, not a training kernel: `nonzero` sizes its output from the data, so
    on a GPU every expert costs a host sync (E per call, forward and backward).
    """
    out_TD = torch.zeros_like(x_TD)
    # unbind (not w[e]) so backward stacks the per-expert weight gradients once
    # instead of materialising a full [E, ...] zero gradient for every expert.
    per_expert = zip(w1_EDH.unbind(0), w3_EDH.unbind(0), w2_EHD.unbind(0))
    for e, (w1_DH, w3_DH, w2_HD) in enumerate(per_expert):
        # N = the (token, slot) pairs routed to expert e; a token appears at most once per
        # expert because top-k indices are distinct, but index_add_ would sum repeats anyway.
        # An expert without rows still runs (on zero rows): with no rows at all, as on an
        # expert-parallel rank that receives nothing, the output must still depend on x and
        # the weights, or that rank's backward would skip the all-to-alls its peers run.
        token_N, slot_N = torch.nonzero(experts_TK == e, as_tuple=True)
        x_ND = x_TD[token_N]
        h_NH = F.silu(x_ND @ w1_DH) * (x_ND @ w3_DH)
        gate_N1 = gates_TK[token_N, slot_N].to(x_TD.dtype).unsqueeze(-1)
        out_TD.index_add_(0, token_N, (h_NH @ w2_HD) * gate_N1)
    return out_TD


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights: w1, w3 [E, D, H] and w2 [E, H, D]."""

    def __init__(self, num_experts: int, dim: int, hidden: int, kernel: str = "naive"):
        super().__init__()
        from atoll.parallel.kernels import check_name

        check_name(kernel)
        self.num_experts = num_experts
        self.kernel = kernel  # resolved per call, for the device and dtype of the input
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Placeholder values so the module is usable alone; Transformer.init_weights
        # is the deterministic initialisation used for training.
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=0.02)

    @torch.compiler.disable  # data-dependent shapes: the kernels run eagerly under torch.compile
    def forward(self, x_TD: torch.Tensor, gates_TK: torch.Tensor,
                experts_TK: torch.Tensor) -> torch.Tensor:
        from atoll.parallel.kernels import get_kernel, in_compute_dtype  # single-device code too

        E, D, H = self.w1.shape
        x_TD, w1_EDH, w3_EDH, w2_EHD = in_compute_dtype(x_TD, self.w1, self.w3, self.w2)
        kernel = get_kernel(self.kernel, x_TD.device, x_TD.dtype, experts_TK.numel() / E * D * H)
        return kernel(x_TD, gates_TK, experts_TK, w1_EDH, w3_EDH, w2_EHD)


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor,
                        weight_E: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer balance loss E * sum_e w_e f_e P_e (1.0 when perfectly uniform).

    f_e: fraction of the T*K assignments that went to e (no gradient);
    P_e: mean router probability of e over the T tokens;
    w_e: 1, or MoE++'s heterogeneous weights (tau for zero-computation experts).
    """
    num_experts = probs_TE.shape[-1]
    tokens_per_expert_E = tokens_per_expert(experts_TK, num_experts)
    f_E = tokens_per_expert_E.float() / experts_TK.numel()
    P_E = probs_TE.float().mean(dim=0)
    if weight_E is not None:
        f_E = f_E * weight_E
    return num_experts * (f_E * P_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)^2."""
    return logits_TE.float().logsumexp(dim=-1).square().mean()


@dataclass(frozen=True)
class ExpertKinds:
    """How a layer's routed experts divide into kinds; ids run FFN, zero, copy, constant.

    Only FFN experts have weights in `GroupedExperts` and cost FLOPs; the
    others (MoE++'s zero-computation experts, AdaMoE's null experts = zero)
    are elementwise and live on every rank.
    """

    ffn: int
    zero: int = 0
    copy: int = 0
    constant: int = 0

    NAMES = ("ffn", "zero", "copy", "constant")

    @classmethod
    def of(cls, moe_cfg: MoEConfig) -> "ExpertKinds":
        return cls(moe_cfg.num_experts, moe_cfg.zero_experts, moe_cfg.copy_experts, moe_cfg.constant_experts)

    @property
    def total(self) -> int:
        return self.ffn + self.zero + self.copy + self.constant

    @property
    def zero_compute(self) -> int:
        return self.total - self.ffn

    def ids(self, kind: str) -> range:
        """The router ids of one kind of expert."""
        counts = [getattr(self, name) for name in self.NAMES]
        start = sum(counts[:self.NAMES.index(kind)])
        return range(start, start + getattr(self, kind))


class ZeroComputeExperts(nn.Module):
    """MoE++'s zero-computation experts, applied to every token with elementwise work.

    zero: E(x) = 0, so nothing is added; copy: E(x) = x; constant c:
    E(x) = a1 x + a2 v_c with [a1, a2] = softmax(W_c x) and v_c trained.
    Replicated wherever the layer runs: their assignments never leave the rank.
    """

    def __init__(self, dim: int, kinds: ExpertKinds):
        super().__init__()
        self.kinds = kinds
        self.constant_vector = nn.Parameter(torch.empty(kinds.constant, dim)) if kinds.constant else None
        self.constant_gate = nn.Parameter(torch.empty(kinds.constant, 2, dim)) if kinds.constant else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.constant_vector, self.constant_gate):
            if w is not None:
                nn.init.normal_(w, std=0.02)

    def forward(self, x_TD: torch.Tensor, gates_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        """sum over the token's copy and constant assignments of gate * E(x), in x's dtype."""
        first = self.kinds.ids("copy").start
        ids_X = torch.arange(first, self.kinds.total, device=experts_TK.device)
        # [T, X]: each token's gate on every copy and constant expert (0 where not chosen)
        gate_TX = (gates_TK.unsqueeze(-1) * (experts_TK.unsqueeze(-1) == ids_X)).sum(1)
        scale_T1 = gate_TX[:, :self.kinds.copy].sum(-1, keepdim=True)
        out_TD = None
        if self.kinds.constant:
            gate_TC = gate_TX[:, self.kinds.copy:]
            mix_TC2 = torch.einsum("td,cjd->tcj", x_TD, self.constant_gate).float().softmax(-1)
            scale_T1 = scale_T1 + (gate_TC * mix_TC2[..., 0]).sum(-1, keepdim=True)
            out_TD = ((gate_TC * mix_TC2[..., 1]).to(x_TD.dtype) @ self.constant_vector.to(x_TD.dtype))
        copied_TD = x_TD * scale_T1.to(x_TD.dtype)
        return copied_TD if out_TD is None else copied_TD + out_TD


class MoE(nn.Module):
    """Router + grouped experts (+ zero-computation experts, + shared expert);
    returns (out, aux_loss, router logits for the next layer's gating residual or None).

    Top-k picks among every kind of expert. The FFN kernels see only the
    assignments that go to FFN experts and are kept: the others carry the
    id one past the last FFN expert, which every kernel skips.

    While training it accumulates per-expert assignment counts (every kind)
    and dropped assignments in `load_E` / `dropped` until the trainer reads
    and resets them (`take_load`), once per optimizer step.
    """

    def __init__(self, dim: int, hidden: int, moe_cfg: MoEConfig):
        super().__init__()
        hidden = moe_cfg.hidden or hidden
        self.kinds = ExpertKinds.of(moe_cfg)
        self.num_experts = moe_cfg.num_experts  # FFN experts: those with weights
        self.top_k = moe_cfg.top_k
        self.balance = moe_cfg.balance
        self.aux_loss_coef = moe_cfg.aux_loss_coef
        self.z_loss_coef = moe_cfg.z_loss_coef
        self.tau = moe_cfg.zero_compute_tau
        self.bias_update_rate = moe_cfg.bias_update_rate
        self.capacity_factor = moe_cfg.capacity_factor
        self.gating_residual = moe_cfg.gating_residual
        if self.balance not in ("aux_loss", "aux_free", "none"):
            raise ValueError(f"unknown MoE balance '{self.balance}' (known: aux_loss, aux_free, none)")
        if self.kinds.zero_compute and moe_cfg.groups > 1:
            raise ValueError("group-limited routing (groups > 1) splits experts over ranks, and "
                             "zero-computation experts live on every rank")
        self.router = Router(dim, self.kinds.total, moe_cfg.top_k, moe_cfg.score_func,
                             moe_cfg.renormalize, moe_cfg.groups,
                             self.kinds.ids("zero") if moe_cfg.renormalize_over == "nonzero" else range(0),
                             moe_cfg.gating_residual)
        self.experts = GroupedExperts(moe_cfg.num_experts, dim, hidden, moe_cfg.kernel)
        self.zero_compute = ZeroComputeExperts(dim, self.kinds) if self.kinds.zero_compute else None
        self.shared_expert = FeedForward(dim, hidden) if moe_cfg.shared_expert else None
        # Routing statistics since the last `take_load`; not part of the checkpoint.
        self.register_buffer("load_E", torch.zeros(self.kinds.total, dtype=torch.long), persistent=False)
        self.register_buffer("dropped", torch.zeros((), dtype=torch.long), persistent=False)
        # Off while activation checkpointing recomputes this forward in backward: one
        # forward's routing is counted once.
        self.record_routing = True

    def forward(self, x_BSD: torch.Tensor, previous_logits_TE: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        gates_TK, experts_TK, probs_TE, logits_TE = self.router(x_TD, previous_logits_TE)
        kept_TK = None
        if self.capacity_factor:
            kept_TK = apply_capacity(experts_TK, self.kinds.total, self.capacity_factor)
            if self.kinds.zero_compute:  # no capacity to run out of: they cost nothing
                kept_TK = kept_TK | (experts_TK >= self.num_experts)
            gates_TK = gates_TK * kept_TK  # a dropped assignment contributes nothing
        if self.training:  # next to the experts: both run eagerly under torch.compile
            self._record_routing(experts_TK, kept_TK)
        out_TD = self.experts(x_TD, gates_TK, self._ffn_assignments(experts_TK, kept_TK))
        if self.zero_compute is not None:
            out_TD = out_TD + self.zero_compute(x_TD, gates_TK, experts_TK)
        if self.shared_expert is not None:
            out_TD = out_TD + self.shared_expert(x_TD)

        if self.balance == "aux_loss":
            aux_loss = self.aux_loss_coef * load_balancing_loss(probs_TE, experts_TK, self._balance_weights(probs_TE))
        else:
            aux_loss = torch.zeros((), device=x_BSD.device)
        if self.z_loss_coef:
            aux_loss = aux_loss + self.z_loss_coef * router_z_loss(logits_TE)
        return out_TD.reshape(B, S, D), aux_loss, logits_TE if self.gating_residual else None

    def _ffn_assignments(self, experts_TK: torch.Tensor, kept_TK: torch.Tensor | None) -> torch.Tensor:
        """The expert ids the FFN kernels get: a zero-computation or dropped assignment
        becomes `num_experts`, which they skip (no FLOPs, no all-to-all row)."""
        if kept_TK is None and not self.kinds.zero_compute:
            return experts_TK
        runs_TK = experts_TK < self.num_experts
        if kept_TK is not None:
            runs_TK = runs_TK & kept_TK
        return experts_TK.masked_fill(~runs_TK, self.num_experts)

    def _balance_weights(self, like: torch.Tensor) -> torch.Tensor | None:
        """MoE++'s heterogeneous balance weights: 1 per FFN expert, tau per other (None: all 1)."""
        if not self.kinds.zero_compute or self.tau == 1:
            return None
        weight_E = like.new_full((self.kinds.total,), self.tau)
        weight_E[:self.num_experts] = 1.0
        return weight_E

    def target_share(self) -> torch.Tensor | None:
        """Auxiliary-loss-free balancing's target share of the assignments per expert: a
        zero-computation expert aims at 1/tau an FFN expert's (None: uniform)."""
        weight_E = self._balance_weights(self.router.expert_bias_E)
        if weight_E is None:
            return None
        return (1 / weight_E) / (1 / weight_E).sum()

    @torch.compiler.disable  # eager, so `record_routing` is read at run time (no recompile)
    @torch.no_grad()
    def _record_routing(self, experts_TK: torch.Tensor, kept_TK: torch.Tensor | None) -> None:
        """Add this forward's assignments (kept ones) to `load_E` and its drops to `dropped`."""
        if not self.record_routing or experts_TK.is_meta:  # meta: a shape-only pass
            return
        # counted on the device: read only at a log step (no host sync per layer)
        self.load_E += tokens_per_expert(experts_TK, self.kinds.total, kept_TK)
        if kept_TK is not None:
            self.dropped += (~kept_TK).sum()

    def take_load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(assignments per expert of every kind, dropped assignments) since the last call;
        resets them."""
        load_E, dropped = self.load_E.clone(), self.dropped.clone()
        self.load_E.zero_()
        self.dropped.zero_()
        return load_E, dropped


def routing_summary(kinds: ExpertKinds, top_k: int, load_E: torch.Tensor, dropped: torch.Tensor) -> dict:
    """One layer's routing in a step, from its summed loads: the share of the assignments
    each kind of expert took (where the layer has more than FFN experts), the mean number
    of FFN experts that ran per token, and max/mean load over the FFN experts."""
    load_E = load_E.double()
    assignments = float(load_E.sum() + dropped)
    ffn_E = load_E[:kinds.ffn]
    summary = {"max_load": float(ffn_E.max()), "mean_load": float(ffn_E.mean()), "dropped": int(dropped)}
    if kinds.zero_compute:
        for kind in ExpertKinds.NAMES:
            ids = kinds.ids(kind)
            if len(ids):
                summary[f"share.{kind}"] = float(load_E[ids.start:ids.stop].sum()) / max(assignments, 1.0)
    summary["ffn_experts_per_token"] = float(ffn_E.sum()) * top_k / max(assignments, 1.0)
    return summary

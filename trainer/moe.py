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


import torch
import torch.nn.functional as F
from torch import nn

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
    """Token-choice top-k router; scores are computed in fp32 for stable softmax."""

    def __init__(self, dim: int, num_experts: int, top_k: int,
                 score_func: str = "softmax", renormalize: bool = True):
        super().__init__()
        if score_func != "softmax":
            raise ValueError(f"unknown router score_func '{score_func}' (known: softmax)")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.top_k = top_k
        self.renormalize = renormalize

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (gates_TK fp32, experts_TK long, probs_TE fp32)."""
        logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        gates_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.renormalize:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
        return gates_TK, experts_TK, probs_TE


def experts_naive(x_TD: torch.Tensor, gates_TK: torch.Tensor, experts_TK: torch.Tensor,
                  w1_EDH: torch.Tensor, w3_EDH: torch.Tensor, w2_EHD: torch.Tensor) -> torch.Tensor:
    """Reference expert computation: one SwiGLU per expert over the tokens routed to it.

    out[t] = sum_k gates[t, k] * swiglu_{experts[t, k]}(x[t]), in x's dtype.
    """
    out_TD = torch.zeros_like(x_TD)
    # unbind (not w[e]) so backward stacks the per-expert weight gradients once
    # instead of materialising a full [E, ...] zero gradient for every expert.
    per_expert = zip(w1_EDH.unbind(0), w3_EDH.unbind(0), w2_EHD.unbind(0))
    for e, (w1_DH, w3_DH, w2_HD) in enumerate(per_expert):
        # N = the (token, slot) pairs routed to expert e; a token appears at most once per
        # expert because top-k indices are distinct, but index_add_ would sum repeats anyway.
        token_N, slot_N = torch.nonzero(experts_TK == e, as_tuple=True)
        if token_N.numel() == 0:
            continue
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

    def forward(self, x_TD: torch.Tensor, gates_TK: torch.Tensor,
                experts_TK: torch.Tensor) -> torch.Tensor:
        from atoll.parallel.kernels import get_kernel  # kernels are single-device code too

        kernel = get_kernel(self.kernel, x_TD.device, x_TD.dtype)
        return kernel(x_TD, gates_TK, experts_TK, self.w1, self.w3, self.w2)


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss E * sum_e f_e * P_e (1.0 when perfectly uniform).

    f_e: fraction of the T*K assignments that went to e (no gradient);
    P_e: mean router probability of e over the T tokens.
    """
    num_experts = probs_TE.shape[-1]
    tokens_per_expert_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts)
    f_E = tokens_per_expert_E.float() / experts_TK.numel()
    P_E = probs_TE.float().mean(dim=0)
    return num_experts * (f_E * P_E).sum()


class MoE(nn.Module):
    """Router + grouped experts (+ optional shared expert); returns (out, aux_loss)."""

    def __init__(self, dim: int, hidden: int, moe_cfg: MoEConfig):
        super().__init__()
        hidden = moe_cfg.hidden or hidden
        self.num_experts = moe_cfg.num_experts
        self.top_k = moe_cfg.top_k
        self.balance = moe_cfg.balance
        self.aux_loss_coef = moe_cfg.aux_loss_coef
        if self.balance not in ("aux_loss", "none"):
            raise ValueError(f"unknown MoE balance '{self.balance}' (known: aux_loss, none)")
        self.router = Router(dim, moe_cfg.num_experts, moe_cfg.top_k,
                             moe_cfg.score_func, moe_cfg.renormalize)
        self.experts = GroupedExperts(moe_cfg.num_experts, dim, hidden, moe_cfg.kernel)
        self.shared_expert = FeedForward(dim, hidden) if moe_cfg.shared_expert else None
        # Last forward's routing counts, for load metrics; not part of the checkpoint.
        self.register_buffer("tokens_per_expert_E",
                             torch.zeros(moe_cfg.num_experts, dtype=torch.long), persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        gates_TK, experts_TK, probs_TE = self.router(x_TD)
        out_TD = self.experts(x_TD, gates_TK, experts_TK)
        if self.shared_expert is not None:
            out_TD = out_TD + self.shared_expert(x_TD)

        with torch.no_grad():
            self.tokens_per_expert_E.copy_(
                torch.bincount(experts_TK.reshape(-1), minlength=self.num_experts))
        if self.balance == "aux_loss":
            aux_loss = self.aux_loss_coef * load_balancing_loss(probs_TE, experts_TK)
        else:
            aux_loss = torch.zeros((), device=x_BSD.device)
        return out_TD.reshape(B, S, D), aux_loss

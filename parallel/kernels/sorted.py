"""CPU-fast expert computation: sort the assignments once, one GEMM per expert segment.

The (token, slot) assignments are sorted by expert once; each expert then
multiplies one contiguous block of gathered rows (or all experts at once
through `torch._grouped_mm` with segment offsets), and the results are
weighted by their gates and scattered back with one index_add. No per-expert
mask over all tokens, no padded copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sort_assignments(experts_TK: torch.Tensor, num_experts: int):
    """(token index per sorted row, slot-major flat index per sorted row, rows per expert)."""
    flat_N = experts_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    token_N = order_N // experts_TK.shape[1]
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    return token_N, order_N, counts_E


def experts_sorted(x_TD: torch.Tensor, gates_TK: torch.Tensor, experts_TK: torch.Tensor,
                   w1_EDH: torch.Tensor, w3_EDH: torch.Tensor, w2_EHD: torch.Tensor) -> torch.Tensor:
    token_N, order_N, counts_E = sort_assignments(experts_TK, w1_EDH.shape[0])
    x_ND = x_TD[token_N]
    out_parts = []
    start = 0
    for e, count in enumerate(counts_E.tolist()):  # one host sync for all segment sizes
        if count:
            x_CD = x_ND[start:start + count]
            h_CH = F.silu(x_CD @ w1_EDH[e]) * (x_CD @ w3_EDH[e])
            out_parts.append(h_CH @ w2_EHD[e])
        start += count
    y_ND = torch.cat(out_parts) if out_parts else x_ND.new_zeros(0, w2_EHD.shape[-1])
    gate_N1 = gates_TK.reshape(-1)[order_N].to(x_TD.dtype).unsqueeze(-1)
    return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND * gate_N1)


def experts_grouped_mm(x_TD: torch.Tensor, gates_TK: torch.Tensor, experts_TK: torch.Tensor,
                       w1_EDH: torch.Tensor, w3_EDH: torch.Tensor, w2_EHD: torch.Tensor) -> torch.Tensor:
    token_N, order_N, counts_E = sort_assignments(experts_TK, w1_EDH.shape[0])
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    x_ND = x_TD[token_N]
    h_NH = F.silu(torch._grouped_mm(x_ND, w1_EDH, offs=offsets_E)) * \
        torch._grouped_mm(x_ND, w3_EDH, offs=offsets_E)
    y_ND = torch._grouped_mm(h_NH, w2_EHD, offs=offsets_E)
    gate_N1 = gates_TK.reshape(-1)[order_N].to(x_TD.dtype).unsqueeze(-1)
    return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND * gate_N1)

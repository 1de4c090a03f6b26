"""CPU-fast expert computation: sort the assignments once, one GEMM per expert segment.

The N = T*K (token, slot) assignments are sorted by expert once (a stable
argsort of the expert ids); each expert then multiplies one contiguous block
of gathered rows, either in a Python loop over the experts (`sorted`) or all
experts at once through `torch._grouped_mm` with segment offsets
(`grouped_mm`). Results are weighted by their gates and scattered back with
index_add. No per-expert mask over all tokens, no padded copies.

Both are one autograd.Function with a hand-written backward, because the
autograd graph of the obvious code costs more than the GEMMs at many experts:
the backward of `w[e]` (select) materialises a zero [E, ...] gradient per
expert and sums them (O(E^2) memory traffic), the backward of a row slice
does the same over [N, D], and autograd keeps every intermediate. Here:

- forward saves the inputs, the sort and the pre-activations a = x@w1 and
  b = x@w3 [N, H] (written in place by the GEMMs); the gathered rows, h and
  y are not kept (rows are gathered again, h recomputed elementwise);
- backward reuses the sort, gathers dY rows by token, and writes each
  expert's weight gradients straight into one [E, ...] tensor (experts with
  no rows get zeros), d(gate) = <dY @ w2^T, h> per row;
- `sorted` runs forward and backward expert by expert, so the temporaries
  are per expert ([rows of e, H]), not [N, H].

Numbers match `experts_naive` (trainer/moe.py) up to float rounding: same
GEMMs on the same rows. Inside autocast the GEMMs run in the autocast dtype
(x and the weights are cast, as naive's matmuls would be) and the result is
returned in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atoll.parallel.kernels import tokens_per_expert


def sort_assignments(experts_TK: torch.Tensor, num_experts: int):
    """(token index per sorted row, slot-major flat index per sorted row, rows per expert),
    all on the device: no host sync. Skipped assignments (id `num_experts`) sort last and
    are not counted: the rows past sum(rows per expert) are theirs."""
    flat_N = experts_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    token_N = order_N // experts_TK.shape[1]
    counts_E = tokens_per_expert(flat_N, num_experts)
    return token_N, order_N, counts_E


def host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a count to Python costs nothing (the CPU), where on a GPU it would
    wait for the device. tests/test_host_syncs.py answers False to count the GPU path."""
    return device.type == "cpu"


# Rows per chunk of consecutive experts in `sorted`: elementwise work, gathers and
# scatters run once per chunk (few ops, temporaries of at most about this many rows
# unless one expert has more), the GEMMs once per expert.
CHUNK_ROWS = 4096


def _chunks(counts: list[int]):
    """(slice of sorted rows, [(expert, slice within the chunk), ...]) over the experts with rows."""
    chunk_rows = CHUNK_ROWS
    start = end = 0
    segments = []
    for e, count in enumerate(counts):
        if count:
            segments.append((e, slice(end - start, end - start + count)))
            end += count
        if segments and (end - start >= chunk_rows or e == len(counts) - 1):
            yield slice(start, end), segments
            start, segments = end, []


def _empty_grad(w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Uninitialised weight gradient whose experts without rows are zero (the rest get written)."""
    grad = torch.empty_like(w, memory_format=torch.contiguous_format)
    for e, count in enumerate(counts):
        if not count:
            grad[e].zero_()
    return grad


def _scatter_grad_gates(dgate_N: torch.Tensor, order_N: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
    """d(gates) [T, K] from the sorted rows' d(gate); skipped assignments (the rows past
    `dgate_N`'s length, or zeroed in it) get 0."""
    if dgate_N.shape[0] == order_N.shape[0]:
        dgates = torch.empty_like(dgate_N).index_copy_(0, order_N, dgate_N)  # every (t, k) once
    else:
        dgates = dgate_N.new_zeros(order_N.shape[0]).index_copy_(0, order_N[:dgate_N.shape[0]], dgate_N)
    return dgates.view(gates_TK.shape).to(gates_TK.dtype)


def _skipped_rows_zeroed(rows_NX: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """`rows_NX` with the rows past the last expert's segment set to 0, in place: grouped_mm
    leaves them unwritten, and they belong to skipped assignments."""
    skipped_N1 = torch.arange(rows_NX.shape[0], device=rows_NX.device).unsqueeze(-1) >= offs_E[-1]
    return rows_NX.masked_fill_(skipped_N1, 0)


class _SortedExperts(torch.autograd.Function):
    """Experts in sorted-row order; `grouped` picks torch._grouped_mm over a loop of mm."""

    @staticmethod
    def forward(ctx, x_TD, gates_TK, experts_TK, w1_EDH, w3_EDH, w2_EHD, grouped: bool):
        (T, D), (E, _, H) = x_TD.shape, w1_EDH.shape
        token_N, order_N, counts_E = sort_assignments(experts_TK, E)
        gate_N1 = gates_TK.reshape(-1).index_select(0, order_N).to(x_TD.dtype).unsqueeze(-1)
        out_TD = x_TD.new_zeros(T, D)
        if grouped:
            counts = None
            offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
            if host_reads_are_free(x_TD.device):  # skipped rows go; on a GPU they stay, zeroed
                ran = int(offs_E[-1])
                token_N, gate_N1 = token_N[:ran], gate_N1[:ran]
            x_ND = x_TD.index_select(0, token_N)
            a_NH = torch._grouped_mm(x_ND, w1_EDH, offs=offs_E)
            b_NH = torch._grouped_mm(x_ND, w3_EDH, offs=offs_E)
            del x_ND
            h_NH = F.silu(a_NH).mul_(b_NH)
            y_ND = torch._grouped_mm(h_NH, w2_EHD, offs=offs_E)
            del h_NH
            out_TD.index_add_(0, token_N, _skipped_rows_zeroed(y_ND.mul_(gate_N1), offs_E))
        else:
            # One host sync per call for all segment sizes: the loop needs them in Python.
            # The CPU kernel; on a GPU `grouped_mm` or `triton` keep the sizes on the device.
            counts = counts_E.tolist()
            offs_E = None
            N = sum(counts)  # the rows past them are skipped assignments
            a_NH, b_NH = x_TD.new_empty(N, H), x_TD.new_empty(N, H)
            for rows, segments in _chunks(counts):
                token_C = token_N[rows]
                x_CD = x_TD.index_select(0, token_C)
                a_CH, b_CH = a_NH[rows], b_NH[rows]
                for e, seg in segments:
                    torch.mm(x_CD[seg], w1_EDH[e], out=a_CH[seg])
                    torch.mm(x_CD[seg], w3_EDH[e], out=b_CH[seg])
                h_CH = F.silu(a_CH).mul_(b_CH)
                y_CD = x_CD  # same shape, no longer needed
                for e, seg in segments:
                    torch.mm(h_CH[seg], w2_EHD[e], out=y_CD[seg])
                out_TD.index_add_(0, token_C, y_CD.mul_(gate_N1[rows]))
        ctx.counts = counts
        ctx.save_for_backward(x_TD, gates_TK, w1_EDH, w3_EDH, w2_EHD, a_NH, b_NH,
                              token_N, order_N, gate_N1, offs_E)
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        saved = ctx.saved_tensors  # once: under activation checkpointing a second read fails
        with torch.autocast(saved[0].device.type, enabled=False):
            grads = (_backward_grouped if ctx.counts is None else _backward_loop)(ctx, saved, grad_TD)
        return (*grads, None)


def _backward_loop(ctx, saved, grad_TD):
    (x_TD, gates_TK, w1_EDH, w3_EDH, w2_EHD, a_NH, b_NH,
     token_N, order_N, gate_N1, _) = saved
    need_x, need_gates, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:6]
    counts = ctx.counts
    grad_TD = grad_TD.to(x_TD.dtype)
    dx_TD = torch.zeros_like(x_TD) if need_x else None
    dgate_N = gate_N1.new_empty(a_NH.shape[0]) if need_gates else None  # the rows that ran
    dw1 = _empty_grad(w1_EDH, counts) if need_w1 else None
    dw3 = _empty_grad(w3_EDH, counts) if need_w3 else None
    dw2 = _empty_grad(w2_EHD, counts) if need_w2 else None
    for rows, segments in _chunks(counts):
        token_C, a_CH, b_CH, gate_C1 = token_N[rows], a_NH[rows], b_NH[rows], gate_N1[rows]
        dy_CD = grad_TD.index_select(0, token_C)
        dh_CH = torch.empty_like(a_CH)  # d(h) of the ungated output
        for e, seg in segments:
            torch.mm(dy_CD[seg], w2_EHD[e].t(), out=dh_CH[seg])
        silu_CH = F.silu(a_CH)
        if need_gates or need_w2:
            h_CH = silu_CH * b_CH
            if need_gates:
                dgate_N[rows] = torch.linalg.vecdot(dh_CH, h_CH)
            if need_w2:
                dy_CD.mul_(gate_C1)
                for e, seg in segments:
                    torch.mm(h_CH[seg].t(), dy_CD[seg], out=dw2[e])
            del h_CH
        dh_CH.mul_(gate_C1)
        db_CH = silu_CH.mul_(dh_CH)
        da_CH = torch.ops.aten.silu_backward(dh_CH, a_CH).mul_(b_CH)
        del dh_CH
        if need_w1 or need_w3:
            x_CD = x_TD.index_select(0, token_C)
            for e, seg in segments:
                if need_w1:
                    torch.mm(x_CD[seg].t(), da_CH[seg], out=dw1[e])
                if need_w3:
                    torch.mm(x_CD[seg].t(), db_CH[seg], out=dw3[e])
            del x_CD
        if need_x:
            dx_CD = dy_CD  # same shape, no longer needed
            for e, seg in segments:
                torch.mm(da_CH[seg], w1_EDH[e].t(), out=dx_CD[seg]).addmm_(db_CH[seg], w3_EDH[e].t())
            dx_TD.index_add_(0, token_C, dx_CD)
    dgates = _scatter_grad_gates(dgate_N, order_N, gates_TK) if need_gates else None
    return dx_TD, dgates, None, dw1, dw3, dw2


def _backward_grouped(ctx, saved, grad_TD):
    (x_TD, gates_TK, w1_EDH, w3_EDH, w2_EHD, a_NH, b_NH,
     token_N, order_N, gate_N1, offs_E) = saved
    need_x, need_gates, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:6]
    gmm = torch._grouped_mm
    dx_TD = dgates = dw1 = dw3 = dw2 = None
    dy_ND = grad_TD.to(x_TD.dtype).index_select(0, token_N)
    dh_NH = gmm(dy_ND, w2_EHD.transpose(-2, -1), offs=offs_E)  # d(h) of the ungated output
    silu_NH = F.silu(a_NH)
    if need_gates or need_w2:
        h_NH = silu_NH * b_NH
        if need_gates:
            dgate_N1 = torch.linalg.vecdot(dh_NH, h_NH).unsqueeze(-1)
            dgates = _scatter_grad_gates(_skipped_rows_zeroed(dgate_N1, offs_E).squeeze(-1), order_N, gates_TK)
        if need_w2:
            dw2 = gmm(h_NH.t(), dy_ND.mul_(gate_N1), offs=offs_E)
        del h_NH
    del dy_ND
    dh_NH.mul_(gate_N1)
    db_NH = silu_NH.mul_(dh_NH)
    da_NH = torch.ops.aten.silu_backward(dh_NH, a_NH).mul_(b_NH)
    del dh_NH
    if need_w1 or need_w3:
        x_ND = x_TD.index_select(0, token_N)
        dw1 = gmm(x_ND.t(), da_NH, offs=offs_E) if need_w1 else None
        dw3 = gmm(x_ND.t(), db_NH, offs=offs_E) if need_w3 else None
        del x_ND
    if need_x:
        dx_ND = gmm(da_NH, w1_EDH.transpose(-2, -1), offs=offs_E)
        dx_ND += gmm(db_NH, w3_EDH.transpose(-2, -1), offs=offs_E)
        dx_TD = torch.zeros_like(x_TD).index_add_(0, token_N, _skipped_rows_zeroed(dx_ND, offs_E))
    return dx_TD, dgates, None, dw1, dw3, dw2


def _apply(grouped: bool, x_TD, gates_TK, experts_TK, w1_EDH, w3_EDH, w2_EHD) -> torch.Tensor:
    device_type = x_TD.device.type
    dtype = x_TD.dtype
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    x, w1, w3, w2 = (t.to(dtype) for t in (x_TD, w1_EDH, w3_EDH, w2_EHD))
    with torch.autocast(device_type, enabled=False):
        out_TD = _SortedExperts.apply(x, gates_TK, experts_TK, w1, w3, w2, grouped)
    return out_TD.to(x_TD.dtype)


def experts_sorted(x_TD: torch.Tensor, gates_TK: torch.Tensor, experts_TK: torch.Tensor,
                   w1_EDH: torch.Tensor, w3_EDH: torch.Tensor, w2_EHD: torch.Tensor) -> torch.Tensor:
    """Same contract as experts_naive: one mm per expert segment, expert by expert."""
    return _apply(False, x_TD, gates_TK, experts_TK, w1_EDH, w3_EDH, w2_EHD)


def experts_grouped_mm(x_TD: torch.Tensor, gates_TK: torch.Tensor, experts_TK: torch.Tensor,
                       w1_EDH: torch.Tensor, w3_EDH: torch.Tensor, w2_EHD: torch.Tensor) -> torch.Tensor:
    """Same contract as experts_naive: every GEMM is one torch._grouped_mm over all experts."""
    return _apply(True, x_TD, gates_TK, experts_TK, w1_EDH, w3_EDH, w2_EHD)

"""Fused Triton MoE experts: sort only the indices, gather rows inside the GEMMs.

`experts_triton` computes what `experts_naive` (trainer/moe.py) computes,

    out[t] = sum_k gate[t, k] * (silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e],  e = experts[t, k],

with the N = T*K (token, slot) rows sorted by expert. Only int32 indices are
sorted (a stable argsort, so forward and backward see the same order); the
tiles of BLOCK_M sorted rows, each inside one expert, are laid out on the
device (the grid is the upper bound cdiv(N, BLOCK_M) + E and spare tiles
return at once). Kernels:

- `_gather_up` forward, "scattered -> grouped": each tile gathers its x rows
  by token index inside the K loop and runs the w1 and w3 GEMMs together,
  writing the pre-activations a = x@w1, b = x@w3 [N, H] in sorted order.
  Backward (BWD): gathers dY rows by token, dH' = dY @ w2[e]^T, and in the
  epilogue d(gate) = <h, dH'> (per H block, summed outside: no atomics),
  dA = gate*dH'*b*silu'(a), dB = gate*dH'*silu(a).
- `_scatter_down` forward, "grouped -> scattered": h = silu(a)*b is formed
  from a, b tiles on the fly, y = gate * h @ w2[e] is stored to row t*K+k of
  a [T*K, D] buffer, summed over K afterwards. Backward: dX rows =
  dA @ w1[e]^T + dB @ w3[e]^T, scattered and summed over K the same way.
- `_group_xty` weight gradients per expert segment: dW2[e] = h^T (gate*dY)
  (h again from a, b on the fly), dW1[e] = x^T dA and dW3[e] = x^T dB (x
  gathered by token, one pass for both).

Saved for backward: the inputs and a, b (2*N*H); h is recomputed elementwise
wherever it is needed, the sort is recomputed (N ints). Naive autograd keeps
the gathered x (N*D), x@w1, x@w3, silu, h (4*N*H) and y (N*D) per expert.
Every output element is written by exactly one program, accumulation is
fp32 in registers and K sums go through [T, K, D] buffers, so results are
deterministic (no atomics). Inputs and outputs stay in x's dtype. Skipped
assignments (id E) sort last, outside every expert's tiles: their rows of
the [T, K, D] buffers stay zero.

Tiles: each launch takes the config chosen for its kernel and shape (the
dims, the dtype and the mean rows per expert rounded up to a power of two)
from TILE_CANDIDATES / XTY_CANDIDATES, 64-row tiles for small loads and
128 × 128/256 × 64 ones for Hopper. A shape is timed once, by the first
process that meets it, and the choice is shared with every rank and kept
for restarts through the file the trainer names (kernels/tuning.py), so all
ranks sum in the same order. No host sync: counts and tile layouts stay on
the device.

Single-device code: no process groups; expert parallelism calls it on the
rows a rank received. Under TRITON_INTERPRET=1 (CPU) it runs one small
config and is only correct in fp32.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import triton
import triton.language as tl

from atoll.parallel.kernels import tokens_per_expert, tuning

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _candidates(values):
    """Tile configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) as launch keywords."""
    if _INTERPRET:  # one small config: the CPU interpreter is slow and ignores warps and stages
        values = [(16, 16, 16, 1, 1)]
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return [dict(zip(names, v)) for v in values]


# Row tiles of _gather_up / _scatter_down: BLOCK_M sorted rows (each tile inside one
# expert) × BLOCK_N output columns, BLOCK_K deep. The 64-row tiles suit few rows per
# expert and smaller GPUs; 128 × 128/256 × 64 with 8 warps fill a Hopper SM.
TILE_CANDIDATES = _candidates([
    (64, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3),
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3)])
# _group_xty: BLOCK_M × BLOCK_N of a weight gradient, summed over BLOCK_K rows at a time.
XTY_CANDIDATES = _candidates([
    (64, 64, 32, 4, 4), (128, 64, 32, 8, 3), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3)])
_MIN_BLOCK_N = min(c["BLOCK_N"] for c in TILE_CANDIDATES)


@triton.jit
def _tile_rows(tile_e_ptr, tile_row_ptr, offs_ptr, E, BLOCK_M: tl.constexpr):
    """(expert, sorted row ids, row mask) of this program's tile; expert E marks a spare tile."""
    pid = tl.program_id(0)
    e = tl.load(tile_e_ptr + pid)
    rows = tl.load(tile_row_ptr + pid) + tl.arange(0, BLOCK_M)
    end = tl.load(offs_ptr + e + 1, mask=e < E, other=0)
    return e, rows, rows < end


@triton.jit
def _gather_up(src_ptr, tok_ptr, w_ptr, v_ptr, s_we, s_wk, s_wn,
               a_ptr, b_ptr, gate_ptr, da_ptr, db_ptr, dgate_ptr, s_dg,
               tile_e_ptr, tile_row_ptr, offs_ptr, N, K, E,
               BWD: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e, rows, row_ok = _tile_rows(tile_e_ptr, tile_row_ptr, offs_ptr, E, BLOCK_M)
    if e >= E:
        return
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e.to(tl.int64) * s_we
    v_base = v_ptr + e.to(tl.int64) * s_we
    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        # gather: row m of the tile reads source row tok[m]; no padded copy exists
        src = tl.load(src_ptr + tok[:, None] * K + (k0 + ks)[None, :],
                      mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_off = (k0 + ks)[:, None] * s_wk + cols[None, :] * s_wn
        w_mask = k_ok[:, None] & col_ok[None, :]
        acc_w = tl.dot(src, tl.load(w_base + w_off, mask=w_mask, other=0.0), acc_w,
                       input_precision=PREC)
        if not BWD:
            acc_v = tl.dot(src, tl.load(v_base + w_off, mask=w_mask, other=0.0), acc_v,
                           input_precision=PREC)
    out_off = rows.to(tl.int64)[:, None] * N + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if not BWD:
        tl.store(a_ptr + out_off, acc_w.to(a_ptr.dtype.element_ty), mask=out_mask)
        tl.store(b_ptr + out_off, acc_v.to(b_ptr.dtype.element_ty), mask=out_mask)
    else:  # acc_w = dY @ w2[e]^T, through the gate and the SwiGLU
        a = tl.load(a_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        silu = a * sig
        tl.store(dgate_ptr + rows.to(tl.int64) * s_dg + tl.program_id(1),
                 tl.sum(silu * b * acc_w, axis=1), mask=row_ok)
        gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        dh = acc_w * gate[:, None]
        tl.store(da_ptr + out_off, (dh * b * sig * (1.0 + a * (1.0 - sig))).to(
            da_ptr.dtype.element_ty), mask=out_mask)
        tl.store(db_ptr + out_off, (dh * silu).to(db_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _scatter_down(p_ptr, q_ptr, w_ptr, v_ptr, s_we, s_wk, s_wn, gate_ptr, dst_ptr, out_ptr,
                  tile_e_ptr, tile_row_ptr, offs_ptr, N, K, E,
                  FWD: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e, rows, row_ok = _tile_rows(tile_e_ptr, tile_row_ptr, offs_ptr, E, BLOCK_M)
    if e >= E:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e.to(tl.int64) * s_we
    v_base = v_ptr + e.to(tl.int64) * s_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        in_off = rows.to(tl.int64)[:, None] * K + (k0 + ks)[None, :]
        in_mask = row_ok[:, None] & k_ok[None, :]
        p = tl.load(p_ptr + in_off, mask=in_mask, other=0.0)
        q = tl.load(q_ptr + in_off, mask=in_mask, other=0.0)
        w_off = (k0 + ks)[:, None] * s_wk + cols[None, :] * s_wn
        w_mask = k_ok[:, None] & col_ok[None, :]
        w = tl.load(w_base + w_off, mask=w_mask, other=0.0)
        if FWD:  # p, q = a, b: h = silu(a) * b, rounded to the input dtype like naive's h
            pf = p.to(tl.float32)
            h = (pf * tl.sigmoid(pf) * q.to(tl.float32)).to(p_ptr.dtype.element_ty)
            acc = tl.dot(h, w, acc, input_precision=PREC)
        else:  # p, q = dA, dB; w, v = w1^T, w3^T
            acc = tl.dot(p, w, acc, input_precision=PREC)
            acc = tl.dot(q, tl.load(v_base + w_off, mask=w_mask, other=0.0), acc,
                         input_precision=PREC)
    if FWD:
        acc = acc * tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    # scatter: sorted row m goes to row t*K+k of the [T*K, D] buffer
    dst = tl.load(dst_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tl.store(out_ptr + dst[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _group_xty(x_ptr, x2_ptr, tok_ptr, y_ptr, y2_ptr, gate_ptr, out_ptr, out2_ptr, offs_ptr,
               M, N, DW2: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] [M, N] = sum over expert e's sorted rows r of X[r]^T Y[r].

    DW2: X[r] = silu(a[r]) * b[r] (x, x2 = a, b; M = H), Y[r] = gate[r] * dY[tok[r]].
    else: X[r] = x[tok[r]] (M = D), Y[r] = dA[r] -> out, Y2[r] = dB[r] -> out2.
    """
    e = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    ms = (tl.program_id(1) // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (tl.program_id(1) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    start = tl.load(offs_ptr + e)
    end = tl.load(offs_ptr + e + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        r_ok = rs < end
        tok = tl.load(tok_ptr + rs, mask=r_ok, other=0).to(tl.int64)
        x_mask = m_ok[:, None] & r_ok[None, :]
        y_mask = r_ok[:, None] & n_ok[None, :]
        if DW2:
            x_off = rs.to(tl.int64)[None, :] * M + ms[:, None]  # [BLOCK_M, BLOCK_K] = X^T tile
            a = tl.load(x_ptr + x_off, mask=x_mask, other=0.0).to(tl.float32)
            b = tl.load(x2_ptr + x_off, mask=x_mask, other=0.0).to(tl.float32)
            xt = (a * tl.sigmoid(a) * b).to(x_ptr.dtype.element_ty)
            g = tl.load(gate_ptr + rs, mask=r_ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + tok[:, None] * N + ns[None, :], mask=y_mask, other=0.0)
            y = (y.to(tl.float32) * g[:, None]).to(y_ptr.dtype.element_ty)
            acc = tl.dot(xt, y, acc, input_precision=PREC)
        else:
            xt = tl.load(x_ptr + tok[None, :] * M + ms[:, None], mask=x_mask, other=0.0)
            y_off = rs.to(tl.int64)[:, None] * N + ns[None, :]
            acc = tl.dot(xt, tl.load(y_ptr + y_off, mask=y_mask, other=0.0), acc,
                         input_precision=PREC)
            acc2 = tl.dot(xt, tl.load(y2_ptr + y_off, mask=y_mask, other=0.0), acc2,
                          input_precision=PREC)
    out_off = e.to(tl.int64) * M * N + ms[:, None] * N + ns[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    if not DW2:
        tl.store(out2_ptr + out_off, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------- host side


def _route(experts_TK: torch.Tensor, num_experts: int):
    """Sorted-row indices and rows per expert, all on the device (no host sync).

    Returns dst_N (flat t*K+k index of each sorted row, int64), tok_N (its token,
    int32), counts_E and offs_E1 (row offsets per expert, [E+1], int64).
    """
    K = experts_TK.shape[1]
    flat_N = experts_TK.reshape(-1)
    dst_N = torch.argsort(flat_N, stable=True)
    counts_E = tokens_per_expert(flat_N, num_experts)
    offs_E1 = torch.cat([counts_E.new_zeros(1), counts_E.cumsum(0)])
    return dst_N, (dst_N // K).to(torch.int32), counts_E, offs_E1


class _Tiles:
    """The tile layout of one call's sorted rows for each BLOCK_M asked for, on the device:
    tile_e and tile_row (expert and first sorted row of each tile; expert E marks a spare
    tile). The grid is the upper bound cdiv(N, BLOCK_M) + E, so no host sync sizes it."""

    def __init__(self, counts_E: torch.Tensor, offs_E1: torch.Tensor, rows: int):
        self.counts_E, self.offs_E1, self.rows = counts_E, offs_E1, rows
        self.layouts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if block_m not in self.layouts:
            E = self.counts_E.numel()
            tiles_E = (self.counts_E + block_m - 1) // block_m
            tile_end_E = tiles_E.cumsum(0)
            tile = torch.arange(triton.cdiv(self.rows, block_m) + E, device=self.counts_E.device)
            tile_e = torch.searchsorted(tile_end_E, tile, right=True)
            e = tile_e.clamp(max=E - 1)
            tile_row = self.offs_E1[e] + (tile - tile_end_E[e] + tiles_E[e]) * block_m
            self.layouts[block_m] = (tile_e.to(torch.int32), tile_row.to(torch.int32))
        return self.layouts[block_m]


def _shape_key(rows: int, num_experts: int, dtype: torch.dtype) -> str:
    """The row count and dtype part of a tuning key. Rows: the next power of two of the mean
    rows per expert (known on the host; the rows an expert-parallel rank receives vary from
    step to step and fall into a few buckets)."""
    rows_per_expert = triton.next_power_of_2(max(1, triton.cdiv(rows, num_experts)))
    return f"E={num_experts} rows/expert<={rows_per_expert} {str(dtype).removeprefix('torch.')}"


def _time(launch, config: dict, device: torch.device) -> float:
    """Seconds per launch with `config`."""
    if device.type == "cuda":
        return triton.testing.do_bench(lambda: launch(config), warmup=5, rep=25) / 1e3
    launch(config)  # the interpreter: compile-free, one timed run
    start = time.perf_counter()
    launch(config)
    return time.perf_counter() - start


@functools.cache
def _device_name(device: torch.device) -> str:
    """Part of every tile key; asked of the driver once per device, not per launch."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"


def _run(kernel, key: str, candidates: list[dict], device: torch.device, launch) -> None:
    """`launch(config)` with the config chosen for `key`: once per shape and shared by every
    process on the same tile config file (parallel/kernels/tuning.py)."""
    full_key = f"{kernel.__name__} {key} on {_device_name(device)}"
    launch(tuning.table().choose(full_key, candidates, lambda c: _time(launch, c, device)))


def _tile_launcher(kernel, tiles: _Tiles, n: int, *args, **consts):
    """launch(config) of a row-tile kernel over n output columns: its grid and tile layout
    follow the config's BLOCK_M and BLOCK_N."""
    def launch(config):
        tile_e, tile_row = tiles(config["BLOCK_M"])
        grid = (tile_e.numel(), triton.cdiv(n, config["BLOCK_N"]))
        kernel[grid](*args, tile_e_ptr=tile_e, tile_row_ptr=tile_row, **consts, **config)
    return launch


def _xty_launcher(E: int, m: int, n: int, *args, **consts):
    """launch(config) of _group_xty for [E, m, n] weight gradients."""
    def launch(config):
        grid = (E, triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]))
        _group_xty[grid](*args, **consts, **config)
    return launch


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # bf16/fp16 operands ignore it; fp32 uses TF32 only where torch would


def _no_autocast(fn):
    """Op bodies run as written: autocast would turn their sums into fp32."""
    def wrapper(*args):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*args)
    return functools.wraps(fn)(wrapper)


@torch.library.custom_op("atoll::moe_experts", mutates_args=())
@_no_autocast
def moe_experts(x_TD: torch.Tensor, gates_TK: torch.Tensor, experts_TK: torch.Tensor,
                w1_EDH: torch.Tensor, w3_EDH: torch.Tensor, w2_EHD: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out_TD, a_NH, b_NH): the output and the pre-activations x@w1, x@w3 in sorted order."""
    (T, D), (E, _, H), K = x_TD.shape, w1_EDH.shape, experts_TK.shape[1]
    torch._check(x_TD.dtype == w1_EDH.dtype == w3_EDH.dtype == w2_EHD.dtype,
                 lambda: "atoll::moe_experts needs x and the weights in one dtype")
    x_TD, w1_EDH, w3_EDH, w2_EHD = (t.contiguous() for t in (x_TD, w1_EDH, w3_EDH, w2_EHD))
    dst_N, tok_N, counts_E, offs_E1 = _route(experts_TK, E)
    tiles, offs_E1 = _Tiles(counts_E, offs_E1, T * K), offs_E1.to(torch.int32)
    gate_N = gates_TK.reshape(-1)[dst_N].contiguous()
    dst_N = dst_N.to(torch.int32)
    a_NH = x_TD.new_empty(T * K, H)
    b_NH = x_TD.new_empty(T * K, H)
    prec, shape = _precision(x_TD.dtype), _shape_key(T * K, E, x_TD.dtype)
    _run(_gather_up, f"N={H} K={D} BWD=False {shape}", TILE_CANDIDATES, x_TD.device, _tile_launcher(
        _gather_up, tiles, H, x_TD, tok_N, w1_EDH, w3_EDH, *w1_EDH.stride(), a_NH, b_NH,
        gate_N, a_NH, a_NH, gate_N, 0, offs_ptr=offs_E1, N=H, K=D, E=E, BWD=False, PREC=prec))
    y_NKD = x_TD.new_zeros(T * K, D)  # each row written once, a skipped assignment's never
    _run(_scatter_down, f"N={D} K={H} FWD=True {shape}", TILE_CANDIDATES, x_TD.device, _tile_launcher(
        _scatter_down, tiles, D, a_NH, b_NH, w2_EHD, w2_EHD, *w2_EHD.stride(), gate_N, dst_N, y_NKD,
        offs_ptr=offs_E1, N=D, K=H, E=E, FWD=True, PREC=prec))
    return y_NKD.view(T, K, D).sum(1), a_NH, b_NH


@moe_experts.register_fake
def _(x_TD, gates_TK, experts_TK, w1_EDH, w3_EDH, w2_EHD):
    N, H = experts_TK.numel(), w1_EDH.shape[-1]
    return x_TD.new_empty(x_TD.shape), x_TD.new_empty(N, H), x_TD.new_empty(N, H)


@torch.library.custom_op("atoll::moe_experts_backward", mutates_args=())
@_no_autocast
def moe_experts_backward(grad_TD: torch.Tensor, x_TD: torch.Tensor, gates_TK: torch.Tensor,
                         experts_TK: torch.Tensor, w1_EDH: torch.Tensor, w3_EDH: torch.Tensor,
                         w2_EHD: torch.Tensor, a_NH: torch.Tensor, b_NH: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor]:
    """(dx, dgates, dw1, dw3, dw2) of moe_experts' first output."""
    (T, D), (E, _, H), K = x_TD.shape, w1_EDH.shape, experts_TK.shape[1]
    x_TD, w1_EDH, w3_EDH, w2_EHD = (t.contiguous() for t in (x_TD, w1_EDH, w3_EDH, w2_EHD))
    dy_TD = grad_TD.to(x_TD.dtype).contiguous()
    dst_N, tok_N, counts_E, offs_E1 = _route(experts_TK, E)  # same order as forward
    tiles, offs_E1 = _Tiles(counts_E, offs_E1, T * K), offs_E1.to(torch.int32)
    gate_N = gates_TK.reshape(-1)[dst_N].contiguous()
    prec, shape, device = _precision(x_TD.dtype), _shape_key(T * K, E, x_TD.dtype), x_TD.device

    # dY rows gathered by token, @ w2[e]^T (w2[e] is [H, D]: read it as [D, H])
    da_NH, db_NH = torch.empty_like(a_NH), torch.empty_like(b_NH)
    dgate_NJ = torch.empty(T * K, triton.cdiv(H, _MIN_BLOCK_N), device=device, dtype=torch.float32)
    s_e, s_h, s_d = w2_EHD.stride()
    up = _tile_launcher(_gather_up, tiles, H, dy_TD, tok_N, w2_EHD, w2_EHD, s_e, s_d, s_h, a_NH, b_NH,
                        gate_N, da_NH, db_NH, dgate_NJ, dgate_NJ.stride(0),
                        offs_ptr=offs_E1, N=H, K=D, E=E, BWD=True, PREC=prec)

    def up_zeroed(config):  # a config writes cdiv(H, BLOCK_N) partial sums: the rest stay 0
        dgate_NJ.zero_()
        up(config)

    _run(_gather_up, f"N={H} K={D} BWD=True {shape}", TILE_CANDIDATES, device, up_zeroed)
    dgates_N = torch.empty(T * K, device=device, dtype=torch.float32)
    dgates_N[dst_N] = dgate_NJ.sum(1)

    dw2_EHD = torch.empty_like(w2_EHD)
    _run(_group_xty, f"M={H} N={D} DW2=True {shape}", XTY_CANDIDATES, device, _xty_launcher(
        E, H, D, a_NH, b_NH, tok_N, dy_TD, dy_TD, gate_N, dw2_EHD, dw2_EHD, offs_E1, H, D,
        DW2=True, PREC=prec))
    dw1_EDH, dw3_EDH = torch.empty_like(w1_EDH), torch.empty_like(w3_EDH)
    _run(_group_xty, f"M={D} N={H} DW2=False {shape}", XTY_CANDIDATES, device, _xty_launcher(
        E, D, H, x_TD, x_TD, tok_N, da_NH, db_NH, gate_N, dw1_EDH, dw3_EDH, offs_E1, D, H,
        DW2=False, PREC=prec))

    # dX rows = dA @ w1[e]^T + dB @ w3[e]^T, scattered to t*K+k and summed over k
    dx_NKD = x_TD.new_zeros(T * K, D)  # a skipped assignment's row stays 0
    s_e, s_d, s_h = w1_EDH.stride()
    _run(_scatter_down, f"N={D} K={H} FWD=False {shape}", TILE_CANDIDATES, device, _tile_launcher(
        _scatter_down, tiles, D, da_NH, db_NH, w1_EDH, w3_EDH, s_e, s_h, s_d, gate_N,
        dst_N.to(torch.int32), dx_NKD, offs_ptr=offs_E1, N=D, K=H, E=E, FWD=False, PREC=prec))
    return (dx_NKD.view(T, K, D).sum(1), dgates_N.view(T, K).to(gates_TK.dtype),
            dw1_EDH, dw3_EDH, dw2_EHD)


@moe_experts_backward.register_fake
def _(grad_TD, x_TD, gates_TK, experts_TK, w1_EDH, w3_EDH, w2_EHD, a_NH, b_NH):
    return tuple(t.new_empty(t.shape) for t in (x_TD, gates_TK, w1_EDH, w3_EDH, w2_EHD))


def _setup_context(ctx, inputs, output):
    x_TD, gates_TK, experts_TK, w1_EDH, w3_EDH, w2_EHD = inputs
    _, a_NH, b_NH = output
    ctx.mark_non_differentiable(a_NH, b_NH)
    ctx.set_materialize_grads(False)  # no zero [N, H] grads for the saved pre-activations
    ctx.save_for_backward(x_TD, gates_TK, experts_TK, w1_EDH, w3_EDH, w2_EHD, a_NH, b_NH)


def _backward(ctx, grad_TD, _grad_a, _grad_b):
    if grad_TD is None:
        return None, None, None, None, None, None
    x_TD, gates_TK, experts_TK, w1_EDH, w3_EDH, w2_EHD, a_NH, b_NH = ctx.saved_tensors
    dx, dgates, dw1, dw3, dw2 = moe_experts_backward(
        grad_TD, x_TD, gates_TK, experts_TK, w1_EDH, w3_EDH, w2_EHD, a_NH, b_NH)
    return dx, dgates, None, dw1, dw3, dw2


moe_experts.register_autograd(_backward, setup_context=_setup_context)


def experts_triton(x_TD: torch.Tensor, gates_TK: torch.Tensor, experts_TK: torch.Tensor,
                   w1_EDH: torch.Tensor, w3_EDH: torch.Tensor,
                   w2_EHD: torch.Tensor) -> torch.Tensor:
    """Same contract as experts_naive; differentiable in x, gates and the weights.

    The GEMMs run in x's dtype, or in the autocast dtype inside autocast (as
    naive's matmuls would): x and the weights are cast, the gates stay fp32.
    """
    dtype = x_TD.dtype
    if torch.is_autocast_enabled(x_TD.device.type):
        dtype = torch.get_autocast_dtype(x_TD.device.type)
    x, w1, w3, w2 = (t.to(dtype) for t in (x_TD, w1_EDH, w3_EDH, w2_EHD))
    return moe_experts(x, gates_TK, experts_TK, w1, w3, w2)[0].to(x_TD.dtype)

"""MoE expert-computation kernels: one signature, several implementations.

Every kernel computes, for routed tokens,

    out_TD[t] = sum_k gates_TK[t, k] * swiglu(x_TD[t]; w1[e], w3[e], w2[e]),  e = experts_TK[t, k]

with stacked weights w1_EDH, w3_EDH [E, D, H] and w2_EHD [E, H, D], and is
differentiable in x, gates and weights. An assignment whose expert id is E
(one past the last expert: a zero-computation expert, or one dropped over
capacity) is skipped: no FLOPs, nothing added, a zero gate gradient. `naive`
(trainer/moe.py) is the readable reference every other kernel is tested
against. Kernels are single-device code; expert parallelism calls them on
the tokens a rank received, with k = 1 and unit gates.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

ExpertKernel = Callable[..., torch.Tensor]

# name -> (module, function); imported on first use so optional backends
# (Triton) cost nothing unless chosen.
_REGISTRY: dict[str, tuple[str, str]] = {
    "naive": ("atoll.trainer.moe", "experts_naive"),
    "sorted": ("atoll.parallel.kernels.sorted", "experts_sorted"),
    "grouped_mm": ("atoll.parallel.kernels.sorted", "experts_grouped_mm"),
    "triton": ("atoll.parallel.kernels.triton_moe", "experts_triton"),
}
KERNEL_NAMES = ("auto", *_REGISTRY)


def tokens_per_expert(experts: torch.Tensor, num_experts: int,
                      kept: torch.Tensor | None = None) -> torch.Tensor:
    """Assignments per expert, [num_experts] int64, counted on the device.

    Not torch.bincount: on a GPU it reads the largest id to the host to size its
    output, a sync per call. `kept` (same shape as `experts`, bool) counts only the
    kept assignments, without the boolean-mask indexing that would sync as well.
    Id `num_experts` (a skipped assignment) is not counted. Integer adds, so the
    counts are exact and the same in any order.
    """
    flat = experts.reshape(-1)
    ones = torch.ones_like(flat) if kept is None else kept.reshape(-1).to(flat.dtype)
    return flat.new_zeros(num_experts + 1).scatter_add_(0, flat, ones)[:num_experts]


class KernelUnavailable(ValueError):
    """The chosen kernel cannot run here; one line naming why."""


def in_compute_dtype(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x and the expert weights in the dtype the surrounding autocast computes in.

    Autocast casts torch's own matmuls but not a custom kernel's, which would otherwise
    run on fp32 inputs (and `get_kernel` would choose for fp32): the cast is done here,
    once per call, as autocast would do it for a matmul.
    """
    device_type = x.device.type
    if x.is_meta or not torch.is_autocast_enabled(device_type):
        return (x, *weights)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (x, *weights))


def triton_usable(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return importlib.util.find_spec("triton") is not None


def grouped_mm_usable(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return dtype == torch.float32


def check_name(name: str) -> None:
    if name not in KERNEL_NAMES:
        raise KernelUnavailable(f"unknown MoE kernel '{name}' (known: {', '.join(KERNEL_NAMES)})")


# `auto` on CPU, from benchmarks/moe_layer.py on an idle machine (fp32; RESULTS.md): while
# one expert's GEMM is small (rows·D·H multiply-adds up to about this), the per-expert
# Python loop of `sorted` costs more than its GEMMs and one `torch._grouped_mm` call over
# all experts wins (E=64 k=2 at D=128, H=352, 32 rows: 1.83x naive vs 1.62x); with large
# GEMMs (E=64 k=2 at D=512, H=1024, 256 rows: 1.25x vs 1.09x) `sorted`'s plain matmuls win.
GROUPED_MM_MAX_EXPERT_GEMM = 2**24


def resolve(name: str, device: torch.device, dtype: torch.dtype = torch.float32,
            expert_gemm: float | None = None) -> str:
    """The concrete kernel `name` stands for on this device. "auto" picks the fastest:
    triton on a GPU that has it, else grouped_mm or sorted by the size of one expert's
    GEMM in the call (`expert_gemm` = rows per expert × D × H; unknown: grouped_mm)."""
    if name == "auto":
        if device.type == "cuda" and triton_usable(device):
            return "triton"
        small = expert_gemm is None or expert_gemm <= GROUPED_MM_MAX_EXPERT_GEMM
        return "grouped_mm" if small and grouped_mm_usable(device, dtype) else "sorted"
    check_name(name)
    if name == "triton" and not triton_usable(device):
        raise KernelUnavailable("model.moe.kernel=triton needs a CUDA GPU with Triton "
                                "(or TRITON_INTERPRET=1 for the slow CPU interpreter)")
    if name == "grouped_mm" and not grouped_mm_usable(device, dtype):
        raise KernelUnavailable(f"model.moe.kernel=grouped_mm is not available for {dtype} on "
                                f"{device.type} with torch {torch.__version__}")
    return name


def get_kernel(name: str, device: torch.device, dtype: torch.dtype = torch.float32,
               expert_gemm: float | None = None) -> ExpertKernel:
    module, function = _REGISTRY[resolve(name, device, dtype, expert_gemm)]
    return getattr(importlib.import_module(module), function)

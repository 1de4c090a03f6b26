"""The compute precision of a run (`model.dtype`), decided once from the recipe and the device.

`resolve_precision` turns `auto | bf16 | fp32` into a `Precision` that the
parallel wrappers and the train loop ask how to run. Master weights,
gradients as the optimizer sees them and optimizer state stay fp32 in every
mode; bf16 is the dtype matmuls and activations compute in, reached one of
two ways:

- FSDP2 (dp > 1, `parallel.dp_shard: fsdp`) casts the parameters itself:
  `fsdp_policy` all-gathers them in bf16 and reduce-scatters gradients in
  fp32, so no autocast runs around the forward (`forward_context` is empty)
  and the residual stream is bf16. Parameters FSDP leaves alone run their
  forward under `autocast` (data_parallel.py says which).
- Everywhere else (one process, DDP, pipeline stages without FSDP, DiLoCo
  islands of one rank) the parameters stay fp32 and `forward_context` is
  torch.autocast in the compute dtype.

Ops the model writes in fp32 (norms, rotary, the router, the loss) stay fp32
either way: they cast explicitly and the router turns autocast off.
This module knows torch's precision switches, not the mesh or the model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

# FSDP units that must compute in fp32 whatever the run's precision (the router gates).
FP32_POLICY = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


@dataclass(frozen=True)
class Precision:
    device_type: str
    compute_dtype: torch.dtype  # torch.bfloat16 or torch.float32
    fsdp_casts: bool = False  # FSDP2 casts the parameters: no autocast around the forward

    @property
    def is_mixed(self) -> bool:
        return self.compute_dtype != torch.float32

    def autocast(self):
        """Op-level casting in the compute dtype, for parameters kept in fp32."""
        if not self.is_mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)

    def forward_context(self):
        """The context a forward pass (of the model, or of a pipeline stage) runs under."""
        return contextlib.nullcontext() if self.fsdp_casts else self.autocast()

    def fsdp_policy(self) -> MixedPrecisionPolicy:
        """The policy of every FSDP unit: bf16 all-gathers and compute, fp32 gradient reduction.
        In fp32 it is FSDP's default (no casts), so fp32 runs stay bitwise as without one."""
        if not self.is_mixed:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)

    def configure_backends(self) -> None:
        """Process-wide switches, set once when training starts: on a GPU the matmuls that stay
        fp32 (all of them under model.dtype=fp32; the router's under bf16) use TF32, as cuDNN's
        convolutions already do by default."""
        if self.device_type == "cuda":
            torch.set_float32_matmul_precision("high")


def resolve_precision(dtype: str, device: torch.device, fsdp: bool = False) -> Precision:
    """`model.dtype` on `device`: auto is bf16 on a GPU and fp32 elsewhere. `fsdp`: the
    parameters are sharded by FSDP2 (data_parallel.uses_fsdp), which then does the casting."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    compute = torch.bfloat16 if dtype == "bf16" else torch.float32
    return Precision(device.type, compute, fsdp_casts=fsdp and compute != torch.float32)

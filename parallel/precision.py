"""The compute precision of a run (`model.dtype`), decided once from the recipe and the device.

`resolve_precision` turns `auto | bf16 | fp32` into a `Precision` that the
parallel wrappers and the train loop ask how to run: the autocast context of
a forward pass. Master weights and optimizer state stay fp32 in every mode.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    device_type: str
    compute_dtype: torch.dtype  # torch.bfloat16 or torch.float32

    @property
    def is_mixed(self) -> bool:
        return self.compute_dtype != torch.float32

    def autocast(self):
        """The context a forward pass runs under."""
        if not self.is_mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)


def resolve_precision(dtype: str, device: torch.device) -> Precision:
    """`model.dtype` on `device`: auto is bf16 on a GPU and fp32 elsewhere."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    return Precision(device.type, torch.bfloat16 if dtype == "bf16" else torch.float32)

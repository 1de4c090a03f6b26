"""Model FLOPs utilisation: achieved training FLOP/s per GPU over the GPU's bf16 peak.

`peak_tflops` looks the device's name (as torch.cuda.get_device_name writes
it) up in a table of dense bf16 tensor-core peaks from the vendor's data
sheets (without sparsity); unknown devices and CPUs have none, and a run on
them reports no `mfu`. The trainer supplies the achieved rate (FLOPs per
token × tokens per second of its island) and the number of GPUs that share
it; this file knows nothing about models or runs.
"""

from __future__ import annotations

from typing import Optional

import torch

# (words the name must contain, dense bf16 TFLOP/s), most specific first: "H100 PCIe"
# before "H100". SXM parts and the GH200 superchip carry the plain name.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("B200",), 2250.0),
    (("H200", "NVL"), 835.0),
    (("H200",), 989.0),
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),
    (("A100",), 312.0),
)


def peak_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of the GPU called `device_name`, or None when it is not in the table."""
    name = device_name.lower()
    for words, peak in PEAK_BF16_TFLOPS:
        if all(word.lower() in name for word in words):
            return peak
    return None


def device_peak_tflops(device: torch.device) -> Optional[float]:
    """The table's peak for a CUDA device; None on CPU and on GPUs the table does not know."""
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device))


def model_flops_utilization(tflops: float, gpus: int, peak: float) -> float:
    """Share of the peak reached: `tflops` achieved by `gpus` GPUs together, `peak` per GPU."""
    return tflops / gpus / peak

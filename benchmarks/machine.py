"""What every benchmark prints about the machine it ran on, and small statistics helpers."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional

import psutil
import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_line(threads: Optional[int] = None) -> str:
    """CPU, cores, memory, torch version, threads and GPU: one line for the results."""
    line = (f"cpu: {cpu_name()}, {cores()} cores; {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; "
            f"torch {torch.__version__}")
    if threads is not None:
        line += f"; threads {threads}"
    if torch.cuda.is_available():
        line += f"; gpu: {torch.cuda.get_device_name()}"
    return line


def load_line() -> str:
    """The load average: other work on the machine skews every timing."""
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def percentile(values: list[float], q: float) -> float:
    """Linearly interpolated percentile, q in [0, 1]."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

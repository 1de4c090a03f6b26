"""MFU: the bf16 peak table, the formula, and where the trainer reports it."""

from __future__ import annotations

import pytest
import torch

from atoll.trainer.config import load_recipe
from atoll.trainer.mfu import device_peak_tflops, model_flops_utilization, peak_tflops
from atoll.trainer.train import Trainer
from conftest import TINY_MOE


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA GeForce RTX 4090", None),
    ("Tesla V100-SXM2-32GB", None),
])
def test_peak_table_matches_cuda_device_names(name, peak):
    assert peak_tflops(name) == peak


def test_no_peak_on_cpu():
    assert device_peak_tflops(torch.device("cpu")) is None


def test_mfu_is_per_gpu():
    # 8 GPUs together at 2400 TFLOP/s on H100s: 300 each, 300/989 of the peak
    assert model_flops_utilization(2400.0, 8, 989.0) == pytest.approx(300 / 989)
    assert model_flops_utilization(312.0, 1, 312.0) == 1.0


def test_trainer_reports_mfu_only_with_a_known_peak(tmp_path):
    cfg = load_recipe(None, [*TINY_MOE, "parallel.dp=1", "launch.backend=local", "run.steps=2",
                             "checkpoint.interval=0", "checkpoint.memory_interval=0", f"run.dir={tmp_path}"])
    trainer = Trainer(cfg)
    try:
        result = trainer.one_step()
        metrics = trainer.step_metrics(result, steps=1, elapsed=0.5)
        assert "tflops" in metrics and "mfu" not in metrics  # CPU: no peak
        trainer.peak_tflops = 312.0  # as on an A100
        metrics = trainer.step_metrics(result, steps=1, elapsed=0.5)
        tokens_per_s = 2 * 32 / 0.5  # micro_batch × seq_len per step
        assert metrics["tflops"] == pytest.approx(trainer.flops_per_token * tokens_per_s / 1e12)
        assert metrics["mfu"] == pytest.approx(metrics["tflops"] / 312.0)  # one GPU
        assert list(metrics).index("mfu") == list(metrics).index("tflops") + 1
    finally:
        trainer.close()

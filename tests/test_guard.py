"""Guard rails: a non-finite or spiking loss never reaches the optimizer or a checkpoint.

The fault is injected with a public torch forward hook that turns the
logits of chosen batches into NaN; everything else (the trainer, its
checkpoints, the rollback) is the real code path.
"""

from __future__ import annotations

import math

import pytest
import torch

from atoll.checkpoint.dcp_io import read_tensors
from atoll.checkpoint.manifest import verify
from atoll.checkpoint.store import committed
from atoll.trainer.config import load_recipe
from atoll.trainer.guard import AnomalyGuard
from atoll.trainer.metrics import read_jsonl
from atoll.trainer.train import Trainer, TrainingError
from atoll.parallel.kernels import grouped_mm_usable
from conftest import TINY_MOE
from test_host_syncs import count_host_syncs


def test_guard_skips_then_rolls_back_and_learns_spikes_from_history():
    guard = AnomalyGuard(spike_factor=3.0, max_bad_steps=2)
    kind, value, action = guard.check(float("nan"), 1.0)
    assert (kind, action) == ("nonfinite", "skip") and math.isnan(value)
    kind, value, action = guard.check(2.0, float("inf"))
    assert (kind, action) == ("nonfinite", "rollback")  # second bad step in a row (nan above)
    for _ in range(10):
        assert guard.check(2.0, 1.0) is None
    assert guard.check(5.9, 1.0) is None  # below 3 × median 2.0
    assert guard.check(6.5, 1.0)[:1] == ("spike",)
    assert guard.check(2.1, 1.0) is None  # a good step resets the streak
    restored = AnomalyGuard(3.0, 2)
    restored.load_state_dict(guard.state_dict())
    assert list(restored.recent) == list(guard.recent)


def make_trainer(run_dir, *extra) -> Trainer:
    cfg = load_recipe(None, [*TINY_MOE, "parallel.dp=1", "launch.backend=local", "run.steps=14",
                             "checkpoint.async=false", "checkpoint.memory_interval=0",
                             "fault_tolerance.max_bad_steps=3", f"run.dir={run_dir}", *extra])
    return Trainer(cfg)


def poison(trainer: Trainer, bad_batches: set[int]):
    """NaN logits for the batches that start at these global sample positions."""
    batch = trainer.loader.global_batch

    def hook(module, args, output):
        start = trainer.loader.samples_consumed - batch
        if start // batch in bad_batches:
            logits, aux = output
            return logits * float("nan"), aux
        return output

    return trainer.model.register_forward_hook(hook)


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_nan_batches_are_skipped_then_rolled_back_exactly(tmp_path):
    """Batches 7, 8, 9 give NaN: two skips, then a rollback to the step-5 checkpoint that skips
    every batch since it. The result equals a clean run that skipped the same samples, and no
    checkpoint ever holds a non-finite value."""
    trainer = make_trainer(tmp_path / "guarded", "checkpoint.interval=5")
    poison(trainer, {7, 8, 9})
    try:
        before_bad = None
        while trainer.step < trainer.last_step:
            if trainer.step == 7 and before_bad is None:
                before_bad = params(trainer)
            result = trainer.one_step()
            if result.skipped and trainer.step == 7:
                assert all(torch.equal(before_bad[k], v) for k, v in params(trainer).items())
        got, got_samples = params(trainer), trainer.loader.samples_consumed
        trainer._close_hooks()
    finally:
        trainer.close()
    batch = 2
    anomalies = [e for e in read_jsonl(tmp_path / "guarded" / "events.jsonl") if e["event"] == "anomaly"]
    assert [(a["step"], a["kind"], a["action"]) for a in anomalies] == \
        [(8, "nonfinite", "skip"), (8, "nonfinite", "skip"), (8, "nonfinite", "rollback")]
    rollback = [e for e in read_jsonl(tmp_path / "guarded" / "events.jsonl") if e["event"] == "rollback"]
    assert rollback == [{**rollback[0], "from_step": 7, "to_step": 5, "skipped_samples": 5 * batch}]

    reference = make_trainer(tmp_path / "reference")
    try:
        for _ in range(5):
            reference.one_step()
        reference.loader.samples_consumed += 5 * batch  # the samples the rollback skipped
        while reference.step < 14:
            reference.one_step()
        want = params(reference)
        assert reference.loader.samples_consumed == got_samples
    finally:
        reference.close()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name

    for _, ckpt in committed(tmp_path / "guarded" / "checkpoints"):
        tensors = read_tensors(ckpt, verify(ckpt)["tensors"])
        assert all(torch.isfinite(t).all() for t in tensors.values()), ckpt


def test_divergence_without_a_snapshot_is_one_line_and_saves_nothing(tmp_path):
    trainer = make_trainer(tmp_path / "run", "checkpoint.interval=0", "fault_tolerance.max_bad_steps=1")
    poison(trainer, {2})
    try:
        with pytest.raises(TrainingError, match="the loss diverged at step 3 and there is no snapshot"):
            while trainer.step < trainer.last_step:
                trainer.one_step()
    finally:
        trainer.close()
    assert not committed(tmp_path / "run" / "checkpoints")
    assert all(math.isfinite(r["loss"]) for r in read_jsonl(tmp_path / "run" / "metrics.jsonl"))


@pytest.mark.parametrize("recipe", [
    ("model.moe.kernel=grouped_mm",),  # the default MoE recipe on the GPU-path kernel
    ("model.moe.kernel=grouped_mm", "model.moe.balance=aux_free", "model.moe.capacity_factor=1.0"),
    ("model.moe.num_experts=0",),  # dense
], ids=["moe", "moe-aux-free-capacity", "dense"])
def test_a_step_reads_the_device_once_outside_log_steps(tmp_path, monkeypatch, recipe):
    """Between log steps a training step brings values to the host once (the gradient norm,
    loss and stop flag travel together, for the guard's decision); the MoE load statistics,
    drop counts and the loss stay tensors until a log step, and routing counts stay on the
    device. Counted without CUDA by wrapping every tensor-to-host conversion and every op
    that sizes its output from the data (test_host_syncs.count_host_syncs)."""
    if "model.moe.kernel=grouped_mm" in recipe and not grouped_mm_usable(torch.device("cpu"), torch.float32):
        pytest.skip("torch without _grouped_mm on CPU")
    trainer = make_trainer(tmp_path / "syncs", *recipe, "logging.log_interval=100")
    try:
        trainer.one_step()  # the first step (lazy initialisation) is not the steady state
        reads = count_host_syncs(monkeypatch)
        for _ in range(3):
            trainer.one_step()
        monkeypatch.undo()
        assert reads == ["tolist"] * 3, reads  # one per step: clip_grad_norm's global values
        if "model.moe.num_experts=0" not in recipe:
            assert trainer.load_metrics()["moe.0.dropped"] >= 0  # read at a log step instead
    finally:
        trainer.close()

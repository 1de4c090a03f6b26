"""Pipeline parallelism: the same model and numbers as one process, universal checkpoints."""

from __future__ import annotations

import pytest

from atoll.launch.cli import main
from atoll.parallel.pipeline import stage_layers
from atoll.trainer.config import RecipeError, load_recipe
from conftest import TINY_MOE, losses, run_cli

# Four layers so two stages hold two each; micro_batch 2 splits into 2 pipeline microbatches.
PIPE = [*TINY_MOE, "model.layers=4", "run.steps=6", "checkpoint.interval=3", "parallel.dp=1"]


@pytest.mark.slow
def test_pipeline_schedules_match_single_process_and_resume_across_pp(tmp_path):
    # The reference sees the same forwards: micro_batch 1, two of them per step.
    reference = tmp_path / "reference"
    assert main(["train", *PIPE, "launch.backend=local", "data.micro_batch=1", "data.grad_accum=2",
                 f"run.dir={reference}"]) == 0
    expected = losses(reference)

    one_f_one_b = tmp_path / "pp2_1f1b"
    proc = run_cli(["train", *PIPE, "parallel.pp=2", "run.stop_at=3", f"run.dir={one_f_one_b}"],
                   torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(one_f_one_b) == pytest.approx(expected[:3], rel=1e-5)

    # pp=2 -> pp=1: one process takes both stages' tensors from the pp=2 checkpoint.
    to_pp1 = tmp_path / "to_pp1"
    assert main(["train", *PIPE, "launch.backend=local", "data.micro_batch=1", "data.grad_accum=2",
                 f"checkpoint.resume={one_f_one_b}", f"run.dir={to_pp1}"]) == 0
    assert losses(to_pp1) == pytest.approx(expected[3:], rel=1e-5)

    # pp=1 -> pp=2 with the interleaved schedule (2 stages per rank, 4 stages in all).
    interleaved = tmp_path / "pp2_interleaved"
    proc = run_cli(["train", *PIPE, "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                    "data.micro_batch=2", f"checkpoint.resume={reference / 'checkpoints' / 'step-00000003'}",
                    f"run.dir={interleaved}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(interleaved) == pytest.approx(expected[3:], rel=1e-5)


def test_stage_layers():
    assert stage_layers(4, 2) == [[0, 1], [2, 3]]
    assert stage_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert stage_layers(8, 4, first_last=1) == [[0], [1, 2, 3], [4, 5, 6], [7]]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=2", "parallel.microbatches=1"],
     "parallel.microbatches=1 must be at least parallel.pp=2"),
    (["parallel.pp=2", "data.micro_batch=3"],
     "data.micro_batch=3 must be divisible by parallel.microbatches=2 "
     "(each is split into pipeline microbatches)"),
    (["parallel.pp=8"], "parallel.pp=8 × 1 stages per rank exceeds model.layers=4"),
    (["parallel.pp=2", "parallel.dp=2", "parallel.dp_shard=ddp"],
     "parallel.dp_shard=ddp with parallel.pp > 1 is not supported yet: use parallel.dp_shard=fsdp"),
])
def test_pipeline_layout_errors(overrides, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(None, ["model.layers=4", "data.micro_batch=2", "parallel.dp=1", *overrides])
    assert str(info.value) == message

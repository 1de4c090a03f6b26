"""Every layout computes one process's step where a wrong scale or a lost token would show.

Each run has clipping that bites (`optim.grad_clip=0.05`; the gradient norm
is above 1), capacity drops (`model.moe.capacity_factor=1.0`), the
auxiliary-loss-free expert bias (`model.moe.balance=aux_free`), and zero,
copy and constant experts next to the FFN ones (MoE++, with tau and the
router z-loss), whose assignments never leave the rank, with AdamW or
with plain SGD at a large learning rate, where a gradient or clipping factor
that is off cannot hide behind Adam's normalisation. Against one process that
sees the same forwards (2 samples each), every step must have the same loss
and gradient norm (1e-5), the same loads and drop counts per MoE layer, and
the run must end with bitwise the reference's expert bias.
"""

from __future__ import annotations

import pytest
import torch

from atoll.launch.cli import main
from conftest import TINY_MOE, assert_same_metrics, final_state, grad_norms, moe_stats, run_cli

STEPS = 4
STRESS = [*TINY_MOE, f"run.steps={STEPS}", "optim.grad_clip=0.05", "optim.warmup_steps=0",
          "model.moe.capacity_factor=1.0", "model.moe.balance=aux_free", "model.moe.bias_update_rate=0.01",
          "model.moe.zero_experts=1", "model.moe.copy_experts=1", "model.moe.constant_experts=1",
          "model.moe.zero_compute_tau=0.75", "model.moe.z_loss_coef=0.001",
          f"checkpoint.interval={STEPS}", "checkpoint.async=false", "checkpoint.memory_interval=0"]
OPTIMIZERS = {"adamw": ["optim.name=adamw"], "sgd": ["optim.name=sgd", "optim.lr=0.5", "optim.momentum=0.9"]}
# Each global batch is 8 samples, in forwards of 2: the reference is micro_batch=2 × grad_accum=4.
# (name, processes, layout overrides)
CLIPPED = [
    ("dp2-fsdp-accum2", 2, ["parallel.dp=2", "parallel.dp_shard=fsdp", "data.grad_accum=2"]),
    ("dp2-ddp-accum2", 2, ["parallel.dp=2", "parallel.dp_shard=ddp", "data.grad_accum=2"]),
    ("dp2-ep2-fsdp-accum2", 2, ["parallel.dp=2", "parallel.ep=2", "data.grad_accum=2"]),
    ("pp2-dp2-ep2-fsdp", 4, ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "data.micro_batch=4",
                             "parallel.microbatches=2"]),
]
# dp > ep: experts FSDP-sharded again over dp_mod_ep, or all-reduced over it after DDP.
WIDER = [
    ("dp4-ep2-fsdp", 4, ["parallel.dp=4", "parallel.ep=2", "parallel.dp_shard=fsdp"]),
    ("dp4-ep2-ddp", 4, ["parallel.dp=4", "parallel.ep=2", "parallel.dp_shard=ddp"]),
]
# (name, processes, optimizer, layout overrides): the clipped layouts with either optimizer.
LAYOUTS = [(f"{name}-{optimizer}", procs, optimizer, layout)
           for name, procs, layout in CLIPPED for optimizer in OPTIMIZERS] + \
          [(f"{name}-adamw", procs, "adamw", layout) for name, procs, layout in WIDER]


def expert_biases(run_dir) -> dict[str, torch.Tensor]:
    return {k: v for k, v in final_state(run_dir).items() if k.endswith("router.expert_bias_E")}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The one-process run of each optimizer (cached): the same 2-sample forwards."""
    runs: dict = {}

    def run(optimizer: str):
        if optimizer not in runs:
            run_dir = tmp_path_factory.mktemp(f"reference_{optimizer}")
            assert main(["train", *STRESS, *OPTIMIZERS[optimizer], "launch.backend=local", "parallel.dp=1",
                         "data.grad_accum=4", f"run.dir={run_dir}"]) == 0
            # Not vacuous: clipping bites at every step, tokens are dropped, the bias moved.
            assert min(grad_norms(run_dir)) > 20 * 0.05
            assert sum(v for row in moe_stats(run_dir) for k, v in row.items() if k.endswith(".dropped")) > 0
            assert all(sum(row[f"moe.{layer}.share.{kind}"] for row in moe_stats(run_dir)) > 0
                       for layer in (0, 1) for kind in ("zero", "copy", "constant"))
            assert all(bias.abs().sum() > 0 for bias in expert_biases(run_dir).values())
            runs[optimizer] = run_dir
        return runs[optimizer]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("name, procs, optimizer, layout", LAYOUTS, ids=[row[0] for row in LAYOUTS])
def test_layout_equals_single_process_with_clipping_drops_and_bias(tmp_path, single_process, name, procs,
                                                                   optimizer, layout):
    """Loss and gradient norm within 1e-5 at every step, loads and drops per layer equal, and
    the final expert bias of every layer bitwise the one process's."""
    reference = single_process(optimizer)
    run_dir = tmp_path / name
    proc = run_cli(["train", *STRESS, *OPTIMIZERS[optimizer], *layout, f"run.dir={run_dir}"],
                   torchrun_procs=procs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_metrics(run_dir, reference, ("loss", "grad_norm", "aux_loss"))
    stats = moe_stats(run_dir)
    assert {k.split(".")[1] for k in stats[0]} == {"0", "1"}  # every layer reaches the log
    assert stats == moe_stats(reference)
    got, want = expert_biases(run_dir), expert_biases(reference)
    assert got.keys() == want.keys() and len(want) == 2
    for layer in want:
        assert torch.equal(got[layer], want[layer]), layer

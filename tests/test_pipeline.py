"""Pipeline parallelism: the same model and numbers as one process, universal checkpoints."""

from __future__ import annotations

import pytest

from atoll.launch.cli import main
from atoll.parallel.pipeline import stage_layers
from atoll.trainer.config import RecipeError, load_recipe
from atoll.trainer.metrics import read_jsonl
from conftest import TINY_MOE, losses, run_cli

# The default recipe's model (4 layers, dim 128, 8 experts top-2, seq_len 128), clipping at 1.0.
DEFAULT_MODEL = ["run.steps=5", "logging.log_interval=1", "logging.eval_interval=0",
                 "logging.wandb=disabled", "checkpoint.interval=0", "data.max_bytes=400000",
                 "launch.threads_per_worker=1"]

# A covering set: every schedule, pp 2 and 4, grad_accum 1/2/4, microbatches pp and 2·pp,
# dense and MoE, FSDP and DDP, ep 1 and 2 each appear (not the whole cross product).
# (schedule, pp, dp, grad_accum, microbatches, experts, dp_shard, ep)
MATRIX = [
    ("1f1b", 2, 1, 4, 2, 0, "fsdp", 1),
    ("gpipe", 4, 1, 2, 8, 8, "fsdp", 1),
    ("gpipe", 4, 1, 1, 4, 0, "fsdp", 1),
    ("1f1b", 2, 2, 2, 2, 8, "fsdp", 2),
    ("interleaved_1f1b", 2, 2, 2, 4, 8, "ddp", 2),
]

# Four layers so two stages hold two each; micro_batch 2 splits into 2 pipeline microbatches.
# Eval every 5 steps on the same 4 validation windows in every layout.
PIPE = [*TINY_MOE, "model.layers=4", "run.steps=10", "checkpoint.interval=5", "logging.eval_interval=5",
        "logging.eval_batches=2"]


def reference(run_dir, samples_per_step: int, resume=None, micro_batch: int = 1) -> None:
    """One process that sees the same forwards (pipeline microbatches hold one sample)."""
    args = ["train", *PIPE, "launch.backend=local", "parallel.dp=1", f"data.micro_batch={micro_batch}",
            f"data.grad_accum={samples_per_step // micro_batch}",
            f"run.dir={run_dir}"]
    assert main(args + ([f"checkpoint.resume={resume}"] if resume else [])) == 0


def torchrun(run_dir, pp: int, dp: int, *overrides: str) -> None:
    """pp × dp processes with micro-batches of 2 samples."""
    proc = run_cli(["train", *PIPE, f"parallel.pp={pp}", f"parallel.dp={dp}",
                    *overrides, f"run.dir={run_dir}"],
                   torchrun_procs=pp * dp)
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_continues(run_dir, expected_run, first_step: int = 1) -> None:
    """Same losses, eval losses, samples and MoE loads as the reference from `first_step` on
    (to the run's last step)."""
    got = read_jsonl(run_dir / "metrics.jsonl")
    want = [r for r in read_jsonl(expected_run / "metrics.jsonl") if first_step <= r["step"] <= got[-1]["step"]]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r["samples"] for r in got] == [r["samples"] for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    assert [r["aux_loss"] for r in got] == pytest.approx([r["aux_loss"] for r in want], rel=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-5)
    evals = {r["step"]: r["eval_loss"] for r in got if "eval_loss" in r}
    assert evals and evals == pytest.approx({r["step"]: r["eval_loss"] for r in want if "eval_loss" in r},
                                            rel=1e-5)
    # Every stage's MoE layers reach the logging rank, with the loads of the whole step.
    loads = [{k: v for k, v in r.items() if k.startswith("moe.")} for r in got]
    assert {k.split(".")[1] for k in loads[0]} == {"0", "1", "2", "3"}
    assert loads == [{k: v for k, v in r.items() if k.startswith("moe.")} for r in want]


def assert_same_numbers(got_dir, want_dir) -> None:
    """Loss and gradient norm within 1e-5 of the reference at every step."""
    got, want = read_jsonl(got_dir / "metrics.jsonl"), read_jsonl(want_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4, 5]
    assert [r["samples"] for r in got] == [r["samples"] for r in want]
    for name in ("loss", "grad_norm", "aux_loss"):
        assert [r[name] for r in got] == pytest.approx([r[name] for r in want], rel=1e-5), name


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The one-process reference of a step of `batch` samples, one sample per forward (cached)."""
    runs: dict = {}

    def run(experts: int, batch: int):
        if (experts, batch) not in runs:
            run_dir = tmp_path_factory.mktemp(f"reference_e{experts}_b{batch}")
            assert main(["train", *DEFAULT_MODEL, f"model.moe.num_experts={experts}", "launch.backend=local",
                         "parallel.dp=1", "data.micro_batch=1", f"data.grad_accum={batch}",
                         f"run.dir={run_dir}"]) == 0
            runs[experts, batch] = run_dir
        return runs[experts, batch]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("schedule, pp, dp, grad_accum, microbatches, experts, dp_shard, ep", MATRIX,
                         ids=["-".join(map(str, row)) for row in MATRIX])
def test_pipeline_gradient_equals_single_process(tmp_path, single_process, schedule, pp, dp, grad_accum,
                                                 microbatches, experts, dp_shard, ep):
    """Every schedule, with gradient accumulation, gives one process's loss and gradient norm.

    Each pipeline microbatch holds one sample, as each forward of the reference does."""
    run_dir = tmp_path / "pipeline"
    proc = run_cli(["train", *DEFAULT_MODEL, f"model.moe.num_experts={experts}",
                    f"parallel.pp={pp}", f"parallel.dp={dp}", f"parallel.ep={ep}",
                    f"parallel.dp_shard={dp_shard}", f"parallel.pp_schedule={schedule}",
                    f"parallel.microbatches={microbatches}", f"data.micro_batch={microbatches}",
                    f"data.grad_accum={grad_accum}", f"run.dir={run_dir}"], torchrun_procs=pp * dp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_numbers(run_dir, single_process(experts, microbatches * grad_accum * dp))


@pytest.mark.slow
def test_pipeline_schedules_match_single_process_and_resume_across_pp(tmp_path):
    ref = tmp_path / "reference"
    reference(ref, samples_per_step=2)

    one_f_one_b = tmp_path / "pp2_1f1b"
    torchrun(one_f_one_b, 2, 1)
    assert_continues(one_f_one_b, ref)

    # pp=2 -> pp=1: one process takes both stages' tensors from the pp=2 checkpoint.
    to_pp1 = tmp_path / "to_pp1"
    reference(to_pp1, samples_per_step=2, resume=one_f_one_b / "checkpoints" / "step-00000005")
    assert_continues(to_pp1, ref, first_step=6)

    # pp=1 -> pp=2 with the interleaved schedule (2 stages per rank, 4 stages in all).
    interleaved = tmp_path / "pp2_interleaved"
    torchrun(interleaved, 2, 1, "parallel.pp_schedule=interleaved_1f1b",
             f"checkpoint.resume={ref / 'checkpoints' / 'step-00000005'}")
    assert_continues(interleaved, ref, first_step=6)


@pytest.mark.slow
def test_pp_dp_ep_compose_on_four_processes_and_reshard(tmp_path):
    """pp=2 × dp=2 × ep=2 equals one process; checkpoints move across every dimension."""
    ref = tmp_path / "reference"
    reference(ref, samples_per_step=4)

    pp_ep = tmp_path / "pp2_dp2_ep2"  # to the step-5 checkpoint the reshards start from
    torchrun(pp_ep, 2, 2, "parallel.ep=2", "parallel.dp_shard=fsdp", "run.stop_at=5")
    assert_continues(pp_ep, ref)

    # pp 2->1, ep 2->1 (the experts' dp_mod_ep group grows 1->2), fsdp->ddp. Without the
    # pipeline, forwards hold 2 samples: the float sums differ from the uninterrupted run's in
    # the last bits, which Adam's next steps amplify to ~3e-5. So the exact reference is one
    # process with 2-sample micro-batches resumed from the same checkpoint.
    flat = tmp_path / "pp1_dp2_ddp"
    pp_ep_step5 = pp_ep / "checkpoints" / "step-00000005"
    torchrun(flat, 1, 2, "parallel.dp_shard=ddp", f"checkpoint.resume={pp_ep_step5}")
    flat_ref = tmp_path / "reference_from_pp2_dp2_ep2"
    reference(flat_ref, samples_per_step=4, resume=pp_ep_step5, micro_batch=2)
    assert_continues(flat, flat_ref, first_step=6)
    # The switch aux loss is taken per forward, so 2-sample forwards change it (and its
    # gradient, slightly): only the language-model loss compares with the uninterrupted run.
    assert losses(flat) == pytest.approx(losses(ref)[5:], rel=1e-4)

    # pp 1->2 and dp 1->2 at once, DDP inside the stages, experts split over ep=2.
    spread = tmp_path / "pp2_dp2_ep2_ddp"
    torchrun(spread, 2, 2, "parallel.ep=2", "parallel.dp_shard=ddp",
             f"checkpoint.resume={ref / 'checkpoints' / 'step-00000005'}")
    assert_continues(spread, ref, first_step=6)


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
])
def test_pipeline_layout_errors(overrides, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(None, ["model.layers=4", "data.micro_batch=2", "parallel.dp=1", *overrides])
    assert str(info.value) == message
